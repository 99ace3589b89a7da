"""apply_lipschitz: controls on exactly the binarized layers, all else unchanged."""

import logging

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow)
from larq_lipschitz import models
from larq_lipschitz.apply import apply_lipschitz, binarized_layers
from larq_lipschitz.constraints import L1InfConstraint
from larq_lipschitz.quantization import is_binarized
from larq_lipschitz.regularizers import L1InfLipschitz

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

STRENGTH = 1e-3


def np_max_row_l1(kernel):
    """Largest L1 norm of a kernel row (output axis last), the NumPy reference."""
    k = np.abs(np.asarray(kernel, dtype=np.float64))
    return np.max(k.reshape(-1, k.shape[-1]).sum(axis=0))


def _assert_same_weights(old, new):
    assert [lay.name for lay in old.layers] == [lay.name for lay in new.layers]
    for a, b in zip(old.layers, new.layers, strict=True):
        wa, wb = a.get_weights(), b.get_weights()
        assert len(wa) == len(wb), a.name
        for x, y in zip(wa, wb, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=a.name)


def _assert_controls(old, new, regularizer, constraint):
    """Binarized layers carry per-layer copies of the new objects; others unchanged."""
    copies = []
    for before, after in zip(old.layers, new.layers, strict=True):
        assert type(before) is type(after)
        if is_binarized(before):
            reg, con = after.kernel_regularizer, after.kernel_constraint
            assert type(reg) is type(regularizer)
            assert reg.get_config() == regularizer.get_config()
            assert type(con) is type(constraint)
            assert con.get_config() == constraint.get_config()
            assert reg is not regularizer and con is not constraint
            copies += [id(reg), id(con)]
            assert (
                after.input_quantizer.get_config()
                == before.input_quantizer.get_config()
            )
            kq_before, kq_after = before.kernel_quantizer, after.kernel_quantizer
            assert type(kq_after) is type(kq_before)
            assert kq_after.get_config() == kq_before.get_config()
        else:
            for attr in ("kernel_regularizer", "kernel_constraint"):
                assert type(getattr(after, attr, None)) is type(
                    getattr(before, attr, None)
                )
    assert len(copies) == len(set(copies)) == 2 * len(binarized_layers(old))


@pytest.fixture(scope="module")
def resnet20():
    tf.keras.utils.set_random_seed(0)
    model = models.get("resnet20")
    # Non-trivial BatchNorm statistics, so that copying them is tested too.
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, gamma.shape),
                    rng.normal(size=beta.shape),
                    rng.normal(size=mean.shape),
                    rng.uniform(0.5, 2, var.shape),
                ]
            )
    return model


def test_cifar_model_outputs_weights_and_controls(resnet20):
    regularizer = L1InfLipschitz(STRENGTH)
    constraint = L1InfConstraint(max_norm=50.0, clip_value=1.0)
    new = apply_lipschitz(resnet20, regularizer=regularizer, constraint=constraint)
    assert new is not resnet20 and new.name == resnet20.name
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(new(x).numpy(), resnet20(x).numpy())
    np.testing.assert_array_equal(
        new(x, training=True).numpy(), resnet20(x, training=True).numpy()
    )
    _assert_same_weights(resnet20, new)
    _assert_controls(resnet20, new, regularizer, constraint)
    # The original is untouched.
    assert all(lay.kernel_regularizer is None for lay in binarized_layers(resnet20))
    assert all(
        isinstance(lay.kernel_constraint, lq.constraints.WeightClip)
        for lay in binarized_layers(resnet20)
    )
    # Each binarized layer's penalty is strength * max row L1 of its own latent kernel.
    layers = binarized_layers(new)
    assert len(new.losses) == len(layers) == 18
    for layer in layers:
        (loss,) = layer.losses
        expected = STRENGTH * np_max_row_l1(layer.kernel.latent_variable.numpy())
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    for name in ("stem_conv", "logits"):
        assert new.get_layer(name).losses == []


def test_constraint_acts_after_a_training_step(resnet20, caplog):
    max_norm = 2.0
    with caplog.at_level(logging.INFO, logger="larq_lipschitz.apply"):
        new = apply_lipschitz(resnet20, constraint=L1InfConstraint(max_norm=max_norm))
    assert "replaced the existing one on 18 layers" in caplog.text
    before = [
        np_max_row_l1(lay.kernel.latent_variable.numpy())
        for lay in binarized_layers(new)
    ]
    assert min(before) > max_norm  # the constraint has work to do
    x = tf.random.uniform((2, 32, 32, 3), seed=2)
    optimizer = tf.keras.optimizers.SGD(1e-3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(
                [1, 2], new(x, training=True), from_logits=True
            )
        )
    grads = tape.gradient(loss, new.trainable_variables)
    optimizer.apply_gradients(zip(grads, new.trainable_variables, strict=True))
    for layer in binarized_layers(new):
        assert np_max_row_l1(layer.kernel.latent_variable.numpy()) <= max_norm * (
            1 + 1e-5
        )
    # Layers that are not binarized keep their kernels free.
    assert np_max_row_l1(new.get_layer("logits").kernel.numpy()) > 0


def test_larq_zoo_model(caplog):
    tf.keras.utils.set_random_seed(1)
    model = models.get("quicknet")
    regularizer = L1InfLipschitz(STRENGTH)
    constraint = L1InfConstraint(max_norm=30.0, clip_value=1.25)
    with caplog.at_level(logging.WARNING):
        new = apply_lipschitz(model, regularizer=regularizer, constraint=constraint)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(new(x).numpy(), model(x).numpy())
    _assert_same_weights(model, new)
    _assert_controls(model, new, regularizer, constraint)
    assert len(binarized_layers(new)) == 16 == len(new.losses)
    # QuickNet's unscaled SteSign makes the kernel penalty a no-op; the check says so.
    assert "cannot change the deployed L1,inf bound" in caplog.text


def test_select_on_a_full_precision_model_keeps_synchronized_bn(caplog):
    teacher = models.get(
        "resnet20", weight_bits=32, activation_bits=32, synchronized_bn=True
    )
    with caplog.at_level(logging.WARNING, logger="larq_lipschitz.apply"):
        unchanged = apply_lipschitz(teacher, regularizer=L1InfLipschitz(STRENGTH))
    assert "has no binarized layer; nothing was attached" in caplog.text
    assert unchanged.losses == []

    def quant_convs(layer):
        return isinstance(layer, lq.layers.QuantConv2D)

    new = apply_lipschitz(teacher, regularizer="l2", select=quant_convs)
    chosen = [lay for lay in new.layers if quant_convs(lay)]
    assert len(chosen) == 18 == len(new.losses)
    regs = [lay.kernel_regularizer for lay in chosen]
    assert all(isinstance(r, tf.keras.regularizers.L2) for r in regs)
    assert len({id(r) for r in regs}) == 18
    bns = [
        lay for lay in new.layers if isinstance(lay, tf.keras.layers.BatchNormalization)
    ]
    assert bns and all(bn.synchronized for bn in bns)


def test_under_a_mirrored_strategy(mirrored_strategy):
    with mirrored_strategy.scope():
        model = models.get("resnet20", synchronized_bn=True)
        new = apply_lipschitz(model, regularizer=L1InfLipschitz(STRENGTH))
    gamma = new.get_layer("stage1_block1_bn1").gamma
    assert isinstance(gamma, tf.distribute.DistributedValues)
    assert len(mirrored_strategy.experimental_local_results(gamma)) == 2
    assert new.get_layer("stage1_block1_bn1").synchronized
    _assert_same_weights(model, new)


def _depthwise_and_nested_model():
    inner = tf.keras.Sequential(
        [
            tf.keras.Input((4, 4, 3)),
            lq.layers.QuantDepthwiseConv2D(
                3,
                padding="same",
                depthwise_quantizer="magnitude_aware_sign",
                depthwise_constraint="weight_clip",
                name="dw",
            ),
        ],
        name="inner",
    )
    inputs = tf.keras.Input((4, 4, 3))
    x = inner(inputs)
    x = tf.keras.layers.Flatten()(x)
    x = lq.layers.QuantDense(
        5,
        input_quantizer="ste_sign",
        kernel_quantizer="magnitude_aware_sign",
        kernel_constraint="weight_clip",
        name="qdense",
    )(x)
    outputs = tf.keras.layers.Dense(2, name="head")(x)
    return tf.keras.Model(inputs, outputs)


def test_depthwise_and_nested_layers():
    tf.keras.utils.set_random_seed(2)
    model = _depthwise_and_nested_model()
    new = apply_lipschitz(model, regularizer=L1InfLipschitz(STRENGTH))
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(new(x).numpy(), model(x).numpy())
    dw = new.get_layer("inner").get_layer("dw")
    assert isinstance(dw.depthwise_regularizer, L1InfLipschitz)
    assert dw.depthwise_regularizer.layout == "depthwise"  # "auto" would misread it
    assert isinstance(dw.depthwise_constraint, lq.constraints.WeightClip)
    assert new.get_layer("qdense").kernel_regularizer.layout == "auto"
    assert new.get_layer("head").kernel_regularizer is None
    assert len(new.losses) == 2
    # Depthwise rows: one per (channel, multiplier), the kh*kw taps of that channel.
    kernel = dw.depthwise_kernel.latent_variable.numpy()
    expected = STRENGTH * np.abs(kernel).sum(axis=(0, 1)).max()
    np.testing.assert_allclose(float(dw.losses[0]), expected, rtol=1e-5)


def test_plain_function_regularizer_is_shared():
    calls = []

    def penalty(kernel):
        calls.append(kernel.shape)
        return tf.reduce_sum(tf.abs(kernel)) * 0.0

    model = _depthwise_and_nested_model()
    new = apply_lipschitz(model, regularizer=penalty)
    assert new.get_layer("qdense").kernel_regularizer is penalty
    assert new.get_layer("inner").get_layer("dw").depthwise_regularizer is penalty


def test_errors():
    model = _depthwise_and_nested_model()
    with pytest.raises(ValueError, match="give a regularizer, a constraint or both"):
        apply_lipschitz(model)
    with pytest.raises(ValueError, match="regularizer must be"):
        apply_lipschitz(model, regularizer=3)
    with pytest.raises(ValueError, match="must be a tf.keras.Model"):
        apply_lipschitz(tf.keras.layers.Dense(2), regularizer="l2")
    with pytest.raises(ValueError, match="not a dense, convolution or depthwise"):
        apply_lipschitz(
            model,
            regularizer="l2",
            select=lambda layer: isinstance(layer, tf.keras.layers.Flatten),
        )

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = lq.layers.QuantDense(
                2, kernel_quantizer="magnitude_aware_sign"
            )

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(tf.zeros((1, 3)))
    with pytest.raises(ValueError, match="subclassed model"):
        apply_lipschitz(sub, regularizer="l2")
