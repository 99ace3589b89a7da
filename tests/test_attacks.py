"""FGSM / PGD against closed-form worst cases of linear models, and on a small BNN.

For a linear classifier the loss-maximizing point of the box
{x' : |x' - x| <= eps} ∩ [0, 1]^d is known coordinate by coordinate, so the attacks
can be checked value by value and the robust accuracy computed exactly.
"""

import larq_lipschitz.attacks as la  # before tensorflow: selects Keras 2

# isort: split
import larq as lq
import numpy as np
import pytest
import tensorflow as tf

SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))


def linear_model(weights, bias, softmax=False):
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=SHAPE),
            tf.keras.layers.Dense(
                weights.shape[1], activation="softmax" if softmax else None
            ),
        ]
    )
    model.layers[1].set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return model


def box_minimizer(x, direction, eps):
    """argmin over the box of direction . x': each coordinate moves against its sign."""
    return np.where(direction > 0, np.maximum(0.0, x - eps), np.minimum(1.0, x + eps))


@pytest.fixture(scope="module")
def binary_case():
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.3, (DIM, 2))
    bias = np.array([0.0, 0.05])
    x = rng.random((64, DIM))
    logits = x @ weights + bias
    labels = logits.argmax(1)
    labels[:6] = 1 - labels[:6]  # a few clean mistakes
    return weights, bias, x, labels


def worst_binary(weights, x, labels, eps):
    direction = weights[:, labels].T - weights[:, 1 - labels].T  # (n, d): w_y - w_other
    return box_minimizer(x, direction, eps)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2])
def test_pgd_and_fgsm_reach_the_closed_form_corner(binary_case, eps):
    weights, bias, x, labels = binary_case
    model = linear_model(weights, bias)
    images = x.reshape(-1, *SHAPE)
    expected = worst_binary(weights, x, labels, eps).reshape(images.shape)
    for loss in ("margin", "cross_entropy"):
        found = la.pgd(model, images, labels, eps, steps=10, seed=3, loss=loss).numpy()
        np.testing.assert_allclose(found, expected, atol=1e-6)
    np.testing.assert_allclose(
        la.fgsm(model, images, labels, eps).numpy(), expected, atol=1e-6
    )
    # The same through a softmax output (probabilities are detected and handled).
    soft = linear_model(weights, bias, softmax=True)
    np.testing.assert_allclose(
        la.pgd(soft, images, labels, eps, steps=10).numpy(), expected, atol=1e-6
    )


@pytest.mark.parametrize("method", ["pgd", "fgsm"])
def test_attack_accuracy_equals_exact_robust_accuracy_binary(binary_case, method):
    weights, bias, x, labels = binary_case
    model = linear_model(weights, bias)
    images = x.reshape(-1, *SHAPE).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    for eps in (0.0, 0.02, 0.08):
        corner = worst_binary(weights, x, labels, eps)
        margin = (corner @ weights + bias)[np.arange(len(x)), labels] - (
            corner @ weights + bias
        )[np.arange(len(x)), 1 - labels]
        exact = float((margin > 0).mean())
        got = la.attack_accuracy(model, data, eps, method=method, steps=8, seed=1)
        assert got == pytest.approx(exact, abs=1e-9), (eps, got, exact)
    clean = float(((x @ weights + bias).argmax(1) == labels).mean())
    assert la.attack_accuracy(model, data, 0.0, method=method) == pytest.approx(clean)


@pytest.mark.parametrize(("loss", "gap"), [("margin", 0.01), ("cross_entropy", 0.05)])
def test_pgd_is_sound_and_nearly_optimal_on_a_ten_class_linear_model(loss, gap):
    """Robust accuracy of a linear model is exact: x is robust iff for every other
    class j the box minimum of (w_y - w_j) . x' + b_y - b_j stays positive. PGD cannot
    beat it (soundness) and should come close to it: the margin objective misses at
    most 1 % of the examples here, cross-entropy about 3 % (it follows the runner-up
    class by probability, not the most vulnerable one)."""
    rng = np.random.default_rng(1)
    classes = 10
    weights = rng.normal(0, 0.2, (DIM, classes))
    bias = rng.normal(0, 0.1, classes)
    x = rng.random((200, DIM))
    labels = (x @ weights + bias).argmax(1)
    flip = rng.random(200) < 0.3  # keep some mistakes in the data
    labels[flip] = rng.integers(0, classes, flip.sum())
    model = linear_model(weights, bias)
    images = x.reshape(-1, *SHAPE).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(50)
    clean = float(((x @ weights + bias).argmax(1) == labels).mean())
    for eps in (0.01, 0.03):
        robust = np.ones(len(x), bool)
        for j in range(classes):
            direction = weights[:, labels].T - weights[:, [j]].T
            corner = box_minimizer(x, direction, eps)
            margin = np.einsum("nd,nd->n", corner, direction) + bias[labels] - bias[j]
            robust &= (labels == j) | (margin > 0)
        exact = float(robust.mean())
        got = la.attack_accuracy(
            model, data, eps, steps=20, restarts=2, seed=0, loss=loss
        )
        assert exact <= got + 1e-9 <= clean + 1e-9, (eps, exact, got, clean)
        assert got - exact <= gap + 1e-9, (eps, exact, got)


def tiny_bnn():
    kwargs = dict(
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
    )
    tf.keras.utils.set_random_seed(4)
    return tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(8, 3, padding="same", input_shape=(8, 8, 3)),
            tf.keras.layers.BatchNormalization(),
            lq.layers.QuantConv2D(8, 3, padding="same", **kwargs),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.GlobalAveragePooling2D(),
            lq.layers.QuantDense(10, **kwargs),
        ]
    )


@pytest.fixture(scope="module")
def bnn_case():
    model = tiny_bnn()
    rng = np.random.default_rng(2)
    images = rng.random((48, 8, 8, 3)).astype(np.float32)
    labels = model(images, training=False).numpy().argmax(1)  # clean accuracy 1
    labels[:8] = (labels[:8] + 1) % 10  # except for these
    return model, images, labels


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_bnn_attack_stays_in_the_box(bnn_case, eps):
    model, images, labels = bnn_case
    for adversarial in (
        la.pgd(model, images, labels, eps, steps=5, restarts=2, seed=1).numpy(),
        la.fgsm(model, images, labels, eps).numpy(),
    ):
        assert np.abs(adversarial - images).max() <= eps + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_bnn_straight_through_gradients_drive_the_attack(bnn_case):
    model, images, labels = bnn_case
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    clean = float((model(images, training=False).numpy().argmax(1) == labels).mean())
    assert clean == pytest.approx(40 / 48)
    for eps in (0.02, 0.3):
        got = la.attack_accuracy(model, data, eps, steps=10, restarts=1, seed=0)
        assert got <= clean
    assert got < clean - 0.2  # the sign network is fooled through its STE gradients
    one = la.attack_accuracy(model, data, 0.05, steps=5, restarts=1, seed=7)
    three = la.attack_accuracy(model, data, 0.05, steps=5, restarts=3, seed=7)
    assert three <= one  # restarts only add candidates; the worst is kept per example


def test_labels_in_any_layout_give_the_same_attack(binary_case):
    weights, bias, x, labels = binary_case
    model = linear_model(weights, bias)
    images = x.reshape(-1, *SHAPE)
    reference = la.pgd(model, images, labels, 0.05, seed=2).numpy()
    one_hot = np.eye(2)[labels]
    column = labels[:, None]
    for layout in (one_hot, column):
        np.testing.assert_array_equal(
            la.pgd(model, images, layout, 0.05, seed=2), reference
        )


def test_invalid_arguments(binary_case):
    weights, bias, x, labels = binary_case
    model = linear_model(weights, bias)
    images = x.reshape(-1, *SHAPE)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    with pytest.raises(ValueError, match="unknown method 'cw'"):
        la.attack_accuracy(model, data, 0.1, method="cw")
    for eps in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="epsilon"):
            la.pgd(model, images, labels, eps)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        la.pgd(model, images, labels, 0.1, steps=0)
    with pytest.raises(ValueError, match="random_start"):
        la.pgd(model, images, labels, 0.1, restarts=3, random_start=False)
    with pytest.raises(ValueError, match="step_size"):
        la.pgd(model, images, labels, 0.1, step_size=-1.0)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        la.fgsm(model, images, labels, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="no examples"):
        la.attack_accuracy(model, data.take(0), 0.1)
