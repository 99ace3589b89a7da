"""Input perturbations as batched TensorFlow ops: noise and CIFAR-10-C corruptions.

Every function here takes a batch of images in **[0, 1] pixel space** (float NHWC; uint8
batches are divided by 255 first) and returns float32 images clipped to [0, 1]. Apply
the perturbation first and normalize afterwards: a noise level in pixel units added
after normalization is silently about four times off.

Randomness comes from stateless TensorFlow ops. The stream used for one call is derived
from `(seed, name of the perturbation, batch key)`, where the batch key is `batch_index`
when it is given and otherwise a fingerprint of the batch's pixels. So the same batch
with the same seed always gets the same perturbation, different seeds differ, and
consecutive batches of a `tf.data` pipeline get independent noise without any state.
The severities of one corruption share their random numbers (common random numbers), so
a higher severity is the same draw at a larger strength. A caller that derives its own
per-batch stateless seed can pass it as a shape-(2,) integer tensor instead.

Contents:

- `add_noise(images, family, level)` for the continuous families in `NOISE_FAMILIES`.
- `corrupt(images, name, severity)` for the CIFAR-10-C corruptions in `CORRUPTIONS`,
  with the published CIFAR severities 1 to 5.
- `perturbation_fn(name, severity_or_level, seed)`, a function for `Dataset.map`.
- `load_cifar10_corrupted(name, severity, data_dir, batch_size)`, the released images.
- `check_pixels(images, caller)`, a clear error for non-finite or out-of-range pixels.

```python
import larq_lipschitz.perturbations as lp
import tensorflow as tf

images = tf.random.uniform((8, 32, 32, 3))
noisy = lp.add_noise(images, "gaussian", 0.05, seed=1)
foggy = lp.corrupt(images, "fog", severity=3, seed=1)
```
"""

import functools
import logging
import math
import types
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = [
    "CORRUPTIONS",
    "NOISE_FAMILIES",
    "STANDARD_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "UNAVAILABLE_CORRUPTIONS",
    "SEVERITIES",
    "add_noise",
    "corrupt",
    "perturbation_fn",
    "load_cifar10_corrupted",
    "check_pixels",
    "PIXEL_TOLERANCE",
]

SEVERITIES = (1, 2, 3, 4, 5)
_SIZE = 32  # the CIFAR-10-C parameters are defined for 32 x 32 images


def _arange(stop: float) -> tuple[float, ...]:
    # Zoom factors exactly as CIFAR-10-C enumerates them (np.arange(1, stop, 0.01)).
    return tuple(float(v) for v in np.arange(1, stop, 0.01))


# Per-severity parameters of the CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR
# 2019, CIFAR variants). Tuples of plain Python values, severity 1 first.
CORRUPTIONS: types.MappingProxyType = types.MappingProxyType(
    {
        # sigma of additive N(0, sigma^2)
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        # photon count c of Poisson(x c) / c
        "shot_noise": (500, 250, 100, 75, 50),
        # salt-and-pepper amount (fraction of pixel values replaced by 0 or 1)
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        # sigma of multiplicative x + x N(0, sigma^2)
        "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
        # Gaussian blur sigma in pixels
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        # (blur sigma, max shift, iterations) of glass blur
        "glass_blur": (
            (0.05, 1, 1),
            (0.25, 1, 1),
            (0.4, 1, 1),
            (0.25, 1, 2),
            (0.4, 1, 2),
        ),
        # (disk radius, alias sigma) of defocus blur
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        # (radius, sigma) of motion blur; the angle is uniform in [-45, 45) degrees
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        # zoom factors averaged by zoom blur
        "zoom_blur": (
            _arange(1.06),
            _arange(1.11),
            _arange(1.16),
            _arange(1.21),
            _arange(1.26),
        ),
        # (flake mean, flake std, zoom, threshold, blur radius, blur sigma,
        #  image weight)
        "snow": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        # (fog strength, fractal wibble decay)
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        # (x - channel mean) c + channel mean
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        # HSV value + c
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        # HSV saturation s a + b, as (a, b)
        "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        # JPEG quality
        "jpeg_compression": (80, 65, 58, 50, 40),
        # box-resize to int(32 c) pixels and back
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        # (displacement alpha, displacement smoothing sigma, affine jitter), in pixels
        "elastic_transform": (
            (0.0, 0.0, 32 * 0.08),
            (32 * 0.05, 32 * 0.2, 32 * 0.07),
            (32 * 0.08, 32 * 0.06, 32 * 0.06),
            (32 * 0.1, 32 * 0.04, 32 * 0.05),
            (32 * 0.1, 32 * 0.03, 32 * 0.03),
        ),
    }
)

# The 15 corruptions of the CIFAR-10-C benchmark, in the order of the paper.
STANDARD_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# The four held-out corruptions released with CIFAR-10-C.
EXTRA_CORRUPTIONS: tuple[str, ...] = (
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)

# Corruptions of the release that this module cannot synthesize faithfully, and why.
UNAVAILABLE_CORRUPTIONS: types.MappingProxyType = types.MappingProxyType(
    {
        "frost": (
            "frost blends crops of six photographs of frost (frost1.png ... frost6.jpg) "
            "that are distributed with the CIFAR-10-C generator, not with this package"
        ),
        "spatter": (
            "spatter's severities 1-3 are built from OpenCV's Canny edge detector, "
            "distance transform and histogram equalisation, which have no faithful "
            "TensorFlow equivalent here"
        ),
    }
)

NOISE_FAMILIES: tuple[str, ...] = ("gaussian", "uniform", "salt_and_pepper")

# Names of the configurations of tensorflow-datasets' `cifar10_corrupted`.
_TFDS_NAMES = {"glass_blur": "frosted_glass_blur", "elastic_transform": "elastic"}
_RELEASED = STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS


# --------------------------------------------------------------------------------------
# Argument checks, pixel conversion and random streams
# --------------------------------------------------------------------------------------


def _check_corruption(name: str, severity: int) -> None:
    if name in UNAVAILABLE_CORRUPTIONS:
        raise ValueError(
            f"corrupt: corruption {name!r} is not synthesized by larq_lipschitz: "
            f"{UNAVAILABLE_CORRUPTIONS[name]}. Use load_cifar10_corrupted({name!r}, ...) "
            f"for the released images. Synthesized corruptions: {sorted(CORRUPTIONS)}."
        )
    if name not in CORRUPTIONS:
        raise ValueError(
            f"corrupt: unknown corruption {name!r}; valid corruptions are "
            f"{sorted(CORRUPTIONS)}."
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(
            f"corrupt: severity of {name!r} must be an integer in 1..5, got {severity!r}."
        )
    if int(severity) not in SEVERITIES:
        raise ValueError(
            f"corrupt: severity of {name!r} must be one of {list(SEVERITIES)}, got {severity}."
        )


def _check_noise(family: str, level: float) -> float:
    if family not in NOISE_FAMILIES:
        raise ValueError(
            f"add_noise: unknown noise family {family!r}; valid families are "
            f"{list(NOISE_FAMILIES)} (CIFAR-10-C corruptions go through corrupt())."
        )
    if isinstance(level, bool) or not isinstance(level, int | float | np.number):
        raise ValueError(f"add_noise: level must be a number, got {level!r}.")
    level = float(level)
    if not math.isfinite(level) or level < 0:
        raise ValueError(f"add_noise: level must be a finite number >= 0, got {level}.")
    if family == "salt_and_pepper" and level > 1:
        raise ValueError(
            f"add_noise: salt_and_pepper amount must be <= 1, got {level}."
        )
    return level


#: How far outside [0, 1] a float pixel may lie (float rounding) before it is refused.
PIXEL_TOLERANCE = 1e-5


def check_pixels(images, caller: str, where: str = "") -> None:
    """Raise `ValueError` unless a batch holds finite pixels in [0, 1].

    Checked eagerly, on the batch as given (uint8 batches always pass): first that
    every value is finite, then that every value lies in
    `[-PIXEL_TOLERANCE, 1 + PIXEL_TOLERANCE]`. The message names the first offending
    image of the batch, so that a NaN in a test set is reported as such, before it
    reaches a model or a perturbation (whose own range assertion would fail with a
    TensorFlow traceback).

    # Arguments
        images: a batch `(batch, height, width, channels)`, NumPy or tensor.
        caller: the name to start the message with.
        where: what the batch is, e.g. `"test batch 3"`, for the message.

    # Raises
        ValueError: for NaN or infinite values, or values outside [0, 1].

    # Example
    ```python
    check_pixels(tf.random.uniform((2, 32, 32, 3)), "mine")  # passes
    ```
    """
    x = tf.convert_to_tensor(images)
    if x.dtype.is_integer or x.shape.rank is None or x.shape.rank < 1:
        return
    x = tf.cast(x, tf.float32)
    at = f" {where}" if where else ""
    axes = list(range(1, x.shape.rank))
    finite = tf.reduce_all(tf.math.is_finite(x), axis=axes)
    if not bool(tf.reduce_all(finite)):
        first = int(tf.where(tf.logical_not(finite))[0][0])
        bad = int(tf.size(x)) - int(tf.math.count_nonzero(tf.math.is_finite(x)))
        raise ValueError(
            f"{caller}:{at} image {first} holds NaN or infinite pixel values ({bad} in "
            "the batch); clean the data first."
        )
    low, high = float(tf.reduce_min(x)), float(tf.reduce_max(x))
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        inside = tf.reduce_all(
            tf.logical_and(x >= -PIXEL_TOLERANCE, x <= 1 + PIXEL_TOLERANCE), axis=axes
        )
        first = int(tf.where(tf.logical_not(inside))[0][0])
        raise ValueError(
            f"{caller}:{at} image {first} has pixel values outside [0, 1] (the batch "
            f"spans [{low:.4g}, {high:.4g}]); give pixels in [0, 1] (uint8 / 255), "
            "before any normalization."
        )


def _check_seed(seed, caller: str):
    """An integer, or a shape-(2,) integer tensor taken as a ready stateless seed."""
    if isinstance(seed, tf.Tensor | tf.Variable | np.ndarray):
        seed = tf.convert_to_tensor(seed)
        if not seed.dtype.is_integer or seed.shape.rank != 1 or seed.shape[0] != 2:
            raise ValueError(
                f"{caller}: a tensor seed must be a shape-(2,) integer stateless seed, "
                f"got {seed.dtype.name} of shape {seed.shape}."
            )
        return tf.cast(seed, tf.int64)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"{caller}: seed must be an integer, got {seed!r}.")
    return int(seed)


def _as_pixels(images: tf.Tensor, caller: str, *, need_cifar: bool) -> tf.Tensor:
    """float32 NHWC pixels in [0, 1]; uint8 input is divided by 255."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            f"{caller}: images must be a batch of shape (batch, height, width, channels), "
            f"got shape {images.shape}."
        )
    if need_cifar and tuple(images.shape[1:]) != (_SIZE, _SIZE, 3):
        raise ValueError(
            f"{caller}: the CIFAR-10-C corruptions are defined for 32 x 32 RGB images "
            f"(their severities are CIFAR-specific), got images of shape {images.shape}."
        )
    if images.dtype.is_integer:
        if images.dtype != tf.uint8:
            raise ValueError(
                f"{caller}: integer images must be uint8, got {images.dtype}."
            )
        return tf.cast(images, tf.float32) / 255.0
    if not images.dtype.is_floating:
        raise ValueError(
            f"{caller}: images must be float or uint8, got {images.dtype}."
        )
    images = tf.cast(images, tf.float32)
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(tf.abs(images - 0.5)),
        0.5 + 1e-5,
        message=(
            f"{caller}: images must be pixels in [0, 1]. Apply perturbations before "
            "normalization (a level in pixel units added to normalized images is "
            "about 4x off), or pass uint8 images."
        ),
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def _stream_key(images: tf.Tensor, seed, tag: str, batch_index) -> tf.Tensor:
    """A stateless seed of shape (2,) for one call.

    An integer seed is combined with the perturbation's tag and a batch key: the
    `batch_index` when given, else a fingerprint of the batch's pixels. A tensor seed
    (already derived per batch by the caller) is only combined with the tag, and
    `batch_index` is folded in as well when it is given.
    """
    tag_data = tf.constant(zlib.crc32(tag.encode()), tf.int64)
    if isinstance(seed, tf.Tensor):
        key = tf.random.experimental.stateless_fold_in(seed, tag_data)
        if batch_index is None:
            return key
        return tf.random.experimental.stateless_fold_in(
            key, tf.cast(batch_index, tf.int64)
        )
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0], tf.int64), tag_data
    )
    if batch_index is None:
        fingerprint = tf.fingerprint(tf.reshape(images, [1, -1]))
        data = tf.bitcast(tf.reshape(fingerprint, [8]), tf.int64)
    else:
        data = tf.cast(batch_index, tf.int64)
    return tf.random.experimental.stateless_fold_in(key, data)


def _split(key: tf.Tensor, num: int) -> list[tf.Tensor]:
    keys = tf.random.experimental.stateless_split(key, num)
    return [keys[i] for i in range(num)]


# --------------------------------------------------------------------------------------
# Linear resampling operators as matrices (built once in NumPy, applied as matmuls)
# --------------------------------------------------------------------------------------


def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map integer sample positions outside [0, n) back inside, for a border mode.

    nearest: a a a | a b c d | d d d;  reflect: b a | a b c d | d c;
    mirror (OpenCV's REFLECT_101): c b | a b c d | c b.
    """
    if mode == "nearest":
        return np.clip(index, 0, n - 1)
    if mode == "reflect":
        index = np.mod(index, 2 * n)
        return np.where(index >= n, 2 * n - 1 - index, index)
    if mode == "mirror":
        period = 2 * n - 2
        index = np.mod(index, period)
        return np.where(index >= n, period - index, index)
    raise ValueError(f"unknown border mode {mode!r}")


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """Normalized 1-D Gaussian taps exp(-k^2 / 2 sigma^2), |k| <= int(truncate sigma + .5)."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return np.ones(1)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (k / sigma) ** 2)
    return taps / taps.sum()


def _filter_matrix(n: int, taps: np.ndarray, mode: str) -> np.ndarray:
    """(n, n) matrix A with (A v)[i] = sum_k taps[k] v[fold(i + k - r)]: a 1-D correlation."""
    radius = (len(taps) - 1) // 2
    out = np.zeros((n, n))
    rows = np.arange(n)
    for k, tap in enumerate(taps):
        np.add.at(out, (rows, _fold(rows + k - radius, n, mode)), tap)
    return out


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(sigma: float, *, mode: str = "nearest", truncate: float = 4.0):
    """Gaussian blur along one axis, as scikit-image's `gaussian` does it."""
    return _filter_matrix(_SIZE, _gaussian_weights(sigma, truncate), mode)


@functools.lru_cache(maxsize=64)
def _box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of Pillow's BOX resampling along one axis.

    Output pixel o covers the input interval centred on (o + 1/2) n_in / n_out of width
    max(n_in / n_out, 1); an input pixel takes part, with weight 1 before normalization,
    when its centre lies inside that interval (right end included).
    """
    scale = n_in / n_out
    width = max(scale, 1.0)
    half = 0.5 * width
    out = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - half + 0.5), 0)
        hi = min(int(centre + half + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / width
            if -0.5 < t <= 0.5:
                out[o, i] = 1.0
        out[o] /= out[o].sum()
    return out


@functools.lru_cache(maxsize=64)
def _zoom_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix of CIFAR-10-C's centre-crop zoom along one axis.

    The central ceil(n / factor) pixels are zoomed by linear interpolation with corner
    alignment (source position o (m - 1) / (M - 1) for output o of M = round(m factor)),
    then the central n outputs are kept.
    """
    crop = int(np.ceil(n / factor))
    top = (n - crop) // 2
    zoomed = int(round(crop * factor))
    trim = (zoomed - n) // 2
    out = np.zeros((n, n))
    for i in range(n):
        pos = (i + trim) * (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
        j0 = min(int(np.floor(pos)), crop - 1)
        frac = pos - j0
        j1 = min(j0 + 1, crop - 1)
        out[i, top + j0] += 1.0 - frac
        out[i, top + j1] += frac
    return out


def _apply_rows_cols(x: tf.Tensor, rows: np.ndarray, cols: np.ndarray) -> tf.Tensor:
    """out[b, i, j, c] = sum_{h, w} rows[i, h] x[b, h, w, c] cols[j, w]."""
    # tensordot lowers to plain 2-D matmuls. A broadcasting batch matmul would be
    # simpler, but TensorFlow 2.19's oneDNN kernel returns wrong values (and corrupts
    # the heap) for a (batch, 1, m, k) @ (k, n) product, i.e. for one-channel images.
    rows = tf.constant(rows, tf.float32)
    cols = tf.constant(cols, tf.float32)
    out = tf.tensordot(x, rows, axes=[[1], [1]])  # (batch, W, C, i)
    out = tf.tensordot(out, cols, axes=[[1], [1]])  # (batch, C, i, j)
    return tf.transpose(out, [0, 2, 3, 1])


def _separable(x: tf.Tensor, matrix: np.ndarray) -> tf.Tensor:
    return _apply_rows_cols(x, matrix, matrix)


def _quantize_floor(x: tf.Tensor) -> tf.Tensor:
    """8-bit storage by truncation, as `np.uint8(v * 255)` does (float dust guarded)."""
    return tf.floor(tf.clip_by_value(x, 0.0, 1.0) * 255.0 + 1e-3) / 255.0


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def _gaussian_noise(x, sigma, key):
    return tf.clip_by_value(
        x + sigma * tf.random.stateless_normal(tf.shape(x), key), 0, 1
    )


def _uniform_noise(x, half_width, key):
    u = tf.random.stateless_uniform(tf.shape(x), key, minval=-1.0, maxval=1.0)
    return tf.clip_by_value(x + half_width * u, 0, 1)


def _salt_and_pepper(x, amount, key):
    # Each pixel value independently: 0 with probability amount/2, 1 with amount/2.
    u = tf.random.stateless_uniform(tf.shape(x), key)
    x = tf.where(u < 0.5 * amount, tf.zeros_like(x), x)
    return tf.where((u >= 0.5 * amount) & (u < amount), tf.ones_like(x), x)


def _shot_noise(x, photons, key):
    counts = tf.random.stateless_poisson(
        tf.shape(x), key, x * photons, dtype=tf.float32
    )
    return tf.clip_by_value(counts / photons, 0, 1)


def _speckle_noise(x, sigma, key):
    z = tf.random.stateless_normal(tf.shape(x), key)
    return tf.clip_by_value(x + x * sigma * z, 0, 1)


# --------------------------------------------------------------------------------------
# Blurs
# --------------------------------------------------------------------------------------


def _gaussian_blur(x, sigma, key):
    del key
    return tf.clip_by_value(_separable(x, _gaussian_matrix(sigma)), 0, 1)


@functools.lru_cache(maxsize=64)
def _defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """Disk of the given radius on a 17 x 17 grid, normalized, then blurred by a 3 x 3
    Gaussian of `alias_sigma`; trimmed to its non-zero support."""
    grid = np.arange(-8, 9)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-0.5 * (np.arange(-1, 2) / alias_sigma) ** 2)
    g /= g.sum()
    pad = np.pad(disk, 1)  # the disk is far from the grid border, so zeros are exact
    blurred = np.zeros_like(disk)
    for dy in range(3):
        for dx in range(3):
            blurred += g[dy] * g[dx] * pad[dy : dy + 17, dx : dx + 17]
    keep = np.nonzero(blurred.sum(axis=1) > 0)[0]
    lo, hi = keep.min(), keep.max() + 1
    return blurred[lo:hi, lo:hi]


def _defocus_blur(x, params, key):
    del key
    kernel = _defocus_kernel(*params)
    r = kernel.shape[0] // 2
    k = tf.constant(np.tile(kernel[:, :, None, None], (1, 1, 3, 1)), tf.float32)
    padded = tf.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    y = tf.nn.depthwise_conv2d(padded, k, strides=[1, 1, 1, 1], padding="VALID")
    return tf.clip_by_value(y, 0, 1)


_GLASS_STEPS = (_SIZE - 2) ** 2  # pixels visited per iteration: rows and columns 31..2


def _glass_shuffle(x: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
    """The local pixel shuffle of CIFAR-10-C's glass blur, as the release computes it.

    The generator visits (h, w) for h = 31..2 and, within each row, w = 31..2, draws
    (dx, dy) in {-1, 0}^2 and writes `x[h, w], x[h+dy, w+dx] = x[h+dy, w+dx], x[h, w]`.
    On an RGB NumPy array both right-hand sides are views, so this assignment copies
    the neighbour into (h, w) and leaves the neighbour unchanged: it is not a swap.
    The neighbour lies up or left, so it is visited later and still holds its value
    from before the pass. A pass is therefore one gather:
    x'[h, w] = x[h + dy, w + dx] for 2 <= h, w <= 31, every other pixel unchanged.

    # Arguments
        x: (batch, 32, 32, channels) images.
        offsets: (batch, iterations, 900, 2) integer (dx, dy) in {-1, 0} per visited
            pixel, in the generator's visiting order.
    """
    n = _SIZE
    batch = tf.shape(x)[0]
    channels = x.shape[-1]
    identity = tf.range(n * n)[None, :]
    flat = tf.reshape(x, [batch, n * n, channels])
    for it in range(offsets.shape[1]):
        step = tf.cast(offsets[:, it], tf.int32)
        shift = step[..., 1] * n + step[..., 0]  # dy * 32 + dx, visiting order
        shift = tf.reverse(tf.reshape(shift, [batch, n - 2, n - 2]), axis=[1, 2])
        shift = tf.pad(shift, [[0, 0], [2, 0], [2, 0]])  # rows and columns 0, 1 stay
        flat = tf.gather(
            flat, identity + tf.reshape(shift, [batch, n * n]), batch_dims=1
        )
    return tf.reshape(flat, tf.shape(x))


def _glass_blur_with(x, params, offsets):
    sigma, _, _ = params
    blur = _gaussian_matrix(sigma)
    x = _quantize_floor(_separable(x, blur))
    x = _glass_shuffle(x, offsets)
    return tf.clip_by_value(_separable(x, blur), 0, 1)


def _glass_blur(x, params, key):
    _, delta, iterations = params
    offsets = tf.random.stateless_uniform(
        [tf.shape(x)[0], iterations, _GLASS_STEPS, 2],
        key,
        minval=-delta,
        maxval=delta,
        dtype=tf.int32,
    )
    return _glass_blur_with(x, params, offsets)


@functools.lru_cache(maxsize=64)
def _motion_taps(radius: int, sigma: float) -> np.ndarray:
    """One-sided Gaussian taps exp(-i^2 / 2 sigma^2), i = 0 .. 2 radius (ImageMagick).

    Trailing taps below 1e-9 of the total are dropped: together they move no output by
    more than about 1e-8, below float32 resolution, and they are most of the taps at
    small sigma (severity 1 keeps 7 of 13).
    """
    i = np.arange(2 * int(math.ceil(radius)) + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (i / sigma) ** 2)
    taps /= taps.sum()
    keep = np.nonzero(taps >= 1e-9)[0].max() + 1
    return taps[:keep]


def _motion_blur_with(x, radius, sigma, angle_degrees):
    """Average of copies of x sampled at i (sin a, cos a) ahead, i = 0..2 radius,
    weighted by one-sided Gaussian taps, with offsets ceil(v - 1/2) and edge pixels
    repeated beyond the border: ImageMagick's MotionBlurImage."""
    angle = tf.cast(angle_degrees, tf.float64) * (math.pi / 180.0)
    sin, cos = tf.sin(angle), tf.cos(angle)
    height, width = x.shape[1], x.shape[2]
    ry = tf.range(height)[None, :]
    rx = tf.range(width)[None, :]
    out = tf.zeros_like(x)
    for i, tap in enumerate(_motion_taps(radius, sigma)):
        dy = tf.cast(tf.math.ceil(i * sin - 0.5), tf.int32)[:, None]
        dx = tf.cast(tf.math.ceil(i * cos - 0.5), tf.int32)[:, None]
        rows = tf.clip_by_value(ry + dy, 0, height - 1)
        cols = tf.clip_by_value(rx + dx, 0, width - 1)
        shifted = tf.gather(
            tf.gather(x, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1
        )
        out += float(tap) * shifted
    return out


def _motion_blur(x, params, key):
    angle = tf.random.stateless_uniform(
        [tf.shape(x)[0]], key, minval=-45.0, maxval=45.0
    )
    return tf.clip_by_value(_motion_blur_with(x, *params, angle), 0, 1)


@functools.lru_cache(maxsize=8)
def _zoom_operator(factors: tuple[float, ...]) -> np.ndarray:
    operator = np.eye(_SIZE * _SIZE)
    for factor in factors:
        zoom = _zoom_matrix(_SIZE, factor)
        operator += np.kron(zoom, zoom)
    return operator / (len(factors) + 1)


def _zoom_blur(x, factors, key):
    """(x + sum_k Z_k x Z_k^T) / (K + 1), applied as one (1024, 1024) operator on the
    flattened image: sum_k kron(Z_k, Z_k) plus the identity."""
    del key
    operator = _zoom_operator(tuple(factors))
    flat = tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [-1, _SIZE * _SIZE])
    out = tf.matmul(flat, tf.constant(operator.T, tf.float32))
    out = tf.transpose(tf.reshape(out, [-1, 3, _SIZE, _SIZE]), [0, 2, 3, 1])
    return tf.clip_by_value(out, 0, 1)


# --------------------------------------------------------------------------------------
# Weather
# --------------------------------------------------------------------------------------

# Draws consumed by the 32 x 32 diamond-square fractal: three grids per level.
_PLASMA_SHAPES = tuple(n for n in (1, 2, 4, 8, 16) for _ in range(3))


def _jitter(total: tf.Tensor, wibble: float, u: tf.Tensor) -> tf.Tensor:
    """Mean of four neighbours plus wibble * U(-wibble, wibble), as the generator draws."""
    return total / 4 + wibble * wibble * tf.cast(u, tf.float64)


def _plasma_fractal(noise: Sequence[tf.Tensor], decay: float) -> tf.Tensor:
    """Batched 32 x 32 diamond-square height map normalized to [0, 1].

    `noise` holds 15 arrays of uniform draws in [-1, 1), shapes (batch, n, n) for
    n = 1, 1, 1, 2, 2, 2, ..., 16, 16, 16: per level the square centres, then the
    diamond points between horizontal neighbours, then those between vertical ones.
    A new point is the mean of its four neighbours (wrapping around) plus
    wibble^2 u, where wibble starts at 100 and is divided by `decay` after each level.
    The map of one level is kept as its coarse grid and interleaved into the next.
    """
    draws = iter(noise)
    grid = tf.zeros_like(tf.cast(noise[0], tf.float64))  # (batch, 1, 1)
    wibble = 100.0
    while grid.shape[1] < _SIZE:
        n = grid.shape[1]
        square = grid + tf.roll(grid, -1, axis=1)
        square = square + tf.roll(square, -1, axis=2)
        centre = _jitter(square, wibble, next(draws))
        across = centre + tf.roll(centre, 1, axis=1) + grid + tf.roll(grid, -1, axis=2)
        across = _jitter(across, wibble, next(draws))
        down = centre + tf.roll(centre, 1, axis=2) + grid + tf.roll(grid, -1, axis=1)
        down = _jitter(down, wibble, next(draws))
        top = tf.reshape(tf.stack([grid, across], axis=-1), [-1, n, 2 * n])
        bottom = tf.reshape(tf.stack([down, centre], axis=-1), [-1, n, 2 * n])
        grid = tf.reshape(tf.stack([top, bottom], axis=2), [-1, 2 * n, 2 * n])
        wibble /= decay
    grid -= tf.reduce_min(grid, axis=[1, 2], keepdims=True)
    grid /= tf.reduce_max(grid, axis=[1, 2], keepdims=True)
    return tf.cast(grid, tf.float32)


def _fog_with(x, params, noise):
    strength, decay = params
    peak = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    x = x + strength * _plasma_fractal(noise, decay)[..., None]
    return tf.clip_by_value(x * peak / (peak + strength), 0, 1)


def _fog(x, params, key):
    batch = tf.shape(x)[0]
    keys = _split(key, len(_PLASMA_SHAPES))
    noise = [
        tf.random.stateless_uniform([batch, n, n], k, minval=-1.0, maxval=1.0)
        for n, k in zip(_PLASMA_SHAPES, keys, strict=True)
    ]
    return _fog_with(x, params, noise)


def _gray(x: tf.Tensor) -> tf.Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B, keeping a channel axis."""
    return tf.tensordot(x, tf.constant([0.299, 0.587, 0.114]), axes=[[3], [0]])[
        ..., None
    ]


def _snow_with(x, params, normal, angle_degrees):
    mean, std, zoom, threshold, radius, sigma, keep = params
    layer = (mean + std * normal)[..., None]  # (batch, 32, 32, 1)
    matrix = _zoom_matrix(_SIZE, zoom)
    layer = _separable(layer, matrix)
    layer = tf.where(layer < threshold, tf.zeros_like(layer), layer)
    layer = _quantize_floor(layer)  # stored as an 8-bit picture before the blur
    layer = _motion_blur_with(layer, radius, sigma, angle_degrees)
    layer = tf.round(layer * 255.0) / 255.0  # and read back as 8 bits after it
    x = keep * x + (1 - keep) * tf.maximum(x, _gray(x) * 1.5 + 0.5)
    return tf.clip_by_value(x + layer + tf.reverse(layer, axis=[1, 2]), 0, 1)


def _snow(x, params, key):
    batch = tf.shape(x)[0]
    k_flakes, k_angle = _split(key, 2)
    normal = tf.random.stateless_normal([batch, _SIZE, _SIZE], k_flakes)
    angle = tf.random.stateless_uniform([batch], k_angle, minval=-135.0, maxval=-45.0)
    return _snow_with(x, params, normal, angle)


# --------------------------------------------------------------------------------------
# Digital
# --------------------------------------------------------------------------------------


def _contrast(x, factor, key):
    del key
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return tf.clip_by_value((x - mean) * factor + mean, 0, 1)


def _brightness(x, shift, key):
    del key
    hsv = tf.image.rgb_to_hsv(x)
    h, s, v = tf.unstack(hsv, axis=-1)
    v = tf.clip_by_value(v + shift, 0, 1)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1)), 0, 1)


def _saturate(x, params, key):
    del key
    scale, shift = params
    hsv = tf.image.rgb_to_hsv(x)
    h, s, v = tf.unstack(hsv, axis=-1)
    s = tf.clip_by_value(s * scale + shift, 0, 1)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1)), 0, 1)


def _jpeg_compression(x, quality, key):
    del key
    pixels = tf.cast(tf.round(tf.clip_by_value(x, 0, 1) * 255.0), tf.uint8)

    def roundtrip(image):
        encoded = tf.io.encode_jpeg(image, quality=quality)
        # The accurate integer DCT is what Pillow decodes with; TensorFlow's default
        # (the fast DCT) differs by about one grey level on most pixels.
        return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")

    decoded = tf.map_fn(
        roundtrip,
        pixels,
        fn_output_signature=tf.TensorSpec([_SIZE, _SIZE, 3], tf.uint8),
        parallel_iterations=16,
    )
    return tf.reshape(tf.cast(decoded, tf.float32) / 255.0, tf.shape(x))


def _pixelate(x, factor, key):
    del key
    small = int(_SIZE * factor)
    matrix = _box_resize_matrix(small, _SIZE) @ _box_resize_matrix(_SIZE, small)
    return tf.clip_by_value(_separable(x, matrix), 0, 1)


_ELASTIC_SOURCE = np.array([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]])  # (x, y) anchors


def _mirror_index(index: tf.Tensor, n: int) -> tf.Tensor:
    period = 2 * n - 2
    index = tf.math.floormod(index, period)
    return tf.where(index >= n, period - index, index)


def _reflect_index(index: tf.Tensor, n: int) -> tf.Tensor:
    index = tf.math.floormod(index, 2 * n)
    return tf.where(index >= n, 2 * n - 1 - index, index)


def _bilinear(x, ys, xs, fold) -> tf.Tensor:
    """Sample x (batch, H, W, C) at float positions ys, xs (batch, H, W), bilinearly;
    integer neighbours outside the image are folded back by `fold`."""
    batch, height, width, channels = tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
    flat = tf.reshape(x, [batch, height * width, channels])
    y0 = tf.floor(ys)
    x0 = tf.floor(xs)
    fy = tf.reshape(ys - y0, [batch, -1, 1])
    fx = tf.reshape(xs - x0, [batch, -1, 1])
    y0 = tf.reshape(tf.cast(y0, tf.int32), [batch, -1])
    x0 = tf.reshape(tf.cast(x0, tf.int32), [batch, -1])
    out = 0.0
    for oy, wy in ((0, 1 - fy), (1, fy)):
        row = fold(y0 + oy, height) * width
        for ox, wx in ((0, 1 - fx), (1, fx)):
            index = row + fold(x0 + ox, width)
            out += wy * wx * tf.gather(flat, index, batch_dims=1)
    return tf.reshape(out, tf.shape(x))


def _affine_to_source(target: tf.Tensor) -> tf.Tensor:
    """(batch, 2, 3) affine maps sending the jittered anchors `target` (batch, 3, 2)
    back to the fixed anchors: the inverse warp, i.e. where each output pixel reads."""
    target = tf.cast(target, tf.float64)
    ones = tf.ones_like(target[..., :1])
    lhs = tf.concat([target, ones], axis=-1)  # rows (x', y', 1)
    rhs = tf.broadcast_to(tf.constant(_ELASTIC_SOURCE), tf.shape(target))
    return tf.transpose(tf.linalg.solve(lhs, rhs), [0, 2, 1])


def _elastic_with(x, params, jitter, fields):
    """CIFAR-10-C's elastic transform with explicit randomness.

    # Arguments
        jitter: (batch, 3, 2) uniform draws in [-1, 1) moving the three affine anchors
            by up to params[2] pixels.
        fields: (batch, 2, 32, 32) uniform draws in [-1, 1), the dx and dy fields before
            smoothing.
    """
    alpha, smooth, reach = params
    batch = tf.shape(x)[0]
    # 1. Random affine warp, sampled bilinearly with OpenCV's fixed-point coordinates
    #    (1/32 pixel) and REFLECT_101 borders.
    target = _ELASTIC_SOURCE[None] + reach * tf.cast(jitter, tf.float64)
    m = _affine_to_source(target)
    grid = tf.range(_SIZE, dtype=tf.float64)
    gx = tf.broadcast_to(grid[None, None, :], [batch, _SIZE, _SIZE])
    gy = tf.broadcast_to(grid[None, :, None], [batch, _SIZE, _SIZE])

    def fixed_point(row):  # the coordinate in 1/32 pixel, rounded as OpenCV does
        row = row[:, None, None, :]
        part_x = tf.round(row[..., 0] * gx * 1024)
        part_rest = tf.round((row[..., 1] * gy + row[..., 2]) * 1024)
        return tf.floor((part_x + part_rest + 16) / 32) / 32

    sx = tf.cast(fixed_point(m[:, 0]), tf.float32)
    sy = tf.cast(fixed_point(m[:, 1]), tf.float32)
    x = _bilinear(x, sy, sx, _mirror_index)
    # 2. Smooth random displacement, sampled bilinearly with symmetric borders.
    blur = _gaussian_matrix(smooth, mode="reflect", truncate=3.0)
    smoothed = _separable(tf.transpose(tf.cast(fields, tf.float32), [0, 2, 3, 1]), blur)
    dx = alpha * smoothed[..., 0]
    dy = alpha * smoothed[..., 1]
    gxf = tf.cast(gx, tf.float32)
    gyf = tf.cast(gy, tf.float32)
    x = _bilinear(x, gyf + dy, gxf + dx, _reflect_index)
    return tf.clip_by_value(x, 0, 1)


def _elastic_transform(x, params, key):
    batch = tf.shape(x)[0]
    k_affine, k_fields = _split(key, 2)
    jitter = tf.random.stateless_uniform(
        [batch, 3, 2], k_affine, minval=-1.0, maxval=1.0
    )
    fields = tf.random.stateless_uniform(
        [batch, 2, _SIZE, _SIZE], k_fields, minval=-1.0, maxval=1.0
    )
    return _elastic_with(x, params, jitter, fields)


_IMPLEMENTATIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _salt_and_pepper,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "glass_blur": _glass_blur,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "fog": _fog,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
    "elastic_transform": _elastic_transform,
}
_NOISE_IMPLEMENTATIONS: dict[str, Callable] = {
    "gaussian": _gaussian_noise,
    "uniform": _uniform_noise,
    "salt_and_pepper": _salt_and_pepper,
}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def add_noise(
    images: tf.Tensor,
    family: str,
    level: float,
    seed: int | tf.Tensor = 0,
    *,
    batch_index: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Add noise of a continuous level to a batch of [0, 1] images, then clip.

    - `"gaussian"`: x + level * z, z ~ N(0, 1) per pixel value (level = sigma).
    - `"uniform"`: x + u, u ~ U(-level, level) (level = half-width).
    - `"salt_and_pepper"`: each pixel value independently set to 0 with probability
      level / 2 and to 1 with probability level / 2 (level = amount, at most 1).

    The result is clip(., 0, 1). Any image size and channel count is accepted.

    # Arguments
        images: (batch, height, width, channels) float pixels in [0, 1], or uint8.
        family: one of `NOISE_FAMILIES`.
        level: a finite number >= 0 in pixel units.
        seed: integer seed; the same (seed, batch) gives the same noise. A shape-(2,)
            integer tensor is taken as a stateless seed already derived for this batch
            (e.g. `tf.stack([seed, batch_index])`), and no fingerprint is taken.
        batch_index: optional integer (or scalar tensor) that keys the random stream
            instead of the batch's pixel fingerprint, e.g. from `Dataset.enumerate()`.

    # Returns
        float32 images of the input's shape, in [0, 1].

    # Raises
        ValueError: for an unknown family, an invalid level, seed or image shape.
        tf.errors.InvalidArgumentError: when float images leave [0, 1].

    ```python
    noisy = add_noise(tf.fill((4, 32, 32, 3), 0.5), "gaussian", 0.1, seed=3)
    ```
    """
    level = _check_noise(family, level)
    seed = _check_seed(seed, "add_noise")
    x = _as_pixels(images, "add_noise", need_cifar=False)
    key = _stream_key(x, seed, family, batch_index)
    return _NOISE_IMPLEMENTATIONS[family](x, level, key)


def corrupt(
    images: tf.Tensor,
    name: str,
    severity: int,
    seed: int | tf.Tensor = 0,
    *,
    batch_index: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Apply a CIFAR-10-C corruption at a published severity to a batch of images.

    The corruptions follow the CIFAR-10-C generator (Hendrycks & Dietterich, ICLR 2019)
    with its CIFAR severities (`CORRUPTIONS[name][severity - 1]`), computed in float32
    and clipped to [0, 1]. The released files store each result as uint8 by truncation
    (`np.uint8`); this function does not quantize, so its output is on average about
    half a grey level (0.5 / 255) brighter than the stored images. Batches are processed
    with whole-batch ops; only `jpeg_compression` loops over images (inside the graph).
    `frost` and `spatter` are not synthesized (see `UNAVAILABLE_CORRUPTIONS`); load the
    released images with `load_cifar10_corrupted` instead.

    # Arguments
        images: (batch, 32, 32, 3) float pixels in [0, 1], or uint8.
        name: a key of `CORRUPTIONS`.
        severity: integer in 1..5.
        seed: integer seed; the same (seed, batch) gives the same corruption, and the
            five severities of one corruption share their random draws. A shape-(2,)
            integer tensor is taken as a stateless seed already derived for this batch.
        batch_index: optional integer (or scalar tensor) that keys the random stream
            instead of the batch's pixel fingerprint.

    # Returns
        float32 images of shape (batch, 32, 32, 3) in [0, 1].

    # Raises
        ValueError: for an unknown or unavailable corruption, a severity outside 1..5,
            or images that are not 32 x 32 RGB batches.
        tf.errors.InvalidArgumentError: when float images leave [0, 1].

    ```python
    blurred = corrupt(tf.random.uniform((4, 32, 32, 3)), "defocus_blur", 2)
    ```
    """
    _check_corruption(name, severity)
    seed = _check_seed(seed, "corrupt")
    x = _as_pixels(images, "corrupt", need_cifar=True)
    key = _stream_key(x, seed, name, batch_index)
    out = _IMPLEMENTATIONS[name](x, CORRUPTIONS[name][int(severity) - 1], key)
    return tf.ensure_shape(out, x.shape)


def perturbation_fn(
    name: str, severity_or_level: float, seed: int = 0
) -> Callable[..., tf.Tensor]:
    """A function `images -> perturbed images` for `tf.data.Dataset.map`.

    `name` is either a noise family of `NOISE_FAMILIES` (then `severity_or_level` is its
    continuous level, see `add_noise`) or a corruption of `CORRUPTIONS` (then it is the
    integer severity 1..5, see `corrupt`). Arguments are checked here, once. The
    returned function also accepts `batch_index=` to key its random stream explicitly; without
    it, each batch's stream is keyed by a fingerprint of its pixels.

    # Arguments
        name: noise family or corruption name.
        severity_or_level: level (noise) or severity (corruption).
        seed: integer seed.

    # Returns
        A callable `fn(images, batch_index=None) -> images`.

    # Raises
        ValueError: for an unknown name or an invalid level, severity or seed.

    ```python
    fn = perturbation_fn("gaussian_noise", 3, seed=0)
    data = tf.data.Dataset.from_tensor_slices(
        (tf.random.uniform((64, 32, 32, 3)), tf.zeros(64, tf.int32))
    ).batch(16)
    noisy = data.map(lambda x, y: (fn(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    ```
    """
    seed = _check_seed(seed, "perturbation_fn")
    if name in NOISE_FAMILIES:
        level = _check_noise(name, severity_or_level)

        def noise_fn(images, batch_index=None):
            return add_noise(images, name, level, seed, batch_index=batch_index)

        noise_fn.__name__ = f"{name}_{level:g}"
        return noise_fn
    if name not in CORRUPTIONS and name not in UNAVAILABLE_CORRUPTIONS:
        raise ValueError(
            f"perturbation_fn: unknown perturbation {name!r}; valid names are the noise "
            f"families {list(NOISE_FAMILIES)} and the corruptions {sorted(CORRUPTIONS)}."
        )
    _check_corruption(name, severity_or_level)
    severity = int(severity_or_level)

    def corruption_fn(images, batch_index=None):
        return corrupt(images, name, severity, seed, batch_index=batch_index)

    corruption_fn.__name__ = f"{name}_{severity}"
    return corruption_fn


def load_cifar10_corrupted(
    name: str,
    severity: int,
    data_dir: str,
    batch_size: int = 256,
) -> tf.data.Dataset:
    """The released CIFAR-10-C test images of one corruption and severity.

    Reads tensorflow-datasets' `cifar10_corrupted/<name>_<severity>` from `data_dir`
    (it must have been prepared there; nothing is downloaded) and yields
    `(images, labels)` batches: float32 images in [0, 1] of shape (batch, 32, 32, 3)
    and int64 labels, in the file order. `glass_blur` and `elastic_transform` are
    stored by tensorflow-datasets as `frosted_glass_blur` and `elastic`; this function
    translates the names. All 19 released corruptions can be loaded, `frost` and
    `spatter` included.

    # Arguments
        name: a name of `STANDARD_CORRUPTIONS` or `EXTRA_CORRUPTIONS`.
        severity: integer in 1..5.
        data_dir: the tensorflow-datasets data directory that holds the prepared set.
        batch_size: positive number of images per batch.

    # Returns
        A batched, prefetched `tf.data.Dataset` of (images, labels).

    # Raises
        ValueError: for an unknown corruption, a severity outside 1..5 or a bad batch
            size.

    ```python
    data = load_cifar10_corrupted("fog", 3, data_dir="~/tensorflow_datasets")
    ```
    """
    if name not in _RELEASED:
        raise ValueError(
            f"load_cifar10_corrupted: unknown corruption {name!r}; valid names are "
            f"{sorted(_RELEASED)}."
        )
    if (
        isinstance(severity, bool)
        or not isinstance(severity, int | np.integer)
        or int(severity) not in SEVERITIES
    ):
        raise ValueError(
            f"load_cifar10_corrupted: severity must be one of {list(SEVERITIES)}, "
            f"got {severity!r}."
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            f"load_cifar10_corrupted: batch_size must be a positive integer, got {batch_size!r}."
        )
    import tensorflow_datasets as tfds  # heavy; only needed here

    config = f"cifar10_corrupted/{_TFDS_NAMES.get(name, name)}_{int(severity)}"
    log.info("loading %s from %s", config, data_dir)
    data = tfds.load(
        config,
        split="test",
        data_dir=data_dir,
        as_supervised=True,
        download=False,
        shuffle_files=False,
    )

    def to_pixels(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    return (
        data.batch(batch_size)
        .map(to_pixels, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
