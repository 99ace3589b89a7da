"""Model zoo: CIFAR ResNet-20 / ResNet-18 / VGG-Small and larq-zoo wrappers.

Every model takes images in [0, 1] pixel space, normalizes them itself and returns
logits; see `get` for the bit widths and the quantizers of the binarized layers.

# Example
```python
import larq_lipschitz
from larq_lipschitz import models

model = models.get("resnet20", weight_bits=1, activation_bits=1)
print(models.available())
```
"""

from larq_lipschitz.models.cifar import CIFAR10_MEAN, CIFAR10_STD
from larq_lipschitz.models.registry import (
    BIT_WIDTHS,
    NO_CONSTRAINT,
    ModelEntry,
    available,
    describe,
    entry,
    get,
    model_figures,
    stage_output_names,
)
from larq_lipschitz.models.zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BIT_WIDTHS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NO_CONSTRAINT",
    "ModelEntry",
    "available",
    "describe",
    "entry",
    "get",
    "model_figures",
    "stage_output_names",
]
