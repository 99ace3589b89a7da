"""CIFAR-10 pipelines: the real binary archive, damaged copies, and TFDS (mocked)."""

import collections
import functools
import gzip
import hashlib
import io
import os
import pathlib
import re
import sys
import tarfile
import time

from larq_lipschitz import data
from larq_lipschitz.data import cifar10

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

RECORD = 3073
FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
META = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrays(cifar_archive):
    return data.read_cifar10(cifar_archive)


@pytest.fixture(scope="module")
def extracted(cifar_archive, tmp_path_factory):
    """The real archive extracted by tarfile (independent of the package's reader)."""
    root = tmp_path_factory.mktemp("extracted")
    with tarfile.open(cifar_archive) as tar:
        tar.extractall(root, filter="data")
    return root


def fingerprints(images: np.ndarray) -> list[bytes]:
    """A digest per uint8 image: equal images, equal digests."""
    return [
        hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images
    ]


def to_uint8(images) -> np.ndarray:
    """Back from x = byte / 255 to the byte, asserting that it was such a value."""
    scaled = np.asarray(images, np.float32) * np.float32(255)
    rounded = np.rint(scaled)
    assert np.abs(scaled - rounded).max() < 1e-3
    return rounded.astype(np.uint8)


def epoch(dataset, as_bytes: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """One pass over a dataset; images converted back to bytes if asked (less memory)."""
    convert = to_uint8 if as_bytes else np.asarray
    return [(convert(x), y.numpy()) for x, y in dataset]


# Synthetic CIFAR-10-format members, mostly zeros so that gzip is fast.
def synthetic_batch(label_at=None, records=10_000, record_bytes=RECORD) -> bytes:
    table = np.zeros((records, record_bytes), np.uint8)
    table[:, 0] = np.arange(records) % 10
    table[:, 1] = np.arange(records) % 251  # red pixel (0, 0) tells records apart
    if label_at is not None:
        index, value = label_at
        table[index, 0] = value
    return table.tobytes()


@functools.cache
def good_batch() -> bytes:
    return synthetic_batch()


def write_folder(folder: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    folder.mkdir(parents=True)
    for name, content in members.items():
        (folder / name).write_bytes(content)
    return folder


def write_tar(
    path: pathlib.Path, members: dict[str, bytes], gz: bool = True
) -> pathlib.Path:
    mode = "w:gz" if gz else "w"
    options = {"compresslevel": 1} if gz else {}
    with tarfile.open(path, mode, **options) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def good_members(**replace: bytes | None) -> dict[str, bytes]:
    members = {name: good_batch() for name in FILES} | {"batches.meta.txt": META}
    for name, content in replace.items():
        name = name.replace("__", ".")
        if content is None:
            del members[name]
        else:
            members[name] = content
    return members


def binary_layout(members: dict[str, bytes]) -> dict[str, bytes]:
    return {
        f"cifar-10-batches-bin/{name}": content for name, content in members.items()
    }


# --- the real archive ----------------------------------------------------------------


def test_real_archive_arrays(arrays, cifar_archive):
    assert arrays.train_images.shape == (50_000, 32, 32, 3)
    assert arrays.test_images.shape == (10_000, 32, 32, 3)
    assert arrays.train_images.dtype == arrays.test_images.dtype == np.uint8
    assert arrays.train_labels.dtype == arrays.test_labels.dtype == np.int32
    np.testing.assert_array_equal(
        np.bincount(arrays.train_labels, minlength=10), [5000] * 10
    )
    np.testing.assert_array_equal(
        np.bincount(arrays.test_labels, minlength=10), [1000] * 10
    )
    assert arrays.class_names == data.CIFAR10_CLASS_NAMES
    assert arrays.sha256 == hashlib.sha256(cifar_archive.read_bytes()).hexdigest()
    assert not arrays.train_images.flags.writeable
    assert data.read_cifar10(cifar_archive) is arrays  # parsed once per process


def test_channel_statistics(arrays):
    levels = np.arange(256) / 255.0
    for channel in range(3):
        counts = np.bincount(arrays.train_images[..., channel].ravel(), minlength=256)
        mean = counts @ levels / counts.sum()
        std = np.sqrt(counts @ (levels - mean) ** 2 / counts.sum())
        assert abs(mean - (0.4914, 0.4822, 0.4465)[channel]) < 1e-3
        assert abs(std - (0.2470, 0.2435, 0.2616)[channel]) < 1e-3
        assert abs(mean - data.CIFAR10_MEAN[channel]) < 1e-4
        assert abs(std - data.CIFAR10_STD[channel]) < 1e-4


def test_pixels_equal_raw_bytes(arrays, extracted, cifar_archive):
    folder = extracted / "cifar-10-batches-bin"
    rng = np.random.default_rng(0)
    cases = [(2, 1234, 7, 19, 1), (5, 9999, 31, 31, 2), (0, 0, 0, 0, 0)]
    cases += [
        tuple(int(v) for v in rng.integers([0, 0, 0, 0, 0], [6, 10_000, 32, 32, 3]))
        for _ in range(20)
    ]
    for file_index, record, row, col, channel in cases:
        with open(folder / FILES[file_index], "rb") as handle:
            handle.seek(record * RECORD)
            raw = handle.read(RECORD)
        pixel = raw[1 + 1024 * channel + 32 * row + col]
        if file_index == 5:
            assert arrays.test_labels[record] == raw[0]
            assert arrays.test_images[record, row, col, channel] == pixel
        else:
            index = file_index * 10_000 + record
            assert arrays.train_labels[index] == raw[0]
            assert arrays.train_images[index, row, col, channel] == pixel
    # Through the pipeline: the test split keeps the file order, x = byte / 255.
    splits = data.load_cifar10(cifar_archive, batch_size=2000, train_examples=10)
    images, labels = next(iter(splits.test))
    with open(folder / "test_batch.bin", "rb") as handle:
        handle.seek(1500 * RECORD)
        raw = handle.read(RECORD)
    assert labels[1500] == raw[0]
    assert images.numpy()[1500, 3, 4, 2] == np.float32(
        raw[1 + 2048 + 3 * 32 + 4]
    ) / np.float32(255)


def test_extracted_folder_equals_archive(arrays, extracted):
    for folder in (extracted, extracted / "cifar-10-batches-bin"):
        other = data.read_cifar10(folder)
        assert other.sha256 is None
        assert other.class_names == arrays.class_names
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            assert np.array_equal(getattr(other, name), getattr(arrays, name)), name


def test_full_epoch_counts_and_content(cifar_archive, arrays):
    splits = data.load_cifar10(cifar_archive, batch_size=1000, augment=False)
    info = splits.info
    assert info["source"] == "archive" and info["path"] == str(cifar_archive)
    assert info["num_examples"] == {"train": 50_000, "validation": 0, "test": 10_000}
    assert info["num_classes"] == 10 and info["input_shape"] == (32, 32, 3)
    assert info["class_names"] == list(data.CIFAR10_CLASS_NAMES)
    assert info["sha256"] == arrays.sha256
    assert splits.validation is None
    assert len(splits.train) == 50 and len(splits.test) == 10
    spec_images, spec_labels = splits.train.element_spec
    assert spec_images.dtype == tf.float32 and spec_labels.dtype == tf.int32
    train = epoch(splits.train, as_bytes=True)
    assert all(x.shape == (1000, 32, 32, 3) for x, _ in train)
    labels = np.concatenate([y for _, y in train])
    assert set(np.unique(labels)) == set(range(10))
    # A shuffled copy of the training set: the same images with the same labels.
    ours = collections.Counter(
        zip(fingerprints(np.concatenate([x for x, _ in train])), labels, strict=True)
    )
    reference = zip(fingerprints(arrays.train_images), arrays.train_labels, strict=True)
    assert ours == collections.Counter(reference)
    assert not np.array_equal(labels, arrays.train_labels)  # shuffled
    # The test split: file order, unaugmented, exactly byte / 255.
    offset = 0
    for images, labels in splits.test:
        rows = slice(offset, offset + len(labels))
        expected = arrays.test_images[rows].astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(images.numpy(), expected)
        np.testing.assert_array_equal(labels.numpy(), arrays.test_labels[rows])
        offset += len(labels)
    assert offset == 10_000


def test_subsets_are_balanced_disjoint_and_from_training(cifar_archive, arrays):
    def subsets(seed):
        splits = data.load_cifar10(
            cifar_archive,
            batch_size=256,
            train_examples=1000,
            validation_examples=500,
            seed=seed,
            augment=False,
        )
        assert splits.info["num_examples"] == {
            "train": 1000,
            "validation": 500,
            "test": 10_000,
        }
        return epoch(splits.train, as_bytes=True), epoch(
            splits.validation, as_bytes=True
        )

    train, validation = subsets(5)
    train_labels = np.concatenate([y for _, y in train])
    validation_labels = np.concatenate([y for _, y in validation])
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [100] * 10)
    np.testing.assert_array_equal(
        np.bincount(validation_labels, minlength=10), [50] * 10
    )
    # Both are drawn without replacement from the training images, disjoint: no image
    # occurs in them more often than in the training set.
    chosen = collections.Counter(
        fingerprints(np.concatenate([x for x, _ in train + validation]))
    )
    available = collections.Counter(fingerprints(arrays.train_images))
    assert all(available[key] >= count for key, count in chosen.items())
    other_train, other_validation = subsets(6)
    assert not np.array_equal(validation[0][0], other_validation[0][0])
    assert not np.array_equal(train_labels, np.concatenate([y for _, y in other_train]))


def test_seeded_batches(cifar_archive):
    def run(seed):
        splits = data.load_cifar10(
            cifar_archive, batch_size=64, train_examples=300, seed=seed
        )
        return epoch(splits.train), epoch(splits.train)

    first, second = run(7)
    again_first, again_second = run(7)
    for ours, theirs in zip(first + second, again_first + again_second, strict=True):
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    assert not np.array_equal(first[0][0], second[0][0])  # a new epoch, new batches
    other, _ = run(8)
    assert not np.array_equal(first[0][0], other[0][0])


def matching_shift(augmented: np.ndarray, original: np.ndarray, pad: int):
    """All (dy, dx, flipped) for which augmented == crop of flip?(zero_pad(original))."""
    padded = np.pad(original, [(pad, pad), (pad, pad), (0, 0)])
    height, width = original.shape[:2]
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + height, dx : dx + width]
            for flipped in (False, True):
                candidate = window[:, ::-1] if flipped else window
                if np.array_equal(candidate, augmented):
                    found.append((dy, dx, flipped))
    return found


def test_augmentation_is_a_shifted_flipped_copy(cifar_archive):
    def first_batch(augment):
        splits = data.load_cifar10(
            cifar_archive, batch_size=40, train_examples=40, seed=3, augment=augment
        )
        images, labels = next(iter(splits.train))
        return to_uint8(images), labels.numpy()

    plain, plain_labels = first_batch(False)
    augmented, labels = first_batch(True)
    np.testing.assert_array_equal(labels, plain_labels)  # the same order
    assert augmented.shape == plain.shape == (40, 32, 32, 3)
    shifts = []
    for ours, original in zip(augmented, plain, strict=True):
        found = matching_shift(ours, original, pad=4)
        assert found, "an augmented image is no shifted or flipped copy of its original"
        shifts.append(found[0])
    assert any(dy != 4 or dx != 4 for dy, dx, _ in shifts)
    assert any(flipped for _, _, flipped in shifts)
    assert not all(flipped for _, _, flipped in shifts)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    height=st.integers(2, 7),
    width=st.integers(2, 7),
    channels=st.integers(1, 3),
    pad=st.integers(0, 3),
    seed=st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
)
def test_random_crop_flip_matches_reference(batch, height, width, channels, pad, seed):
    rng = np.random.default_rng(seed[0])
    images = rng.integers(1, 256, (batch, height, width, channels), dtype=np.uint8)
    out = cifar10.random_crop_flip(
        tf.constant(images), tf.constant(seed), pad=pad
    ).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    for ours, original in zip(out, images, strict=True):
        assert matching_shift(ours, original, pad)
    again = cifar10.random_crop_flip(tf.constant(images), tf.constant(seed), pad=pad)
    np.testing.assert_array_equal(out, again.numpy())


def test_random_crop_flip_covers_all_offsets():
    images = np.zeros((400, 9, 9, 1), np.uint8)
    images[:, 0, 0, 0] = 1  # the marked corner shows where the window went
    out = cifar10.random_crop_flip(
        tf.constant(images), tf.constant([4, 2]), pad=2
    ).numpy()
    positions = set()
    for image in out:
        rows, cols = np.nonzero(image[..., 0])
        positions.update(zip(rows.tolist(), cols.tolist(), strict=True))
    # Corner (0, 0) lands at row 0..2 and, flipped or not, column 0..2 or 6..8.
    assert {r for r, _ in positions} == {0, 1, 2}
    assert {c for _, c in positions} == {0, 1, 2, 6, 7, 8}


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    seed=st.integers(0, 1000),
)
def test_stratified_order_prefixes_are_balanced(labels, seed):
    labels = np.array(labels)
    order = cifar10.stratified_order(labels, seed)
    np.testing.assert_array_equal(np.sort(order), np.arange(labels.size))
    counts = np.bincount(labels, minlength=5)
    present = np.flatnonzero(counts)
    smallest = counts[present].min()
    for k in range(1, smallest + 1):
        prefix = np.bincount(labels[order[: k * present.size]], minlength=5)
        np.testing.assert_array_equal(prefix[present], k)
    np.testing.assert_array_equal(order, cifar10.stratified_order(labels, seed))


def test_drop_remainder(cifar_archive):
    kept = data.load_cifar10(cifar_archive, batch_size=300, train_examples=1000)
    dropped = data.load_cifar10(
        cifar_archive, batch_size=300, train_examples=1000, drop_remainder=True
    )
    assert [len(y) for _, y in epoch(kept.train)] == [300, 300, 300, 100]
    assert [len(y) for _, y in epoch(dropped.train)] == [300, 300, 300]
    assert len(kept.train) == 4 and len(dropped.train) == 3
    assert dropped.train.element_spec[0].shape.as_list() == [300, 32, 32, 3]
    assert sum(len(y) for _, y in epoch(dropped.test)) == 10_000  # never dropped


def test_mirrored_strategy(cifar_archive, mirrored_strategy):
    def fresh():
        return data.load_cifar10(
            cifar_archive, batch_size=32, train_examples=96, seed=2
        )

    local = epoch(fresh().train)
    distributed = mirrored_strategy.experimental_distribute_dataset(fresh().train)
    batches = 0
    for (images, labels), (ref_images, ref_labels) in zip(
        distributed, local, strict=True
    ):
        parts = mirrored_strategy.experimental_local_results(images)
        assert [p.shape[0] for p in parts] == [16, 16]
        np.testing.assert_array_equal(
            np.concatenate([p.numpy() for p in parts]), ref_images
        )
        label_parts = mirrored_strategy.experimental_local_results(labels)
        np.testing.assert_array_equal(
            np.concatenate([p.numpy() for p in label_parts]), ref_labels
        )
        batches += 1
    assert batches == 3


def test_archive_source_never_imports_tfds(cifar_archive, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import would fail
    splits = data.load_cifar10(cifar_archive, batch_size=8, train_examples=8)
    assert next(iter(splits.train))[0].shape == (8, 32, 32, 3)


def test_dispatcher(cifar_archive):
    splits = data.load("cifar10", cifar_archive, batch_size=16, train_examples=20)
    assert (
        splits.info["dataset"] == "cifar10"
        and splits.info["num_examples"]["train"] == 20
    )
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; available: cifar10, imagenet2012"
    ):
        data.load("mnist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"train_examples": 0}, "train_examples must be an integer >= 1 or None"),
        ({"validation_examples": -1}, "validation_examples must be an integer >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"validation_examples": 50_000}, "exceed the 50,000 training images"),
        ({"train_examples": 49_000, "validation_examples": 2000}, "exceed"),
        (
            {"train_examples": 10, "batch_size": 20, "drop_remainder": True},
            "no full batch",
        ),
    ],
)
def test_invalid_arguments(cifar_archive, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_cifar10(cifar_archive, **kwargs)


# --- damaged and foreign archives ----------------------------------------------------


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    """A complete synthetic cifar-10-batches-bin folder, written once."""
    root = tmp_path_factory.mktemp("synthetic")
    return write_folder(root / "cifar-10-batches-bin", good_members())


@pytest.fixture(scope="module")
def good_gz(good_folder):
    """The same content as a .tar.gz in the official layout, written once."""
    return write_tar(good_folder.parent / "good.tar.gz", binary_layout(good_members()))


def variant(folder: pathlib.Path, good: pathlib.Path, **replace: bytes | None):
    """A copy of the good folder (by symbolic links) with some files replaced or gone."""
    members = {name.replace("__", "."): content for name, content in replace.items()}
    folder.mkdir(parents=True)
    for child in good.iterdir():
        if child.name not in members:
            (folder / child.name).symlink_to(child)
    for name, content in members.items():
        if content is not None:
            (folder / name).write_bytes(content)
    return folder


def check_synthetic(arrays):
    np.testing.assert_array_equal(arrays.train_labels, np.tile(np.arange(10), 5000))
    np.testing.assert_array_equal(arrays.test_labels, np.tile(np.arange(10), 1000))
    assert arrays.train_images[12_345, 0, 0, 0] == 2345 % 251
    assert (
        arrays.test_images[251, 0, 0, 0] == 0 and arrays.test_images[252, 0, 0, 0] == 1
    )
    assert (
        arrays.test_images[:, 1:].max() == 0 and arrays.test_images[..., 1:].max() == 0
    )


def test_synthetic_archive_forms_agree(good_folder, good_gz, tmp_path):
    plain_tar = tmp_path / "plain.tar"
    with gzip.open(good_gz) as source:
        plain_tar.write_bytes(source.read())
    for path in (good_gz, plain_tar):
        arrays = data.read_cifar10(path)
        check_synthetic(arrays)
        assert arrays.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    check_synthetic(data.read_cifar10(good_folder))


def test_cache_follows_file_changes(good_folder, tmp_path):
    folder = variant(
        tmp_path / "cifar-10-batches-bin", good_folder, test_batch__bin=b""
    )
    (folder / "test_batch.bin").write_bytes(good_batch())
    first = data.read_cifar10(folder)
    assert data.read_cifar10(folder) is first
    (folder / "test_batch.bin").write_bytes(synthetic_batch(label_at=(0, 9)))
    changed = data.read_cifar10(folder)
    assert changed is not first and changed.test_labels[0] == 9
    data.clear_cifar10_cache()
    assert data.read_cifar10(folder) is not changed


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(
        data.DataNotFoundError, match=re.escape(f"{missing}: no such file")
    ) as error:
        data.load_cifar10(missing)
    assert isinstance(error.value, FileNotFoundError)
    assert "cifar-10-binary.tar.gz" in str(error.value)


def test_unreadable_files(good_folder, tmp_path):
    folder = variant(tmp_path / "f", good_folder, data_batch_1__bin=None)
    (folder / "data_batch_1.bin").mkdir()
    with pytest.raises(data.DataReadError, match="data_batch_1.bin: cannot be read"):
        data.read_cifar10(folder)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(
        data.DataFormatError, match=re.escape(f"{junk}: not a valid tar archive")
    ):
        data.read_cifar10(junk)


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root reads anything"
)
def test_permission_denied(good_gz, tmp_path):
    path = tmp_path / "p.tar.gz"
    path.write_bytes(good_gz.read_bytes())
    path.chmod(0)
    with pytest.raises(data.DataReadError, match="cannot be read"):
        data.read_cifar10(path)


def test_truncated_copy_of_real_archive(cifar_archive, tmp_path):
    content = cifar_archive.read_bytes()
    truncated = tmp_path / "cifar-10-binary.tar.gz"
    truncated.write_bytes(content[: len(content) // 3])
    with pytest.raises(
        data.DataFormatError, match=re.escape(f"{truncated}: the archive is truncated")
    ):
        data.read_cifar10(truncated)


def test_truncated_gzip_trailer(good_gz, tmp_path):
    path = tmp_path / "t.tar.gz"
    path.write_bytes(good_gz.read_bytes()[:-6])  # complete tar, incomplete gzip trailer
    with pytest.raises(data.DataFormatError, match="the archive is truncated"):
        data.read_cifar10(path)


def test_corrupt_bytes(good_gz, tmp_path):
    content = bytearray(good_gz.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(range(64))
    corrupt = tmp_path / "cifar-10-binary.tar.gz"
    corrupt.write_bytes(bytes(content))
    with pytest.raises(
        data.DataFormatError,
        match=re.escape(
            f"{corrupt}: not a valid gzip/tar archive, the file is corrupt"
        ),
    ):
        data.read_cifar10(corrupt)


def test_corrupt_crc(good_gz, tmp_path):
    content = bytearray(good_gz.read_bytes())
    content[-8] ^= 0xFF  # the CRC-32 stored in the gzip trailer
    path = tmp_path / "crc.tar.gz"
    path.write_bytes(bytes(content))
    with pytest.raises(
        data.DataFormatError, match="the file is corrupt .*CRC check failed"
    ):
        data.read_cifar10(path)


def test_missing_member(good_folder, tmp_path):
    archive = write_tar(
        tmp_path / "m.tar.gz", binary_layout(good_members(test_batch__bin=None))
    )
    with pytest.raises(
        data.DataNotFoundError,
        match=re.escape(f"{archive}: the archive lacks test_batch.bin"),
    ):
        data.read_cifar10(archive)
    folder = variant(tmp_path / "m", good_folder, data_batch_3__bin=None)
    with pytest.raises(data.DataNotFoundError, match="data_batch_3.bin is missing"):
        data.read_cifar10(folder)


def test_missing_meta_uses_standard_names(good_folder, tmp_path, caplog):
    folder = variant(tmp_path / "n", good_folder, batches__meta__txt=None)
    arrays = data.read_cifar10(folder)
    assert arrays.class_names == data.CIFAR10_CLASS_NAMES
    assert "no batches.meta.txt" in caplog.text


@pytest.mark.parametrize("form", ["folder", "tar.gz"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            lambda: good_batch() + b"\0",
            "data_batch_2.bin is 30,730,001 bytes, not a multiple of the 3,073",
        ),
        (
            lambda: good_batch()[:-RECORD],
            "data_batch_2.bin holds 9,999 records of 3,073 bytes, expected 10,000",
        ),
        (
            lambda: synthetic_batch(label_at=(17, 12)),
            "data_batch_2.bin record 17 has label 12, outside 0..9",
        ),
        (
            lambda: synthetic_batch(record_bytes=3074),
            "into 10,000 records of 3,074 bytes, the CIFAR-100 binary layout",
        ),
    ],
    ids=["size", "records", "labels", "cifar100-records"],
)
def test_bad_member_content(good_folder, tmp_path, form, content, message):
    if form == "folder":
        path = variant(tmp_path / "bad", good_folder, data_batch_2__bin=content())
    else:
        # Only the members up to the bad one: reading must stop there.
        members = {"batches.meta.txt": META, "data_batch_1.bin": good_batch()}
        members["data_batch_2.bin"] = content()
        path = write_tar(tmp_path / "bad.tar.gz", binary_layout(members))
    with pytest.raises(data.DataFormatError, match=message) as error:
        data.read_cifar10(path)
    assert isinstance(error.value, ValueError) and str(path) in str(error.value)


@pytest.mark.parametrize(
    ("members", "found"),
    [
        (
            {
                f"cifar-10-batches-py/{n}": b"\x80"
                for n in ("batches.meta", "data_batch_1")
            },
            "CIFAR-10 python \\(pickle\\) version",
        ),
        (
            {
                "cifar-100-binary/fine_label_names.txt": b"apple\n",
                "cifar-100-binary/train.bin": bytes(3074 * 10),
            },
            "CIFAR-100 binary version",
        ),
    ],
    ids=["cifar10-python", "cifar100-binary"],
)
def test_foreign_archives(tmp_path, members, found):
    path = write_tar(tmp_path / "foreign.tar.gz", members)
    with pytest.raises(
        data.DataFormatError, match=f"this archive is the {found}"
    ) as error:
        data.read_cifar10(path)
    assert "needs the CIFAR-10 binary version" in str(error.value)
    folder = tmp_path / "extracted"
    with tarfile.open(path) as tar:
        tar.extractall(folder, filter="data")
    with pytest.raises(data.DataFormatError, match=f"this folder holds the {found}"):
        data.read_cifar10(folder / next(iter(members)).split("/")[0])


# --- tensorflow-datasets -------------------------------------------------------------


def write_tfds_metadata(
    data_dir: pathlib.Path, name: str, splits: dict[str, int]
) -> None:
    """Write the metadata of a prepared TFDS dataset (examples come from mock_data)."""
    import tensorflow_datasets as tfds
    from etils import epath

    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    infos = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[count],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=epath.Path(builder.data_dir),
                dataset_name=name,
                split=split,
                filetype_suffix="tfrecord",
            ),
        )
        for split, count in splits.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_source_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    write_tfds_metadata(tmp_path, "cifar10", {"train": 60, "test": 60})
    with tfds.testing.mock_data(num_examples=60, data_dir=os.fspath(tmp_path)):
        expected_images, expected_labels = tfds.as_numpy(
            tfds.builder("cifar10").as_dataset(
                split="test", batch_size=-1, as_supervised=True
            )
        )
        splits = data.load_cifar10(
            "tfds", batch_size=16, validation_examples=10, seed=1
        )
        test = epoch(splits.test)
        train = epoch(splits.train)
    assert splits.info["source"] == "tfds" and splits.info["sha256"] is None
    assert splits.info["num_examples"] == {"train": 50, "validation": 10, "test": 60}
    assert splits.info["class_names"] == list(data.CIFAR10_CLASS_NAMES)
    np.testing.assert_array_equal(
        np.concatenate([x for x, _ in test]),
        expected_images.astype(np.float32) / np.float32(255),
    )
    np.testing.assert_array_equal(np.concatenate([y for _, y in test]), expected_labels)
    assert sum(len(y) for _, y in train) == 50
    for images, labels in train:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert (
            images.shape[1:] == (32, 32, 3) and 0 <= images.min() <= images.max() <= 1
        )
        assert 0 <= labels.min() <= labels.max() <= 9


def test_tfds_not_prepared_fails_fast(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_download(*args, **kwargs):
        raise AssertionError("load_cifar10 tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.perf_counter()
    with pytest.raises(
        data.DatasetNotPreparedError, match="cifar10 is not prepared"
    ) as error:
        data.load_cifar10(data_dir=tmp_path)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "--data PATH" in message and str(tmp_path) in message
    assert isinstance(error.value, FileNotFoundError)
