"""Lipschitz bounds of whole networks, composed layer by layer along the Keras graph.

A network bound is computed by walking the functional graph from the inputs to the
outputs and attaching to every tensor a number `L` such that the map from the network
input to that tensor is `L`-Lipschitz in the chosen norm:

- a layer with one input multiplies `L` by its own Lipschitz constant;
- `Add` of branches with bounds `L_1, ..., L_n` gives `L_1 + ... + L_n` (so an identity
  shortcut around a block `F` gives `(1 + L_F) L`, a projection shortcut `L_s + L_F`);
- `Concatenate` gives `max_i L_i` in the infinity norm and `sqrt(sum_i L_i^2)` in the
  2-norm.

Kernels are taken as the deployed network uses them, `q(W)` (see
`larq_lipschitz.quantization.effective_kernel`). A BatchNormalization layer in
inference mode that directly follows a linear layer (and is the only consumer of its
output) is folded into it: the pair is bounded by `max_o g_o ||q(W)_o||_1` with
`g_o = |gamma_o| / sqrt(var_o + eps)`, which is exact and tighter than the product of
the two separate bounds.

Sign activations (Larq input quantizers) make a 1/1 network discontinuous, so it has no
finite Lipschitz constant. The bounds here are those of the *relaxed* network in which
every quantizer is replaced by its straight-through proxy, the identity clipped to
`[-1, 1]` (1-Lipschitz). For 1/32 networks (binary weights, real activations) no
relaxation is involved. For sound statements about the 1/1 network itself use
`larq_lipschitz.certify` (interval bound propagation).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import json
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

from larq_lipschitz import norms
from larq_lipschitz.layers import ShortcutPad
from larq_lipschitz.quantization import effective_kernel, is_binarized, kernel_quantizer

import larq as lq
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = [
    "BoundReport",
    "LayerBound",
    "LipschitzBoundLogger",
    "RELAXATION",
    "bound_comparison",
    "lipschitz_bound",
    "write_bounds_report",
]

#: How the bounds treat sign activations, in words (also stored in every report).
RELAXATION = (
    "Sign activations (Larq input quantizers and quantizer layers) are replaced by their "
    "straight-through proxy, the identity clipped to [-1, 1], which is 1-Lipschitz. The "
    "bound holds for this relaxed network, and exactly for networks without quantized "
    "activations (1/32); a 1/1 network is discontinuous and has no finite Lipschitz "
    "constant. BatchNormalization is taken in inference mode (moving statistics)."
)

_EPSILON_KERAS = 1e-7  # tf.keras.backend.epsilon(), the floor of Normalization's std


# --------------------------------------------------------------------------------------
# Walking the graph
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Step:
    """One call of one layer, with integer keys naming its input and output tensors."""

    layer: tf.keras.layers.Layer
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_shapes: tuple[tuple[int | None, ...] | None, ...]
    constants: tuple[Any, ...] = ()  # non-tensor operands of a TFOpLambda call


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A model's graph flattened into steps in an order where inputs come first."""

    model_name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    steps: tuple[_Step, ...]
    consumers: dict[int, int]  # how often each key is read (by steps and as an output)
    producer: dict[int, int]  # key -> index of the step that makes it


def _shape(tensor) -> tuple[int | None, ...] | None:
    try:
        return tuple(tf.TensorShape(tensor.shape).as_list())
    except (AttributeError, ValueError):
        return None


def _trace(
    model: tf.keras.Model, in_keys, prefix: str, steps: list, counter
) -> list[int]:
    """Append the steps of `model` (recursing into nested models); return output keys."""
    if getattr(model, "_is_graph_network", False):
        if len(model.inputs) != len(in_keys):
            raise ValueError(
                f"Model {model.name!r} has {len(model.inputs)} inputs but is called with "
                f"{len(in_keys)} tensors; only calls with one tensor per input can be walked."
            )
        key_of = {id(t): k for t, k in zip(model.inputs, in_keys, strict=False)}
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                if any(id(t) not in key_of for t in node.keras_inputs):
                    continue  # not reachable from the inputs (Keras skips it too)
                ins = [key_of[id(t)] for t in node.keras_inputs]
                outs = tf.nest.flatten(node.outputs)
                layer = node.layer
                if isinstance(layer, tf.keras.Model):
                    keys = _trace(layer, ins, f"{prefix}{layer.name}/", steps, counter)
                else:
                    keys = [next(counter) for _ in outs]
                    constants = ()
                    if type(layer).__name__ == "TFOpLambda":
                        tensor_ids = {id(t) for t in node.keras_inputs}
                        constants = tuple(
                            a
                            for a in tf.nest.flatten(node.call_args)
                            if id(a) not in tensor_ids and a is not None
                        )
                    steps.append(
                        _Step(
                            layer=layer,
                            name=prefix + layer.name,
                            inputs=tuple(ins),
                            outputs=tuple(keys),
                            input_shapes=tuple(_shape(t) for t in node.keras_inputs),
                            constants=constants,
                        )
                    )
                for t, k in zip(outs, keys, strict=False):
                    key_of[id(t)] = k
        return [key_of[id(t)] for t in tf.nest.flatten(model.outputs)]
    if isinstance(model, tf.keras.Sequential):
        (key,) = in_keys
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.InputLayer):
                continue
            if isinstance(layer, tf.keras.Model):
                (key,) = _trace(layer, [key], f"{prefix}{layer.name}/", steps, counter)
                continue
            try:
                shape = tuple(tf.TensorShape(layer.input_shape).as_list())
            except (AttributeError, RuntimeError, ValueError):
                shape = None
            new = next(counter)
            steps.append(_Step(layer, prefix + layer.name, (key,), (new,), (shape,)))
            key = new
        return [key]
    raise ValueError(
        f"Model {model.name!r} ({type(model).__name__}) is a subclassed model: only "
        "functional and Sequential models have a graph that can be walked."
    )


def _build_plan(model: tf.keras.Model) -> _Plan:
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"Expected a tf.keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: give it an input shape or call it once."
        )
    counter = itertools.count()
    n_inputs = len(model.inputs) if getattr(model, "inputs", None) else 1
    in_keys = [next(counter) for _ in range(n_inputs)]
    steps: list[_Step] = []
    out_keys = _trace(model, in_keys, "", steps, counter)
    consumers = collections.Counter(k for s in steps for k in s.inputs)
    consumers.update(out_keys)
    producer = {k: i for i, s in enumerate(steps) for k in s.outputs}
    return _Plan(
        model.name,
        tuple(in_keys),
        tuple(out_keys),
        tuple(steps),
        dict(consumers),
        producer,
    )


# --------------------------------------------------------------------------------------
# Layer taxonomy, shared with `larq_lipschitz.certify`
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Elementwise:
    """An elementwise function: its Lipschitz constant and how to apply it in float64."""

    name: str
    lipschitz: float
    monotone: bool  # non-decreasing, so that f([l, u]) = [f(l), f(u)]
    fn: Callable[[tf.Tensor], tf.Tensor] | None
    quantizer: bool = False  # discontinuous; relaxed to a clipped identity for bounds


def _activation_table() -> dict[Any, _Elementwise]:
    act = tf.keras.activations
    e = _Elementwise
    # Constants of the smooth non-monotone activations are their largest derivatives
    # (swish 1.0998, gelu 1.1289, mish 1.0885), rounded up.
    selu = 1.0507009873554805 * 1.6732632423543772
    table = {
        act.linear: e("linear", 1.0, True, lambda x: x),
        act.relu: e("relu", 1.0, True, tf.nn.relu),
        tf.nn.relu: e("relu", 1.0, True, tf.nn.relu),
        tf.nn.relu6: e("relu6", 1.0, True, tf.nn.relu6),
        act.sigmoid: e("sigmoid", 0.25, True, tf.math.sigmoid),
        tf.math.sigmoid: e("sigmoid", 0.25, True, tf.math.sigmoid),
        act.hard_sigmoid: e("hard_sigmoid", 0.2, True, act.hard_sigmoid),
        act.tanh: e("tanh", 1.0, True, tf.math.tanh),
        tf.math.tanh: e("tanh", 1.0, True, tf.math.tanh),
        act.softplus: e("softplus", 1.0, True, tf.math.softplus),
        act.softsign: e("softsign", 1.0, True, tf.math.softsign),
        act.elu: e("elu", 1.0, True, tf.nn.elu),
        tf.nn.elu: e("elu", 1.0, True, tf.nn.elu),
        act.selu: e("selu", selu, True, tf.nn.selu),
        act.swish: e("swish", 1.1, False, None),
        tf.nn.silu: e("swish", 1.1, False, None),
        act.gelu: e("gelu", 1.13, False, None),
        act.mish: e("mish", 1.09, False, None),
        lq.activations.hard_tanh: e("hard_tanh", 1.0, True, lq.activations.hard_tanh),
        lq.activations.leaky_tanh: e(
            "leaky_tanh", 1.0, True, lq.activations.leaky_tanh
        ),
        act.softmax: e("softmax", 0.5, False, None),
        tf.nn.softmax: e("softmax", 0.5, False, None),
    }
    return table


_ACTIVATIONS: dict[Any, _Elementwise] | None = None


def _activation_spec(fn, where: str) -> _Elementwise:
    global _ACTIVATIONS
    if _ACTIVATIONS is None:
        _ACTIVATIONS = _activation_table()
    spec = _ACTIVATIONS.get(fn)
    if spec is None:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(
            f"{where}: activation {name!r} is not supported (no Lipschitz constant is known "
            "for it here); supported: linear, relu, relu6, sigmoid, hard_sigmoid, tanh, "
            "softplus, softsign, elu, selu, swish, gelu, mish, hard_tanh, leaky_tanh, "
            "final softmax."
        )
    return spec


_SIGN_FUNCTIONS = {
    lq.quantizers.ste_sign: "ste_sign",
    lq.quantizers.approx_sign: "approx_sign",
    lq.quantizers.swish_sign: "swish_sign",
    lq.quantizers.ste_heaviside: "ste_heaviside",
    lq.quantizers.ste_tern: "ste_tern",
    lq.math.sign: "sign",
}
_QUANTIZER_CLASSES = (
    lq.quantizers.SteSign,
    lq.quantizers.ApproxSign,
    lq.quantizers.SwishSign,
    lq.quantizers.SteHeaviside,
    lq.quantizers.SteTern,
    lq.quantizers.DoReFa,
)


def _quantizer_spec(quantizer, where: str) -> _Elementwise | None:
    """The elementwise function a Larq activation quantizer computes, or None."""
    if quantizer is None or isinstance(quantizer, lq.quantizers.NoOp):
        return None
    if isinstance(quantizer, lq.quantizers.MagnitudeAwareSign):
        raise ValueError(
            f"{where}: MagnitudeAwareSign as an input quantizer scales by mean|x| over the "
            "batch and spatial axes, so it is not an elementwise function of one example; "
            "neither a Lipschitz bound nor interval propagation is defined for it."
        )
    if isinstance(quantizer, lq.quantizers.DoReFa) and quantizer.mode != "activations":
        raise ValueError(
            f"{where}: DoReFa in mode {quantizer.mode!r} is not elementwise as an input "
            "quantizer; only mode='activations' is supported."
        )
    if isinstance(quantizer, _QUANTIZER_CLASSES):
        # `call` rather than `__call__`: Keras would cast float64 inputs to float32.
        return _Elementwise(type(quantizer).__name__, 1.0, True, quantizer.call, True)
    if quantizer in _SIGN_FUNCTIONS:
        return _Elementwise(_SIGN_FUNCTIONS[quantizer], 1.0, True, quantizer, True)
    if callable(quantizer):
        return _activation_spec(quantizer, where)
    raise ValueError(f"{where}: quantizer {quantizer!r} is not supported.")


_TRANSPOSED = tuple(
    getattr(tf.keras.layers, n)
    for n in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
    if hasattr(tf.keras.layers, n)
)
_BATCHNORM = (
    tf.keras.layers.BatchNormalization,
    tf.keras.layers.experimental.SyncBatchNormalization,
)
_MAXPOOL = (
    tf.keras.layers.MaxPooling1D,
    tf.keras.layers.MaxPooling2D,
    tf.keras.layers.MaxPooling3D,
)
_AVGPOOL = (
    tf.keras.layers.AveragePooling1D,
    tf.keras.layers.AveragePooling2D,
    tf.keras.layers.AveragePooling3D,
)
_GLOBAL_AVG = (
    tf.keras.layers.GlobalAveragePooling1D,
    tf.keras.layers.GlobalAveragePooling2D,
    tf.keras.layers.GlobalAveragePooling3D,
)
_GLOBAL_MAX = (
    tf.keras.layers.GlobalMaxPooling1D,
    tf.keras.layers.GlobalMaxPooling2D,
    tf.keras.layers.GlobalMaxPooling3D,
)
_IDENTITY_AT_INFERENCE = (
    tf.keras.layers.Dropout,  # includes SpatialDropout1D/2D/3D
    tf.keras.layers.GaussianNoise,
    tf.keras.layers.GaussianDropout,
    tf.keras.layers.AlphaDropout,
    tf.keras.layers.ActivityRegularization,
)
_RESHAPING = (tf.keras.layers.Flatten, tf.keras.layers.Reshape, tf.keras.layers.Permute)
_PADDING = (
    tf.keras.layers.ZeroPadding1D,
    tf.keras.layers.ZeroPadding2D,
    tf.keras.layers.ZeroPadding3D,
    tf.keras.layers.Cropping1D,
    tf.keras.layers.Cropping2D,
    tf.keras.layers.Cropping3D,
)
_ADD_SYMBOLS = ("__operators__.add", "math.add")


def _where(step: _Step) -> str:
    return f"layer {step.name!r} ({type(step.layer).__name__})"


def _kind(step: _Step) -> str:
    """Classify a step; raise a clear error for a layer that cannot be handled."""
    layer = step.layer
    where = _where(step)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        raise ValueError(f"{where}: data_format='channels_first' is not supported.")
    if isinstance(layer, _TRANSPOSED):
        raise ValueError(f"{where}: transposed convolutions are not supported.")
    if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
        return "depthwise_conv"
    if isinstance(
        layer, (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)
    ):
        if int(getattr(layer, "groups", 1)) != 1:
            raise ValueError(
                f"{where}: grouped convolutions (groups > 1) are not supported."
            )
        return "conv"
    if isinstance(layer, tf.keras.layers.Dense):
        return "dense"
    if isinstance(layer, _BATCHNORM):
        return "batchnorm"
    if isinstance(layer, tf.keras.layers.Normalization):
        return "normalization"
    if isinstance(layer, tf.keras.layers.Rescaling):
        return "rescaling"
    if isinstance(layer, lq.quantizers.Quantizer):
        return "quantizer"
    if isinstance(
        layer,
        (
            tf.keras.layers.Activation,
            tf.keras.layers.ReLU,
            tf.keras.layers.LeakyReLU,
            tf.keras.layers.ELU,
            tf.keras.layers.PReLU,
            tf.keras.layers.Softmax,
        ),
    ):
        return "activation"
    if isinstance(layer, _MAXPOOL):
        return "max_pool"
    if isinstance(layer, _AVGPOOL):
        return "avg_pool"
    if isinstance(layer, _GLOBAL_AVG):
        return "global_avg_pool"
    if isinstance(layer, _GLOBAL_MAX):
        return "global_max_pool"
    if isinstance(layer, ShortcutPad):
        return "shortcut_pad"
    if isinstance(layer, _IDENTITY_AT_INFERENCE):
        return "identity"
    if isinstance(layer, _RESHAPING):
        return "reshape"
    if isinstance(layer, _PADDING):
        return "padding"
    if isinstance(layer, tf.keras.layers.Add):
        return "add"
    if isinstance(layer, tf.keras.layers.Subtract):
        return "subtract"
    if isinstance(layer, tf.keras.layers.Average):
        return "average"
    if isinstance(layer, (tf.keras.layers.Maximum, tf.keras.layers.Minimum)):
        return "max_min"
    if isinstance(layer, tf.keras.layers.Concatenate):
        return "concatenate"
    if (
        type(layer).__name__ == "TFOpLambda"
        and getattr(layer, "symbol", None) in _ADD_SYMBOLS
    ):
        for c in step.constants:
            if isinstance(c, str):
                continue
            if not np.all(np.isfinite(np.asarray(c, dtype=np.float64))):
                raise ValueError(f"{where}: adds a non-finite constant.")
        return "add"
    if isinstance(layer, tf.keras.layers.InputLayer):
        return "identity"
    raise ValueError(
        f"{where}: this layer type is not supported by the Lipschitz bound and "
        "certification code; supported are Dense, Conv1D/2D/3D, DepthwiseConv2D (and "
        "their Larq versions), BatchNormalization, Normalization, Rescaling, activations, "
        "pooling, Add, Subtract, Average, Maximum, Minimum, Concatenate, Flatten, Reshape, "
        "Permute, ZeroPadding, Cropping, Dropout-like layers and ShortcutPad."
    )


def _constant_operands(step: _Step) -> list[np.ndarray]:
    return [
        np.asarray(c, dtype=np.float64)
        for c in step.constants
        if not isinstance(c, str)
    ]


def _layer_activation(step: _Step, strip_softmax: bool) -> _Elementwise:
    """The activation fused into a layer (`activation=` argument, or the layer itself)."""
    layer = step.layer
    where = _where(step)
    if isinstance(layer, tf.keras.layers.ReLU):
        if float(layer.threshold) != 0.0:
            raise ValueError(f"{where}: ReLU with threshold != 0 is discontinuous.")
        slope = float(layer.negative_slope)
        max_value = None if layer.max_value is None else float(layer.max_value)

        def relu(x, slope=slope, max_value=max_value):
            y = tf.where(x >= 0, x, slope * x)
            return y if max_value is None else tf.minimum(y, max_value)

        return _Elementwise("relu", max(1.0, abs(slope)), slope >= 0, relu)
    if isinstance(layer, tf.keras.layers.LeakyReLU):
        alpha = float(layer.alpha)
        return _Elementwise(
            "leaky_relu",
            max(1.0, abs(alpha)),
            alpha >= 0,
            lambda x, a=alpha: tf.where(x >= 0, x, a * x),
        )
    if isinstance(layer, tf.keras.layers.ELU):
        alpha = float(layer.alpha)
        return _Elementwise(
            "elu",
            max(1.0, abs(alpha)),
            alpha >= 0,
            lambda x, a=alpha: tf.nn.elu(x) * tf.where(x >= 0, 1.0, a),
        )
    if isinstance(layer, tf.keras.layers.PReLU):
        alpha = np.asarray(layer.alpha.numpy(), dtype=np.float64)

        def prelu(x, a=alpha):
            return tf.where(x >= 0, x, a * x)

        return _Elementwise(
            "prelu",
            max(1.0, float(np.max(np.abs(alpha)))),
            bool(np.all(alpha >= 0)),
            prelu,
        )
    if isinstance(layer, tf.keras.layers.Softmax):
        spec = _Elementwise("softmax", 0.5, False, None)
    else:
        spec = _activation_spec(
            getattr(layer, "activation", tf.keras.activations.linear), where
        )
    if spec.name == "softmax" and strip_softmax:
        return _Elementwise("linear", 1.0, True, lambda x: x)
    return spec


def _final_softmax_steps(plan: _Plan) -> set[int]:
    """Indices of steps whose softmax produces a model output (left out by `to_logits`)."""
    found = set()
    for key in plan.outputs:
        index = plan.producer.get(key)
        if index is None:
            continue
        layer = plan.steps[index].layer
        if isinstance(layer, tf.keras.layers.Softmax) or (
            getattr(layer, "activation", None)
            in (tf.keras.activations.softmax, tf.nn.softmax)
        ):
            found.add(index)
    return found


def _input_quantizer(step: _Step) -> _Elementwise | None:
    layer = step.layer
    return _quantizer_spec(getattr(layer, "input_quantizer", None), _where(step))


def _bn_gain_shift(layer) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BatchNorm as `y = gain * x + shift` per channel (gain is signed)."""
    var = np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
    mean = np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
    gamma = (
        np.ones_like(var)
        if layer.gamma is None
        else np.asarray(layer.gamma.numpy(), np.float64)
    )
    beta = (
        np.zeros_like(var)
        if layer.beta is None
        else np.asarray(layer.beta.numpy(), np.float64)
    )
    gain = gamma / np.sqrt(var + float(layer.epsilon))
    return gain, beta - gain * mean


def _bn_channel_axis_is_last(step: _Step) -> bool:
    axis = list(step.layer.axis)
    shape = step.input_shapes[0] if step.input_shapes else None
    if shape is None:
        return axis == [-1]
    return len(axis) == 1 and axis[0] in (-1, len(shape) - 1)


def _find_folds(plan: _Plan) -> dict[int, int]:
    """Pairs {linear step index: BatchNorm step index} where the BN can be folded in."""
    folds = {}
    for j, step in enumerate(plan.steps):
        if _kind_safe(step) != "batchnorm" or not _bn_channel_axis_is_last(step):
            continue
        (key,) = step.inputs
        i = plan.producer.get(key)
        if i is None or plan.consumers.get(key, 0) != 1:
            continue
        prev = plan.steps[i]
        if _kind_safe(prev) not in ("dense", "conv", "depthwise_conv"):
            continue
        if (
            prev.layer.activation is not tf.keras.activations.linear
            or len(prev.outputs) != 1
        ):
            continue
        folds[i] = j
    return folds


def _kind_safe(step: _Step) -> str | None:
    try:
        return _kind(step)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# Norms of one layer's effective kernel
# --------------------------------------------------------------------------------------


def _kernel64(layer) -> np.ndarray:
    return np.asarray(effective_kernel(layer).numpy(), dtype=np.float64)


def _spectral_norms(matrices: np.ndarray) -> np.ndarray:
    """Largest singular value of each matrix in a stack `(..., m, n)`, exactly.

    Computed from the eigenvalues of the smaller Gram matrix, in float64 and in one
    batched LAPACK call.
    """
    m = np.asarray(matrices, dtype=np.float64)
    if m.size == 0:
        return np.zeros(m.shape[:-2])
    t = np.swapaxes(m, -1, -2)
    gram = t @ m if m.shape[-2] >= m.shape[-1] else m @ t
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[..., -1], 0.0))


def _spectral_norm(matrix: np.ndarray) -> float:
    """Largest singular value of one matrix, exactly."""
    return float(_spectral_norms(matrix))


def _output_gain(kernel: np.ndarray, kind: str, gain: np.ndarray | None) -> np.ndarray:
    """The kernel with each output unit scaled by the folded BatchNorm gain."""
    if gain is None:
        return kernel
    if kind == "depthwise_conv":
        kh_kw = kernel.shape[:-2]
        c, mult = kernel.shape[-2:]
        return kernel * gain.reshape(c, mult).reshape((1,) * len(kh_kw) + (c, mult))
    return kernel * gain  # output axis last


_LAYOUT = {"dense": "dense", "conv": "conv", "depthwise_conv": "depthwise"}


def _row_l1_inf(kernel: np.ndarray, kind: str) -> float:
    """max over output units of the L1 norm of the unit's weights (`||W||_{inf->inf}`)."""
    return float(norms.l1inf_norm(tf.constant(kernel, tf.float64), _LAYOUT[kind]))


def _taps_per_input(layer) -> int:
    """At most how many kernel taps of one output channel read a given input position.

    Along a spatial axis with kernel size k, stride s and dilation d, the taps j that
    reach input i satisfy j*d = i + pad (mod s): one residue class mod s/gcd(s, d).
    """
    m = 1
    for k, s, d in zip(
        layer.kernel_size, layer.strides, layer.dilation_rate, strict=False
    ):
        period = int(s) // math.gcd(int(s), int(d))
        m *= min(int(k), -(-int(k) // period))
    return m


def _conv_l2(kernel: np.ndarray, kind: str, layer) -> tuple[float, float, float]:
    """Sound 2-norm bound of a conv operator; also the two quantities it is made of.

    Returns `(bound, patch, taps)` with `patch = sqrt(m) * ||W_r||_2` (W_r the kernel
    reshaped to (taps * c_in, c_out); every input is read by at most m output positions
    per channel) and `taps = sum_t ||W_t||_2` (one matrix per tap; the conv is a sum of
    shifted 1x1 convs). Both are upper bounds of the operator norm; bound = min of them.
    """
    m = _taps_per_input(layer)
    n_taps = int(np.prod(kernel.shape[:-2]))
    if kind == "depthwise_conv":
        c, mult = kernel.shape[-2:]
        per_channel = kernel.reshape(n_taps, c, mult).transpose(
            1, 0, 2
        )  # (c, taps, mult)
        patch = _spectral_norms(per_channel) * math.sqrt(m)
        taps = np.sum(np.linalg.norm(per_channel, axis=2), axis=1)
        bound = float(np.max(np.minimum(patch, taps)))
        return bound, float(np.max(patch)), float(np.max(taps))
    c_in, c_out = kernel.shape[-2:]
    patch = math.sqrt(m) * _spectral_norm(kernel.reshape(n_taps * c_in, c_out))
    taps = float(np.sum(_spectral_norms(kernel.reshape(n_taps, c_in, c_out))))
    return min(patch, taps), patch, taps


def _reshaped_spectral(kernel: np.ndarray, kind: str) -> float:
    """Spectral norm of the kernel as a (units, fan_in) row matrix: NOT a conv operator norm.

    The same quantity as `larq_lipschitz.norms.spectral_norm` with the layer's layout.
    """
    return float(norms.spectral_norm(tf.constant(kernel, tf.float64), _LAYOUT[kind]))


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------


def _pool_matrix_1d(n: int, k: int, s: int, padding: str) -> np.ndarray:
    """Average pooling along one axis as a matrix, dividing by the valid cells (Keras)."""
    if padding == "same":
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        before = total // 2
    else:
        out = (n - k) // s + 1
        before = 0
    a = np.zeros((max(out, 0), n))
    for o in range(out):
        lo, hi = max(o * s - before, 0), min(o * s - before + k, n)
        a[o, lo:hi] = 1.0 / (hi - lo)
    return a


def _pool_bound(step: _Step, kind: str, norm: str) -> tuple[float, str]:
    layer = step.layer
    shape = step.input_shapes[0] if step.input_shapes else None
    spatial = None if shape is None else shape[1:-1]
    if norm == "inf" or kind == "global_max_pool":
        return 1.0, ""
    if kind == "global_avg_pool":
        if spatial is None or any(d is None for d in spatial):
            return 1.0, "spatial size unknown: 1 used instead of 1/sqrt(H*W)"
        return 1.0 / math.sqrt(float(np.prod(spatial))), "1/sqrt(number of positions)"
    pools, strides = layer.pool_size, layer.strides
    if kind == "max_pool":
        m = int(
            np.prod(
                [-(-int(k) // int(s)) for k, s in zip(pools, strides, strict=False)]
            )
        )
        return math.sqrt(m), "sqrt(windows per input)" if m > 1 else ""
    padding = layer.padding.lower()
    if spatial is not None and all(d is not None for d in spatial):
        b = 1.0
        for n, k, s in zip(spatial, pools, strides, strict=False):
            b *= _spectral_norm(_pool_matrix_1d(int(n), int(k), int(s), padding))
        return b, "exact (separable pooling matrix)"
    b = math.sqrt(
        float(
            np.prod(
                [-(-int(k) // int(s)) for k, s in zip(pools, strides, strict=False)]
            )
        )
    )
    return b, "spatial size unknown: sqrt(windows per input) used"


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerBound:
    """One row of a `BoundReport`.

    # Arguments
        name: the layer's name (prefixed with nested model names, "inner/conv").
        kind: what the layer was taken for ("conv", "batchnorm (folded)", "add", ...).
        bound: the layer's own Lipschitz constant in the report's norm (for merges, that
            of the map from all stacked inputs to the output).
        cumulative: the bound of the map from the network input to this layer's output.
        notes: how the number was obtained.
    """

    name: str
    kind: str
    bound: float
    cumulative: float
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class BoundReport:
    """A network's Lipschitz bound and how it was composed.

    # Arguments
        norm: "inf" or "2"; the same norm is used on the input and the output.
        network_bound: bound of the whole network (of its logits when a final softmax
            was left out); with several outputs, of their concatenation.
        output_bounds: one bound per model output.
        layers: one `LayerBound` per layer call, in graph order.
        relaxation: how sign activations were treated, in words.
        model_name: the model's name.
    """

    norm: str
    network_bound: float
    output_bounds: tuple[float, ...]
    layers: tuple[LayerBound, ...]
    relaxation: str = RELAXATION
    model_name: str = ""

    def to_dict(self) -> dict:
        """Plain Python values, ready for `json.dump`."""
        return {
            "model": self.model_name,
            "norm": self.norm,
            "network_bound": float(self.network_bound),
            "output_bounds": [float(b) for b in self.output_bounds],
            "relaxation": self.relaxation,
            "layers": [dataclasses.asdict(r) for r in self.layers],
        }


def _parse_norm(norm) -> str:
    text = str(norm).strip().lower()
    if text in ("inf", "infinity", "linf", "l_inf", "max"):
        return "inf"
    if text in ("2", "2.0", "l2", "spectral"):
        return "2"
    raise ValueError(f"lipschitz_bound: norm must be 'inf' or '2', got {norm!r}.")


def _merge(kind: str, norm: str, values: list[float]) -> tuple[float, float, str]:
    """(own bound as a map of the stacked inputs, composed bound, notes) of a merge."""
    n = len(values)
    if kind in ("add", "subtract"):
        own = float(n) if norm == "inf" else math.sqrt(n)
        return own, float(sum(values)), "sum of the branch bounds"
    if kind == "average":
        own = 1.0 if norm == "inf" else 1.0 / math.sqrt(n)
        return own, float(sum(values)) / n, "mean of the branch bounds"
    # concatenate and elementwise max / min: |max(a,b) - max(a',b')| <= max(|a-a'|, |b-b'|)
    if norm == "inf":
        return 1.0, float(max(values)), "max of the branch bounds"
    return (
        1.0,
        math.sqrt(sum(v * v for v in values)),
        "sqrt of the sum of squared branch bounds",
    )


def _linear_bound(
    step: _Step, kind: str, norm: str, gain: np.ndarray | None
) -> tuple[float, list[str]]:
    layer = step.layer
    kernel = _output_gain(_kernel64(layer), kind, gain)
    notes = []
    quant = kernel_quantizer(layer)
    if quant is not None:
        notes.append(f"kernel {getattr(quant, '__name__', type(quant).__name__)}(W)")
    if norm == "inf":
        return _row_l1_inf(kernel, kind), notes + ["max row L1 norm"]
    if kind == "dense":
        return _spectral_norm(kernel), notes + ["spectral norm (exact)"]
    bound, patch, taps = _conv_l2(kernel, kind, layer)
    notes.append(
        f"conv operator bound min(sqrt(m)*||W_reshaped||_2 = {patch:.6g}, "
        f"sum over taps ||W_tap||_2 = {taps:.6g}); the reshaped-kernel spectral norm "
        "alone is not the conv operator norm"
    )
    return bound, notes


def _evaluate(plan: _Plan, norm: str, to_logits: bool) -> BoundReport:
    value: dict[int, float] = {k: 1.0 for k in plan.inputs}
    folds = _find_folds(plan)
    folded_into = {j: i for i, j in folds.items()}
    final_softmax = _final_softmax_steps(plan) if to_logits else set()
    rows = []
    for index, step in enumerate(plan.steps):
        kind = _kind(step)
        where = _where(step)
        ins = [value[k] for k in step.inputs]
        notes: list[str] = []
        label = kind
        if kind in ("add", "subtract", "average", "max_min", "concatenate"):
            own, out, note = _merge(kind, norm, ins)
            notes.append(note)
        else:
            if len(ins) != 1:
                raise ValueError(f"{where}: expected one input tensor, got {len(ins)}.")
            own = 1.0
            if kind in ("dense", "conv", "depthwise_conv"):
                spec = _input_quantizer(step)
                if spec is not None:
                    notes.append(
                        f"input quantizer {spec.name} relaxed to clip(x, -1, 1)"
                    )
                    own *= spec.lipschitz
                gain = None
                if index in folds:
                    bn = plan.steps[folds[index]]
                    gain, _ = _bn_gain_shift(bn.layer)
                    notes.append(f"BatchNorm {bn.name!r} folded in")
                b, more = _linear_bound(step, kind, norm, gain)
                own *= b
                notes += more
                act = _layer_activation(step, index in final_softmax)
                if act.name != "linear" or index in final_softmax:
                    own *= act.lipschitz
                    notes.append(
                        "final softmax left out (bound of the logits)"
                        if index in final_softmax
                        else f"activation {act.name} (Lipschitz {act.lipschitz:g})"
                    )
            elif kind == "batchnorm":
                if index in folded_into:
                    label = "batchnorm (folded)"
                    notes.append(f"folded into {plan.steps[folded_into[index]].name!r}")
                else:
                    gain, _ = _bn_gain_shift(step.layer)
                    own = float(np.max(np.abs(gain)))
                    notes.append("max |gamma| / sqrt(var + eps), inference mode")
            elif kind == "normalization":
                var = np.asarray(step.layer.variance, dtype=np.float64)
                std = np.maximum(np.sqrt(var), _EPSILON_KERAS)
                own = (
                    float(np.max(std))
                    if step.layer.invert
                    else float(np.max(1.0 / std))
                )
                notes.append("max std (invert)" if step.layer.invert else "1 / min std")
            elif kind == "rescaling":
                own = float(
                    np.max(np.abs(np.asarray(step.layer.scale, dtype=np.float64)))
                )
                notes.append("|scale|")
            elif kind == "quantizer":
                spec = _quantizer_spec(step.layer, where)
                own = 1.0
                if spec is None:
                    notes.append("identity quantizer")
                else:
                    notes.append(f"{spec.name} relaxed to clip(x, -1, 1)")
            elif kind == "activation":
                act = _layer_activation(step, index in final_softmax)
                own = act.lipschitz
                if index in final_softmax:
                    notes.append("final softmax left out (bound of the logits)")
                else:
                    notes.append(f"{act.name}")
            elif kind in ("max_pool", "avg_pool", "global_avg_pool", "global_max_pool"):
                own, note = _pool_bound(step, kind, norm)
                if note:
                    notes.append(note)
            else:  # identity, reshape, padding, shortcut_pad
                own = 1.0
            out = ins[0] * own
        rows.append(
            LayerBound(step.name, label, float(own), float(out), "; ".join(notes))
        )
        for k in step.outputs:
            value[k] = out
    outputs = tuple(float(value[k]) for k in plan.outputs)
    if norm == "inf":
        network = max(outputs)
    else:
        network = math.sqrt(sum(b * b for b in outputs))
    relaxation = RELAXATION
    if len(plan.inputs) > 1:
        relaxation += " Several inputs are taken together as one concatenated input."
    return BoundReport(
        norm, float(network), outputs, tuple(rows), relaxation, plan.model_name
    )


def lipschitz_bound(
    model: tf.keras.Model, norm: str = "inf", *, to_logits: bool = True
) -> BoundReport:
    """An upper bound of the network's Lipschitz constant, composed along its graph.

    For every layer `f_k` a bound `L_k` with `||f_k(x) - f_k(y)|| <= L_k ||x - y||` is
    computed from the deployed (quantized) weights, and the bounds are composed along
    the graph: products along a path, sums over the branches of an `Add`.

    Infinity norm (`norm="inf"`): a dense or conv layer gives `max_o ||q(W)_o||_1`, the
    largest L1 norm of any output unit's weights (exact for the layer); with the
    BatchNorm that follows folded in, `max_o g_o ||q(W)_o||_1`,
    `g_o = |gamma_o| / sqrt(var_o + eps)`.

    2-norm (`norm="2"`): a dense layer gives its exact spectral norm. For a conv the
    spectral norm of the reshaped kernel is *not* the operator norm; the sound bound
    `min(sqrt(m) ||W_r||_2, sum_t ||W_t||_2)` is used, where `W_r` is the kernel
    reshaped to `(taps * c_in, c_out)`, `m` the largest number of taps that read one
    input position (`prod ceil(k / (s / gcd(s, d)))`, so `kh*kw` at stride 1) and `W_t`
    the `(c_in, c_out)` matrix of one tap. Average pooling uses the exact norm of its
    (separable) matrix, global average pooling `1/sqrt(H*W)`, max pooling with
    overlapping windows `sqrt(windows per input)`.

    Other layers: Normalization `1/min std`, Rescaling `|scale|`, BatchNorm alone
    `max g_c`, ReLU / hard tanh / tanh / pooling (inf) / Flatten / ZeroPadding /
    ShortcutPad / Dropout 1, sigmoid 1/4, softmax 1/2; `Concatenate` takes the max (inf)
    or root sum of squares (2) of its branches. Unknown layers raise an error. Sign
    activations are relaxed as described in `RELAXATION`.

    # Arguments
        model: a built functional or Sequential Keras / Larq / larq-zoo model (nested
            models are walked through).
        norm: "inf" or "2".
        to_logits: leave out a softmax that ends the model (a Softmax / Activation layer
            or a layer with `activation="softmax"`), so that the bound is that of the
            logits. With `False` it counts with its Lipschitz constant 1/2.

    # Returns
        A `BoundReport`; `report.network_bound` is the number.

    # Raises
        ValueError: for an unknown layer type (the message names the layer and its
            class), an unsupported quantizer or activation, or a model that is not built.

    # Example
    ```python
    model = tf.keras.Sequential(
        [tf.keras.Input((4,)), tf.keras.layers.Dense(3, kernel_initializer="ones")]
    )
    assert lipschitz_bound(model, "inf").network_bound == 4.0
    ```
    """
    return _evaluate(_build_plan(model), _parse_norm(norm), bool(to_logits))


# --------------------------------------------------------------------------------------
# The L1,inf / spectral comparison
# --------------------------------------------------------------------------------------


def _comparison_rows(plan: _Plan) -> list[dict]:
    folds = _find_folds(plan)
    rows = []
    for index, step in enumerate(plan.steps):
        kind = _kind(step)
        if kind not in ("dense", "conv", "depthwise_conv") or not is_binarized(
            step.layer
        ):
            continue
        layer = step.layer
        quant = kernel_quantizer(layer)
        kernel = _kernel64(layer)
        l1 = _row_l1_inf(kernel, kind)
        spec = _reshaped_spectral(kernel, kind)
        fan_in = (
            int(np.prod(kernel.shape[:-2]))
            if kind == "depthwise_conv"
            else int(np.prod(kernel.shape[:-1]))
        )
        row = {
            "layer": step.name,
            "kind": kind,
            "kernel_shape": [int(d) for d in kernel.shape],
            "kernel_quantizer": getattr(quant, "__name__", type(quant).__name__),
            "binary": getattr(quant, "precision", None) == 1,
            "fan_in": fan_in,
            "l1_inf": l1,
            "spectral": spec,
            "ratio": l1 / spec if spec > 0 else math.inf,
            "operator_l2": _conv_l2(kernel, kind, layer)[0]
            if kind != "dense"
            else spec,
            "batchnorm": None,
            "l1_inf_folded": None,
            "spectral_folded": None,
            "ratio_folded": None,
        }
        if index in folds:
            bn = plan.steps[folds[index]]
            gain, _ = _bn_gain_shift(bn.layer)
            folded = _output_gain(kernel, kind, gain)
            l1f, specf = _row_l1_inf(folded, kind), _reshaped_spectral(folded, kind)
            row.update(
                batchnorm=bn.name,
                l1_inf_folded=l1f,
                spectral_folded=specf,
                ratio_folded=l1f / specf if specf > 0 else math.inf,
            )
        rows.append(row)
    return rows


def bound_comparison(model: tf.keras.Model) -> list[dict]:
    """The L1,inf bound against the spectral bound, for every quantized-kernel layer.

    For each layer with a kernel quantizer (Larq QuantDense / QuantConv / QuantDepthwise)
    both norms are computed on the same effective weights `q(W)` reshaped to
    `(fan_in, units)`:

        l1_inf   = max_o sum_i |q(W)[i, o]|        (the infinity-norm bound)
        spectral = sigma_max(q(W))                 (the reshaped-kernel spectral norm)
        ratio    = l1_inf / spectral

    Since a row's L1 norm is at most `sqrt(fan_in)` times its L2 norm, which is at most
    `spectral`, the ratio lies in `(0, sqrt(fan_in)]`. For a conv, `spectral` is the
    quantity usually penalized, not the conv operator norm; the sound operator bound is
    given as `operator_l2`. When a BatchNorm follows and can be folded, the same numbers
    for the folded kernel `g_o q(W)_o` are given in the `*_folded` fields.

    # Arguments
        model: a built Keras / Larq model.

    # Returns
        A list of plain dicts, one per quantized layer, in graph order, with keys
        `layer, kind, kernel_shape, kernel_quantizer, binary, fan_in, l1_inf, spectral,
        ratio, operator_l2, batchnorm, l1_inf_folded, spectral_folded, ratio_folded`.

    # Example
    ```python
    import larq as lq
    model = tf.keras.Sequential([
        tf.keras.Input((8,)),
        lq.layers.QuantDense(4, kernel_quantizer="ste_sign", kernel_constraint="weight_clip"),
    ])
    (row,) = bound_comparison(model)
    assert row["l1_inf"] == 8.0  # every binary row has L1 norm fan_in
    ```
    """
    return _comparison_rows(_build_plan(model))


_CSV_FIELDS = (
    "layer",
    "kind",
    "kernel_shape",
    "kernel_quantizer",
    "binary",
    "fan_in",
    "l1_inf",
    "spectral",
    "ratio",
    "operator_l2",
    "batchnorm",
    "l1_inf_folded",
    "spectral_folded",
    "ratio_folded",
)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_bounds_report(
    model: tf.keras.Model, out_dir: str | pathlib.Path
) -> dict[str, pathlib.Path]:
    """Write `bounds.json` and `bounds.csv` for `model` into `out_dir`.

    `bounds.json` holds both `BoundReport`s (`"inf"`, `"2"`, with their per-layer rows)
    and the `bound_comparison` rows (`"comparison"`); `bounds.csv` holds the comparison
    table, one row per quantized layer (`kernel_shape` written as `3x3x64x64`).

    # Arguments
        model: a built Keras / Larq model.
        out_dir: folder to write into (created if missing).

    # Returns
        `{"json": path, "csv": path}`.

    # Example
    ```python
    paths = write_bounds_report(model, "runs/r1")
    ```
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _build_plan(model)
    data = {
        "inf": _evaluate(plan, "inf", True).to_dict(),
        "2": _evaluate(plan, "2", True).to_dict(),
        "comparison": _comparison_rows(plan),
    }
    json_path, csv_path = out / "bounds.json", out / "bounds.csv"
    json_path.write_text(
        json.dumps(_json_safe(data), indent=2) + "\n", encoding="utf-8"
    )
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in data["comparison"]:
            row = dict(row, kernel_shape="x".join(str(d) for d in row["kernel_shape"]))
            writer.writerow({k: "" if row[k] is None else row[k] for k in _CSV_FIELDS})
    log.info("wrote %s and %s", json_path, csv_path)
    return {"json": json_path, "csv": csv_path}


# --------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class LipschitzBoundLogger(tf.keras.callbacks.Callback):
    """Log the network's Lipschitz bounds (infinity and 2-norm) at the end of each epoch.

    No data is needed: the bounds are computed from the current weights (and BatchNorm
    moving statistics) as in `lipschitz_bound`. The graph is walked once and cached; each
    epoch only recomputes the per-layer norms. The values are added to the epoch `logs`
    as `lipschitz_inf` and `lipschitz_2` (so `History`, `CSVLogger` and later callbacks
    see them), appended to `self.history`, and written as TensorBoard scalars
    `lipschitz/inf` and `lipschitz/2` when `log_dir` is given.

    # Arguments
        log_dir: folder for a TensorBoard event file, or None for no file.

    # Example
    ```python
    logger = LipschitzBoundLogger(log_dir="runs/r1/bounds")
    model.fit(x, y, epochs=3, callbacks=[logger])
    print(logger.history[-1]["lipschitz_inf"])
    ```
    """

    def __init__(self, log_dir: str | None = None):
        super().__init__()
        if log_dir is not None and not isinstance(log_dir, (str, pathlib.PurePath)):
            raise ValueError(
                f"LipschitzBoundLogger: log_dir must be a path or None, got {log_dir!r}."
            )
        self.log_dir = None if log_dir is None else str(log_dir)
        self.history: list[dict] = []
        self._plan: _Plan | None = None
        self._writer = None

    def set_model(self, model):
        super().set_model(model)
        self._plan = None

    def bounds(self) -> dict[str, float]:
        """The current bounds, `{"lipschitz_inf": ..., "lipschitz_2": ...}`."""
        if self._plan is None:
            # A training wrapper (such as LCRModel) exposes the network it trains.
            self._plan = _build_plan(getattr(self.model, "student", self.model))
        return {
            "lipschitz_inf": _evaluate(self._plan, "inf", True).network_bound,
            "lipschitz_2": _evaluate(self._plan, "2", True).network_bound,
        }

    def on_epoch_end(self, epoch, logs=None):
        try:
            values = self.bounds()
        except np.linalg.LinAlgError:  # non-finite weights: training has diverged
            values = {"lipschitz_inf": float("nan"), "lipschitz_2": float("nan")}
        if logs is not None:
            logs.update(values)
        self.history.append({"epoch": int(epoch), **values})
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                tf.summary.scalar("lipschitz/inf", values["lipschitz_inf"], step=epoch)
                tf.summary.scalar("lipschitz/2", values["lipschitz_2"], step=epoch)
            self._writer.flush()
        log.debug("epoch %d: %s", epoch, values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def get_config(self) -> dict:
        return {"log_dir": self.log_dir}

    @classmethod
    def from_config(cls, config: dict) -> LipschitzBoundLogger:
        return cls(**config)
