"""Training step time of a binarized ResNet-20 under each Lipschitz control, side by side.

    python benchmarks/bench_controls.py [--batch-size 128] [--steps 20] [--rounds 3]

All models are built in one process and timed in interleaved rounds (none, l1inf, ...,
none, l1inf, ...) on the same CIFAR-sized batches, so that machine load affects them
alike. Prints the median step time of each and its ratio to `none`, and the ratio
lcr / l1inf (the method's claim is that L1,inf costs less time per epoch than LCR).
Writes the figures to `--json` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import larq_lipschitz
from larq_lipschitz import models
from larq_lipschitz.apply import apply_lipschitz
from larq_lipschitz.lcr import LCRModel

import numpy as np
import tensorflow as tf


def build(name: str) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    model = models.get("resnet20")
    if name == "l1inf":
        model = apply_lipschitz(model, regularizer=larq_lipschitz.L1InfLipschitz(1e-5))
    elif name == "constraint":
        model = apply_lipschitz(
            model, constraint=larq_lipschitz.L1InfConstraint(100.0, clip_value=1.0)
        )
    elif name == "spectral":
        model = apply_lipschitz(
            model, regularizer=larq_lipschitz.SpectralNormLipschitz(1e-4)
        )
    elif name == "scale-aware":
        larq_lipschitz.add_scale_aware_penalty(model, 1e-5)
    elif name == "lcr":
        teacher = models.get("resnet20", weight_bits=32, activation_bits=32)
        model = LCRModel(model, teacher, alpha=3.2)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--controls", default="none,l1inf,constraint,spectral,scale-aware,lcr"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    names = args.controls.split(",")

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch_size, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, args.batch_size).astype("int32")
    data = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)

    built = {name: build(name) for name in names}
    for model in built.values():  # trace and warm up
        model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name, model in built.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
            seconds[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    step = {name: statistics.median(v) for name, v in seconds.items()}
    base = step.get("none")
    print(f"\nResNet-20 1/1, batch {args.batch_size}, median of {args.rounds} rounds")
    print(f"{'control':12s} {'ms/step':>9s} {'vs none':>8s}")
    for name in names:
        ratio = f"{step[name] / base:8.3f}" if base else "       -"
        print(f"{name:12s} {1000 * step[name]:9.1f} {ratio}")
    figures = {"batch_size": args.batch_size, "seconds_per_step": step}
    if base:
        figures["ratio_to_none"] = {n: step[n] / base for n in names}
    if "lcr" in step and "l1inf" in step:
        figures["lcr_over_l1inf"] = step["lcr"] / step["l1inf"]
        print(
            f"\nlcr / l1inf time per step (= per epoch): {figures['lcr_over_l1inf']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
