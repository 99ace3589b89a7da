"""The mathematics of the Lipschitz controls, in one place.

Every regularizer, constraint and report of the package reads a kernel through the
functions here. A kernel is seen as a matrix with **one row per output unit**: row `o`
holds every weight that feeds output unit `o`. The infinity-norm Lipschitz constant of
the layer is then the **L1,inf norm**

    ||W||_{L1,inf} = max_o sum_i |W[o, i]|        (largest row L1 norm)

which is the operator norm `||W||_{inf -> inf}`. (Part of the sparse-coding literature
writes "l1,inf" for `sum_o max_i |W[o, i]|`; that quantity bounds no Lipschitz constant
and is not what this package computes.)

Keras keeps the output axis of a kernel last. The `layout` argument says how the
other axes map to rows:

- `"dense"`: kernel `(n_in, n_out)`; `n_out` rows of length `n_in`.
- `"conv"`: kernel `(k, c_in, c_out)`, `(kh, kw, c_in, c_out)` or
  `(kd, kh, kw, c_in, c_out)`; `c_out` rows, one per filter, of length
  `k... * c_in`.
- `"depthwise"`: kernel `(k, c, m)` or `(kh, kw, c, m)`; `c * m` rows of length `k...`.
- `"auto"`: output axis last; rank 2 is read as dense, ranks 3 to 5 as conv.

A 4-D depthwise kernel has the shape of a Conv2D kernel, so `"auto"` reads it as a
convolution: pass `layout="depthwise"` for depthwise kernels. Depthwise rows are
numbered `c * m_total + m`, the order of the layer's output channels.

For a convolution with any stride, dilation and zero padding, the largest filter L1
norm is the exact infinity-norm Lipschitz constant as soon as one output position sees
the whole filter. The spectral norm of the reshaped kernel computed here, by contrast,
is *not* the L2 operator norm of the convolution: it is a cheaper, different quantity
(the convolution's L2 norm can be larger by up to a factor of about sqrt(kh * kw)).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

LAYOUTS = ("auto", "dense", "conv", "depthwise")
PENALTY_MODES = ("max", "excess", "excess_sum")

_RANKS = {"dense": (2,), "conv": (3, 4, 5), "depthwise": (3, 4), "auto": (2, 3, 4, 5)}


def check_layout(layout: str, owner: str = "layout") -> str:
    """Return `layout` if it is one of `LAYOUTS`, else raise a `ValueError`."""
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: layout must be one of {LAYOUTS}, got {layout!r}.")
    return layout


def check_number(value, name: str, owner: str, *, positive: bool = False) -> float:
    """Return `value` as a float if it is finite and >= 0 (> 0 if `positive`)."""
    bound = "> 0" if positive else ">= 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{owner}: {name} must be a finite number {bound}, got {value!r}."
        )
    if positive and number == 0:
        raise ValueError(
            f"{owner}: {name} must be a finite number {bound}, got {value!r}."
        )
    return number


def check_penalty(mode: str, target, owner: str) -> float | None:
    """Validate a penalty `mode` and its `target`; return the target (float or None)."""
    if mode not in PENALTY_MODES:
        raise ValueError(f"{owner}: mode must be one of {PENALTY_MODES}, got {mode!r}.")
    if mode == "max":
        if target is not None:
            raise ValueError(
                f"{owner}: target is only used by the modes 'excess' and 'excess_sum'; "
                f"mode 'max' got target={target!r}."
            )
        return None
    if target is None:
        raise ValueError(
            f"{owner}: mode {mode!r} needs a target bound, got target=None."
        )
    return check_number(target, "target", owner)


def _resolve_layout(rank: int | None, layout: str) -> str:
    check_layout(layout)
    if rank is None:
        raise ValueError("The kernel must have a known rank to be read as rows.")
    if rank not in _RANKS[layout]:
        allowed = " or ".join(str(r) for r in _RANKS[layout])
        raise ValueError(
            f"A kernel of layout {layout!r} must have rank {allowed}, got rank {rank}."
        )
    if layout == "auto":
        return "dense" if rank == 2 else "conv"
    return layout


def kernel_columns(kernel, layout: str = "auto") -> tf.Tensor:
    """The kernel as a `(row_length, n_rows)` matrix: column `o` is row `o` of `W`.

    This is a pure reshape (no transpose), the cheapest view for row reductions.

    # Arguments
        kernel: a Keras kernel (tensor or variable), output axis last.
        layout: one of `"auto"`, `"dense"`, `"conv"`, `"depthwise"`.

    # Returns
        A tensor of shape `(row_length, n_rows)`.

    # Raises
        ValueError: for an unknown layout or a rank the layout does not allow.
    """
    kernel = tf.convert_to_tensor(kernel)
    resolved = _resolve_layout(kernel.shape.rank, layout)
    shape = tf.shape(kernel)
    if resolved == "dense":
        return kernel
    if resolved == "conv":
        return tf.reshape(kernel, [-1, shape[-1]])
    # depthwise: (k..., c, m) -> (prod(k...), c * m)
    return tf.reshape(kernel, [-1, shape[-2] * shape[-1]])


def kernel_to_rows(kernel, layout: str = "auto") -> tf.Tensor:
    """The kernel as a `(n_rows, row_length)` matrix, one row per output unit.

    # Example
    ```python
    rows = kernel_to_rows(tf.ones((3, 3, 16, 32)))  # Conv2D kernel
    assert rows.shape == (32, 144)
    ```
    """
    return tf.transpose(kernel_columns(kernel, layout))


def rows_to_kernel(rows, shape, layout: str = "auto") -> tf.Tensor:
    """Inverse of `kernel_to_rows`: a `(n_rows, row_length)` matrix back in `shape`."""
    shape = tf.TensorShape(shape)
    _resolve_layout(shape.rank, layout)
    return tf.reshape(tf.transpose(tf.convert_to_tensor(rows)), shape)


def row_l1_norms(kernel, layout: str = "auto") -> tf.Tensor:
    """L1 norm of every row: `n_o = sum_i |W[o, i]|`, one value per output unit.

    # Example
    ```python
    norms = row_l1_norms(tf.constant([[1.0, -2.0], [3.0, 0.5]]))  # Dense (2 in, 2 out)
    # -> [4.0, 2.5]
    ```
    """
    return tf.reduce_sum(tf.abs(kernel_columns(kernel, layout)), axis=0)


def l1inf_norm(kernel, layout: str = "auto") -> tf.Tensor:
    """The L1,inf norm `max_o sum_i |W[o, i]|`: the infinity-norm Lipschitz constant.

    # Example
    ```python
    l1inf_norm(tf.constant([[1.0, -2.0], [3.0, 0.5]]))  # -> 4.0
    ```
    """
    return tf.reduce_max(row_l1_norms(kernel, layout))


def penalty_from_row_norms(row_norms, strength: float, mode: str, target) -> tf.Tensor:
    """The penalty of the modes shared by every L1,inf control.

    With `n_o` the row bounds and `t` the target:

    - `"max"`:        `strength * max_o n_o`
    - `"excess"`:     `strength * max(0, max_o n_o - t)`
    - `"excess_sum"`: `strength * sum_o max(0, n_o - t)`

    `"excess"` moves only the worst row at each step; `"excess_sum"` pushes every row
    above the target at once. Both are zero exactly when the bound is at most `t`.
    """
    row_norms = tf.convert_to_tensor(row_norms)
    strength = tf.cast(strength, row_norms.dtype)
    if mode == "max":
        return strength * tf.reduce_max(row_norms)
    target = tf.cast(target, row_norms.dtype)
    if mode == "excess":
        return strength * tf.nn.relu(tf.reduce_max(row_norms) - target)
    if mode == "excess_sum":
        return strength * tf.reduce_sum(tf.nn.relu(row_norms - target))
    raise ValueError(f"mode must be one of {PENALTY_MODES}, got {mode!r}.")


def _feasibility_guard(rows: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """Scale rows whose L1 norm exceeds `radius` onto it: `w * radius / ||w||_1`."""
    norms = tf.reduce_sum(tf.abs(rows), axis=-1, keepdims=True)
    outside = norms > radius
    safe = tf.where(outside, norms, 1)
    factor = radius / safe
    # The factor underflows when a huge norm meets a tiny radius; then divide first.
    tiny = tf.constant(_tiny(rows.dtype), rows.dtype)
    scaled = tf.where(factor >= tiny, rows * factor, rows / safe * radius)
    return tf.where(outside, scaled, rows)


def _tiny(dtype: tf.DType) -> float:
    return float(np.finfo(dtype.as_numpy_dtype).tiny)


def project_rows_l1(rows, radius, clip_value: float | None = None) -> tf.Tensor:
    """Euclidean projection of every row onto the L1 ball `{w : ||w||_1 <= radius}`.

    Row by row this solves `argmin_w ||w - v||_2` subject to `||w||_1 <= radius` (and
    `|w_i| <= clip_value` when `clip_value` is given). The solution is the soft
    threshold `w_i = sign(v_i) * clip(|v_i| - theta, 0, clip_value)`, with `theta = 0`
    when that already satisfies the bound, and otherwise the unique `theta > 0` at which
    `||w||_1 = radius`. Without a clip `theta` comes from the sorted magnitudes and
    their cumulative sums (Duchi et al., ICML 2008); with a clip, from the breakpoints
    `|v_i|` and `|v_i| - clip_value` of the piecewise linear `||w(theta)||_1`. All rows
    are processed at once, O(n log n) per row. Rows already inside are returned
    unchanged, bit for bit (after the clip, if any).

    Accuracy: in float32 the threshold is exact up to rounding of the row's largest
    entries, so a row whose entries are huge compared with `radius` (1e30 against 1)
    comes back with an absolute error of the order of `radius`, never of its entries'
    size. A final rescaling by `min(1, radius / ||w||_1)` keeps every row feasible.

    # Arguments
        rows: tensor `(n_rows, row_length)` (any leading batch shape works).
        radius: the L1 radius, a number >= 0 or a tensor broadcastable to
            `(n_rows, 1)`.
        clip_value: optional bound on every entry's magnitude (e.g. the Larq
            `weight_clip` value 1.0); `None` for no bound.

    # Returns
        A tensor of the shape and dtype of `rows`.

    # Example
    ```python
    project_rows_l1(tf.constant([[3.0, -1.0, 0.0]]), 2.0)  # -> [[2.0, -0.0, 0.0]]
    ```
    """
    rows = tf.convert_to_tensor(rows)
    dtype = rows.dtype
    radius = tf.cast(radius, dtype)
    if radius.shape.rank == 1:
        radius = radius[:, None]
    magnitudes = tf.abs(rows)
    clipped = magnitudes
    if clip_value is not None:
        clip = tf.cast(clip_value, dtype)
        clipped = tf.minimum(magnitudes, clip)
        rows = tf.sign(rows) * clipped
    norms = tf.reduce_sum(clipped, axis=-1, keepdims=True)
    if clip_value is None:
        theta = _threshold_l1(magnitudes, radius)
        shrunk = tf.nn.relu(magnitudes - theta)
    else:
        theta = _threshold_l1_box(magnitudes, radius, clip)
        shrunk = tf.clip_by_value(magnitudes - theta, 0, clip)
    projected = _feasibility_guard(tf.sign(rows) * shrunk, radius)
    inside = norms <= radius
    return tf.where(inside, rows, projected)


def _threshold_l1(magnitudes: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """Soft threshold for the plain L1 ball from the sorted magnitudes (Duchi et al.)."""
    dtype = magnitudes.dtype
    ordered = tf.sort(magnitudes, axis=-1, direction="DESCENDING")
    cumulative = tf.cumsum(ordered, axis=-1)
    count = tf.cast(tf.range(1, tf.shape(ordered)[-1] + 1), dtype)
    candidates = (cumulative - radius) / count
    # The support size is the number of sorted entries above their candidate threshold.
    support = tf.reduce_sum(
        tf.cast(ordered > candidates, tf.int32), axis=-1, keepdims=True
    )
    support = tf.maximum(support, 1)
    theta = tf.gather(candidates, support - 1, batch_dims=candidates.shape.rank - 1)
    # radius 0 (or an all-zero row) leaves theta at max |v|: everything goes to 0.
    return tf.maximum(theta, 0)


def _threshold_l1_box(
    magnitudes: tf.Tensor, radius: tf.Tensor, clip: tf.Tensor
) -> tf.Tensor:
    """Soft threshold for the L1 ball intersected with the box `|w_i| <= clip`.

    `f(t) = sum_i clip(a_i - t, 0, c)` is continuous, piecewise linear and
    non-increasing, with breakpoints at `a_i` and `a_i - c`. Evaluate it at every
    breakpoint (and at 0), take the last one with `f >= radius` and the first one with
    `f <= radius`: no breakpoint lies between them, so `f` is linear there and the root
    is interpolated. With the `k` smallest magnitudes summing to `P[k]`,

        f(t) = c * (n - k2) + (P[k2] - P[k1]) - t * (k2 - k1)

    where `k1`, `k2` count the magnitudes `<= t` and `<= t + c`: entries above the
    window contribute exactly `c`, so huge entries cause no cancellation.
    """
    dtype = magnitudes.dtype
    ordered = tf.sort(magnitudes, axis=-1)  # ascending
    n = tf.cast(tf.shape(ordered)[-1], dtype)
    batch_dims = ordered.shape.rank - 1
    first = tf.zeros_like(ordered[..., :1])
    prefix = tf.concat([first, tf.cumsum(ordered, axis=-1)], axis=-1)

    def f(t):
        k1 = tf.searchsorted(ordered, t, side="right")
        k2 = tf.searchsorted(ordered, t + clip, side="right")
        window = tf.gather(prefix, k2, batch_dims=batch_dims) - tf.gather(
            prefix, k1, batch_dims=batch_dims
        )
        above = n - tf.cast(k2, dtype)
        return clip * above + window - t * tf.cast(k2 - k1, dtype)

    top = ordered[..., -1:]
    points = tf.concat([first, ordered, tf.nn.relu(ordered - clip)], axis=-1)
    values = f(points)
    # 0 always has f(0) >= radius for a row outside the ball; max|v| has f = 0.
    t_lo = tf.reduce_max(tf.where(values >= radius, points, 0), axis=-1, keepdims=True)
    t_hi = tf.reduce_min(
        tf.where(values <= radius, points, top), axis=-1, keepdims=True
    )
    f_lo, f_hi = f(t_lo), f(t_hi)
    slope = f_lo - f_hi
    step = tf.where(slope > 0, (f_lo - radius) / tf.where(slope > 0, slope, 1), 0)
    return tf.maximum(t_lo + step * (t_hi - t_lo), 0)


def rescale_rows_l1(rows, radius, clip_value: float | None = None) -> tf.Tensor:
    """Scale every row into the L1 ball: `w_o * min(1, radius / ||w_o||_1)`.

    Cheaper than `project_rows_l1` (no sort) and feasible, but not the closest point:
    it shrinks every entry of a row by the same factor instead of thresholding. With
    `clip_value`, rows are clipped to `[-clip_value, clip_value]` first (rescaling can
    only shrink entries, so the clip still holds afterwards). Zero rows stay zero.

    # Example
    ```python
    rescale_rows_l1(tf.constant([[3.0, -1.0]]), 2.0)  # -> [[1.5, -0.5]]
    ```
    """
    rows = tf.convert_to_tensor(rows)
    radius = tf.cast(radius, rows.dtype)
    if radius.shape.rank == 1:
        radius = radius[:, None]
    if clip_value is not None:
        clip = tf.cast(clip_value, rows.dtype)
        rows = tf.clip_by_value(rows, -clip, clip)
    return _feasibility_guard(rows, radius)


def constrain_kernel(
    kernel,
    max_norm,
    mode: str = "project",
    layout: str = "auto",
    clip_value: float | None = None,
) -> tf.Tensor:
    """Bring every row of a kernel into the L1 ball of radius `max_norm`.

    `mode="project"` uses `project_rows_l1` (the closest feasible kernel),
    `mode="rescale"` uses `rescale_rows_l1`. The result has the kernel's shape.
    """
    if mode not in ("project", "rescale"):
        raise ValueError(f"mode must be 'project' or 'rescale', got {mode!r}.")
    kernel = tf.convert_to_tensor(kernel)
    rows = kernel_to_rows(kernel, layout)

    def constrained():
        if mode == "project":
            out = project_rows_l1(rows, max_norm, clip_value)
        else:
            out = rescale_rows_l1(rows, max_norm, clip_value)
        return tf.reshape(tf.transpose(out), tf.shape(kernel))

    # Every row already feasible (the common case once training has settled): the
    # projection is the identity, so skip its sort.
    feasible = tf.reduce_max(tf.reduce_sum(tf.abs(rows), axis=-1)) <= max_norm
    if clip_value is not None:
        feasible = tf.logical_and(feasible, tf.reduce_max(tf.abs(rows)) <= clip_value)
    return tf.cond(feasible, lambda: tf.identity(kernel), constrained)


def _safe_normalize(x: tf.Tensor) -> tf.Tensor:
    """Unit L2 vector on the last axis, robust to huge and tiny entries; 0 stays 0."""
    peak = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True)
    x = x / tf.where(peak > 0, peak, 1)
    return tf.math.l2_normalize(x, axis=-1)


def power_iteration(matrix, u, iterations: int = 1):
    """Power iteration for the top singular value of a `(m, n)` matrix.

    Starting from the left vector `u` (length `m`), each iteration does
    `v = normalize(M^T u)`, `u = normalize(M v)`. The estimate is `sigma = u^T M v`,
    computed with `u` and `v` held constant, so its gradient with respect to `M` is
    `u v^T` (exact once `u`, `v` have converged to the top singular pair). The estimate
    never exceeds the true top singular value. A zero matrix gives `sigma = 0` and
    returns the starting `u` unchanged, so a persisted vector never collapses to zero.

    # Arguments
        matrix: tensor `(m, n)`.
        u: starting left vector, shape `(m,)`; need not be normalized.
        iterations: number of iterations, >= 1.

    # Returns
        `(sigma, u, v)`: the differentiable estimate and the new vectors (no gradient).

    # Example
    ```python
    sigma, u, v = power_iteration(tf.constant([[3.0, 0.0], [0.0, 1.0]]), tf.ones(2), 20)
    # sigma ~= 3.0
    ```
    """
    if int(iterations) < 1:
        raise ValueError(f"power_iteration: iterations must be >= 1, got {iterations}.")
    matrix = tf.convert_to_tensor(matrix)
    held = tf.stop_gradient(matrix)
    start = _safe_normalize(tf.cast(tf.stop_gradient(u), matrix.dtype))
    u_new = start
    v = tf.zeros([tf.shape(matrix)[1]], matrix.dtype)
    for _ in range(int(iterations)):
        v = _safe_normalize(tf.linalg.matvec(held, u_new, transpose_a=True))
        u_new = _safe_normalize(tf.linalg.matvec(held, v))
    degenerate = tf.reduce_all(tf.equal(u_new, 0))
    u_new = tf.where(degenerate, start, u_new)
    u_new = tf.stop_gradient(u_new)
    v = tf.stop_gradient(v)
    sigma = tf.tensordot(u_new, tf.linalg.matvec(matrix, v), axes=1)
    return sigma, u_new, v


def spectral_norm(kernel, layout: str = "auto") -> tf.Tensor:
    """Exact top singular value of the reshaped kernel (rows x row_length), by SVD.

    For reporting; training code should use the power iteration of
    `SpectralNormLipschitz`. This is not the L2 operator norm of a convolution.
    """
    rows = kernel_to_rows(kernel, layout)
    return tf.linalg.svd(rows, compute_uv=False)[..., 0]
