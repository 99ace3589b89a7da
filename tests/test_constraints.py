"""L1InfConstraint: projection and rescaling against NumPy, on layers, distributed."""

import larq_lipschitz.constraints as cons  # noqa: I001  (Keras 2 first)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

HYPOTHESIS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
ELEMENTS = st.one_of(
    st.floats(-3, 3, width=32, allow_subnormal=False), st.sampled_from([0.0, 1.0, -1.0])
)
SHAPES = {
    "dense": st.tuples(st.integers(1, 8), st.integers(1, 5)),
    "conv": st.tuples(
        st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)
    ),
    "depthwise": st.tuples(
        st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)
    ),
}


def np_rows(kernel, layout):
    k = np.asarray(kernel, np.float64)
    if layout == "dense":
        return k.T.copy()
    if layout == "conv":
        return np.stack([k[..., o].ravel() for o in range(k.shape[-1])])
    return np.stack(
        [k[..., c, m].ravel() for c in range(k.shape[-2]) for m in range(k.shape[-1])]
    )


def np_project(v, r, clip=None):
    """Projection onto the L1 ball (∩ box), by bisection on the soft threshold."""
    a = np.abs(v)
    c = np.inf if clip is None else clip

    def w(t):
        return np.clip(a - t, 0, c)

    if w(0).sum() <= r:
        return np.sign(v) * w(0)
    lo, hi = 0.0, a.max()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if w(mid).sum() > r else (lo, mid)
    return np.sign(v) * w(0.5 * (lo + hi))


def np_rescale(v, r, clip=None):
    if clip is not None:
        v = np.clip(v, -clip, clip)
    n = np.abs(v).sum()
    return v * (r / n) if n > r else v


@st.composite
def cases(draw):
    layout = draw(st.sampled_from(sorted(SHAPES)))
    kernel = draw(hnp.arrays(np.float32, draw(SHAPES[layout]), elements=ELEMENTS))
    return (
        layout,
        kernel,
        draw(st.floats(0.01, 10)),
        draw(st.sampled_from(["project", "rescale"])),
        draw(st.one_of(st.none(), st.floats(0.1, 2))),
    )


@HYPOTHESIS
@given(cases())
def test_constraint_matches_numpy_and_is_feasible(case):
    layout, kernel, max_norm, mode, clip = case
    constraint = cons.L1InfConstraint(
        max_norm, mode=mode, layout=layout, clip_value=clip
    )
    out = constraint(tf.constant(kernel)).numpy()
    assert out.shape == kernel.shape and out.dtype == np.float32
    rows = np_rows(out, layout)
    assert np.all(np.abs(rows).sum(axis=1) <= max_norm * (1 + 1e-5))
    if clip is not None:
        assert np.all(np.abs(rows) <= np.float32(clip) * (1 + 1e-6))
    reference = np_project if mode == "project" else np_rescale
    expected = np.stack([reference(v, max_norm, clip) for v in np_rows(kernel, layout)])
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5)
    again = constraint(tf.constant(out)).numpy()
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)


def test_rows_inside_are_unchanged_bit_for_bit():
    kernel = np.array(
        [[0.3, 5.0], [-0.2, 1.0], [0.1, -2.0]], np.float32
    )  # rows 0.6, 8.0
    out = cons.L1InfConstraint(1.0)(tf.constant(kernel)).numpy()
    np.testing.assert_array_equal(out[:, 0], kernel[:, 0])
    np.testing.assert_allclose(out[:, 1], [1.0, 0.0, 0.0], atol=1e-6)  # theta = 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"max_norm": 0.0},
            r"L1InfConstraint: max_norm must be a finite number > 0, got 0.0",
        ),
        ({"max_norm": -1}, "max_norm must be a finite number > 0, got -1"),
        ({"max_norm": float("nan")}, "max_norm must be a finite number > 0, got nan"),
        ({"mode": "clip"}, "L1InfConstraint: mode must be one of"),
        ({"layout": "rows"}, "L1InfConstraint: layout must be one of"),
        ({"clip_value": 0}, "clip_value must be a finite number > 0, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cons.L1InfConstraint(**kwargs)


def test_string_form_resolves_to_the_default_instance():
    constraint = tf.keras.constraints.get("l1inf_constraint")
    assert isinstance(constraint, cons.L1InfConstraint)
    assert constraint.get_config() == cons.L1InfConstraint().get_config()


def _binary(layer_cls, **kwargs):
    return layer_cls(
        input_quantizer="ste_sign", kernel_quantizer="magnitude_aware_sign", **kwargs
    )


LAYERS = {
    "Dense": (lambda c: tf.keras.layers.Dense(4, kernel_constraint=c), (8,), "dense"),
    "Conv2D": (
        lambda c: tf.keras.layers.Conv2D(4, 3, kernel_constraint=c),
        (5, 5, 2),
        "conv",
    ),
    "QuantDense": (
        lambda c: _binary(lq.layers.QuantDense, units=4, kernel_constraint=c),
        (8,),
        "dense",
    ),
    "QuantConv2D": (
        lambda c: _binary(
            lq.layers.QuantConv2D, filters=4, kernel_size=3, kernel_constraint=c
        ),
        (5, 5, 2),
        "conv",
    ),
}


@pytest.mark.parametrize("form", ["string", "object"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_constraint_holds_after_training_on_layers(name, form):
    make, shape, layout = LAYERS[name]
    constraint = (
        "l1inf_constraint" if form == "string" else cons.L1InfConstraint(0.5, "rescale")
    )
    radius = 1.0 if form == "string" else 0.5
    layer = make(constraint)
    assert isinstance(layer.kernel_constraint, cons.L1InfConstraint)
    inputs = tf.keras.Input(shape)
    outputs = tf.keras.layers.Flatten()(layer(inputs))
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(0)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    x = rng.normal(size=(8, *shape)).astype(np.float32)
    y = rng.normal(size=(8, model.output_shape[-1])).astype(np.float32)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    latent = tf.convert_to_tensor(
        getattr(layer.kernel, "latent_variable", layer.kernel)
    ).numpy()
    assert np.abs(np_rows(latent, layout)).sum(axis=1).max() <= radius * (1 + 1e-5)


def test_projection_with_clip_replaces_weight_clip():
    """clip_value=1 keeps Larq's clip and the L1 bound; plain projection only the bound."""
    kernel = np.zeros((4, 2), np.float32)
    kernel[:, 0] = [3.0, 0.2, 0.1, 0.0]  # row norm 3.3, one entry beyond the clip
    kernel[:, 1] = [1.5, 0.0, 0.0, 0.0]  # inside the ball, but beyond the clip
    plain = cons.L1InfConstraint(2.0)(tf.constant(kernel)).numpy()
    both = cons.L1InfConstraint(2.0, clip_value=1.0)(tf.constant(kernel)).numpy()
    assert np.abs(plain).max() > 1.0  # the L1 ball alone lets entries exceed 1
    assert np.abs(both).max() <= 1.0
    np.testing.assert_allclose(
        both[:, 0], np_project(kernel[:, 0].astype(float), 2.0, 1.0), atol=1e-6
    )
    np.testing.assert_allclose(both[:, 1], [1.0, 0.0, 0.0, 0.0])


def test_constraint_under_mirrored_strategy(mirrored_strategy):
    with mirrored_strategy.scope():
        layer = lq.layers.QuantDense(
            3,
            kernel_quantizer="magnitude_aware_sign",
            kernel_constraint=cons.L1InfConstraint(0.7, clip_value=1.0),
        )
        model = tf.keras.Sequential([tf.keras.Input((6,)), layer])
        model.compile(tf.keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(2)
    model.fit(rng.normal(size=(8, 6)), rng.normal(size=(8, 3)), batch_size=8, verbose=0)
    latent = tf.convert_to_tensor(layer.kernel.latent_variable).numpy()
    assert np.abs(latent).sum(axis=0).max() <= 0.7 * (1 + 1e-5)
