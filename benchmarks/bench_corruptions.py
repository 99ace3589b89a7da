"""Throughput of the CIFAR-10-C corruption suite through a model vs plain inference.

The suite is N test images x every synthesized corruption x severities 1-5, each batch
corrupted inside the `tf.data` pipeline (parallel map, prefetch) and classified by the
model. Plain inference runs the same batches, uncorrupted, through the same compiled
model. The printed ratio is suite rate / plain rate (images per second); the target is
>= 0.8, i.e. corrupting costs at most a quarter of the inference time it overlaps with.

    python benchmarks/bench_corruptions.py --images 2000 --batch-size 250
    python benchmarks/bench_corruptions.py --per-corruption   # also the map-only rates

The model defaults to `larq_lipschitz.models.get("resnet20")` (1/1 bits, untrained: the
rate does not depend on the weights) and falls back to a small inline Larq network when
the models module is unavailable. Real CIFAR-10 test images are read from the binary
archive when it is found, random images otherwise (the rates barely differ).
"""

import argparse
import os
import pathlib
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)

# isort: split
from larq_lipschitz import perturbations

import larq as lq
import numpy as np
import tensorflow as tf

ARCHIVE = pathlib.Path(
    os.environ.get(
        "LARQ_LIPSCHITZ_CIFAR10",
        pathlib.Path(__file__).resolve().parents[2]
        / "shared"
        / "data"
        / "cifar10"
        / "cifar-10-binary.tar.gz",
    )
)


def cifar_test_images(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first `count` CIFAR-10 test images (uint8) and labels, or random ones."""
    record = 1 + 3 * 32 * 32
    if ARCHIVE.is_file() and count <= 10_000:
        with tarfile.open(ARCHIVE) as archive:
            member = archive.extractfile("cifar-10-batches-bin/test_batch.bin")
            raw = member.read(record * count)
        rows = np.frombuffer(raw, np.uint8).reshape(count, record)
        images = rows[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), rows[:, 0].astype(np.int32), str(ARCHIVE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, count, dtype=np.int32), "random images"


def small_bnn() -> tf.keras.Model:
    """A small VGG-like 1/1 network, used when larq_lipschitz.models is unavailable."""
    binary = dict(
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
        padding="same",
    )
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            layers.Conv2D(
                64, 3, padding="same", use_bias=False, input_shape=(32, 32, 3)
            ),
            layers.BatchNormalization(),
            lq.layers.QuantConv2D(64, 3, **binary),
            layers.MaxPooling2D(),
            layers.BatchNormalization(),
            lq.layers.QuantConv2D(128, 3, **binary),
            layers.MaxPooling2D(),
            layers.BatchNormalization(),
            lq.layers.QuantConv2D(128, 3, **binary),
            layers.MaxPooling2D(),
            layers.BatchNormalization(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )


def build_model(name: str) -> tuple[tf.keras.Model, str]:
    if name != "inline":
        try:
            from larq_lipschitz import models
        except ImportError as error:
            print(f"larq_lipschitz.models unavailable ({error}); using the inline BNN")
        else:
            return models.get(name), name
    return small_bnn(), "inline small BNN"


def run(model_fn, dataset) -> tuple[float, int, int]:
    """Seconds, images and correct predictions of one pass over `dataset`."""
    correct = seen = 0
    start = time.perf_counter()
    for images, labels in dataset:
        hits, count = model_fn(images, labels)
        correct += int(hits)
        seen += int(count)
    return time.perf_counter() - start, seen, correct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="test images (N)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--model", default="resnet20", help="registry name, or 'inline'"
    )
    parser.add_argument(
        "--corruptions",
        nargs="*",
        default=sorted(perturbations.CORRUPTIONS),
        help="corruptions to run (default: every synthesized one)",
    )
    parser.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument(
        "--map-threads",
        type=int,
        default=0,
        help="intra-op threads of one corruption call (0: TensorFlow's default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating timed passes"
    )
    parser.add_argument(
        "--per-corruption",
        action="store_true",
        help="also time each corruption alone in the pipeline, without the model",
    )
    args = parser.parse_args(argv)

    images, labels, source = cifar_test_images(args.images)
    model, model_name = build_model(args.model)
    print(
        f"model: {model_name}; images: {args.images} from {source}; batch {args.batch_size}"
    )
    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}")

    @tf.function(reduce_retracing=True)
    def classify(x, y):
        scores = model(x, training=False)
        predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(predicted == y, tf.int32)), tf.size(y)

    base = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size)
    base = base.cache()
    pairs = [(n, s) for n in args.corruptions for s in args.severities]

    def corrupted(name, severity):
        fn = perturbations.perturbation_fn(name, severity, seed=0)
        return base.map(lambda x, y: (fn(x), y), num_parallel_calls=tf.data.AUTOTUNE)

    # One pipeline over (pair, batch) elements with a single parallel map that picks the
    # corruption by index, so batches of different pairs are corrupted concurrently
    # (concatenating one mapped dataset per pair would serialize at every boundary).
    functions = [perturbations.perturbation_fn(n, s, seed=0) for n, s in pairs]

    def corrupt_any(pair, x, y):
        branches = [lambda f=f: f(x) for f in functions]
        return tf.switch_case(tf.cast(pair, tf.int32), branches), y

    suite = tf.data.Dataset.range(len(pairs)).flat_map(
        lambda pair: base.map(lambda x, y: (pair, x, y))
    )
    suite = suite.map(corrupt_any, num_parallel_calls=tf.data.AUTOTUNE)
    # Optionally cap the intra-op threads of one corruption call (measured here on 2
    # cores: 1 thread was slower than TensorFlow's default).
    options = tf.data.Options()
    if args.map_threads > 0:
        options.threading.max_intra_op_parallelism = args.map_threads
    suite = suite.with_options(options).prefetch(tf.data.AUTOTUNE)
    plain = base.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    plain = plain.repeat(len(pairs)).prefetch(tf.data.AUTOTUNE)

    # The corruptions were traced when the pipeline was built; trace the model too.
    run(classify, plain.take(2))

    # Alternate the two passes and keep each one's fastest, so that load from other
    # processes on a shared machine distorts the ratio less.
    plain_seconds = suite_seconds = float("inf")
    for _ in range(args.repeats):
        seconds, plain_seen, _ = run(classify, plain)
        plain_seconds = min(plain_seconds, seconds)
        seconds, suite_seen, suite_correct = run(classify, suite)
        suite_seconds = min(suite_seconds, seconds)
    plain_rate = plain_seen / plain_seconds
    suite_rate = suite_seen / suite_seconds
    for label, seen, seconds, rate in (
        ("plain inference ", plain_seen, plain_seconds, plain_rate),
        ("corruption suite", suite_seen, suite_seconds, suite_rate),
    ):
        print(f"{label}: {seen:8d} images in {seconds:7.2f} s = {rate:8.0f} img/s")
    print(f"ratio suite / plain = {suite_rate / plain_rate:.3f}  (target >= 0.8)")
    print(
        f"(accuracy of the untrained model on the suite: {suite_correct / suite_seen:.3f})"
    )

    if args.per_corruption:
        print("\nmap-only rate per corruption (all requested severities, no model):")
        for name in args.corruptions:
            data = corrupted(name, args.severities[0])
            for severity in args.severities[1:]:
                data = data.concatenate(corrupted(name, severity))
            start = time.perf_counter()
            count = sum(int(x.shape[0]) for x, _ in data.prefetch(tf.data.AUTOTUNE))
            seconds = time.perf_counter() - start
            print(f"  {name:18s} {count / seconds:9.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
