"""Attach a Lipschitz regularizer or constraint to the binarized layers of any model.

`apply_lipschitz` rebuilds a Keras model layer by layer from the layers' configs, with
the new regularizer and/or constraint on every binarized layer, then copies every weight
over unchanged. Everything else (quantizers, BatchNorm statistics, layer names,
`trainable` flags, the graph) stays as it was, so the new model computes exactly what
the old one did until it is trained.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from larq_lipschitz.quantization import is_binarized, kernel_layout

import tensorflow as tf

log = logging.getLogger(__name__)

_INITIALIZER_WARNING = r"The `keras.initializers.serialize\(\)` API"

#: `edit(layer, config) -> config`: how `_rebuild` changes one layer's config.
LayerEdit = Callable[[tf.keras.layers.Layer, dict], dict]


def _fresh_copy(obj: Any) -> Any:
    """A new object equal to `obj`, so that each layer owns its own copy.

    Strings and config dicts are returned as they are (Keras makes a new object from
    them for every layer); objects with `get_config`/`from_config` are copied through
    their config, so that a stateful regularizer (e.g. one that keeps a power-iteration
    vector) gets separate state per layer; anything else (a plain function) is shared.
    """
    if obj is None or isinstance(obj, str | dict):
        return obj
    get_config = getattr(obj, "get_config", None)
    from_config = getattr(type(obj), "from_config", None)
    if get_config is None or from_config is None:
        return obj
    try:
        return from_config(get_config())
    except (NotImplementedError, TypeError, ValueError) as err:
        log.debug("Sharing %r between layers: it cannot be copied (%s).", obj, err)
        return obj


def _copy_weights(source: tf.keras.layers.Layer, target: tf.keras.layers.Layer) -> None:
    values = source.get_weights()
    if len(values) != len(target.weights):
        raise ValueError(
            f"Layer {source.name!r}: the rebuilt layer has {len(target.weights)} weights, "
            f"the original {len(values)}; the layer's config does not describe it fully."
        )
    if values:
        target.set_weights(values)


def _rebuild(model: tf.keras.Model, edit: LayerEdit | None = None) -> tf.keras.Model:
    """A copy of a functional or Sequential model, each layer rebuilt from its config.

    `edit(layer, config)` may change a layer's config (and return it) before the layer
    is rebuilt; objects may be put into the config directly. Nested functional or
    Sequential models are rebuilt recursively. All weights, including non-trainable ones
    such as the BatchNorm moving statistics, are copied exactly.

    `BatchNormalization(synchronized=True)` is kept: tf-keras leaves `synchronized` out
    of the layer's config, so a plain config round trip would silently drop it.

    # Raises
        ValueError: for a subclassed model or one that is not built.
    """
    if not isinstance(model, tf.keras.Sequential) and not getattr(
        model, "_is_graph_network", False
    ):
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model: only "
            "functional and Sequential models can be rebuilt layer by layer."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: build it (call it once, or give it an "
            "Input) before rebuilding it."
        )
    pairs: list[tuple[tf.keras.layers.Layer, tf.keras.layers.Layer]] = []

    def clone(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        if isinstance(layer, tf.keras.Model):
            return _rebuild(layer, edit)
        config = layer.get_config()
        if isinstance(layer, tf.keras.layers.BatchNormalization) and getattr(
            layer, "synchronized", False
        ):
            config["synchronized"] = True
        if edit is not None:
            config = edit(layer, config)
        new_layer = type(layer).from_config(config)
        pairs.append((layer, new_layer))
        return new_layer

    with warnings.catch_warnings():
        # tf-keras warns when it serializes an initializer that is a plain function
        # (larq-zoo's QuickNet has one); the function is registered and rebuilds fine.
        warnings.filterwarnings(
            "ignore", message=_INITIALIZER_WARNING, category=UserWarning
        )
        new_model = tf.keras.models.clone_model(model, clone_function=clone)
    for old, new in pairs:
        _copy_weights(old, new)
    new_model.trainable = model.trainable
    return new_model


def binarized_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """The binarized layers of a model, nested models included, in layer order.

    A layer counts as binarized when `larq_lipschitz.quantization.is_binarized` says so:
    a Larq layer with a kernel (or depthwise) quantizer that is not the identity and a
    kernel the package reads as rows (dense, convolution or depthwise convolution).

    # Example
    ```python
    model = larq_lipschitz.models.get("resnet20")
    assert len(binarized_layers(model)) == 18
    ```
    """
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(binarized_layers(layer))
        elif is_binarized(layer):
            found.append(layer)
    return found


def _prefix(layer: tf.keras.layers.Layer) -> str:
    return "depthwise" if kernel_layout(layer) == "depthwise" else "kernel"


def _copy_for(obj: Any, layer: tf.keras.layers.Layer) -> Any:
    """A per-layer copy; a depthwise layer's copy reads its kernel as depthwise rows."""
    copy = _fresh_copy(obj)
    if (
        _prefix(layer) == "depthwise"
        and getattr(copy, "layout", None) == "auto"
        and copy is not obj
    ):
        config = copy.get_config()
        config["layout"] = "depthwise"
        copy = type(copy).from_config(config)
    return copy


def _check_control(obj: Any, what: str) -> None:
    if obj is None or isinstance(obj, str | dict) or callable(obj):
        return
    raise ValueError(
        f"apply_lipschitz: {what} must be a Keras {what} object, a callable, a "
        f"registered name or None, got {obj!r}."
    )


def _describe(control: Any) -> str:
    if control is None:
        return "None"
    if isinstance(control, dict):
        return str(control.get("class_name", control))
    return getattr(control, "__name__", type(control).__name__)


def apply_lipschitz(
    model: tf.keras.Model,
    regularizer: Any = None,
    constraint: Any = None,
    *,
    select: Callable[[tf.keras.layers.Layer], bool] | None = None,
) -> tf.keras.Model:
    """A copy of `model` with a Lipschitz regularizer/constraint on binarized layers.

    Every selected layer gets `kernel_regularizer = regularizer` and/or
    `kernel_constraint = constraint` (`depthwise_regularizer`/`depthwise_constraint` on
    depthwise convolutions); every other layer, every weight (moving statistics
    included), every quantizer and every layer name is carried over unchanged, so the
    new model's outputs equal the old model's on any input. By default the selected
    layers are the binarized ones (see `binarized_layers`): the Larq layers that
    quantize their kernel. Larq-zoo models work like the package's own.

    What the new objects replace:

    - a given `regularizer` replaces the layer's existing kernel regularizer (binarized
      layers rarely have one; it is logged when one is replaced);
    - a given `constraint` *replaces* the existing kernel constraint, typically Larq's
      `weight_clip`, which keeps latent weights inside the straight-through window of
      the sign. Give `L1InfConstraint(..., clip_value=1.0)` to keep that clip;
    - `None` leaves the layer's current regularizer or constraint as it is.

    Each layer receives its own copy of the regularizer/constraint, made with
    `from_config(get_config())`, so objects with per-layer state (such as a
    power-iteration vector) do not share it; a plain function is shared. On a depthwise
    layer, a copy whose `layout` is `"auto"` gets `layout="depthwise"`.

    The new model is not compiled (compile it, and build the optimizer, after this call)
    and is created in the current distribution-strategy scope: under a strategy, call
    this inside `strategy.scope()`. Finally `larq_lipschitz.scale_aware.
    check_lipschitz_controls` logs a warning for every control that cannot do what it
    seems to (for example an L1,inf penalty on an unscaled sign, whose deployed row
    norms are a constant).

    # Arguments
        model: a built functional or Sequential Keras model; nested models are handled.
        regularizer: a Keras regularizer object, callable or registered name, or None.
        constraint: a Keras constraint object, callable or registered name, or None.
        select: `select(layer) -> bool` picks the layers to change instead of the
            binarized ones (for example every `QuantConv2D` of a 32/32 model); the
            picked layers must have a dense, convolution or depthwise kernel.

    # Returns
        A new, uncompiled `tf.keras.Model` with the same weights.

    # Raises
        ValueError: if both `regularizer` and `constraint` are None, an argument is not
            a regularizer/constraint, the model is subclassed or not built, or `select`
            picks a layer without a supported kernel.

    # Example
    ```python
    from larq_lipschitz.regularizers import L1InfLipschitz

    model = larq_lipschitz.models.get("resnet20")
    regularized = apply_lipschitz(model, regularizer=L1InfLipschitz(1e-5))
    assert len(regularized.losses) == 18  # one penalty per binarized layer
    ```
    """
    if not isinstance(model, tf.keras.Model):
        raise ValueError(
            f"apply_lipschitz: model must be a tf.keras.Model, got {type(model).__name__}."
        )
    if regularizer is None and constraint is None:
        raise ValueError(
            "apply_lipschitz: give a regularizer, a constraint or both; with neither "
            "there is nothing to attach."
        )
    _check_control(regularizer, "regularizer")
    _check_control(constraint, "constraint")
    if select is not None and not callable(select):
        raise ValueError(f"apply_lipschitz: select must be callable, got {select!r}.")
    chosen = select if select is not None else is_binarized
    changed: list[str] = []
    replaced: dict[str, list[str]] = {"regularizer": [], "constraint": []}

    def edit(layer: tf.keras.layers.Layer, config: dict) -> dict:
        if not chosen(layer):
            return config
        if kernel_layout(layer) is None:
            raise ValueError(
                f"apply_lipschitz: layer {layer.name!r} ({type(layer).__name__}) was "
                "selected, but its kernel is not a dense, convolution or depthwise "
                "kernel, whose rows larq_lipschitz can bound."
            )
        prefix = _prefix(layer)
        for what, new in (("regularizer", regularizer), ("constraint", constraint)):
            if new is None:
                continue
            key = f"{prefix}_{what}"
            old = getattr(layer, key, None)
            if old is not None:
                replaced[what].append(f"{layer.name} ({_describe(old)})")
            config[key] = _copy_for(new, layer)
        changed.append(layer.name)
        return config

    new_model = _rebuild(model, edit)
    if not changed:
        log.warning(
            "apply_lipschitz: model %r has no %s; nothing was attached.",
            model.name,
            "selected layer" if select is not None else "binarized layer",
        )
    else:
        log.info(
            "apply_lipschitz: attached %s to %d layers of %r.",
            " and ".join(
                f"{what} {_describe(obj)}"
                for what, obj in (
                    ("regularizer", regularizer),
                    ("constraint", constraint),
                )
                if obj is not None
            ),
            len(changed),
            model.name,
        )
    for what, layers in replaced.items():
        if layers:
            log.info(
                "apply_lipschitz: the new %s replaced the existing one on %d layers: %s.",
                what,
                len(layers),
                ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else ""),
            )
    try:
        from larq_lipschitz.scale_aware import check_lipschitz_controls
    except ImportError:
        pass
    else:
        check_lipschitz_controls(new_model)
    return new_model
