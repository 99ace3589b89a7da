"""The comparison grid of the method's tables: no control vs LCR vs L1,inf, end to end.

`reproduce(...)` is what `larq-lipschitz reproduce --table cifar10` runs. For every model of
the grid it trains one run per regularizer with the same recipe (a *profile*), evaluates
each run's robustness (noise, CIFAR-10-C corruptions, attacks, certified accuracy) and
Lipschitz bounds, measures the time per epoch of every regularizer side by side in this
process, and writes a comparison table with plots. The output folder looks like this:

```
OUT/
  reproduce.json          plan, strengths and where they came from, run states, timings
  comparison.md/.json/.png  the table of `larq-lipschitz compare` over the grid's runs
  time_per_epoch.md/.json   training and test time per epoch of each regularizer
  teachers/MODEL-fp32/    the full-precision teacher LCR needs (only with lcr)
  sweep/MODEL-REG-S/      strength sweep runs, and sweep.json/sweep.md (only with sweep)
  runs/MODEL-REG/         the grid's runs (ordinary `larq-lipschitz train` run folders)
```

Every run folder is an ordinary training run, so rerunning the same command resumes an
interrupted grid: finished runs are kept (their folders are not touched), an interrupted
run continues from its last finished epoch, and only missing evaluations are done. A run
folder that holds a run with other settings stops the grid with an error instead of
being overwritten.

Regularizer strengths come from the profile, or, with `sweep=True`, from a small sweep on
a held-out split of the *training* set (never the test set): every candidate strength is
trained with a short budget, evaluated clean and under Gaussian noise on the held-out
images, and the one with the highest mean of those accuracies is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from larq_lipschitz import runs
from larq_lipschitz.training import CONTROLS, TrainConfig

log = logging.getLogger(__name__)

#: Tables `reproduce` knows.
TABLES = ("cifar10",)

#: The regularizers of the method's comparison tables, in table order.
DEFAULT_REGULARIZERS = ("none", "lcr", "l1inf")

#: How the sweep scores a strength: mean of these accuracies on the held-out split.
SWEEP_SCORE = "mean of clean and Gaussian-noise accuracies on the held-out split"


@dataclasses.dataclass(frozen=True)
class Profile:
    """A training and evaluation recipe shared by every run of the grid.

    # Arguments
        name: the profile's name.
        description: one line on what it is for.
        epochs, batch_size, learning_rate, optimizer, weight_decay: the recipe
            (`TrainConfig` fields); `model_overrides` changes them per model.
        validation_examples: training images held out (for the sweep, and the
            validation columns of each run's history).
        train_examples: cap on the training images (`None`: all that remain).
        strengths: the strength of each regularizer when no sweep is run.
        sweep_candidates: the strengths a sweep tries, per regularizer.
        sweep_epochs, sweep_train_examples: the short budget of each sweep run.
        eval_examples: test images of the robustness suite (`None`: all 10,000); the
            clean and Gaussian-noise accuracies of each run are on the whole test set.
        suite: the robustness suite (`"all"`, `"noise"`, `"corruptions"`, `"attacks"`).
        timing_steps, timing_rounds: training steps per round, and interleaved rounds, of
            the side-by-side time-per-epoch measurement (0 steps: skip it).
    """

    name: str
    description: str
    epochs: int
    batch_size: int = 128
    learning_rate: float = 5e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    validation_examples: int = 5000
    train_examples: int | None = None
    strengths: Mapping[str, float] = dataclasses.field(default_factory=dict)
    sweep_candidates: Mapping[str, tuple[float, ...]] = dataclasses.field(
        default_factory=dict
    )
    sweep_epochs: int = 1
    sweep_train_examples: int | None = None
    eval_examples: int | None = None
    suite: str = "all"
    timing_steps: int = 20
    timing_rounds: int = 3
    model_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        return runs._plain(dataclasses.asdict(self))


#: The profiles of `reproduce`. See docs/reproduce.md for how they were chosen.
PROFILES: dict[str, Profile] = {
    "cpu-short": Profile(
        name="cpu-short",
        description=(
            "a few epochs with Adam, sized so that one ResNet-20 run (LCR, the slowest, "
            "included) finishes in well under 45 minutes on a 2-core CPU"
        ),
        epochs=4,
        learning_rate=5e-3,
        optimizer="adam",
        validation_examples=5000,
        strengths={"l1inf": 1e-5, "lcr": 3.2, "l1inf-constraint": 1.0},
        sweep_candidates={"l1inf": (1e-6, 1e-5, 1e-4), "lcr": (0.8, 3.2)},
        sweep_epochs=1,
        sweep_train_examples=20000,
        eval_examples=1000,
        timing_steps=15,
        timing_rounds=5,
    ),
    "paper": Profile(
        name="paper",
        description=(
            "the published CIFAR-10 recipe of IR-Net/RBNN/LCR: SGD momentum 0.9, "
            "lr 0.1 cosine to 0, batch 128, weight decay 1e-4, 400 epochs (VGG-Small: "
            "lr 0.007, 300 epochs); for GPUs"
        ),
        epochs=400,
        learning_rate=0.1,
        optimizer="sgd",
        weight_decay=1e-4,
        validation_examples=5000,
        strengths={"l1inf": 1e-5, "lcr": 3.2, "l1inf-constraint": 1.0},
        sweep_candidates={"l1inf": (1e-6, 1e-5, 1e-4), "lcr": (0.8, 3.2, 12.8)},
        sweep_epochs=40,
        sweep_train_examples=None,
        eval_examples=None,
        timing_steps=50,
        model_overrides={"vgg-small": {"epochs": 300, "learning_rate": 0.007}},
    ),
}

#: Profile fields a caller may override (`reproduce(..., overrides={...})`).
OVERRIDABLE = (
    "epochs",
    "batch_size",
    "learning_rate",
    "validation_examples",
    "train_examples",
    "sweep_epochs",
    "sweep_train_examples",
    "eval_examples",
    "suite",
    "timing_steps",
    "timing_rounds",
)


def get_profile(name: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile called `name`, with some fields replaced.

    # Raises
        ValueError: for an unknown profile or a field that cannot be overridden.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(PROFILES)}.")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"profile settings that cannot be overridden: {', '.join(unknown)}; "
            f"allowed: {', '.join(OVERRIDABLE)}."
        )
    return dataclasses.replace(PROFILES[name], **overrides)


def _check_grid(table: str, models: Sequence[str], regularizers: Sequence[str]) -> None:
    from larq_lipschitz import models as model_registry

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; available: {', '.join(TABLES)}.")
    if not models:
        raise ValueError("reproduce: give at least one model.")
    if not regularizers:
        raise ValueError("reproduce: give at least one regularizer.")
    available = model_registry.available()
    for name in models:
        if name not in available:
            raise ValueError(
                f"unknown model {name!r}; available: {', '.join(available)}."
            )
    for name in regularizers:
        if name not in CONTROLS:
            raise ValueError(
                f"unknown regularizer {name!r}; available: {', '.join(CONTROLS)}."
            )
    for what, names in (("model", models), ("regularizer", regularizers)):
        if len(set(names)) != len(names):
            raise ValueError(f"reproduce: a {what} is listed twice: {list(names)}.")


def _config(
    profile: Profile,
    model: str,
    data: str | None,
    data_dir: str | None,
    *,
    regularizer: str,
    strength: float | None = None,
    teacher: str | None = None,
    bits: int = 1,
    epochs: int | None = None,
    train_examples: int | None = None,
    seed: int = 0,
) -> TrainConfig:
    recipe = {
        "epochs": profile.epochs,
        "learning_rate": profile.learning_rate,
        **profile.model_overrides.get(model, {}),
    }
    return TrainConfig(
        model=model,
        dataset="cifar10",
        data=data,
        data_dir=data_dir,
        weight_bits=bits,
        activation_bits=bits,
        regularizer=regularizer,
        strength=strength,
        teacher=teacher,
        epochs=epochs if epochs is not None else recipe["epochs"],
        batch_size=profile.batch_size,
        learning_rate=recipe["learning_rate"],
        optimizer=profile.optimizer,
        weight_decay=profile.weight_decay,
        seed=seed,
        train_examples=train_examples
        if train_examples is not None
        else profile.train_examples,
        validation_examples=profile.validation_examples,
    )


class _Runner:
    """Trains run folders, remembering which were reused and which were trained."""

    def __init__(self):
        self.states: dict[str, str] = {}

    def train(self, config: TrainConfig, folder: pathlib.Path, label: str) -> dict:
        from larq_lipschitz import training

        import tensorflow as tf

        state = runs.check_reusable(folder, config.to_dict())
        if state == "finished":
            log.info("%s: finished earlier, kept as it is (%s)", label, folder)
        else:
            log.info(
                "%s: %s (%s)",
                label,
                "resuming" if state == "resume" else "training",
                folder,
            )
            tf.keras.backend.clear_session()
        results = training.train(config, folder)
        self.states[str(folder)] = {
            "finished": "reused",
            "resume": "resumed",
        }.get(state, "trained")
        return results


def _teacher(
    runner: _Runner, out: pathlib.Path, profile: Profile, model: str, data, data_dir
) -> pathlib.Path:
    folder = out / "teachers" / f"{model}-fp32"
    config = _config(profile, model, data, data_dir, regularizer="none", bits=32)
    runner.train(config, folder, f"teacher {model} 32/32")
    return folder / runs.MODEL_FILE


def _validation_score(run_dir: pathlib.Path, data, data_dir, profile: Profile) -> dict:
    """Clean and noise accuracies of a sweep run on the held-out training images."""
    from larq_lipschitz import data as data_lib
    from larq_lipschitz.evaluation import noise_report

    import tensorflow as tf

    cached = run_dir / "validation.json"
    if cached.is_file():
        return runs.read_json(cached)
    results = runs.load_results(run_dir)
    splits = data_lib.load(
        "cifar10",
        data,
        batch_size=200,
        validation_examples=profile.validation_examples,
        seed=results["config"]["seed"],
        data_dir=data_dir,
        augment=False,
    )
    model = tf.keras.models.load_model(run_dir / runs.MODEL_FILE, compile=False)
    report = noise_report(
        model, splits.validation, results["config"]["noise_sigmas"], seed=0
    )
    accuracies = {k: v for k, v in report.items() if k != "test_seconds"}
    score = {
        "strength": results["config"]["strength"],
        "validation_examples": profile.validation_examples,
        "accuracies": accuracies,
        "score": sum(accuracies.values()) / len(accuracies),
    }
    runs.atomic_write_json(cached, score)
    return score


def _sweep(
    runner: _Runner,
    out: pathlib.Path,
    profile: Profile,
    model: str,
    regularizer: str,
    data,
    data_dir,
    teacher: pathlib.Path | None,
) -> dict:
    candidates = profile.sweep_candidates.get(regularizer)
    if not candidates:
        raise ValueError(
            f"profile {profile.name!r} has no sweep candidates for {regularizer!r}; "
            "give its strength with --strengths."
        )
    rows = []
    for i, strength in enumerate(candidates, 1):
        folder = out / "sweep" / f"{model}-{regularizer}-{strength:g}"
        config = _config(
            profile,
            model,
            data,
            data_dir,
            regularizer=regularizer,
            strength=strength,
            teacher=str(teacher) if teacher else None,
            epochs=profile.sweep_epochs,
            train_examples=profile.sweep_train_examples,
        )
        runner.train(
            config,
            folder,
            f"sweep {model} {regularizer} {strength:g} ({i}/{len(candidates)})",
        )
        row = _validation_score(folder, data, data_dir, profile)
        row["run"] = str(folder)
        rows.append(row)
        log.info(
            "sweep %s %s strength %g: held-out score %.4f",
            model,
            regularizer,
            strength,
            row["score"],
        )
    return {
        "regularizer": regularizer,
        "candidates": rows,
        "chosen": choose_strength(rows),
    }


def choose_strength(rows: Sequence[Mapping[str, Any]]) -> float:
    """The strength of the best-scoring sweep row; a tie goes to the weaker strength.

    # Arguments
        rows: `{"strength": s, "score": held-out score}` per candidate.
    """
    if not rows:
        raise ValueError("choose_strength: no sweep results to choose from.")
    best = max(rows, key=lambda r: (r["score"], -r["strength"]))
    return best["strength"]


def _sweep_markdown(sweeps: Mapping[str, Mapping[str, dict]], profile: Profile) -> str:
    lines = [
        "# Strength sweep",
        "",
        f"Profile `{profile.name}`: {profile.sweep_epochs} epoch(s) on "
        f"{profile.sweep_train_examples or 'all remaining'} training images; scored on "
        f"{profile.validation_examples} held-out training images (never the test set) "
        f"by the {SWEEP_SCORE}.",
        "",
        "| model | regularizer | strength | clean | noise accuracies | score | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, by_reg in sweeps.items():
        for reg, sweep in by_reg.items():
            for row in sweep["candidates"]:
                acc = row["accuracies"]
                noise = ", ".join(
                    f"σ={k.split('_', 1)[1]}: {100 * v:.1f}"
                    for k, v in acc.items()
                    if k != "clean"
                )
                chosen = "yes" if row["strength"] == sweep["chosen"] else ""
                lines.append(
                    f"| {model} | {reg} | {row['strength']:g} | "
                    f"{100 * acc['clean']:.1f} | {noise} | {100 * row['score']:.2f} | "
                    f"{chosen} |"
                )
    return "\n".join(lines) + "\n"


def _evaluate(run_dir: pathlib.Path, profile: Profile) -> dict:
    """Robustness suite and bounds of a run, unless they are there already."""
    from larq_lipschitz import robustness
    from larq_lipschitz.bounds import write_bounds_report
    from larq_lipschitz.cli import _load_run, _test_split

    import tensorflow as tf

    done = {}
    path = run_dir / "robustness.json"
    settings_ok = False
    if path.is_file():
        try:
            previous = robustness.read_robustness(run_dir)
            settings_ok = previous.get("suite") == profile.suite and previous.get(
                "num_examples"
            ) == (profile.eval_examples or previous.get("num_examples"))
        except (runs.RunError, ValueError):
            settings_ok = False
    if settings_ok and (run_dir / "bounds.json").is_file():
        return done
    tf.keras.backend.clear_session()
    results, model = _load_run(str(run_dir))
    if not settings_ok:
        log.info("evaluating robustness of %s (suite %s)", run_dir, profile.suite)
        test = _test_split(results, batch_size=200)
        start = time.perf_counter()
        report = robustness.run_suite(
            model, test, profile.suite, num_examples=profile.eval_examples, seed=0
        )
        robustness.write_robustness(report, run_dir)
        done["robustness_seconds"] = time.perf_counter() - start
        done["robustness_timing"] = report.get("timing")
    if not (run_dir / "bounds.json").is_file():
        write_bounds_report(model, run_dir)
    return done


def _timing_model(regularizer: str, model: str, strength: float, num_classes=10):
    """A fresh model with `regularizer` attached, compiled as `train` compiles it."""
    from larq_lipschitz import models as model_registry
    from larq_lipschitz.training import _attach_control

    import tensorflow as tf

    config = TrainConfig(
        model=model,
        regularizer=regularizer if regularizer != "lcr" else "none",
        strength=strength if regularizer != "lcr" else None,
    )
    net = _attach_control(model_registry.get(model, num_classes=num_classes), config)
    if regularizer == "lcr":
        from larq_lipschitz.lcr import LCRModel

        teacher = model_registry.get(
            model, num_classes=num_classes, weight_bits=32, activation_bits=32
        )
        net = LCRModel(net, teacher, alpha=strength)
    net.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return net


def measure_epoch_times(
    model: str,
    strengths: Mapping[str, float],
    data: str | None,
    data_dir: str | None = None,
    *,
    batch_size: int = 128,
    steps: int = 20,
    rounds: int = 3,
    train_images: int = 50000,
    test_images: int = 10000,
) -> dict:
    """Training and test time per epoch of each regularizer, measured side by side.

    Every regularizer's model is built in this process and fed the same real batches of
    the same input pipeline; the rounds interleave them (none, lcr, l1inf; then lcr,
    l1inf, none; ...), so that the machine's load falls on all of them alike. Per
    epoch = median seconds per step × steps per epoch. LCR's time includes its
    full-precision teacher's forward pass and the retention matrices, as in training.

    # Returns
        `{"steps": .., "rounds": .., "batch_size": .., "rows": [{"regularizer",
        "train_step_seconds", "train_epoch_seconds", "test_step_seconds",
        "test_epoch_seconds", "train_ratio_to_none"}]}`.
    """
    from larq_lipschitz import data as data_lib

    import tensorflow as tf

    if steps < 1 or rounds < 1:
        raise ValueError(
            f"measure_epoch_times: steps and rounds must be >= 1, got {steps}, {rounds}."
        )
    splits = data_lib.load(
        "cifar10",
        data,
        batch_size=batch_size,
        train_examples=batch_size * steps * 2,
        data_dir=data_dir,
        seed=0,
    )
    train_batches = splits.train.repeat().prefetch(tf.data.AUTOTUNE)
    test_batches = splits.test.take(steps).cache()
    for _ in test_batches:  # fill the cache: every model then reads the same batches
        pass
    tf.keras.backend.clear_session()
    built = {}
    for reg, strength in strengths.items():
        tf.keras.utils.set_random_seed(0)
        built[reg] = _timing_model(reg, model, strength)
    train_s: dict[str, list[float]] = {r: [] for r in built}
    test_s: dict[str, list[float]] = {r: [] for r in built}
    infer = {}
    for reg, net in built.items():  # trace and warm up
        net.fit(train_batches, steps_per_epoch=2, epochs=1, verbose=0)
        target = net.student if hasattr(net, "student") else net
        infer[reg] = tf.function(lambda x, m=target: m(x, training=False))
        for images, _ in test_batches.take(1):
            infer[reg](images)
    order = list(built)
    for r in range(rounds):
        # each round starts with another regularizer, so none of them is always the
        # first one after a pause (or always the one right behind another's warm caches)
        for reg in order[r % len(order) :] + order[: r % len(order)]:
            net = built[reg]
            start = time.perf_counter()
            net.fit(train_batches, steps_per_epoch=steps, epochs=1, verbose=0)
            train_s[reg].append((time.perf_counter() - start) / steps)
            start = time.perf_counter()
            n = 0
            for images, _ in test_batches:
                infer[reg](images).numpy()
                n += 1
            test_s[reg].append((time.perf_counter() - start) / max(n, 1))
        log.info("time per epoch: round %d/%d done", r + 1, rounds)
    train_steps = math.ceil(train_images / batch_size)
    test_steps = math.ceil(test_images / batch_size)
    rows = []
    for reg in built:
        step = statistics.median(train_s[reg])
        test_step = statistics.median(test_s[reg])
        rows.append(
            {
                "regularizer": reg,
                "strength": strengths[reg],
                "train_step_seconds": step,
                "train_epoch_seconds": step * train_steps,
                "test_step_seconds": test_step,
                "test_epoch_seconds": test_step * test_steps,
            }
        )
    base = next((r for r in rows if r["regularizer"] == "none"), None)
    for row in rows:
        row["train_ratio_to_none"] = (
            row["train_step_seconds"] / base["train_step_seconds"] if base else None
        )
    return {
        "model": model,
        "steps": steps,
        "rounds": rounds,
        "batch_size": batch_size,
        "train_images": train_images,
        "test_images": test_images,
        "rows": rows,
    }


def _timing_markdown(timings: Sequence[dict], run_rows: Sequence[dict]) -> str:
    lines = [
        "# Time per epoch",
        "",
        "Measured side by side in one process on the same batches of the same input "
        "pipeline (interleaved rounds, median step time × steps per epoch), next to the "
        "mean epoch time each grid run recorded while it trained.",
        "",
        "| model | regularizer | train s/epoch (side by side) | × none | "
        "test s/epoch (side by side) | train s/epoch (recorded in run) |",
        "|---|---|---|---|---|---|",
    ]
    recorded = {(r["model"], r["regularizer"]): r for r in run_rows}
    for timing in timings:
        for row in timing["rows"]:
            rec = recorded.get((timing["model"], row["regularizer"]), {})
            measured = rec.get("mean_epoch_seconds")
            ratio = row["train_ratio_to_none"]
            lines.append(
                f"| {timing['model']} | {row['regularizer']} | "
                f"{row['train_epoch_seconds']:.1f} | "
                f"{'–' if ratio is None else f'{ratio:.2f}'} | "
                f"{row['test_epoch_seconds']:.1f} | "
                f"{'–' if measured is None else f'{measured:.1f}'} |"
            )
    return "\n".join(lines) + "\n"


def reproduce(
    table: str = "cifar10",
    profile: str | Profile = "cpu-short",
    *,
    models: Sequence[str] = ("resnet20",),
    regularizers: Sequence[str] = DEFAULT_REGULARIZERS,
    data: str | os.PathLike | None = None,
    data_dir: str | None = None,
    output: str | os.PathLike = "runs/reproduce-cifar10",
    sweep: bool = False,
    strengths: Mapping[str, float] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Train, evaluate and compare the grid `models × regularizers`; return the summary.

    # Arguments
        table: `"cifar10"` (the CIFAR-10 comparison table).
        profile: `"cpu-short"`, `"paper"`, or a `Profile`.
        models: model names (`larq_lipschitz.models.available()`), 1/1 bits.
        regularizers: controls of `larq_lipschitz.training.CONTROLS`; `lcr` trains a
            full-precision teacher of each model first.
        data: the CIFAR-10 binary archive (or its folder); `None` for tensorflow-datasets.
        data_dir: tensorflow-datasets data folder.
        output: the grid's folder (see the module docstring for its layout).
        sweep: choose each regularizer's strength by a sweep on held-out training images.
        strengths: explicit strengths per regularizer (they take precedence over both
            the profile and the sweep).
        overrides: profile fields to replace (see `OVERRIDABLE`).

    # Returns
        The contents of `OUT/reproduce.json`.

    # Raises
        ValueError: unknown table, profile, model or regularizer, or bad settings.
        larq_lipschitz.runs.RunError: a run folder holds a run with other settings.
        larq_lipschitz.data.DataError: missing or broken data.
    """
    from larq_lipschitz.compare import run_summary, write_comparison

    started = time.perf_counter()
    models = tuple(models)
    regularizers = tuple(regularizers)
    _check_grid(table, models, regularizers)
    if isinstance(profile, str):
        profile = get_profile(profile, overrides)
    elif overrides:
        profile = dataclasses.replace(profile, **overrides)
    strengths = dict(strengths or {})
    for name, value in strengths.items():
        if name not in regularizers:
            raise ValueError(
                f"--strengths names {name!r}, which is not in the grid's regularizers "
                f"({', '.join(regularizers)})."
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"strength of {name} must be a finite number >= 0, got {value!r}."
            )
    data = None if data is None else str(pathlib.Path(data).expanduser().resolve())
    if data is not None and not pathlib.Path(data).exists():
        from larq_lipschitz.data import DataError

        raise DataError(f"{data}: no such file or folder (the CIFAR-10 archive).")
    out = pathlib.Path(output)
    # A grid folder holds only the grid's own files; refuse anything else up front.
    if out.exists() and any(out.iterdir()) and not (out / "reproduce.json").is_file():
        if not any((out / d).is_dir() for d in ("runs", "teachers", "sweep")):
            raise runs.RunError(
                f"{out}: folder is not empty and holds no reproduce grid; choose another "
                "--output folder."
            )
    out.mkdir(parents=True, exist_ok=True)

    runner = _Runner()
    summary: dict[str, Any] = {
        "format": runs.RESULTS_FORMAT,
        "table": table,
        "profile": profile.to_dict(),
        "models": list(models),
        "regularizers": list(regularizers),
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "versions": runs.versions(),
        "machine": runs.machine(),
    }
    total = len(models) * len(regularizers)
    sweeps: dict[str, dict[str, dict]] = {}
    chosen: dict[str, dict[str, dict]] = {}
    run_dirs: list[pathlib.Path] = []
    run_rows: list[dict] = []
    index = 0
    for model in models:
        teacher = None
        if "lcr" in regularizers:
            teacher = _teacher(runner, out, profile, model, data, data_dir)
        chosen[model] = {}
        for reg in regularizers:
            if reg == "none":
                chosen[model][reg] = {"strength": 0.0, "source": "none"}
            elif reg in strengths:
                chosen[model][reg] = {"strength": strengths[reg], "source": "given"}
            elif sweep:
                result = _sweep(
                    runner, out, profile, model, reg, data, data_dir, teacher
                )
                sweeps.setdefault(model, {})[reg] = result
                chosen[model][reg] = {"strength": result["chosen"], "source": "sweep"}
            elif reg in profile.strengths:
                chosen[model][reg] = {
                    "strength": profile.strengths[reg],
                    "source": f"profile {profile.name}",
                }
            else:
                chosen[model][reg] = {"strength": None, "source": "training default"}
        if sweeps.get(model):
            runs.atomic_write_json(out / "sweep" / "sweep.json", sweeps)
            runs.atomic_write_text(
                out / "sweep" / "sweep.md", _sweep_markdown(sweeps, profile)
            )
        for reg in regularizers:
            index += 1
            folder = out / "runs" / f"{model}-{reg}"
            config = _config(
                profile,
                model,
                data,
                data_dir,
                regularizer=reg,
                strength=chosen[model][reg]["strength"],
                teacher=str(teacher) if reg == "lcr" else None,
            )
            results = runner.train(
                config, folder, f"run {index}/{total}: {model} {reg}"
            )
            evaluated = _evaluate(folder, profile)
            run_dirs.append(folder)
            run_rows.append(
                {
                    "model": model,
                    "regularizer": reg,
                    "strength": results["config"]["strength"],
                    "run": str(folder),
                    "state": runner.states[str(folder)],
                    "test_accuracy": results["test_accuracy"],
                    "mean_epoch_seconds": results.get("mean_epoch_seconds"),
                    **evaluated,
                }
            )
            summary["runs"] = run_rows
            summary["strengths"] = chosen
            runs.atomic_write_json(out / "reproduce.json", summary)

    timings = []
    if profile.timing_steps:
        timing_file = out / "time_per_epoch.json"
        previous = runs.read_json(timing_file) if timing_file.is_file() else []
        train_images = profile.train_examples or 50000 - profile.validation_examples
        for model in models:
            wanted = {
                reg: chosen[model][reg]["strength"] or 0.0 for reg in regularizers
            }
            if "lcr" in wanted and not wanted["lcr"]:  # an alpha of 0 is no LCR at all
                wanted["lcr"] = profile.strengths.get("lcr", 3.2)
            reuse = [
                t
                for t in previous or []
                if t["model"] == model
                and [r["regularizer"] for r in t["rows"]] == list(wanted)
                and t["steps"] == profile.timing_steps
                and t["rounds"] == profile.timing_rounds
                and t["batch_size"] == profile.batch_size
                and t["train_images"] == train_images
            ]
            if reuse:
                timings.append(reuse[0])
                continue
            log.info("measuring time per epoch of %s side by side", model)
            timings.append(
                measure_epoch_times(
                    model,
                    wanted,
                    data,
                    data_dir,
                    batch_size=profile.batch_size,
                    steps=profile.timing_steps,
                    rounds=profile.timing_rounds,
                    train_images=train_images,
                )
            )
        summary["time_per_epoch"] = timings
        runs.atomic_write_json(out / "time_per_epoch.json", timings)
        runs.atomic_write_text(
            out / "time_per_epoch.md", _timing_markdown(timings, run_rows)
        )

    paths = write_comparison(run_dirs, out)
    summary["comparison"] = [run_summary(d) for d in run_dirs]
    summary["files"] = {k: str(v) for k, v in paths.items()}
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    runs.atomic_write_json(out / "reproduce.json", summary)
    log.info("grid done: %s", json.dumps({r["run"]: r["state"] for r in run_rows}))
    return summary
