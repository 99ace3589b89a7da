"""L1InfLipschitz: values and gradients against NumPy, validation, string form."""

import larq_lipschitz.regularizers as regs  # noqa: I001  (Keras 2 first)

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
EXTREMES = [float(np.float32(x)) for x in (0.0, 1e30, -1e30, 1e-30, -1e-30)]
ELEMENTS = st.one_of(
    st.floats(-3, 3, width=32, allow_subnormal=False), st.sampled_from(EXTREMES)
)
SHAPES = {
    "dense": st.tuples(st.integers(1, 6), st.integers(1, 5)),
    "conv": st.one_of(
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
        st.tuples(
            st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)
        ),
        st.tuples(*[st.integers(1, 2)] * 4, st.integers(1, 3)),
    ),
    "depthwise": st.tuples(
        st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)
    ),
}


def np_row_norms(kernel, layout):
    """Row L1 norms by explicit loops over output units (float64)."""
    k = np.asarray(kernel, np.float64)
    if layout == "dense":
        return np.array([np.abs(k[:, o]).sum() for o in range(k.shape[1])])
    if layout == "conv":
        return np.array([np.abs(k[..., o]).sum() for o in range(k.shape[-1])])
    return np.array(
        [
            np.abs(k[..., c, m]).sum()
            for c in range(k.shape[-2])
            for m in range(k.shape[-1])
        ]
    )


def np_penalty(kernel, layout, strength, mode, target):
    n = np_row_norms(kernel, layout)
    if mode == "max":
        return strength * n.max()
    if mode == "excess":
        return strength * max(0.0, n.max() - target)
    return strength * np.maximum(n - target, 0).sum()


@st.composite
def cases(draw):
    layout = draw(st.sampled_from(sorted(SHAPES)))
    kernel = draw(hnp.arrays(np.float32, draw(SHAPES[layout]), elements=ELEMENTS))
    mode = draw(st.sampled_from(["max", "excess", "excess_sum"]))
    target = None if mode == "max" else draw(st.floats(0, 20))
    strength = draw(st.one_of(st.floats(0, 1), st.just(1e-4)))
    return layout, kernel, mode, target, strength


@HYPOTHESIS
@given(cases())
def test_penalty_matches_numpy_with_finite_gradient(case):
    layout, kernel, mode, target, strength = case
    reg = regs.L1InfLipschitz(strength, mode=mode, target=target, layout=layout)
    variable = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        value = reg(variable)
    expected = np_penalty(kernel, layout, strength, mode, target)
    assert value.numpy() == pytest.approx(expected, rel=1e-5, abs=1e-30)
    grad = tape.gradient(value, variable)
    assert grad is not None and np.all(np.isfinite(grad.numpy()))


def test_gradient_is_strength_times_sign_on_the_worst_row():
    kernel = np.array(
        [[1.0, -0.5], [-2.0, 0.1], [0.5, 0.0]], np.float32
    )  # rows 3.5, 0.6
    variable = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        value = regs.L1InfLipschitz(0.1)(variable)
    assert value.numpy() == pytest.approx(0.35)
    grad = tape.gradient(value, variable).numpy()
    np.testing.assert_allclose(grad, [[0.1, 0.0], [-0.1, 0.0], [0.1, 0.0]], rtol=1e-6)
    with tf.GradientTape() as tape:
        value = regs.L1InfLipschitz(0.1, mode="excess_sum", target=0.5)(variable)
    assert value.numpy() == pytest.approx(0.1 * (3.0 + 0.1))
    grad = tape.gradient(value, variable).numpy()
    np.testing.assert_allclose(grad, [[0.1, -0.1], [-0.1, 0.1], [0.1, 0.0]], rtol=1e-6)


def test_zero_kernel_gives_zero_and_no_nan():
    variable = tf.Variable(tf.zeros((3, 3, 2, 4)))
    for mode, target in [("max", None), ("excess", 0.0), ("excess_sum", 1.0)]:
        with tf.GradientTape() as tape:
            value = regs.L1InfLipschitz(1.0, mode=mode, target=target)(variable)
        assert value.numpy() == 0.0
        assert np.all(np.isfinite(tape.gradient(value, variable).numpy()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"strength": -1.0},
            r"L1InfLipschitz: strength must be a finite number >= 0, got -1.0",
        ),
        ({"strength": float("nan")}, "strength must be a finite number >= 0, got nan"),
        ({"strength": float("inf")}, "strength must be a finite number >= 0, got inf"),
        ({"strength": "big"}, "strength must be a finite number >= 0, got 'big'"),
        ({"strength": True}, "strength must be a finite number >= 0, got True"),
        ({"mode": "sum"}, "L1InfLipschitz: mode must be one of"),
        ({"mode": "excess"}, "mode 'excess' needs a target"),
        (
            {"mode": "excess", "target": -2},
            "target must be a finite number >= 0, got -2",
        ),
        (
            {"mode": "excess_sum", "target": float("inf")},
            "target must be a finite number",
        ),
        ({"target": 1.0}, "target is only used by the modes"),
        ({"layout": "transposed"}, "L1InfLipschitz: layout must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        regs.L1InfLipschitz(**kwargs)


def test_wrong_kernel_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="layout 'dense' must have rank 2, got rank 4"):
        regs.L1InfLipschitz(layout="dense")(tf.zeros((3, 3, 2, 2)))


def test_registered_class_name_is_the_keras_trap_and_the_alias_is_not():
    """`regularizers.get` gives the class for a registered name; the alias, an instance."""
    assert (
        tf.keras.regularizers.get("larq_lipschitz>L1InfLipschitz")
        is regs.L1InfLipschitz
    )
    alias = tf.keras.regularizers.get("l1inf_lipschitz")
    assert isinstance(alias, regs.L1InfLipschitz)
    assert alias.get_config() == regs.L1InfLipschitz().get_config()


LAYERS = {
    "Dense": lambda: tf.keras.layers.Dense(4, kernel_regularizer="l1inf_lipschitz"),
    "QuantDense": lambda: lq.layers.QuantDense(
        4,
        kernel_quantizer="magnitude_aware_sign",
        kernel_constraint="weight_clip",
        kernel_regularizer="l1inf_lipschitz",
    ),
    "QuantConv2D": lambda: lq.layers.QuantConv2D(
        4,
        3,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        kernel_regularizer="l1inf_lipschitz",
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_string_form_works_on_layers_and_trains(name):
    layer = LAYERS[name]()
    assert isinstance(layer.kernel_regularizer, regs.L1InfLipschitz)
    shape = (5, 5, 2) if name == "QuantConv2D" else (6,)
    inputs = tf.keras.Input(shape)
    x = layer(inputs)
    if name == "QuantConv2D":
        x = tf.keras.layers.Flatten()(x)
    model = tf.keras.Model(inputs, x)
    (loss,) = model.losses
    latent = (
        layer.kernel.latent_variable
        if hasattr(layer.kernel, "latent_variable")
        else layer.kernel
    )
    layout = "conv" if name == "QuantConv2D" else "dense"
    expected = (
        regs.DEFAULT_STRENGTH
        * np_row_norms(tf.convert_to_tensor(latent).numpy(), layout).max()
    )
    assert loss.numpy() == pytest.approx(expected, rel=1e-5)
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *shape)).astype(np.float32)
    y = rng.normal(size=(4, model.output_shape[-1])).astype(np.float32)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_penalty_acts_on_the_latent_kernel_of_a_larq_layer():
    layer = lq.layers.QuantConv2D(
        3, 3, kernel_quantizer="ste_sign", kernel_regularizer=regs.L1InfLipschitz(1.0)
    )
    layer.build((None, 5, 5, 2))
    layer.kernel.assign(np.full((3, 3, 2, 3), 0.01, np.float32))
    (loss,) = layer.losses
    assert loss.numpy() == pytest.approx(
        0.18
    )  # 18 entries of 0.01; sign(W) would give 18


def test_depthwise_layout_on_a_depthwise_layer():
    reg = regs.L1InfLipschitz(1.0, layout="depthwise")
    layer = tf.keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, depthwise_regularizer=reg
    )
    layer.build((None, 5, 5, 3))
    kernel = np.random.default_rng(1).normal(size=(3, 3, 3, 2)).astype(np.float32)
    layer.depthwise_kernel.assign(kernel)
    (loss,) = layer.losses
    assert loss.numpy() == pytest.approx(
        np_row_norms(kernel, "depthwise").max(), rel=1e-5
    )
