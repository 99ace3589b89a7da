"""Take a larq-zoo model, attach the L1,inf control with one call, fine-tune a few steps.

    python examples/regularize_larq_zoo.py --data ../shared/data/cifar10/cifar-10-binary.tar.gz

larq-zoo's pretrained ImageNet weights need network access (`weights="imagenet"`, 1000
classes, 224x224 input); here the model is built untrained for CIFAR-10.
"""

import argparse

from larq_lipschitz import L1InfLipschitz, check_lipschitz_controls, data
from larq_lipschitz.apply import apply_lipschitz

import larq_zoo
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="CIFAR-10 binary archive (.tar.gz)")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

zoo_model = larq_zoo.literature.BiRealNet(
    input_shape=(32, 32, 3), num_classes=10, weights=None
)
# One call: every binarized layer gets its own copy of the regularizer, weights are kept.
model = apply_lipschitz(zoo_model, regularizer=L1InfLipschitz(1e-5))
print(
    f"{len(check_lipschitz_controls(model))} layers where the control cannot act fully"
)

model.compile(
    optimizer=tf.keras.optimizers.Adam(1e-3),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(),  # larq-zoo ends in a softmax
    metrics=["accuracy"],
)
splits = data.load_cifar10(args.data, batch_size=32, train_examples=args.steps * 32)
# larq-zoo's own models expect their own input scaling; [0, 1] pixels are fine for a demo.
history = model.fit(splits.train, epochs=1)
print(f"fine-tuned {args.steps} steps, loss {history.history['loss'][-1]:.4f}")
