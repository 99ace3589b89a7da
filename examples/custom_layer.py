"""Your own Sequential BNN with the L1,inf regularizer and constraint: train, save, reload.

python examples/custom_layer.py --data ../shared/data/cifar10/cifar-10-binary.tar.gz
"""

import argparse
import pathlib
import tempfile

from larq_lipschitz import L1InfConstraint, L1InfLipschitz, data

import larq as lq
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="CIFAR-10 binary archive (.tar.gz)")
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

binary = dict(
    input_quantizer="ste_sign",
    kernel_quantizer="magnitude_aware_sign",  # per-channel scale: the L1,inf norm survives
    kernel_regularizer=L1InfLipschitz(1e-5),
    # Exact projection of each filter onto the L1 ball, clipped to [-1, 1] like weight_clip.
    kernel_constraint=L1InfConstraint(max_norm=200.0, clip_value=1.0),
    use_bias=False,
)
model = tf.keras.Sequential(
    [
        tf.keras.Input((32, 32, 3)),
        tf.keras.layers.Rescaling(2.0, offset=-1.0),  # [0, 1] pixels -> [-1, 1]
        tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        tf.keras.layers.BatchNormalization(),
        lq.layers.QuantConv2D(64, 3, padding="same", strides=2, **binary),
        tf.keras.layers.BatchNormalization(),
        lq.layers.QuantConv2D(128, 3, padding="same", strides=2, **binary),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(10),
    ]
)
model.compile(
    optimizer=tf.keras.optimizers.Adam(5e-3),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
splits = data.load_cifar10(args.data, batch_size=64, train_examples=args.steps * 64)
model.fit(splits.train, epochs=1)

path = pathlib.Path(tempfile.mkdtemp()) / "custom_bnn.keras"
model.save(path)
reloaded = tf.keras.models.load_model(
    path
)  # no custom_objects: the package registers them
images, _ = next(iter(splits.test))
np.testing.assert_allclose(reloaded(images), model(images), rtol=1e-5, atol=1e-5)
_, acc = reloaded.evaluate(splits.test, verbose=0)
print(f"reloaded from {path}: test accuracy {acc:.4f}")
