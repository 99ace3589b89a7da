"""Input pipelines: CIFAR-10 (local binary archive or tensorflow-datasets) and ImageNet.

Every loader returns a `DataSplits`: batched `tf.data.Dataset`s of `(images, labels)`
with images as float32 NHWC tensors in `[0, 1]` pixel space (not normalized: the
models normalize with the `*_MEAN` / `*_STD` constants below, so that perturbations can
be applied in pixel space first) and labels as int32 class indices.

```python
from larq_lipschitz import data

splits = data.load("cifar10", "/path/to/cifar-10-binary.tar.gz", batch_size=128)
images, labels = next(iter(splits.train))  # (128, 32, 32, 3) float32, (128,) int32
splits.info["num_examples"]  # {'train': 50000, 'validation': 0, 'test': 10000}
```

Errors about the data itself (a missing file, a corrupt archive, the wrong dataset, a
TFDS dataset that is not prepared) are `DataError`s; invalid arguments raise
`ValueError` or `TypeError`.
"""

import dataclasses
import numbers
import os
from typing import Any

import tensorflow as tf


class DataError(Exception):
    """Base class of the errors about input data: files, archives, prepared datasets."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A path, an archive member or a file of an extracted folder does not exist."""


class DataReadError(DataError, OSError):
    """A file exists but the operating system refuses to read it."""


class DataFormatError(DataError, ValueError):
    """A file is readable but its content is wrong: corrupt, truncated, or foreign."""


class DatasetNotPreparedError(DataNotFoundError):
    """A tensorflow-datasets dataset is not prepared and cannot be prepared offline."""


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """The splits of one dataset, ready for `model.fit` / `model.evaluate`.

    # Attributes
        train: shuffled (and, if asked, augmented) batches of `(images, labels)`; one
            pass is one epoch, and each new pass draws a new order and new augmentation.
        validation: batches held out from the training set (never from the test set),
            or `None` when no validation examples were asked for.
        test: the official test split (ImageNet: the official validation split), in file
            order, neither shuffled nor augmented.
        info: plain Python values describing the data: `dataset`, `source`
            ("archive" or "tfds"), `path`, `sha256` (of the archive file, or `None`),
            `num_examples` per split, `class_names`, `num_classes`, `input_shape`,
            `mean`, `std`, and the loader's settings.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    info: dict[str, Any]


def _check_int(
    caller: str, name: str, value: Any, minimum: int, *, allow_none: bool = False
) -> None:
    """`ValueError` unless `value` is an integer >= `minimum` (or allowed None)."""
    if allow_none and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        none = " or None" if allow_none else ""
        raise ValueError(
            f"{caller}: {name} must be an integer >= {minimum}{none}, got {value!r}"
        )


def _check_bool(caller: str, **flags: Any) -> None:
    """Raise `TypeError` unless every flag is `True` or `False`."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{caller}: {name} must be True or False, got {value!r}")


def _loader_settings(
    caller: str,
    *,
    batch_size: Any,
    train_examples: Any,
    validation_examples: Any,
    seed: Any,
    augment: Any,
    drop_remainder: Any,
) -> tuple[int, int | None, int, int]:
    """Check the settings every loader shares; return them as plain ints.

    # Returns
        `(batch_size, train_examples, validation_examples, seed)`.
    """
    _check_int(caller, "batch_size", batch_size, 1)
    _check_int(caller, "train_examples", train_examples, 1, allow_none=True)
    _check_int(caller, "validation_examples", validation_examples, 0)
    _check_int(caller, "seed", seed, 0)
    _check_bool(caller, augment=augment, drop_remainder=drop_remainder)
    return (
        int(batch_size),
        None if train_examples is None else int(train_examples),
        int(validation_examples),
        int(seed),
    )


# The submodules import the definitions above, so they are imported after them.
from larq_lipschitz.data.cifar10 import (  # noqa: E402
    CIFAR10_CLASS_NAMES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    Cifar10Arrays,
    clear_cifar10_cache,
    load_cifar10,
    read_cifar10,
)
from larq_lipschitz.data.imagenet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_imagenet2012,
)

DATASETS = ("cifar10", "imagenet2012")


def load(
    dataset: str, source: str | os.PathLike | None = None, **kwargs: Any
) -> DataSplits:
    """Load one of the supported datasets by name.

    # Arguments
        dataset: `"cifar10"` or `"imagenet2012"`.
        source: where the data comes from. `None` or `"tfds"`: tensorflow-datasets. For
            CIFAR-10 a path is the official binary archive (`cifar-10-binary.tar.gz`)
            or its extracted `cifar-10-batches-bin` folder, see `load_cifar10`. For
            ImageNet a path is the manual download folder that holds
            `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` (the `manual_dir`
            of `load_imagenet2012`).
        **kwargs: passed on to `load_cifar10` or `load_imagenet2012`.

    # Returns
        A `DataSplits`.

    # Raises
        ValueError: if the dataset name is unknown, or for invalid keyword arguments.
        DataError: if the data cannot be found or read, or is not what it should be.

    # Example
    ```python
    splits = load("cifar10", "cifar-10-binary.tar.gz", batch_size=64, seed=1)
    ```
    """
    if dataset == "cifar10":
        return load_cifar10(source, **kwargs)
    if dataset == "imagenet2012":
        if source is not None and os.fspath(source) != "tfds":
            if "manual_dir" in kwargs:
                raise ValueError(
                    "load: for imagenet2012 give the manual download folder either as "
                    "source or as manual_dir, not both"
                )
            kwargs["manual_dir"] = source
        return load_imagenet2012(**kwargs)
    raise ValueError(
        f"load: unknown dataset {dataset!r}; available: {', '.join(DATASETS)}"
    )


__all__ = [
    "CIFAR10_CLASS_NAMES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Cifar10Arrays",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "DataReadError",
    "DataSplits",
    "DatasetNotPreparedError",
    "clear_cifar10_cache",
    "load",
    "load_cifar10",
    "load_imagenet2012",
    "read_cifar10",
]
