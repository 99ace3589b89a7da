"""The robustness suite: clean accuracy, noise, CIFAR-10-C corruptions, attacks, certificates.

`run_suite` evaluates one classifier of [0, 1] images on a test set under every
perturbation of a suite and returns a report of plain Python values;
`write_robustness` writes that report as `robustness.json`, `robustness.csv` and two PNG
plots, with the corruption error relative to a reference report when one is given.

Suites:

- `"noise"`: additive noise of `perturbations.NOISE_FAMILIES` (Gaussian, uniform,
  salt-and-pepper) at a few levels in [0, 1] pixel units.
- `"corruptions"`: every CIFAR-10-C corruption that `perturbations` synthesizes, at
  severities 1 to 5, or the released images when a tensorflow-datasets folder holding
  `cifar10_corrupted` is given. The mean corruption accuracy is taken over the 15
  corruptions of the benchmark (`STANDARD_CORRUPTIONS`) that were evaluated; the report
  names the ones that were not.
- `"attacks"`: FGSM and PGD in the L-infinity ball at epsilon 1/255, 2/255, 4/255 (pixel
  scale), with the certified accuracy of interval bound propagation at the same radii
  when `certify` supports the model (when it does not, the report says why).
- `"all"`: the three together.

Corruption error (Hendrycks & Dietterich, ICLR 2019), for a model f and a reference r,
with err = 1 - accuracy over the severities s of corruption c:

    CE_c = sum_s err(f, c, s) / sum_s err(r, c, s),    mCE = mean_c CE_c

where the mean runs over the corruptions of `STANDARD_CORRUPTIONS` present in both
reports. A CE below 1 means fewer errors than the reference.

```python
import larq_lipschitz.robustness as lr

report = lr.run_suite(model, test_batches, "noise", num_examples=500)
lr.write_robustness(report, "runs/r1")
```
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from larq_lipschitz import perturbations, runs

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = [
    "SUITES",
    "DEFAULT_NOISE_LEVELS",
    "DEFAULT_EPSILONS",
    "CORRUPTION_CATEGORIES",
    "REPORT_FILE",
    "REPORT_FORMAT",
    "DEPLOYED_REPORT_FILE",
    "DEPLOYED_ATTACKS_NOTE",
    "accuracy_differences",
    "run_suite",
    "corruption_errors",
    "read_robustness",
    "report_files",
    "write_robustness",
]

SUITES: tuple[str, ...] = ("noise", "corruptions", "attacks", "all")

#: Noise levels of the noise suite, in [0, 1] pixel units: Gaussian sigma, uniform
#: half-width and salt-and-pepper amount (see `perturbations.add_noise`). The Gaussian
#: levels are those `larq-lipschitz train` reports.
DEFAULT_NOISE_LEVELS: Mapping[str, tuple[float, ...]] = {
    "gaussian": (0.02, 0.05, 0.1),
    "uniform": (0.05, 0.1, 0.2),
    "salt_and_pepper": (0.01, 0.03, 0.05),
}

#: L-infinity radii of the attack suite, in [0, 1] pixel scale.
DEFAULT_EPSILONS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)

#: The four groups of corruptions of CIFAR-10-C, as the paper groups them.
CORRUPTION_CATEGORIES: Mapping[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": (
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "gaussian_blur",
    ),
    "weather": ("snow", "frost", "fog", "brightness", "spatter"),
    "digital": (
        "contrast",
        "elastic_transform",
        "pixelate",
        "jpeg_compression",
        "saturate",
    ),
}
_CATEGORY = {
    name: cat for cat, names in CORRUPTION_CATEGORIES.items() for name in names
}
_RELEASED = perturbations.STANDARD_CORRUPTIONS + perturbations.EXTRA_CORRUPTIONS

REPORT_FILE = "robustness.json"
CSV_FILE = "robustness.csv"
SEVERITY_PLOT = "robustness_severity.png"
CORRUPTION_PLOT = "robustness_corruptions.png"
#: The files of a deployed model's report: never those of the Keras model's report.
DEPLOYED_REPORT_FILE = "robustness_deployed.json"
DEPLOYED_CSV_FILE = "robustness_deployed.csv"
DEPLOYED_SEVERITY_PLOT = "robustness_deployed_severity.png"
DEPLOYED_CORRUPTION_PLOT = "robustness_deployed_corruptions.png"
#: Why a deployed model gets no attacks and no certificates.
DEPLOYED_ATTACKS_NOTE = (
    "gradient attacks need the gradients of the Keras model and certification its "
    "layers, and a converted .tflite model has neither; attacks and certified accuracy "
    "run on the Keras model only (evaluate without --deployed)"
)
#: Version of the layout of `robustness.json`.
REPORT_FORMAT = 1
CSV_FIELDS = ("family", "name", "severity", "accuracy")

#: Images above this many bytes in total are not cached in memory between passes.
_CACHE_LIMIT_BYTES = 2 << 30
_DEFAULT_BATCH = 200

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_positive_int(value, what: str, *, allow_none: bool = False) -> int | None:
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(
            f"run_suite: {what} must be a positive integer, got {value!r}."
        )
    return int(value)


def _check_suite(suite: str) -> tuple[str, ...]:
    if suite not in SUITES:
        raise ValueError(
            f"run_suite: unknown suite {suite!r}; valid suites are {list(SUITES)}."
        )
    return ("noise", "corruptions", "attacks") if suite == "all" else (suite,)


def _check_epsilons(epsilons: Iterable[float]) -> tuple[float, ...]:
    out = []
    for eps in epsilons:
        if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating):
            raise ValueError(f"run_suite: epsilon must be a number, got {eps!r}.")
        if not math.isfinite(float(eps)) or not 0 <= float(eps) <= 1:
            raise ValueError(
                f"run_suite: epsilon must be a finite number in [0, 1] (pixel scale), got {eps}."
            )
        out.append(float(eps))
    if not out:
        raise ValueError("run_suite: epsilons is empty.")
    return tuple(out)


def _noise_settings(noise_levels, seed: int) -> list[tuple[dict, Callable]]:
    levels = DEFAULT_NOISE_LEVELS if noise_levels is None else noise_levels
    if not isinstance(levels, Mapping) or not levels:
        raise ValueError(
            "run_suite: noise_levels must be a non-empty mapping "
            f"{{family: [levels]}} with families of {list(perturbations.NOISE_FAMILIES)}, "
            f"got {noise_levels!r}."
        )
    settings = []
    for family, values in levels.items():
        if family not in perturbations.NOISE_FAMILIES:
            raise ValueError(
                f"run_suite: unknown noise family {family!r}; valid families are "
                f"{list(perturbations.NOISE_FAMILIES)}."
            )
        values = [values] if isinstance(values, int | float) else list(values)
        if not values:
            raise ValueError(f"run_suite: no noise levels given for {family!r}.")
        for level in values:
            fn = perturbations.perturbation_fn(family, level, seed)  # checks the level
            if float(level) > 1:
                raise ValueError(
                    f"run_suite: {family} noise level must be in [0, 1] pixel scale, "
                    f"got {level!r}."
                )
            settings.append(({"family": family, "level": float(level)}, fn))
    return settings


def _corruption_names(corruptions, released: bool) -> tuple[str, ...]:
    if corruptions is None:
        if released:
            return _RELEASED
        return tuple(n for n in _RELEASED if n in perturbations.CORRUPTIONS) + tuple(
            n for n in perturbations.CORRUPTIONS if n not in _RELEASED
        )
    names = (corruptions,) if isinstance(corruptions, str) else tuple(corruptions)
    if not names:
        raise ValueError("run_suite: corruptions is empty.")
    if len(set(names)) != len(names):
        raise ValueError(f"run_suite: corruptions repeats a name: {list(names)}.")
    for name in names:
        if not released and name not in perturbations.CORRUPTIONS:
            if name in perturbations.UNAVAILABLE_CORRUPTIONS:
                continue  # perturbation_fn says why it is not synthesized
            raise ValueError(
                f"run_suite: unknown corruption {name!r}; the synthesized corruptions "
                f"are {sorted(perturbations.CORRUPTIONS)}."
            )
        if released and name not in _RELEASED:
            raise ValueError(
                f"run_suite: unknown corruption {name!r}; the released CIFAR-10-C "
                f"corruptions are {sorted(_RELEASED)}."
            )
    return names


def _check_severities(severities) -> tuple[int, ...]:
    values = (severities,) if isinstance(severities, int) else tuple(severities)
    if not values:
        raise ValueError("run_suite: severities is empty.")
    for s in values:
        if (
            isinstance(s, bool)
            or not isinstance(s, int | np.integer)
            or int(s) not in perturbations.SEVERITIES
        ):
            raise ValueError(
                f"run_suite: severity must be one of {list(perturbations.SEVERITIES)}, "
                f"got {s!r}."
            )
    if len(set(values)) != len(values):
        raise ValueError(f"run_suite: severities repeats a value: {list(values)}.")
    return tuple(int(s) for s in values)


def _check_arguments(
    suite: str,
    *,
    seed: int = 0,
    num_examples: int | None = None,
    batch_size: int | None = None,
    noise_levels=None,
    corruptions=None,
    severities=perturbations.SEVERITIES,
    cifar10_corrupted_dir=None,
    epsilons=DEFAULT_EPSILONS,
    attack_steps: int = 10,
    attack_restarts: int = 1,
    deployed: bool = False,
) -> dict:
    """Every argument of `run_suite` that does not need the data, checked and normalized.

    For a deployed model the attack suite is refused and `"all"` means noise and
    corruptions (`DEPLOYED_ATTACKS_NOTE` says why).
    """
    sections = _check_suite(suite)
    if deployed and sections == ("attacks",):
        raise ValueError(
            f"run_suite: suite 'attacks' on a deployed model: {DEPLOYED_ATTACKS_NOTE}."
        )
    if deployed:
        sections = tuple(name for name in sections if name != "attacks")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"run_suite: seed must be an integer, got {seed!r}.")
    seed = int(seed)
    released = cifar10_corrupted_dir is not None
    out = {
        "sections": sections,
        "seed": seed,
        "num_examples": _check_positive_int(
            num_examples, "num_examples", allow_none=True
        ),
        "batch_size": _check_positive_int(batch_size, "batch_size", allow_none=True),
        "attack_steps": _check_positive_int(attack_steps, "attack_steps"),
        "attack_restarts": _check_positive_int(attack_restarts, "attack_restarts"),
        "noise": _noise_settings(noise_levels, seed) if "noise" in sections else [],
        "corruptions": (),
        "severities": (),
        "epsilons": (),
    }
    if "corruptions" in sections:
        out["corruptions"] = _corruption_names(corruptions, released)
        out["severities"] = _check_severities(severities)
        if not released:
            for name in out["corruptions"]:
                for s in out["severities"]:  # perturbation_fn checks both
                    perturbations.perturbation_fn(name, s, seed)
    if "attacks" in sections:
        out["epsilons"] = _check_epsilons(epsilons)
    return out


# --------------------------------------------------------------------------------------
# Data preparation and the compiled classifier
# --------------------------------------------------------------------------------------


def _prepare(dataset, num_examples: int | None, batch_size: int | None):
    """Batched (float32 pixels, int32 labels), cut to `num_examples`, cached if small."""
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"run_suite: test_dataset must be a tf.data.Dataset of (images, labels), "
            f"got {type(dataset).__name__}."
        )
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) < 2:
        raise ValueError(
            "run_suite: test_dataset must yield (images, labels) pairs, got elements "
            f"{spec}."
        )
    if len(spec) > 2:
        dataset = dataset.map(lambda x, y, *_: (x, y))
        spec = dataset.element_spec
    image_spec, label_spec = spec
    rank = image_spec.shape.rank
    if rank not in (3, 4):
        raise ValueError(
            "run_suite: images must be (height, width, channels) or batched "
            f"(batch, height, width, channels), got shape {image_spec.shape}."
        )
    batched = rank == 4
    if batched and (num_examples is not None or batch_size is not None):
        if batch_size is None:
            first = next(iter(dataset.take(1)), None)
            if first is None:
                raise ValueError("run_suite: the test dataset is empty.")
            batch_size = int(first[0].shape[0])
        dataset = dataset.unbatch()
        batched = False
    if not batched:
        if num_examples is not None:
            dataset = dataset.take(num_examples)
        dataset = dataset.batch(batch_size or _DEFAULT_BATCH)
    label_rank = label_spec.shape.rank
    one_hot = (
        label_rank is not None
        and label_rank == (2 if rank == 4 else 1)
        and label_spec.shape[-1] not in (1, None)
    )

    def to_pixels(images, labels):
        if images.dtype == tf.uint8:
            images = tf.cast(images, tf.float32) / 255.0
        else:
            images = tf.cast(images, tf.float32)
        if one_hot:
            labels = tf.argmax(labels, axis=-1)
        return images, tf.cast(tf.reshape(labels, [-1]), tf.int32)

    dataset = dataset.map(to_pixels, num_parallel_calls=tf.data.AUTOTUNE)
    image_shape = tuple(image_spec.shape[-3:])
    per_image = 4 * math.prod(d if d is not None else 1024 for d in image_shape)
    if num_examples is not None:
        cache = num_examples * per_image <= _CACHE_LIMIT_BYTES
    else:  # CIFAR-sized images: a whole test set fits in memory
        cache = None not in image_shape and per_image <= 4 * 64 * 64 * 3
    if cache:
        dataset = dataset.cache()
    return dataset.prefetch(tf.data.AUTOTUNE), image_shape, bool(cache)


def _is_deployed(model) -> bool:
    """Whether `model` is an `export.DeployedModel` (a flatbuffer run by LCE)."""
    if isinstance(model, tf.keras.Model):
        return False
    from larq_lipschitz.export import DeployedModel

    return isinstance(model, DeployedModel)


def _expected_image_shape(model) -> tuple | None:
    """The `(height, width, channels)` a model takes, None where it does not say."""
    try:
        shape = model.input_shape
    except (AttributeError, RuntimeError, ValueError):  # a subclassed model, unbuilt
        return None
    if not isinstance(shape, tuple) or len(shape) < 2:
        return None  # several inputs, or none
    return tuple(shape[1:])


def _check_image_shape(model, image_shape: tuple) -> None:
    expected = _expected_image_shape(model)
    if expected is None:
        return
    fits = len(expected) == len(image_shape) and all(
        e is None or e == d for e, d in zip(expected, image_shape, strict=True)
    )
    if not fits:
        wanted = ", ".join("any" if d is None else str(d) for d in expected)
        raise ValueError(
            f"run_suite: the model takes images of shape ({wanted}), but the test "
            f"dataset holds images of shape {tuple(image_shape)}."
        )


def _deployed_classifier(deployed):
    """`count(images, labels) -> (hits, n)` through LCE's interpreter, eagerly."""

    def count(images, labels):
        scores = deployed.predict(np.asarray(images))
        predicted = np.argmax(scores, axis=-1)
        labels = np.asarray(labels).reshape(-1)
        return int(np.sum(predicted == labels)), int(labels.size)

    return count


def _classifier(model: tf.keras.Model, image_shape: tuple):
    @tf.function(
        input_signature=[
            tf.TensorSpec((None, *image_shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ]
    )
    def count(images, labels):
        scores = tf.cast(model(images, training=False), tf.float32)
        predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
        hits = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64))
        return hits, tf.size(labels, out_type=tf.int64)

    return count


def _count_pass(count, dataset, check_pixels: bool = False) -> tuple[int, int]:
    correct = total = 0
    for index, (images, labels) in enumerate(dataset):
        if check_pixels:
            perturbations.check_pixels(images, "run_suite", f"test batch {index}")
        hits, n = count(images, labels)
        correct += int(hits)
        total += int(n)
    return correct, total


class _Clock:
    """Wall time and images of each section, and the progress callback."""

    def __init__(self, total_steps: int, progress: Progress | None):
        self.sections: dict[str, dict[str, float]] = {}
        self.total_steps, self.done, self.progress = total_steps, 0, progress

    def add(self, section: str, seconds: float, images: int) -> None:
        entry = self.sections.setdefault(section, {"seconds": 0.0, "images": 0})
        entry["seconds"] += seconds
        entry["images"] += images

    def step(self, message: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total_steps, message)


def _perturbed_accuracies(
    count,
    base: tf.data.Dataset,
    functions: Sequence[Callable],
    group_of: Sequence[str],
    describe: Callable[[str, list[int], list[float]], str],
    clock: _Clock,
    section: str,
) -> list[float]:
    """Accuracy of each perturbation function over `base`, in one input pipeline.

    Every (setting, batch) pair is one element; a single parallel map applies the
    setting's function, chosen by index with `tf.switch_case`, so that batches of
    different settings are perturbed concurrently while the model classifies earlier
    ones (one dataset per setting, concatenated, would stall at every boundary). Batch i
    of the test set gets `batch_index=i` for every setting, so each setting sees the
    same random stream whatever else the suite contains. One log line per group.
    """
    group_start = time.perf_counter()  # building the pipeline traces every function
    enumerated = base.enumerate()

    def tag(k):
        return enumerated.map(lambda i, batch: (k, i, batch[0], batch[1]))

    def apply(k, i, images, labels):
        branches = [lambda f=f: f(images, batch_index=i) for f in functions]
        return k, tf.switch_case(tf.cast(k, tf.int32), branches), labels

    pipeline = (
        tf.data.Dataset.range(len(functions))
        .flat_map(tag)
        .map(apply, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    hits = [0] * len(functions)
    seen = [0] * len(functions)
    current: int | None = None

    def finish() -> None:
        # settings of group(current) are done when the first batch of a later one arrives
        nonlocal group_start
        group = group_of[current]
        members = [j for j in range(len(functions)) if group_of[j] == group]
        seconds = time.perf_counter() - group_start
        images = sum(seen[j] for j in members)
        clock.add(section, seconds, images)
        accs = [hits[j] / seen[j] if seen[j] else float("nan") for j in members]
        log.info(
            "%s (%d images in %.1f s, %.0f img/s)",
            describe(group, members, accs),
            images,
            seconds,
            images / seconds if seconds > 0 else float("inf"),
        )
        for j in members:
            clock.step(f"{section}: {describe(group, [j], [accs[members.index(j)]])}")
        group_start = time.perf_counter()

    for k, images, labels in pipeline:
        k = int(k)
        if current is not None and group_of[k] != group_of[current]:
            finish()
        current = k
        n_hits, n = count(images, labels)
        hits[k] += int(n_hits)
        seen[k] += int(n)
    if current is not None:
        finish()
    if any(n == 0 for n in seen):
        raise ValueError("run_suite: the test dataset is empty.")
    return [h / n for h, n in zip(hits, seen, strict=True)]


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _run_noise(count, base, settings, clock: _Clock) -> dict:
    def describe(family, members, accs):
        levels = " ".join(
            f"{settings[j][0]['level']:g}: {a:.4f}"
            for j, a in zip(members, accs, strict=True)
        )
        return f"noise {family}: accuracy at level {levels}"

    accs = _perturbed_accuracies(
        count,
        base,
        [fn for _, fn in settings],
        [s["family"] for s, _ in settings],
        describe,
        clock,
        "noise",
    )
    return {
        "results": [
            {**s, "accuracy": a} for (s, _), a in zip(settings, accs, strict=True)
        ]
    }


def _corruption_summary(results: list[dict], names, source: str) -> dict:
    per_corruption = {}
    for name in names:
        accs = [r["accuracy"] for r in results if r["name"] == name]
        per_corruption[name] = float(np.mean(accs))
    standard = [n for n in perturbations.STANDARD_CORRUPTIONS if n in per_corruption]
    missing = {}
    for name in perturbations.STANDARD_CORRUPTIONS:
        if name in per_corruption:
            continue
        if source == "synthesized" and name in perturbations.UNAVAILABLE_CORRUPTIONS:
            missing[name] = (
                "not synthesized: " + perturbations.UNAVAILABLE_CORRUPTIONS[name]
            )
        else:
            missing[name] = "not requested"
    return {
        "source": source,
        "results": results,
        "per_corruption": per_corruption,
        "mean_corruption_accuracy": float(
            np.mean([per_corruption[n] for n in standard])
        )
        if standard
        else None,
        "mean_over": standard,
        "missing_standard": missing,
        "mean_all_accuracy": float(np.mean(list(per_corruption.values()))),
    }


def _run_synthesized(count, base, names, severities, seed, clock) -> dict:
    functions, meta = [], []
    for name in names:
        for s in severities:
            functions.append(perturbations.perturbation_fn(name, s, seed))
            meta.append({"name": name, "category": _CATEGORY.get(name), "severity": s})

    def describe(name, members, accs):
        values = " ".join(
            f"{meta[j]['severity']}: {a:.4f}"
            for j, a in zip(members, accs, strict=True)
        )
        return f"corruption {name}: accuracy at severity {values}"

    accs = _perturbed_accuracies(
        count,
        base,
        functions,
        [m["name"] for m in meta],
        describe,
        clock,
        "corruptions",
    )
    results = [{**m, "accuracy": a} for m, a in zip(meta, accs, strict=True)]
    return _corruption_summary(results, names, "synthesized")


def _run_released(
    count, names, severities, data_dir, num_examples, batch_size, clock
) -> dict:
    results = []
    for name in names:
        start, images, accs = time.perf_counter(), 0, []
        for s in severities:
            data = perturbations.load_cifar10_corrupted(name, s, data_dir, batch_size)
            if num_examples is not None:
                data = data.unbatch().take(num_examples).batch(batch_size)
            data = data.map(
                lambda x, y: (
                    tf.cast(x, tf.float32),
                    tf.cast(tf.reshape(y, [-1]), tf.int32),
                )
            )
            correct, total = _count_pass(count, data.prefetch(tf.data.AUTOTUNE))
            if total == 0:
                raise ValueError(
                    f"run_suite: the released {name} severity {s} holds no images."
                )
            accs.append(correct / total)
            images += total
            results.append(
                {
                    "name": name,
                    "category": _CATEGORY.get(name),
                    "severity": s,
                    "accuracy": correct / total,
                }
            )
            clock.step(
                f"corruptions: released {name} severity {s}: {correct / total:.4f}"
            )
        seconds = time.perf_counter() - start
        clock.add("corruptions", seconds, images)
        log.info(
            "corruption %s (released): accuracy at severity %s (%d images in %.1f s, %.0f img/s)",
            name,
            " ".join(f"{s}: {a:.4f}" for s, a in zip(severities, accs, strict=True)),
            images,
            seconds,
            images / seconds if seconds > 0 else float("inf"),
        )
    summary = _corruption_summary(results, names, "released")
    summary["data_dir"] = str(data_dir)
    return summary


def _run_attacks(model, base, epsilons, steps, restarts, seed, n, clock) -> dict:
    from larq_lipschitz.attacks import attack_accuracy

    out: dict[str, Any] = {
        "steps": steps,
        "restarts": restarts,
        "loss": "margin",
        "note": "accuracy under a gradient attack is an upper bound on the robust "
        "accuracy (straight-through gradients of a sign network can miss adversarial "
        "points); the certified accuracy is a lower bound",
        "results": [],
        "error": None,
    }
    for method in ("fgsm", "pgd"):
        for eps in epsilons:
            start = time.perf_counter()
            try:
                acc = attack_accuracy(
                    model, base, eps, method, steps=steps, restarts=restarts, seed=seed
                )
            except ValueError as err:
                out["error"] = str(err)
                log.warning("attacks skipped: %s", err)
                return out
            clock.add("attacks", time.perf_counter() - start, n)
            out["results"].append(
                {
                    "method": method,
                    "epsilon": eps,
                    "epsilon_255": eps * 255,
                    "accuracy": acc,
                }
            )
            clock.step(f"attacks: {method} eps={eps * 255:g}/255: {acc:.4f}")
    return out


def _run_certify(model, base, epsilons, n, clock) -> dict:
    from larq_lipschitz.certify import certify

    start = time.perf_counter()
    try:
        rows = certify(model, base, epsilons)
    except (ValueError, NotImplementedError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        log.warning("certified accuracy not available for this model: %s", reason)
        clock.step("certified: not supported")
        return {"supported": False, "reason": reason, "results": []}
    clock.add("certified", time.perf_counter() - start, n * len(epsilons))
    clock.step("certified: " + " ".join(f"{r['certified_accuracy']:.4f}" for r in rows))
    return {
        "supported": True,
        "reason": None,
        "method": "interval bound propagation, ||delta||_inf <= epsilon",
        "results": [
            {
                "epsilon": r["epsilon"],
                "epsilon_255": r["epsilon"] * 255,
                "certified_accuracy": r["certified_accuracy"],
                "undecided_fraction": r["undecided_fraction"],
                "clean_accuracy": r["clean_accuracy"],
            }
            for r in rows
        ],
    }


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------


def run_suite(
    model: tf.keras.Model,
    test_dataset: tf.data.Dataset,
    suite: str = "all",
    *,
    seed: int = 0,
    num_examples: int | None = None,
    batch_size: int | None = None,
    noise_levels: Mapping[str, Sequence[float]] | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = perturbations.SEVERITIES,
    cifar10_corrupted_dir: str | os.PathLike | None = None,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    attack_steps: int = 10,
    attack_restarts: int = 1,
    certified: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Evaluate a classifier of [0, 1] images clean and under the perturbations of a suite.

    The test images are cut to `num_examples`, cached in memory when small, and
    classified clean twice: once for the clean accuracy, once more, timed, as the
    plain-inference reference of the timings. Perturbations run inside `tf.data` on
    whole batches (parallel map, prefetch) and are keyed by the batch's position, so a
    setting's random draws do not depend on the other settings; the result for one image
    depends on the batch it is in, so the batch size is part of the setup.

    Every setting's accuracy is top-1 accuracy, the fraction of correctly classified
    images. Corruption accuracy per corruption is the mean over the severities; the mean
    corruption accuracy is the mean of those over the evaluated corruptions of
    `STANDARD_CORRUPTIONS` (`frost` is never synthesized: give `cifar10_corrupted_dir` to
    include it), and `missing_standard` in the report says which were left out and why.

    Accuracy under FGSM or PGD is an upper bound on the robust accuracy (straight-through
    gradients can miss adversarial points of a sign network); the certified accuracy of
    `certify` is a lower bound. When `certify` cannot handle a layer of the model the
    report's `certified` section holds `supported: False` and the reason.

    A deployed model (`export.DeployedModel`, a `.tflite` flatbuffer run by Larq Compute
    Engine's interpreter) is evaluated the same way, on the same perturbed batches, for
    the noise and corruption suites; attacks need gradients and certification needs the
    Keras layers, so the attack suite is refused for it and `"all"` leaves the attacks
    out (`attacks` then holds `{"skipped": DEPLOYED_ATTACKS_NOTE, "results": []}`). The
    interpreter runs the flatbuffer's fixed batch size (1 for the registry models) on
    the CPU: expect it to be much slower than the Keras model.

    The test images are checked in the first clean pass: a batch with NaN or infinite
    values, or values outside [0, 1], is refused with a `ValueError` naming the batch
    and image; so is a dataset whose image shape is not the one the model takes.

    # Arguments
        model: a Keras classifier taking [0, 1] pixels (normalization inside the model)
            and returning (batch, classes) logits or probabilities, or an
            `export.DeployedModel` of one.
        test_dataset: `tf.data.Dataset` of `(images, labels)`, batched or not; images
            float in [0, 1] or uint8, labels class indices or one-hot.
        suite: `"noise"`, `"corruptions"`, `"attacks"` or `"all"`.
        seed: integer seed of every random perturbation and of PGD's random starts.
        num_examples: evaluate only the first `num_examples` test images (all if None).
        batch_size: images per batch; default: the dataset's own batches (200 when it is
            not batched).
        noise_levels: `{family: levels}` for the noise suite; default
            `DEFAULT_NOISE_LEVELS`.
        corruptions: corruption names for the corruption suite; default every
            synthesized corruption (every released one with `cifar10_corrupted_dir`).
        severities: severities of every corruption, within 1..5.
        cifar10_corrupted_dir: a tensorflow-datasets data folder where
            `cifar10_corrupted` is prepared; the released images are then read with
            `perturbations.load_cifar10_corrupted` (in file order, the first
            `num_examples` of each) instead of synthesizing them. Nothing is downloaded.
        epsilons: L-infinity radii of the attacks and certificates, [0, 1] pixel scale.
        attack_steps: PGD steps (FGSM takes one).
        attack_restarts: PGD random restarts.
        certified: also compute the certified accuracy in the attack suite.
        progress: optional `progress(done, total, message)`, called after every
            evaluated setting.

    # Returns
        A dict of plain Python values: `format`, `suite`, `evaluated` (`{"kind":
        "keras", "name": model name}` or `{"kind": "deployed", "path": .tflite path,
        "bytes": its size, "batch_size": the flatbuffer's}`), `seed`, `num_examples`,
        `batch_size`, `clean_accuracy`, and the sections `noise`, `corruptions`,
        `attacks`, `certified` (None when not in the suite), and `timing` with the wall
        time and images of each section, the plain-inference rate and
        `time_ratio = suite seconds / plain-inference seconds of the same images`.

    # Raises
        ValueError: for an unknown suite, noise family, corruption, a severity outside
            1..5, an invalid level (noise levels lie in [0, 1]), epsilon or count,
            corruptions of images that are not 32 x 32 RGB, the attack suite of a
            deployed model, images of another shape than the model takes, non-finite
            or out-of-range pixels, or an empty dataset. Every argument is checked
            before any image is classified.

    # Example
    ```python
    report = run_suite(model, test_batches, "corruptions", num_examples=1000, seed=1)
    print(report["corruptions"]["mean_corruption_accuracy"])
    ```
    """
    deployed = _is_deployed(model)
    checked = _check_arguments(
        suite,
        deployed=deployed,
        seed=seed,
        num_examples=num_examples,
        batch_size=batch_size,
        noise_levels=noise_levels,
        corruptions=corruptions,
        severities=severities,
        cifar10_corrupted_dir=cifar10_corrupted_dir,
        epsilons=epsilons,
        attack_steps=attack_steps,
        attack_restarts=attack_restarts,
    )
    sections, seed = checked["sections"], checked["seed"]
    num_examples, batch_size = checked["num_examples"], checked["batch_size"]
    noise, names = checked["noise"], checked["corruptions"]
    severities, epsilons = checked["severities"], checked["epsilons"]
    attack_steps, attack_restarts = checked["attack_steps"], checked["attack_restarts"]
    released = cifar10_corrupted_dir is not None

    base, image_shape, cached = _prepare(test_dataset, num_examples, batch_size)
    _check_image_shape(model, image_shape)
    skipped_corruptions = None
    if names and not released and image_shape != (32, 32, 3):
        reason = (
            "the CIFAR-10-C corruptions are defined for 32 x 32 RGB images, got images "
            f"of shape {image_shape}"
        )
        if suite == "corruptions":
            raise ValueError(f"run_suite: {reason}.")
        log.warning("corruption suite skipped: %s", reason)
        skipped_corruptions, names = reason, ()

    steps = 1 + len(noise) + len(names) * len(severities)
    if "attacks" in sections:
        steps += 2 * len(epsilons) + (1 if certified else 0)
    clock = _Clock(steps, progress)
    if deployed:
        count = _deployed_classifier(model)
        evaluated = {
            "kind": "deployed",
            "path": str(model.path),
            "bytes": model.size_bytes,
            "batch_size": model.batch_size,
        }
    else:
        count = _classifier(model, image_shape)
        evaluated = {"kind": "keras", "name": getattr(model, "name", None)}
    suite_start = time.perf_counter()

    start = time.perf_counter()
    correct, n = _count_pass(count, base, check_pixels=True)
    if n == 0:
        raise ValueError("run_suite: the test dataset is empty.")
    clean = correct / n
    clock.add("clean", time.perf_counter() - start, n)
    start = time.perf_counter()
    _count_pass(count, base)
    plain_seconds = time.perf_counter() - start
    log.info(
        "clean accuracy %.4f on %d images; plain inference %.0f img/s",
        clean,
        n,
        n / plain_seconds if plain_seconds > 0 else float("inf"),
    )
    clock.step(f"clean: {clean:.4f}")
    if batch_size is None:
        batch_size = int(next(iter(base.take(1)))[0].shape[0])

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "suite": suite,
        "evaluated": evaluated,
        "seed": seed,
        "num_examples": n,
        "batch_size": batch_size,
        "clean_accuracy": clean,
        "noise": None,
        "corruptions": None,
        "attacks": None,
        "certified": None,
    }
    if noise:
        report["noise"] = _run_noise(count, base, noise, clock)
    if names:
        if released:
            report["corruptions"] = _run_released(
                count,
                names,
                severities,
                cifar10_corrupted_dir,
                num_examples,
                batch_size,
                clock,
            )
        else:
            report["corruptions"] = _run_synthesized(
                count, base, names, severities, seed, clock
            )
    elif skipped_corruptions is not None:
        report["corruptions"] = {"skipped": skipped_corruptions}
    if "attacks" in sections:
        report["attacks"] = _run_attacks(
            model, base, epsilons, attack_steps, attack_restarts, seed, n, clock
        )
        if certified:
            report["certified"] = _run_certify(model, base, epsilons, n, clock)
    elif deployed and suite == "all":
        report["attacks"] = {"skipped": DEPLOYED_ATTACKS_NOTE, "results": []}

    suite_seconds = time.perf_counter() - suite_start
    rate = n / plain_seconds if plain_seconds > 0 else float("inf")
    timing: dict[str, Any] = {
        "plain_inference": {
            "seconds": plain_seconds,
            "images": n,
            "images_per_second": rate,
        },
        "sections": {},
        "cached": cached,
    }
    images_total = n  # the timed plain pass is part of the suite's wall time
    for name, entry in clock.sections.items():
        images_total += entry["images"]
        timing["sections"][name] = {
            **entry,
            "images_per_second": entry["images"] / entry["seconds"]
            if entry["seconds"] > 0
            else None,
            "time_ratio": entry["seconds"] * rate / entry["images"]
            if entry["images"]
            else None,
        }
    timing["suite_seconds"] = suite_seconds
    timing["images"] = images_total
    timing["plain_equivalent_seconds"] = images_total / rate
    timing["time_ratio"] = suite_seconds * rate / images_total
    report["timing"] = timing
    log.info(
        "suite %r: %d images in %.1f s; plain inference of the same images: %.1f s "
        "(time ratio %.2f)",
        suite,
        images_total,
        suite_seconds,
        timing["plain_equivalent_seconds"],
        timing["time_ratio"],
    )
    return report


# --------------------------------------------------------------------------------------
# Corruption error and report files
# --------------------------------------------------------------------------------------


def _corruption_rows(report: Mapping) -> list[dict]:
    section = report.get("corruptions") or {}
    return list(section.get("results") or [])


def corruption_errors(report: Mapping, reference: Mapping) -> dict:
    """Corruption error of `report` relative to `reference`, per corruption and mean.

    CE_c = sum_s (1 - acc(model, c, s)) / sum_s (1 - acc(reference, c, s)), over the
    severities s that both reports hold for corruption c; mCE = mean of CE_c over the
    corruptions of `STANDARD_CORRUPTIONS` in both. A corruption on which the reference
    makes no error at all has no CE (None) and is left out of the mean.

    # Arguments
        report: a report of `run_suite` (or a loaded `robustness.json`).
        reference: the report of the reference model.

    # Returns
        `{"corruption_error": {name: CE or None}, "mce": float or None, "mce_over":
        [names], "undefined": {name: reason}}`.

    # Raises
        ValueError: when either report holds no corruption results, or the two share no
            (corruption, severity) pair.

    # Example
    ```python
    errors = corruption_errors(report, read_robustness("runs/baseline"))
    print(errors["mce"])
    ```
    """
    mine, theirs = _corruption_rows(report), _corruption_rows(reference)
    if not mine:
        raise ValueError("corruption_errors: the report holds no corruption results.")
    if not theirs:
        raise ValueError(
            "corruption_errors: the reference report holds no corruption results "
            "(evaluate the reference run with the corruption suite first)."
        )
    ref = {(r["name"], int(r["severity"])): float(r["accuracy"]) for r in theirs}
    own: dict[str, list[tuple[float, float]]] = {}
    for r in mine:
        key = (r["name"], int(r["severity"]))
        if key in ref:
            own.setdefault(r["name"], []).append((float(r["accuracy"]), ref[key]))
    if not own:
        raise ValueError(
            "corruption_errors: the report and the reference share no corruption and "
            "severity."
        )
    ce: dict[str, float | None] = {}
    undefined = {}
    for name, pairs in own.items():
        denominator = sum(1 - b for _, b in pairs)
        if denominator <= 0:
            ce[name] = None
            undefined[name] = "the reference makes no error on this corruption"
            continue
        ce[name] = sum(1 - a for a, _ in pairs) / denominator
    over = [
        n for n in perturbations.STANDARD_CORRUPTIONS if n in ce and ce[n] is not None
    ]
    return {
        "corruption_error": ce,
        "mce": float(np.mean([ce[n] for n in over])) if over else None,
        "mce_over": over,
        "undefined": undefined,
    }


def _is_deployed_report(report: Mapping) -> bool:
    return (report.get("evaluated") or {}).get("kind") == "deployed"


def report_files(report: Mapping) -> dict[str, str]:
    """The file names `write_robustness` uses for a report.

    `robustness.json`, `.csv`, `_severity.png`, `_corruptions.png` for a Keras model;
    `robustness_deployed.json`, ... for a deployed one, so that evaluating the shipped
    model never replaces the Keras model's report.
    """
    if _is_deployed_report(report):
        return {
            "json": DEPLOYED_REPORT_FILE,
            "csv": DEPLOYED_CSV_FILE,
            "severity_png": DEPLOYED_SEVERITY_PLOT,
            "corruptions_png": DEPLOYED_CORRUPTION_PLOT,
        }
    return {
        "json": REPORT_FILE,
        "csv": CSV_FILE,
        "severity_png": SEVERITY_PLOT,
        "corruptions_png": CORRUPTION_PLOT,
    }


def read_robustness(path: str | os.PathLike, *, deployed: bool = False) -> dict:
    """Read a robustness report, given the file or the run folder that holds it.

    # Arguments
        path: a report file, or a run folder: then its `robustness.json`, or with
            `deployed` its `robustness_deployed.json`.
        deployed: which report of a run folder to read.

    # Raises
        runs.RunError: when the file is missing, unreadable or of another format.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / (DEPLOYED_REPORT_FILE if deployed else REPORT_FILE)
    data = runs.read_json(path)
    if data.get("format") != REPORT_FORMAT or "clean_accuracy" not in data:
        raise runs.RunError(
            f"{path}: not a robustness report of this larq-lipschitz version "
            f"(format {data.get('format')!r}, this one reads {REPORT_FORMAT})."
        )
    return data


def accuracy_differences(report: Mapping, other: Mapping) -> dict | None:
    """Setting by setting, how the accuracies of two reports differ (`report - other`).

    Meant for a deployed model's report against its Keras model's: with the same seed,
    batch size and images, both saw exactly the same perturbed batches, so every
    difference comes from the conversion (a sign flipped by float rounding, see
    `export.verify`). Reports of other images are not compared.

    # Returns
        None when the two reports differ in `seed`, `batch_size` or `num_examples`, or
        share no setting; else `{"settings": n, "clean": difference, "max_abs": largest
        |difference|, "mean_abs": mean |difference|, "worst": {"family", "name",
        "severity", "difference"}}` over the clean accuracy and every noise and
        corruption setting present in both.
    """
    for key in ("seed", "batch_size", "num_examples"):
        if report.get(key) != other.get(key):
            return None

    def settings(rep: Mapping) -> dict[tuple, float]:
        return {
            (r["family"], r["name"], float(r["severity"])): float(r["accuracy"])
            for r in csv_rows(rep)
            if r["family"] in ("clean", "noise", "corruption")
        }

    mine, theirs = settings(report), settings(other)
    shared = [key for key in mine if key in theirs]
    if not shared:
        return None
    differences = {key: mine[key] - theirs[key] for key in shared}
    worst = max(shared, key=lambda key: abs(differences[key]))
    absolute = [abs(d) for d in differences.values()]
    return {
        "settings": len(shared),
        "clean": differences.get(("clean", "clean", 0.0)),
        "max_abs": max(absolute),
        "mean_abs": float(np.mean(absolute)),
        "worst": {
            "family": worst[0],
            "name": worst[1],
            "severity": worst[2],
            "difference": differences[worst],
        },
    }


def csv_rows(report: Mapping) -> list[dict]:
    """The rows of `robustness.csv`: one per perturbation and severity or level.

    `family` is `clean`, `noise` (additive noise; `severity` holds its level),
    `corruption` (CIFAR-10-C; `severity` 1..5), `attack` (`name` fgsm or pgd, `severity`
    holds epsilon in [0, 1] pixel scale) or `certified` (`name` ibp, `severity` holds
    epsilon, `accuracy` the certified accuracy).
    """
    rows = [
        {
            "family": "clean",
            "name": "clean",
            "severity": 0,
            "accuracy": report["clean_accuracy"],
        }
    ]
    for r in (report.get("noise") or {}).get("results") or []:
        rows.append(
            {
                "family": "noise",
                "name": r["family"],
                "severity": r["level"],
                "accuracy": r["accuracy"],
            }
        )
    for r in _corruption_rows(report):
        rows.append(
            {
                "family": "corruption",
                "name": r["name"],
                "severity": r["severity"],
                "accuracy": r["accuracy"],
            }
        )
    for r in (report.get("attacks") or {}).get("results") or []:
        rows.append(
            {
                "family": "attack",
                "name": r["method"],
                "severity": r["epsilon"],
                "accuracy": r["accuracy"],
            }
        )
    for r in (report.get("certified") or {}).get("results") or []:
        rows.append(
            {
                "family": "certified",
                "name": "ibp",
                "severity": r["epsilon"],
                "accuracy": r["certified_accuracy"],
            }
        )
    return rows


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
    runs.atomic_write_bytes(path, data)  # temporary file, renamed; the usual file mode


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _curves(rows: list[dict], key: str, x: str, clean: float) -> list[tuple]:
    """One `(label, xs, accuracies)` line per distinct `row[key]`, starting at clean."""
    lines = []
    for label in dict.fromkeys(r[key] for r in rows):
        mine = sorted((r for r in rows if r[key] == label), key=lambda r: r[x])
        lines.append(
            (
                label,
                [0] + [r[x] for r in mine],
                [clean] + [r["accuracy"] for r in mine],
            )
        )
    return lines


def _severity_figure(report: Mapping):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clean = report["clean_accuracy"]
    panels: list[tuple[str, str, list[tuple[str, list, list]]]] = []
    noise = (report.get("noise") or {}).get("results") or []
    if noise:
        lines = _curves(noise, "family", "level", clean)
        panels.append(("additive noise", "level (pixel scale; 0 = clean)", lines))
    rows = _corruption_rows(report)
    for category in CORRUPTION_CATEGORIES:
        lines = _curves(
            [r for r in rows if _CATEGORY.get(r["name"]) == category],
            "name",
            "severity",
            clean,
        )
        if lines:
            panels.append((f"corruptions: {category}", "severity (0 = clean)", lines))
    other = [r for r in rows if r["name"] not in _CATEGORY]
    if other:
        lines = _curves(other, "name", "severity", clean)
        panels.append(("corruptions: other", "severity (0 = clean)", lines))
    attacks = (report.get("attacks") or {}).get("results") or []
    certified = (report.get("certified") or {}).get("results") or []
    if attacks or certified:
        lines = []
        for method in dict.fromkeys(r["method"] for r in attacks):
            mine = sorted(
                (r for r in attacks if r["method"] == method),
                key=lambda r: r["epsilon"],
            )
            lines.append(
                (
                    method,
                    [0.0] + [r["epsilon"] * 255 for r in mine],
                    [clean] + [r["accuracy"] for r in mine],
                )
            )
        if certified:
            mine = sorted(certified, key=lambda r: r["epsilon"])
            lines.append(
                (
                    "certified (IBP)",
                    [r["epsilon"] * 255 for r in mine],
                    [r["certified_accuracy"] for r in mine],
                )
            )
        panels.append(("L-inf attacks", "epsilon (x 1/255; 0 = clean)", lines))
    if not panels:
        panels.append(("clean", "", [("clean", [0], [clean])]))

    columns = min(3, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.6 * columns, 3.5 * rows_n))
    FigureCanvasAgg(fig)
    for i, (title, xlabel, lines) in enumerate(panels):
        ax = fig.add_subplot(rows_n, columns, i + 1)
        for label, xs, ys in lines:
            ax.plot(xs, ys, "o-", markersize=3, label=label)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="best")
    what = ""
    if _is_deployed_report(report):
        what = f"deployed {pathlib.Path(report['evaluated']['path']).name}: "
    fig.suptitle(
        f"{what}accuracy vs severity ({report['num_examples']} test images, clean "
        f"{clean:.3f})",
        fontsize="medium",
    )
    fig.tight_layout()
    return fig


def _corruption_figure(report: Mapping, errors: Mapping | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    section = report["corruptions"]
    per = section["per_corruption"]
    names = list(per)
    colors = {"noise": "C0", "blur": "C1", "weather": "C2", "digital": "C3"}
    fig = Figure(figsize=(7.5, 0.32 * len(names) + 1.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = np.arange(len(names))[::-1]
    ax.barh(
        ys,
        [per[n] for n in names],
        color=[colors.get(_CATEGORY.get(n), "C4") for n in names],
    )
    held_out = set(perturbations.EXTRA_CORRUPTIONS)
    labels = [f"{n} *" if n in held_out else n for n in names]
    ax.set_yticks(ys, labels, fontsize="small")
    ax.axvline(
        report["clean_accuracy"], color="k", linestyle="--", linewidth=1, label="clean"
    )
    mca = section.get("mean_corruption_accuracy")
    if mca is not None:
        ax.axvline(
            mca, color="gray", linestyle=":", linewidth=1.5, label="mean (standard)"
        )
    ce = (errors or {}).get("corruption_error") or {}
    for y, name in zip(ys, names, strict=True):
        text = f"{per[name]:.3f}"
        if ce.get(name) is not None:
            text += f"  CE {ce[name]:.2f}"
        ax.text(per[name] + 0.01, y, text, va="center", fontsize="x-small")
    ax.set_xlim(0, 1.15)
    xlabel = "accuracy (mean over severities)"
    if held_out & set(names):
        xlabel += "; * held-out corruption, not in the mean"
    ax.set_xlabel(xlabel)
    title = f"CIFAR-10-C ({section['source']})"
    if _is_deployed_report(report):
        title = f"deployed {pathlib.Path(report['evaluated']['path']).name}: " + title
    missing = section.get("missing_standard") or {}
    if missing:
        title += "; not evaluated: " + ", ".join(missing)
    if errors and errors.get("mce") is not None:
        title += f"; mCE {errors['mce']:.3f}"
    ax.set_title(title, fontsize="small", wrap=True)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    return fig


def write_robustness(
    report: Mapping,
    run_dir: str | os.PathLike,
    reference: Mapping | str | os.PathLike | None = None,
) -> dict[str, pathlib.Path]:
    """Write `robustness.json`, `robustness.csv` and the plots of a report into `run_dir`.

    A deployed model's report (see `run_suite`) goes to `robustness_deployed.json`,
    `robustness_deployed.csv`, `robustness_deployed_severity.png` and
    `robustness_deployed_corruptions.png` instead (`report_files`); the Keras model's
    files are left alone.

    - `robustness.json`: the report, plus `reference` (where the reference came from and
      its clean accuracy), `corruption_error` {corruption: CE_c}, `mce` and `mce_over`
      when a reference is given (see `corruption_errors`).
    - `robustness.csv`: columns family, name, severity, accuracy; one row per
      perturbation and severity or level (see `csv_rows`).
    - `robustness_severity.png`: accuracy against severity, one panel per family
      (additive noise against its level, each CIFAR-10-C category against severity,
      attacks and certified accuracy against epsilon), severity 0 being clean.
    - `robustness_corruptions.png`: a bar per corruption (mean over severities), with
      the clean and mean corruption accuracies and each CE; only when the report holds
      corruption results.

    Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no
    display), and every file is written to a temporary file and renamed.

    # Arguments
        report: the dict returned by `run_suite`.
        run_dir: the folder to write into (created if missing).
        reference: the report of a reference model, or the run folder (or
            `robustness.json`) that holds it; None for no corruption error.

    # Returns
        `{"json": path, "csv": path, "severity_png": path, "corruptions_png": path}`
        (the last only when written).

    # Raises
        ValueError: for a report without `clean_accuracy`, or a reference without
            corruption results.
        runs.RunError: when a reference path holds no readable report.

    # Example
    ```python
    write_robustness(report, "runs/l1inf", reference="runs/baseline")
    ```
    """
    if not isinstance(report, Mapping) or "clean_accuracy" not in report:
        raise ValueError("write_robustness: report must be the dict run_suite returns.")
    data = dict(report)
    errors = None
    if reference is not None:
        source = None
        if not isinstance(reference, Mapping):
            source = str(reference)
            reference = read_robustness(reference)
        errors = corruption_errors(report, reference)
        data["reference"] = {
            "source": source,
            "clean_accuracy": reference.get("clean_accuracy"),
            "num_examples": reference.get("num_examples"),
            "seed": reference.get("seed"),
            "corruption_source": (reference.get("corruptions") or {}).get("source"),
        }
        data.update(errors)
        if reference.get("num_examples") != report.get("num_examples") or (
            (reference.get("corruptions") or {}).get("source")
            != (report.get("corruptions") or {}).get("source")
        ):
            log.warning(
                "the reference report was evaluated on other images (%s images, %s "
                "corruptions) than this one (%s, %s); its corruption errors compare "
                "different test sets",
                reference.get("num_examples"),
                (reference.get("corruptions") or {}).get("source"),
                report.get("num_examples"),
                (report.get("corruptions") or {}).get("source"),
            )
    out = pathlib.Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = report_files(report)
    paths = {"json": out / names["json"], "csv": out / names["csv"]}

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))

    figures = {"severity_png": (out / names["severity_png"], _severity_figure(report))}
    if _corruption_rows(report):
        figures["corruptions_png"] = (
            out / names["corruptions_png"],
            _corruption_figure(report, errors),
        )
    images = {key: (path, _png(fig)) for key, (path, fig) in figures.items()}
    del figures

    runs.atomic_write_text(paths["csv"], text.getvalue())
    for key, (path, png) in images.items():
        _write_bytes(path, png)
        paths[key] = path
    runs.atomic_write_json(paths["json"], data)  # last: the report marks a complete set
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
