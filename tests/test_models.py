"""The model registry: every model at every bit width, against NumPy references."""

import functools
import json

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow)
from larq_lipschitz import models
from larq_lipschitz.apply import binarized_layers
from larq_lipschitz.models import cifar, zoo
from larq_lipschitz.quantization import is_binarized

import larq as lq
import larq_zoo
import numpy as np
import pytest
import tensorflow as tf

CIFAR = ["resnet20", "resnet20-basic", "resnet18", "vgg-small"]
ZOO = ["birealnet", "binary-resnet-e18", "quicknet"]
WIDTHS = [(1, 1), (1, 32), (32, 32)]
STAGES = {
    "resnet20": 3,
    "resnet20-basic": 3,
    "resnet18": 4,
    "vgg-small": 3,
    "birealnet": 4,
    "binary-resnet-e18": 4,
    "quicknet": 4,
}
NUM_CLASSES = 7  # not 10, so that a default cannot pass for the argument
ZOO_CONSTRUCTORS = {
    "birealnet": larq_zoo.literature.BiRealNet,
    "binary-resnet-e18": larq_zoo.literature.BinaryResNetE18,
    "quicknet": larq_zoo.sota.QuickNet,
}


def np_sign(x):
    """Larq's sign: +1 for x >= 0, -1 otherwise."""
    return np.where(x >= 0, 1.0, -1.0)


def np_conv_same(x, kernel, stride):
    """NHWC convolution with TensorFlow's 'same' zero padding, by explicit sums."""
    _, h, w, _ = x.shape
    kh, kw, _, _ = kernel.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)])
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride, :]
            out += np.einsum("nhwc,co->nhwo", patch, kernel[i, j])
    return out


def resnet_param_count(stem, stages, blocks, conv_shortcut, classes, channels=3):
    """Trainable parameters of the CIFAR ResNets, from the architecture description."""
    count = 9 * channels * stem + 2 * stem  # stem conv + BN
    c = stem
    for filters in stages:
        for _ in range(blocks):
            for _ in range(2):  # two 3x3 convs + BN per block
                count += 9 * c * filters + 2 * filters
                if conv_shortcut and c != filters:
                    count += c * filters + 2 * filters  # 1x1 conv + BN
                c = filters
    return count + 2 * c + c * classes + classes  # head BN + dense


def vgg_small_param_count(classes, channels=3, side=32):
    count = 9 * channels * 128 + 2 * 128
    c = 128
    for filters in (128, 256, 256, 512, 512):
        count += 9 * c * filters + 2 * filters
        c = filters
    return count + (side // 8) ** 2 * 512 * classes + classes


@pytest.fixture(scope="module")
def resnet20():
    tf.keras.utils.set_random_seed(0)
    return models.get("resnet20")


def _train_one_step(model, batch=2):
    x = tf.random.uniform((batch, *model.input_shape[1:]), seed=1)
    y = tf.constant(np.arange(batch) % model.output_shape[-1])
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    optimizer = tf.keras.optimizers.Adam(1e-3)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
        loss += tf.add_n(model.losses) if model.losses else 0.0
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return float(loss), before


# --------------------------------------------------------------------------- registry


def test_available_names():
    assert models.available() == CIFAR + ZOO


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="Unknown model 'resnet21'") as info:
        models.get("resnet21")
    for name in models.available():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("ResNet20", "resnet20"),
        ("resnet20_basic", "resnet20-basic"),
        ("VGG_Small", "vgg-small"),
        ("BiRealNet", "birealnet"),
        ("BinaryResNetE18", "binary-resnet-e18"),
        ("binary_resnet_e_18", "binary-resnet-e18"),
        ("QuickNet", "quicknet"),
    ],
)
def test_aliases(alias, name):
    assert models.entry(alias).name == name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 4}, "supported W/A: 1/1, 1/32, 32/32"),
        ({"weight_bits": 2, "activation_bits": 2}, "supported W/A"),
        ({"weight_bits": 32, "activation_bits": 1}, "supported W/A"),
        ({"weight_bits": True}, "weight_bits must be an integer"),
        (
            {"weight_bits": 32, "activation_bits": 32, "kernel_quantizer": "ste_sign"},
            "only used with weight_bits=1",
        ),
        ({"kernel_quantizer": lq.quantizers.DoReFa(k_bit=2)}, "1-bit kernel quantizer"),
        ({"kernel_quantizer": "no_such_quantizer"}, "kernel_quantizer"),
        ({"kernel_regularizer": 3}, "kernel_regularizer must be"),
        ({"num_classes": 0}, "num_classes must be an integer >= 1"),
        ({"input_shape": (32, 32)}, "input_shape must be"),
        ({"weights": "imagenet"}, "no published 'imagenet' weights"),
        ({"mean": (0.5, 0.5)}, "one value per input channel"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be a finite number > 0"),
        ({"shortcut": "projection"}, "shortcut must be one of"),
        ({"synchronized_bn": 1}, "synchronized_bn must be a bool"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.get("resnet20", **kwargs)


def test_numpy_integers_are_accepted():
    model = models.get(
        "resnet20",
        num_classes=np.int64(5),
        input_shape=tuple(np.array([16, 16, 3])),
        weight_bits=np.int32(1),
    )
    assert model.output_shape == (None, 5) and model.input_shape == (None, 16, 16, 3)


def test_unexpected_keyword_and_missing_weights(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument.*shortcut"):
        models.get("vgg-small", shortcut="pad")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.get("resnet20", weights=tmp_path / "missing.weights.h5")


def test_zoo_imagenet_needs_imagenet_shape():
    with pytest.raises(ValueError, match="needs num_classes=1000"):
        models.get("quicknet", weights="imagenet")


def test_zoo_imagenet_offline_fails_clearly(monkeypatch):
    # What tf.keras.utils.get_file raises without network, without touching the network.
    def offline(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://github.com/larq/zoo/releases/download/x: None "
            "-- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(larq_zoo.core.utils, "download_pretrained_model", offline)
    with pytest.raises(
        OSError, match="could not fetch the larq-zoo ImageNet weights"
    ) as info:
        models.get(
            "binary-resnet-e18",
            weights="imagenet",
            num_classes=1000,
            input_shape=(224, 224, 3),
        )
    assert "Temporary failure in name resolution" in str(info.value)
    assert "weights=None" in str(info.value)


# ------------------------------------------------------- every model, every bit width


def _check_cifar_quantizers(model, name, weight_bits, activation_bits):
    quant = [lay for lay in model.layers if isinstance(lay, lq.layers.QuantConv2D)]
    assert len(quant) == {"vgg-small": 5, "resnet18": 16}.get(name, 18)
    for layer in quant:
        if activation_bits == 1:
            assert isinstance(layer.input_quantizer, lq.quantizers.SteSign)
        else:
            assert layer.input_quantizer is None
        if weight_bits == 1:
            assert isinstance(layer.kernel_quantizer, lq.quantizers.MagnitudeAwareSign)
            assert isinstance(layer.kernel_constraint, lq.constraints.WeightClip)
        else:
            assert layer.kernel_quantizer is None
            assert layer.kernel_constraint is None
    # First and last layers: plain Keras layers, full precision.
    assert type(model.get_layer("stem_conv")) is tf.keras.layers.Conv2D
    assert type(model.get_layer("logits")) is tf.keras.layers.Dense
    assert len(binarized_layers(model)) == (len(quant) if weight_bits == 1 else 0)


@functools.lru_cache
def _larq_zoo_layers(name):
    """larq-zoo's own model by layer: (type, input q., kernel q., clip, constraint)."""
    original = ZOO_CONSTRUCTORS[name](
        input_shape=(32, 32, 3), weights=None, num_classes=NUM_CLASSES
    )
    assert original.layers[-1].get_config()["activation"] == "softmax"
    rows = []
    for layer in original.layers[:-1]:  # without the softmax
        kq = getattr(layer, "kernel_quantizer", None)
        rows.append(
            (
                type(layer),
                type(getattr(layer, "input_quantizer", None)),
                type(kq),
                None if kq is None else kq.get_config()["clip_value"],
                type(getattr(layer, "kernel_constraint", None)),
            )
        )
    return rows


def _check_zoo_quantizers(model, name, weight_bits, activation_bits):
    ours = [lay for lay in model.layers if lay.name != "normalize"]
    theirs = _larq_zoo_layers(name)
    assert [type(lay) for lay in ours] == [row[0] for row in theirs]
    n_binarized = 0
    for mine, (_, input_q, kernel_q, clip, constraint) in zip(
        ours, theirs, strict=True
    ):
        if kernel_q is type(None):
            assert not is_binarized(mine)
            continue
        n_binarized += 1
        if activation_bits == 1:
            assert type(mine.input_quantizer) is input_q
            assert mine.input_quantizer.precision == 1
        else:
            assert mine.input_quantizer is None
        if weight_bits == 1:
            assert type(mine.kernel_quantizer) is kernel_q
            assert mine.kernel_quantizer.get_config()["clip_value"] == clip
            assert type(mine.kernel_constraint) is constraint
        else:
            assert mine.kernel_quantizer is None and mine.kernel_constraint is None
    assert n_binarized == 16
    assert model.get_layer("normalize") is model.layers[1]
    assert model.layers[-1].get_config().get("activation") != "softmax"


@pytest.mark.parametrize("weight_bits, activation_bits", WIDTHS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", CIFAR + ZOO)
def test_every_model_every_width(name, weight_bits, activation_bits):
    tf.keras.utils.set_random_seed(0)
    model = models.get(
        name,
        num_classes=NUM_CLASSES,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
    )
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, NUM_CLASSES)
    assert not any(isinstance(lay, tf.keras.layers.Lambda) for lay in model.layers)
    if name in CIFAR:
        _check_cifar_quantizers(model, name, weight_bits, activation_bits)
    else:
        _check_zoo_quantizers(model, name, weight_bits, activation_bits)

    # Stage outputs, in order, with shrinking resolution.
    stages = models.stage_output_names(model)
    assert stages == [f"stage{k}_out" for k in range(1, STAGES[name] + 1)]
    sides = [model.get_layer(s).output_shape[1] for s in stages]
    assert sides == sorted(sides, reverse=True) and len(set(sides)) == len(sides)

    # One training step: finite loss and weights, every binarized kernel moves, and
    # the weight clip holds afterwards.
    loss, before = _train_one_step(model)
    assert np.isfinite(loss)
    for variable in model.trainable_variables:
        assert np.all(np.isfinite(variable.numpy())), variable.name
    for layer in binarized_layers(model):
        latent = layer.kernel.latent_variable.numpy()
        assert not np.array_equal(latent, before[layer.kernel.name])
        clip = layer.kernel_constraint.clip_value
        assert np.max(np.abs(latent)) <= clip + 1e-6


# ------------------------------------------------------------ numerical references


@pytest.mark.parametrize("weight_bits, activation_bits", WIDTHS, ids=lambda v: str(v))
def test_binarized_layer_computes_with_binary_weights_and_inputs(
    weight_bits, activation_bits
):
    tf.keras.utils.set_random_seed(3)
    model = models.get(
        "resnet20", weight_bits=weight_bits, activation_bits=activation_bits
    )
    layer = model.get_layer("stage2_block1_conv1")  # stride 2, 16 -> 32 channels
    latent = layer.get_weights()[0]
    assert len(np.unique(np.abs(latent[..., 0]))) > 2  # the latent kernel is real
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype(np.float32)
    x[0, 0, 0, :4] = 0.0  # Larq's sign maps 0 to +1
    if weight_bits == 1:
        alpha = np.mean(np.abs(latent), axis=(0, 1, 2))  # per output channel
        kernel = alpha * np_sign(latent)
    else:
        kernel = latent
    inputs = np_sign(x) if activation_bits == 1 else x
    expected = np_conv_same(inputs.astype(np.float64), kernel.astype(np.float64), 2)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_normalization_in_pixel_space(resnet20):
    norm = resnet20.get_layer("normalize")
    assert resnet20.layers[1] is norm
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2470, 0.2435, 0.2616])
    np.testing.assert_allclose(norm(x).numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)

    custom = models.get("resnet20", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    np.testing.assert_allclose(
        custom.get_layer("normalize")(x).numpy(),
        (x - 0.5) / np.array([0.25, 0.5, 1.0]),
        rtol=1e-5,
        atol=1e-5,
    )
    gray = models.get("vgg-small", input_shape=(16, 16, 1), mean=(0.13,), std=(0.31,))
    assert gray.output_shape == (None, 10)


@pytest.mark.parametrize(
    "name, expected, published",
    [
        ("resnet20", resnet_param_count(16, (16, 32, 64), 3, False, 10), 0.27e6),
        ("resnet20-basic", resnet_param_count(16, (16, 32, 64), 3, False, 10), 0.27e6),
        ("resnet18", resnet_param_count(64, (64, 128, 256, 512), 2, True, 10), 11.17e6),
        ("vgg-small", vgg_small_param_count(10), 4.66e6),
    ],
)
def test_parameter_counts(name, expected, published):
    model = models.get(name)
    params = models.model_figures(model)["params"]
    assert params == expected  # exact, from the architecture description
    assert (
        abs(params - published) / published < 0.01
    )  # within 1% of the published count


def test_model_figures_match_larq_summary(resnet20):
    figures = models.model_figures(resnet20)
    # The 18 binary 3x3 kernels: 6 of 16->16, 16->32 + 5 of 32->32, 32->64 + 5 64->64.
    binary = 9 * (6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64)
    assert figures["binary_params"] == binary
    profile = lq.models.ModelProfile(
        resnet20
    )  # larq's own figures for `lq.models.summary`
    assert profile.weight_count(bitwidth=1) == binary
    total = resnet20.count_params()
    assert figures["memory_mib"] == round(
        (binary + 32 * (total - binary)) / 8 / 2**20, 3
    )
    assert figures["fp32_memory_mib"] == round(4 * total / 2**20, 3)
    assert figures["binarized_layers"] == 18


def test_describe_rows_are_plain_values():
    rows = models.describe(["resnet20", "vgg-small"])
    assert [r["name"] for r in rows] == ["resnet20", "vgg-small"]
    assert rows[0]["params"] == resnet_param_count(16, (16, 32, 64), 3, False, 10)
    assert rows[1]["binarized_layers"] == 5
    assert rows[0]["bit_widths"] == "1/1, 1/32, 32/32"
    assert json.loads(json.dumps(rows)) == rows
    assert all(r.keys() == rows[0].keys() for r in rows)


def test_teacher_has_the_student_layout(resnet20):
    teacher = models.get("resnet20", weight_bits=32, activation_bits=32)
    assert [lay.name for lay in teacher.layers] == [lay.name for lay in resnet20.layers]
    assert [w.shape for w in teacher.weights] == [w.shape for w in resnet20.weights]
    assert models.stage_output_names(teacher) == models.stage_output_names(resnet20)


def test_stage_output_names_errors():
    inputs = tf.keras.Input((4,))
    plain = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no layers named stage1_out"):
        models.stage_output_names(plain)
    x = tf.keras.layers.Dense(2, name="stage2_out")(inputs)
    with pytest.raises(ValueError, match="numbered"):
        models.stage_output_names(tf.keras.Model(inputs, x))


def test_resnet20_stage_shapes(resnet20):
    shapes = [
        resnet20.get_layer(n).output_shape for n in models.stage_output_names(resnet20)
    ]
    assert shapes == [(None, 32, 32, 16), (None, 16, 16, 32), (None, 8, 8, 64)]


# ------------------------------------------------ quantizer / constraint / regularizer


def test_overrides_reach_exactly_the_binarized_layers():
    from larq_lipschitz.constraints import L1InfConstraint
    from larq_lipschitz.regularizers import L1InfLipschitz

    model = models.get(
        "resnet20",
        kernel_quantizer="ste_sign",
        kernel_constraint=L1InfConstraint(max_norm=20.0, clip_value=1.0),
        kernel_regularizer=L1InfLipschitz(1e-5),
    )
    quant = [lay for lay in model.layers if isinstance(lay, lq.layers.QuantConv2D)]
    regularizers = [lay.kernel_regularizer for lay in quant]
    assert all(isinstance(r, L1InfLipschitz) for r in regularizers)
    assert len({id(r) for r in regularizers}) == len(quant)  # one copy per layer
    for layer in quant:
        assert isinstance(layer.kernel_quantizer, lq.quantizers.SteSign)
        assert isinstance(layer.kernel_constraint, L1InfConstraint)  # replaces the clip
        assert layer.kernel_constraint.max_norm == 20.0
    for name in ("stem_conv", "logits"):
        assert model.get_layer(name).kernel_regularizer is None
        assert model.get_layer(name).kernel_constraint is None
    assert len(model.losses) == 18

    unconstrained = models.get("resnet20", kernel_constraint=models.NO_CONSTRAINT)
    assert all(lay.kernel_constraint is None for lay in binarized_layers(unconstrained))


def test_zoo_overrides_and_regularizer():
    from larq_lipschitz.regularizers import L1InfLipschitz

    model = models.get(
        "quicknet",
        kernel_quantizer="magnitude_aware_sign",
        kernel_constraint=models.NO_CONSTRAINT,
        kernel_regularizer=L1InfLipschitz(1e-5),
        synchronized_bn=True,
    )
    bns = [
        lay
        for lay in model.layers
        if isinstance(lay, tf.keras.layers.BatchNormalization)
    ]
    assert bns and all(bn.synchronized for bn in bns)
    # CIFAR-10 statistics by default (ImageNet ones come with weights="imagenet").
    config = model.get_layer("normalize").get_config()
    np.testing.assert_allclose(config["mean"], cifar.CIFAR10_MEAN)
    np.testing.assert_allclose(
        np.sqrt(config["variance"]), cifar.CIFAR10_STD, rtol=1e-6
    )
    assert zoo.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    # At 32x32 QuickNet is down to a 1x1 map in its last stage.
    assert model.get_layer("stage4_out").output_shape[1:3] == (1, 1)
    layers = binarized_layers(model)
    assert len(layers) == 16 and len(model.losses) == 16
    for layer in layers:
        assert isinstance(layer.kernel_quantizer, lq.quantizers.MagnitudeAwareSign)
        assert layer.kernel_constraint is None
        assert isinstance(layer.kernel_regularizer, L1InfLipschitz)
    others = [
        lay
        for lay in model.layers
        if hasattr(lay, "kernel_regularizer") and lay not in layers
    ]
    assert others and all(lay.kernel_regularizer is None for lay in others)


def test_synchronized_batchnorm():
    model = models.get(
        "resnet20", synchronized_bn=True, weight_bits=32, activation_bits=32
    )
    bns = [
        lay
        for lay in model.layers
        if isinstance(lay, tf.keras.layers.BatchNormalization)
    ]
    assert bns and all(bn.synchronized for bn in bns)
    plain = models.get("resnet20")
    assert not any(getattr(lay, "synchronized", False) for lay in plain.layers)


def test_weights_round_trip(resnet20, tmp_path):
    x = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    path = tmp_path / "resnet20.weights.h5"
    resnet20.save_weights(path)
    again = models.get("resnet20", weights=path)
    np.testing.assert_array_equal(again(x).numpy(), resnet20(x).numpy())

    saved = tmp_path / "resnet20.keras"
    resnet20.save(saved)
    reloaded = tf.keras.models.load_model(saved, compile=False)
    np.testing.assert_array_equal(reloaded(x).numpy(), resnet20(x).numpy())


def test_zoo_weights_from_a_file(tmp_path):
    tf.keras.utils.set_random_seed(4)
    model = models.get("binary-resnet-e18")
    path = tmp_path / "e18.weights.h5"
    model.save_weights(path)
    again = models.get("binary-resnet-e18", weights=path)
    x = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(again(x).numpy(), model(x).numpy())
