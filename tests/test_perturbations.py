"""Perturbations against independent NumPy / SciPy / scikit-image / Pillow references.

Deterministic corruptions are compared value by value on real CIFAR-10 test images;
random ones are compared through their moments, or value by value when the random
draws are handed to both implementations.
"""

import io
import itertools
import math
import tarfile

import larq_lipschitz.perturbations as lp  # before tensorflow: selects Keras 2

# isort: split
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.color
import skimage.filters
import skimage.util
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

LEVEL = 1 / 255  # one grey level


def read_cifar_test(path, count):
    """First `count` test images (uint8 NHWC) and labels of the binary archive."""
    record = 1 + 3 * 32 * 32
    with tarfile.open(path) as archive:
        raw = archive.extractfile("cifar-10-batches-bin/test_batch.bin").read(
            record * count
        )
    rows = np.frombuffer(raw, np.uint8).reshape(count, record)
    images = rows[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, 0].astype(np.int64)


@pytest.fixture(scope="module")
def cifar(cifar_archive):
    images, _ = read_cifar_test(cifar_archive, 200)
    return images


@pytest.fixture(scope="module")
def pixels(cifar):
    return cifar.astype(np.float64) / 255.0


def run(images, name, severity, seed=0, **kwargs):
    return lp.corrupt(
        tf.constant(images, tf.float32), name, severity, seed, **kwargs
    ).numpy()


# ----------------------------------------------------------------------------- registry


def test_registry_shape():
    assert len(lp.STANDARD_CORRUPTIONS) == 15
    assert len(set(lp.STANDARD_CORRUPTIONS)) == 15
    for name in lp.STANDARD_CORRUPTIONS + lp.EXTRA_CORRUPTIONS:
        assert (name in lp.CORRUPTIONS) != (name in lp.UNAVAILABLE_CORRUPTIONS)
    assert set(lp.UNAVAILABLE_CORRUPTIONS) == {"frost", "spatter"}
    for name, params in lp.CORRUPTIONS.items():
        assert len(params) == 5, name
    assert lp.CORRUPTIONS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert lp.CORRUPTIONS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert (
        len(lp.CORRUPTIONS["zoom_blur"][0]) == 7
    )  # np.arange(1, 1.06, .01) ends at 1.06


def test_invalid_arguments():
    x = tf.zeros((2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"unknown corruption 'blurr'.*'brightness'"):
        lp.corrupt(x, "blurr", 1)
    with pytest.raises(ValueError, match=r"frost.*photographs.*load_cifar10_corrupted"):
        lp.corrupt(x, "frost", 1)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity of 'fog'"):
            lp.corrupt(x, "fog", bad)
    with pytest.raises(ValueError, match="32 x 32 RGB"):
        lp.corrupt(tf.zeros((2, 28, 28, 3)), "fog", 1)
    with pytest.raises(ValueError, match="batch of shape"):
        lp.corrupt(tf.zeros((32, 32, 3)), "fog", 1)
    with pytest.raises(ValueError, match="unknown noise family 'poisson'"):
        lp.add_noise(x, "poisson", 0.1)
    with pytest.raises(ValueError, match="finite number >= 0, got -0.1"):
        lp.add_noise(x, "gaussian", -0.1)
    with pytest.raises(ValueError, match="finite number"):
        lp.add_noise(x, "uniform", float("nan"))
    with pytest.raises(ValueError, match="amount must be <= 1"):
        lp.add_noise(x, "salt_and_pepper", 1.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        lp.add_noise(x, "gaussian", 0.1, seed=1.5)
    with pytest.raises(ValueError, match="unknown perturbation 'rain'"):
        lp.perturbation_fn("rain", 1, 0)
    with pytest.raises(ValueError, match="severity of 'snow'"):
        lp.perturbation_fn("snow", 0.5, 0)
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        lp.load_cifar10_corrupted("fogg", 1, "/nonexistent")
    with pytest.raises(ValueError, match="severity"):
        lp.load_cifar10_corrupted("fog", 7, "/nonexistent")


def test_normalized_images_are_refused():
    normalized = tf.random.normal((2, 32, 32, 3), seed=1)  # e.g. standardized pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pixels in \[0, 1\]"):
        lp.add_noise(normalized, "gaussian", 0.05)
    with pytest.raises(tf.errors.InvalidArgumentError, match="before normalization"):
        lp.corrupt(normalized, "contrast", 1)


def test_uint8_input_equals_float_input(cifar):
    as_uint8 = lp.corrupt(tf.constant(cifar[:8]), "speckle_noise", 3, seed=4).numpy()
    as_float = run(cifar[:8] / 255.0, "speckle_noise", 3, seed=4)
    np.testing.assert_array_equal(as_uint8, as_float)


# ------------------------------------------------ deterministic: exact references


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_blur_matches_skimage(pixels, severity):
    sigma = lp.CORRUPTIONS["gaussian_blur"][severity - 1]
    ref = np.stack(
        [skimage.filters.gaussian(im, sigma=sigma, channel_axis=-1) for im in pixels]
    )
    ref = np.clip(ref, 0, 1)
    np.testing.assert_allclose(run(pixels, "gaussian_blur", severity), ref, atol=1e-5)


def reference_disk(radius, alias_sigma):
    """Normalized disk on a 17 x 17 grid, then a separable 3 x 3 Gaussian (SciPy)."""
    offsets = np.arange(-8, 9)
    inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    disk = inside / inside.sum()
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_sigma**2))
    taps /= taps.sum()
    disk = ndi.correlate1d(disk, taps, axis=0, mode="mirror")
    return ndi.correlate1d(disk, taps, axis=1, mode="mirror")


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_defocus_blur_matches_scipy(pixels, severity):
    kernel = reference_disk(*lp.CORRUPTIONS["defocus_blur"][severity - 1])
    ref = np.stack(
        [ndi.correlate(pixels[..., c], kernel[None], mode="mirror") for c in range(3)],
        -1,
    )
    np.testing.assert_allclose(
        run(pixels, "defocus_blur", severity), np.clip(ref, 0, 1), atol=1e-5
    )


@pytest.mark.parametrize("severity", [1, 5])
def test_contrast_matches_numpy(pixels, severity):
    c = lp.CORRUPTIONS["contrast"][severity - 1]
    mean = pixels.mean(axis=(1, 2), keepdims=True)
    ref = np.clip((pixels - mean) * c + mean, 0, 1)
    np.testing.assert_allclose(run(pixels, "contrast", severity), ref, atol=1e-5)


def skimage_hsv(pixels, channel, scale, shift):
    out = []
    for image in pixels:
        hsv = skimage.color.rgb2hsv(image)
        hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
        out.append(np.clip(skimage.color.hsv2rgb(hsv), 0, 1))
    return np.stack(out)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_brightness_matches_skimage(pixels, severity):
    ref = skimage_hsv(pixels, 2, 1.0, lp.CORRUPTIONS["brightness"][severity - 1])
    np.testing.assert_allclose(run(pixels, "brightness", severity), ref, atol=1e-5)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_saturate_matches_skimage(pixels, severity):
    ref = skimage_hsv(pixels, 1, *lp.CORRUPTIONS["saturate"][severity - 1])
    np.testing.assert_allclose(run(pixels, "saturate", severity), ref, atol=1e-5)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_jpeg_matches_pillow(cifar, severity):
    """Pillow and TensorFlow both run libjpeg(-turbo) with 4:2:0 chroma subsampling and
    the quality-scaled standard tables, and decode with the accurate integer DCT, so the
    results agree bit for bit here. One grey level is allowed on at most 0.5 % of the
    values for a different libjpeg build (rounding of the colour conversion)."""
    quality = lp.CORRUPTIONS["jpeg_compression"][severity - 1]
    ref = []
    for image in cifar:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        ref.append(np.asarray(Image.open(buffer)))
    ref = np.stack(ref).astype(np.float64)
    diff = np.abs(run(cifar / 255.0, "jpeg_compression", severity) * 255 - ref)
    assert diff.max() <= 1 + 1e-3
    assert (diff > 0.5).mean() <= 0.005


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_pixelate_matches_pillow_box(cifar, severity):
    """Pillow rounds to 8 bits after each of its two downscaling passes (half a level at
    most each; the upscale is a pure copy), our float result does not: at most one grey
    level apart, half a level on average at the very most."""
    side = int(32 * lp.CORRUPTIONS["pixelate"][severity - 1])
    ref = np.stack(
        [
            np.asarray(
                Image.fromarray(im)
                .resize((side, side), Image.BOX)
                .resize((32, 32), Image.BOX)
            )
            for im in cifar
        ]
    ).astype(np.float64)
    diff = np.abs(run(cifar / 255.0, "pixelate", severity) * 255 - ref)
    assert diff.max() <= 1 + 1e-3
    assert diff.mean() <= 0.5


def scipy_clipped_zoom(image, factor):
    """Centre crop of ceil(32 / factor) pixels, scipy zoom (order 1), centre 32 kept."""
    crop = int(np.ceil(image.shape[0] / factor))
    top = (image.shape[0] - crop) // 2
    zoomed = ndi.zoom(
        image[top : top + crop, top : top + crop], (factor, factor, 1), order=1
    )
    trim = (zoomed.shape[0] - image.shape[0]) // 2
    return zoomed[trim : trim + image.shape[0], trim : trim + image.shape[0]]


@pytest.mark.parametrize("severity", [1, 5])
def test_zoom_blur_matches_scipy(pixels, severity):
    factors = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1], 0.01)
    some = pixels[:40]
    ref = []
    for image in some:
        total = image.copy()
        for factor in factors:
            total += scipy_clipped_zoom(image, factor)
        ref.append(np.clip(total / (len(factors) + 1), 0, 1))
    np.testing.assert_allclose(
        run(some, "zoom_blur", severity), np.stack(ref), atol=1e-5
    )


# ----------------------------------------- random corruptions with the draws handed in


def reference_motion_blur(image, radius, sigma, angle):
    """ImageMagick's motion blur: copies shifted by ceil(i (sin a, cos a) - 1/2) with the
    edge repeated, weighted by exp(-i^2 / 2 sigma^2), i = 0 .. 2 radius."""
    taps = np.exp(-(np.arange(2 * radius + 1) ** 2) / (2.0 * sigma**2))
    taps /= taps.sum()
    out = np.zeros_like(image, dtype=np.float64)
    for i, tap in enumerate(taps):
        down = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
        right = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
        shifted = np.roll(image, (-down, -right), axis=(0, 1))
        if down > 0:
            shifted[-down:] = shifted[-down - 1]
        elif down < 0:
            shifted[:-down] = shifted[-down]
        if right > 0:
            shifted[:, -right:] = shifted[:, -right - 1 : -right]
        elif right < 0:
            shifted[:, :-right] = shifted[:, -right : -right + 1]
        out += tap * shifted
    return out


def test_motion_blur_matches_reference(pixels):
    rng = np.random.default_rng(3)
    some = pixels[:24]
    angles = rng.uniform(-45, 45, len(some))
    angles[:4] = [0.0, 45.0, -45.0, 30.0]
    for radius, sigma in [(6, 1), (9, 2.5)]:
        ours = lp._motion_blur_with(
            tf.constant(some, tf.float32), radius, sigma, tf.constant(angles)
        ).numpy()
        ref = np.stack(
            [
                reference_motion_blur(im, radius, sigma, a)
                for im, a in zip(some, angles, strict=True)
            ]
        )
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def reference_glass_blur(image_u8, params, offsets):
    """The generator's loop, NumPy semantics included: on an RGB array the tuple
    assignment copies the neighbour into (h, w) instead of swapping the two."""
    sigma, delta, iterations = params
    x = np.uint8(
        skimage.filters.gaussian(image_u8 / 255.0, sigma=sigma, channel_axis=-1) * 255
    )
    for it in range(iterations):
        k = 0
        for h in range(32 - delta, delta, -1):
            for w in range(32 - delta, delta, -1):
                dx, dy = offsets[it, k]
                k += 1
                h2, w2 = h + dy, w + dx
                x[h, w], x[h2, w2] = x[h2, w2], x[h, w]
    return np.clip(
        skimage.filters.gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1
    )


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_glass_blur_matches_reference_loop(cifar, severity):
    params = lp.CORRUPTIONS["glass_blur"][severity - 1]
    rng = np.random.default_rng(severity)
    some = cifar[:12]
    offsets = rng.integers(-1, 1, size=(len(some), params[2], 900, 2))
    ours = lp._glass_blur_with(
        tf.constant(some / 255.0, tf.float32), params, offsets
    ).numpy()
    ref = np.stack(
        [
            reference_glass_blur(im, params, off)
            for im, off in zip(some, offsets, strict=True)
        ]
    )
    # The 8-bit truncation in the middle can land one level apart (float32 vs float64).
    diff = np.abs(ours - ref)
    assert diff.max() <= LEVEL + 1e-5
    assert diff.mean() <= 0.02 * LEVEL


def test_glass_blur_random_offsets_pull_from_up_left(cifar):
    """Severity 1 has no blur to speak of (sigma 0.05), so each output pixel must be the
    8-bit input pixel itself or its up, left or up-left neighbour; rows and columns
    0 and 1 are never written."""
    quantized = np.floor(cifar[:16].astype(np.float64) + 1e-3)
    out = np.round(run(cifar[:16] / 255.0, "glass_blur", 1, seed=5) * 255)
    np.testing.assert_array_equal(out[:, :2], quantized[:, :2])
    np.testing.assert_array_equal(out[:, :, :2], quantized[:, :, :2])
    inner = out[:, 2:, 2:]
    match = np.zeros(inner.shape[:3], bool)
    for dy in (-1, 0):
        for dx in (-1, 0):
            source = quantized[:, 2 + dy : 32 + dy, 2 + dx : 32 + dx]
            match |= np.all(inner == source, axis=-1)
    assert match.all()
    assert not np.array_equal(out, quantized)  # and it did move pixels


def reference_plasma(draws, decay):
    """The generator's 32 x 32 diamond-square map, fed the given U(-1, 1) draws."""
    draws = iter(draws)
    size = 32
    grid = np.empty((size, size))
    grid[0, 0] = 0
    step = size
    wibble = 100.0

    def noisy_mean(total):
        return total / 4 + wibble * (wibble * next(draws))

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = noisy_mean(square)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        grid[0:size:step, half:size:step] = noisy_mean(
            centres
            + np.roll(centres, 1, axis=0)
            + corners
            + np.roll(corners, -1, axis=1)
        )
        grid[half:size:step, 0:size:step] = noisy_mean(
            centres
            + np.roll(centres, 1, axis=1)
            + corners
            + np.roll(corners, -1, axis=0)
        )
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


@pytest.mark.parametrize("severity", [1, 5])
def test_fog_matches_reference(pixels, severity):
    strength, decay = lp.CORRUPTIONS["fog"][severity - 1]
    rng = np.random.default_rng(7)
    some = pixels[:10]
    draws = [rng.uniform(-1, 1, (len(some), n, n)) for n in lp._PLASMA_SHAPES]
    ours = lp._fog_with(
        tf.constant(some, tf.float32),
        (strength, decay),
        [tf.constant(d) for d in draws],
    ).numpy()
    ref = []
    for i, image in enumerate(some):
        fractal = reference_plasma([d[i] for d in draws], decay)
        peak = image.max()
        ref.append(
            np.clip(
                (image + strength * fractal[..., None]) * peak / (peak + strength), 0, 1
            )
        )
    np.testing.assert_allclose(ours, np.stack(ref), atol=1e-5)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_snow_matches_reference(pixels, severity):
    mean, std, zoom, threshold, radius, sigma, keep = lp.CORRUPTIONS["snow"][
        severity - 1
    ]
    rng = np.random.default_rng(severity)
    some = pixels[:10].astype(np.float32)
    normal = rng.standard_normal((len(some), 32, 32)).astype(np.float32)
    angles = rng.uniform(-135, -45, len(some))
    ours = lp._snow_with(
        tf.constant(some),
        lp.CORRUPTIONS["snow"][severity - 1],
        tf.constant(normal),
        tf.constant(angles),
    ).numpy()
    ref = []
    for image, z, angle in zip(some, normal, angles, strict=True):
        layer = scipy_clipped_zoom((mean + std * z.astype(np.float64))[..., None], zoom)
        layer[layer < threshold] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8) / 255.0
        layer = np.round(reference_motion_blur(layer, radius, sigma, angle) * 255) / 255
        gray = image @ np.array([0.299, 0.587, 0.114], np.float32)
        base = keep * image + (1 - keep) * np.maximum(
            image, gray[..., None] * 1.5 + 0.5
        )
        ref.append(np.clip(base + layer + np.rot90(layer, k=2), 0, 1))
    diff = np.abs(ours - np.stack(ref))
    # 8-bit truncation and rounding of the flake layer may fall one level apart.
    assert diff.max() <= 2 * LEVEL + 1e-5
    assert diff.mean() <= 0.02 * LEVEL


def reference_elastic(image, params, jitter, fields):
    """OpenCV-style affine warp (inverse map, 1/32-pixel fixed point, REFLECT_101) and a
    smoothed random displacement field, with SciPy doing the sampling."""
    alpha, smooth, reach = params
    anchors = np.array([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]])
    moved = anchors + reach * jitter
    forward = np.linalg.solve(
        np.c_[anchors, np.ones(3)], moved
    ).T  # 2 x 3, anchors -> moved
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)

    def fixed(row):
        units = np.rint(row[0] * xs * 1024) + np.rint((row[1] * ys + row[2]) * 1024)
        return np.floor((units + 16) / 32) / 32

    sx, sy = fixed(inverse[0]), fixed(inverse[1])
    warped = np.stack(
        [
            ndi.map_coordinates(image[..., c], [sy, sx], order=1, mode="mirror")
            for c in range(3)
        ],
        -1,
    )
    dx = (
        skimage.filters.gaussian(fields[0], sigma=smooth, mode="reflect", truncate=3)
        * alpha
    )
    dy = (
        skimage.filters.gaussian(fields[1], sigma=smooth, mode="reflect", truncate=3)
        * alpha
    )
    out = np.stack(
        [
            ndi.map_coordinates(
                warped[..., c], [ys + dy, xs + dx], order=1, mode="reflect"
            )
            for c in range(3)
        ],
        -1,
    )
    return np.clip(out, 0, 1)


@pytest.mark.parametrize("severity", [1, 2, 4, 5])
def test_elastic_matches_reference(pixels, severity):
    params = lp.CORRUPTIONS["elastic_transform"][severity - 1]
    rng = np.random.default_rng(severity)
    some = pixels[:10]
    jitter = rng.uniform(-1, 1, (len(some), 3, 2))
    fields = rng.uniform(-1, 1, (len(some), 2, 32, 32))
    ours = lp._elastic_with(
        tf.constant(some, tf.float32), params, jitter, fields
    ).numpy()
    ref = np.stack(
        [
            reference_elastic(*a)
            for a in zip(some, [params] * 10, jitter, fields, strict=True)
        ]
    )
    diff = np.abs(ours - ref)
    # float32 coordinates: a fixed-point coordinate can round to the next 1/32 pixel.
    assert np.quantile(diff, 0.999) <= 1e-4
    assert diff.max() <= 0.05


# -------------------------------------------------------------------- random: moments


def four_se(values_a, values_b):
    """Four standard errors of the difference between the means of two samples."""
    return 4 * math.sqrt(
        values_a.var() / values_a.size + values_b.var() / values_b.size
    )


@pytest.mark.parametrize(
    ("family", "level", "variance"),
    [("gaussian", 0.08, 0.08**2), ("uniform", 0.1, 0.1**2 / 3)],
)
def test_additive_noise_moments_before_clipping(family, level, variance):
    grey = tf.fill((64, 32, 32, 3), 0.5)  # no value reaches a clip bound in practice
    delta = (lp.add_noise(grey, family, level, seed=2) - grey).numpy().ravel()
    n = delta.size
    assert abs(delta.mean()) <= 4 * math.sqrt(variance / n)
    # Standard error of a sample variance: about var * sqrt(2 / n) (uniform: less).
    assert abs(delta.var() - variance) <= 4 * variance * math.sqrt(2 / n)
    if family == "uniform":
        assert np.abs(delta).max() <= level + 1e-6


@pytest.mark.parametrize("severity", [1, 5])
def test_speckle_moments_before_clipping(severity):
    c = lp.CORRUPTIONS["speckle_noise"][severity - 1]
    grey = tf.fill((64, 32, 32, 3), 0.5)
    delta = (lp.corrupt(grey, "speckle_noise", severity, seed=3) - grey).numpy().ravel()
    sd = 0.5 * c
    assert abs(delta.mean()) <= 4 * sd / math.sqrt(delta.size)
    assert abs(delta.var() - sd**2) <= 4 * sd**2 * math.sqrt(2 / delta.size)


@pytest.mark.parametrize("severity", [1, 4])
def test_shot_noise_moments_before_clipping(severity):
    photons = lp.CORRUPTIONS["shot_noise"][severity - 1]
    grey = tf.fill((64, 32, 32, 3), 0.25)  # Poisson(0.25 c) / c stays far below 1
    out = lp.corrupt(grey, "shot_noise", severity, seed=4).numpy().ravel()
    np.testing.assert_allclose(out * photons, np.round(out * photons), atol=1e-3)
    variance = 0.25 / photons
    assert abs(out.mean() - 0.25) <= 4 * math.sqrt(variance / out.size)
    assert abs(out.var() - variance) <= 4 * variance * math.sqrt(
        2 / out.size + 1 / (0.25 * photons * out.size)
    )


@pytest.mark.parametrize(
    ("name", "severity"),
    [
        ("gaussian_noise", 2),
        ("gaussian_noise", 5),
        ("shot_noise", 5),
        ("speckle_noise", 5),
    ],
)
def test_clipped_noise_matches_numpy_simulation(pixels, name, severity):
    """On real images, clipped outputs have the mean and spread of a NumPy run."""
    c = lp.CORRUPTIONS[name][severity - 1]
    rng = np.random.default_rng(11)
    if name == "gaussian_noise":
        sim = np.clip(pixels + rng.normal(0, c, pixels.shape), 0, 1)
    elif name == "shot_noise":
        sim = np.clip(rng.poisson(pixels * c) / c, 0, 1)
    else:
        sim = np.clip(pixels + pixels * rng.normal(0, c, pixels.shape), 0, 1)
    ours = run(pixels, name, severity, seed=8)
    change_ours, change_sim = (ours - pixels).ravel(), (sim - pixels).ravel()
    assert abs(change_ours.mean() - change_sim.mean()) <= four_se(
        change_ours, change_sim
    )
    abs_ours, abs_sim = np.abs(change_ours), np.abs(change_sim)
    assert abs(abs_ours.mean() - abs_sim.mean()) <= four_se(abs_ours, abs_sim)


@pytest.mark.parametrize("severity", [1, 5])
def test_impulse_noise_matches_skimage(pixels, severity):
    amount = lp.CORRUPTIONS["impulse_noise"][severity - 1]
    grey = tf.fill((64, 32, 32, 3), 0.5)
    out = lp.corrupt(grey, "impulse_noise", severity, seed=6).numpy()
    n = out.size
    for value in (0.0, 1.0):
        share = (out == value).mean()
        assert abs(share - amount / 2) <= 4 * math.sqrt(amount / 2 / n)
    assert np.all((out == 0) | (out == 1) | (out == 0.5))
    # On real images: the share of changed values matches scikit-image's s&p noise.
    ref = skimage.util.random_noise(pixels, mode="s&p", amount=amount, rng=1)
    ours = run(pixels, "impulse_noise", severity, seed=6)
    changed_ours = (np.abs(ours - pixels) > 1e-6).mean()
    changed_ref = (np.abs(ref - pixels) > 1e-6).mean()
    assert abs(changed_ours - changed_ref) <= 4 * math.sqrt(2 * amount / pixels.size)


def test_salt_and_pepper_family():
    grey = tf.fill((64, 32, 32, 3), 0.5)
    out = lp.add_noise(grey, "salt_and_pepper", 0.2, seed=1).numpy()
    assert abs((out == 0).mean() - 0.1) <= 4 * math.sqrt(0.1 * 0.9 / out.size)
    assert abs((out == 1).mean() - 0.1) <= 4 * math.sqrt(0.1 * 0.9 / out.size)


# ------------------------------------------------------- seeding, ordering and bounds

RANDOM = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "fog",
    "elastic_transform",
)


@pytest.mark.parametrize("name", RANDOM)
def test_seeded_and_deterministic(pixels, name):
    some = pixels[:8]
    first = run(some, name, 3, seed=1)
    np.testing.assert_array_equal(first, run(some, name, 3, seed=1))
    assert not np.array_equal(first, run(some, name, 3, seed=2))
    keyed = run(some, name, 3, seed=1, batch_index=0)
    np.testing.assert_array_equal(keyed, run(some, name, 3, seed=1, batch_index=0))
    assert not np.array_equal(keyed, run(some, name, 3, seed=1, batch_index=1))


def test_tensor_seed_is_a_ready_stateless_seed():
    grey = tf.fill((4, 32, 32, 3), 0.5)
    a = lp.add_noise(
        grey, "gaussian", 0.05, seed=tf.stack([tf.constant(5, tf.int64), 0])
    )
    b = lp.add_noise(grey, "gaussian", 0.05, seed=tf.constant([5, 0]))
    c = lp.add_noise(grey, "gaussian", 0.05, seed=tf.constant([5, 1]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    shifted = tf.fill(
        (4, 32, 32, 3), 0.25
    )  # no fingerprint: same draw for other pixels
    d = lp.add_noise(shifted, "gaussian", 0.05, seed=tf.constant([5, 0]))
    np.testing.assert_allclose((d - shifted).numpy(), (a - grey).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="shape-\\(2,\\) integer"):
        lp.add_noise(grey, "gaussian", 0.05, seed=tf.constant([1.0, 2.0]))


def test_batches_get_independent_noise():
    a = tf.fill((4, 32, 32, 3), 0.5)
    b = tf.fill((4, 32, 32, 3), 0.5 + 1 / 255)
    noise_a = (lp.add_noise(a, "gaussian", 0.05, seed=0) - a).numpy()
    noise_b = (lp.add_noise(b, "gaussian", 0.05, seed=0) - b).numpy()
    assert abs(np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1]) < 0.05


def mean_change(pixels, name):
    return [
        float(np.abs(run(pixels, name, s, seed=9) - pixels).mean()) for s in range(1, 6)
    ]


INCREASING = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "contrast",
    "brightness",
    "jpeg_compression",
    "pixelate",
)


@pytest.mark.parametrize("name", INCREASING)
def test_mean_change_grows_with_severity(pixels, name):
    change = mean_change(pixels, name)
    assert all(a < b for a, b in itertools.pairwise(change)), change


def test_severity_ordering_where_it_is_not_monotone(pixels):
    """What holds on real images for the corruptions whose severities are not ordered
    by strength (all follow from the published parameters):

    - saturate: 1 (x0.3) and 2 (x0.1) desaturate, 3 (x1.5) saturates mildly, so
      3 changes least, then 1 < 2 < 4 < 5.
    - motion_blur: 3 (radius 6) and 4 (radius 8) share sigma 2; the taps past i = 12
      weigh exp(-36/2) or less, so the two severities are the same to 1e-6.
    - glass_blur: 4 and 5 shuffle twice and change more than 1-3; within each group a
      wider blur (0.4 against 0.25) pulls the result back towards the original.
    - elastic_transform: the random affine jitter shrinks from 2.56 to 0.96 pixels as
      the displacement field grows, and the affine part dominates: the mean change
      decreases with severity.
    """
    sat = mean_change(pixels, "saturate")
    assert sat[2] < sat[0] < sat[1] < sat[3] < sat[4], sat
    motion = mean_change(pixels, "motion_blur")
    assert motion[0] < motion[1] < motion[2] < motion[4], motion
    assert abs(motion[3] - motion[2]) < 1e-5, motion
    glass = mean_change(pixels, "glass_blur")
    assert max(glass[:3]) < min(glass[3:]), glass
    assert glass[2] < glass[1] and glass[4] < glass[3], glass
    elastic = mean_change(pixels, "elastic_transform")
    assert all(a > b for a, b in itertools.pairwise(elastic)), elastic


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(lp.CORRUPTIONS)),
    severity=st.integers(1, 5),
    kind=st.sampled_from(["uniform", "binary", "flat0", "flat1"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_stays_in_unit_interval(name, severity, kind, seed):
    rng = np.random.default_rng(seed)
    shape = (3, 32, 32, 3)
    images = {
        "uniform": rng.random(shape),
        "binary": rng.integers(0, 2, shape).astype(float),
        "flat0": np.zeros(shape),
        "flat1": np.ones(shape),
    }[kind]
    out = run(images, name, severity, seed=seed)
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@settings(max_examples=10, deadline=None)
@given(
    family=st.sampled_from(lp.NOISE_FAMILIES),
    level=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_noise_stays_in_unit_interval_any_size(family, level, seed):
    images = np.random.default_rng(seed).random((2, 7, 5, 1))
    out = lp.add_noise(tf.constant(images), family, level, seed=seed).numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    if level == 0:
        np.testing.assert_allclose(out, images, atol=1e-7)


# ------------------------------------------------------------------- tf.data interface


def test_perturbation_fn_in_dataset_map(cifar):
    images = cifar[:48]
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(48))).batch(16)
    fn = lp.perturbation_fn("gaussian_noise", 2, seed=5)
    mapped = data.map(lambda x, y: (fn(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    first = [x.numpy() for x, _ in mapped]
    second = [x.numpy() for x, _ in mapped]
    for a, b, start in zip(first, second, range(0, 48, 16), strict=True):
        np.testing.assert_array_equal(a, b)  # deterministic pass after pass
        eager = lp.corrupt(
            images[start : start + 16], "gaussian_noise", 2, seed=5
        ).numpy()
        np.testing.assert_array_equal(a, eager)  # the same as the eager call
    noise = [
        a - images[s : s + 16] / 255.0
        for a, s in zip(first, range(0, 48, 16), strict=True)
    ]
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.05

    level_fn = lp.perturbation_fn("uniform", 0.03, seed=5)
    indexed = data.enumerate().map(lambda i, b: (level_fn(b[0], batch_index=i), b[1]))
    for i, (x, _) in enumerate(indexed):
        expected = lp.add_noise(
            images[16 * i : 16 * i + 16], "uniform", 0.03, 5, batch_index=i
        )
        np.testing.assert_array_equal(x.numpy(), expected.numpy())


@pytest.mark.parametrize(
    "name", ["jpeg_compression", "glass_blur", "elastic_transform"]
)
def test_corruptions_trace_in_graph(cifar, name):
    fn = lp.perturbation_fn(name, 4, seed=1)
    some = cifar[:20]
    data = tf.data.Dataset.from_tensor_slices(some).batch(8)
    out = np.concatenate([x.numpy() for x in data.map(fn)])
    assert out.shape == (20, 32, 32, 3)
    eager = np.concatenate([fn(some[i : i + 8]).numpy() for i in range(0, 20, 8)])
    np.testing.assert_allclose(out, eager, atol=1e-6)


def test_load_cifar10_corrupted_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        data = lp.load_cifar10_corrupted("glass_blur", 2, str(tmp_path), batch_size=8)
        batches = list(data)
    assert [int(x.shape[0]) for x, _ in batches] == [8, 8, 4]
    for x, y in batches:
        assert x.dtype == tf.float32 and tuple(x.shape[1:]) == (32, 32, 3)
        assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1
        assert y.dtype.is_integer and bool(tf.reduce_all((y >= 0) & (y < 10)))
    assert float(tf.reduce_max(batches[0][0])) > 0.5  # uint8 mock pixels, rescaled
