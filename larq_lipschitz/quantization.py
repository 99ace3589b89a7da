"""What the deployed network actually uses: kernels as the layer's quantizer makes them.

Besides `effective_kernel`, this module tells which kernel layers the package
understands (`kernel_layout`) and what a kernel quantizer does to the row L1 norms
(`quantizer_kind`), the fact on which every "can this control work?" check rests:

- `"none"`: no quantizer, or Larq's `NoOp`. The latent kernel is deployed:
  `||q(W)_o||_1 = ||W_o||_1`.
- `"constant"`: `ste_sign`/`SteSign`, `approx_sign`/`ApproxSign`,
  `swish_sign`/`SwishSign`, `larq.math.sign`, `DoReFa(k_bit=1, mode="weights")`.
  `||q(W)_o||_1 = n`, the row length, whatever `W` is.
- `"per_row"`: `magnitude_aware_sign`/`MagnitudeAwareSign`.
  `||q(W)_o||_1 = n * mean|W_o| = ||W_o||_1`, exactly.
- `"other"`: `SteTern`, `SteHeaviside`, `DoReFa` with more bits, custom callables.
  The row norms depend on `W` in a way the package does not model.

Larq's sign maps 0 to +1, so every entry of an unscaled binary kernel has magnitude 1
and its row norms are the constant `n = kh * kw * c_in` (or `n_in` for dense layers).
"""

from __future__ import annotations

import larq as lq
import tensorflow as tf

QUANTIZER_KINDS = ("none", "constant", "per_row", "other")

_CONSTANT_CLASSES = (
    lq.quantizers.SteSign,
    lq.quantizers.ApproxSign,
    lq.quantizers.SwishSign,
)
_CONSTANT_FUNCTIONS = (
    lq.quantizers.ste_sign,
    lq.quantizers.approx_sign,
    lq.quantizers.swish_sign,
    lq.math.sign,
)


def _latent(kernel):
    """The full-precision variable behind a Larq `QuantizedVariable` (or the kernel)."""
    return getattr(kernel, "latent_variable", kernel)


def kernel_variable(layer: tf.keras.layers.Layer):
    """The layer's kernel variable (`depthwise_kernel` for depthwise layers) or None."""
    kernel = getattr(layer, "depthwise_kernel", None)
    if kernel is None:
        kernel = getattr(layer, "kernel", None)
    return kernel


def kernel_quantizer(layer: tf.keras.layers.Layer):
    """The quantizer that acts on `kernel_variable(layer)`, or None for none."""
    if hasattr(layer, "depthwise_quantizer"):
        return layer.depthwise_quantizer
    return getattr(layer, "kernel_quantizer", None)


def effective_kernel(layer: tf.keras.layers.Layer) -> tf.Tensor:
    """The kernel the layer computes with at inference time.

    For a Larq layer with a kernel quantizer this is `q(W)`, the quantizer applied to
    the latent full-precision kernel `W`; for any other layer it is the kernel itself.
    Gradients flow to `W` through the quantizer's own (straight-through) gradient.

    # Arguments
        layer: a built Keras or Larq layer with a `kernel` attribute.

    # Returns
        A float tensor with the layout of `layer.kernel`.

    # Raises
        ValueError: if the layer has no kernel.
    """
    kernel = kernel_variable(layer)
    if kernel is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has no kernel."
        )
    quantizer = kernel_quantizer(layer)
    # Read the latent variable as a tensor: a variable would trip custom gradients, and
    # a QuantizedVariable read inside a quantized scope would come back quantized.
    kernel = tf.convert_to_tensor(_latent(kernel))
    if quantizer is None:
        return kernel
    return tf.convert_to_tensor(quantizer(kernel))


def quantizer_kind(quantizer) -> str:
    """What a kernel quantizer does to the row L1 norms: one of `QUANTIZER_KINDS`.

    See the module docstring for the table. Identifiers (strings, configs) are resolved
    with `larq.quantizers.get` first.

    # Example
    ```python
    assert quantizer_kind("ste_sign") == "constant"
    assert quantizer_kind("magnitude_aware_sign") == "per_row"
    assert quantizer_kind(None) == "none"
    ```
    """
    if isinstance(quantizer, str | dict):
        quantizer = lq.quantizers.get(quantizer)
    if quantizer is None or isinstance(quantizer, lq.quantizers.NoOp):
        return "none"
    if isinstance(quantizer, lq.quantizers.MagnitudeAwareSign):
        return "per_row"
    if isinstance(quantizer, _CONSTANT_CLASSES):
        return "constant"
    if isinstance(quantizer, lq.quantizers.DoReFa):
        is_one_bit = quantizer.precision == 1 and quantizer.mode == "weights"
        return "constant" if is_one_bit else "other"
    if any(quantizer is fn for fn in _CONSTANT_FUNCTIONS):
        return "constant"
    return "other"


def _layer_classes(*names: str) -> tuple[type, ...]:
    return tuple(
        cls
        for cls in (getattr(tf.keras.layers, n, None) for n in names)
        if cls is not None
    )


_UNSUPPORTED = _layer_classes(
    "SeparableConv1D",
    "SeparableConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "LocallyConnected1D",
    "LocallyConnected2D",
)
_DEPTHWISE = _layer_classes("DepthwiseConv1D", "DepthwiseConv2D")
_CONV = _layer_classes("Conv1D", "Conv2D", "Conv3D")
_DENSE = _layer_classes("Dense")


def kernel_layout(layer: tf.keras.layers.Layer) -> str | None:
    """The `layout` (see `larq_lipschitz.norms`) of the layer's kernel, or None.

    Returns `"dense"` for `Dense`/`QuantDense`, `"conv"` for `Conv1D/2D/3D` and their
    Larq versions, `"depthwise"` for depthwise convolutions, and None for layers whose
    kernel the package does not read as rows: separable and transposed convolutions
    (their infinity-norm bound is not the row norm of the stored kernel), locally
    connected layers, and layers without a kernel.
    """
    if isinstance(layer, _UNSUPPORTED):
        return None
    if isinstance(layer, _DEPTHWISE):
        return "depthwise"
    if isinstance(layer, _CONV):
        return "conv"
    if isinstance(layer, _DENSE):
        return "dense"
    return None


def is_binarized(layer: tf.keras.layers.Layer) -> bool:
    """True for a Larq layer whose kernel quantizer is not the identity.

    Only layers with a supported `kernel_layout` count.
    """
    is_larq = isinstance(
        layer, lq.layers_base.QuantizerBase | lq.layers_base.QuantizerDepthwiseBase
    )
    return (
        is_larq
        and kernel_layout(layer) is not None
        and quantizer_kind(kernel_quantizer(layer)) != "none"
    )
