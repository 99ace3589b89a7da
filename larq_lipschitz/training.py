"""Training a (binarized) classifier with a Lipschitz control through `model.fit`.

`train(TrainConfig(...), output_dir)` is what `larq-lipschitz train` runs: it picks a
`tf.distribute` strategy, loads the data, builds the model inside the strategy's scope,
attaches the chosen Lipschitz control, trains with `model.fit`, evaluates clean and under
Gaussian noise, and writes the run folder described in `larq_lipschitz.runs`.

The callbacks it uses are public so that other `model.fit` loops can use them too:
`NonFiniteCheck` (stop at the first NaN/Inf weight or loss, naming the layer or batch),
`check_finite_inputs` (the same for input data), `EpochCheckpoint` (resumable epoch
checkpoints), `EpochHistory` (an atomically rewritten per-epoch CSV), `EpochTimer` and
`ProgressLog`. docs/reliability.md describes resuming, atomic files, determinism and
multi-worker training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

from larq_lipschitz import runs
from larq_lipschitz.distribute import (
    agree_across_workers,
    choose_strategy,
    cluster_size,
    is_chief,
    is_multi_worker,
)
from larq_lipschitz.evaluation import (
    DEFAULT_NOISE_SIGMAS,
    noise_report,
    outputs_probabilities,
)

import tensorflow as tf

log = logging.getLogger(__name__)

#: The Lipschitz controls `train` knows, by the name the command line uses.
CONTROLS = ("none", "l1inf", "l1inf-constraint", "scale-aware", "spectral", "lcr")

#: Strength (or radius, for the constraint) used when the user gives none.
DEFAULT_STRENGTH = {
    "none": 0.0,
    "l1inf": 1e-5,
    "l1inf-constraint": 1.0,
    "scale-aware": 1e-5,
    "spectral": 1e-4,
    "lcr": 3.2,
}

OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run's numbers (and nothing that does not).

    # Arguments
        model: a name from `larq_lipschitz.models.available()`.
        dataset: `"cifar10"` or `"imagenet2012"`.
        data: path of a local dataset archive, or `None` to use tensorflow-datasets.
        data_dir: tensorflow-datasets data folder (TFDS sources only).
        weight_bits, activation_bits: 1 or 32 each (1/1, 1/32, 32/32).
        regularizer: one of `CONTROLS`.
        strength: penalty strength (L1,inf radius for `l1inf-constraint`, alpha for
            `lcr`); `None` takes `DEFAULT_STRENGTH[regularizer]`.
        target: for penalties in "excess" form, the bound below which nothing is paid.
        teacher: for `lcr`, the saved full-precision teacher model (`.keras`).
        epochs: number of passes over the training set.
        batch_size: global batch size (split over replicas).
        learning_rate: peak learning rate of the cosine schedule.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9).
        weight_decay: decoupled weight decay of the optimizer (Keras' `weight_decay`:
            each step multiplies every trainable weight by `1 - lr * weight_decay`);
            0 for none.
        seed: seeds the weights, data order, augmentation and noise.
        train_examples: use only this many training images (quick runs).
        validation_examples: hold out this many training images for validation.
        noise_sigmas: Gaussian noise levels of the final evaluation ([0, 1] pixel scale).
        synchronized_bn: synchronize BatchNorm across replicas; `None` = only when more
            than one replica is in sync.
    """

    model: str = "resnet20"
    dataset: str = "cifar10"
    data: str | None = None
    data_dir: str | None = None
    weight_bits: int = 1
    activation_bits: int = 1
    regularizer: str = "l1inf"
    strength: float | None = None
    target: float | None = None
    teacher: str | None = None
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 5e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    train_examples: int | None = None
    validation_examples: int = 0
    noise_sigmas: tuple[float, ...] = DEFAULT_NOISE_SIGMAS
    synchronized_bn: bool | None = None

    def __post_init__(self):
        self.noise_sigmas = tuple(float(s) for s in self.noise_sigmas)
        if self.data is not None:
            self.data = str(pathlib.Path(self.data).expanduser().resolve())
        if self.teacher:  # absolute, so that a rerun from elsewhere is the same run
            self.teacher = str(pathlib.Path(self.teacher).expanduser().resolve())
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH.get(self.regularizer)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first setting that cannot work."""

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        from larq_lipschitz.models import registry

        registry.entry(self.model)  # an unknown model name fails before any data loads
        if self.regularizer not in CONTROLS:
            raise ValueError(
                f"unknown regularizer {self.regularizer!r}; available: {', '.join(CONTROLS)}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}."
            )
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("train_examples", self.train_examples, allow_none=True)
        if self.epochs > 100_000:
            raise ValueError(
                f"epochs={self.epochs} is not a plausible number of epochs."
            )
        if self.batch_size > 1_000_000:
            raise ValueError(
                f"batch_size={self.batch_size} is not a plausible batch size."
            )
        if (
            not isinstance(self.validation_examples, int)
            or self.validation_examples < 0
        ):
            raise ValueError(
                f"validation_examples must be an integer >= 0, got {self.validation_examples!r}."
            )
        lr = self.learning_rate
        if (
            not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or not 0 < lr <= 10
        ):
            raise ValueError(
                f"learning_rate must be a finite number in (0, 10], got {lr!r}."
            )
        wd = self.weight_decay
        if not isinstance(wd, (int, float)) or not math.isfinite(wd) or not 0 <= wd < 1:
            raise ValueError(
                f"weight_decay must be a finite number in [0, 1), got {wd!r}."
            )
        for name in ("strength", "target"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.strength is not None and self.strength > 1e6:
            raise ValueError(
                f"strength={self.strength!r} is not a plausible strength (at most 1e6)."
            )
        if self.regularizer == "lcr":
            if not self.teacher:
                raise ValueError(
                    "regularizer 'lcr' needs a trained full-precision teacher: pass --teacher "
                    "PATH.keras (train one with --weight-bits 32 --activation-bits 32 "
                    "--regularizer none)."
                )
            if not pathlib.Path(self.teacher).exists():
                raise ValueError(f"--teacher {self.teacher}: no such file.")
        if self.regularizer == "l1inf-constraint" and not self.strength > 0:
            raise ValueError("l1inf-constraint needs a radius (--strength) > 0.")
        for sigma in self.noise_sigmas:
            if not math.isfinite(sigma) or not 0 <= sigma <= 1:
                raise ValueError(
                    f"noise sigma must be in [0, 1] pixel scale, got {sigma!r}."
                )
        if self.weight_bits not in (1, 32) or self.activation_bits not in (1, 32):
            raise ValueError(
                f"weight_bits/activation_bits must each be 1 or 32, got "
                f"{self.weight_bits}/{self.activation_bits}."
            )
        if (
            self.seed is None
            or isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(
                f"seed must be in [0, 2**32 - 1] (TensorFlow's and NumPy's range), "
                f"got {self.seed}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EpochTimer(tf.keras.callbacks.Callback):
    """Wall-clock seconds of each training epoch, in `self.seconds` and in the logs."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        if logs is not None:
            logs["epoch_seconds"] = self.seconds[-1]


class ProgressLog(tf.keras.callbacks.Callback):
    """Log progress every `every` training steps (for logs that are not a terminal)."""

    def __init__(self, steps_per_epoch: int | None, every: int = 50):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.every = max(1, every)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every:
            return
        rate = (batch + 1) / max(time.perf_counter() - self._start, 1e-9)
        total = self.steps_per_epoch or "?"
        metrics = " ".join(f"{k}={float(v):.4f}" for k, v in (logs or {}).items())
        log.info(
            "epoch %d step %d/%s (%.1f steps/s) %s",
            self._epoch + 1,
            batch + 1,
            total,
            rate,
            metrics,
        )


#: Marker of the error `check_finite_inputs` raises; `train` recognizes it by this text.
NONFINITE_INPUT_MESSAGE = "larq_lipschitz: non-finite input data"


def check_finite_inputs(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with every floating-point input tensor checked for NaN and Inf.

    The first component of each element (the model's inputs: a tensor or a nest of
    tensors) goes through `tf.debugging.check_numerics`; labels and sample weights pass
    unchecked. A batch that holds a NaN or an infinite value makes the iterator raise
    `tf.errors.InvalidArgumentError` whose message contains `NONFINITE_INPUT_MESSAGE`,
    at the position of that batch, so `model.fit` stops before training on it. The
    check is one reduction per batch. `check_numerics` is a stateful op, so with op
    determinism on TensorFlow runs this one `map` serially; on the CIFAR-10 pipeline
    that left the input rate far above a CPU's training step rate (docs/reliability.md).

    # Arguments
        dataset: elements `inputs` or `(inputs, labels[, weights])`.

    # Returns
        The checked dataset (same elements, same cardinality).

    # Raises
        TypeError: `dataset` is not a `tf.data.Dataset`.

    # Example
    ```python
    images = np.zeros((4, 8, 8, 3), "float32")
    images[2, 0, 0, 0] = np.nan
    data = tf.data.Dataset.from_tensor_slices((images, np.zeros(4))).batch(2)
    list(check_finite_inputs(data))  # InvalidArgumentError at the second batch
    ```
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"check_finite_inputs: expected a tf.data.Dataset, got {type(dataset).__name__}."
        )

    def check(tensor):
        if tensor.dtype.is_floating:
            return tf.debugging.check_numerics(tensor, NONFINITE_INPUT_MESSAGE)
        return tensor

    def checked(*element):
        first = tf.nest.map_structure(check, element[0])
        return first if len(element) == 1 else (first, *element[1:])

    return dataset.map(checked, num_parallel_calls=tf.data.AUTOTUNE)


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Save model, optimizer and epoch counter at every epoch end, for `train` to resume.

    Works under every strategy (Keras' `BackupAndRestore` refuses `OneDeviceStrategy`).
    TensorFlow writes the checkpoint's files first and then replaces the small index
    file that names the latest one (write to a temporary file, then rename), so a
    process killed while saving leaves the previous checkpoint in force. Workers other
    than the chief write to a private temporary folder, as multi-worker checkpointing
    needs every worker to take part in the save, and restore from the chief's folder
    (`restore_from`), which must then be on a filesystem all workers share.

    # Arguments
        checkpoint: the `tf.train.Checkpoint` to save and restore.
        epoch: the checkpoint's epoch counter (number of finished epochs).
        directory: where this process writes its checkpoints.
        restore_from: where to read the latest checkpoint (default: `directory`).
        guard: a `NonFiniteCheck`; an epoch it failed is not saved.
    """

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        epoch: tf.Variable,
        directory: str,
        *,
        restore_from: str | None = None,
        guard: NonFiniteCheck | None = None,
    ):
        super().__init__()
        self.epoch = epoch
        self.guard = guard
        self.restore_from = restore_from or directory
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)

    def restore(self) -> int:
        """Restore the latest checkpoint, if any; return the number of finished epochs."""
        latest = tf.train.latest_checkpoint(self.restore_from)
        if latest is None:
            return 0
        self.manager.checkpoint.restore(latest).expect_partial()
        return int(self.epoch.numpy())

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure:
            log.warning(
                "epoch %d is not checkpointed: %s; the checkpoint of epoch %d stays",
                epoch + 1,
                self.guard.failure,
                epoch,
            )
            return
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class NonFiniteCheck(tf.keras.callbacks.Callback):
    """Stop training at the first NaN or Inf, and say where it appeared.

    Checks, all on the model's own (local) weight copies, without collectives:

    - before every training step, that every floating-point weight is finite (one fused
      reduction over all weights; `check_every_step=False` skips it). A non-finite
      weight is reported with the first layer that holds one, in the order of
      `model.layers` (nested models included), and the last step before it was seen
      ("after the update of epoch 2, step 5"), or "before the first training step" when
      it was there when training began;
    - after every step, that the loss is finite. A non-finite loss with finite weights
      means the arithmetic of that step overflowed (divergence) or, where the inputs
      are not checked by `check_finite_inputs`, that the batch held NaN/Inf;
    - at the end of every epoch, the weights again (the epoch's last update), before
      the callbacks after this one log or checkpoint the epoch.

    On the first failure it sets `model.stop_training` (Keras stops after the current
    step: a step whose weights were already bad still runs, on weights that are
    discarded), logs the message and keeps it in `failure`; callbacks that persist
    state (`EpochCheckpoint`, `EpochHistory`) read it and write nothing for the failed
    epoch. `position` names the batch being
    processed, which `train` uses to place an input-data error. Epochs and steps are
    counted from 1 in messages.

    # Arguments
        check_every_step: check the weights before every step (else only when the loss
            is non-finite and at epoch ends).
        advice: text appended to a divergence message (e.g. which settings to lower).

    # Example
    ```python
    guard = NonFiniteCheck()
    model.fit(check_finite_inputs(dataset), epochs=3, callbacks=[guard])
    if guard.failure:
        raise FloatingPointError(guard.failure)
    ```
    """

    def __init__(self, check_every_step: bool = True, advice: str = ""):
        super().__init__()
        if not isinstance(check_every_step, bool):
            raise TypeError(
                f"NonFiniteCheck: check_every_step must be True or False, got {check_every_step!r}."
            )
        self.check_every_step = check_every_step
        self.advice = str(advice)
        self.failure: str | None = None
        self._epoch = 0
        self._step = 0
        self._phase = "training"
        self._last_update: tuple[int, int] | None = None
        self._flags = None
        self._names: list[str] = []

    # --- where we are ------------------------------------------------------------

    @property
    def position(self) -> str:
        """The batch being processed, e.g. `"training batch: epoch 2, step 5"`."""
        if self._phase == "validation":
            return f"validation batch {self._step + 1} after epoch {self._epoch + 1}"
        return f"training batch: epoch {self._epoch + 1}, step {self._step + 1}"

    def on_train_begin(self, logs=None):
        self.failure = None
        self._last_update = None
        pairs = _layer_weights(self.model)
        strategy = self.model.distribute_strategy
        groups = [list(strategy.experimental_local_results(v)) for _, v in pairs]
        self._names = [name for name, _ in pairs]

        @tf.function
        def flags():
            return tf.stack(
                [
                    tf.reduce_all(
                        tf.stack([tf.reduce_all(tf.math.is_finite(c)) for c in group])
                    )
                    for group in groups
                ]
            )

        self._flags = flags if groups else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._step, self._phase = epoch, 0, "training"

    def on_train_batch_begin(self, batch, logs=None):
        self._step, self._phase = batch, "training"
        if self.check_every_step and not self.failure:
            bad = self._first_nonfinite_layer()
            if bad is not None:
                self._fail(
                    f"the weights of layer {bad} became non-finite {self._when()}"
                )

    def on_train_batch_end(self, batch, logs=None):
        self._last_update = (self._epoch, batch)
        loss = (logs or {}).get("loss")
        if self.failure or loss is None or math.isfinite(float(loss)):
            return
        where = f"epoch {self._epoch + 1}, step {batch + 1}"
        bad = None if self.check_every_step else self._first_nonfinite_layer()
        if bad is not None:
            self._fail(
                f"the loss became non-finite ({float(loss)}) at {where}; the first layer "
                f"with non-finite weights is {bad}"
            )
            return
        self._fail(
            f"the loss became non-finite ({float(loss)}) at {where} while the weights "
            "were finite: training diverged"
            + (f" ({self.advice})" if self.advice else "")
        )

    def on_epoch_end(self, epoch, logs=None):
        if self.failure:
            return
        bad = self._first_nonfinite_layer()
        if bad is not None:
            self._fail(f"the weights of layer {bad} became non-finite {self._when()}")

    def on_test_begin(self, logs=None):
        self._phase = "validation"

    def on_test_batch_begin(self, batch, logs=None):
        self._step = batch

    def on_test_end(self, logs=None):
        self._phase = "training"

    # --- helpers -----------------------------------------------------------------

    def _when(self) -> str:
        if self._last_update is None:
            return "before the first training step (they were already non-finite)"
        epoch, step = self._last_update
        return f"after the update of epoch {epoch + 1}, step {step + 1}"

    def _first_nonfinite_layer(self) -> str | None:
        if self._flags is None:
            return None
        flags = self._flags().numpy()
        if flags.all():
            return None
        first = int(flags.argmin())
        others = int((~flags).sum()) - 1
        more = f" (and {others} more weight{'s' * (others > 1)})" if others else ""
        return f"'{self._names[first]}'{more}"

    def _fail(self, message: str) -> None:
        self.failure = message
        self.model.stop_training = True
        log.error("stopping training: %s", message)


class EpochHistory(tf.keras.callbacks.Callback):
    """The per-epoch metrics in a CSV file, rewritten whole and atomically every epoch.

    Unlike Keras' `CSVLogger`, which appends to an open file, a reader (or a process
    killed at any moment) sees either the previous complete file or the new complete
    one, never a partial row. Rows already in the file are kept (a resumed run prunes
    the epochs it trains again first); a row for an epoch already present replaces it.
    Columns: `epoch` (counted from 0, as Keras does), then the metric names in sorted
    order; a metric missing from an epoch is written as `NA`.

    # Arguments
        path: the CSV file.
        guard: a `NonFiniteCheck`; an epoch it failed is not written.
    """

    def __init__(self, path: str | os.PathLike, guard: NonFiniteCheck | None = None):
        super().__init__()
        self.path = pathlib.Path(path)
        self.guard = guard
        self.rows: list[dict[str, str]] = []

    def on_train_begin(self, logs=None):
        self.rows = _history_rows(self.path)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure:
            return
        row = {"epoch": str(epoch)}
        for key, value in (logs or {}).items():
            try:
                row[key] = repr(float(value))
            except (TypeError, ValueError):
                continue
        self.rows = [r for r in self.rows if r["epoch"] != str(epoch)] + [row]
        _write_history(self.path, self.rows)


def _history_rows(csv_path: pathlib.Path) -> list[dict[str, str]]:
    """The complete rows of a history file, one per epoch (the last one written wins).

    Rows that do not have one value per column or whose epoch is not an integer (the
    tail of a file an older version appended to when it was killed) are dropped.
    """
    import csv
    import io

    if not csv_path.is_file():
        return []
    text = csv_path.read_text(encoding="utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[0] != "epoch":
        return []
    rows: dict[int, dict[str, str]] = {}
    complete_lines = text.endswith("\n")
    lines = list(reader)
    for i, values in enumerate(lines):
        if len(values) != len(header) or not values[0].isdigit():
            continue
        if i == len(lines) - 1 and not complete_lines:
            continue  # a last line without its newline may be cut short
        rows[int(values[0])] = dict(zip(header, values, strict=True))
    return [rows[e] for e in sorted(rows)]


def _write_history(csv_path: pathlib.Path, rows: list[dict[str, str]]) -> None:
    import csv
    import io

    columns = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch"})
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="NA", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    runs.atomic_write_text(csv_path, out.getvalue())


def _prune_history(csv_path: pathlib.Path, epochs_done: int) -> None:
    """Keep only complete rows of the epochs a resumed run does not train again."""
    if not csv_path.is_file():
        return
    rows = [r for r in _history_rows(csv_path) if int(r["epoch"]) < epochs_done]
    if rows:
        _write_history(csv_path, rows)
    else:
        csv_path.unlink()


def _read_history(csv_path: pathlib.Path) -> dict[str, list[float]]:
    """The per-epoch metrics of `history.csv`, as `{column: [value per epoch]}`."""
    rows = _history_rows(csv_path)
    columns = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch"})

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):  # "NA" for a missing value
            return None

    table = {c: [number(r.get(c)) for r in rows] for c in columns}
    return {c: v for c, v in table.items() if any(x is not None for x in v)}


def _layer_weights(model: tf.keras.Model) -> list[tuple[str, tf.Variable]]:
    """`(layer name, variable)` for every floating-point weight, in layer order.

    Nested models are walked into (their layers are named `outer/inner`); a variable is
    listed once, under the first layer that holds it; weights of no layer (a subclassed
    model's own variables) come last, named `model (variable)`.
    """
    pairs: list[tuple[str, tf.Variable]] = []
    seen: set[int] = set()

    def add(name, variables):
        for variable in variables:
            if id(variable) in seen or not variable.dtype.is_floating:
                continue
            seen.add(id(variable))
            pairs.append((name, variable))

    def walk(container, prefix):
        for layer in getattr(container, "layers", []):
            if getattr(layer, "layers", None):
                walk(layer, f"{prefix}{layer.name}/")
            add(prefix + layer.name, layer.weights)

    walk(model, "")
    for variable in model.weights:
        add(f"{model.name} ({variable.name})", [variable])
    return pairs


def _build_optimizer(
    config: TrainConfig, total_steps: int
) -> tf.keras.optimizers.Optimizer:
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, total_steps)
    )
    decay = config.weight_decay or None
    if config.optimizer == "sgd":
        return tf.keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=decay)
    return tf.keras.optimizers.Adam(schedule, weight_decay=decay)


def _attach_control(model: tf.keras.Model, config: TrainConfig) -> tf.keras.Model:
    """The model with `config.regularizer` attached (a new model where one is needed)."""
    name, strength = config.regularizer, config.strength
    if name in ("none", "lcr"):
        return model
    from larq_lipschitz.apply import apply_lipschitz

    if name == "l1inf":
        from larq_lipschitz.regularizers import L1InfLipschitz

        if config.target is None:
            reg = L1InfLipschitz(strength)
        else:
            reg = L1InfLipschitz(strength, mode="excess", target=config.target)
        return apply_lipschitz(model, regularizer=reg)
    if name == "l1inf-constraint":
        from larq_lipschitz.constraints import L1InfConstraint

        return apply_lipschitz(model, constraint=L1InfConstraint(strength))
    if name == "spectral":
        from larq_lipschitz.regularizers import SpectralNormLipschitz

        return apply_lipschitz(model, regularizer=SpectralNormLipschitz(strength))
    if name == "scale-aware":
        from larq_lipschitz.scale_aware import add_scale_aware_penalty

        kwargs = (
            {} if config.target is None else {"mode": "excess", "target": config.target}
        )
        add_scale_aware_penalty(model, strength, **kwargs)  # in place
        return model
    raise AssertionError(name)  # validate() rejects other names


def _wrap_lcr(student: tf.keras.Model, config: TrainConfig) -> tf.keras.Model:
    from larq_lipschitz.lcr import LCRModel

    if not config.teacher:
        raise ValueError(
            "regularizer 'lcr' needs a trained full-precision teacher: pass --teacher "
            "PATH.keras (train one with --weight-bits 32 --activation-bits 32 "
            "--regularizer none)."
        )
    try:
        teacher = tf.keras.models.load_model(config.teacher, compile=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--teacher {config.teacher}: cannot be loaded as a Keras model ({err})"
        ) from None
    return LCRModel(student, teacher, alpha=config.strength)


def config_defaults() -> dict[str, Any]:
    """The default value of every `TrainConfig` field that has one (plain Python values).

    `runs.check_reusable` uses it to accept a run folder written before a field existed,
    when the field holds its default.
    """
    out = {}
    for field in dataclasses.fields(TrainConfig):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
    out["noise_sigmas"] = list(out["noise_sigmas"])
    return out


def train_command(
    config: TrainConfig, output_dir: str | os.PathLike, *, deterministic: bool = True
) -> list[str]:
    """The `larq-lipschitz train` command that reruns `config`, every setting explicit.

    Every field of the configuration is spelled out (the strength after its default was
    resolved, floats in the shortest form that reads back exactly), so the command gives
    the same configuration even if a later version changes a default. Paths are made
    absolute. `shlex.join(train_command(...))` is ready to paste into a POSIX shell.

    # Example
    ```python
    shlex.join(train_command(TrainConfig(epochs=3), "runs/a"))
    # "larq-lipschitz train --model resnet20 ... --epochs 3 ... --output /abs/runs/a"
    ```
    """
    c = config
    args = ["larq-lipschitz", "train", "--model", c.model, "--dataset", c.dataset]
    if c.data is not None:
        args += ["--data", str(pathlib.Path(c.data).resolve())]
    if c.data_dir is not None:
        args += ["--data-dir", str(pathlib.Path(c.data_dir).expanduser().resolve())]
    args += [
        "--weight-bits",
        str(c.weight_bits),
        "--activation-bits",
        str(c.activation_bits),
        "--regularizer",
        c.regularizer,
    ]
    if c.strength is not None:
        args += ["--strength", repr(float(c.strength))]
    if c.target is not None:
        args += ["--target", repr(float(c.target))]
    if c.teacher is not None:
        args += ["--teacher", str(pathlib.Path(c.teacher).expanduser().resolve())]
    args += [
        "--epochs",
        str(c.epochs),
        "--batch-size",
        str(c.batch_size),
        "--learning-rate",
        repr(float(c.learning_rate)),
        "--optimizer",
        c.optimizer,
        "--weight-decay",
        repr(float(c.weight_decay)),
        "--seed",
        str(c.seed),
    ]
    if c.train_examples is not None:
        args += ["--train-examples", str(c.train_examples)]
    args += ["--validation-examples", str(c.validation_examples)]
    args += ["--noise", ",".join(repr(float(s)) for s in c.noise_sigmas)]
    if c.synchronized_bn is not None:
        args.append(
            "--synchronized-bn" if c.synchronized_bn else "--no-synchronized-bn"
        )
    if not deterministic:
        args.append("--no-deterministic")
    args += ["--output", str(pathlib.Path(output_dir).expanduser().resolve())]
    return args


@contextlib.contextmanager
def op_determinism(enabled: bool = True):
    """Run the body with TensorFlow op determinism on, then restore the previous setting.

    `tf.config.experimental.enable_op_determinism()` is a process-wide switch that the
    public API cannot turn off again; this context manager turns it off afterwards
    (through TensorFlow's internal `disable_op_determinism`) if it was off before, so
    that calling `train` does not change how the rest of a program runs. Where that
    internal function is missing, determinism stays on and a message says so.
    `enabled=False` leaves the setting as it is.

    # Yields
        Whether op determinism is on inside the body.
    """
    try:
        from tensorflow.python.framework import config as tf_config

        was_on = bool(tf_config.is_op_determinism_enabled())
        turn_off = getattr(tf_config, "disable_op_determinism", None)
    except (ImportError, AttributeError):
        was_on, turn_off = False, None
    if not enabled or was_on:
        yield was_on
        return
    tf.config.experimental.enable_op_determinism()
    try:
        yield True
    finally:
        if turn_off is not None:
            turn_off()
        else:
            log.info("TensorFlow op determinism stays enabled in this process.")


def _data_record(info: dict[str, Any]) -> dict[str, Any]:
    """Where the data came from and a checksum of it, for `results.json`."""
    record = {
        "dataset": info.get("dataset"),
        "source": info.get("source"),
        "path": info.get("path"),
        "sha256": info.get("sha256"),
    }
    path = pathlib.Path(info["path"]) if info.get("path") else None
    if record["sha256"]:
        record["checksum_of"] = "the archive file"
    elif info.get("source") == "tfds":
        record["checksum_of"] = None
        record["note"] = (
            "tensorflow-datasets checks the downloaded files against its own registered "
            "checksums when it prepares the dataset; path names the prepared version"
        )
    elif path is not None and path.is_dir() and info.get("dataset") == "cifar10":
        record["sha256"] = runs.folder_sha256(path)
        record["checksum_of"] = "every file of the folder (see runs.folder_sha256)"
    else:
        record["checksum_of"] = None
        record["note"] = "no checksum computed for this source (too large to hash)"
    return record


def _command_record(
    config: TrainConfig, output: pathlib.Path, deterministic: bool
) -> dict[str, Any]:
    import shlex

    return {
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "shell": shlex.join(train_command(config, output, deterministic=deterministic)),
    }


def _check_callbacks(callbacks) -> list[tf.keras.callbacks.Callback]:
    if callbacks is None:
        return []
    callbacks = list(callbacks)
    for c in callbacks:
        if not isinstance(c, tf.keras.callbacks.Callback):
            raise TypeError(
                f"train: callbacks must be Keras callbacks, got {type(c).__name__}."
            )
    return callbacks


_STATES = ("new", "resume", "finished")


def train(
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    force: bool = False,
    deterministic: bool = True,
    callbacks: list[tf.keras.callbacks.Callback] | None = None,
) -> dict:
    """Train, evaluate and write the run folder; return the contents of `results.json`.

    Rerunning with the same configuration and folder resumes an interrupted run from its
    last finished epoch (with the data order an uninterrupted run would have had), and
    returns the saved results of a finished one without training again (unless
    `force`). See docs/reliability.md for what is atomic and what resuming restores.

    # Arguments
        config: the run's settings.
        output_dir: the run folder.
        force: retrain a finished run with the same configuration.
        deterministic: run with TensorFlow op determinism (`op_determinism`), so that
            the same seed gives the same weights bit for bit on the same machine and
            software. It costs speed mainly on GPUs; turned off again afterwards.
        callbacks: extra Keras callbacks, run before the package's own ones (so a
            weight they change is seen by the NaN check and the checkpoint).

    # Raises
        ValueError: invalid configuration. larq_lipschitz.runs.RunError: the output folder
        holds another run, is being trained by another process, or the workers of a
        multi-worker run see it differently. larq_lipschitz.data.DataError: missing or
        broken data. FloatingPointError: a weight, the loss or an input became NaN or
        infinite (the message names the layer or the batch); the last good checkpoint
        is kept and nothing else of the run is overwritten.
    """
    output = pathlib.Path(output_dir)
    config.validate()
    extra = _check_callbacks(callbacks)
    state = runs.check_reusable(output, config.to_dict(), defaults=config_defaults())
    several_workers = cluster_size() > 1
    if state == "finished" and not force and not several_workers:
        log.info(
            "%s holds a finished run with this configuration; not training again.",
            output,
        )
        return runs.load_results(output)
    with op_determinism(deterministic) as determinism_on:
        return _train(config, output, state, force, determinism_on, extra)


def _train(
    config: TrainConfig,
    output: pathlib.Path,
    state: str,
    force: bool,
    deterministic: bool,
    extra: list[tf.keras.callbacks.Callback],
) -> dict:
    from larq_lipschitz import data as data_lib
    from larq_lipschitz import models

    tf.keras.utils.set_random_seed(config.seed)
    strategy = choose_strategy()
    chief = is_chief(strategy)
    if is_multi_worker(strategy):
        _agree(strategy, "the state of the run folder", _STATES.index(state))
        if state == "finished" and not force:
            log.info("%s holds a finished run; not training again.", output)
            return runs.load_results(output)
    if state == "resume":
        log.info("resuming the unfinished run in %s", output)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by the {replicas} replicas in sync."
        )
    sync_bn = (
        config.synchronized_bn if config.synchronized_bn is not None else replicas > 1
    )

    splits = data_lib.load(
        config.dataset,
        config.data,
        batch_size=config.batch_size,
        train_examples=config.train_examples,
        validation_examples=config.validation_examples,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    info = splits.info
    steps_per_epoch = math.ceil(info["num_examples"]["train"] / config.batch_size)

    with strategy.scope():
        model = models.get(
            config.model,
            num_classes=info["num_classes"],
            input_shape=tuple(info["input_shape"]),
            weight_bits=config.weight_bits,
            activation_bits=config.activation_bits,
            synchronized_bn=sync_bn,
            mean=info["mean"],
            std=info["std"],
        )
        model = _attach_control(model, config)
        probabilities = outputs_probabilities(model)
        if config.regularizer == "lcr":
            model = _wrap_lcr(model, config)
        model.compile(
            optimizer=_build_optimizer(config, steps_per_epoch * config.epochs),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=not probabilities
            ),
            metrics=["accuracy"],
        )

    with contextlib.ExitStack() as stack:
        # Everything that can fail on a user's mistake has been checked or built by
        # now; only from here on does the folder belong to this run, and only the chief
        # writes into it.
        if chief:
            output.mkdir(parents=True, exist_ok=True)
            stack.enter_context(runs.run_lock(output))
            # Another process may have trained here between the first look and the lock.
            state = runs.check_reusable(
                output, config.to_dict(), defaults=config_defaults()
            )
            if state == "finished" and not force:
                if is_multi_worker(strategy):  # the other workers are waiting: stop all
                    raise runs.RunError(
                        f"{output}: another process finished this run meanwhile."
                    )
                log.info("%s was finished meanwhile; not training again.", output)
                return runs.load_results(output)
            if state == "finished":  # force: retrain with the same configuration
                runs.discard(output / "checkpoints")
                (output / "history.csv").unlink(missing_ok=True)
                (output / runs.RESULTS_FILE).unlink(missing_ok=True)
            runs.remove_stale_temporaries(output)
            runs.atomic_write_json(
                output / "run.json",
                {"format": runs.RESULTS_FORMAT, "config": config.to_dict()},
            )
        return _fit_and_evaluate(
            config,
            output,
            strategy,
            model,
            splits,
            steps_per_epoch,
            sync_bn,
            deterministic,
            extra,
            stack,
        )


def _fit_and_evaluate(
    config: TrainConfig,
    output: pathlib.Path,
    strategy: tf.distribute.Strategy,
    model: tf.keras.Model,
    splits,
    steps_per_epoch: int,
    sync_bn: bool,
    deterministic: bool,
    extra: list[tf.keras.callbacks.Callback],
    stack: contextlib.ExitStack,
) -> dict:
    chief = is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    info = splits.info
    with strategy.scope():
        epoch_counter = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="epochs_done"
        )
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, epochs_done=epoch_counter
    )
    guard = NonFiniteCheck(advice="lower --learning-rate or --strength")
    checkpoints = str(output / "checkpoints")
    scratch = None
    if chief:
        saver = EpochCheckpoint(checkpoint, epoch_counter, checkpoints, guard=guard)
    else:
        # Saving is a collective under MultiWorkerMirroredStrategy: the other workers
        # save too, into a private folder that is removed at the end.
        scratch = tempfile.mkdtemp(prefix="larq-lipschitz-worker-")
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        saver = EpochCheckpoint(
            checkpoint, epoch_counter, scratch, restore_from=checkpoints, guard=guard
        )
    initial_epoch = saver.restore()
    if is_multi_worker(strategy):
        _agree(strategy, "the number of finished epochs", initial_epoch)
    if initial_epoch:
        log.info(
            "restored the state after epoch %d of %d", initial_epoch, config.epochs
        )
    if chief:
        _prune_history(output / "history.csv", initial_epoch)

    train_data = check_finite_inputs(splits.train)
    validation_data = (
        None if splits.validation is None else check_finite_inputs(splits.validation)
    )
    # Each iterator over the training set draws the next epoch's order and
    # augmentation, and model.fit makes one per epoch: skipping the finished epochs'
    # iterators gives the resumed epochs the data an uninterrupted run would see.
    for _ in range(initial_epoch):
        iter(train_data)

    timer = EpochTimer()
    callbacks: list[tf.keras.callbacks.Callback] = [*extra, timer, guard]
    if chief:
        callbacks.append(
            tf.keras.callbacks.TensorBoard(str(output / "logs"), profile_batch=0)
        )
    try:
        from larq_lipschitz.bounds import LipschitzBoundLogger

        callbacks.append(
            LipschitzBoundLogger(
                log_dir=str(output / "logs" / "bounds") if chief else None
            )
        )
    except ImportError:
        pass
    if chief:
        callbacks.append(EpochHistory(output / "history.csv", guard=guard))
    callbacks.append(saver)  # an epoch counts as done once everything above logged it
    if not sys.stderr.isatty():
        callbacks.append(
            ProgressLog(steps_per_epoch, every=max(1, steps_per_epoch // 10))
        )

    log.info(
        "training %s (%d/%d bits) with %s, strength %g: %d epochs of %d steps, %d replica(s)",
        config.model,
        config.weight_bits,
        config.activation_bits,
        config.regularizer,
        config.strength,
        config.epochs,
        steps_per_epoch,
        replicas,
    )
    fit_start = time.perf_counter()
    try:
        history = model.fit(
            train_data,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=1 if sys.stderr.isatty() else 0,
        )
    except tf.errors.InvalidArgumentError as err:
        if NONFINITE_INPUT_MESSAGE in str(err):
            raise FloatingPointError(
                f"non-finite input data ({_nonfinite_kind(err)}) in the "
                f"{guard.position}; {_kept(epoch_counter)}"
            ) from None
        raise
    fit_seconds = time.perf_counter() - fit_start
    if guard.failure:
        raise FloatingPointError(f"{guard.failure}; {_kept(epoch_counter)}")
    if any(not math.isfinite(v) for v in history.history.get("loss", [0.0])):
        raise FloatingPointError(
            "training diverged: the loss became NaN or infinite; lower --learning-rate or "
            "--strength."
        )
    record = _read_history(output / "history.csv") if chief else {}

    epoch_seconds = record.get("epoch_seconds") or timer.seconds
    evaluated = model.student if config.regularizer == "lcr" else model
    try:
        metrics = noise_report(
            evaluated,
            check_finite_inputs(splits.test),
            config.noise_sigmas,
            seed=config.seed,
        )
    except tf.errors.InvalidArgumentError as err:
        if NONFINITE_INPUT_MESSAGE in str(err):
            raise FloatingPointError(
                f"non-finite input data ({_nonfinite_kind(err)}) in the test set."
            ) from None
        raise

    results = {
        "format": runs.RESULTS_FORMAT,
        "status": "finished",
        "config": config.to_dict(),
        "command": _command_record(config, output, deterministic),
        "seed": config.seed,
        "deterministic": deterministic,
        "data_source": _data_record(info),
        "data": info,
        "replicas": replicas,
        "strategy": type(strategy).__name__,
        "synchronized_bn": sync_bn,
        "test_accuracy": metrics["clean"],
        "noise_accuracy": {
            k: v for k, v in metrics.items() if k.startswith("gaussian_")
        },
        "epoch_seconds": epoch_seconds,
        "mean_epoch_seconds": (sum(epoch_seconds) / len(epoch_seconds))
        if epoch_seconds
        else None,
        "resumed_at_epoch": initial_epoch,
        "test_seconds": metrics["test_seconds"],
        "fit_seconds": fit_seconds,
        "history": record,
        "versions": runs.versions(),
        "machine": runs.machine(),
    }
    bound_logger = next(
        (c for c in callbacks if type(c).__name__ == "LipschitzBoundLogger"), None
    )
    if bound_logger is not None and "lipschitz_inf" in record:
        results["lipschitz_bounds"] = [
            {"epoch": int(e), "lipschitz_inf": li, "lipschitz_2": l2}
            for e, li, l2 in zip(
                record["epoch"],
                record["lipschitz_inf"],
                record.get("lipschitz_2", []),
                strict=False,
            )
        ]
    elif bound_logger is not None:
        results["lipschitz_bounds"] = bound_logger.history

    if chief:
        runs.atomic_save_model(evaluated, output / runs.MODEL_FILE)
        runs.atomic_write_json(output / runs.RESULTS_FILE, results)
    else:
        evaluated.save(os.path.join(scratch, runs.MODEL_FILE))
    log.info(
        "clean test accuracy %.4f; %s; %.1f s per epoch",
        results["test_accuracy"],
        ", ".join(f"{k} {v:.4f}" for k, v in results["noise_accuracy"].items()),
        results["mean_epoch_seconds"] or float("nan"),
    )
    return results


def _kept(epoch_counter: tf.Variable) -> str:
    done = int(epoch_counter.numpy())
    if not done:
        return "no epoch had finished, so no checkpoint was written."
    return f"nothing of it was saved; the checkpoint after epoch {done} is kept."


def _nonfinite_kind(err: Exception) -> str:
    text = str(err)
    kinds = [k for k in ("NaN", "Inf") if k in text]
    return " and ".join(kinds) or "NaN or Inf"


def _agree(strategy: tf.distribute.Strategy, what: str, value: int) -> None:
    """Raise `RunError` on every worker unless all workers hold the same `value`."""
    low, high = agree_across_workers(strategy, value)
    if low != high:
        raise runs.RunError(
            f"the workers see {what} differently (from {low} to {high}): a multi-worker "
            "run folder must be on a filesystem every worker shares, under the same path."
        )
