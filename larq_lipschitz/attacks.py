"""L-infinity gradient attacks (FGSM, PGD) on Keras classifiers of [0, 1] images.

The attacks maximize an objective of the model's scores for the true label (by default
the margin max_{j != y} s_j - s_y, optionally the cross-entropy) inside the box
{x' : ||x' - x||_inf <= epsilon} intersected with the pixel range [0, 1]^d; epsilon and
the step size are in [0, 1] pixel units, so the model must take [0, 1] pixels (put any
normalization inside the model). Gradients are whatever `tf.GradientTape` returns:
through Larq quantizers these are the straight-through estimates, not the gradient of
the deployed sign network, which is zero almost everywhere.

**Limitation.** Gradient attacks on sign (binarized) networks can underestimate their
vulnerability: the straight-through gradient is a proxy, and the true loss surface is
piecewise constant, so PGD may miss adversarial points that exist. The accuracy under
attack returned here is an upper bound on the true robust accuracy, never a
certificate. Use sound verification (interval bound propagation through the binarized
layers) for a lower bound, and read a large gap between the two as a warning sign.

```python
import larq_lipschitz.attacks as la

accuracy = la.attack_accuracy(model, test_batches, epsilon=2 / 255, steps=10, restarts=2)
```
"""

import dataclasses
import logging
import math

import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = ["fgsm", "pgd", "attack_accuracy"]

_METHODS = ("fgsm", "pgd")
_LOSSES = ("margin", "cross_entropy")


# --------------------------------------------------------------------------------------
# Checks and the loss
# --------------------------------------------------------------------------------------


def _check_epsilon(epsilon: float, caller: str) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise ValueError(
            f"{caller}: epsilon must be a number in [0, 1], got {epsilon!r}."
        )
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or not 0 <= epsilon <= 1:
        raise ValueError(
            f"{caller}: epsilon must be a finite number in [0, 1] (pixel units), got {epsilon}."
        )
    return epsilon


def _check_count(value: int, what: str, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {what} must be a positive integer, got {value!r}.")
    return value


def _check_step_size(
    step_size: float | None, epsilon: float, steps: int, caller: str
) -> float:
    if step_size is None:
        return 2.5 * epsilon / steps
    if isinstance(step_size, bool) or not isinstance(step_size, int | float):
        raise ValueError(
            f"{caller}: step_size must be a number > 0, got {step_size!r}."
        )
    step_size = float(step_size)
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(
            f"{caller}: step_size must be a finite number > 0, got {step_size}."
        )
    return step_size


def _sparse_labels(labels: tf.Tensor) -> tf.Tensor:
    """Class indices from (batch,), (batch, 1) or one-hot (batch, classes) labels."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2:
        if labels.shape[-1] == 1:
            labels = labels[:, 0]
        else:
            labels = tf.argmax(labels, axis=-1)
    if labels.shape.rank != 1:
        raise ValueError(
            f"labels must have shape (batch,), (batch, 1) or (batch, classes), got {labels.shape}."
        )
    return tf.cast(labels, tf.int32)


def _per_example_loss(
    outputs: tf.Tensor, labels: tf.Tensor, from_logits: bool | None, loss: str
) -> tf.Tensor:
    """Per-example attack objective on scores s (logits, or log-probabilities when the
    outputs are probabilities):

    - `"margin"`: max_{j != y} s_j - s_y (Carlini & Wagner); positive means misclassified.
    - `"cross_entropy"`: -log softmax(s)_y.

    With `from_logits=None` the outputs are read as probabilities when every row is
    non-negative and sums to 1 (to 1e-3), else as logits. Log-probabilities differ from
    the logits behind them by a per-example constant, so both losses agree for the two
    readings, except that saturated probabilities lose their gradient.
    """
    outputs = tf.cast(outputs, tf.float32)
    if outputs.shape.rank != 2 or (
        outputs.shape[-1] is not None and outputs.shape[-1] < 2
    ):
        raise ValueError(
            "the model must output (batch, classes) scores with at least two classes, "
            f"got shape {outputs.shape}."
        )

    def objective(scores):
        if loss == "cross_entropy":
            return tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=scores
            )
        true = tf.gather(scores, labels, axis=1, batch_dims=1)
        is_true = tf.one_hot(
            labels, tf.shape(scores)[1], on_value=True, off_value=False
        )
        runner_up = tf.reduce_max(tf.where(is_true, tf.float32.min, scores), axis=1)
        return runner_up - true

    def from_scores():
        return objective(outputs)

    def from_probabilities():
        return objective(tf.math.log(tf.clip_by_value(outputs, 1e-30, 1.0)))

    if from_logits is True:
        return from_scores()
    if from_logits is False:
        return from_probabilities()
    looks_like_probabilities = tf.reduce_all(outputs >= 0) & tf.reduce_all(
        tf.abs(tf.reduce_sum(outputs, axis=-1) - 1) < 1e-3
    )
    return tf.cond(looks_like_probabilities, from_probabilities, from_scores)


def _evaluate(model, x, labels, from_logits, loss):
    """(loss, misclassified, gradient of the summed loss) at x."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = model(x, training=False)
        objective = _per_example_loss(outputs, labels, from_logits, loss)
        total = tf.reduce_sum(
            objective
        )  # examples are independent: per-example gradients
    gradient = tape.gradient(total, x)
    if gradient is None:
        raise ValueError(
            "the model's output does not depend differentiably on its input; "
            "a gradient attack cannot run."
        )
    predicted = tf.argmax(tf.cast(outputs, tf.float32), axis=-1, output_type=tf.int32)
    return objective, predicted != labels, gradient


def _keep_worse(best, candidate):
    """Per example, keep the candidate if it misclassifies and the best does not, or if
    both agree on that and the candidate's loss is higher."""
    best_x, best_loss, best_wrong = best
    x, loss, wrong = candidate
    take = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
    return (
        tf.where(_expand(take, x), x, best_x),
        tf.where(take, loss, best_loss),
        best_wrong | wrong,
    )


def _expand(mask: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    return tf.reshape(mask, [-1] + [1] * (like.shape.rank - 1))


def _project(x, clean, epsilon):
    return tf.clip_by_value(
        tf.clip_by_value(x, clean - epsilon, clean + epsilon), 0.0, 1.0
    )


def _as_images(images: tf.Tensor, caller: str) -> tf.Tensor:
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    if not images.dtype.is_floating:
        raise ValueError(
            f"{caller}: images must be float pixels in [0, 1] or uint8, got {images.dtype}."
        )
    return tf.cast(images, tf.float32)


# --------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    epsilon: float
    steps: int
    step_size: float
    restarts: int
    random_start: bool
    from_logits: bool | None
    loss: str


def _check(
    caller: str,
    epsilon: float,
    *,
    steps: int = 1,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    seed: int = 0,
    from_logits: bool | None = None,
    loss: str = "margin",
) -> _Settings:
    epsilon = _check_epsilon(epsilon, caller)
    steps = _check_count(steps, "steps", caller)
    restarts = _check_count(restarts, "restarts", caller)
    step_size = _check_step_size(step_size, epsilon, steps, caller)
    if restarts > 1 and not random_start:
        raise ValueError(
            f"{caller}: restarts={restarts} without random_start would repeat the same "
            "deterministic attack; set random_start=True or restarts=1."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{caller}: seed must be an integer, got {seed!r}.")
    if from_logits not in (None, True, False):
        raise ValueError(
            f"{caller}: from_logits must be None, True or False, got {from_logits!r}."
        )
    if loss not in _LOSSES:
        raise ValueError(
            f"{caller}: unknown loss {loss!r}; valid losses are {list(_LOSSES)}."
        )
    return _Settings(
        epsilon, steps, step_size, restarts, bool(random_start), from_logits, loss
    )


def _key(seed: int, batch_index) -> tf.Tensor:
    key = tf.constant([seed, 0x5067D], tf.int64)
    return tf.random.experimental.stateless_fold_in(key, tf.cast(batch_index, tf.int64))


def _attack(model, clean, labels, key, settings: _Settings) -> tf.Tensor:
    """Shared PGD core; FGSM is one step of size epsilon from the clean point."""
    eps = settings.epsilon

    def evaluate(x):
        return _evaluate(model, x, labels, settings.from_logits, settings.loss)

    value, wrong, gradient = evaluate(clean)
    best = (clean, value, wrong)
    clean_gradient = gradient
    for restart in range(settings.restarts):
        if settings.random_start:
            # Restart r draws from (key, r): the first restarts do not depend on how
            # many there are, so more restarts can only find a worse point.
            start_key = tf.random.experimental.stateless_fold_in(key, restart)
            noise = tf.random.stateless_uniform(
                tf.shape(clean), start_key, minval=-eps, maxval=eps
            )
            x = _project(clean + noise, clean, eps)
            value, wrong, gradient = evaluate(x)
            best = _keep_worse(best, (x, value, wrong))
        else:
            x, gradient = clean, clean_gradient

        def body(step, x, gradient, best_x, best_value, best_wrong):
            x = _project(x + settings.step_size * tf.sign(gradient), clean, eps)
            value, wrong, gradient = evaluate(x)
            best_x, best_value, best_wrong = _keep_worse(
                (best_x, best_value, best_wrong), (x, value, wrong)
            )
            return step + 1, x, gradient, best_x, best_value, best_wrong

        _, x, gradient, *best = tf.while_loop(
            lambda step, *_: step < settings.steps,
            body,
            (tf.constant(0), x, gradient, *best),
        )
        best = tuple(best)
    return best[0]


def fgsm(
    model: tf.keras.Model,
    images: tf.Tensor,
    labels: tf.Tensor,
    epsilon: float,
    *,
    loss: str = "margin",
    from_logits: bool | None = None,
) -> tf.Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015) in the L-infinity ball.

    x' = clip(x + epsilon * sign(grad_x L(f(x), y)), 0, 1)

    Per example the clean image is returned instead when the step does not make the
    objective worse, so the attack never helps the model.

    # Arguments
        model: Keras classifier taking [0, 1] pixels and returning (batch, classes)
            logits or probabilities.
        images: (batch, ...) float pixels in [0, 1] (uint8 is divided by 255).
        labels: integer labels (batch,) or (batch, 1), or one-hot (batch, classes).
        epsilon: L-infinity radius in [0, 1] pixel units.
        loss: `"margin"` (max_{j != y} s_j - s_y) or `"cross_entropy"` (the loss of
            the original FGSM).
        from_logits: whether the outputs are logits; None decides per batch (rows that
            are non-negative and sum to 1 are read as probabilities).

    # Returns
        float32 adversarial images with ||x' - x||_inf <= epsilon, in [0, 1].

    # Raises
        ValueError: for an invalid epsilon, loss, labels or model output.

    ```python
    adversarial = fgsm(model, images, labels, epsilon=8 / 255)
    ```
    """
    settings = _check(
        "fgsm", epsilon, random_start=False, from_logits=from_logits, loss=loss
    )
    settings = dataclasses.replace(settings, step_size=settings.epsilon)
    x = _as_images(images, "fgsm")
    return _attack(model, x, _sparse_labels(labels), _key(0, 0), settings)


def pgd(
    model: tf.keras.Model,
    images: tf.Tensor,
    labels: tf.Tensor,
    epsilon: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    seed: int = 0,
    batch_index: int | tf.Tensor = 0,
    loss: str = "margin",
    from_logits: bool | None = None,
) -> tf.Tensor:
    """Projected gradient ascent (Madry et al., 2018) in the L-infinity ball.

    x_0 = clip(x + u, 0, 1), u ~ U(-epsilon, epsilon)^d (or x_0 = x without random start)
    x_{t+1} = P(x_t + step_size * sign(grad_x L(f(x_t), y)))

    where P clips to [x - epsilon, x + epsilon] and then to [0, 1]. The default
    objective L is the margin max_{j != y} s_j - s_y of the scores s (logits or
    log-probabilities); `loss="cross_entropy"` gives Madry et al.'s loss. Each restart
    draws a new random start. Per example the worst point seen is kept: a
    misclassified point beats a correctly classified one, otherwise the larger
    objective wins; every iterate of every restart and the clean image itself are
    candidates, so the attack never does better for the model than no attack.

    # Arguments
        model: Keras classifier taking [0, 1] pixels and returning (batch, classes)
            logits or probabilities.
        images: (batch, ...) float pixels in [0, 1] (uint8 is divided by 255).
        labels: integer labels (batch,) or (batch, 1), or one-hot (batch, classes).
        epsilon: L-infinity radius in [0, 1] pixel units.
        steps: number of gradient steps per restart (>= 1).
        step_size: step in pixel units; default 2.5 * epsilon / steps.
        restarts: number of random restarts (>= 1; more than 1 needs random_start).
        random_start: start from a uniform random point of the ball.
        seed: integer seed of the random starts.
        batch_index: integer folded into the seed, so batches get different starts.
        loss: `"margin"` or `"cross_entropy"`.
        from_logits: whether the outputs are logits; None decides per batch.

    # Returns
        float32 adversarial images with ||x' - x||_inf <= epsilon, in [0, 1].

    # Raises
        ValueError: for invalid arguments, labels or model output.

    ```python
    adversarial = pgd(model, images, labels, epsilon=8 / 255, steps=20, restarts=3)
    ```
    """
    settings = _check(
        "pgd",
        epsilon,
        steps=steps,
        step_size=step_size,
        restarts=restarts,
        random_start=random_start,
        seed=seed,
        from_logits=from_logits,
        loss=loss,
    )
    x = _as_images(images, "pgd")
    return _attack(model, x, _sparse_labels(labels), _key(seed, batch_index), settings)


def attack_accuracy(
    model: tf.keras.Model,
    dataset: tf.data.Dataset,
    epsilon: float,
    method: str = "pgd",
    steps: int = 10,
    restarts: int = 1,
    seed: int = 0,
    *,
    step_size: float | None = None,
    loss: str = "margin",
    from_logits: bool | None = None,
) -> float:
    """Accuracy of `model` on `dataset` under an L-infinity gradient attack.

    accuracy = (1 / N) sum_i [argmax f(x'_i) = y_i],  x'_i = attack(x_i) in the ball

    An example counts as correct only if the worst point found for it (the clean point
    included) is classified correctly, so the result never exceeds clean accuracy.
    Because gradient attacks can miss adversarial points of a sign network, the result
    is an upper bound on the true robust accuracy (see the module docstring).

    # Arguments
        model: Keras classifier taking [0, 1] pixels.
        dataset: batched `tf.data.Dataset` (or iterable) of `(images, labels, ...)`.
        epsilon: L-infinity radius in [0, 1] pixel units; 0 gives clean accuracy.
        method: `"pgd"` or `"fgsm"` (FGSM ignores steps, restarts, seed, step_size).
        steps: PGD steps per restart.
        restarts: PGD random restarts.
        seed: integer seed; batch i takes its random starts from (seed, i).
        step_size: PGD step in pixel units; default 2.5 * epsilon / steps.
        loss: `"margin"` or `"cross_entropy"`.
        from_logits: whether the outputs are logits; None decides per batch.

    # Returns
        The accuracy under attack as a Python float in [0, 1].

    # Raises
        ValueError: for an unknown method, invalid arguments or an empty dataset.

    ```python
    robust = attack_accuracy(model, test_batches, epsilon=2 / 255, steps=20, restarts=2)
    ```
    """
    if method not in _METHODS:
        raise ValueError(
            f"attack_accuracy: unknown method {method!r}; valid methods are {list(_METHODS)}."
        )
    settings = _check(
        "attack_accuracy",
        epsilon,
        steps=steps,
        step_size=step_size,
        restarts=restarts,
        seed=seed,
        from_logits=from_logits,
        loss=loss,
    )
    if method == "fgsm":
        settings = dataclasses.replace(
            settings,
            steps=1,
            step_size=settings.epsilon,
            restarts=1,
            random_start=False,
        )

    @tf.function(reduce_retracing=True)
    def correct_in_batch(images, labels, batch_index):
        x = _as_images(images, "attack_accuracy")
        y = _sparse_labels(labels)
        adversarial = _attack(model, x, y, _key(seed, batch_index), settings)
        outputs = tf.cast(model(adversarial, training=False), tf.float32)
        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(predicted == y, tf.int64)), tf.size(y, tf.int64)

    correct = total = 0
    for batch_index, batch in enumerate(dataset):
        images, labels = batch[0], batch[1]
        hits, count = correct_in_batch(
            images, labels, tf.constant(batch_index, tf.int64)
        )
        correct += int(hits)
        total += int(count)
    if total == 0:
        raise ValueError("attack_accuracy: the dataset yielded no examples.")
    accuracy = correct / total
    log.info(
        "%s accuracy at epsilon=%g (steps=%d, restarts=%d, loss=%s): %.4f on %d examples",
        method,
        settings.epsilon,
        settings.steps,
        settings.restarts,
        settings.loss,
        accuracy,
        total,
    )
    return accuracy
