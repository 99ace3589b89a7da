"""ImageNet 2012 (ILSVRC-2012 classification) through tensorflow-datasets.

TFDS cannot download ImageNet: its `imagenet2012` builder prepares the dataset from the
two archives that image-net.org hands out after registration, placed in the *manual
download folder* (by default `<data_dir>/downloads/manual/`):

- `ILSVRC2012_img_train.tar` (about 138 GB, 1,281,167 images),
- `ILSVRC2012_img_val.tar` (about 6.3 GB, 50,000 images).

Preparation reads them once and writes TFRecord files to `data_dir` (about 150 GB more;
it takes hours). After that the archives are no longer needed.

Memory: training examples are shuffled as JPEG bytes in a buffer of 4,096 (about
0.5 GB); images are decoded, cropped and resized one by one in parallel.
"""

import logging
import os
import pathlib

from larq_lipschitz.data import (
    DatasetNotPreparedError,
    DataSplits,
    _check_int,
    _loader_settings,
)

import tensorflow as tf

log = logging.getLogger(__name__)

# Per-channel mean and standard deviation of the ImageNet training images, [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_SHUFFLE_BUFFER = 4096
_CROP_FRACTION = 0.875  # evaluation: the center crop covers 87.5% of the shorter side
_AREA_RANGE = (0.08, 1.0)
_ASPECT_RANGE = (3 / 4, 4 / 3)
# The exact integer IDCT of libjpeg: decoded pixels equal those of the reference decoder
# (PIL and others), where TensorFlow's default fast IDCT differs by up to ~6 levels.
_DCT_METHOD = "INTEGER_ACCURATE"


def random_resized_crop_window(
    image_shape: tf.Tensor, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """A random crop window of the Inception / ResNet training recipe.

    The window covers a fraction of the image area drawn from `[0.08, 1]` and has an
    aspect ratio (width / height) in `[3/4, 4/3]`, as drawn by
    `tf.image.stateless_sample_distorted_bounding_box` with 10 attempts; when no attempt
    fits inside the image, the whole image is the window (torchvision would take a
    center crop there: the two recipes differ only in that rare case).

    # Arguments
        image_shape: `[height, width, channels]` of the image.
        seed: shape `[2]` integer seed.

    # Returns
        `(offset, size)`: the window's top-left corner `[y, x]` and `[height, width]`.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_ASPECT_RANGE,
        area_range=_AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def _train_image(
    encoded: tf.Tensor, seed: tf.Tensor, image_size: int, augment: bool
) -> tf.Tensor:
    if not augment:
        return _eval_image(encoded, image_size)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offset, size = random_resized_crop_window(
        tf.image.extract_jpeg_shape(encoded), crop_seed
    )
    window = tf.concat([offset, size], axis=0)
    image = tf.image.decode_and_crop_jpeg(
        encoded, window, channels=3, dct_method=_DCT_METHOD
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def resize_and_center_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Evaluation preprocessing: scale the shorter side, then take the central square.

    The shorter side is resized (bilinear) to `round(image_size / 0.875)` (256 for 224)
    keeping the aspect ratio, and the central `image_size x image_size` square is cut
    out. Pixel values keep their scale; the output is float32.

    # Arguments
        image: one image `(height, width, channels)`.
        image_size: side of the output square.

    # Returns
        A float32 tensor `(image_size, image_size, channels)`.
    """
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    shorter = round(image_size / _CROP_FRACTION)
    scale = shorter / tf.minimum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), image_size)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), image_size)
    image = tf.image.resize(image, tf.stack([new_height, new_width]), method="bilinear")
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    return image[top : top + image_size, left : left + image_size, :]


def _eval_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.io.decode_jpeg(encoded, channels=3, dct_method=_DCT_METHOD)
    image = resize_and_center_crop(image, image_size)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def _builder(data_dir: str | os.PathLike | None, manual_dir: str | os.PathLike | None):
    """The TFDS builder, prepared from the manual folder if it is not prepared yet."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(
        "imagenet2012", data_dir=None if data_dir is None else os.fspath(data_dir)
    )
    prepared = pathlib.Path(builder.data_dir)
    if (prepared / "dataset_info.json").exists():
        return builder
    root = prepared.parents[1]
    manual = pathlib.Path(manual_dir or root / "downloads" / "manual").expanduser()
    missing = [name for name in MANUAL_FILES if not (manual / name).is_file()]
    if missing:
        raise DatasetNotPreparedError(
            f"ImageNet 2012 is not prepared in {root}, and the manual download folder "
            f"{manual} lacks {' and '.join(missing)}. Register at "
            f"https://image-net.org/download-images, download ILSVRC2012_img_train.tar "
            f"(~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) into {manual} (or pass "
            f"manual_dir=, on the command line --data FOLDER); the next call prepares "
            f"the dataset from them (hours, ~150 GB in data_dir)"
        )
    log.warning(
        "Preparing imagenet2012 in %s from %s (hours for the full archives)",
        root,
        manual,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual), try_download_gcs=False
        )
    )
    return builder


def load_imagenet2012(
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    image_size: int = 224,
    train_examples: int | None = None,
    validation_examples: int = 0,
    seed: int = 0,
    augment: bool = True,
    drop_remainder: bool = False,
) -> DataSplits:
    """ImageNet 2012 as batched `tf.data` pipelines of float32 images in `[0, 1]`.

    Read through tensorflow-datasets `imagenet2012`. If it is not prepared in
    `data_dir`, it is prepared from the manual download folder (see the module
    docstring), which must hold `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`.

    Images are `(batch, image_size, image_size, 3)` float32 `byte / 255`, not
    normalized (normalize with `IMAGENET_MEAN`, `IMAGENET_STD`); labels are int32
    0..999. JPEGs are decoded with libjpeg's exact integer IDCT. Preprocessing:
    - training (with `augment`): a random crop of 8% to 100% of the area with aspect
      ratio in [3/4, 4/3] (`random_resized_crop_window`), decoded from the JPEG
      directly, resized to `image_size` (bilinear), and a random horizontal flip;
    - evaluation (and training without `augment`): shorter side resized to
      `image_size / 0.875`, central square crop (`resize_and_center_crop`).

    `test` is the official validation split (50,000 images), the usual ImageNet test
    set. `validation` holds out the first `validation_examples` images of the TFDS
    training split; `train_examples` takes the next ones. TFDS shuffled the examples
    when it prepared the dataset, so these are fixed pseudo-random subsets, not
    class-balanced ones, and `seed` does not change them.

    Determinism: files are read in a seeded order, examples pass a seeded shuffle
    buffer of 4,096, and each example's crop and flip come from stateless ops keyed on a
    seeded `tf.data.Dataset.random` stream; pass `e` of `train` is the same for the same
    `seed` (and TensorFlow global seed, if one is set).

    # Arguments
        data_dir: TFDS data folder (default: `$TFDS_DATA_DIR`, else
            `~/tensorflow_datasets`).
        manual_dir: folder with the two ILSVRC2012 archives (default:
            `<data_dir>/downloads/manual`); only needed until the dataset is prepared.
        batch_size: examples per batch.
        image_size: side of the square images.
        train_examples: at most this many training images (`None`: all that remain).
        validation_examples: training images held out for validation.
        seed: seed of the file order, the shuffling and the augmentation.
        augment: apply random resized crops and flips to the training set.
        drop_remainder: drop the last, smaller training batch.

    # Returns
        A `DataSplits`. `info["num_examples"]` is `None` for a split whose size the TFDS
        metadata does not record.

    # Raises
        ValueError: for invalid arguments.
        DatasetNotPreparedError: neither a prepared dataset nor the manual archives.

    # Example
    ```python
    splits = load_imagenet2012(data_dir="/data/tfds", batch_size=256)
    ```
    """
    caller = "load_imagenet2012"
    _check_int(caller, "image_size", image_size, 1)
    batch_size, train_examples, validation_examples, seed = _loader_settings(
        caller,
        batch_size=batch_size,
        train_examples=train_examples,
        validation_examples=validation_examples,
        seed=seed,
        augment=augment,
        drop_remainder=drop_remainder,
    )
    image_size = int(image_size)
    import tensorflow_datasets as tfds

    builder = _builder(data_dir, manual_dir)
    known = {name: split.num_examples for name, split in builder.info.splits.items()}
    available = known.get("train")
    if (
        available is not None
        and validation_examples + (train_examples or 1) > available
    ):
        raise ValueError(
            f"load_imagenet2012: validation_examples ({validation_examples}) + "
            f"train_examples ({train_examples}) exceed the {available:,} training images"
        )
    end = "" if train_examples is None else validation_examples + train_examples
    train_split = (
        f"train[{validation_examples}:{end}]" if end or validation_examples else "train"
    )
    decoders = {"image": tfds.decode.SkipDecoding()}

    def read(split: str, shuffle: bool) -> tf.data.Dataset:
        return builder.as_dataset(
            split=split,
            as_supervised=True,
            decoders=decoders,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )

    def evaluation(split: str) -> tf.data.Dataset:
        dataset = read(split, shuffle=False).map(
            lambda encoded, label: (
                _eval_image(encoded, image_size),
                tf.cast(label, tf.int32),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    train = read(train_split, shuffle=True).shuffle(
        _SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True
    )
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    seed_t = tf.constant(seed, tf.int64)
    train = tf.data.Dataset.zip((train, keys)).map(
        lambda example, key: (
            _train_image(example[0], tf.stack([key, seed_t]), image_size, augment),
            tf.cast(example[1], tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    train = train.batch(batch_size, drop_remainder=drop_remainder).prefetch(
        tf.data.AUTOTUNE
    )
    validation = (
        evaluation(f"train[:{validation_examples}]") if validation_examples else None
    )
    test = evaluation("validation")

    def count(split: str, cap: int | None = None) -> int | None:
        total = known.get(split)
        if split == "train" and total is not None:
            total -= validation_examples
        if cap is None:
            return total
        return cap if total is None else min(cap, total)

    info = {
        "dataset": "imagenet2012",
        "source": "tfds",
        "path": str(builder.data_dir),
        "sha256": None,
        "num_examples": {
            "train": count("train", train_examples),
            "validation": validation_examples,
            "test": count("validation"),
        },
        "class_names": list(builder.info.features["label"].names),
        "num_classes": 1000,
        "input_shape": (image_size, image_size, 3),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "batch_size": batch_size,
        "seed": seed,
        "augment": augment,
        "drop_remainder": drop_remainder,
        "subset": "all" if train_split == "train" else "TFDS order",
    }
    return DataSplits(train=train, validation=validation, test=test, info=info)
