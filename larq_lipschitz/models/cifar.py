"""CIFAR-sized binarized networks: ResNet-20 (two block styles), ResNet-18, VGG-Small.

The layouts follow the CIFAR-10 models of the comparison papers (IR-Net, RBNN, LCR):
the first convolution and the classifier stay full precision, every other convolution is
a `larq.layers.QuantConv2D` whose quantizers set the bit widths. At 32/32 the same
`QuantConv2D` layers are kept with no quantizer, so a full-precision model has exactly
the layer names and weight shapes of its binarized counterpart (the LCR teacher, or an
initialization for the BNN).

Every model takes images in [0, 1] pixel space (float32, NHWC) and starts with a fixed
`Normalization` layer, so that noise, bounds and certificates are all stated in pixel
space. Every model ends in logits (no softmax). There are no `Lambda` layers: the
parameter-free shortcut is `larq_lipschitz.layers.ShortcutPad`.

The output layer of each stage is named `stage1_out`, `stage2_out`, ... (the features
the LCR baseline compares).

Use `larq_lipschitz.models.get` to build these; the functions here take the already
resolved quantizers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from larq_lipschitz.apply import _fresh_copy
from larq_lipschitz.layers import ShortcutPad

import larq as lq
import tensorflow as tf

#: Per-channel mean and standard deviation of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: BatchNorm settings of every model here (a shorter memory than Keras' 0.99 default,
#: which suits the short schedules BNNs are usually trained with).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

SHORTCUTS = ("pad", "conv")


@dataclasses.dataclass(frozen=True)
class Binarization:
    """What every binarized layer of a model gets.

    `None` everywhere is a full-precision (32/32) layer. Each layer receives its own
    copy of each object (see `layer_kwargs`).

    # Arguments
        input_quantizer: quantizer of the layer's input (activations), or None.
        kernel_quantizer: quantizer of the kernel (weights), or None.
        kernel_constraint: constraint on the latent kernel, or None.
        kernel_regularizer: regularizer of the latent kernel, or None.

    # Example
    ```python
    one_one = Binarization("ste_sign", "magnitude_aware_sign", "weight_clip")
    layer = lq.layers.QuantConv2D(16, 3, **one_one.layer_kwargs())
    ```
    """

    input_quantizer: Any = None
    kernel_quantizer: Any = None
    kernel_constraint: Any = None
    kernel_regularizer: Any = None

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one `QuantConv2D`, with fresh copies of the objects."""
        return {
            field.name: _fresh_copy(getattr(self, field.name))
            for field in dataclasses.fields(self)
        }


def _check_stats(mean: Sequence[float], std: Sequence[float], channels: int, who: str):
    try:
        mean = [float(m) for m in mean]
        std = [float(s) for s in std]
    except (TypeError, ValueError):
        raise ValueError(
            f"{who}: mean and std must be sequences of numbers, got {mean!r} and "
            f"{std!r}."
        ) from None
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"{who}: mean and std need one value per input channel ({channels}), got "
            f"{len(mean)} and {len(std)}; pass mean=... and std=... for this input."
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"{who}: every mean must be finite, got {mean}.")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"{who}: every std must be a finite number > 0, got {std}.")
    return mean, std


def normalization(
    mean: Sequence[float], std: Sequence[float], channels: int, name: str = "normalize"
) -> tf.keras.layers.Normalization:
    """The fixed input normalization `(x - mean) / std`, per channel.

    Its weights are constants (nothing is adapted or trained), and its infinity-norm
    Lipschitz constant is `1 / min(std)`.

    # Raises
        ValueError: for a length that does not match `channels`, or a std that is not a
            finite number > 0.

    # Example
    ```python
    layer = normalization(CIFAR10_MEAN, CIFAR10_STD, channels=3)
    ```
    """
    mean, std = _check_stats(mean, std, channels, "normalization")
    return tf.keras.layers.Normalization(
        mean=mean, variance=[s * s for s in std], name=name
    )


def _bn(name: str, synchronized: bool) -> tf.keras.layers.BatchNormalization:
    return tf.keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized, name=name
    )


def _activation(activation: str | Callable, name: str) -> tf.keras.layers.Activation:
    return tf.keras.layers.Activation(activation, name=name)


def _binary_conv(
    filters: int, strides: int, binarization: Binarization, name: str
) -> lq.layers.QuantConv2D:
    return lq.layers.QuantConv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="glorot_normal",
        name=name,
        **binarization.layer_kwargs(),
    )


def _default_activation(binarization: Binarization) -> str | Callable:
    # With binary activations, hard tanh matches the straight-through window of the sign
    # (and sign(hard_tanh(x)) = sign(x)); with real activations, ReLU.
    return "hard_tanh" if binarization.input_quantizer is not None else "relu"


def _check_shape(input_shape: Sequence[int], who: str) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0
        for d in shape
    ):
        raise ValueError(
            f"{who}: input_shape must be (height, width, channels) with positive "
            f"integers, got {input_shape!r}."
        )
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


def _stem(
    inputs, input_shape, mean, std, filters, activation, synchronized_bn
) -> tf.Tensor:
    x = normalization(mean, std, input_shape[-1])(inputs)
    x = tf.keras.layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name="stem_conv",
    )(x)
    x = _bn("stem_bn", synchronized_bn)(x)
    return _activation(activation, "stem_act")(x)


def _shortcut(
    x, filters: int, strides: int, kind: str, synchronized_bn: bool, name: str
):
    channels = int(x.shape[-1])
    if strides == 1 and channels == filters:
        return x
    if kind == "pad":
        if filters < channels:
            raise ValueError(
                f"shortcut='pad' cannot shrink {channels} channels to {filters}."
            )
        return ShortcutPad(strides, filters - channels, name=name)(x)
    x = tf.keras.layers.Conv2D(
        filters,
        1,
        strides=strides,
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )(x)
    return _bn(f"{name}_bn", synchronized_bn)(x)


def _head(x, num_classes: int, synchronized_bn: bool) -> tf.Tensor:
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = _bn("head_bn", synchronized_bn)(x)
    return tf.keras.layers.Dense(num_classes, name="logits")(x)


def _resnet(
    *,
    block: str,
    stage_filters: Sequence[int],
    blocks_per_stage: int,
    stem_filters: int,
    default_shortcut: str,
    model_name: str,
    num_classes: int,
    input_shape: Sequence[int],
    binarization: Binarization | None,
    synchronized_bn: bool,
    mean: Sequence[float],
    std: Sequence[float],
    activation: str | Callable | None,
    shortcut: str | None,
    name: str | None,
) -> tf.keras.Model:
    shape = _check_shape(input_shape, model_name)
    binarization = Binarization() if binarization is None else binarization
    shortcut = default_shortcut if shortcut is None else shortcut
    if shortcut not in SHORTCUTS:
        raise ValueError(
            f"{model_name}: shortcut must be one of {SHORTCUTS}, got {shortcut!r}."
        )
    activation = _default_activation(binarization) if activation is None else activation
    tf.keras.activations.get(activation)  # fail early on an unknown name

    inputs = tf.keras.Input(shape, name="image")
    x = _stem(inputs, shape, mean, std, stem_filters, activation, synchronized_bn)
    for s, filters in enumerate(stage_filters, start=1):
        for b in range(1, blocks_per_stage + 1):
            first_strides = 2 if (b == 1 and s > 1) else 1
            p = f"stage{s}_block{b}_"
            last_of_stage = b == blocks_per_stage
            if block == "bireal":
                # A shortcut around each binary convolution (Bi-Real Net / IR-Net).
                for j, strides in enumerate((first_strides, 1), start=1):
                    skip = _shortcut(
                        x,
                        filters,
                        strides,
                        shortcut,
                        synchronized_bn,
                        f"{p}shortcut{j}",
                    )
                    y = _binary_conv(filters, strides, binarization, f"{p}conv{j}")(x)
                    y = _bn(f"{p}bn{j}", synchronized_bn)(y)
                    y = tf.keras.layers.Add(name=f"{p}add{j}")([y, skip])
                    out = (
                        f"stage{s}_out" if (last_of_stage and j == 2) else f"{p}act{j}"
                    )
                    x = _activation(activation, out)(y)
            else:
                # The standard basic block: two convolutions, one shortcut.
                skip = _shortcut(
                    x, filters, first_strides, shortcut, synchronized_bn, f"{p}shortcut"
                )
                y = _binary_conv(filters, first_strides, binarization, f"{p}conv1")(x)
                y = _bn(f"{p}bn1", synchronized_bn)(y)
                y = _activation(activation, f"{p}act1")(y)
                y = _binary_conv(filters, 1, binarization, f"{p}conv2")(y)
                y = _bn(f"{p}bn2", synchronized_bn)(y)
                y = tf.keras.layers.Add(name=f"{p}add")([y, skip])
                out = f"stage{s}_out" if last_of_stage else f"{p}act2"
                x = _activation(activation, out)(y)
    outputs = _head(x, num_classes, synchronized_bn)
    return tf.keras.Model(inputs, outputs, name=name or model_name)


def resnet20(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    binarization: Binarization | None = None,
    synchronized_bn: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    activation: str | Callable | None = None,
    shortcut: str | None = None,
    name: str | None = None,
) -> tf.keras.Model:
    """ResNet-20 for CIFAR, a shortcut around each binary convolution (IR-Net style).

    Stem: 3x3 convolution 3 -> 16 (full precision) + BatchNorm + activation. Three
    stages of three blocks with 16, 32 and 64 channels (strides 1, 2, 2); each block is
    two units `act(BN(conv(x)) + shortcut(x))`, so every binary 3x3 convolution has its
    own shortcut, as in Bi-Real Net and IR-Net (the model the comparison papers report
    as ResNet-20; it trains markedly better than the standard block). Head: global
    average pooling, BatchNorm, dense layer (full precision) to logits. About 0.27 M
    parameters.

    # Arguments
        num_classes: number of logits.
        input_shape: `(height, width, channels)` of the [0, 1] images.
        binarization: quantizers, constraint and regularizer of the 18 binary convs;
            None (default) is full precision.
        synchronized_bn: build every BatchNorm with `synchronized=True`.
        mean, std: per-channel statistics of the fixed input normalization.
        activation: activation after each unit; default `"hard_tanh"` with binary
            activations, `"relu"` otherwise.
        shortcut: where the shape changes, `"pad"` (default: subsample and add zero
            channels, parameter free) or `"conv"` (full-precision 1x1 conv + BatchNorm).
        name: model name.

    # Example
    ```python
    model = resnet20(binarization=Binarization("ste_sign", "magnitude_aware_sign",
                                               "weight_clip"))
    logits = model(tf.zeros((1, 32, 32, 3)))
    ```
    """
    return _resnet(
        block="bireal",
        stage_filters=(16, 32, 64),
        blocks_per_stage=3,
        stem_filters=16,
        default_shortcut="pad",
        model_name="resnet20",
        num_classes=num_classes,
        input_shape=input_shape,
        binarization=binarization,
        synchronized_bn=synchronized_bn,
        mean=mean,
        std=std,
        activation=activation,
        shortcut=shortcut,
        name=name,
    )


def resnet20_basic(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    binarization: Binarization | None = None,
    synchronized_bn: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    activation: str | Callable | None = None,
    shortcut: str | None = None,
    name: str | None = None,
) -> tf.keras.Model:
    """ResNet-20 for CIFAR with the standard basic block.

    Like `resnet20`, but each block is `act(BN(conv(act(BN(conv(x))))) + shortcut(x))`:
    one shortcut per two binary convolutions (He et al., 2016). Same stem, stages, head,
    arguments and parameter count as `resnet20`.

    # Example
    ```python
    model = resnet20_basic()
    ```
    """
    return _resnet(
        block="basic",
        stage_filters=(16, 32, 64),
        blocks_per_stage=3,
        stem_filters=16,
        default_shortcut="pad",
        model_name="resnet20_basic",
        num_classes=num_classes,
        input_shape=input_shape,
        binarization=binarization,
        synchronized_bn=synchronized_bn,
        mean=mean,
        std=std,
        activation=activation,
        shortcut=shortcut,
        name=name,
    )


def resnet18(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    binarization: Binarization | None = None,
    synchronized_bn: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    activation: str | Callable | None = None,
    shortcut: str | None = None,
    name: str | None = None,
) -> tf.keras.Model:
    """ResNet-18 for CIFAR: 3x3 stem, no max-pool, a shortcut around each binary conv.

    Stem: 3x3 convolution 3 -> 64 (full precision) + BatchNorm + activation, no
    max-pool. Four stages of two blocks with 64, 128, 256 and 512 channels (strides 1,
    2, 2, 2), each block two units `act(BN(conv(x)) + shortcut(x))` as in `resnet20`;
    where the shape changes the shortcut is a full-precision 1x1 convolution +
    BatchNorm by default (`shortcut="pad"` for the parameter-free one). Head: global
    average pooling, BatchNorm, dense layer to logits. About 11.2 M parameters.

    Arguments as for `resnet20`.

    # Example
    ```python
    model = resnet18(num_classes=100)
    ```
    """
    return _resnet(
        block="bireal",
        stage_filters=(64, 128, 256, 512),
        blocks_per_stage=2,
        stem_filters=64,
        default_shortcut="conv",
        model_name="resnet18",
        num_classes=num_classes,
        input_shape=input_shape,
        binarization=binarization,
        synchronized_bn=synchronized_bn,
        mean=mean,
        std=std,
        activation=activation,
        shortcut=shortcut,
        name=name,
    )


def vgg_small(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    binarization: Binarization | None = None,
    synchronized_bn: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    activation: str | Callable | None = None,
    name: str | None = None,
) -> tf.keras.Model:
    """VGG-Small for CIFAR (LQ-Nets, IR-Net): six 3x3 convolutions and one dense layer.

    Full-precision 3x3 convolution 3 -> 128 + BatchNorm + activation, then binary 3x3
    convolutions with 128, 256, 256, 512, 512 channels, each followed by BatchNorm and
    the activation; a 2x2 max-pool follows the 2nd, 4th and 6th convolution, *before*
    its BatchNorm. The three pooled blocks end in `stage1_out` .. `stage3_out`. Head:
    flatten (8192 features at 32x32) and a full-precision dense layer to logits. About
    4.66 M parameters. The height and width must be multiples of 8.

    Arguments as for `resnet20` (without `shortcut`).

    # Example
    ```python
    model = vgg_small()
    ```
    """
    shape = _check_shape(input_shape, "vgg_small")
    if shape[0] % 8 or shape[1] % 8:
        raise ValueError(
            "vgg_small: height and width must be multiples of 8 (three 2x2 "
            f"max-pools), got input_shape={input_shape!r}."
        )
    binarization = Binarization() if binarization is None else binarization
    activation = _default_activation(binarization) if activation is None else activation
    tf.keras.activations.get(activation)

    inputs = tf.keras.Input(shape, name="image")
    x = normalization(mean, std, shape[-1])(inputs)
    x = tf.keras.layers.Conv2D(
        128,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name="stem_conv",
    )(x)
    x = _bn("stem_bn", synchronized_bn)(x)
    x = _activation(activation, "stem_act")(x)
    stage = 0
    for i, filters in enumerate((128, 256, 256, 512, 512), start=1):
        x = _binary_conv(filters, 1, binarization, f"conv{i}")(x)
        pooled = i % 2 == 1
        if pooled:
            stage += 1
            x = tf.keras.layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        x = _bn(f"bn{i}", synchronized_bn)(x)
        x = _activation(activation, f"stage{stage}_out" if pooled else f"act{i}")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    outputs = tf.keras.layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=name or "vgg_small")
