"""Network Lipschitz bounds against exact operator norms and empirical ratios (NumPy)."""

import csv
import json
import math

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow)
from larq_lipschitz.bounds import (
    BoundReport,
    LipschitzBoundLogger,
    bound_comparison,
    lipschitz_bound,
    write_bounds_report,
)
from larq_lipschitz.layers import ShortcutPad

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

L = tf.keras.layers
SETTINGS = settings(max_examples=8, deadline=None)


# ----- NumPy references ---------------------------------------------------------------


def operator(fn, in_shape) -> np.ndarray:
    """The matrix of the affine map `fn` minus its offset, from basis vectors."""
    n = int(np.prod(in_shape))
    basis = np.eye(n, dtype=np.float32).reshape((n, *in_shape))
    zero = np.zeros((1, *in_shape), np.float32)
    out = np.asarray(fn(basis), np.float64).reshape(n, -1)
    offset = np.asarray(fn(zero), np.float64).reshape(1, -1)
    return (out - offset).T  # (outputs, inputs)


def inf_norm(m: np.ndarray) -> float:
    return float(np.max(np.sum(np.abs(m), axis=1)))


def two_norm(m: np.ndarray) -> float:
    return float(np.linalg.svd(m, compute_uv=False)[0])


def randomize_bn(model, rng):
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, size=c))
            if layer.gamma is not None:
                layer.gamma.assign(rng.normal(size=c))  # negative gains too
            if layer.beta is not None:
                layer.beta.assign(rng.normal(size=c))


def predict(model):
    return lambda x: model(x, training=False).numpy()


# ----- single layers: the bound is the exact operator norm ------------------------------


@SETTINGS
@given(
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    quantizer=st.sampled_from([None, "ste_sign", "magnitude_aware_sign"]),
)
def test_dense_bound_is_exact_operator_norm(n_in, n_out, seed, quantizer):
    rng = np.random.default_rng(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((n_in,)),
            lq.layers.QuantDense(
                n_out, kernel_quantizer=quantizer, kernel_constraint="weight_clip"
            ),
        ]
    )
    w = rng.normal(size=(n_in, n_out)).astype("float32")
    model.set_weights([w, rng.normal(size=n_out)])
    if quantizer == "ste_sign":
        ref = np.where(w >= 0, 1.0, -1.0)
    elif quantizer == "magnitude_aware_sign":
        ref = np.mean(np.abs(w), axis=0) * np.where(w >= 0, 1.0, -1.0)
    else:
        ref = w.astype(np.float64)
    exact = operator(predict(model), (n_in,))
    np.testing.assert_allclose(exact, ref.T, atol=1e-5)
    assert lipschitz_bound(model, "inf").network_bound == pytest.approx(
        inf_norm(exact), rel=1e-5
    )
    assert lipschitz_bound(model, "2").network_bound == pytest.approx(
        two_norm(exact), rel=1e-5
    )


CONV_CASES = [
    # (layer factory, input shape)
    (lambda: L.Conv2D(3, 3, padding="same"), (5, 5, 2)),
    (lambda: L.Conv2D(4, (3, 2), strides=2, padding="valid"), (7, 6, 2)),
    (lambda: L.Conv2D(2, 3, dilation_rate=2, padding="same"), (7, 7, 2)),
    (lambda: L.Conv2D(3, 1, strides=2), (5, 5, 3)),
    (lambda: L.Conv1D(3, 4, strides=3, padding="same"), (11, 2)),
    (lambda: L.Conv1D(2, 3, padding="causal", dilation_rate=2), (9, 2)),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (5, 5, 2)),
    (lambda: L.DepthwiseConv2D(2, strides=2, padding="valid"), (6, 6, 3)),
    (
        lambda: lq.layers.QuantConv2D(
            3,
            3,
            padding="same",
            pad_values=1.0,
            kernel_quantizer="magnitude_aware_sign",
            kernel_constraint="weight_clip",
        ),
        (5, 5, 2),
    ),
    (
        lambda: lq.layers.QuantDepthwiseConv2D(
            3,
            padding="same",
            depthwise_quantizer="ste_sign",
            depthwise_constraint="weight_clip",
        ),
        (4, 4, 2),
    ),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_bound_against_the_dense_operator_matrix(case):
    factory, shape = CONV_CASES[case]
    rng = np.random.default_rng(case)
    model = tf.keras.Sequential([tf.keras.Input(shape), factory()])
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    exact = operator(predict(model), shape)
    inf = lipschitz_bound(model, "inf").network_bound
    two = lipschitz_bound(model, "2").network_bound
    # Some output position sees the whole kernel in every case: the bound is exact.
    assert inf == pytest.approx(inf_norm(exact), rel=1e-5)
    assert two >= two_norm(exact) * (1 - 1e-6)
    layer = model.layers[-1]
    if tuple(layer.kernel_size) in ((1, 1), (1,)):
        assert two == pytest.approx(two_norm(exact), rel=1e-5)  # 1x1: exact too
    # the reshaped-kernel spectral norm alone is no operator bound: it is smaller here
    if case == 0:
        kernel = model.get_weights()[0].reshape(-1, 3)
        assert np.linalg.norm(kernel, 2) < two_norm(exact)


def test_conv_batchnorm_folding_is_exact_in_inf_norm():
    rng = np.random.default_rng(1)
    for quantizer in (None, "ste_sign"):
        inp = tf.keras.Input((6, 6, 3))
        x = lq.layers.QuantConv2D(
            5,
            3,
            padding="same",
            kernel_quantizer=quantizer,
            kernel_constraint="weight_clip",
        )(inp)
        out = L.BatchNormalization()(x)
        model = tf.keras.Model(inp, out)
        model.layers[1].kernel.assign(rng.normal(size=(3, 3, 3, 5)))
        randomize_bn(model, rng)
        exact = operator(predict(model), (6, 6, 3))
        report = lipschitz_bound(model, "inf")
        assert report.network_bound == pytest.approx(inf_norm(exact), rel=1e-5)
        assert report.layers[1].kind == "batchnorm (folded)"
        # the unfolded product is looser
        bn = model.layers[2]
        gain = np.abs(bn.gamma.numpy()) / np.sqrt(
            bn.moving_variance.numpy() + bn.epsilon
        )
        kernel = model.layers[1].kernel.numpy()
        if quantizer:
            kernel = np.where(kernel >= 0, 1.0, -1.0)
        product = np.max(np.abs(kernel).sum(axis=(0, 1, 2))) * gain.max()
        assert report.network_bound <= product * (1 + 1e-9)
        assert lipschitz_bound(model, "2").network_bound >= two_norm(exact) * (1 - 1e-6)


def test_pooling_and_preprocessing_layers():
    rng = np.random.default_rng(2)
    cases = [
        (L.AveragePooling2D(3, strides=1, padding="same"), (5, 6, 2)),
        (L.AveragePooling2D(2), (4, 6, 1)),
        (L.AveragePooling1D(3, strides=2, padding="same"), (7, 2)),
        (L.GlobalAveragePooling2D(), (3, 4, 2)),
    ]
    for layer, shape in cases:
        model = tf.keras.Sequential([tf.keras.Input(shape), layer])
        exact = operator(predict(model), shape)
        assert lipschitz_bound(model, "inf").network_bound == pytest.approx(
            inf_norm(exact)
        )
        # average pooling matrices are separable: the 2-norm is exact
        assert lipschitz_bound(model, "2").network_bound == pytest.approx(
            two_norm(exact)
        )
    norm = L.Normalization(mean=[0.5, 0.1, 0.0], variance=[0.04, 0.25, 1.0])
    resc = L.Rescaling(scale=[2.0, -3.0, 0.5], offset=1.0)
    for layer, expected in ((norm, 1 / 0.2), (resc, 3.0)):
        model = tf.keras.Sequential([tf.keras.Input((2, 2, 3)), layer])
        exact = operator(predict(model), (2, 2, 3))
        for n in ("inf", "2"):
            assert lipschitz_bound(model, n).network_bound == pytest.approx(expected)
        assert inf_norm(exact) == pytest.approx(expected, rel=1e-5)
    # max pooling with overlapping windows: sqrt(windows per input) in the 2-norm, >= ratios
    model = tf.keras.Sequential(
        [tf.keras.Input((6, 6, 1)), L.MaxPooling2D(3, strides=2)]
    )
    assert lipschitz_bound(model, "inf").network_bound == 1.0
    bound = lipschitz_bound(model, "2").network_bound
    assert bound == pytest.approx(2.0)
    x = rng.normal(size=(2000, 6, 6, 1)).astype("float32")
    # adversarial pairs: raise the pixel shared by four windows
    y = x.copy()
    y[:, 2, 2, 0] += 10.0
    d = (model(y).numpy() - model(x).numpy()).reshape(len(x), -1)
    ratio = np.linalg.norm(d, axis=1) / 10.0
    assert ratio.max() <= bound and ratio.max() > 1.0  # > 1: the bound 1 would be wrong


# ----- composition along the graph ------------------------------------------------------


def test_chain_matches_an_independent_numpy_composition():
    rng = np.random.default_rng(3)
    inp = tf.keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", activation=None)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dropout(0.5)(x)
    out = L.Dense(3, activation="softmax")(x)
    model = tf.keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    randomize_bn(model, rng)
    conv, bn, dense = model.layers[1], model.layers[2], model.layers[-1]
    k = conv.kernel.numpy().astype(np.float64)
    g = np.abs(bn.gamma.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    wd = dense.kernel.numpy().astype(np.float64)
    expected_inf = np.max(np.abs(k).sum(axis=(0, 1, 2)) * g) * np.max(np.abs(wd).sum(0))
    assert lipschitz_bound(model, "inf").network_bound == pytest.approx(expected_inf)
    kg = k * g
    conv2 = min(
        3 * np.linalg.norm(kg.reshape(-1, 4), 2),
        sum(np.linalg.norm(kg[i, j], 2) for i in range(3) for j in range(3)),
    )
    expected_2 = conv2 * 1.0 * np.linalg.norm(wd, 2)  # 2x2/2 max pool: 1
    assert lipschitz_bound(model, "2").network_bound == pytest.approx(expected_2)
    # with the final softmax counted (Lipschitz 1/2)
    assert lipschitz_bound(
        model, "inf", to_logits=False
    ).network_bound == pytest.approx(expected_inf / 2)


def test_residual_and_concatenate_compose_exactly_where_they_should():
    rng = np.random.default_rng(4)
    n = 5
    a = rng.uniform(0.1, 2.0, size=n)
    # identity shortcut around a positive diagonal: x + diag(a) x, Lipschitz 1 + max a
    inp = tf.keras.Input((n,))
    f = L.Dense(n, use_bias=False)
    out = L.Add()([inp, f(inp)])
    model = tf.keras.Model(inp, out)
    f.kernel.assign(np.diag(a))
    for norm in ("inf", "2"):
        report = lipschitz_bound(model, norm)
        assert report.network_bound == pytest.approx(1 + a.max())
    # projection shortcut: L_s + L_f, an upper bound of the exact norm of W_s + W_f
    s = L.Dense(n, use_bias=False)
    out = L.add([s(inp), f(inp)])
    model = tf.keras.Model(inp, out)
    s.kernel.assign(rng.normal(size=(n, n)))
    exact = operator(predict(model), (n,))
    ws, wf = s.kernel.numpy(), f.kernel.numpy()
    report = lipschitz_bound(model, "inf")
    assert report.network_bound == pytest.approx(inf_norm(ws.T) + inf_norm(wf.T))
    assert report.network_bound >= inf_norm(exact)
    # concatenate: max (inf, exact) and root sum of squares (2, an upper bound)
    out = L.Concatenate()([s(inp), f(inp)])
    model = tf.keras.Model(inp, out)
    exact = operator(predict(model), (n,))
    assert lipschitz_bound(model, "inf").network_bound == pytest.approx(inf_norm(exact))
    assert lipschitz_bound(model, "2").network_bound == pytest.approx(
        math.hypot(two_norm(ws.T), two_norm(wf.T))
    )
    assert lipschitz_bound(model, "2").network_bound >= two_norm(exact)
    # `x + y` written with the operator (a TFOpLambda layer, as in QuickNet)
    out = s(inp) + f(inp) + 1.0
    model = tf.keras.Model(inp, out)
    assert lipschitz_bound(model, "inf").network_bound == pytest.approx(
        inf_norm(ws.T) + inf_norm(wf.T)
    )


def linear_graph(rng):
    """A random affine network with every structural layer: its exact norm is computable."""
    inp = tf.keras.Input((6, 6, 2))
    x = L.Rescaling(0.5, offset=-0.25)(inp)
    x = L.Conv2D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    y = L.DepthwiseConv2D(3, padding="same")(x)
    y = L.BatchNormalization()(y)
    x = L.add([x, y])
    z = ShortcutPad(stride=2, extra_channels=2)(x)
    x = L.Conv2D(6, 3, strides=2, padding="same")(x)
    x = L.Concatenate()([x, z])
    x = L.AveragePooling2D(2, padding="same")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Flatten()(x)
    out = L.Dense(4)(x)
    model = tf.keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    randomize_bn(model, rng)
    return model


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_bound_dominates_the_exact_norm_of_a_linear_graph(seed):
    model = linear_graph(np.random.default_rng(seed))
    exact = operator(predict(model), (6, 6, 2))
    assert lipschitz_bound(model, "inf").network_bound >= inf_norm(exact) * (1 - 1e-6)
    assert lipschitz_bound(model, "2").network_bound >= two_norm(exact) * (1 - 1e-6)


# ----- nonlinear networks: bound >= empirical ratios of the relaxed network -------------


def binary_residual_model(rng, kernel_quantizer="ste_sign"):
    q = {
        "input_quantizer": "ste_sign",
        "kernel_quantizer": kernel_quantizer,
        "kernel_constraint": "weight_clip",
        "use_bias": False,
    }
    inp = tf.keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="bn0")(x)
    y = lq.layers.QuantConv2D(4, 3, padding="same", pad_values=1.0, name="qconv", **q)(
        x
    )
    y = L.BatchNormalization(name="bn1")(y)
    x = L.add([x, y])
    x = L.MaxPooling2D(2)(x)
    x = L.Activation(lq.activations.hard_tanh)(x)
    x = L.Flatten()(x)
    out = lq.layers.QuantDense(3, name="qdense", **q)(x)
    model = tf.keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    randomize_bn(model, rng)
    for (
        layer
    ) in model.layers:  # shrink gains so that relaxed units are often in [-1, 1]
        if isinstance(layer, L.BatchNormalization):
            layer.gamma.assign(layer.gamma * 0.2)
            layer.beta.assign(layer.beta * 0.2)
    return model


def relaxed_twin(model):
    """The same network with every sign activation replaced by clip(x, -1, 1)."""
    twin = tf.keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    for layer in twin.layers:
        if getattr(layer, "input_quantizer", None) is not None:
            layer.input_quantizer = lq.activations.hard_tanh
    return twin


def empirical_ratio(fn, x: np.ndarray, ord_, steps=30, seed=0) -> float:
    """Largest ||f(a) - f(b)|| / ||a - b|| found by gradient ascent from pairs near x."""
    rng = np.random.default_rng(seed)
    a = tf.Variable(x)
    b = tf.Variable(x + rng.normal(size=x.shape).astype("float32") * 1e-2)
    opt = tf.keras.optimizers.Adam(1e-2)
    best = 0.0

    def norm(t):
        t = tf.reshape(t, [tf.shape(t)[0], -1])
        if ord_ == "inf":
            return tf.reduce_max(tf.abs(t), axis=1)
        return tf.norm(t, axis=1)

    for _ in range(steps):
        with tf.GradientTape() as tape:
            ratio = norm(fn(a) - fn(b)) / (norm(a - b) + 1e-12)
            loss = -tf.reduce_sum(tf.math.log(ratio + 1e-12))
        best = max(best, float(tf.reduce_max(ratio)))
        opt.apply_gradients(zip(tape.gradient(loss, [a, b]), [a, b], strict=True))
    return best


def jacobian_ratio(fn, x: np.ndarray, ord_) -> float:
    """Realize the local Jacobian norm with an actual pair x, x + t d (t small)."""
    best = 0.0
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1])
        with tf.GradientTape() as tape:
            tape.watch(xi)
            y = tf.reshape(fn(xi), [-1])
        jac = tape.jacobian(y, xi).numpy().reshape(y.shape[0], -1)
        if ord_ == "inf":
            o = int(np.argmax(np.abs(jac).sum(1)))
            d = np.sign(jac[o])
        else:
            d = np.linalg.svd(jac)[2][0]
        t = 1e-3
        xd = x[i : i + 1] + t * d.reshape(x[i : i + 1].shape).astype("float32")
        diff = (fn(tf.constant(xd)) - fn(xi)).numpy().ravel()
        dx = t * d
        if ord_ == "inf":
            best = max(best, np.abs(diff).max() / np.abs(dx).max())
        else:
            best = max(best, np.linalg.norm(diff) / np.linalg.norm(dx))
    return best


@pytest.mark.parametrize("kernel_quantizer", ["ste_sign", "magnitude_aware_sign"])
def test_bound_dominates_empirical_ratios_of_the_relaxed_network(kernel_quantizer):
    rng = np.random.default_rng(5)
    model = binary_residual_model(rng, kernel_quantizer)
    twin = relaxed_twin(model)
    fn = lambda t: twin(t, training=False)  # noqa: E731
    x = rng.normal(size=(24, 6, 6, 2)).astype("float32") * 0.5
    for norm in ("inf", "2"):
        bound = lipschitz_bound(model, norm).network_bound
        found = max(empirical_ratio(fn, x, norm), jacobian_ratio(fn, x[:6], norm))
        assert 0 < found <= bound * (1 + 1e-5)
    # the report states the relaxation and notes every relaxed sign
    report = lipschitz_bound(model)
    assert "clipped to [-1, 1]" in report.relaxation
    relaxed = [r.name for r in report.layers if "relaxed to clip" in r.notes]
    assert relaxed == ["qconv", "qdense"]


def test_bound_is_attained_on_a_relaxed_single_layer():
    """Where the composed bound is tight, the ascent finds it: the search is strong."""
    rng = np.random.default_rng(6)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((7,)),
            lq.layers.QuantDense(
                4,
                input_quantizer="ste_sign",
                kernel_quantizer="ste_sign",
                kernel_constraint="weight_clip",
            ),
        ]
    )
    model.set_weights([rng.normal(size=(7, 4)), np.zeros(4)])
    twin = relaxed_twin(model)
    x = rng.uniform(-0.5, 0.5, size=(8, 7)).astype("float32")
    fn = lambda t: twin(t)  # noqa: E731
    assert jacobian_ratio(fn, x, "inf") == pytest.approx(7.0, rel=1e-4)
    assert lipschitz_bound(model, "inf").network_bound == 7.0


def test_composed_bound_is_attained_through_active_relus():
    """Positive weights with constant row sums: relu stays active and the product is exact."""
    model = tf.keras.Sequential(
        [
            tf.keras.Input((5,)),
            L.Dense(
                4,
                activation="relu",
                kernel_initializer=tf.keras.initializers.Constant(0.3),
            ),
            L.BatchNormalization(),
            L.Dense(3, kernel_initializer=tf.keras.initializers.Constant(0.7)),
        ]
    )
    bn = model.layers[1]
    bn.moving_variance.assign(np.full(4, 0.25))
    bound = lipschitz_bound(model, "inf").network_bound
    assert bound == pytest.approx(
        5 * 0.3 * (1 / math.sqrt(0.25 + bn.epsilon)) * 4 * 0.7
    )
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=(4, 5)).astype("float32")
    found = jacobian_ratio(lambda t: model(t, training=False), x, "inf")
    assert found == pytest.approx(bound, rel=1e-3)


# ----- model kinds ----------------------------------------------------------------------


def test_sequential_nested_and_functional_agree():
    rng = np.random.default_rng(7)
    layers = lambda: [  # noqa: E731
        L.Conv2D(3, 3),
        L.BatchNormalization(),
        L.Activation("relu"),
        L.GlobalAveragePooling2D(),
        L.Dense(2),
    ]
    seq = tf.keras.Sequential(layers())
    seq.build((None, 5, 5, 2))
    weights = [rng.normal(size=w.shape) for w in seq.get_weights()]
    weights[5] = np.abs(weights[5])  # moving variance
    seq.set_weights(weights)
    inner = tf.keras.Sequential([tf.keras.Input((5, 5, 2)), *layers()])
    inner.set_weights(weights)
    inp = tf.keras.Input((5, 5, 2))
    outer = tf.keras.Model(inp, L.Activation("linear")(inner(inp)))
    for norm in ("inf", "2"):
        values = [lipschitz_bound(m, norm).network_bound for m in (seq, inner, outer)]
        assert values[0] == pytest.approx(values[1]) == pytest.approx(values[2])
    names = [r.name for r in lipschitz_bound(outer).layers]
    assert names[0] == f"{inner.name}/{inner.layers[0].name}"
    assert lipschitz_bound(outer).layers[1].kind == "batchnorm (folded)"


@pytest.mark.parametrize(
    "factory",
    [
        "QuickNet",
        "BiRealNet",
        "BinaryResNetE18",
    ],
)
def test_larq_zoo_models(factory):
    import larq_zoo as lqz

    fn = getattr(lqz.sota, factory, None) or getattr(lqz.literature, factory)
    model = fn(weights=None, input_shape=(32, 32, 3), num_classes=10)
    reports = [lipschitz_bound(model, n) for n in ("inf", "2")]
    n_layers = sum(not isinstance(x, L.InputLayer) for x in model.layers)
    for report in reports:
        assert isinstance(report, BoundReport)
        assert math.isfinite(report.network_bound) and report.network_bound > 0
        assert len(report.layers) == n_layers
        assert report.layers[-1].notes.startswith("final softmax left out")
    # every binary conv is bounded on q(W): an unscaled sign row has L1 norm kh*kw*c_in
    rows = bound_comparison(model)
    assert rows
    for row in rows:
        if row["kernel_quantizer"] == "SteSign":
            assert row["l1_inf"] == pytest.approx(row["fan_in"])
        assert 0 < row["ratio"] <= math.sqrt(row["fan_in"]) * (1 + 1e-9)


def test_unknown_layers_and_bad_arguments_raise_clear_errors():
    inp = tf.keras.Input((4,))
    model = tf.keras.Model(inp, L.LayerNormalization(name="ln")(inp))
    with pytest.raises(ValueError, match=r"'ln' \(LayerNormalization\)"):
        lipschitz_bound(model)
    model = tf.keras.Model(inp, L.Lambda(lambda t: 2 * t, name="twice")(inp))
    with pytest.raises(ValueError, match=r"'twice' \(Lambda\)"):
        lipschitz_bound(model)
    model = tf.keras.Model(inp, L.Activation("exponential", name="exp")(inp))
    with pytest.raises(ValueError, match="'exp'.*exponential"):
        lipschitz_bound(model)
    model = tf.keras.Model(
        inp,
        lq.layers.QuantDense(2, input_quantizer="magnitude_aware_sign", name="mas")(
            inp
        ),
    )
    with pytest.raises(ValueError, match="'mas'.*MagnitudeAwareSign"):
        lipschitz_bound(model)
    ok = tf.keras.Sequential([tf.keras.Input((4,)), L.Dense(2)])
    with pytest.raises(ValueError, match="norm must be 'inf' or '2'"):
        lipschitz_bound(ok, "1")
    with pytest.raises(ValueError, match="not built"):
        lipschitz_bound(tf.keras.Sequential([L.Dense(2)]))


# ----- the comparison table, the files and the callback -----------------------------------


def test_bound_comparison_and_report_files(tmp_path):
    rng = np.random.default_rng(8)
    model = binary_residual_model(rng, "magnitude_aware_sign")
    rows = bound_comparison(model)
    assert [r["layer"] for r in rows] == ["qconv", "qdense"]
    conv = model.get_layer("qconv")
    w = conv.kernel.numpy().astype(np.float64)
    qw = np.mean(np.abs(w), axis=(0, 1, 2)) * np.where(w >= 0, 1.0, -1.0)
    assert rows[0]["l1_inf"] == pytest.approx(np.abs(qw).sum(axis=(0, 1, 2)).max())
    # MagnitudeAwareSign: the binary layer's L1,inf norm equals the latent kernel's
    assert rows[0]["l1_inf"] == pytest.approx(
        np.abs(w).sum(axis=(0, 1, 2)).max(), rel=1e-6
    )
    assert rows[0]["spectral"] == pytest.approx(np.linalg.norm(qw.reshape(-1, 4), 2))
    assert rows[0]["ratio"] == pytest.approx(rows[0]["l1_inf"] / rows[0]["spectral"])
    assert rows[0]["batchnorm"] == "bn1"
    paths = write_bounds_report(model, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["inf"]["network_bound"] == pytest.approx(
        lipschitz_bound(model).network_bound
    )
    assert data["2"]["norm"] == "2" and len(data["comparison"]) == 2
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table] == ["qconv", "qdense"]
    assert float(table[0]["ratio"]) == pytest.approx(rows[0]["ratio"])
    assert table[0]["kernel_shape"] == "3x3x4x4"


def test_callback_logs_bounds_each_epoch(tmp_path):
    rng = np.random.default_rng(9)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((6,)),
            lq.layers.QuantDense(
                8,
                input_quantizer="ste_sign",
                kernel_quantizer="magnitude_aware_sign",
                kernel_constraint="weight_clip",
            ),
            L.BatchNormalization(),
            L.Dense(3),
        ]
    )
    model.compile(
        "adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = rng.normal(size=(64, 6)), rng.integers(0, 3, size=64)
    logger = LipschitzBoundLogger(log_dir=str(tmp_path / "tb"))
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[logger])
    assert [h["epoch"] for h in logger.history] == [0, 1]
    assert history.history["lipschitz_inf"][-1] == pytest.approx(
        lipschitz_bound(model, "inf").network_bound
    )
    assert history.history["lipschitz_2"][-1] == pytest.approx(
        lipschitz_bound(model, "2").network_bound
    )
    assert history.history["lipschitz_inf"][0] != history.history["lipschitz_inf"][1]
    seen = {}
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                seen[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    assert seen[("lipschitz/inf", 1)] == pytest.approx(
        logger.history[1]["lipschitz_inf"], rel=1e-6
    )
    assert seen[("lipschitz/2", 0)] == pytest.approx(
        logger.history[0]["lipschitz_2"], rel=1e-6
    )
    clone = LipschitzBoundLogger.from_config(logger.get_config())
    assert clone.get_config() == logger.get_config()


def test_callback_under_mirrored_strategy(mirrored_strategy):
    rng = np.random.default_rng(10)
    with mirrored_strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.Input((4,)),
                L.Dense(5),
                L.BatchNormalization(synchronized=True),
                L.Dense(2),
            ]
        )
        model.compile("sgd", "mse")
    logger = LipschitzBoundLogger()
    model.fit(
        rng.normal(size=(32, 4)),
        rng.normal(size=(32, 2)),
        epochs=1,
        verbose=0,
        batch_size=8,
        callbacks=[logger],
    )
    assert logger.history[0]["lipschitz_inf"] == pytest.approx(
        lipschitz_bound(model, "inf").network_bound
    )
