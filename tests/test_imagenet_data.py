"""ImageNet 2012 through tensorflow-datasets: preparation, preprocessing, errors."""

import io
import pathlib
import re
import tarfile
import time
from unittest import mock

from larq_lipschitz import data
from larq_lipschitz.data import imagenet

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def placeholder_manual_dir(folder: pathlib.Path) -> pathlib.Path:
    """A manual folder with empty archives: enough when mock_data fakes the examples."""
    folder.mkdir(parents=True)
    for name in TARS:
        (folder / name).touch()
    return folder


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth color image (JPEG keeps it within a few levels)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [
        127 + 100 * np.sin(rows / height * 3 + cols / width * 2 + phase)
        for phase in phases
    ]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def test_missing_manual_dir_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.load_imagenet2012(data_dir=tmp_path)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    manual = tmp_path / "downloads" / "manual"
    assert f"manual download folder {manual} lacks {TARS[0]} and {TARS[1]}" in message
    assert "https://image-net.org/download-images" in message
    assert isinstance(error.value, FileNotFoundError)


def test_incomplete_manual_dir_names_what_is_missing(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / TARS[0]).touch()
    with pytest.raises(
        data.DatasetNotPreparedError, match=re.escape(f"{manual} lacks {TARS[1]}.")
    ):
        data.load_imagenet2012(data_dir=tmp_path / "tfds", manual_dir=manual)


def test_mock_data_pipeline(tmp_path):
    manual = placeholder_manual_dir(tmp_path / "manual")
    calls = []

    def record(self, *args, **kwargs):
        calls.append(kwargs["download_config"])  # and prepare nothing: data is mocked

    builder_class = tfds.core.DatasetBuilder
    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(builder_class, "download_and_prepare", record),
    ):
        splits = data.load_imagenet2012(
            manual_dir=manual,
            batch_size=5,
            image_size=24,
            validation_examples=4,
            seed=1,
        )
        train = [(x.numpy(), y.numpy()) for x, y in splits.train]
        validation = [(x.numpy(), y.numpy()) for x, y in splits.validation]
        test = [(x.numpy(), y.numpy()) for x, y in splits.test]
    assert [c.manual_dir for c in calls] == [str(manual)]
    assert calls[0].try_download_gcs is False
    for batches in (train, validation, test):
        assert batches and [len(y) for _, y in batches][0] == 5
        for images, labels in batches:
            assert images.dtype == np.float32 and labels.dtype == np.int32
            assert images.shape[1:] == (24, 24, 3)
            assert 0.0 <= images.min() <= images.max() <= 1.0
            assert 0 <= labels.min() <= labels.max() <= 999
    info = splits.info
    assert info["dataset"] == "imagenet2012" and info["source"] == "tfds"
    assert info["num_classes"] == 1000 and len(info["class_names"]) == 1000
    assert info["input_shape"] == (24, 24, 3) and info["mean"] == data.IMAGENET_MEAN
    assert info["num_examples"]["validation"] == 4


def test_mock_data_determinism(tmp_path):
    manual = placeholder_manual_dir(tmp_path / "manual")

    def first_epochs(seed):
        splits = data.load_imagenet2012(
            manual_dir=manual, batch_size=6, image_size=16, seed=seed
        )
        return [[x.numpy() for x, _ in splits.train] for _ in range(2)]

    with tfds.testing.mock_data(num_examples=12):
        run, again, other = first_epochs(3), first_epochs(3), first_epochs(4)
    for ours, theirs in zip(run[0] + run[1], again[0] + again[1], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(run[0][0], run[1][0])  # a new epoch
    assert not np.array_equal(run[0][0], other[0][0])  # another seed


def test_dispatcher_takes_source_as_manual_dir(tmp_path):
    manual = placeholder_manual_dir(tmp_path / "manual")
    with tfds.testing.mock_data(num_examples=4):
        splits = data.load("imagenet2012", manual, batch_size=4, image_size=8)
        images, _ = next(iter(splits.test))
    assert images.shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="not both"):
        data.load("imagenet2012", manual, manual_dir=manual)


def test_prepares_from_manual_archives(tmp_path):
    """Real TFDS preparation (no mock) from tiny archives in the official layout."""
    manual = tmp_path / "manual"
    manual.mkdir()
    synsets = ["n01440764", "n01443537"]
    with tarfile.open(manual / TARS[0], "w") as outer:
        for index, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(3):
                    image = smooth_image(40 + i, 60, seed=10 * index + i)
                    add_member(inner, f"{synset}_{i}.JPEG", jpeg_bytes(image))
            add_member(outer, f"{synset}.tar", inner_bytes.getvalue())
    # Validation images whose shorter side is already 37 = round(32 / 0.875): the
    # evaluation preprocessing then is a pure center crop of the decoded JPEG.
    validation_images = [smooth_image(37, 50, seed=100), smooth_image(45, 37, seed=101)]
    with tarfile.open(manual / TARS[1], "w") as tar:
        for i, image in enumerate(validation_images, start=1):
            add_member(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(image))

    splits = data.load_imagenet2012(
        data_dir=tmp_path / "tfds", manual_dir=manual, batch_size=4, image_size=32
    )
    assert splits.info["num_examples"] == {"train": 6, "validation": 0, "test": 2}
    train_labels = np.concatenate([y.numpy() for _, y in splits.train])
    names = splits.info["class_names"]
    assert sorted(train_labels.tolist()) == sorted(
        [names.index(synset) for synset in synsets for _ in range(3)]
    )
    # Labels of the validation images, from the file TFDS ships (line i = image i).
    labels_file = (
        pathlib.Path(tfds.__file__).parent
        / "datasets"
        / "imagenet2012"
        / "validation_labels.txt"
    )
    expected_synsets = labels_file.read_text().split()[:2]
    references = []
    for image in validation_images:
        height, width = image.shape[:2]
        top, left = (height - 32) // 2, (width - 32) // 2
        decoded = np.asarray(Image.open(io.BytesIO(jpeg_bytes(image))), np.float32)
        references.append(decoded[top : top + 32, left : left + 32] / 255.0)
    images, labels = next(iter(splits.test))
    assert len(labels) == 2
    # TFDS stores examples in a shuffled order: pair each output with its source.
    for ours, label in zip(images.numpy(), labels.numpy(), strict=True):
        errors = [np.abs(ours - reference).max() for reference in references]
        source = int(np.argmin(errors))
        assert errors[source] < 1e-6  # exact: the same IDCT as PIL's libjpeg
        assert names[label] == expected_synsets[source]
    assert sorted(labels.numpy().tolist()) == sorted(
        names.index(s) for s in expected_synsets
    )

    # Prepared now: a second call needs no manual folder and can hold out examples.
    again = data.load_imagenet2012(
        data_dir=tmp_path / "tfds", batch_size=4, image_size=32, validation_examples=2
    )
    assert again.info["num_examples"] == {"train": 4, "validation": 2, "test": 2}
    assert sum(len(y) for _, y in again.train) == 4
    assert sum(len(y) for _, y in again.validation) == 2
    with pytest.raises(ValueError, match="exceed the 6 training images"):
        data.load_imagenet2012(data_dir=tmp_path / "tfds", validation_examples=6)


def test_resize_and_center_crop_reference():
    rng = np.random.default_rng(0)
    # Shorter side already round(32 / 0.875) = 37: a pure center crop.
    for shape in [(37, 50, 3), (61, 37, 3)]:
        image = rng.integers(0, 256, shape).astype(np.uint8)
        out = imagenet.resize_and_center_crop(tf.constant(image), 32).numpy()
        top, left = (shape[0] - 32) // 2, (shape[1] - 32) // 2
        np.testing.assert_array_equal(out, image[top : top + 32, left : left + 32])
    # Shorter side 74 = 2 x 37: bilinear halving is the mean of 2x2 blocks.
    image = rng.uniform(0, 255, (74, 100, 3)).astype(np.float32)
    out = imagenet.resize_and_center_crop(tf.constant(image), 32).numpy()
    halved = image.reshape(37, 2, 50, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out, halved[2:34, 9:41], rtol=1e-5, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(8, 300),
    width=st.integers(8, 300),
    seed=st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
)
def test_random_resized_crop_window(height, width, seed):
    offset, size = imagenet.random_resized_crop_window(
        tf.constant([height, width, 3]), tf.constant(seed)
    )
    (top, left), (crop_height, crop_width) = offset.numpy(), size.numpy()
    assert 0 <= top and 0 <= left and crop_height >= 1 and crop_width >= 1
    assert top + crop_height <= height and left + crop_width <= width
    if (crop_height, crop_width) == (height, width):
        return  # the whole image: the fallback (or a draw of area 1)
    area = crop_height * crop_width / (height * width)
    # Integer rounding of the window moves area and ratio by up to a pixel per side.
    slack_h, slack_w = 1 / crop_height, 1 / crop_width
    assert 0.08 * (1 - slack_h) * (1 - slack_w) <= area <= 1
    ratio = crop_width / crop_height
    assert (
        0.75 * (1 - slack_w) / (1 + slack_h)
        <= ratio
        <= 4 / 3 * (1 + slack_w) / (1 - slack_h)
    )
    again = imagenet.random_resized_crop_window(
        tf.constant([height, width, 3]), tf.constant(seed)
    )
    np.testing.assert_array_equal(again[0].numpy(), offset.numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be an integer >= 1"),
        ({"batch_size": -1}, "batch_size must be an integer >= 1"),
        ({"validation_examples": 1.5}, "validation_examples must be an integer"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_imagenet2012(data_dir=tmp_path, **kwargs)
