"""Train a binarized ResNet-20 with the L1,inf regularizer and evaluate it under noise.

    python examples/train_cifar10.py --data ../shared/data/cifar10/cifar-10-binary.tar.gz

Everything here is plain Keras: a strategy scope, `model.fit`, `model.evaluate`.
"""

import argparse

from larq_lipschitz import L1InfLipschitz, data, models, perturbations
from larq_lipschitz.apply import apply_lipschitz

import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="CIFAR-10 binary archive (.tar.gz)")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--train-examples", type=int, default=None)
parser.add_argument("--steps", type=int, default=None, help="cap on steps per epoch")
args = parser.parse_args()

splits = data.load_cifar10(
    args.data, batch_size=128, train_examples=args.train_examples
)

strategy = tf.distribute.MirroredStrategy()  # all local GPUs, or the CPU
with strategy.scope():
    model = models.get("resnet20", weight_bits=1, activation_bits=1)
    model = apply_lipschitz(model, regularizer=L1InfLipschitz(1e-5))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(5e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

model.fit(splits.train, epochs=args.epochs, steps_per_epoch=args.steps)

_, clean = model.evaluate(splits.test, verbose=0)
print(f"clean test accuracy: {clean:.4f}")
for sigma in (0.02, 0.05, 0.1):
    # Noise is added in [0, 1] pixel space and clipped; the model normalizes afterwards.
    noisy = splits.test.map(
        lambda x, y, s=sigma: (perturbations.add_noise(x, "gaussian", s, seed=0), y)
    )
    _, acc = model.evaluate(noisy, verbose=0)
    print(f"accuracy under gaussian noise sigma={sigma}: {acc:.4f}")
