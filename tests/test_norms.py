"""larq_lipschitz.norms against independent NumPy references (float64, loops)."""

import decimal

import larq_lipschitz.norms as norms  # noqa: I001  (Keras 2 first)

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Entries: ordinary values plus zeros and extreme magnitudes (exact float32 values).
EXTREMES = [float(np.float32(x)) for x in (0.0, 1e30, -1e30, 1e-30, -1e-30)]
ELEMENTS = st.one_of(
    st.floats(-10, 10, width=32, allow_subnormal=False), st.sampled_from(EXTREMES)
)

SHAPES = {
    "dense": st.tuples(st.integers(1, 6), st.integers(1, 5)),
    "conv": st.one_of(
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
        st.tuples(
            st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)
        ),
        st.tuples(*[st.integers(1, 2)] * 4, st.integers(1, 3)),
    ),
    "depthwise": st.one_of(
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
        st.tuples(
            st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)
        ),
    ),
}


@st.composite
def kernels(draw, layout=None):
    layout = layout or draw(st.sampled_from(sorted(SHAPES)))
    shape = draw(SHAPES[layout])
    return layout, draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))


# --- NumPy references ---------------------------------------------------------------


def np_rows(kernel, layout):
    """One row per output unit, built index by index."""
    k = np.asarray(kernel, np.float64)
    if layout == "dense":
        return k.T.copy()
    if layout == "conv":
        c_out = k.shape[-1]
        return np.stack([k[..., o].ravel() for o in range(c_out)])
    c, m = k.shape[-2], k.shape[-1]
    return np.stack([k[..., ci, j].ravel() for ci in range(c) for j in range(m)])


def np_project_l1(v, r):
    """Duchi et al. sort-based projection of one row, float64."""
    v = np.asarray(v, np.float64)
    if np.abs(v).sum() <= r:
        return v
    u = np.sort(np.abs(v))[::-1]
    css = np.cumsum(u)
    j = np.arange(1, len(u) + 1)
    rho = np.nonzero(u - (css - r) / j > 0)[0]
    rho = rho[-1] + 1 if len(rho) else 1
    theta = max((css[rho - 1] - r) / rho, 0.0)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def np_project_l1_box(v, r, c):
    """Projection onto {|w_i| <= c} ∩ {||w||_1 <= r}, by bisection on theta.

    In 60-digit decimal arithmetic: with entries of 1e30 the answer depends on
    differences that float64 cannot hold.
    """
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        a = [decimal.Decimal(float(x)) for x in np.abs(np.asarray(v, np.float64))]
        r, c = decimal.Decimal(float(r)), decimal.Decimal(float(c))
        zero = decimal.Decimal(0)

        def w(t):
            return [min(max(x - t, zero), c) for x in a]

        if sum(w(zero)) <= r:
            out = w(zero)
        else:
            lo, hi = zero, max(a)
            for _ in range(250):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if sum(w(mid)) > r else (lo, mid)
            out = w((lo + hi) / 2)
    return np.sign(v) * np.array([float(x) for x in out])


def np_support_l1_box(d, r, c):
    """max <d, q> over q in {|q_i| <= c} ∩ {||q||_1 <= r}: a fractional knapsack."""
    total, budget = 0.0, r
    for x in np.sort(np.abs(d))[::-1]:
        take = min(c, budget)
        total += take * x
        budget -= take
        if budget <= 0:
            break
    return total


# --- rows and norms ------------------------------------------------------------------


@HYPOTHESIS
@given(kernels())
def test_rows_match_reference(case):
    layout, kernel = case
    rows = norms.kernel_to_rows(kernel, layout).numpy()
    np.testing.assert_array_equal(rows, np_rows(kernel, layout).astype(np.float32))
    back = norms.rows_to_kernel(rows, kernel.shape, layout).numpy()
    np.testing.assert_array_equal(back, kernel)
    if layout != "depthwise":
        np.testing.assert_array_equal(
            norms.kernel_to_rows(kernel, "auto").numpy(), rows
        )


@HYPOTHESIS
@given(kernels())
def test_row_norms_and_l1inf_match_reference(case):
    layout, kernel = case
    expected = np.abs(np_rows(kernel, layout)).sum(axis=1)
    got = norms.row_l1_norms(kernel, layout).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-37)
    np.testing.assert_allclose(
        norms.l1inf_norm(kernel, layout).numpy(), expected.max(), rtol=1e-5, atol=1e-37
    )


@HYPOTHESIS
@given(kernels())
def test_l1inf_gradient_is_finite_and_exact(case):
    layout, kernel = case
    variable = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        value = norms.l1inf_norm(variable, layout)
    grad = tape.gradient(value, variable).numpy()
    assert np.all(np.isfinite(grad))
    rows = np_rows(kernel, layout)
    row_norms = np.abs(rows).sum(axis=1)
    winners = np.flatnonzero(row_norms == row_norms.max())
    expected = np.zeros_like(rows)
    for o in winners:  # TF shares the gradient of max equally between tied rows
        expected[o] = np.sign(rows[o]) / len(winners)
    got = np_rows(grad, layout)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "layout, shape",
    [
        ("dense", (2, 3, 4)),
        ("dense", (4,)),
        ("conv", (3, 4)),
        ("conv", (1, 1, 1, 1, 1, 1)),
        ("depthwise", (3, 4)),
        ("depthwise", (1, 1, 1, 1, 1)),
        ("auto", (5,)),
        ("auto", (1,) * 6),
    ],
)
def test_wrong_rank_is_a_clear_error(layout, shape):
    with pytest.raises(
        ValueError, match=f"layout '{layout}' must have rank .* got rank {len(shape)}"
    ):
        norms.row_l1_norms(tf.zeros(shape), layout)


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="layout must be one of"):
        norms.kernel_to_rows(tf.zeros((2, 2)), "transposed")


def test_row_norm_is_the_exact_lipschitz_constant_of_real_layers():
    """An input of signs attains each row norm through the real Keras layers."""
    rng = np.random.default_rng(0)
    conv = tf.keras.layers.Conv2D(5, 3, use_bias=False)
    conv.build((None, 3, 3, 4))
    conv.kernel.assign(rng.normal(size=(3, 3, 4, 5)))
    depthwise = tf.keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    depthwise.build((None, 3, 3, 4))
    depthwise.depthwise_kernel.assign(rng.normal(size=(3, 3, 4, 2)))
    dense = tf.keras.layers.Dense(5, use_bias=False)
    dense.build((None, 7))
    dense.kernel.assign(rng.normal(size=(7, 5)))

    k = conv.kernel.numpy()
    for o in range(5):
        out = conv(np.sign(k[None, ..., o]).astype(np.float32)).numpy()
        assert out[0, 0, 0, o] == pytest.approx(
            norms.row_l1_norms(k, "conv").numpy()[o], rel=1e-5
        )
    k = depthwise.depthwise_kernel.numpy()
    bounds = norms.row_l1_norms(k, "depthwise").numpy()
    for j in range(2):
        out = depthwise(np.sign(k[None, ..., j]).astype(np.float32)).numpy()
        for c in range(4):  # output channel c * multiplier + j
            assert out[0, 0, 0, c * 2 + j] == pytest.approx(bounds[c * 2 + j], rel=1e-5)
    k = dense.kernel.numpy()
    for o in range(5):
        out = dense(np.sign(k[None, :, o]).astype(np.float32)).numpy()
        assert out[0, o] == pytest.approx(norms.row_l1_norms(k).numpy()[o], rel=1e-5)


# --- penalties -----------------------------------------------------------------------


@HYPOTHESIS
@given(
    hnp.arrays(np.float32, st.integers(1, 8), elements=st.floats(0, 100, width=32)),
    st.floats(0, 10),
    st.floats(0, 50),
)
def test_penalty_modes_match_reference(row_norms, strength, target):
    r = row_norms.astype(np.float64)
    expected = {
        "max": strength * r.max(),
        "excess": strength * max(0.0, r.max() - target),
        "excess_sum": strength * np.maximum(r - target, 0).sum(),
    }
    for mode, value in expected.items():
        got = norms.penalty_from_row_norms(row_norms, strength, mode, target).numpy()
        assert got == pytest.approx(value, rel=1e-5, abs=1e-4)


# --- projection ----------------------------------------------------------------------

ROWS = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 5), st.integers(1, 16)),
    elements=st.one_of(
        st.floats(-5, 5, width=32, allow_subnormal=False), st.sampled_from(EXTREMES)
    ),
)
RADII = st.one_of(st.floats(0, 20), st.sampled_from([0.0, 1e-30, 1e30]))


def _scale(rows):
    return np.maximum(np.abs(rows.astype(np.float64)).max(axis=1, keepdims=True), 1e-30)


@HYPOTHESIS
@given(ROWS, RADII)
def test_projection_is_feasible_idempotent_and_matches_reference(rows, radius):
    got = norms.project_rows_l1(rows, radius).numpy()
    assert got.dtype == np.float32 and got.shape == rows.shape
    scale = _scale(rows)
    norms_got = np.abs(got.astype(np.float64)).sum(axis=1)
    assert np.all(norms_got <= radius * (1 + 1e-5) + 1e-36)
    reference = np.stack([np_project_l1(v, radius) for v in rows.astype(np.float64)])
    assert np.all(np.abs(got - reference) <= 1e-5 * scale + radius * 1e-6 + 1e-35)
    again = norms.project_rows_l1(got, radius).numpy()
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-35)
    inside = np.abs(rows.astype(np.float64)).sum(axis=1) <= radius
    np.testing.assert_array_equal(got[inside], rows[inside])


@HYPOTHESIS
@given(ROWS, st.floats(0.01, 20), st.integers(0, 2**31 - 1))
def test_projection_is_the_closest_feasible_point(rows, radius, seed):
    p = norms.project_rows_l1(rows, radius).numpy().astype(np.float64)
    v = rows.astype(np.float64)
    scale = _scale(rows)
    # Optimality certificate: <v - p, q - p> <= 0 for every q in the ball, i.e.
    # radius * ||v - p||_inf <= <v - p, p> (the ball's support function).
    # The tolerance follows float32 rounding of p (relative to the row's largest entry).
    d = v - p
    lhs = radius * np.abs(d).max(axis=1)
    rhs = (d * p).sum(axis=1)
    n = v.shape[1]
    tol = (
        1e-5
        * n
        * scale[:, 0]
        * (np.abs(d).max(axis=1) + np.abs(p).max(axis=1) + radius)
    )
    assert np.all(lhs <= rhs + tol + 1e-30)
    # And no random feasible point is closer.
    rng = np.random.default_rng(seed)
    for _ in range(20):
        q = rng.laplace(size=v.shape) * rng.uniform(0, 2)
        q *= np.minimum(
            1, radius / np.maximum(np.abs(q).sum(axis=1, keepdims=True), 1e-300)
        )
        assert np.all(
            np.linalg.norm(v - p, axis=1)
            <= np.linalg.norm(v - q, axis=1) * (1 + 1e-5) + 1e-30
        )


@HYPOTHESIS
@given(ROWS, st.floats(0, 20), st.floats(0.05, 3))
def test_box_projection_matches_reference_and_is_optimal(rows, radius, clip):
    got = norms.project_rows_l1(rows, radius, clip_value=clip).numpy()
    got64 = got.astype(np.float64)
    assert np.all(np.abs(got64) <= clip * (1 + 1e-6))
    assert np.all(np.abs(got64).sum(axis=1) <= radius * (1 + 1e-5) + 1e-30)
    v = rows.astype(np.float64)
    reference = np.stack([np_project_l1_box(r, radius, clip) for r in v])
    np.testing.assert_allclose(got64, reference, rtol=1e-4, atol=1e-4 * clip)
    # Optimality: <v - p, p> >= max over the feasible set of <v - p, q>.
    for row, p in zip(v, got64, strict=True):
        d = row - p
        assert np_support_l1_box(d, radius, clip) <= (d * p).sum() + 1e-4 * max(
            1.0, np.abs(d).max() * max(radius, clip)
        )
    again = norms.project_rows_l1(got, radius, clip_value=clip).numpy()
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-6)


def test_box_projection_is_not_clip_then_project():
    """The exact projection onto box ∩ ball differs from (and beats) the composed one."""
    v = np.array([[3.0, 0.9, 0.1]], np.float32)
    exact = norms.project_rows_l1(v, 1.5, clip_value=1.0).numpy()
    composed = norms.project_rows_l1(np.clip(v, -1, 1), 1.5).numpy()
    np.testing.assert_allclose(exact, [[1.0, 0.5, 0.0]], atol=1e-6)
    np.testing.assert_allclose(composed, [[0.8, 0.7, 0.0]], atol=1e-6)
    assert np.linalg.norm(v - exact) < np.linalg.norm(v - composed)


@HYPOTHESIS
@given(ROWS, RADII, st.one_of(st.none(), st.floats(0.05, 3)))
def test_rescale_matches_reference(rows, radius, clip):
    got = (
        norms.rescale_rows_l1(rows, radius, clip_value=clip).numpy().astype(np.float64)
    )
    v = rows.astype(np.float64)
    if clip is not None:
        v = np.clip(v, -np.float32(clip), np.float32(clip))
    n = np.abs(v).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = v * np.where(n > radius, radius / np.where(n > 0, n, 1), 1.0)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-35)
    assert np.all(np.abs(got).sum(axis=1) <= radius * (1 + 1e-5) + 1e-36)


def test_constrain_kernel_keeps_shape_for_every_layout():
    rng = np.random.default_rng(1)
    for layout, shape in [
        ("dense", (6, 3)),
        ("conv", (3, 3, 2, 4)),
        ("depthwise", (3, 3, 2, 2)),
    ]:
        kernel = rng.normal(size=shape).astype(np.float32) * 3
        for mode in ("project", "rescale"):
            out = norms.constrain_kernel(kernel, 2.0, mode, layout).numpy()
            assert out.shape == shape
            row_norms = np.abs(np_rows(out, layout)).sum(axis=1)
            assert row_norms.max() <= 2.0 * (1 + 1e-6)
            if mode == "project":
                expected = np.stack(
                    [np_project_l1(r, 2.0) for r in np_rows(kernel, layout)]
                )
                np.testing.assert_allclose(np_rows(out, layout), expected, atol=1e-5)


# --- power iteration -----------------------------------------------------------------


def test_power_iteration_converges_to_svd():
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    v, _ = np.linalg.qr(rng.normal(size=(9, 6)))
    matrix = (u * [5.0, 2.5, 1.0, 0.5, 0.1, 0.0]) @ v.T
    sigma, u_new, v_new = norms.power_iteration(matrix, rng.normal(size=6), 10)
    assert sigma.numpy() == pytest.approx(5.0, rel=1e-3)
    assert abs(np.dot(u_new.numpy(), u[:, 0])) == pytest.approx(1.0, abs=1e-3)
    assert abs(np.dot(v_new.numpy(), v[:, 0])) == pytest.approx(1.0, abs=1e-3)


@HYPOTHESIS
@given(
    hnp.arrays(
        np.float32, st.tuples(st.integers(1, 6), st.integers(1, 10)), elements=ELEMENTS
    ),
    st.integers(1, 5),
)
def test_power_iteration_never_exceeds_svd_and_has_finite_gradient(matrix, iterations):
    variable = tf.Variable(matrix)
    with tf.GradientTape() as tape:
        sigma, u, _ = norms.power_iteration(
            variable, np.ones(matrix.shape[0]), iterations
        )
    grad = tape.gradient(sigma, variable).numpy()
    assert np.all(np.isfinite(grad)) and np.isfinite(sigma.numpy())
    assert np.all(np.isfinite(u.numpy()))
    true = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]
    assert sigma.numpy() <= true * (1 + 1e-4) + 1e-37


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_power_iteration_is_scale_equivariant(scale):
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(4, 7)).astype(np.float32)
    base, _, _ = norms.power_iteration(matrix, np.ones(4), 30)
    scaled, _, _ = norms.power_iteration(matrix * np.float32(scale), np.ones(4), 30)
    assert scaled.numpy() == pytest.approx(base.numpy() * scale, rel=1e-4)


def test_power_iteration_on_zeros_keeps_the_vector():
    start = np.array([0.6, 0.8], np.float32)
    sigma, u, v = norms.power_iteration(tf.zeros((2, 3)), start, 3)
    assert sigma.numpy() == 0.0
    np.testing.assert_allclose(u.numpy(), start, rtol=1e-6)
    assert np.all(np.isfinite(v.numpy()))
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        norms.power_iteration(tf.ones((2, 2)), start, 0)


def test_spectral_norm_matches_svd():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    expected = np.linalg.svd(np_rows(kernel, "conv"), compute_uv=False)[0]
    assert norms.spectral_norm(kernel).numpy() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "mean"}, "mode must be one of"),
        ({"mode": "max", "target": 1.0}, "target is only used"),
        ({"mode": "excess"}, "needs a target"),
        (
            {"mode": "excess", "target": -1.0},
            "target must be a finite number >= 0, got -1.0",
        ),
        (
            {"mode": "excess_sum", "target": float("nan")},
            "target must be a finite number",
        ),
    ],
)
def test_check_penalty_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        norms.check_penalty(kwargs.get("mode"), kwargs.get("target"), "Owner")
