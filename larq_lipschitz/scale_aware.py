"""Scale-aware Lipschitz control: the bound of a (binarized) layer and its BatchNorm.

A BatchNorm in inference mode scales channel `o` by

    g_o = |gamma_o| / sqrt(var_o + eps).

Folded into the conv or dense layer before it, the exact infinity-norm bound of the
block is

    L = max_o g_o * ||q(W)_o||_1

with `q` the layer's actual kernel quantizer (`larq_lipschitz.quantization`). A penalty
on the kernel alone cannot lower `L`: scaling `W_o` scales the channel's spread by the
same factor and BatchNorm divides it back out, and for an unscaled sign
`||q(W)_o||_1 = n` is a constant anyway. This module penalizes `L` itself and reports
it per layer.

**Which variance.** The deployed network uses BatchNorm's moving variance; training
normalizes with the batch variance, and the true dependence of `L` on the kernel goes
through it. Two choices are offered by `add_scale_aware_penalty`:

- `statistics="batch"` (default): `var_o` is the variance of the BatchNorm's input over
  the current batch, so the gradient sees that `L` does not depend on the kernel's
  scale and moves only what does change it: `gamma`, and the kernel's direction
  relative to the data. It is computed from the output of the layer that feeds the
  BatchNorm, in that layer's own forward pass.
  Under a `MirroredStrategy` each replica uses its own part of the batch (as a BatchNorm
  without `synchronized=True` does), or the whole global batch when the BatchNorm is
  synchronized (as BatchNorm itself then does). `model.evaluate` reports the penalty with the
  statistics of the evaluation batches.
- `statistics="moving"`: `var_o` is the moving variance. It lags the kernel, so a
  gradient through the kernel would keep shrinking a scale that BatchNorm undoes (the
  collapse seen with plain kernel penalties); the kernel factor is therefore held
  constant and the penalty acts through `gamma` only. Simpler, and its value is the
  deployed bound, but it cannot use the kernel's direction.

**Straight-through gradients.** `||q(W)_o||_1` is differentiated through the quantizer's
own gradient. For `magnitude_aware_sign` that reaches the latent kernel (Larq stops
the gradient of the scale itself, so the signal is the clipped-identity one). For an
unscaled sign the deployed row norm is the constant `n`, yet the straight-through
estimator would pass `sign(W)` back to the latent weights and shrink them for nothing;
the package holds that factor constant, so the penalty acts only through `gamma` and
the variance.

**Blocks.** A block is a kernel layer (`Dense`, `Conv1D/2D/3D`, depthwise, and their
Larq versions) whose output reaches a `BatchNormalization` on the last axis as its only
consumer, possibly through channel-wise 1-Lipschitz layers (max/average pooling,
dropout, ReLU): those keep `L` a valid bound (exact without them). A kernel layer with
no such BatchNorm is a block on its own, `L = max_o ||q(W)_o||_1`. Separable, transposed
and locally connected layers are not handled. Nested models are searched, each graph on
its own (a BatchNorm outside the nested model that holds the conv is not found).

Both need a functional or Sequential model (the graph says which BatchNorm follows
which layer). The penalty is a training-time attachment: each block's host layer gets
an instance-level wrapper around its `call` that adds the penalty with `add_loss`. It
is not part of any layer config, so `.keras`, `.h5` and SavedModel files and
`clone_model` copies never carry it; call `add_scale_aware_penalty` again after loading
to resume training with it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from larq_lipschitz import norms
from larq_lipschitz.constraints import L1InfConstraint
from larq_lipschitz.quantization import (
    effective_kernel,
    is_binarized,
    kernel_layout,
    kernel_quantizer,
    kernel_variable,
    quantizer_kind,
)
from larq_lipschitz.regularizers import L1InfLipschitz, SpectralNormLipschitz

import tensorflow as tf

log = logging.getLogger(__name__)

STATISTICS = ("batch", "moving")
LAYER_SETS = ("binarized", "all")

_PASS_THROUGH = tuple(
    cls
    for cls in (
        getattr(tf.keras.layers, name, None)
        for name in (
            "MaxPooling1D",
            "MaxPooling2D",
            "MaxPooling3D",
            "AveragePooling1D",
            "AveragePooling2D",
            "AveragePooling3D",
            "GlobalMaxPooling1D",
            "GlobalMaxPooling2D",
            "GlobalMaxPooling3D",
            "GlobalAveragePooling1D",
            "GlobalAveragePooling2D",
            "GlobalAveragePooling3D",
            "Dropout",
            "SpatialDropout1D",
            "SpatialDropout2D",
            "SpatialDropout3D",
        )
    )
    if cls is not None
)


@dataclasses.dataclass(frozen=True)
class Block:
    """A kernel layer, the BatchNorm that normalizes its output (or None), and the
    channel-wise 1-Lipschitz layers between them."""

    layer: tf.keras.layers.Layer
    batchnorm: tf.keras.layers.BatchNormalization | None = None
    between: tuple[tf.keras.layers.Layer, ...] = ()

    @property
    def host(self) -> tf.keras.layers.Layer:
        """The layer whose output the BatchNorm normalizes."""
        return self.between[-1] if self.between else self.layer


def _is_pass_through(layer) -> bool:
    if isinstance(layer, _PASS_THROUGH):
        return True
    if isinstance(layer, tf.keras.layers.ReLU):
        return float(layer.negative_slope) <= 1.0
    if type(layer) is tf.keras.layers.Activation:
        return getattr(layer.activation, "__name__", "") in ("relu", "linear")
    return False


def _graph_models(model) -> list[tf.keras.Model]:
    """The model and every nested model, each with its own layer graph."""
    found, stack = [], [model]
    while stack:
        current = stack.pop()
        if any(current is m for m in found):
            continue
        found.append(current)
        stack.extend(
            layer for layer in current.layers if isinstance(layer, tf.keras.Model)
        )
    return found


def _all_layers(model) -> list[tf.keras.layers.Layer]:
    layers = []
    for current in _graph_models(model):
        layers.extend(
            layer for layer in current.layers if not isinstance(layer, tf.keras.Model)
        )
    return layers


def _consumers(model) -> dict[int, list] | None:
    """Map id(layer) -> consuming layers in `model`'s own graph (None if no graph).

    A layer whose output is also a model output gets the model itself as a consumer.
    """
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        return None
    consumers: dict[int, list] = {}
    for nodes in nodes_by_depth.values():
        for node in nodes:
            for parent in node.parent_nodes:
                consumers.setdefault(id(parent.layer), []).append(node.layer)
    for output in model.outputs or []:
        history = getattr(output, "_keras_history", None)
        if history is not None:
            consumers.setdefault(id(history.layer), []).append(model)
    return consumers


def _follow(
    layer, consumers
) -> tuple[tf.keras.layers.BatchNormalization | None, tuple]:
    between = []
    current = layer
    while True:
        users = consumers.get(id(current), [])
        if len(users) != 1:
            return None, ()
        user = users[0]
        if isinstance(user, tf.keras.layers.BatchNormalization):
            return user, tuple(between)
        if not _is_pass_through(user):
            return None, ()
        between.append(user)
        current = user


def _bn_on_last_axis(bn, host) -> bool:
    axis = bn.axis if isinstance(bn.axis, list | tuple) else [bn.axis]
    rank = len(host.output_shape) if hasattr(host, "output_shape") else None
    if rank is None or len(axis) != 1:
        return False
    return axis[0] in (-1, rank - 1)


def find_blocks(model: tf.keras.Model, layers: str = "binarized") -> list[Block]:
    """The blocks of `model`: each kernel layer with the BatchNorm that follows it.

    # Arguments
        model: a built functional or Sequential Keras model (nested ones included).
        layers: `"binarized"` for Larq layers with a kernel quantizer (the default),
            `"all"` for every supported kernel layer.

    # Returns
        A list of `Block`, in layer order.

    # Raises
        ValueError: for an unknown `layers` value or a model without a layer graph
            (a subclassed or unbuilt model).

    # Example
    ```python
    for block in find_blocks(model):
        print(block.layer.name, block.batchnorm and block.batchnorm.name)
    ```
    """
    if layers not in LAYER_SETS:
        raise ValueError(
            f"find_blocks: layers must be one of {LAYER_SETS}, got {layers!r}."
        )
    blocks = []
    for current in _graph_models(model):
        consumers = _consumers(current)
        if consumers is None:
            raise ValueError(
                f"find_blocks: model {current.name!r} has no layer graph (a subclassed or "
                "unbuilt model); the BatchNorm after each layer cannot be found. Build a "
                "functional or Sequential model with an Input."
            )
        for layer in current.layers:
            if kernel_layout(layer) is None or kernel_variable(layer) is None:
                continue
            if layers == "binarized" and not is_binarized(layer):
                continue
            bn, between = _follow(layer, consumers)
            if bn is not None and not _bn_on_last_axis(
                bn, between[-1] if between else layer
            ):
                bn, between = None, ()
            blocks.append(Block(layer, bn, between))
    return blocks


def _gain(bn, variance) -> tf.Tensor:
    variance = tf.cast(variance, tf.float32)
    gamma = (
        tf.abs(tf.cast(bn.gamma, tf.float32)) if bn.scale else tf.ones_like(variance)
    )
    return gamma / tf.sqrt(variance + bn.epsilon)


def folded_row_bounds(
    layer: tf.keras.layers.Layer,
    batchnorm: tf.keras.layers.BatchNormalization | None = None,
    variance=None,
    hold_kernel: bool = False,
) -> tf.Tensor:
    """Per-output-channel bounds `g_o * ||q(W)_o||_1` of a layer and its BatchNorm.

    # Arguments
        layer: a built kernel layer (see `larq_lipschitz.quantization.kernel_layout`).
        batchnorm: the BatchNormalization that follows it, or None (then `g_o = 1`).
        variance: the per-channel variance to use in `g_o`; None for the BatchNorm's
            moving variance.
        hold_kernel: hold `||q(W)_o||_1` constant for the gradient. It is always held
            for quantizers of constant row norm (`quantizer_kind == "constant"`).

    # Returns
        A float32 tensor with one bound per output channel.

    # Raises
        ValueError: for an unsupported layer, or a BatchNorm whose channel count differs
            from the layer's.
    """
    layout = kernel_layout(layer)
    if layout is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) is not a supported kernel layer."
        )
    kernel = tf.cast(effective_kernel(layer), tf.float32)
    bounds = norms.row_l1_norms(kernel, layout)
    if hold_kernel or quantizer_kind(kernel_quantizer(layer)) == "constant":
        bounds = tf.stop_gradient(bounds)
    if batchnorm is None:
        return bounds
    if variance is None:
        variance = batchnorm.moving_variance
    gain = _gain(batchnorm, variance)
    if gain.shape[0] is not None and bounds.shape[0] is not None:
        if gain.shape[0] != bounds.shape[0]:
            raise ValueError(
                f"BatchNorm {batchnorm.name!r} has {gain.shape[0]} channels but layer "
                f"{layer.name!r} has {bounds.shape[0]} output channels."
            )
    return gain * bounds


def effective_bounds(model: tf.keras.Model, layers: str = "all") -> dict[str, float]:
    """The deployed infinity-norm bound of every block, by layer name.

    For each kernel layer: `max_o g_o * ||q(W)_o||_1` with the BatchNorm's moving
    variance, or `max_o ||q(W)_o||_1` when no BatchNorm follows (see `find_blocks`).

    # Example
    ```python
    bounds = effective_bounds(model)  # {"conv2d_1": 3.7, ...}
    ```
    """
    return {
        block.layer.name: float(
            tf.reduce_max(folded_row_bounds(block.layer, block.batchnorm))
        )
        for block in find_blocks(model, layers)
    }


def _batch_variance(flat: tf.Tensor, synchronized: bool) -> tf.Tensor:
    """Per-column variance of `flat`, over the global batch when BatchNorm is synchronized.

    A synchronized BatchNorm normalizes with the statistics of the whole global batch;
    the penalty then uses the same ones (an all-reduce of the sums, which gradients pass
    through), so one and several replicas of the same global batch give the same value.
    """
    context = tf.distribute.get_replica_context()
    if not synchronized or context is None or context.num_replicas_in_sync == 1:
        return tf.nn.moments(flat, axes=[0])[1]
    channels = tf.shape(flat)[1]
    count = tf.cast(tf.shape(flat)[:1], flat.dtype)
    # One packed tensor: the collective needs the same shapes on every replica.
    packed = tf.concat(
        [tf.reduce_sum(flat, 0), tf.reduce_sum(tf.square(flat), 0), count], 0
    )
    packed = context.all_reduce(tf.distribute.ReduceOp.SUM, packed)
    total, squares, count = packed[:channels], packed[channels:-1], packed[-1]
    mean = total / count
    return tf.maximum(squares / count - tf.square(mean), 0.0)


class _BlockPenalty:
    """Computes one block's penalty from the output of the block's host layer."""

    def __init__(
        self, block: Block, strength: float, mode: str, target, statistics: str
    ):
        self.block = block
        self.strength = strength
        self.mode = mode
        self.target = target
        self.statistics = statistics

    def __call__(self, outputs) -> tf.Tensor:
        layer, bn = self.block.layer, self.block.batchnorm
        if bn is None:
            bounds = folded_row_bounds(layer)
        elif self.statistics == "batch":
            x = tf.cast(outputs, tf.float32)
            # Per-channel population variance over every other axis, as BatchNorm
            # computes it; the reshape also serves inputs of unknown rank.
            flat = tf.reshape(x, [-1, tf.shape(x)[-1]])
            variance = _batch_variance(flat, getattr(bn, "synchronized", False))
            bounds = folded_row_bounds(layer, bn, variance)
        else:
            # The moving variance lags the kernel: hold the kernel factor.
            bounds = folded_row_bounds(layer, bn, hold_kernel=True)
        return norms.penalty_from_row_norms(
            bounds, self.strength, self.mode, self.target
        )


_MARK = "_larq_lipschitz_penalty"


def _attached_penalty(layer) -> _BlockPenalty | None:
    return getattr(layer.__dict__.get("call"), _MARK, None)


def _attach(host, penalty: _BlockPenalty) -> None:
    """Wrap the host's `call` (on the instance only) so that each call adds the penalty.

    The penalty is added with `host.add_loss` from inside `call`, the way any
    input-dependent loss is, so `model.fit` collects it through `model.losses`. It is
    not part of the layer's config; a SavedModel keeps it only inside the traced
    functions, which Keras does not use when it rebuilds the layer from its config.
    """
    original = getattr(host.__dict__.get("call"), "__wrapped__", None) or host.call

    @functools.wraps(original)
    def call(inputs, *args, **kwargs):
        outputs = original(inputs, *args, **kwargs)
        host.add_loss(penalty(outputs))
        return outputs

    setattr(call, _MARK, penalty)
    object.__setattr__(host, "call", call)  # an instance attribute, not tracked


def _detach(host) -> None:
    if _attached_penalty(host) is not None:
        del host.__dict__["call"]


def remove_scale_aware_penalty(model: tf.keras.Model) -> None:
    """Detach everything `add_scale_aware_penalty` attached to `model`."""
    for layer in _all_layers(model):
        _detach(layer)
    _reset_step_functions(model)


def _reset_step_functions(model) -> None:
    # A step function traced before the change would keep the old set of losses.
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


def add_scale_aware_penalty(
    model: tf.keras.Model,
    strength: float = 1e-4,
    mode: str = "max",
    target: float | None = None,
    statistics: str = "batch",
    layers: str = "binarized",
) -> list[str]:
    """Penalize the folded bound `max_o g_o * ||q(W)_o||_1` of every block of `model`.

    Per block (see `find_blocks`), with `L_o = g_o * ||q(W)_o||_1`:

    - `mode="max"`:        `strength * max_o L_o`
    - `mode="excess"`:     `strength * max(0, max_o L_o - target)`
    - `mode="excess_sum"`: `strength * sum_o max(0, L_o - target)`

    summed over the blocks and picked up by `model.fit` through `model.losses` (each
    forward pass adds it, like any input-dependent loss; `model.losses` is empty until
    the model has been called). See the module docstring for `statistics`. Blocks
    without a BatchNorm whose quantizer fixes the row norms (an unscaled sign) have
    nothing to move and are skipped with a warning. Calling it again replaces the
    previous attachment; it also clears the model's cached train/test/predict functions
    so that the next `fit` retraces. The attachment is not saved with the model.

    # Arguments
        model: a built functional or Sequential model.
        strength: weight of the penalty, a finite number >= 0.
        mode: `"max"`, `"excess"` or `"excess_sum"`.
        target: the tolerated bound for the excess modes.
        statistics: `"batch"` or `"moving"`.
        layers: `"binarized"` (Larq layers with a kernel quantizer) or `"all"`.

    # Returns
        The names of the penalized layers.

    # Raises
        ValueError: for bad arguments or a model without a layer graph.

    # Example
    ```python
    penalized = add_scale_aware_penalty(model, 1e-4, mode="excess", target=4.0)
    model.compile("adam", "sparse_categorical_crossentropy")
    ```
    """
    owner = "add_scale_aware_penalty"
    strength = norms.check_number(strength, "strength", owner)
    target = norms.check_penalty(mode, target, owner)
    if statistics not in STATISTICS:
        raise ValueError(
            f"{owner}: statistics must be one of {STATISTICS}, got {statistics!r}."
        )
    blocks = find_blocks(model, layers)
    remove_scale_aware_penalty(model)
    penalized = []
    for block in blocks:
        name = block.layer.name
        if (
            block.batchnorm is None
            and quantizer_kind(kernel_quantizer(block.layer)) == "constant"
        ):
            log.warning(
                "add_scale_aware_penalty: layer %r has no BatchNorm after it and its "
                "quantizer fixes every row norm; its bound cannot move, so it is not "
                "penalized.",
                name,
            )
            continue
        _attach(block.host, _BlockPenalty(block, strength, mode, target, statistics))
        penalized.append(name)
    if not penalized:
        log.warning(
            "add_scale_aware_penalty: model %r has no block to penalize.", model.name
        )
    return penalized


_CONTROL_TYPES = (L1InfLipschitz, L1InfConstraint, SpectralNormLipschitz)


def _attached_controls(layer) -> list[tuple[str, object]]:
    found = []
    for prefix in ("kernel", "depthwise", "pointwise"):
        for suffix in ("regularizer", "constraint"):
            attr = f"{prefix}_{suffix}"
            control = getattr(layer, attr, None)
            if isinstance(control, _CONTROL_TYPES):
                found.append((attr, control))
    return found


def _quantizer_name(quantizer) -> str:
    if quantizer is None:
        return "no quantizer"
    return getattr(quantizer, "__name__", type(quantizer).__name__)


def _quantizer_signature(quantizer):
    if quantizer is None or not hasattr(quantizer, "get_config"):
        return quantizer
    config = {
        k: v
        for k, v in quantizer.get_config().items()
        if k not in ("name", "trainable", "dtype", "metrics")
    }
    return type(quantizer), sorted(config.items())


def _row_length(layer, layout) -> str:
    kernel = kernel_variable(layer)
    if kernel is None or not kernel.shape.is_fully_defined():
        return "n (the row length)"
    shape = kernel.shape.as_list()
    rows = shape[-1] if layout != "depthwise" else shape[-1] * shape[-2]
    total = 1
    for d in shape:
        total *= d
    return f"n = {total // rows}"


def _layer_problems(layer, block: Block | None) -> list[str]:
    problems = []
    controls = _attached_controls(layer)
    if not controls:
        return problems
    cls = type(layer).__name__
    where = f"Layer {layer.name!r} ({cls})"
    layout = kernel_layout(layer)
    quantizer = kernel_quantizer(layer)
    kind = quantizer_kind(quantizer)
    for attr, control in controls:
        name = type(control).__name__
        if layout is None:
            problems.append(
                f"{where}: {name} as {attr} does not bound this layer: {cls} kernels are "
                "not read as one row per output unit by larq_lipschitz."
            )
            continue
        resolved = control.layout
        if resolved == "auto":
            resolved = "dense" if layout == "dense" else "conv"
        if resolved != layout:
            problems.append(
                f"{where}: {name} as {attr} reads the kernel with layout="
                f"{control.layout!r}, but this kernel has layout {layout!r}; pass "
                f"layout={layout!r}."
            )
        if isinstance(control, SpectralNormLipschitz):
            if control.on == "latent" and kind == "constant":
                problems.append(
                    f"{where}: SpectralNormLipschitz(on='latent') as {attr} measures the "
                    f"latent kernel, but the kernel quantizer {_quantizer_name(quantizer)} "
                    "deploys sign(W), which any rescaling of W leaves unchanged; use "
                    "on='effective' with the layer's quantizer."
                )
            elif control.on == "effective" and _quantizer_signature(
                control.quantizer
            ) != _quantizer_signature(quantizer):
                problems.append(
                    f"{where}: SpectralNormLipschitz(on='effective') as {attr} quantizes "
                    f"with {_quantizer_name(control.quantizer)}, but the layer uses "
                    f"{_quantizer_name(quantizer)}; the penalty does not measure the "
                    "deployed kernel."
                )
        elif kind == "constant":
            problems.append(
                f"{where}: {name} as {attr} acts on the latent kernel, but the kernel "
                f"quantizer {_quantizer_name(quantizer)} makes every deployed row L1 norm "
                f"the constant {_row_length(layer, layout)}: it cannot change the deployed "
                "L1,inf bound. Use magnitude_aware_sign, or add_scale_aware_penalty to act "
                "on the BatchNorm gain."
            )
            continue
        if block is not None and block.batchnorm is not None and kind != "constant":
            problems.append(
                f"{where}: {name} as {attr} bounds the kernel, but the BatchNormalization "
                f"{block.batchnorm.name!r} after it divides the kernel's scale back out, so "
                "the bound of the block, max_o g_o * ||q(W)_o||_1, does not follow it; use "
                "add_scale_aware_penalty to control the block."
            )
    return problems


def check_lipschitz_controls(model: tf.keras.Model) -> list[str]:
    """Find Lipschitz controls that cannot do what they seem to do, and log them.

    For every layer carrying an `L1InfLipschitz`, `L1InfConstraint` or
    `SpectralNormLipschitz` (as kernel, depthwise or pointwise regularizer or
    constraint), report:

    - a **no-op**: an L1,inf regularizer or constraint on a layer whose kernel
      quantizer fixes the deployed row norms (`quantizer_kind == "constant"`: an
      unscaled sign). It changes latent weights but never the deployed bound. No
      quantizer and `magnitude_aware_sign` are fine: there the latent row norms are the
      deployed ones;
    - a BatchNorm that directly normalizes the layer's output (functional and
      Sequential models only): it divides the kernel's scale back out, so the control
      does not bound the conv+BatchNorm block (`add_scale_aware_penalty` does);
    - a `SpectralNormLipschitz(on="latent")` before an unscaled sign, or
      `on="effective"` with a quantizer other than the layer's;
    - a layout that does not match the layer (e.g. `"auto"` on a depthwise kernel),
      or a layer type whose kernel is not read as rows (separable, transposed,
      locally connected).

    Problems are logged with `logging.getLogger(__name__).warning` (the first two, and a
    count of the rest when there are more than three).

    # Returns
        The problems, one sentence each naming the layer; empty when all is well.

    # Example
    ```python
    for problem in check_lipschitz_controls(model):
        ...  # already logged
    ```
    """
    try:
        blocks = {id(b.layer): b for b in find_blocks(model, "all")}
    except ValueError:
        log.debug("check_lipschitz_controls: %r has no layer graph.", model.name)
        blocks = {}
    problems = []
    for layer in _all_layers(model):
        problems.extend(_layer_problems(layer, blocks.get(id(layer))))
    shown = 2 if len(problems) > 3 else len(problems)
    for problem in problems[:shown]:
        log.warning("%s", problem)
    if len(problems) > shown:
        log.warning(
            "... and %d more layers with a problem of the same kinds; "
            "check_lipschitz_controls(model) returns the full list.",
            len(problems) - shown,
        )
    return problems
