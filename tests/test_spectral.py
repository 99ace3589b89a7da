"""SpectralNormLipschitz: accuracy against numpy SVD, persistence, strategy, reload."""

import larq_lipschitz.regularizers as regs  # noqa: I001  (Keras 2 first)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

HYPOTHESIS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
EXTREMES = [float(np.float32(x)) for x in (0.0, 1e30, -1e30, 1e-30, -1e-30)]


def np_rows(kernel):
    k = np.asarray(kernel, np.float64)
    return np.stack([k[..., o].ravel() for o in range(k.shape[-1])])


def np_sigma(kernel):
    return np.linalg.svd(np_rows(kernel), compute_uv=False)[0]


def np_magnitude_aware_sign(kernel):
    k = np.asarray(kernel, np.float64)
    scale = np.abs(k).mean(axis=tuple(range(k.ndim - 1)))
    return scale * np.where(k >= 0, 1.0, -1.0)


def _kernel(seed, shape=(3, 3, 4, 6)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (12, 5), (3, 5, 7)])
def test_estimate_converges_to_svd_across_calls(shape):
    kernel = tf.Variable(_kernel(0, shape))
    reg = regs.SpectralNormLipschitz(0.5)
    step = tf.function(lambda: reg(kernel))
    for _ in range(60):
        value = step()
    assert value.numpy() == pytest.approx(0.5 * np_sigma(kernel.numpy()), rel=1e-2)
    assert value.numpy() <= 0.5 * np_sigma(kernel.numpy()) * (1 + 1e-5)


def test_vector_persists_between_calls():
    kernel = tf.Variable(_kernel(1))
    once = regs.SpectralNormLipschitz(1.0, power_iterations=3)
    stepwise = regs.SpectralNormLipschitz(1.0, power_iterations=1)
    expected = tf.function(lambda: once(kernel))()
    step = tf.function(lambda: stepwise(kernel))
    for _ in range(3):
        got = step()
    assert got.numpy() == pytest.approx(expected.numpy(), rel=1e-5)
    np.testing.assert_allclose(
        stepwise.vector.numpy(), once.vector.numpy(), rtol=1e-4, atol=1e-6
    )


def test_gradient_is_strength_times_u_v_transpose():
    kernel = tf.Variable(_kernel(2, (8, 5)))
    reg = regs.SpectralNormLipschitz(2.0, power_iterations=50)
    with tf.GradientTape() as tape:
        value = reg(kernel)
    grad = tape.gradient(value, kernel).numpy()
    u, s, vt = np.linalg.svd(kernel.numpy().T.astype(np.float64))  # rows x inputs
    expected = 2.0 * np.outer(u[:, 0], vt[0]).T
    np.testing.assert_allclose(grad, expected, atol=1e-3)
    assert value.numpy() == pytest.approx(2.0 * s[0], rel=1e-4)


def test_effective_kernel_is_measured_through_the_quantizer():
    kernel = tf.Variable(_kernel(3))
    reg = regs.SpectralNormLipschitz(
        1.0, 40, on="effective", quantizer="magnitude_aware_sign"
    )
    value = reg(kernel)
    expected = np.linalg.svd(
        np_rows(np_magnitude_aware_sign(kernel.numpy())), compute_uv=False
    )[0]
    assert value.numpy() == pytest.approx(expected, rel=1e-2)
    with tf.GradientTape() as tape:
        value = reg(kernel)
    assert np.any(tape.gradient(value, kernel).numpy() != 0)


@HYPOTHESIS
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5)),
        elements=st.one_of(
            st.floats(-3, 3, width=32, allow_subnormal=False), st.sampled_from(EXTREMES)
        ),
    )
)
def test_degenerate_kernels_give_finite_values_and_gradients(kernel):
    variable = tf.Variable(kernel)
    reg = regs.SpectralNormLipschitz(1.0, power_iterations=3)
    with tf.GradientTape() as tape:
        value = reg(variable)
    assert np.isfinite(value.numpy())
    assert np.all(np.isfinite(tape.gradient(value, variable).numpy()))
    assert np.all(np.isfinite(reg.vector.numpy()))
    assert value.numpy() <= np_sigma(kernel) * (1 + 1e-4) + 1e-37


def test_zero_kernel_keeps_a_usable_vector():
    variable = tf.Variable(tf.zeros((4, 3)))
    reg = regs.SpectralNormLipschitz(1.0)
    assert reg(variable).numpy() == 0.0
    assert np.linalg.norm(reg.vector.numpy()) == pytest.approx(1.0, rel=1e-5)
    variable.assign(_kernel(4, (4, 3)))
    step = tf.function(lambda: reg(variable))
    for _ in range(40):
        value = step()
    assert value.numpy() == pytest.approx(np_sigma(variable.numpy()), rel=1e-2)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales(scale):
    base = _kernel(5, (6, 4))
    variable = tf.Variable(base * np.float32(scale))
    reg = regs.SpectralNormLipschitz(1.0, power_iterations=60)
    assert reg(variable).numpy() == pytest.approx(np_sigma(base) * scale, rel=1e-2)


def test_eager_calls_do_not_store_the_vector():
    kernel = tf.Variable(_kernel(7, (5, 4)))
    reg = regs.SpectralNormLipschitz(1.0, power_iterations=2)
    tf.function(lambda: reg(kernel))()
    stored = reg.vector.numpy().copy()
    eager = reg(kernel)
    np.testing.assert_array_equal(reg.vector.numpy(), stored)
    # The eager value is the one two further iterations from the stored vector give.
    reference = regs.SpectralNormLipschitz(1.0, power_iterations=2, vector=stored)
    assert eager.numpy() == pytest.approx(reference(kernel).numpy(), rel=1e-6)


def test_one_instance_serves_one_kernel():
    reg = regs.SpectralNormLipschitz()
    reg(tf.Variable(tf.ones((3, 2))))
    with pytest.raises(ValueError, match="Create one instance per layer"):
        reg(tf.Variable(tf.ones((3, 2))))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"strength": -1.0},
            r"SpectralNormLipschitz: strength must be a finite number >= 0, got -1.0",
        ),
        ({"power_iterations": 0}, "power_iterations must be an integer >= 1, got 0"),
        (
            {"power_iterations": 1.5},
            "power_iterations must be an integer >= 1, got 1.5",
        ),
        ({"on": "binary"}, "on must be 'latent' or 'effective'"),
        ({"on": "effective"}, "on='effective' needs the layer's kernel quantizer"),
        ({"quantizer": "ste_sign"}, "quantizer is only used with on='effective'"),
        ({"layout": "x"}, "layout must be one of"),
        ({"vector": [[1.0]]}, "vector must be a non-empty 1-D list"),
        ({"vector": [float("nan")]}, "vector must be a non-empty 1-D list"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        regs.SpectralNormLipschitz(**kwargs)


def test_vector_of_the_wrong_length_is_a_clear_error():
    reg = regs.SpectralNormLipschitz(vector=[1.0, 0.0])
    with pytest.raises(
        ValueError, match="vector has 2 entries but the kernel has 3 rows"
    ):
        reg(tf.Variable(tf.ones((4, 3))))


def _model(reg, strategy=None):
    tf.keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy is not None else tf.name_scope("plain")
    with scope:
        inputs = tf.keras.Input((6, 6, 3))
        x = lq.layers.QuantConv2D(
            8,
            3,
            kernel_quantizer="magnitude_aware_sign",
            kernel_constraint="weight_clip",
            kernel_regularizer=reg,
            name="conv",
        )(inputs)
        outputs = tf.keras.layers.Dense(2)(tf.keras.layers.GlobalAveragePooling2D()(x))
        model = tf.keras.Model(inputs, outputs)
        model.compile(tf.keras.optimizers.SGD(1e-3), "mse")
    return model


def _data(n=16):
    rng = np.random.default_rng(6)
    return rng.normal(size=(n, 6, 6, 3)).astype(np.float32), rng.normal(
        size=(n, 2)
    ).astype(np.float32)


def _estimate(kernel, vector):
    """||W^T u|| for the unit vector u: the converged power-iteration value."""
    u = np.asarray(vector, np.float64)
    return np.linalg.norm(np_rows(kernel).T @ (u / np.linalg.norm(u)))


def test_fit_under_mirrored_strategy_keeps_and_updates_the_vector(mirrored_strategy):
    reg = regs.SpectralNormLipschitz(
        1e-3, on="effective", quantizer="magnitude_aware_sign"
    )
    model = _model(reg, mirrored_strategy)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=30, verbose=0)  # 60 steps, one iteration each
    assert isinstance(reg.vector, tf.distribute.DistributedValues)
    per_replica = [v.numpy() for v in reg.vector.values]
    np.testing.assert_allclose(per_replica[0], per_replica[1], rtol=1e-5, atol=1e-7)
    latent = tf.convert_to_tensor(
        model.get_layer("conv").kernel.latent_variable
    ).numpy()
    true = np.linalg.svd(np_rows(np_magnitude_aware_sign(latent)), compute_uv=False)[0]
    assert _estimate(
        np_magnitude_aware_sign(latent), reg.current_vector()
    ) == pytest.approx(true, rel=1e-2)


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_save_and_load_keep_the_converged_vector(tmp_path, fmt):
    reg = regs.SpectralNormLipschitz(1e-2)
    model = _model(reg)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=30, verbose=0)
    path = str(tmp_path / ("model" if fmt == "savedmodel" else f"model.{fmt}"))
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    loaded_reg = loaded.get_layer("conv").kernel_regularizer
    assert isinstance(loaded_reg, regs.SpectralNormLipschitz) and loaded_reg is not reg
    np.testing.assert_array_equal(loaded_reg.current_vector(), reg.current_vector())
    latent = tf.convert_to_tensor(
        loaded.get_layer("conv").kernel.latent_variable
    ).numpy()
    (first,) = loaded.losses  # one power iteration from the restored vector
    assert first.numpy() == pytest.approx(1e-2 * np_sigma(latent), rel=1e-2)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_clone_keeps_the_vector():
    reg = regs.SpectralNormLipschitz(1.0)
    model = _model(reg)
    step = tf.function(lambda: model.losses)
    for _ in range(5):
        step()
    assert (
        reg.current_vector()
        != regs.SpectralNormLipschitz(1.0)._start_vector(8).tolist()
    )
    clone = tf.keras.models.clone_model(model)
    np.testing.assert_allclose(
        clone.get_layer("conv").kernel_regularizer.current_vector(),
        reg.current_vector(),
    )
