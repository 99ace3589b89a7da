"""Config round trips of every control, alone and in saved models (3 formats)."""

import json
import os
import subprocess
import sys
import textwrap

import larq_lipschitz.constraints as cons  # noqa: I001  (Keras 2 first)
import larq_lipschitz.regularizers as regs

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

FORMATS = ["keras", "h5", "savedmodel"]


def _objects():
    return [
        regs.L1InfLipschitz(),
        regs.L1InfLipschitz(0.3, mode="excess", target=2.5, layout="conv"),
        regs.L1InfLipschitz(1e-5, mode="excess_sum", target=0.0, layout="depthwise"),
        cons.L1InfConstraint(),
        cons.L1InfConstraint(3.0, mode="rescale", layout="dense", clip_value=1.0),
        regs.SpectralNormLipschitz(),
        regs.SpectralNormLipschitz(
            0.2,
            power_iterations=3,
            on="effective",
            quantizer="magnitude_aware_sign",
            vector=[0.6, -0.8],
        ),
        regs.SpectralNormLipschitz(
            0.1, on="effective", quantizer=lq.quantizers.SteSign(0.5)
        ),
    ]


@pytest.mark.parametrize("index", range(len(_objects())))
def test_from_config_round_trip_with_plain_values(index):
    obj = _objects()[index]
    config = obj.get_config()
    assert json.loads(json.dumps(config)) == config  # plain Python values only
    again = type(obj).from_config(config)
    assert type(again) is type(obj)
    assert again.get_config() == config


@pytest.mark.parametrize("index", range(len(_objects())))
def test_keras_serialize_round_trip_new_and_legacy(index):
    obj = _objects()[index]
    module = (
        tf.keras.constraints
        if isinstance(obj, cons.L1InfConstraint)
        else tf.keras.regularizers
    )
    new = module.deserialize(module.serialize(obj))
    assert type(new) is type(obj) and new.get_config() == obj.get_config()
    legacy = tf.keras.utils.legacy.deserialize_keras_object(
        tf.keras.utils.legacy.serialize_keras_object(obj)
    )
    assert type(legacy) is type(obj) and legacy.get_config() == obj.get_config()


def test_spectral_config_carries_the_current_vector():
    reg = regs.SpectralNormLipschitz(1.0, power_iterations=5)
    kernel = tf.Variable(
        np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    )
    tf.function(lambda: reg(kernel))()
    vector = reg.get_config()["vector"]
    np.testing.assert_allclose(vector, reg.vector.numpy(), rtol=1e-7)
    clone = regs.SpectralNormLipschitz.from_config(reg.get_config())
    assert clone(kernel).numpy() == pytest.approx(reg(kernel).numpy(), rel=1e-6)


def build_model():
    """A small BNN carrying every control, object and string forms."""
    tf.keras.utils.set_random_seed(1)
    inputs = tf.keras.Input((6, 6, 3))
    x = tf.keras.layers.Conv2D(
        4,
        3,
        padding="same",
        kernel_regularizer=regs.L1InfLipschitz(0.01, mode="excess", target=0.5),
        kernel_constraint=cons.L1InfConstraint(2.0, mode="rescale"),
        name="fp_conv",
    )(inputs)
    x = lq.layers.QuantConv2D(
        4,
        3,
        input_quantizer="ste_sign",
        kernel_quantizer="magnitude_aware_sign",
        kernel_regularizer="l1inf_lipschitz",
        kernel_constraint="l1inf_constraint",
        name="bin_conv",
    )(x)
    x = tf.keras.layers.Flatten()(x)
    x = lq.layers.QuantDense(
        5,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint=cons.L1InfConstraint(4.0, clip_value=1.0),
        kernel_regularizer=regs.SpectralNormLipschitz(
            0.05, on="effective", quantizer="ste_sign"
        ),
        name="bin_dense",
    )(x)
    outputs = tf.keras.layers.Dense(
        2,
        kernel_regularizer=regs.L1InfLipschitz(0.02, mode="excess_sum", target=0.1),
        name="head",
    )(x)
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.SGD(0.05), "mse")
    return model


def _data():
    rng = np.random.default_rng(2)
    return rng.normal(size=(8, 6, 6, 3)).astype(np.float32), rng.normal(
        size=(8, 2)
    ).astype(np.float32)


def _controls(model):
    out = {}
    for layer in model.layers:
        for attr in ("kernel_regularizer", "kernel_constraint"):
            obj = getattr(layer, attr, None)
            if obj is not None:
                out[f"{layer.name}.{attr}"] = (type(obj).__name__, obj.get_config())
    return out


def _path(tmp_path, fmt):
    return str(tmp_path / ("model" if fmt == "savedmodel" else f"model.{fmt}"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_model_reloads_without_custom_objects(tmp_path, fmt):
    model = build_model()
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    before = [float(v) for v in model.losses]
    controls = _controls(model)
    path = _path(tmp_path, fmt)
    model.save(path)
    loaded = tf.keras.models.load_model(path)  # no custom_objects
    assert _controls(loaded) == controls
    np.testing.assert_allclose([float(v) for v in loaded.losses], before, rtol=1e-6)
    history = loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    rows = np.abs(loaded.get_layer("bin_conv").kernel.latent_variable.numpy())
    assert rows.reshape(-1, 4).sum(axis=0).max() <= 1.0 * (1 + 1e-5)
    dense = tf.convert_to_tensor(
        loaded.get_layer("bin_dense").kernel.latent_variable
    ).numpy()
    assert np.abs(dense).max() <= 1.0 and np.abs(dense).sum(axis=0).max() <= 4.0 * (
        1 + 1e-5
    )


def test_reload_in_a_fresh_process_after_import_larq_lipschitz(tmp_path):
    """Only `import larq_lipschitz` precedes loading: the package must register all."""
    model = build_model()
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    expected = [float(v) for v in model.losses]
    paths = [_path(tmp_path, fmt) for fmt in FORMATS]
    for path in paths:
        model.save(path)
    script = textwrap.dedent(
        f"""
        import json, os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        import larq_lipschitz
        import tensorflow as tf
        out = []
        for path in {paths!r}:
            model = tf.keras.models.load_model(path)
            out.append([float(v) for v in model.losses])
        print("LOSSES", json.dumps(out))
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(s for s in result.stdout.splitlines() if s.startswith("LOSSES"))
    for losses in json.loads(line.split(" ", 1)[1]):
        np.testing.assert_allclose(losses, expected, rtol=1e-6)
