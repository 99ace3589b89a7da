"""Larq-zoo models (Bi-Real Net, BinaryResNetE18, QuickNet), with the package interface.

The networks are built by larq-zoo itself (`larq_zoo.literature.BiRealNet`,
`larq_zoo.literature.BinaryResNetE18`, `larq_zoo.sota.QuickNet`), never re-implemented.
The wrapper then rewrites the larq-zoo model's config, once, so that it behaves like the
package's CIFAR models:

- a fixed `Normalization` layer named `normalize` is put in front, so inputs are images
  in [0, 1] pixel space (CIFAR-10 statistics by default, ImageNet statistics with
  `weights="imagenet"`, matching larq-zoo's own preprocessing);
- the final softmax is removed: the model returns logits;
- the last residual addition of each stage (each run of additions with the same output
  shape) is renamed `stage1_out`, `stage2_out`, ... for the LCR baseline;
- bit widths, quantizer/constraint/regularizer overrides and synchronized BatchNorm are
  applied to the layers' configs;
- larq-zoo's layers keep their names otherwise, and pretrained weights are copied over
  exactly.

Larq-zoo's own quantizers are kept unless `kernel_quantizer` is given. Bi-Real Net uses
`magnitude_aware_sign` (an L1,inf penalty on the latent kernel acts on the deployed
weights), but BinaryResNetE18 and QuickNet use an unscaled `SteSign(clip_value=1.25)`,
whose deployed row norms are a constant: a kernel L1,inf control is a no-op there (and
is reported as such) unless `kernel_quantizer="magnitude_aware_sign"` is passed, which
makes ImageNet weights a starting point for fine-tuning rather than a finished model.

At 32x32 inputs Bi-Real Net and QuickNet reduce the image to a 1x1 map before pooling
(they were designed for 224x224); BinaryResNetE18 switches to its small-input stem
(a 3x3 convolution without striding or max-pool) below 50 pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from larq_lipschitz.apply import _INITIALIZER_WARNING, _fresh_copy
from larq_lipschitz.models.cifar import CIFAR10_MEAN, CIFAR10_STD, normalization
from larq_lipschitz.quantization import is_binarized, kernel_layout

import tensorflow as tf

log = logging.getLogger(__name__)

#: Per-channel statistics of ImageNet in [0, 1], as larq-zoo's preprocessing uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_INPUT_SHAPE = (224, 224, 3)
IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """Where a larq-zoo model lives and what it is."""

    module: str
    function: str
    reference: str

    def constructor(self):
        return getattr(importlib.import_module(self.module), self.function)


ZOO_MODELS: dict[str, ZooModel] = {
    "birealnet": ZooModel(
        "larq_zoo.literature",
        "BiRealNet",
        "Liu et al., Bi-Real Net, ECCV 2018, arXiv:1808.00278 (via larq-zoo)",
    ),
    "binary-resnet-e18": ZooModel(
        "larq_zoo.literature",
        "BinaryResNetE18",
        "Bethge et al., Back to Simplicity: How to Train Accurate BNNs from Scratch?, "
        "arXiv:1906.08637 (via larq-zoo)",
    ),
    "quicknet": ZooModel(
        "larq_zoo.sota",
        "QuickNet",
        "Bannink et al., Larq Compute Engine, MLSys 2021, arXiv:2011.09398 "
        "(via larq-zoo)",
    ),
}


def _is_residual_add(layer: tf.keras.layers.Layer) -> bool:
    if isinstance(layer, tf.keras.layers.Add):
        return True
    if type(layer).__name__ == "TFOpLambda":
        return layer.get_config().get("function") in ("__operators__.add", "math.add")
    return False


def _stage_renames(model: tf.keras.Model) -> dict[str, str]:
    """The last residual addition of each run of equal output shape -> `stageK_out`."""
    runs: list[tuple[Any, str]] = []
    for layer in model.layers:
        if not _is_residual_add(layer):
            continue
        shape = tuple(layer.output_shape[1:])
        if runs and runs[-1][0] == shape:
            runs[-1] = (shape, layer.name)
        else:
            runs.append((shape, layer.name))
    return {name: f"stage{k}_out" for k, (_, name) in enumerate(runs, start=1)}


def _rename_refs(node: Any, renames: dict[str, str]) -> Any:
    """Rename the layer references `[name, node, tensor, ...]` in inbound nodes."""
    if isinstance(node, list | tuple):
        items = [_rename_refs(item, renames) for item in node]
        if (
            len(items) >= 3
            and isinstance(items[0], str)
            and isinstance(items[1], int)
            and isinstance(items[2], int)
        ):
            items[0] = renames.get(items[0], items[0])
        return items
    if isinstance(node, dict):
        return {key: _rename_refs(value, renames) for key, value in node.items()}
    return node


@dataclasses.dataclass(frozen=True)
class _ZooGraph:
    """A larq-zoo model as a config, with what the rewrite needs to know about it."""

    config: dict
    binarized: dict[str, str]  # layer name -> "kernel" or "depthwise"
    renames: dict[str, str]
    name: str


def _graph(model: tf.keras.Model) -> _ZooGraph:
    binarized = {
        layer.name: ("depthwise" if kernel_layout(layer) == "depthwise" else "kernel")
        for layer in model.layers
        if is_binarized(layer)
    }
    with warnings.catch_warnings():
        # QuickNet's blurpool initializer is a plain function: tf-keras warns when it
        # serializes it, yet it is registered with Keras and deserializes fine.
        warnings.filterwarnings(
            "ignore", message=_INITIALIZER_WARNING, category=UserWarning
        )
        config = model.get_config()
    return _ZooGraph(config, binarized, _stage_renames(model), model.name)


@functools.lru_cache(maxsize=16)
def _random_init_graph(
    name: str, input_shape: tuple[int, int, int], num_classes: int
) -> _ZooGraph:
    # Only the architecture is kept: every model made from it is initialized afresh by
    # its layers' own initializers (the ones larq-zoo chose).
    model = ZOO_MODELS[name].constructor()(
        input_shape=input_shape, weights=None, num_classes=num_classes
    )
    return _graph(model)


def _imagenet_model(name: str) -> tf.keras.Model:
    try:
        return ZOO_MODELS[name].constructor()(
            input_shape=IMAGENET_INPUT_SHAPE, weights="imagenet", num_classes=1000
        )
    except Exception as err:  # larq-zoo downloads through tf.keras.utils.get_file
        raise OSError(
            f"{name}: could not fetch the larq-zoo ImageNet weights: {err}. They are "
            "downloaded from github.com/larq/zoo on first use (then cached under "
            "~/.keras/larq/models); without network access pass weights=None (random "
            "initialization) or the path of a weights file saved from this model."
        ) from err


def _edit_layers(
    config: dict,
    graph: _ZooGraph,
    *,
    weight_bits: int,
    activation_bits: int,
    kernel_quantizer: Any,
    kernel_constraint: Any,
    replace_constraint: bool,
    kernel_regularizer: Any,
    synchronized_bn: bool,
) -> None:
    for entry in config["layers"]:
        layer_config = entry["config"]
        if synchronized_bn and entry["class_name"] == "BatchNormalization":
            layer_config["synchronized"] = True
        prefix = graph.binarized.get(entry["name"])
        if prefix is None:
            continue
        if weight_bits == 32:
            layer_config[f"{prefix}_quantizer"] = None
            if not replace_constraint:
                layer_config[f"{prefix}_constraint"] = None
        elif kernel_quantizer is not None:
            layer_config[f"{prefix}_quantizer"] = _fresh_copy(kernel_quantizer)
        if replace_constraint:
            layer_config[f"{prefix}_constraint"] = _fresh_copy(kernel_constraint)
        if activation_bits == 32:
            layer_config["input_quantizer"] = None
        if kernel_regularizer is not None:
            layer_config[f"{prefix}_regularizer"] = _fresh_copy(kernel_regularizer)


def _rewrite(graph: _ZooGraph, mean, std, channels: int, name: str, **edits) -> dict:
    config = copy.deepcopy(graph.config)
    config["name"] = name
    layers = config["layers"]
    by_name = {entry["name"]: entry for entry in layers}

    # Logits instead of probabilities: drop the final softmax.
    (out_name, _, _), *rest = config["output_layers"]
    last = by_name[out_name]
    if (
        rest
        or last["class_name"] != "Activation"
        or (last["config"].get("activation") != "softmax")
    ):
        raise RuntimeError(
            f"{graph.name}: expected larq-zoo's model to end in one softmax Activation; "
            "this larq-zoo version builds it differently."
        )
    source = last["inbound_nodes"][0][0]
    config["output_layers"] = [[source[0], source[1], source[2]]]
    layers.remove(last)

    # Stage names, and the normalization between the input and its consumers.
    (input_name, _, _), *_ = config["input_layers"]
    renames = {**graph.renames, input_name: "normalize"}
    for entry in layers:
        if entry["name"] == input_name:
            continue
        entry["inbound_nodes"] = _rename_refs(entry["inbound_nodes"], renames)
        if entry["name"] in graph.renames:
            entry["name"] = entry["config"]["name"] = graph.renames[entry["name"]]
    config["output_layers"] = _rename_refs(config["output_layers"], graph.renames)
    norm = tf.keras.layers.serialize(normalization(mean, std, channels))
    norm["name"] = "normalize"
    norm["inbound_nodes"] = [[[input_name, 0, 0, {}]]]
    position = next(i for i, e in enumerate(layers) if e["name"] == input_name)
    layers.insert(position + 1, norm)

    _edit_layers(config, graph, **edits)
    return config


def _check_weights(weights: Any, name: str) -> None:
    if weights is None or weights == "imagenet":
        return
    if not isinstance(weights, str | os.PathLike):
        raise ValueError(
            f"{name}: weights must be None, 'imagenet' or a path, got {weights!r}."
        )


def build(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    weight_bits: int = 1,
    activation_bits: int = 1,
    kernel_quantizer: Any = None,
    kernel_constraint: Any = None,
    replace_constraint: bool = False,
    kernel_regularizer: Any = None,
    synchronized_bn: bool = False,
    weights: str | os.PathLike | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tf.keras.Model:
    """Build a larq-zoo model through larq-zoo and give it the package's interface.

    Prefer `larq_lipschitz.models.get`, which validates and documents the arguments.

    # Arguments
        name: a key of `ZOO_MODELS`.
        num_classes, input_shape: as for larq-zoo; `weights="imagenet"` needs 1000
            classes and (224, 224, 3).
        weight_bits: 1 keeps the binary kernel quantizers (larq-zoo's, or
            `kernel_quantizer`); 32 removes them, and larq-zoo's weight clip with them.
        activation_bits: 1 keeps larq-zoo's input quantizers; 32 removes them.
        kernel_quantizer: replaces larq-zoo's kernel quantizer on every binarized layer.
        kernel_constraint, replace_constraint: with `replace_constraint=True`,
            `kernel_constraint` (possibly None) replaces larq-zoo's constraint.
        kernel_regularizer: put on every binarized layer.
        synchronized_bn: every BatchNorm with `synchronized=True`.
        weights: None, "imagenet" (downloaded by larq-zoo) or a path for `load_weights`.
        mean, std: input normalization; default CIFAR-10 statistics, or ImageNet ones
            with `weights="imagenet"`.

    # Raises
        ValueError: for `weights="imagenet"` with another class count or input shape.
        OSError: if the ImageNet weights cannot be downloaded (for instance offline).

    # Example
    ```python
    model = build("quicknet", num_classes=10, input_shape=(32, 32, 3))
    ```
    """
    if name not in ZOO_MODELS:
        raise ValueError(
            f"Unknown larq-zoo model {name!r}; known: {sorted(ZOO_MODELS)}."
        )
    _check_weights(weights, name)
    shape = tuple(int(d) for d in input_shape)
    if weights == "imagenet":
        if num_classes != IMAGENET_CLASSES or shape != IMAGENET_INPUT_SHAPE:
            raise ValueError(
                f"{name}: weights='imagenet' needs num_classes={IMAGENET_CLASSES} and "
                f"input_shape={IMAGENET_INPUT_SHAPE}, got num_classes={num_classes} and "
                f"input_shape={shape}; pass weights=None to train from scratch."
            )
        source = _imagenet_model(name)
        graph = _graph(source)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    else:
        source = None
        graph = _random_init_graph(name, shape, int(num_classes))
        default_mean, default_std = CIFAR10_MEAN, CIFAR10_STD
    model_name = f"{graph.name}_w{weight_bits}a{activation_bits}"
    config = _rewrite(
        graph,
        default_mean if mean is None else mean,
        default_std if std is None else std,
        shape[-1],
        model_name,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        kernel_quantizer=kernel_quantizer,
        kernel_constraint=kernel_constraint,
        replace_constraint=replace_constraint,
        kernel_regularizer=kernel_regularizer,
        synchronized_bn=synchronized_bn,
    )
    model = tf.keras.Model.from_config(config)
    if source is not None:
        original = {new: old for old, new in graph.renames.items()}
        for layer in model.layers:
            if layer.name == "normalize" or not layer.weights:
                continue
            values = source.get_layer(
                original.get(layer.name, layer.name)
            ).get_weights()
            layer.set_weights(values)
    if weights not in (None, "imagenet"):
        model.load_weights(os.fspath(weights))
    return model
