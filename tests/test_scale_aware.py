"""Scale-aware control: folded conv+BatchNorm bounds, model penalty, the checks."""

import logging

import larq_lipschitz.scale_aware as sa  # noqa: I001  (Keras 2 first)
from larq_lipschitz.constraints import L1InfConstraint
from larq_lipschitz.quantization import quantizer_kind
from larq_lipschitz.regularizers import L1InfLipschitz, SpectralNormLipschitz

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

LOGGER = "larq_lipschitz.scale_aware"


# --- NumPy references ---------------------------------------------------------------


def np_quantize(kernel, quantizer):
    k = np.asarray(kernel, np.float64)
    sign = np.where(k >= 0, 1.0, -1.0)  # Larq's sign maps 0 to +1
    if quantizer is None:
        return k
    if quantizer == "ste_sign":
        return sign
    if quantizer == "magnitude_aware_sign":
        return np.abs(k).mean(axis=tuple(range(k.ndim - 1))) * sign
    raise ValueError(quantizer)


def np_row_norms(kernel):
    k = np.asarray(kernel, np.float64)
    return np.array([np.abs(k[..., o]).sum() for o in range(k.shape[-1])])


def np_gain(bn, variance):
    gamma = np.abs(bn.gamma.numpy().astype(np.float64))
    return gamma / np.sqrt(np.asarray(variance, np.float64) + bn.epsilon)


def _randomize_bn(bn, rng):
    c = bn.gamma.shape[0]
    bn.gamma.assign(rng.normal(size=c).astype(np.float32))
    bn.beta.assign(rng.normal(size=c).astype(np.float32))
    bn.moving_mean.assign(rng.normal(size=c).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.1, 3.0, size=c).astype(np.float32))


def _latent(layer):
    kernel = getattr(layer.kernel, "latent_variable", layer.kernel)
    return tf.convert_to_tensor(kernel).numpy()


def make_model(quantizer="magnitude_aware_sign", epsilon=1e-3, reg=None):
    """FP stem + BN; binary conv -> pool -> BN; binary conv feeding a BN and a shortcut;
    binary dense + BN; FP head without BN."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(
        inputs
    )
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    x = lq.layers.QuantConv2D(
        6,
        3,
        padding="same",
        input_quantizer="ste_sign",
        kernel_quantizer=quantizer,
        kernel_constraint="weight_clip",
        kernel_regularizer=reg,
        use_bias=False,
        name="qconv",
    )(x)
    x = tf.keras.layers.MaxPooling2D(name="pool")(x)
    x = tf.keras.layers.BatchNormalization(epsilon=epsilon, name="qconv_bn")(x)
    y = lq.layers.QuantConv2D(
        6,
        3,
        padding="same",
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
        name="shared",
    )(x)
    y = tf.keras.layers.BatchNormalization(name="shared_bn")(y)
    x = tf.keras.layers.Add()([x, y])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = lq.layers.QuantDense(
        5,
        input_quantizer="ste_sign",
        kernel_quantizer=quantizer,
        kernel_constraint="weight_clip",
        use_bias=False,
        name="qdense",
    )(x)
    x = tf.keras.layers.BatchNormalization(name="qdense_bn")(x)
    outputs = tf.keras.layers.Dense(3, name="head")(x)
    model = tf.keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            _randomize_bn(layer, rng)
    return model


def _x(n=6, seed=2):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


# --- blocks and bounds ---------------------------------------------------------------


def test_find_blocks_pairs_each_layer_with_its_batchnorm():
    model = make_model()
    blocks = {b.layer.name: b for b in sa.find_blocks(model)}
    assert sorted(blocks) == ["qconv", "qdense", "shared"]
    assert blocks["qconv"].batchnorm.name == "qconv_bn"
    assert [layer.name for layer in blocks["qconv"].between] == ["pool"]
    assert blocks["qconv"].host.name == "pool"
    assert blocks["shared"].batchnorm.name == "shared_bn"
    assert blocks["qdense"].batchnorm.name == "qdense_bn"
    everything = {b.layer.name: b for b in sa.find_blocks(model, "all")}
    assert sorted(everything) == ["head", "qconv", "qdense", "shared", "stem"]
    assert everything["stem"].batchnorm.name == "stem_bn"
    assert everything["head"].batchnorm is None


def test_a_second_consumer_breaks_the_pairing():
    inputs = tf.keras.Input((6,))
    dense = lq.layers.QuantDense(4, kernel_quantizer="ste_sign", name="q")
    h = dense(inputs)
    outputs = tf.keras.layers.Concatenate()(
        [tf.keras.layers.BatchNormalization()(h), h]
    )
    (block,) = sa.find_blocks(tf.keras.Model(inputs, outputs))
    assert block.batchnorm is None


def test_sequential_and_subclassed_models():
    seq = tf.keras.Sequential(
        [
            tf.keras.Input((5,)),
            lq.layers.QuantDense(4, kernel_quantizer="magnitude_aware_sign", name="q"),
            tf.keras.layers.BatchNormalization(name="bn"),
        ]
    )
    (block,) = sa.find_blocks(seq)
    assert block.batchnorm.name == "bn"

    class Sub(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.q = lq.layers.QuantDense(4, kernel_quantizer="ste_sign")

        def call(self, x):
            return self.q(x)

    sub = Sub()
    sub(tf.zeros((1, 5)))
    with pytest.raises(ValueError, match="has no layer graph"):
        sa.find_blocks(sub)
    with pytest.raises(ValueError, match="has no layer graph"):
        sa.add_scale_aware_penalty(sub, 1e-3)
    assert sa.check_lipschitz_controls(sub) == []


@pytest.mark.parametrize("quantizer", ["magnitude_aware_sign", "ste_sign", None])
def test_folded_bounds_match_numpy(quantizer):
    model = make_model(quantizer)
    for name, bn_name in [("qconv", "qconv_bn"), ("qdense", "qdense_bn")]:
        layer, bn = model.get_layer(name), model.get_layer(bn_name)
        got = sa.folded_row_bounds(layer, bn).numpy()
        expected = np_gain(bn, bn.moving_variance.numpy()) * np_row_norms(
            np_quantize(_latent(layer), quantizer)
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        variance = np.random.default_rng(3).uniform(0.5, 2, size=bn.gamma.shape[0])
        got = sa.folded_row_bounds(layer, bn, variance).numpy()
        expected = np_gain(bn, variance) * np_row_norms(
            np_quantize(_latent(layer), quantizer)
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    bounds = sa.effective_bounds(model)
    for block in sa.find_blocks(model, "all"):
        layer = block.layer
        q = (
            quantizer
            if layer.name in ("qconv", "qdense")
            else ("ste_sign" if layer.name == "shared" else None)
        )
        rows = np_row_norms(np_quantize(_latent(layer), q))
        if block.batchnorm is not None:
            rows = rows * np_gain(
                block.batchnorm, block.batchnorm.moving_variance.numpy()
            )
        assert bounds[layer.name] == pytest.approx(rows.max(), rel=1e-5)


def test_folded_bound_is_the_exact_lipschitz_constant_in_inference():
    """Two sign patterns attain the bound through the real conv + BatchNorm."""
    tf.keras.utils.set_random_seed(4)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((3, 3, 4)),
            lq.layers.QuantConv2D(
                5, 3, kernel_quantizer="magnitude_aware_sign", use_bias=False
            ),
            tf.keras.layers.BatchNormalization(),
        ]
    )
    _randomize_bn(model.layers[1], np.random.default_rng(5))
    conv = model.layers[0]
    bounds = sa.folded_row_bounds(conv, model.layers[1]).numpy()
    q = np_quantize(_latent(conv), "magnitude_aware_sign")
    for o in range(5):
        x1 = np.where(q[..., o] >= 0, 1.0, -1.0)[None].astype(np.float32)
        y1, y2 = model(x1, training=False).numpy(), model(-x1, training=False).numpy()
        assert abs(y1[0, 0, 0, o] - y2[0, 0, 0, o]) / 2 == pytest.approx(
            bounds[o], rel=1e-4
        )
    assert sa.effective_bounds(model)[conv.name] == pytest.approx(
        bounds.max(), rel=1e-6
    )


def test_constant_quantizer_holds_the_kernel_factor():
    for quantizer, moves in [
        ("ste_sign", False),
        ("magnitude_aware_sign", True),
        (None, True),
    ]:
        layer = lq.layers.QuantDense(4, kernel_quantizer=quantizer)
        layer.build((None, 6))
        with tf.GradientTape() as tape:
            value = tf.reduce_max(sa.folded_row_bounds(layer))
        grad = tape.gradient(
            value, layer.kernel.latent_variable if quantizer else layer.kernel
        )
        assert (grad is not None and np.any(grad.numpy() != 0)) == moves, quantizer


# --- the whole-model penalty ---------------------------------------------------------


def _batch_penalty_reference(model, x, strength, blocks=("qconv", "qdense")):
    total = 0.0
    by_name = {b.layer.name: b for b in sa.find_blocks(model)}
    for name in blocks:
        block = by_name[name]
        probe = tf.keras.Model(model.input, block.host.output)
        h = probe(x, training=True).numpy().astype(np.float64)
        variance = h.reshape(-1, h.shape[-1]).var(axis=0)
        q = np_quantize(_latent(block.layer), "magnitude_aware_sign")
        total += strength * (np_gain(block.batchnorm, variance) * np_row_norms(q)).max()
    return total


def test_batch_statistics_penalty_matches_numpy():
    model = make_model()
    penalized = sa.add_scale_aware_penalty(model, 0.01)
    assert penalized == ["qconv", "shared", "qdense"]
    x = _x()
    model(x, training=True)
    assert len(model.losses) == 3
    by_layer = {b.layer.name: b for b in sa.find_blocks(model)}
    expected = _batch_penalty_reference(model, x, 0.01)
    # The ste_sign block "shared" counts too: its bound moves with gamma and variance.
    h = tf.keras.Model(model.input, by_layer["shared"].host.output)(
        x, training=True
    ).numpy()
    var = h.reshape(-1, 6).astype(np.float64).var(axis=0)
    expected += 0.01 * (np_gain(by_layer["shared"].batchnorm, var) * 54.0).max()
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-4)


def test_batch_penalty_ignores_the_kernel_scale_and_the_moving_one_does_not():
    model = make_model(epsilon=1e-5)
    qconv = model.get_layer("qconv")
    x = _x()
    sa.add_scale_aware_penalty(model, 1.0)

    def total():
        model(x, training=True)
        return float(tf.add_n(model.losses))

    before = total()
    qconv.kernel.latent_variable.assign(qconv.kernel.latent_variable * 0.5)
    assert total() == pytest.approx(before, rel=1e-3)
    # With the moving variance the qconv term follows the kernel's scale.
    sa.add_scale_aware_penalty(model, 1.0, statistics="moving")
    bn = model.get_layer("qconv_bn")
    model(x, training=False)
    halved = float(tf.add_n(model.losses))
    term = float(tf.reduce_max(sa.folded_row_bounds(qconv, bn)))
    qconv.kernel.latent_variable.assign(qconv.kernel.latent_variable * 2.0)
    model(x, training=False)
    assert float(tf.add_n(model.losses)) == pytest.approx(halved + term, rel=1e-5)


def test_moving_penalty_acts_through_gamma_only():
    model = make_model()
    sa.add_scale_aware_penalty(model, 0.5, statistics="moving")
    qconv, bn = model.get_layer("qconv"), model.get_layer("qconv_bn")
    with tf.GradientTape() as tape:
        model(_x(), training=False)  # inference: the moving statistics stay put
        total = tf.add_n(model.losses)
    g_kernel, g_gamma = tape.gradient(total, [qconv.kernel.latent_variable, bn.gamma])
    assert g_kernel is None or not np.any(g_kernel.numpy())
    rows = np_gain(bn, bn.moving_variance.numpy()) * np_row_norms(
        np_quantize(_latent(qconv), "magnitude_aware_sign")
    )
    o = int(np.argmax(rows))
    expected = np.zeros(6)
    gamma = bn.gamma.numpy()
    expected[o] = (
        0.5 * np.sign(gamma[o]) / np.sqrt(bn.moving_variance.numpy()[o] + bn.epsilon)
    )
    expected[o] *= np_row_norms(np_quantize(_latent(qconv), "magnitude_aware_sign"))[o]
    np.testing.assert_allclose(g_gamma.numpy(), expected, rtol=1e-4, atol=1e-7)
    expected_total = 0.5 * rows.max()
    for name, bn_name in [("shared", "shared_bn"), ("qdense", "qdense_bn")]:
        q = "ste_sign" if name == "shared" else "magnitude_aware_sign"
        block_bn = model.get_layer(bn_name)
        expected_total += (
            0.5
            * (
                np_gain(block_bn, block_bn.moving_variance.numpy())
                * np_row_norms(np_quantize(_latent(model.get_layer(name)), q))
            ).max()
        )
    assert float(total) == pytest.approx(expected_total, rel=1e-5)


def test_excess_modes_and_replacement():
    model = make_model()
    x = _x()
    sa.add_scale_aware_penalty(model, 1.0, mode="excess", target=1e6)
    model(x, training=True)
    assert float(tf.add_n(model.losses)) == 0.0
    sa.add_scale_aware_penalty(model, 1.0, mode="excess_sum", target=0.0)
    model(x, training=True)
    assert len(model.losses) == 3 and float(tf.add_n(model.losses)) > 0
    sa.remove_scale_aware_penalty(model)
    model(x, training=True)
    assert model.losses == []


def test_bad_arguments_and_other_losses_untouched():
    model = make_model()
    with pytest.raises(ValueError, match="statistics must be one of"):
        sa.add_scale_aware_penalty(model, 1.0, statistics="running")
    with pytest.raises(
        ValueError, match="strength must be a finite number >= 0, got -1"
    ):
        sa.add_scale_aware_penalty(model, -1)
    with pytest.raises(ValueError, match="needs a target"):
        sa.add_scale_aware_penalty(model, 1.0, mode="excess")
    model.get_layer("pool").activity_regularizer = tf.keras.regularizers.L2(0.5)
    x = _x()
    model(x, training=True)
    (activity,) = model.losses
    sa.add_scale_aware_penalty(model, 0.0)
    model(x, training=True)
    assert len(model.losses) == 4
    assert float(tf.add_n(model.losses)) == pytest.approx(float(activity), rel=1e-6)
    sa.remove_scale_aware_penalty(model)
    model(x, training=True)
    assert len(model.losses) == 1


def test_unmovable_block_is_skipped_with_a_warning(caplog):
    inputs = tf.keras.Input((6,))
    outputs = lq.layers.QuantDense(4, kernel_quantizer="ste_sign", name="fixed")(inputs)
    model = tf.keras.Model(inputs, outputs)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert sa.add_scale_aware_penalty(model, 1.0) == []
    assert "'fixed' has no BatchNorm after it" in caplog.text


@pytest.mark.parametrize("statistics", ["batch", "moving"])
def test_fit_picks_the_penalty_up_under_mirrored_strategy(
    mirrored_strategy, statistics
):
    rng = np.random.default_rng(6)
    x = _x(16)
    y = rng.integers(0, 3, size=16)
    gammas = {}
    for strength in (0.0, 1.0):
        with mirrored_strategy.scope():
            model = make_model()
            sa.add_scale_aware_penalty(model, strength, statistics=statistics)
            model.compile(
                tf.keras.optimizers.SGD(0.05),
                tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        assert np.all(np.isfinite(history.history["loss"]))
        gammas[strength] = np.abs(model.get_layer("qconv_bn").gamma.numpy()).max()
    assert gammas[1.0] < gammas[0.0] - 0.05


@pytest.mark.parametrize("statistics", ["batch", "moving"])
@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_attached_penalty_is_not_saved(tmp_path, fmt, statistics):
    model = make_model()
    sa.add_scale_aware_penalty(model, 0.1, statistics=statistics)
    sa.add_scale_aware_penalty(
        model, 0.1, statistics=statistics
    )  # replacing is harmless
    model.compile("adam", "mse")
    x = _x()
    model(x, training=True)
    assert len(model.losses) == 3
    path = str(tmp_path / ("model" if fmt == "savedmodel" else f"model.{fmt}"))
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )
    loaded(x, training=True)
    assert loaded.losses == []
    assert sa.add_scale_aware_penalty(loaded, 0.1) == ["qconv", "shared", "qdense"]
    loaded(x, training=True)
    assert len(loaded.losses) == 3
    clone = tf.keras.models.clone_model(model)
    clone(x, training=True)
    assert clone.losses == []


# --- check_lipschitz_controls --------------------------------------------------------

QUANTIZERS = {
    "ste_sign": ("ste_sign", True),
    "SteSign": (lq.quantizers.SteSign(clip_value=1.25), True),
    "approx_sign": ("approx_sign", True),
    "swish_sign": (lq.quantizers.SwishSign(), True),
    "fn_ste_sign": (lq.quantizers.ste_sign, True),
    "dorefa_1bit": (lq.quantizers.DoReFa(k_bit=1, mode="weights"), True),
    "magnitude_aware_sign": ("magnitude_aware_sign", False),
    "none": (None, False),
    "noop": (lq.quantizers.NoOp(precision=1), False),
    "ste_tern": ("ste_tern", False),
    "dorefa_2bit": (lq.quantizers.DoReFa(k_bit=2, mode="weights"), False),
}


def np_row_norms_are_constant(quantizer, rng):
    """Independent evidence for the classification: q(W) row norms of random kernels."""
    q = (
        tf.keras.layers.Lambda(lambda k: k)
        if quantizer is None
        else lq.quantizers.get(quantizer)
    )
    norms = []
    for scale in (0.01, 0.3, 1.0):
        kernel = (rng.normal(size=(9, 4)) * scale).astype(np.float32)
        norms.append(np.abs(np.asarray(q(tf.constant(kernel)))).sum(axis=0))
    return np.allclose(np.concatenate(norms), 9.0)


@pytest.mark.parametrize("control", ["regularizer", "constraint"])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_no_op_warning_fires_exactly_for_constant_quantizers(name, control, caplog):
    quantizer, constant = QUANTIZERS[name]
    assert np_row_norms_are_constant(quantizer, np.random.default_rng(7)) == constant
    assert (quantizer_kind(quantizer) == "constant") == constant
    kwargs = (
        {"kernel_regularizer": L1InfLipschitz()}
        if control == "regularizer"
        else {"kernel_constraint": L1InfConstraint(5.0)}
    )
    inputs = tf.keras.Input((9,))
    x = lq.layers.QuantDense(4, kernel_quantizer=quantizer, name="q", **kwargs)(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(x))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        problems = sa.check_lipschitz_controls(model)
    noop = [p for p in problems if "cannot change the deployed L1,inf bound" in p]
    assert len(noop) == (1 if constant else 0)
    assert len(problems) == len(noop)
    assert ("cannot change the deployed L1,inf bound" in caplog.text) == constant
    if constant:
        assert "the constant n = 9" in noop[0] and "'q'" in noop[0]


@pytest.mark.parametrize("quantizer", ["magnitude_aware_sign", "ste_sign", None])
def test_batchnorm_absorption_is_reported(quantizer, caplog):
    model = make_model(quantizer, reg=L1InfLipschitz())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        problems = sa.check_lipschitz_controls(model)
    assert len(problems) == 1
    if quantizer == "ste_sign":
        assert "cannot change the deployed L1,inf bound" in problems[0]
    else:
        assert "'qconv_bn' after it divides the kernel's scale back out" in problems[0]
    assert problems[0] in caplog.text


def test_layout_spectral_and_unsupported_checks(caplog):
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.DepthwiseConv2D(
        3, depthwise_regularizer=L1InfLipschitz(), name="dw_auto"
    )(inputs)
    x = tf.keras.layers.DepthwiseConv2D(
        3, depthwise_constraint=L1InfConstraint(2.0, layout="depthwise"), name="dw_ok"
    )(x)
    x = lq.layers.QuantConv2D(
        4,
        3,
        kernel_quantizer="ste_sign",
        kernel_regularizer=SpectralNormLipschitz(),
        name="sn_latent",
    )(x)
    x = lq.layers.QuantConv2D(
        4,
        1,
        kernel_quantizer="ste_sign",
        kernel_regularizer=SpectralNormLipschitz(on="effective", quantizer="ste_sign"),
        name="sn_ok",
    )(x)
    x = lq.layers.QuantConv2D(
        4,
        1,
        kernel_quantizer="magnitude_aware_sign",
        kernel_regularizer=SpectralNormLipschitz(on="effective", quantizer="ste_sign"),
        name="sn_bad",
    )(x)
    x = tf.keras.layers.SeparableConv2D(
        4, 1, depthwise_regularizer=L1InfLipschitz(), name="sep"
    )(x)
    model = tf.keras.Model(inputs, x)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        problems = sa.check_lipschitz_controls(model)
    by_layer = {}
    for p in problems:
        by_layer.setdefault(p.split("'")[1], []).append(p)
    assert sorted(by_layer) == ["dw_auto", "sep", "sn_bad", "sn_latent"]
    assert "pass layout='depthwise'" in by_layer["dw_auto"][0]
    assert "use on='effective'" in by_layer["sn_latent"][0]
    assert (
        "quantizes with SteSign, but the layer uses MagnitudeAwareSign"
        in by_layer["sn_bad"][0]
    )
    assert "are not read as one row per output unit" in by_layer["sep"][0]
    assert all(len(v) == 1 for v in by_layer.values())
    # More than three problems: the first two are logged, then a count of the rest.
    logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert logged[:2] == problems[:2]
    assert logged[2:] == [
        f"... and {len(problems) - 2} more layers with a problem of the same kinds; "
        "check_lipschitz_controls(model) returns the full list."
    ]


def test_clean_model_has_no_problems(caplog):
    inputs = tf.keras.Input((9,))
    x = lq.layers.QuantDense(
        4,
        kernel_quantizer="magnitude_aware_sign",
        kernel_regularizer=L1InfLipschitz(),
        kernel_constraint=L1InfConstraint(3.0, clip_value=1.0),
    )(inputs)
    x = tf.keras.layers.Dense(2, kernel_regularizer="l1inf_lipschitz")(x)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert sa.check_lipschitz_controls(tf.keras.Model(inputs, x)) == []
    assert caplog.text == ""
