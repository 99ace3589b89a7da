"""What the deployed network actually uses: kernels as the layer's quantizer makes them."""

import tensorflow as tf


def effective_kernel(layer: tf.keras.layers.Layer) -> tf.Tensor:
    """The kernel the layer computes with at inference time.

    For a Larq layer with a kernel quantizer this is `q(W)`, the quantizer applied to the
    latent full-precision kernel `W`; for any other layer it is the kernel itself.

    # Arguments
        layer: a built Keras or Larq layer with a `kernel` attribute.

    # Returns
        A float tensor with the layout of `layer.kernel`.

    # Raises
        ValueError: if the layer has no kernel.
    """
    kernel = getattr(layer, "depthwise_kernel", None)
    if kernel is None:
        kernel = getattr(layer, "kernel", None)
    if kernel is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has no kernel."
        )
    quantizer = getattr(layer, "kernel_quantizer", None)
    if quantizer is None:
        quantizer = getattr(layer, "depthwise_quantizer", None)
    kernel = tf.convert_to_tensor(kernel)  # a variable would trip custom gradients
    if quantizer is None:
        return kernel
    return tf.convert_to_tensor(quantizer(kernel))
