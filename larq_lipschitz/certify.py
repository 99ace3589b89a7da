"""Certified accuracy of (binarized) networks by interval bound propagation.

An input box `{x' : ||x' - x||_inf <= eps}` (in [0, 1] pixel scale, intersected with the
valid pixel range) is pushed through the network in center/radius form: a tensor is
known to lie in `[c - r, c + r]` elementwise.

- A linear layer `y = W x + b` maps `(c, r)` to `(W c + b, |W| r)`; this is exact per
  output unit (every unit's extreme values are attained somewhere in the box).
- BatchNorm in inference mode, Normalization and Rescaling are elementwise affine maps.
- A non-decreasing elementwise function `f` (ReLU, hard tanh, tanh, ..., and every Larq
  sign-type quantizer) maps `[l, u]` to `[f(l), f(u)]`. For a sign quantizer this is
  exact per unit: an interval that excludes the threshold maps to a fixed `+1` or `-1`,
  one that contains it to `[-1, 1]` ("undecided"). Larq's `sign` maps 0 to `+1`, so
  `[0, u]` maps to a fixed `+1`, which the evaluation at the end points gets right.
- Max pooling and elementwise max/min act on the end points; average pooling, padding,
  reshaping and concatenation act on `c` and `r` separately.

An example is certified when its true class provably wins over the whole box. When the
logits come out of a Dense layer (possibly followed by a BatchNorm; a final softmax is
left out) the logit differences `z_y - z_j = (W_y - W_j) . h + b_y - b_j` are bounded
directly from the interval of the Dense layer's input `h`, which is tighter than
comparing the separate logit intervals.

Bounds are computed in float64. Rounding of the float32 network itself is not modelled
exactly; instead every quantizer's input interval and the final margin are widened by
`tolerance * (1 + |c| + r)`, so that a unit whose pre-activation lies within rounding
distance of the threshold counts as undecided.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Iterable, Sequence

from larq_lipschitz.bounds import (
    _EPSILON_KERAS,
    _bn_gain_shift,
    _build_plan,
    _constant_operands,
    _Elementwise,
    _final_softmax_steps,
    _input_quantizer,
    _kind,
    _layer_activation,
    _Plan,
    _quantizer_spec,
    _Step,
    _where,
)
from larq_lipschitz.quantization import effective_kernel

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOLERANCE",
    "CertifiedExamples",
    "IntervalBounds",
    "certify",
    "certify_examples",
    "interval_bounds",
    "write_certification",
]

#: Relative and absolute widening of quantizer inputs and of the final margin.
DEFAULT_TOLERANCE = 1e-5

_F64 = tf.float64


@dataclasses.dataclass(frozen=True)
class IntervalBounds:
    """Elementwise bounds of a model's output over an input box.

    # Arguments
        lower: lower bounds, shape of the model output (logits when a final softmax
            was left out).
        upper: upper bounds, same shape.
        undecided: one bool per example: whether some quantizer saw an input interval
            that straddles its threshold.
    """

    lower: np.ndarray
    upper: np.ndarray
    undecided: np.ndarray


# --------------------------------------------------------------------------------------
# Interval operations, center/radius form
# --------------------------------------------------------------------------------------


def _any_per_example(mask: tf.Tensor) -> tf.Tensor:
    return tf.reduce_any(tf.reshape(mask, [tf.shape(mask)[0], -1]), axis=1)


def _check_monotone(spec: _Elementwise, where: str) -> None:
    if spec.name != "softmax" and (not spec.monotone or spec.fn is None):
        raise ValueError(
            f"{where}: interval propagation through the non-monotone activation "
            f"{spec.name!r} is not supported."
        )


def _through_elementwise(spec: _Elementwise, c, r, tolerance: float, where: str):
    """(c, r, undecided-or-None) after an elementwise function."""
    if spec.name == "linear":
        return c, r, None
    if not spec.monotone or spec.fn is None:
        raise ValueError(
            f"{where}: interval propagation through the non-monotone activation "
            f"{spec.name!r} is not supported."
        )
    if spec.quantizer:
        slack = tolerance * (1.0 + tf.abs(c) + r)
        lo, hi = spec.fn(c - r - slack), spec.fn(c + r + slack)
        undecided = _any_per_example(tf.not_equal(lo, hi))
    else:
        lo, hi = spec.fn(c - r), spec.fn(c + r)
        undecided = None
    lo, hi = tf.cast(lo, _F64), tf.cast(hi, _F64)
    return (lo + hi) / 2, (hi - lo) / 2, undecided


def _softmax_interval(c, r):
    """Exact per-unit bounds of softmax over the last axis for logits in [c - r, c + r].

    p_i is increasing in z_i and decreasing in every other z_j, so
    p_i >= 1 / (1 + sum_{j != i} exp(u_j - l_i)) and p_i <= 1 / (1 + sum_{j != i} exp(l_j - u_i)).
    """
    lo, hi = c - r, c + r
    n = tf.shape(c)[-1]
    off = 1.0 - tf.eye(n, dtype=_F64)  # zero on the diagonal
    # diff[..., i, j] = u_j - l_i
    low = 1.0 / (
        1.0 + tf.reduce_sum(off * tf.exp(hi[..., None, :] - lo[..., :, None]), -1)
    )
    high = 1.0 / (
        1.0 + tf.reduce_sum(off * tf.exp(lo[..., None, :] - hi[..., :, None]), -1)
    )
    return (low + high) / 2, (high - low) / 2


def _same_pads(shape, layer) -> list[list[int]]:
    pads = [[0, 0]]
    for n, k, s, d in zip(
        shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate, strict=False
    ):
        eff = (int(k) - 1) * int(d) + 1
        out = -(-int(n) // int(s))
        total = max((out - 1) * int(s) + eff - int(n), 0)
        pads.append([total // 2, total - total // 2])
    return pads + [[0, 0]]


class _Linear:
    """A Dense / Conv / DepthwiseConv2D layer with its weights frozen in float64."""

    def __init__(self, step: _Step, kind: str):
        layer = step.layer
        self.layer, self.kind, self.where = layer, kind, _where(step)
        kernel = tf.constant(np.asarray(effective_kernel(layer).numpy(), np.float64))
        self.kernel, self.abs_kernel = kernel, tf.abs(kernel)
        bias = getattr(layer, "bias", None)
        self.bias = (
            None if bias is None else tf.constant(np.asarray(bias.numpy(), np.float64))
        )
        self.pad_values = float(np.asarray(getattr(layer, "pad_values", 0.0)))
        self.padding = getattr(layer, "padding", "valid")

    def _apply(self, x, kernel, pad_value: float):
        if self.kind == "dense":
            if x.shape.rank == 2:
                return tf.matmul(x, kernel)
            return tf.tensordot(x, kernel, [[x.shape.rank - 1], [0]])
        layer = self.layer
        padding = self.padding.upper()
        if padding == "CAUSAL":
            d, k = int(layer.dilation_rate[0]), int(layer.kernel_size[0])
            x = tf.pad(x, [[0, 0], [d * (k - 1), 0], [0, 0]])
            padding = "VALID"
        elif padding == "SAME" and self.pad_values != 0.0:
            x = tf.pad(x, _same_pads(x.shape, layer), constant_values=pad_value)
            padding = "VALID"
        if self.kind == "depthwise_conv":
            return tf.nn.depthwise_conv2d(
                x,
                kernel,
                strides=(1, *layer.strides, 1),
                padding=padding,
                dilations=layer.dilation_rate,
            )
        return tf.nn.convolution(
            x,
            kernel,
            strides=layer.strides,
            padding=padding,
            dilations=layer.dilation_rate,
        )

    def __call__(self, c, r):
        center = self._apply(c, self.kernel, self.pad_values)
        if self.bias is not None:
            center = center + self.bias
        return center, self._apply(r, self.abs_kernel, 0.0)


class _IntervalNetwork:
    """A model's graph, with frozen weights, evaluated on intervals."""

    def __init__(self, model: tf.keras.Model, *, to_logits: bool, tolerance: float):
        self.plan: _Plan = _build_plan(model)
        self.tolerance = float(tolerance)
        plan = self.plan
        self.stripped = _final_softmax_steps(plan) if to_logits else set()
        self.ops = [self._compile(i, s) for i, s in enumerate(plan.steps)]
        self.head = self._find_head() if len(plan.outputs) == 1 else None

    # ----- per-step operations --------------------------------------------------------

    def _compile(self, index: int, step: _Step):
        kind = _kind(step)
        tol = self.tolerance
        where = _where(step)
        layer = step.layer
        strip = index in self.stripped

        def single(fn):
            def op(values):
                if len(values) != 1:
                    raise ValueError(
                        f"{where}: expected one input tensor, got {len(values)}."
                    )
                return fn(*values[0])

            return op

        if kind in ("dense", "conv", "depthwise_conv"):
            quant = _input_quantizer(step)
            linear = _Linear(step, kind)
            act = _layer_activation(step, strip)
            _check_monotone(act, where)

            def run_linear(c, r):
                undecided = None
                if quant is not None:
                    c, r, undecided = _through_elementwise(quant, c, r, tol, where)
                c, r = linear(c, r)
                if act.name == "softmax":
                    c, r = _softmax_interval(c, r)
                    return c, r, undecided
                c, r, _ = _through_elementwise(act, c, r, tol, where)
                return c, r, undecided

            return single(run_linear)
        if kind == "batchnorm":
            gain, shift = _bn_gain_shift(layer)
            axes = list(layer.axis)

            def run_bn(c, r):
                shape = [1] * c.shape.rank
                for a in axes:
                    shape[a] = -1
                g, b = tf.reshape(gain, shape), tf.reshape(shift, shape)
                return c * g + b, r * tf.abs(g), None

            return single(run_bn)
        if kind == "normalization":
            mean = np.asarray(layer.mean, np.float64)
            std = np.maximum(
                np.sqrt(np.asarray(layer.variance, np.float64)), _EPSILON_KERAS
            )
            if layer.invert:
                return single(lambda c, r: (c * std + mean, r * std, None))
            return single(lambda c, r: ((c - mean) / std, r / std, None))
        if kind == "rescaling":
            scale = np.asarray(layer.scale, np.float64)
            offset = np.asarray(layer.offset, np.float64)
            return single(lambda c, r: (c * scale + offset, r * np.abs(scale), None))
        if kind == "quantizer":
            spec = _quantizer_spec(layer, where)
            if spec is None:  # NoOp
                return single(lambda c, r: (c, r, None))
            return single(lambda c, r: _through_elementwise(spec, c, r, tol, where))
        if kind == "activation":
            act = _layer_activation(step, strip)
            _check_monotone(act, where)
            if act.name == "softmax":
                axis = getattr(layer, "axis", -1)
                shape = step.input_shapes[0] if step.input_shapes else None
                if axis != -1 and (shape is None or axis != len(shape) - 1):
                    raise ValueError(
                        f"{where}: softmax over an axis other than the last."
                    )
                return single(lambda c, r: (*_softmax_interval(c, r), None))
            return single(lambda c, r: _through_elementwise(act, c, r, tol, where))
        if kind in ("max_pool", "global_max_pool"):

            def run_max(c, r):
                lo, hi = layer.call(c - r), layer.call(c + r)
                return (lo + hi) / 2, (hi - lo) / 2, None

            return single(run_max)
        if kind in (
            "avg_pool",
            "global_avg_pool",
            "reshape",
            "padding",
            "shortcut_pad",
        ):
            return single(lambda c, r: (layer.call(c), layer.call(r), None))
        if kind == "identity":
            return single(lambda c, r: (c, r, None))
        constants = _constant_operands(step)

        def run_merge(values):
            cs, rs = [v[0] for v in values], [v[1] for v in values]
            if kind == "add":
                c = tf.add_n(cs)
                for k in constants:
                    c = c + k
                return c, tf.add_n(rs), None
            if kind == "subtract":
                return cs[0] - cs[1], rs[0] + rs[1], None
            if kind == "average":
                n = float(len(cs))
                return tf.add_n(cs) / n, tf.add_n(rs) / n, None
            if kind == "concatenate":
                return (
                    tf.concat(cs, axis=layer.axis),
                    tf.concat(rs, axis=layer.axis),
                    None,
                )
            # Maximum / Minimum: monotone in every argument
            pick = (
                tf.maximum if isinstance(layer, tf.keras.layers.Maximum) else tf.minimum
            )
            lo, hi = cs[0] - rs[0], cs[0] + rs[0]
            for c, r in zip(cs[1:], rs[1:], strict=False):
                lo, hi = pick(lo, c - r), pick(hi, c + r)
            return (lo + hi) / 2, (hi - lo) / 2, None

        return run_merge

    # ----- margin head ----------------------------------------------------------------

    def _find_head(self):
        """(key of the Dense input, Dense step, optional BN step) for the margin form."""
        plan = self.plan
        key = plan.outputs[0]
        index = plan.producer.get(key)
        if index is None:
            return None
        step = plan.steps[index]
        if index in self.stripped and _kind(step) == "activation":
            key = step.inputs[0]
            index = plan.producer.get(key)
            if index is None:
                return None
            step = plan.steps[index]
        bn = None
        if _kind(step) == "batchnorm" and list(step.layer.axis) in ([-1], [1]):
            (key,) = step.inputs
            producer = plan.producer.get(key)
            if producer is None or plan.consumers.get(key) != 1:
                return None
            bn, step, index = step, plan.steps[producer], producer
        if _kind(step) != "dense":
            return None
        shape = step.input_shapes[0]
        if shape is None or len(shape) != 2:
            return None
        if _layer_activation(step, index in self.stripped).name != "linear":
            return None
        kernel = np.asarray(effective_kernel(step.layer).numpy(), np.float64)
        bias = np.zeros(kernel.shape[1])
        if getattr(step.layer, "bias", None) is not None:
            bias = np.asarray(step.layer.bias.numpy(), np.float64)
        if bn is not None:
            gain, shift = _bn_gain_shift(bn.layer)
            kernel, bias = kernel * gain, bias * gain + shift
        return {
            "key": step.inputs[0],
            "quantizer": _input_quantizer(step),
            "where": _where(step),
            "kernel": tf.constant(kernel),
            "bias": tf.constant(bias),
        }

    # ----- evaluation -----------------------------------------------------------------

    def run(self, c, r):
        """Intervals of every tensor; returns (values dict, undecided per example)."""
        plan = self.plan
        values = {k: (c, r) for k in plan.inputs}
        undecided = tf.zeros([tf.shape(c)[0]], tf.bool)
        for index, (step, op) in enumerate(zip(plan.steps, self.ops, strict=False)):
            if index in self.stripped and _kind(step) == "activation":
                out = values[step.inputs[0]] + (None,)
            else:
                out = op([values[k] for k in step.inputs])
            if out[2] is not None:
                undecided = tf.logical_or(undecided, out[2])
            for k in step.outputs:
                values[k] = (out[0], out[1])
        return values, undecided

    def outputs(self, c, r):
        values, undecided = self.run(c, r)
        return [values[k] for k in self.plan.outputs], undecided

    def lower_margins(self, c, r, labels):
        """Lower bounds of z_y - z_j for j != y (+inf at j = y), and undecided flags."""
        values, undecided = self.run(c, r)
        tol = self.tolerance
        if self.head is None:
            ((zc, zr),) = [values[k] for k in self.plan.outputs]
            zc = tf.reshape(zc, [tf.shape(zc)[0], -1])
            zr = tf.reshape(zr, [tf.shape(zr)[0], -1])
            lo, hi = zc - zr, zc + zr
            lo_y = tf.gather(lo, labels, axis=1, batch_dims=1)[:, None]
            center = tf.gather(zc, labels, axis=1, batch_dims=1)[:, None] - zc
            margin = lo_y - hi - tol * (1.0 + tf.abs(center))
        else:
            head = self.head
            hc, hr = values[head["key"]]
            if head["quantizer"] is not None:
                hc, hr, und = _through_elementwise(
                    head["quantizer"], hc, hr, tol, head["where"]
                )
                if und is not None:
                    undecided = tf.logical_or(undecided, und)
            w, b = head["kernel"], head["bias"]
            w_y = tf.transpose(tf.gather(w, labels, axis=1))  # (batch, n_in)
            diff = w_y[:, :, None] - w[None]  # (batch, n_in, classes)
            b_diff = tf.gather(b, labels)[:, None] - b[None]
            center = tf.einsum("bn,bnk->bk", hc, diff) + b_diff
            radius = tf.einsum("bn,bnk->bk", hr, tf.abs(diff))
            margin = center - radius - tol * (1.0 + tf.abs(center))
        n_classes = tf.shape(margin)[1]
        own = tf.one_hot(labels, n_classes, on_value=True, off_value=False)
        margin = tf.where(own, tf.constant(np.inf, _F64), margin)
        return margin, undecided


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def _check_tolerance(tolerance, where: str) -> float:
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{where}: tolerance must be a finite number >= 0, got {tolerance!r}."
        )
    return value


def interval_bounds(
    model: tf.keras.Model,
    lower,
    upper,
    *,
    to_logits: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> IntervalBounds:
    """Elementwise bounds of the model output over the input box `[lower, upper]`.

    Interval bound propagation in center/radius form (`c = (l + u) / 2`,
    `r = (u - l) / 2`): a linear layer gives `(W c + b, |W| r)`, a non-decreasing
    elementwise function `f` gives `[f(l), f(u)]`, softmax gives
    `p_i in [1 / (1 + sum_{j != i} exp(u_j - l_i)), 1 / (1 + sum_{j != i} exp(l_j - u_i))]`.
    Every true output of the model for an input in the box lies within the bounds
    (up to the float32 rounding of the model itself; see the module notes).

    # Arguments
        model: a built functional or Sequential Keras / Larq model with one input and
            one output, made of the layers listed in `certify`.
        lower: array, a batch of input lower bounds (model input units).
        upper: array of the same shape, `upper >= lower`.
        to_logits: leave out a softmax that ends the model (bounds of the logits).
        tolerance: widening of every quantizer input (see `certify`).

    # Returns
        An `IntervalBounds` with numpy arrays.

    # Raises
        ValueError: for shapes that disagree, `upper < lower`, or a layer that cannot
            be propagated (the message names it).

    # Example
    ```python
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    x = np.random.rand(4, 3)
    b = interval_bounds(model, x - 0.01, x + 0.01)
    assert np.all(b.lower <= model(x).numpy() + 1e-5)
    ```
    """
    tol = _check_tolerance(tolerance, "interval_bounds")
    lo = np.asarray(lower, np.float64)
    hi = np.asarray(upper, np.float64)
    if lo.shape != hi.shape:
        raise ValueError(
            f"interval_bounds: lower {lo.shape} and upper {hi.shape} differ in shape."
        )
    if np.any(hi < lo) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(
            "interval_bounds: need finite bounds with upper >= lower everywhere."
        )
    net = _IntervalNetwork(model, to_logits=bool(to_logits), tolerance=tol)
    if len(net.plan.inputs) != 1 or len(net.plan.outputs) != 1:
        raise ValueError(
            "interval_bounds: the model must have exactly one input and one output."
        )
    c = tf.constant((lo + hi) / 2)
    r = tf.constant((hi - lo) / 2)
    ((oc, orad),), undecided = net.outputs(c, r)
    oc, orad = oc.numpy(), orad.numpy()
    return IntervalBounds(oc - orad, oc + orad, undecided.numpy())


@dataclasses.dataclass(frozen=True)
class CertifiedExamples:
    """Per-example outcome of `certify_examples`.

    # Arguments
        certified: bool per example: correct and provably so over the whole box.
        correct: bool per example: the unperturbed prediction is the label.
        undecided: bool per example: some sign unit's input interval straddles its
            threshold.
        margin: lower bound of `min_{j != y} z_y - z_j` over the box (after the
            tolerance is taken off); certified examples have `margin > 0`.
    """

    certified: np.ndarray
    correct: np.ndarray
    undecided: np.ndarray
    margin: np.ndarray


def _check_epsilon(value, where: str) -> float:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        eps = float("nan")
    if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(
            f"{where}: every epsilon must be a number in [0, 1], got {value!r}."
        )
    return eps


class _Certifier:
    """Validated settings plus a compiled interval network for one model."""

    def __init__(self, model, *, pixel_scale, clip_range, tolerance, where: str):
        if not (math.isfinite(float(pixel_scale)) and float(pixel_scale) > 0):
            raise ValueError(
                f"{where}: pixel_scale must be a finite number > 0, got {pixel_scale!r}."
            )
        self.scale = float(pixel_scale)
        self.clip = None
        if clip_range is not None:
            lo, hi = (float(v) for v in clip_range)
            if not lo < hi:
                raise ValueError(
                    f"{where}: clip_range must be (low, high) with low < high, got {clip_range!r}."
                )
            self.clip = (lo * self.scale, hi * self.scale)
        self.where = where
        self.model = model
        self.net = _IntervalNetwork(
            model, to_logits=True, tolerance=_check_tolerance(tolerance, where)
        )
        if len(self.net.plan.inputs) != 1 or len(self.net.plan.outputs) != 1:
            raise ValueError(
                f"{where}: the model must have exactly one input and one output."
            )
        self._margins = tf.function(self.net.lower_margins, reduce_retracing=True)

    def correct(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if self.clip is not None:
            lo, hi = self.clip
            slack = 1e-6 * max(1.0, abs(lo), abs(hi))
            if x.min() < lo - slack or x.max() > hi + slack:
                raise ValueError(
                    f"{self.where}: inputs range over [{x.min():.4g}, {x.max():.4g}], outside "
                    f"clip_range * pixel_scale = [{lo:.4g}, {hi:.4g}]; give the model pixels "
                    "(normalization inside the model) or pass clip_range=None."
                )
        scores = self.model(tf.constant(x, tf.float32), training=False).numpy()
        return np.argmax(scores.reshape(len(x), -1), axis=1) == labels

    def examples(
        self, x: np.ndarray, labels: np.ndarray, correct: np.ndarray, eps: float
    ):
        lo, hi = x - eps * self.scale, x + eps * self.scale
        if self.clip is not None:
            lo, hi = np.maximum(lo, self.clip[0]), np.minimum(hi, self.clip[1])
        c, r = (lo + hi) / 2, np.maximum((hi - lo) / 2, 0.0)
        margin, undecided = self._margins(
            tf.constant(c), tf.constant(r), tf.constant(labels)
        )
        worst = np.min(margin.numpy(), axis=1)
        return CertifiedExamples(
            correct & (worst > 0), correct, undecided.numpy(), worst
        )


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    y = y.reshape(n)
    if not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y)):
        raise ValueError("certify: labels must be class indices (or one-hot vectors).")
    return y.astype(np.int32)


def certify_examples(
    model: tf.keras.Model,
    images,
    labels,
    epsilon: float,
    *,
    pixel_scale: float = 1.0,
    clip_range: tuple[float, float] | None = (0.0, 1.0),
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 100,
) -> CertifiedExamples:
    """Which examples are certified at one `epsilon` (see `certify` for the method).

    # Arguments
        model: a built Keras / Larq classifier with one input and one output.
        images: array of examples, model input layout, pixels in `[0, 1] * pixel_scale`.
        labels: class indices (or one-hot rows).
        epsilon: perturbation radius in [0, 1] pixel scale.
        pixel_scale, clip_range, tolerance, batch_size: as in `certify`.

    # Returns
        A `CertifiedExamples` of per-example arrays.

    # Example
    ```python
    out = certify_examples(model, x_test[:100], y_test[:100], 1 / 255)
    print(out.certified.mean(), out.margin[:5])
    ```
    """
    eps = _check_epsilon(epsilon, "certify_examples")
    if int(batch_size) < 1:
        raise ValueError(
            f"certify_examples: batch_size must be >= 1, got {batch_size!r}."
        )
    cert = _Certifier(
        model,
        pixel_scale=pixel_scale,
        clip_range=clip_range,
        tolerance=tolerance,
        where="certify_examples",
    )
    x = np.asarray(images, np.float64)
    y = _labels(labels, len(x))
    parts = []
    for i in range(0, len(x), int(batch_size)):
        xb, yb = x[i : i + int(batch_size)], y[i : i + int(batch_size)]
        parts.append(cert.examples(xb, yb, cert.correct(xb, yb), eps))
    if not parts:
        raise ValueError("certify_examples: no examples given.")
    return CertifiedExamples(
        *(
            np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(parts[0])
        )
    )


def _batches(dataset, batch_size: int, input_rank: int):
    """Yield (images, labels) numpy batches from a tf.data.Dataset or an (x, y) tuple."""
    if isinstance(dataset, tuple) and len(dataset) == 2:
        x, y = (np.asarray(a) for a in dataset)
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "certify: dataset must be a tf.data.Dataset of (images, labels) or a tuple "
            f"(images, labels) of arrays, got {type(dataset).__name__}."
        )
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) < 2:
        raise ValueError("certify: the dataset must yield (images, labels) pairs.")
    if spec[0].shape.rank == input_rank - 1:
        dataset = dataset.batch(batch_size)
    for element in dataset:
        yield element[0].numpy(), element[1].numpy()


def certify(
    model: tf.keras.Model,
    dataset,
    epsilons: Iterable[float],
    *,
    num_examples: int | None = None,
    pixel_scale: float = 1.0,
    clip_range: tuple[float, float] | None = (0.0, 1.0),
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 100,
) -> list[dict]:
    """Certified accuracy under `||delta||_inf <= eps` by interval bound propagation.

    For each example `x` with label `y` and each `eps`, the box
    `B = {x' : ||x' - x||_inf <= eps, x' in clip_range}` (pixel scale) is propagated
    through the network (see `interval_bounds`). The example is certified when it is
    classified correctly and

        min over x' in B of (z_y(x') - z_j(x')) > 0   for every j != y,

    bounded from below by propagating the logit differences through the last Dense layer
    exactly (or, when the logits do not come from a Dense layer, by `l_y - u_j`). An
    example is counted as *undecided* when some sign (quantizer) unit's input interval
    straddles its threshold; a 1/1 network with no undecided unit is constant on the box.

    The model must take pixels as input: `[0, 1] * pixel_scale` (normalization belongs
    inside the model, e.g. a Normalization or Rescaling layer). A final softmax is left
    out. Supported layers: Dense, Conv1D/2D/3D, DepthwiseConv2D and their Larq versions
    (input quantizer first, effective kernel `q(W)`, `pad_values`), BatchNormalization
    (inference), Normalization, Rescaling, monotone activations, pooling, Add, Subtract,
    Average, Maximum, Minimum, Concatenate, Flatten, Reshape, Permute, ZeroPadding,
    Cropping, ShortcutPad, Dropout-like layers. MagnitudeAwareSign as an input quantizer
    is not elementwise and is refused. The cost is about two float64 forward passes per
    example and epsilon; the margin head holds `batch * fan_in * classes` numbers.

    # Arguments
        model: a built Keras / Larq classifier with one input and one output.
        dataset: `tf.data.Dataset` of `(images, labels)` (batched or not), or a tuple
            `(images, labels)` of arrays; labels are class indices or one-hot.
        epsilons: perturbation radii in [0, 1] pixel scale.
        num_examples: use only the first `num_examples` examples (all when None).
        pixel_scale: model input value of a pixel of intensity 1 (e.g. 255 for a model
            on raw bytes); the box radius in model units is `eps * pixel_scale`.
        clip_range: valid pixel range in [0, 1] scale, intersected with the box, or None.
        tolerance: widening of quantizer inputs and of the final margin,
            `tolerance * (1 + |c| + r)`, covering float32 rounding of the model.
        batch_size: examples per propagation when the dataset is not batched.

    # Returns
        One dict per epsilon, in the given order, with `epsilon, num_examples, correct,
        certified, undecided, clean_accuracy, certified_accuracy, undecided_fraction,
        margin` (`"dense"` when the margin form was used, `"logits"` otherwise).

    # Raises
        ValueError: for invalid arguments, inputs outside `clip_range`, an empty dataset
            or a layer that cannot be propagated (the message names it).

    # Example
    ```python
    results = certify(model, test_ds, [0.0, 1 / 255, 2 / 255], num_examples=1000)
    print(results[1]["certified_accuracy"])
    ```
    """
    eps_list = [_check_epsilon(e, "certify") for e in epsilons]
    if not eps_list:
        raise ValueError("certify: epsilons is empty.")
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or int(num_examples) != num_examples
        or num_examples < 1
    ):
        raise ValueError(
            f"certify: num_examples must be a positive integer or None, got {num_examples!r}."
        )
    if int(batch_size) < 1:
        raise ValueError(f"certify: batch_size must be >= 1, got {batch_size!r}.")
    cert = _Certifier(
        model,
        pixel_scale=pixel_scale,
        clip_range=clip_range,
        tolerance=tolerance,
        where="certify",
    )
    input_rank = len(model.inputs[0].shape) if getattr(model, "inputs", None) else 0

    stats = [{"correct": 0, "certified": 0, "undecided": 0} for _ in eps_list]
    seen = 0
    for x, y in _batches(dataset, int(batch_size), input_rank):
        if num_examples is not None:
            if seen >= num_examples:
                break
            x, y = x[: num_examples - seen], y[: num_examples - seen]
        x = np.asarray(x, np.float64)
        if len(x) == 0:
            continue
        labels = _labels(y, len(x))
        correct = cert.correct(x, labels)
        for s, eps in zip(stats, eps_list, strict=True):
            out = cert.examples(x, labels, correct, eps)
            s["correct"] += int(out.correct.sum())
            s["certified"] += int(out.certified.sum())
            s["undecided"] += int(out.undecided.sum())
        seen += len(x)
    if seen == 0:
        raise ValueError("certify: the dataset is empty.")
    results = []
    for eps, s in zip(eps_list, stats, strict=True):
        results.append(
            {
                "epsilon": eps,
                "num_examples": seen,
                "correct": s["correct"],
                "certified": s["certified"],
                "undecided": s["undecided"],
                "clean_accuracy": s["correct"] / seen,
                "certified_accuracy": s["certified"] / seen,
                "undecided_fraction": s["undecided"] / seen,
                "margin": "logits" if cert.net.head is None else "dense",
            }
        )
        log.info(
            "eps %.4g: certified %.4f, clean %.4f, undecided %.4f",
            eps,
            s["certified"] / seen,
            s["correct"] / seen,
            s["undecided"] / seen,
        )
    return results


def write_certification(
    results: Sequence[dict], out_dir: str | pathlib.Path
) -> dict[str, pathlib.Path]:
    """Write `certification.json` and `certified_accuracy.png` into `out_dir`.

    The plot shows certified accuracy against epsilon (in [0, 1] pixel scale and in
    units of 1/255), the clean accuracy as a reference line and the fraction of
    undecided examples. It is drawn with matplotlib's Agg canvas, without pyplot, so
    no display and no global backend change are needed.

    # Arguments
        results: the list returned by `certify`.
        out_dir: folder to write into (created if missing).

    # Returns
        `{"json": path, "png": path}`.

    # Raises
        ValueError: if `results` is empty or lacks the fields `certify` returns.

    # Example
    ```python
    write_certification(certify(model, test_ds, [0, 1 / 255, 2 / 255]), "runs/r1")
    ```
    """
    rows = [dict(r) for r in results]
    needed = ("epsilon", "certified_accuracy", "clean_accuracy", "undecided_fraction")
    if not rows or any(k not in r for r in rows for k in needed):
        raise ValueError(
            f"write_certification: need a non-empty list of dicts with {needed}."
        )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "certification.json", out / "certified_accuracy.png"
    payload = {
        "method": "interval bound propagation, ||delta||_inf <= epsilon",
        "results": rows,
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows.sort(key=lambda r: r["epsilon"])
    eps = [r["epsilon"] * 255 for r in rows]
    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(
        eps, [r["certified_accuracy"] for r in rows], "o-", label="certified accuracy"
    )
    ax.plot(
        eps,
        [r["clean_accuracy"] for r in rows],
        "--",
        color="gray",
        label="clean accuracy",
    )
    ax.plot(
        eps, [r["undecided_fraction"] for r in rows], ":", label="undecided fraction"
    )
    ax.set_xlabel("epsilon (x 1/255, L-inf, pixel scale)")
    ax.set_ylabel("fraction of examples")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    log.info("wrote %s and %s", json_path, png_path)
    return {"json": json_path, "png": png_path}
