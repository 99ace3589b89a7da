"""Interval bound propagation: soundness against strong attacks, exactness where it holds."""

import itertools
import json
import tarfile

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow)
from larq_lipschitz.certify import (
    certify,
    certify_examples,
    interval_bounds,
    write_certification,
)
from larq_lipschitz.layers import ShortcutPad

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

L = tf.keras.layers
SIGN = {
    "input_quantizer": "ste_sign",
    "kernel_quantizer": "ste_sign",
    "kernel_constraint": "weight_clip",
}


def randomize(model, rng, gain=1.0):
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c) * 0.5)
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, size=c))
            if layer.gamma is not None:
                layer.gamma.assign(rng.normal(size=c) * gain)
    return model


def tiny_bnn(rng, residual: bool, classes=4):
    """A 1/1 network on 3x3x1 images: FP stem, binary convs with BatchNorm, binary head."""
    inp = tf.keras.Input((3, 3, 1))
    x = L.Conv2D(4, 2, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    y = lq.layers.QuantConv2D(
        4, 3, padding="same", pad_values=1.0, use_bias=False, **SIGN
    )(x)
    y = L.BatchNormalization()(y)
    x = L.add([x, y]) if residual else y
    x = L.Flatten()(x)
    x = lq.layers.QuantDense(12, use_bias=False, **SIGN)(x)
    x = L.BatchNormalization()(x)
    out = lq.layers.QuantDense(classes, **SIGN)(x)
    return randomize(tf.keras.Model(inp, out), rng)


def labels_of(model, x):
    return np.argmax(model(x, training=False).numpy(), axis=1)


# ----- attacks ------------------------------------------------------------------------


def flipped_by_corners(model, x, y, eps) -> np.ndarray:
    """Exhaustive search over the 2^d corners of the (clipped) box, plus random points."""
    d = int(np.prod(x.shape[1:]))
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=d)), np.float32)
    rng = np.random.default_rng(0)
    flipped = np.zeros(len(x), bool)
    for i in range(len(x)):
        pts = x[i].reshape(1, d) + eps * np.concatenate(
            [signs, rng.uniform(-1, 1, size=(256, d))]
        )
        pts = np.clip(pts, 0.0, 1.0).reshape((-1, *x.shape[1:])).astype("float32")
        flipped[i] = np.any(labels_of(model, pts) != y[i])
    return flipped


def flipped_by_pgd(model, x, y, eps, steps=40, restarts=4, seed=0) -> np.ndarray:
    """PGD on the margin with the straight-through gradient, random restarts."""
    rng = np.random.default_rng(seed)
    x = tf.constant(x, tf.float32)
    lo, hi = tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)
    onehot = tf.one_hot(y, model.output_shape[-1])
    flipped = np.zeros(len(y), bool)

    @tf.function
    def step(xa):
        with tf.GradientTape() as tape:
            tape.watch(xa)
            z = model(xa, training=False)
            true = tf.reduce_sum(z * onehot, axis=1)
            other = tf.reduce_max(z - 1e9 * onehot, axis=1)
            margin = true - other
            total = tf.reduce_sum(margin)
        g = tape.gradient(total, xa)
        return margin, g

    for restart in range(restarts):
        start = 0.0 if restart == 0 else rng.uniform(-eps, eps, size=x.shape)
        xa = tf.clip_by_value(x + tf.cast(start, tf.float32), lo, hi)
        alpha = 2.5 * eps / steps * (1 + restart)
        for _ in range(steps):
            margin, g = step(xa)
            flipped |= margin.numpy() < 0
            xa = tf.clip_by_value(xa - alpha * tf.sign(g), lo, hi)
        flipped |= step(xa)[0].numpy() < 0
    return flipped


# ----- (a) soundness on 1/1 networks ----------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_no_certified_image_is_flipped_on_tiny_bnns(residual):
    rng = np.random.default_rng(11 if residual else 20)
    model = tiny_bnn(rng, residual)
    x = rng.uniform(0, 1, size=(60, 3, 3, 1)).astype("float32")
    y = labels_of(model, x)
    some_certified = some_flipped = False
    for eps in (0.02, 0.06, 0.15):
        (res,) = certify(model, (x, y), [eps])
        assert res["clean_accuracy"] == 1.0
        out = certify_examples(model, x, y, eps, batch_size=7)
        assert out.certified.sum() == res["certified"]
        assert out.undecided.sum() == res["undecided"]
        assert np.all(out.certified == (out.margin > 0))
        certified = out.certified
        flipped = flipped_by_corners(model, x, y, eps) | flipped_by_pgd(
            model, x, y, eps
        )
        assert not np.any(certified & flipped), (
            f"eps={eps}: a certified image was flipped"
        )
        some_certified |= certified.any()
        some_flipped |= flipped.any()
        # undecided signs are counted; a fully decided image is certified iff correct
        assert 0.0 <= res["undecided_fraction"] <= 1.0
    assert some_certified and some_flipped  # both outcomes occur: the test has teeth


@pytest.mark.parametrize("form", ["input_quantizer", "quantizer_layer"])
def test_sign_propagation_is_exact_per_unit(form):
    """sign -> binary dense: the bounds equal the extremes over all corners of the box."""
    rng = np.random.default_rng(12)
    inp = tf.keras.Input((3, 3, 1))
    x = L.Flatten()(inp)
    if form == "input_quantizer":
        out = lq.layers.QuantDense(5, **SIGN)(x)
    else:
        out = L.Dense(5)(lq.quantizers.SteSign()(x))
    model = randomize(tf.keras.Model(inp, out), rng)
    x = rng.uniform(0.3, 0.7, size=(30, 3, 3, 1))
    # shift to straddle the threshold 0 of the sign in some pixels
    x = (x - 0.5).astype("float32")
    eps = 0.1
    b = interval_bounds(model, x - eps, x + eps)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=9)), np.float32)
    for i in range(len(x)):
        corners = (x[i].reshape(1, 9) + eps * signs).reshape(-1, 3, 3, 1)
        z = model(corners).numpy()
        np.testing.assert_allclose(b.lower[i], z.min(0), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(b.upper[i], z.max(0), rtol=1e-6, atol=1e-5)
    straddles = np.any(np.abs(x.reshape(len(x), -1)) < eps, axis=1)
    np.testing.assert_array_equal(b.undecided, straddles)


def test_zero_counts_as_positive_like_larq_sign():
    """An interval [0, u] is a fixed +1 (larq.math.sign(0) = +1), not undecided."""
    inp = tf.keras.Input((2,))
    out = lq.layers.QuantDense(1, use_bias=False, kernel_initializer="ones", **SIGN)(
        inp
    )
    model = tf.keras.Model(inp, out)
    x = np.array([[0.05, 0.5], [0.0, 0.5]], np.float32)
    b = interval_bounds(
        model, np.maximum(x - 0.05, [[0.0, 0.0]]), x + 0.05, tolerance=0.0
    )
    np.testing.assert_array_equal(b.lower.ravel(), [2.0, 2.0])
    np.testing.assert_array_equal(b.undecided, [False, False])
    b = interval_bounds(model, x - 0.06, x + 0.06, tolerance=0.0)
    np.testing.assert_array_equal(b.lower.ravel(), [0.0, 0.0])
    np.testing.assert_array_equal(b.undecided, [True, True])


def test_margin_through_dense_and_batchnorm_is_exact_after_signs():
    """sign -> Dense -> BN: z_y - z_j is linear in the signs, so its minimum is exact."""
    rng = np.random.default_rng(16)
    inp = tf.keras.Input((3, 3, 1))
    x = lq.layers.QuantDense(5, **SIGN)(L.Flatten()(inp))
    model = randomize(tf.keras.Model(inp, L.BatchNormalization()(x)), rng)
    x = (rng.uniform(0, 1, size=(25, 3, 3, 1)) - 0.5).astype("float32")
    y = rng.integers(0, 5, size=25)
    eps = 0.1
    out = certify_examples(model, x, y, eps, clip_range=None, tolerance=0.0)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=9)), np.float32)
    for i in range(len(x)):
        z = model((x[i].reshape(1, 9) + eps * signs).reshape(-1, 3, 3, 1)).numpy()
        worst = np.delete(z[:, y[i]][:, None] - z, y[i], axis=1).min()
        assert out.margin[i] == pytest.approx(worst, abs=1e-5)
    assert certify(model, (x, y), [eps], clip_range=None)[0]["margin"] == "dense"


LINEAR_LAYERS = [
    (lambda: L.Conv1D(3, 3, strides=2, padding="same"), (9, 2)),
    (lambda: L.Conv1D(2, 3, padding="causal", dilation_rate=2), (8, 2)),
    (lambda: L.Conv2D(3, 3, dilation_rate=2, padding="same"), (6, 6, 2)),
    (lambda: L.Conv3D(2, 2, strides=(1, 2, 1)), (3, 4, 3, 1)),
    (
        lambda: L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same"),
        (5, 5, 2),
    ),
    (
        lambda: lq.layers.QuantDepthwiseConv2D(
            3, padding="same", pad_values=1.0, depthwise_quantizer="ste_sign"
        ),
        (4, 4, 2),
    ),
    (
        lambda: lq.layers.QuantConv1D(
            2, 4, strides=2, padding="same", pad_values=1.0, kernel_quantizer="ste_sign"
        ),
        (7, 2),
    ),
    (lambda: L.Dense(3), (4, 5)),
]


@pytest.mark.parametrize("case", range(len(LINEAR_LAYERS)))
def test_single_linear_layers_are_exact_per_unit(case):
    """For one affine layer the bounds are M c + f(0) -/+ |M| r (M from basis vectors)."""
    factory, shape = LINEAR_LAYERS[case]
    rng = np.random.default_rng(case)
    model = tf.keras.Sequential([tf.keras.Input(shape), factory()])
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    n = int(np.prod(shape))
    f = lambda t: model(t.astype("float32")).numpy().reshape(len(t), -1)  # noqa: E731
    offset = f(np.zeros((1, *shape)))[0]
    matrix = (f(np.eye(n).reshape((n, *shape))) - offset).T
    c = rng.normal(size=(3, *shape))
    r = rng.uniform(0, 0.5, size=c.shape)
    b = interval_bounds(model, c - r, c + r)
    center = c.reshape(3, -1) @ matrix.T + offset
    radius = r.reshape(3, -1) @ np.abs(matrix).T
    np.testing.assert_allclose(
        b.lower.reshape(3, -1), center - radius, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        b.upper.reshape(3, -1), center + radius, rtol=1e-4, atol=1e-4
    )


# ----- (b) containment for networks without sign activations ----------------------------


def real_valued_graph(rng):
    inp = tf.keras.Input((6, 6, 2))
    x = L.Rescaling(2.0, offset=-1.0)(inp)
    x = L.Normalization(mean=[0.1, -0.2], variance=[0.5, 2.0])(x)
    x = L.Conv2D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.DepthwiseConv2D(3, padding="same", activation="tanh")(x)
    y = lq.layers.QuantConv2D(
        4,
        3,
        padding="same",
        pad_values=1.0,
        kernel_quantizer="magnitude_aware_sign",
        kernel_constraint="weight_clip",
    )(y)
    y = L.BatchNormalization()(y)
    x = L.add([x, y])
    x = L.Activation(lq.activations.hard_tanh)(x)
    z = ShortcutPad(stride=2, extra_channels=2)(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="sigmoid")(x)
    x = L.MaxPooling2D(2, strides=1, padding="same")(x)
    x = L.Concatenate()([x, z])
    x = L.AveragePooling2D(2, padding="same")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Subtract()([x, L.Cropping2D(0)(x)])  # zero, but through the interval algebra
    w = L.GlobalMaxPooling2D()(x)
    x = L.Flatten()(L.LeakyReLU(0.1)(x))
    x = L.Dropout(0.3)(x)
    x = L.Concatenate()([x, w])
    logits = L.Dense(5)(x)
    probs = L.Activation("softmax")(logits)
    model = randomize(tf.keras.Model(inp, probs), rng)
    return model, tf.keras.Model(inp, logits)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.sampled_from([0.0, 0.01, 0.05, 0.2]))
def test_intervals_contain_random_perturbations(seed, eps):
    rng = np.random.default_rng(seed)
    probs_model, logits_model = real_valued_graph(rng)
    x = rng.uniform(0, 1, size=(4, 6, 6, 2)).astype("float32")
    for model, to_logits in ((logits_model, True), (probs_model, False)):
        b = interval_bounds(model, x - eps, x + eps, to_logits=to_logits)
        assert not b.undecided.any()
        noise = rng.uniform(-1, 1, size=(250, *x.shape[1:]))
        noise[:100] = np.sign(noise[:100])  # corners of the box
        for i in range(len(x)):
            pts = (x[i] + eps * noise).astype("float32")
            z = model(pts, training=False).numpy()
            slack = 1e-5 * (1 + np.abs(z))
            assert np.all(z >= b.lower[i] - slack) and np.all(z <= b.upper[i] + slack)
        if eps == 0.0:
            z = model(x, training=False).numpy()
            np.testing.assert_allclose(b.lower, z, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(b.upper, z, rtol=1e-4, atol=1e-5)


def test_margin_head_is_tighter_than_logit_intervals():
    rng = np.random.default_rng(13)
    model = tiny_bnn(rng, residual=True)
    inp = model.input
    blocked = tf.keras.Model(inp, L.Dropout(0.1)(model.output))  # hides the last Dense
    x = rng.uniform(0, 1, size=(80, 3, 3, 1)).astype("float32")
    y = labels_of(model, x)
    eps = [0.0, 0.01, 0.02, 0.04]
    with_head = certify(model, (x, y), eps)
    without = certify(blocked, (x, y), eps)
    assert [r["margin"] for r in with_head] == ["dense"] * 4
    assert [r["margin"] for r in without] == ["logits"] * 4
    for a, b in zip(with_head, without, strict=True):
        assert a["certified"] >= b["certified"]
        assert a["undecided"] == b["undecided"]
    assert sum(a["certified"] for a in with_head) > sum(b["certified"] for b in without)


# ----- (a) a tiny model trained on real CIFAR-10 ----------------------------------------


def read_cifar(archive, member, n):
    with tarfile.open(archive, "r:gz") as tar:
        name = next(m for m in tar.getnames() if m.endswith(member))
        raw = np.frombuffer(tar.extractfile(name).read(n * 3073), np.uint8).reshape(
            n, 3073
        )
    images = (
        raw[:, 1:].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).astype("float32") / 255
    )
    return images, raw[:, 0].astype("int64")


def test_certified_cifar_images_survive_pgd(cifar_archive):
    tf.keras.utils.set_random_seed(0)
    x_train, y_train = read_cifar(cifar_archive, "data_batch_1.bin", 2048)
    x_test, y_test = read_cifar(cifar_archive, "test_batch.bin", 200)
    mean, var = x_train.mean(axis=(0, 1, 2)), x_train.var(axis=(0, 1, 2))
    inp = tf.keras.Input((32, 32, 3))
    x = L.Normalization(mean=mean, variance=var)(inp)
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(16, 3, strides=2, padding="same", use_bias=False, **SIGN)(
        x
    )
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D(2)(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10)(x)
    model = tf.keras.Model(inp, out)
    model.compile(
        tf.keras.optimizers.Adam(1e-2),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, batch_size=128, epochs=3, verbose=0)
    eps = [0.0, 0.25 / 255, 0.5 / 255, 1 / 255, 2 / 255]
    ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(64)
    results = certify(model, ds, eps)
    clean = results[0]["clean_accuracy"]
    assert clean > 0.15  # it learned something in a few steps
    assert all(r["clean_accuracy"] == clean for r in results)
    cert = [r["certified_accuracy"] for r in results]
    assert all(a >= b for a, b in zip(cert, cert[1:], strict=False))  # monotone in eps
    assert cert[0] <= clean and cert[0] >= clean - 0.05  # eps = 0: almost all correct
    # attack at the largest eps that still certifies something
    e = max(e for e, c in zip(eps, cert, strict=True) if c > 0 and e > 0)
    per_image = certify_examples(model, x_test, y_test, e).certified
    assert per_image.mean() == pytest.approx(cert[eps.index(e)])
    flipped = flipped_by_pgd(model, x_test, y_test, e, steps=20, restarts=3)
    assert not np.any(per_image & flipped)
    # the attack works: at 8/255 it flips most correctly classified images
    correct = labels_of(model, x_test) == y_test
    strong = flipped_by_pgd(model, x_test, y_test, 8 / 255, steps=20, restarts=1)
    assert strong[correct].mean() > 0.5


# ----- data forms, files and errors ------------------------------------------------------


def test_dataset_forms_agree_and_pixel_scale():
    rng = np.random.default_rng(14)
    model = tiny_bnn(rng, residual=False)
    x = rng.uniform(0, 1, size=(30, 3, 3, 1)).astype("float32")
    y = labels_of(model, x)
    y[::3] = (y[::3] + 1) % 4  # some wrong labels
    eps = [0.0, 0.02]
    ref = certify(model, (x, y), eps)
    assert ref[0]["clean_accuracy"] == pytest.approx(20 / 30)
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    unbatched = tf.data.Dataset.from_tensor_slices((x, np.eye(4)[y]))  # one-hot labels
    assert certify(model, batched, eps) == ref
    assert certify(model, unbatched, eps, batch_size=4) == ref
    first = certify(model, batched, eps, num_examples=10)
    assert first == certify(model, (x[:10], y[:10]), eps)
    assert first[0]["num_examples"] == 10
    # a model on raw bytes: the same box in pixel units
    inp = tf.keras.Input((3, 3, 1))
    raw = tf.keras.Model(inp, model(L.Rescaling(1 / 255)(inp)))
    assert certify(raw, (x * 255, y), eps, pixel_scale=255) == ref


def test_write_certification(tmp_path):
    from PIL import Image

    results = [
        {
            "epsilon": e,
            "certified_accuracy": c,
            "clean_accuracy": 0.8,
            "undecided_fraction": u,
        }
        for e, c, u in ((0.0, 0.8, 0.0), (1 / 255, 0.5, 0.4), (2 / 255, 0.2, 0.9))
    ]
    paths = write_certification(results, tmp_path / "run")
    data = json.loads(paths["json"].read_text())
    assert data["results"] == results
    with Image.open(paths["png"]) as img:
        assert img.size[0] > 200 and img.size[1] > 150
    with pytest.raises(ValueError, match="non-empty"):
        write_certification([], tmp_path)


def test_errors_name_the_problem():
    rng = np.random.default_rng(15)
    model = tiny_bnn(rng, residual=False)
    x = rng.uniform(0, 1, size=(4, 3, 3, 1)).astype("float32")
    y = np.zeros(4, int)
    with pytest.raises(ValueError, match="epsilon must be a number in \\[0, 1\\]"):
        certify(model, (x, y), [-0.1])
    with pytest.raises(ValueError, match="epsilons is empty"):
        certify(model, (x, y), [])
    with pytest.raises(ValueError, match="num_examples"):
        certify(model, (x, y), [0.1], num_examples=0)
    with pytest.raises(ValueError, match="pixel_scale"):
        certify(model, (x, y), [0.1], pixel_scale=0)
    with pytest.raises(ValueError, match="outside clip_range"):
        certify(model, (x * 4 - 2, y), [0.1])
    assert (
        certify(model, (x * 4 - 2, y), [0.0], clip_range=None)[0]["num_examples"] == 4
    )
    inp = tf.keras.Input((3,))
    for bad, pattern in (
        (L.LayerNormalization(name="ln")(inp), r"'ln' \(LayerNormalization\)"),
        (L.Dense(2, activation="swish", name="sw")(inp), "'sw'.*non-monotone.*swish"),
        (
            lq.layers.QuantDense(2, input_quantizer="magnitude_aware_sign", name="mas")(
                inp
            ),
            "'mas'.*MagnitudeAwareSign",
        ),
    ):
        with pytest.raises(ValueError, match=pattern):
            certify(
                tf.keras.Model(inp, bad), (np.zeros((2, 3)), np.zeros(2, int)), [0.1]
            )
