"""Accuracy of a classifier, clean and under perturbations in [0, 1] pixel space."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import tensorflow as tf

log = logging.getLogger(__name__)

#: Gaussian noise levels reported by `larq-lipschitz train` (standard deviation in [0, 1]
#: pixel scale, added before the model's own normalization).
DEFAULT_NOISE_SIGMAS = (0.02, 0.05, 0.1)


def outputs_probabilities(model: tf.keras.Model) -> bool:
    """Whether the model ends in a softmax (larq-zoo models do) rather than logits."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "") or type(last).__name__
    return name.lower() == "softmax"


def accuracy(
    model: tf.keras.Model,
    dataset: tf.data.Dataset,
    perturb: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
) -> float:
    """Top-1 accuracy of `model` on batched `(images, labels)`.

    # Arguments
        model: a classifier on [0, 1] images.
        dataset: batched `(images, labels)` with integer labels.
        perturb: optional `perturb(images, batch_index) -> images`, applied to every batch
            inside the input pipeline (so it runs in the graph, batched).

    # Returns
        The fraction of correctly classified examples, a Python float.
    """
    if perturb is not None:
        dataset = dataset.enumerate().map(
            lambda i, batch: (perturb(batch[0], i), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)

    @tf.function
    def count(images, labels):
        scores = model(images, training=False)
        predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        hits = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64))
        return hits, tf.size(labels, out_type=tf.int64)

    correct = total = 0
    for images, labels in dataset:
        hits, n = count(images, labels)
        correct += int(hits)
        total += int(n)
    if total == 0:
        raise ValueError("accuracy: the dataset is empty.")
    return correct / total


def gaussian_noise_fn(
    sigma: float, seed: int = 0
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`perturb(images, batch_index)` adding N(0, sigma^2) pixel noise, then clipping to [0, 1].

    The noise of batch `i` is drawn from the stateless seed `(seed, i)`, so two evaluations
    with the same seed see the same noise.
    """
    from larq_lipschitz import perturbations

    def perturb(images, batch_index):
        return perturbations.add_noise(
            images,
            "gaussian",
            sigma,
            seed=tf.stack([tf.cast(seed, tf.int64), batch_index]),
        )

    return perturb


def noise_report(
    model: tf.keras.Model,
    dataset: tf.data.Dataset,
    sigmas: Iterable[float] = DEFAULT_NOISE_SIGMAS,
    seed: int = 0,
) -> dict[str, float]:
    """Clean accuracy and accuracy under Gaussian noise of each `sigma`.

    # Returns
        `{"clean": acc, "gaussian_0.02": acc, ...}` plus `"test_seconds"`, the wall time of
        the clean pass.
    """
    start = time.perf_counter()
    report = {"clean": accuracy(model, dataset)}
    report["test_seconds"] = time.perf_counter() - start
    for sigma in sigmas:
        report[f"gaussian_{sigma:g}"] = accuracy(
            model, dataset, gaussian_noise_fn(sigma, seed)
        )
        log.info(
            "accuracy under gaussian noise sigma=%g: %.4f",
            sigma,
            report[f"gaussian_{sigma:g}"],
        )
    return report
