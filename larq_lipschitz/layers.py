"""Small parameter-free layers used by the model zoo.

Each layer here is 1-Lipschitz in every norm the package uses, and the bound and
certification code knows it by class.
"""

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class ShortcutPad(tf.keras.layers.Layer):
    """Parameter-free residual shortcut: spatial subsampling plus zero channels.

    The "option A" shortcut of the CIFAR ResNets: keep every `stride`-th pixel and append
    `extra_channels` channels of zeros, split evenly before and after the existing ones.
    It has no weights and its Lipschitz constant is 1 in any norm.

    # Arguments
        stride: subsampling factor along height and width.
        extra_channels: number of zero channels to add.

    # Example
    ```python
    y = ShortcutPad(stride=2, extra_channels=16)(tf.zeros((1, 32, 32, 16)))
    assert y.shape == (1, 16, 16, 32)
    ```
    """

    def __init__(self, stride: int = 2, extra_channels: int = 0, **kwargs):
        super().__init__(**kwargs)
        if int(stride) < 1:
            raise ValueError(f"ShortcutPad: stride must be >= 1, got {stride}.")
        if int(extra_channels) < 0:
            raise ValueError(
                f"ShortcutPad: extra_channels must be >= 0, got {extra_channels}."
            )
        self.stride = int(stride)
        self.extra_channels = int(extra_channels)

    def call(self, inputs):
        x = inputs[:, :: self.stride, :: self.stride, :]
        before = self.extra_channels // 2
        after = self.extra_channels - before
        return tf.pad(x, [[0, 0], [0, 0], [0, 0], [before, after]])

    def compute_output_shape(self, input_shape):
        n, h, w, c = tf.TensorShape(input_shape).as_list()

        def sub(d):
            return None if d is None else -(-d // self.stride)

        return tf.TensorShape(
            [n, sub(h), sub(w), None if c is None else c + self.extra_channels]
        )

    def get_config(self):
        return {
            **super().get_config(),
            "stride": self.stride,
            "extra_channels": self.extra_channels,
        }
