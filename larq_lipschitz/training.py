"""Training a (binarized) classifier with a Lipschitz control through `model.fit`.

`train(TrainConfig(...), output_dir)` is what `larq-lipschitz train` runs: it picks a
`tf.distribute` strategy, loads the data, builds the model inside the strategy's scope,
attaches the chosen Lipschitz control, trains with `model.fit`, evaluates clean and under
Gaussian noise, and writes the run folder described in `larq_lipschitz.runs`.
"""

from __future__ import annotations

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
from larq_lipschitz.distribute import choose_strategy, is_chief
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
    seed: int = 0
    train_examples: int | None = None
    validation_examples: int = 0
    noise_sigmas: tuple[float, ...] = DEFAULT_NOISE_SIGMAS
    synchronized_bn: bool | None = None

    def __post_init__(self):
        self.noise_sigmas = tuple(float(s) for s in self.noise_sigmas)
        if self.data is not None:
            self.data = str(pathlib.Path(self.data).expanduser().resolve())
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


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Save model, optimizer and epoch counter at every epoch end, for `train` to resume.

    Works under every strategy (Keras' `BackupAndRestore` refuses `OneDeviceStrategy`).
    TensorFlow writes the checkpoint files first and the index that names the latest one
    last, so a process killed while saving leaves the previous checkpoint in force.
    Workers other than the chief write to a private temporary folder, as multi-worker
    checkpointing requires every worker to take part in the save.
    """

    def __init__(
        self, checkpoint: tf.train.Checkpoint, epoch: tf.Variable, directory: str
    ):
        super().__init__()
        self.epoch = epoch
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)

    def restore(self) -> int:
        """Restore the latest checkpoint, if any; return the number of finished epochs."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        self.manager.checkpoint.restore(latest).expect_partial()
        return int(self.epoch.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


def _finished_epoch_rows(csv_path: pathlib.Path, epochs_done: int) -> None:
    """Drop rows of `history.csv` for epochs that the resumed run will train again."""
    if not csv_path.is_file():
        return
    lines = csv_path.read_text().splitlines()
    if not lines:
        return
    keep = [lines[0]] + [
        line
        for line in lines[1:]
        if line.split(",")[0].isdigit() and int(line.split(",")[0]) < epochs_done
    ]
    runs.atomic_write_text(csv_path, "\n".join(keep) + "\n")


def _read_history(csv_path: pathlib.Path) -> dict[str, list[float]]:
    """The per-epoch metrics `CSVLogger` wrote, as `{column: [value per epoch]}`."""
    import csv

    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):  # CSVLogger writes "NA" for a missing value
            return None

    table = {c: [number(r.get(c)) for r in rows] for c in columns}
    return {c: v for c, v in table.items() if any(x is not None for x in v)}


def _build_optimizer(
    config: TrainConfig, total_steps: int
) -> tf.keras.optimizers.Optimizer:
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, total_steps)
    )
    if config.optimizer == "sgd":
        return tf.keras.optimizers.SGD(schedule, momentum=0.9)
    return tf.keras.optimizers.Adam(schedule)


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


def train(
    config: TrainConfig, output_dir: str | os.PathLike, *, force: bool = False
) -> dict:
    """Train, evaluate and write the run folder; return the contents of `results.json`.

    Rerunning with the same configuration and folder resumes an interrupted run from its
    last finished epoch, and returns the saved results of a finished one without training
    again (unless `force`).

    # Raises
        ValueError: invalid configuration. larq_lipschitz.runs.RunError: the output folder
        holds another run. larq_lipschitz.data.DataError: missing or broken data.
    """
    from larq_lipschitz import data as data_lib
    from larq_lipschitz import models

    output = pathlib.Path(output_dir)
    config.validate()
    state = runs.check_reusable(output, config.to_dict())
    if state == "finished" and not force:
        log.info(
            "%s holds a finished run with this configuration; not training again.",
            output,
        )
        return runs.load_results(output)
    if state == "finished":
        (output / runs.RESULTS_FILE).unlink()
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / "history.csv").unlink(missing_ok=True)
    if state == "resume":
        log.info("resuming the unfinished run in %s", output)

    tf.keras.utils.set_random_seed(config.seed)
    strategy = choose_strategy()
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

    # Everything that can fail on a user's mistake has been checked or built by now;
    # only from here on does the folder belong to this run.
    output.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(
        output / "run.json", {"format": runs.RESULTS_FORMAT, "config": config.to_dict()}
    )
    chief = is_chief(strategy)
    with strategy.scope():
        epoch_counter = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="epochs_done"
        )
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, epochs_done=epoch_counter
    )
    scratch = None if chief else tempfile.mkdtemp(prefix="larq-lipschitz-worker-")
    saver = EpochCheckpoint(
        checkpoint, epoch_counter, scratch or str(output / "checkpoints")
    )
    initial_epoch = saver.restore()
    if initial_epoch:
        log.info(
            "restored the state after epoch %d of %d", initial_epoch, config.epochs
        )
    _finished_epoch_rows(output / "history.csv", initial_epoch)

    timer = EpochTimer()
    callbacks: list[tf.keras.callbacks.Callback] = [
        timer,
        tf.keras.callbacks.TensorBoard(str(output / "logs"), profile_batch=0),
        tf.keras.callbacks.CSVLogger(str(output / "history.csv"), append=True),
        tf.keras.callbacks.TerminateOnNaN(),
        saver,  # last: an epoch counts as done only once everything above has logged it
    ]
    try:
        from larq_lipschitz.bounds import LipschitzBoundLogger

        callbacks.insert(
            2, LipschitzBoundLogger(log_dir=str(output / "logs" / "bounds"))
        )
    except ImportError:
        pass
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
    history = model.fit(
        splits.train,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        validation_data=splits.validation,
        callbacks=callbacks,
        verbose=1 if sys.stderr.isatty() else 0,
    )
    fit_seconds = time.perf_counter() - fit_start
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    record = _read_history(output / "history.csv") if chief else {}
    if any(not math.isfinite(v) for v in history.history.get("loss", [0.0])):
        raise FloatingPointError(
            "training diverged: the loss became NaN or infinite; lower --learning-rate or "
            "--strength."
        )

    epoch_seconds = record.get("epoch_seconds") or timer.seconds
    evaluated = model.student if config.regularizer == "lcr" else model
    metrics = noise_report(
        evaluated, splits.test, config.noise_sigmas, seed=config.seed
    )

    results = {
        "format": runs.RESULTS_FORMAT,
        "status": "finished",
        "config": config.to_dict(),
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

    if is_chief(strategy):
        tmp = output / f".{runs.MODEL_FILE}.tmp.keras"
        evaluated.save(tmp)
        os.replace(tmp, output / runs.MODEL_FILE)
        runs.atomic_write_json(output / runs.RESULTS_FILE, results)
    log.info(
        "clean test accuracy %.4f; %s; %.1f s per epoch",
        results["test_accuracy"],
        ", ".join(f"{k} {v:.4f}" for k, v in results["noise_accuracy"].items()),
        results["mean_epoch_seconds"] or float("nan"),
    )
    return results
