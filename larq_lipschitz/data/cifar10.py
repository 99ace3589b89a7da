"""CIFAR-10 from the official binary archive or from tensorflow-datasets.

The binary version of CIFAR-10 (`cifar-10-binary.tar.gz`, Krizhevsky 2009) holds the
folder `cifar-10-batches-bin` with six files of 10,000 records each, `data_batch_1.bin`
to `data_batch_5.bin` (training) and `test_batch.bin`, plus `batches.meta.txt` (the
class names, one a line). A record is 3,073 bytes: one label byte (0..9), then 3,072
pixel bytes, the 1,024 red values, then the green, then the blue ones, each plane in
row-major order of the 32x32 image.

Memory: the parsed archive is kept as uint8 arrays, 50,000 x 32 x 32 x 3 training and
10,000 x 32 x 32 x 3 test images, about 184 MB, once per process and archive (see
`read_cifar10`). While parsing, one member (30.7 MB) is held in addition. Each
`load_cifar10` call then hands TensorFlow the images of its splits as uint8 tensors
(another 184 MB at most, released with the datasets); conversion to float32 happens
one batch at a time.
"""

import dataclasses
import gzip
import hashlib
import logging
import math
import os
import pathlib
import tarfile
import threading
import time
import zlib
from typing import Any

from larq_lipschitz.data import (
    DataFormatError,
    DataNotFoundError,
    DataReadError,
    DatasetNotPreparedError,
    DataSplits,
    _loader_settings,
)

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and (population) standard deviation of the 50,000 training images in
# [0, 1] scale; normalize as (x - mean) / std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_SIDE = 32
_PIXEL_BYTES = 3 * _SIDE * _SIDE
_RECORD_BYTES = 1 + _PIXEL_BYTES
_CIFAR100_RECORD_BYTES = 2 + _PIXEL_BYTES
_RECORDS_PER_FILE = 10_000
_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_TEST_FILE = "test_batch.bin"
_META_FILE = "batches.meta.txt"
_DATA_FILES = (*_TRAIN_FILES, _TEST_FILE)
_FOLDER = "cifar-10-batches-bin"
_PAD = 4  # zero padding of the random-crop augmentation, in pixels
_CHUNK = 1 << 20
_NEEDED = (
    "load_cifar10 needs the CIFAR-10 binary version, cifar-10-binary.tar.gz or its "
    "extracted cifar-10-batches-bin folder (data_batch_1.bin .. data_batch_5.bin, "
    "test_batch.bin; 3,073-byte records), from https://www.cs.toronto.edu/~kriz/cifar.html"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Cifar10Arrays:
    """CIFAR-10 as read-only NumPy arrays, in the order of the files.

    # Attributes
        train_images: uint8 array (50000, 32, 32, 3), `data_batch_1.bin` first.
        train_labels: int32 array (50000,), values 0..9.
        test_images: uint8 array (10000, 32, 32, 3).
        test_labels: int32 array (10000,).
        class_names: the ten class names.
        path: the archive file or folder that was read ("" for arrays from TFDS).
        sha256: hex digest of the archive file; `None` for a folder or TFDS.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    path: str
    sha256: str | None


# One parsed archive per resolved path, valid while the files' sizes and mtimes match.
_CACHE: dict[str, tuple[Any, Cifar10Arrays]] = {}
_CACHE_LOCK = threading.Lock()


def clear_cifar10_cache() -> None:
    """Forget every parsed archive that `read_cifar10` keeps, freeing its memory."""
    with _CACHE_LOCK:
        _CACHE.clear()


def read_cifar10(path: str | os.PathLike) -> Cifar10Arrays:
    """Parse the CIFAR-10 binary archive (`.tar.gz`, `.tar`) or its extracted folder.

    The archive is read in one pass: the compressed file is hashed (SHA-256), inflated
    and split into its members as it streams by, and each member is decoded with
    `numpy.frombuffer`. The gzip checksum is verified. The result is cached per process,
    keyed by the resolved path and the size and modification time of the file (of each
    data file, for a folder), so a second call costs nothing; `clear_cifar10_cache`
    frees it. A folder may be `cifar-10-batches-bin` itself or the folder that holds it.

    Image `i` of a file is record `i`; pixel `(row, col)` of channel `c` is byte
    `1 + 1024 * c + 32 * row + col` of the record.

    # Arguments
        path: the archive file or the extracted folder.

    # Returns
        A `Cifar10Arrays` with read-only arrays (shared between callers: copy before
        writing).

    # Raises
        DataNotFoundError: the path, or a data file in it, does not exist.
        DataReadError: the operating system refuses to read a file.
        DataFormatError: the archive is truncated or corrupt, a file has the wrong size
            or labels outside 0..9, or the files belong to another dataset or format
            (CIFAR-100, the CIFAR-10 python or MATLAB version).

    # Example
    ```python
    arrays = read_cifar10("cifar-10-binary.tar.gz")
    arrays.train_images.shape  # (50000, 32, 32, 3)
    ```
    """
    given = pathlib.Path(path).expanduser()
    try:
        stat = given.stat()
    except FileNotFoundError:
        raise DataNotFoundError(
            f"{given}: no such file or folder; {_NEEDED}, or use source='tfds'"
        ) from None
    except OSError as error:
        raise DataReadError(f"{given}: cannot be read ({error.strerror})") from None
    if given.is_dir():
        folder = _find_folder(given)
        signature: Any = tuple(_file_signature(folder / name) for name in _DATA_FILES)
        key = str(folder.resolve())
    else:
        folder = None
        signature = (stat.st_size, stat.st_mtime_ns)
        key = str(given.resolve())
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None and cached[0] == signature:
        log.debug("CIFAR-10 from the cache of parsed archives: %s", key)
        return cached[1]
    start = time.perf_counter()
    if folder is not None:
        arrays = _read_folder(folder, sizes=[size for size, _ in signature])
    else:
        arrays = _read_archive(given)
    log.info("Parsed CIFAR-10 from %s in %.1f s", key, time.perf_counter() - start)
    with _CACHE_LOCK:
        _CACHE[key] = (signature, arrays)
    return arrays


# --- parsing -------------------------------------------------------------------------


def _file_signature(file: pathlib.Path) -> tuple[int, int]:
    try:
        stat = file.stat()
    except FileNotFoundError:
        raise DataNotFoundError(
            f"{file.parent}: {file.name} is missing from the CIFAR-10 folder; {_NEEDED}"
        ) from None
    except OSError as error:
        raise DataReadError(f"{file}: cannot be read ({error.strerror})") from None
    if not file.is_file():
        raise DataReadError(f"{file}: cannot be read, it is not a regular file")
    return stat.st_size, stat.st_mtime_ns


def _other_format(names: set[str]) -> str | None:
    """Which known dataset or format a set of member names / path parts belongs to."""
    if "cifar-10-batches-py" in names or {"data_batch_1", "batches.meta"} & names:
        return "the CIFAR-10 python (pickle) version (cifar-10-python.tar.gz)"
    if "cifar-10-batches-mat" in names or "data_batch_1.mat" in names:
        return "the CIFAR-10 MATLAB version (cifar-10-matlab.tar.gz)"
    if "cifar-100-binary" in names or {"train.bin", "fine_label_names.txt"} & names:
        return (
            "the CIFAR-100 binary version (train.bin, test.bin; 3,074-byte records: "
            "coarse label, fine label, pixels)"
        )
    if "cifar-100-python" in names or {"meta", "train", "test"} <= names:
        return "the CIFAR-100 python version (cifar-100-python.tar.gz)"
    return None


def _find_folder(given: pathlib.Path) -> pathlib.Path:
    """The folder holding the .bin files: `given` itself or its cifar-10-batches-bin."""
    for folder in (given, given / _FOLDER):
        if any((folder / name).exists() for name in _DATA_FILES):
            return folder
    try:
        names = {child.name for child in given.iterdir()}
    except OSError as error:
        raise DataReadError(f"{given}: cannot be read ({error.strerror})") from None
    found = _other_format(names | {given.name})
    if found is not None:
        raise DataFormatError(f"{given}: this folder holds {found}; {_NEEDED}")
    raise DataNotFoundError(
        f"{given}: this folder holds no CIFAR-10 binary batches; {_NEEDED}"
    )


class _HashingReader:
    """A binary file wrapper that hashes every byte read through it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self.hash.update(chunk)
        return chunk

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _Parsed:
    """Accumulates the decoded members of one archive or folder."""

    def __init__(self, origin: pathlib.Path) -> None:
        self.origin = origin
        self.train_images = np.empty((50_000, _SIDE, _SIDE, 3), np.uint8)
        self.train_labels = np.empty(50_000, np.int32)
        self.test_images = np.empty((10_000, _SIDE, _SIDE, 3), np.uint8)
        self.test_labels = np.empty(10_000, np.int32)
        self.done: set[str] = set()
        self.class_names: tuple[str, ...] | None = None

    def check_size(self, name: str, size: int) -> None:
        where = f"{self.origin}: {name}"
        if size % _RECORD_BYTES:
            hint = ""
            if size % _CIFAR100_RECORD_BYTES == 0:
                hint = (
                    f"; it divides into {size // _CIFAR100_RECORD_BYTES:,} records of "
                    f"3,074 bytes, the CIFAR-100 binary layout (coarse label, fine label, "
                    f"pixels): this is CIFAR-100 data, and {_NEEDED}"
                )
            raise DataFormatError(
                f"{where} is {size:,} bytes, not a multiple of the 3,073-byte CIFAR-10 "
                f"record (1 label byte + 3,072 pixel bytes){hint}"
            )
        if size // _RECORD_BYTES != _RECORDS_PER_FILE:
            raise DataFormatError(
                f"{where} holds {size // _RECORD_BYTES:,} records of 3,073 bytes, "
                f"expected 10,000: the file is truncated or not an official CIFAR-10 batch"
            )

    def add(self, name: str, content: bytes) -> None:
        self.check_size(name, len(content))
        records = np.frombuffer(content, np.uint8).reshape(-1, _RECORD_BYTES)
        labels = records[:, 0]
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            raise DataFormatError(
                f"{self.origin}: {name} record {bad[0]:,} has label {labels[bad[0]]}, "
                f"outside 0..9 ({bad.size:,} such records): the file is corrupt or not "
                f"CIFAR-10"
            )
        pixels = records[:, 1:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
        if name == _TEST_FILE:
            self.test_images[...] = pixels
            self.test_labels[...] = labels
        else:
            start = _TRAIN_FILES.index(name) * _RECORDS_PER_FILE
            rows = slice(start, start + _RECORDS_PER_FILE)
            self.train_images[rows] = pixels
            self.train_labels[rows] = labels
        self.done.add(name)

    def add_meta(self, content: bytes) -> None:
        names = tuple(
            line.strip() for line in content.decode("utf-8", "replace").split("\n")
        )
        names = tuple(name for name in names if name)
        if len(names) != 10:
            raise DataFormatError(
                f"{self.origin}: {_META_FILE} lists {len(names)} class names, expected 10"
            )
        self.class_names = names

    def result(self, what: str, sha256: str | None) -> Cifar10Arrays:
        missing = [name for name in _DATA_FILES if name not in self.done]
        if missing:
            raise DataNotFoundError(
                f"{self.origin}: {what} lacks {', '.join(missing)}; {_NEEDED}"
            )
        if self.class_names is None:
            log.warning(
                "%s: no %s, using the standard CIFAR-10 class names",
                self.origin,
                _META_FILE,
            )
        for array in (
            self.train_images,
            self.train_labels,
            self.test_images,
            self.test_labels,
        ):
            array.flags.writeable = False
        return Cifar10Arrays(
            train_images=self.train_images,
            train_labels=self.train_labels,
            test_images=self.test_images,
            test_labels=self.test_labels,
            class_names=self.class_names or CIFAR10_CLASS_NAMES,
            path=str(self.origin),
            sha256=sha256,
        )


def _read_folder(folder: pathlib.Path, sizes: list[int]) -> Cifar10Arrays:
    parsed = _Parsed(folder)
    for name, size in zip(_DATA_FILES, sizes, strict=True):
        parsed.check_size(name, size)  # before reading 30 MB
        parsed.add(name, _read_bytes(folder / name))
    meta = folder / _META_FILE
    if meta.is_file():
        parsed.add_meta(_read_bytes(meta))
    return parsed.result("the folder", sha256=None)


def _read_bytes(file: pathlib.Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:
        raise DataReadError(f"{file}: cannot be read ({error.strerror})") from None


def _read_archive(path: pathlib.Path) -> Cifar10Arrays:
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as error:
        raise DataReadError(f"{path}: cannot be read ({error.strerror})") from None
    with file:
        is_gzip = file.read(2) == b"\x1f\x8b"
        file.seek(0)
        raw = _HashingReader(file)
        parsed = _Parsed(path)
        try:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
            content_error = _read_members(path, stream, parsed)
            if is_gzip:  # read to the end, so that the gzip CRC and length are checked
                while stream.read(_CHUNK):
                    pass
            raw.drain()
        except EOFError as error:
            raise DataFormatError(
                f"{path}: the archive is truncated ({error}); download it again"
            ) from None
        except (zlib.error, gzip.BadGzipFile, tarfile.TarError) as error:
            kind = "gzip/tar" if is_gzip else "tar"
            detail = str(error) or type(error).__name__
            if "unexpected end of data" in detail:
                raise DataFormatError(
                    f"{path}: the archive is truncated ({detail}); download it again"
                ) from None
            raise DataFormatError(
                f"{path}: not a valid {kind} archive, the file is corrupt ({detail}); "
                f"download it again and compare its sha256. {_NEEDED}"
            ) from None
        except OSError as error:
            raise DataReadError(f"{path}: cannot be read ({error})") from None
    if content_error is not None:  # the archive is intact, its content is not CIFAR-10
        raise content_error
    return parsed.result("the archive", sha256=raw.hash.hexdigest())


def _read_members(
    path: pathlib.Path, stream: Any, parsed: _Parsed
) -> DataFormatError | None:
    """Decode the members as they stream by; return the first content error, if any.

    A member with the wrong size or bad labels is reported only after the whole stream
    has been read, so that a damaged archive is reported as such (truncated, failed
    checksum) rather than as the nonsense its damaged bytes decode to.
    """
    seen: set[str] = set()
    content_error = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            seen.update(parts)
            name = parts[-1] if parts else ""
            if not member.isfile() or name not in (*_DATA_FILES, _META_FILE):
                if not parsed.done:
                    found = _other_format(seen)
                    if found is not None:
                        raise DataFormatError(
                            f"{path}: this archive is {found}; {_NEEDED}"
                        )
                continue
            if name in parsed.done:
                raise DataFormatError(f"{path}: the archive holds {name} twice")
            if name == _META_FILE:
                parsed.add_meta(tar.extractfile(member).read())
                continue
            if content_error is not None:
                continue
            try:
                parsed.check_size(member.name, member.size)  # before reading 30 MB
                content = tar.extractfile(member).read()
                if len(content) != member.size:
                    raise EOFError(f"{member.name} ends after {len(content):,} bytes")
                parsed.add(name, content)
            except DataFormatError as error:
                content_error = error
    return content_error


# --- tensorflow-datasets -------------------------------------------------------------


def _read_tfds(data_dir: str | os.PathLike | None) -> tuple[Cifar10Arrays, str]:
    """CIFAR-10 from a prepared tensorflow-datasets folder; never downloads."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(
        "cifar10", data_dir=None if data_dir is None else os.fspath(data_dir)
    )
    if not (pathlib.Path(builder.data_dir) / "dataset_info.json").exists():
        raise DatasetNotPreparedError(
            f"tensorflow-datasets cifar10 is not prepared in {builder.data_dir}, and "
            f"load_cifar10 does not download. Pass the local archive instead "
            f"(source=PATH, on the command line --data PATH, PATH being "
            f"cifar-10-binary.tar.gz), or prepare the dataset once with network access: "
            f"tfds build cifar10 --data_dir {pathlib.Path(builder.data_dir).parents[1]}"
        )
    parts = []
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        )
        if images.dtype != np.uint8 or images.shape[1:] != (_SIDE, _SIDE, 3):
            raise DataFormatError(
                f"{builder.data_dir}: tfds cifar10 {split} images have shape "
                f"{images.shape[1:]} and dtype {images.dtype}, expected (32, 32, 3) uint8"
            )
        if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
            raise DataFormatError(
                f"{builder.data_dir}: tfds cifar10 {split} labels lie outside 0..9"
            )
        parts += [images, labels.astype(np.int32)]
    # TFDS keeps the label indices of the official files; the names it stores are
    # those of batches.meta.txt once prepared, but digits in an unprepared builder.
    arrays = Cifar10Arrays(
        *parts, class_names=CIFAR10_CLASS_NAMES, path="", sha256=None
    )
    return arrays, str(builder.data_dir)


# --- tf.data pipeline ----------------------------------------------------------------


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of example indices whose every prefix is class-balanced.

    Each class is shuffled on its own; then the first example of every class comes
    (classes in random order), then the second of every class, and so on. Any prefix of
    length `k * num_classes` therefore holds exactly `k` examples of each class, as long
    as every class has `k` examples; a class that runs out simply stops contributing.

    # Arguments
        labels: 1-D integer array of class labels.
        seed: seed of the NumPy generator.

    # Returns
        An int64 permutation of `range(len(labels))`.
    """
    labels = np.asarray(labels)
    permutation = np.random.default_rng(seed).permutation(labels.size)
    permuted = labels[permutation]
    rank = np.empty(labels.size, np.int64)
    for value in np.unique(permuted):
        where = np.flatnonzero(permuted == value)
        rank[where] = np.arange(where.size)
    return permutation[np.lexsort((np.arange(labels.size), rank))]


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, pad: int = _PAD) -> tf.Tensor:
    """Zero-pad a batch by `pad` pixels, crop back at random offsets, flip at random.

    Each image gets its own offsets `dy, dx` (uniform in `0..2 * pad`) and its own coin
    for a horizontal flip; the output is, for every image,
    `flip?(zero_pad(x)[dy : dy + H, dx : dx + W])`. Everything is drawn by stateless
    ops from `seed`, so the same seed gives the same batch. The whole batch is cropped
    by two gathers, without a per-image loop.

    # Arguments
        images: batch `(B, H, W, C)` of any dtype.
        seed: shape `[2]` integer seed of the stateless random ops.
        pad: padding and maximal shift, in pixels.

    # Returns
        A batch of the same shape and dtype.

    # Example
    ```python
    batch = tf.zeros([8, 32, 32, 3], tf.uint8)
    random_crop_flip(batch, tf.constant([1, 2])).shape  # (8, 32, 32, 3)
    ```
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform(
        [batch, 2], offset_seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform(
        [batch, 1], flip_seed, minval=0, maxval=2, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(height)[None, :]
    columns = tf.range(width)[None, :]
    columns = offsets[:, 1:] + tf.where(flip == 1, width - 1 - columns, columns)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, columns, axis=2, batch_dims=1)


def _to_float(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(images, tf.float32) / 255.0


def _eval_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.convert_to_tensor(images), tf.convert_to_tensor(labels, tf.int32))
    )
    dataset = dataset.batch(batch_size).map(
        lambda x, y: (_to_float(x), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    augment: bool,
    drop_remainder: bool,
) -> tf.data.Dataset:
    """One epoch per pass; each pass draws an epoch key, everything else is stateless.

    The epoch key comes from `tf.data.Dataset.random(seed)` with re-randomization on
    each iteration: pass `e` of the dataset always gets the same key for a given seed.
    The order of the epoch is `stateless_shuffle(range(n), [key, seed])`, and batch `s`
    is augmented with the seed `fold_in([key, seed], s)`.
    """
    count = images.shape[0]
    images_t = tf.convert_to_tensor(images)
    labels_t = tf.convert_to_tensor(labels, tf.int32)
    seed_t = tf.constant(seed, tf.int64)
    batches = count // batch_size if drop_remainder else math.ceil(count / batch_size)

    def epoch(key: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.stack([key, seed_t])
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), epoch_seed
        )
        steps = tf.data.Dataset.from_tensor_slices(order).batch(
            batch_size, drop_remainder
        )
        return steps.enumerate().map(
            lambda step, index: (
                tf.random.experimental.stateless_fold_in(epoch_seed, step),
                index,
            )
        )

    def make_batch(
        batch_seed: tf.Tensor, index: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.gather(images_t, index)
        if augment:
            batch = random_crop_flip(batch, batch_seed)
        return _to_float(batch), tf.gather(labels_t, index)

    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    dataset = keys.flat_map(epoch).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _splits_from_arrays(
    arrays: Cifar10Arrays,
    *,
    batch_size: int,
    train_examples: int | None,
    validation_examples: int,
    seed: int,
    augment: bool,
    drop_remainder: bool,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, tf.data.Dataset, dict[str, int]]:
    available = arrays.train_labels.size
    wanted = validation_examples + (train_examples or 0)
    if wanted > available or validation_examples >= available:
        raise ValueError(
            f"load_cifar10: validation_examples ({validation_examples}) + train_examples "
            f"({train_examples}) exceed the {available:,} training images, or leave none "
            f"for training"
        )
    if train_examples is None and validation_examples == 0:
        train_images, train_labels = arrays.train_images, arrays.train_labels
        validation = None
    else:
        order = stratified_order(arrays.train_labels, seed)
        held_out = np.sort(order[:validation_examples])
        end = None if train_examples is None else validation_examples + train_examples
        kept = np.sort(order[validation_examples:end])
        train_images, train_labels = (
            arrays.train_images[kept],
            arrays.train_labels[kept],
        )
        validation = None
        if validation_examples:
            validation = _eval_dataset(
                arrays.train_images[held_out], arrays.train_labels[held_out], batch_size
            )
    if drop_remainder and train_labels.size < batch_size:
        raise ValueError(
            f"load_cifar10: {train_labels.size} training images make no full batch of "
            f"{batch_size} with drop_remainder=True"
        )
    train = _train_dataset(
        train_images,
        train_labels,
        batch_size=batch_size,
        seed=seed,
        augment=augment,
        drop_remainder=drop_remainder,
    )
    test = _eval_dataset(arrays.test_images, arrays.test_labels, batch_size)
    counts = {
        "train": int(train_labels.size),
        "validation": int(validation_examples),
        "test": int(arrays.test_labels.size),
    }
    return train, validation, test, counts


def load_cifar10(
    source: str | os.PathLike | None = None,
    *,
    batch_size: int = 128,
    train_examples: int | None = None,
    validation_examples: int = 0,
    seed: int = 0,
    augment: bool = True,
    data_dir: str | os.PathLike | None = None,
    drop_remainder: bool = False,
) -> DataSplits:
    """CIFAR-10 as batched `tf.data` pipelines of float32 images in `[0, 1]`.

    Images are `(batch, 32, 32, 3)` float32 with `x = byte / 255`, not normalized (the
    models normalize, with `(x - CIFAR10_MEAN) / CIFAR10_STD`); labels are int32 0..9.

    Training set: shuffled anew on every pass (a full permutation) and, with `augment`,
    the standard augmentation: 4-pixel zero padding, a random 32x32 crop and a random
    horizontal flip (`random_crop_flip`), applied per batch by stateless random ops.
    Determinism: a given `seed` yields the same sequence of epochs (same order, same
    crops and flips) in every run and for every load; different seeds yield different
    ones. Each new iterator over `train` draws its epoch key from a seeded
    `tf.data.Dataset.random` stream, so epochs are numbered by iterators created, not
    by batches consumed (`model.fit` creates one before its first epoch; the same in
    every run). That stream also folds in TensorFlow's global seed if
    `tf.random.set_seed` was called before loading: fix it too, or leave it unset.

    `validation_examples` holds out that many training images as `validation` (never
    test images), and `train_examples` caps the training set; both take class-balanced
    subsets (see `stratified_order`) chosen by `seed`, disjoint from each other. The
    test split is in file order, neither shuffled nor augmented; `drop_remainder`
    applies to the training set only, so that evaluation always sees every image.

    # Arguments
        source: `None` or `"tfds"` for tensorflow-datasets `cifar10` (already prepared
            in `data_dir`: this function never downloads), or the path of the official
            binary archive `cifar-10-binary.tar.gz` or of its extracted
            `cifar-10-batches-bin` folder (then TFDS is not imported at all).
        batch_size: examples per batch.
        train_examples: at most this many training images (`None`: all that remain).
        validation_examples: training images held out for validation.
        seed: seed of the subsets, the shuffling and the augmentation.
        augment: apply the random crop and flip to the training set.
        data_dir: TFDS data folder (TFDS source only).
        drop_remainder: drop the last, smaller training batch.

    # Returns
        A `DataSplits`; `info["num_examples"]` counts the examples of each split and
        `len(splits.train)` the batches of an epoch.

    # Raises
        ValueError: for invalid arguments.
        DataError: see `read_cifar10` for the archive; `DatasetNotPreparedError` when
            TFDS has no prepared `cifar10` in `data_dir`.

    # Example
    ```python
    splits = load_cifar10("cifar-10-binary.tar.gz", train_examples=5000, seed=1)
    model.fit(splits.train, validation_data=splits.test, epochs=10)
    ```
    """
    caller = "load_cifar10"
    batch_size, train_examples, validation_examples, seed = _loader_settings(
        caller,
        batch_size=batch_size,
        train_examples=train_examples,
        validation_examples=validation_examples,
        seed=seed,
        augment=augment,
        drop_remainder=drop_remainder,
    )
    if source is None or (isinstance(source, str) and source == "tfds"):
        arrays, path = _read_tfds(data_dir)
        kind, sha256 = "tfds", None
    elif isinstance(source, str | os.PathLike):
        if data_dir is not None:
            log.warning(
                "load_cifar10: data_dir=%s is ignored, the archive %s is read instead",
                data_dir,
                source,
            )
        arrays = read_cifar10(source)
        kind, path, sha256 = "archive", os.fspath(source), arrays.sha256
    else:
        raise TypeError(
            f"load_cifar10: source must be None, 'tfds' or a path, got {source!r}"
        )
    train, validation, test, counts = _splits_from_arrays(
        arrays,
        batch_size=batch_size,
        train_examples=train_examples,
        validation_examples=validation_examples,
        seed=seed,
        augment=augment,
        drop_remainder=drop_remainder,
    )
    info = {
        "dataset": "cifar10",
        "source": kind,
        "path": path,
        "sha256": sha256,
        "num_examples": counts,
        "class_names": list(arrays.class_names),
        "num_classes": 10,
        "input_shape": (_SIDE, _SIDE, 3),
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "batch_size": batch_size,
        "seed": seed,
        "augment": augment,
        "drop_remainder": drop_remainder,
        "subset": "all"
        if train_examples is None and validation_examples == 0
        else "class-balanced, seeded",
    }
    return DataSplits(train=train, validation=validation, test=test, info=info)
