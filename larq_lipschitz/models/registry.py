"""The model registry: one `get` for every network, at every supported bit width.

| name                | architecture                                | params |
|---------------------|---------------------------------------------|--------|
| `resnet20`          | CIFAR ResNet-20, a shortcut per binary conv | 0.27 M |
| `resnet20-basic`    | CIFAR ResNet-20, standard basic block       | 0.27 M |
| `resnet18`          | CIFAR ResNet-18 (3x3 stem, no max-pool)     | 11.2 M |
| `vgg-small`         | VGG-Small (LQ-Nets / IR-Net)                | 4.66 M |
| `birealnet`         | larq-zoo Bi-Real Net 18                     | 11.2 M |
| `binary-resnet-e18` | larq-zoo BinaryResNetE18                    | 11.2 M |
| `quicknet`          | larq-zoo QuickNet                           | 12.7 M |

Bit widths are written W/A (weights/activations). Supported everywhere: 1/1 (binary
kernel and binary input of every binarized layer), 1/32 (binary kernel, real input) and
32/32 (no quantizer). First and last layers are always full precision. Parameter
counts are trainable parameters at 32x32 inputs and 10 classes.

`load_saved(path)` loads a saved model back with the checks a file from elsewhere
needs (intact zip, Keras 2, loadable, finite weights), each failure one line naming the
file (`ModelFileError`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import pathlib
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from larq_lipschitz.apply import binarized_layers
from larq_lipschitz.models import cifar, zoo

import larq as lq
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

#: The bit widths (weight_bits, activation_bits) every registry model supports.
BIT_WIDTHS: tuple[tuple[int, int], ...] = ((1, 1), (1, 32), (32, 32))

#: Default binary quantizers of the CIFAR models (and of nothing else: larq-zoo models
#: keep their own unless `kernel_quantizer` is given).
DEFAULT_INPUT_QUANTIZER = "ste_sign"
DEFAULT_KERNEL_QUANTIZER = "magnitude_aware_sign"
DEFAULT_KERNEL_CONSTRAINT = "weight_clip"

#: Pass `kernel_constraint=NO_CONSTRAINT` for binarized layers without any constraint.
NO_CONSTRAINT = "none"

STAGE_NAME_PATTERN = re.compile(r"^stage(\d+)_out$")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registry entry.

    # Arguments
        name: the canonical name.
        family: `"cifar"` (built here) or `"larq-zoo"` (built through larq-zoo).
        reference: where the architecture comes from.
        published_params: the parameter count usually quoted for it, or None.
        aliases: other accepted names (compared case-insensitively, `_` = `-`).
        model_kwargs: the extra keyword arguments `get` accepts for it.
        builder: for CIFAR models, the function of `larq_lipschitz.models.cifar`.
    """

    name: str
    family: str
    reference: str
    published_params: float | None
    aliases: tuple[str, ...] = ()
    model_kwargs: tuple[str, ...] = ()
    builder: Callable[..., tf.keras.Model] | None = None
    bit_widths: tuple[tuple[int, int], ...] = BIT_WIDTHS


_CIFAR_KWARGS = ("mean", "std", "activation", "shortcut", "name")
_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        "resnet20",
        "cifar",
        "He et al., CVPR 2016; Bi-Real/IR-Net block (Qin et al., IR-Net, CVPR 2020)",
        0.27e6,
        ("resnet-20", "resnet20-bireal", "resnet20-irnet"),
        _CIFAR_KWARGS,
        cifar.resnet20,
    ),
    ModelEntry(
        "resnet20-basic",
        "cifar",
        "He et al., Deep Residual Learning for Image Recognition, CVPR 2016",
        0.27e6,
        ("resnet-20-basic",),
        _CIFAR_KWARGS,
        cifar.resnet20_basic,
    ),
    ModelEntry(
        "resnet18",
        "cifar",
        "He et al., CVPR 2016, CIFAR variant; Bi-Real/IR-Net block",
        11.17e6,
        ("resnet-18",),
        _CIFAR_KWARGS,
        cifar.resnet18,
    ),
    ModelEntry(
        "vgg-small",
        "cifar",
        "Zhang et al., LQ-Nets, ECCV 2018; binarized as in IR-Net (Qin et al., "
        "CVPR 2020)",
        4.66e6,
        ("vggsmall", "vgg-small-cifar"),
        ("mean", "std", "activation", "name"),
        cifar.vgg_small,
    ),
    ModelEntry(
        "birealnet",
        "larq-zoo",
        zoo.ZOO_MODELS["birealnet"].reference,
        11.7e6,  # larq-zoo, at 224x224 with 1000 classes
        ("birealnet18", "bi-real-net", "bireal-net"),
        ("mean", "std"),
    ),
    ModelEntry(
        "binary-resnet-e18",
        "larq-zoo",
        zoo.ZOO_MODELS["binary-resnet-e18"].reference,
        11.7e6,
        ("binaryresnete18", "binary-resnet-e-18", "resnet-e18", "resnete18"),
        ("mean", "std"),
    ),
    ModelEntry(
        "quicknet",
        "larq-zoo",
        zoo.ZOO_MODELS["quicknet"].reference,
        13.2e6,
        ("quick-net",),
        ("mean", "std"),
    ),
)
_BY_NAME = {entry.name: entry for entry in _ENTRIES}
_ALIASES = {alias: entry.name for entry in _ENTRIES for alias in entry.aliases}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def available() -> list[str]:
    """The canonical names accepted by `get`, in registry order.

    # Example
    ```python
    assert "resnet20" in available()
    ```
    """
    return [entry.name for entry in _ENTRIES]


def entry(name: str) -> ModelEntry:
    """The registry entry for a name or alias.

    # Raises
        ValueError: for an unknown name; the message lists the available ones.

    # Example
    ```python
    assert entry("BiRealNet").name == "birealnet"
    ```
    """
    if not isinstance(name, str):
        raise ValueError(f"Model name must be a string, got {name!r}.")
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _BY_NAME:
        raise ValueError(
            f"Unknown model {name!r}. Available: {', '.join(available())} "
            f"(aliases: {', '.join(sorted(_ALIASES))})."
        )
    return _BY_NAME[key]


def _widths(entry_: ModelEntry) -> str:
    return ", ".join(f"{w}/{a}" for w, a in entry_.bit_widths)


def _is_int(value: Any) -> bool:
    # NumPy integers count (a dataset's metadata often holds them); bools do not.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(value: Any, what: str, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(
            "input_shape must be (height, width, channels) with positive integers, "
            f"got {input_shape!r}."
        )
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


def _check_quantizer(kernel_quantizer: Any, weight_bits: int, name: str) -> None:
    if kernel_quantizer is None:
        return
    if weight_bits != 1:
        raise ValueError(
            f"{name}: kernel_quantizer is only used with weight_bits=1, got "
            f"weight_bits={weight_bits}; a {weight_bits}-bit kernel has no quantizer."
        )
    resolved = kernel_quantizer
    if isinstance(kernel_quantizer, str | dict):
        try:
            resolved = lq.quantizers.get_kernel_quantizer(kernel_quantizer)
        except ValueError as err:
            raise ValueError(f"{name}: unknown kernel_quantizer: {err}") from err
    elif not callable(kernel_quantizer):
        raise ValueError(
            f"{name}: kernel_quantizer must be a Larq quantizer, a callable or a name, "
            f"got {kernel_quantizer!r}."
        )
    precision = getattr(resolved, "precision", None)
    if precision is not None and precision != 1:
        raise ValueError(
            f"{name}: weight_bits=1 needs a 1-bit kernel quantizer, but "
            f"{kernel_quantizer!r} has precision {precision}."
        )


def _check_control(obj: Any, what: str, name: str) -> None:
    if obj is None or isinstance(obj, str | dict) or callable(obj):
        return
    raise ValueError(
        f"{name}: {what} must be a Keras {what.split('_')[1]} object, a callable, a "
        f"registered name or None, got {obj!r}."
    )


def _check_weights(weights: Any, family: str, name: str) -> None:
    if weights is None:
        return
    if weights == "imagenet":
        if family != "larq-zoo":
            raise ValueError(
                f"{name}: there are no published 'imagenet' weights for this CIFAR "
                "model; pass weights=None or the path of a weights file."
            )
        return
    if not isinstance(weights, str | os.PathLike):
        raise ValueError(
            f"{name}: weights must be None, 'imagenet' (larq-zoo models) or a path, got "
            f"{weights!r}."
        )
    path = os.fspath(weights)
    if not (os.path.exists(path) or os.path.exists(path + ".index")):
        raise FileNotFoundError(f"{name}: weights file {path!r} does not exist.")


def _check_controls(model: tf.keras.Model) -> None:
    try:
        from larq_lipschitz.scale_aware import check_lipschitz_controls
    except ImportError:
        return
    check_lipschitz_controls(model)


def get(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    weight_bits: int = 1,
    activation_bits: int = 1,
    kernel_quantizer: Any = None,
    kernel_constraint: Any = None,
    kernel_regularizer: Any = None,
    synchronized_bn: bool = False,
    weights: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> tf.keras.Model:
    """Build a registry model for images in [0, 1] pixel space; it returns logits.

    Every model starts with a fixed per-channel `Normalization` (CIFAR-10 statistics
    `mean = (0.4914, 0.4822, 0.4465)`, `std = (0.2470, 0.2435, 0.2616)` unless `mean=`
    and `std=` are given), so noise is added and bounds are stated in pixel space. The
    first and last layers are full precision; the *binarized layers* are the others, all
    `larq.layers.QuantConv2D` (larq-zoo: the Larq layers with a kernel quantizer).

    Bit widths, W/A:

    - 1/1: every binarized layer has an input quantizer (`ste_sign`; larq-zoo: its own)
      and a kernel quantizer;
    - 1/32: only the kernel quantizer;
    - 32/32: no quantizer. CIFAR models keep the same `QuantConv2D` layers (same names
      and weight shapes); larq-zoo models lose their binary quantizers and weight clip.

    Kernel quantizer and constraint of the binarized layers at weight_bits=1 (CIFAR
    models): by default `magnitude_aware_sign`, `q(W_o) = mean|W_o| * sign(W_o)` per
    output channel, for which `||q(W_o)||_1 = ||W_o||_1`: an L1,inf penalty or
    constraint on the latent kernel acts on the deployed binary kernel exactly; and
    Larq's `weight_clip` (`|W| <= 1`, the straight-through window). A given
    `kernel_quantizer` replaces the default quantizer; a given `kernel_constraint`
    *replaces* `weight_clip` (it is not added to it: an `L1InfConstraint` with
    `clip_value=1.0` does both), and `kernel_constraint="none"` leaves the layers
    unconstrained. At 32/32 the default constraint is none. Larq-zoo models keep
    larq-zoo's quantizers and constraints unless these arguments are given (Bi-Real Net
    uses `magnitude_aware_sign`; BinaryResNetE18 and QuickNet an unscaled `SteSign`, on
    which a kernel L1,inf control is a no-op).

    `kernel_regularizer` and `kernel_constraint` go to the binarized layers only (at
    32/32 on CIFAR models: the `QuantConv2D` layers that are binarized at other bit
    widths); each layer gets its own copy. When either is given,
    `larq_lipschitz.scale_aware.check_lipschitz_controls` logs any control that cannot
    work. To attach one to an existing model, use
    `larq_lipschitz.apply.apply_lipschitz`.

    `synchronized_bn=True` builds every BatchNormalization with `synchronized=True`, so
    that replicas of a `MirroredStrategy` normalize with the statistics of the global
    batch. Build the model inside `strategy.scope()`. tf-keras leaves `synchronized` out
    of the layer config: a model reloaded from a file has plain BatchNorm again (weights
    load fine), so rebuild it with `get` and `load_weights` to train it further on
    several replicas.

    Larq-zoo models are built by larq-zoo. Larq's `CaseOptimizer` (for `Bop`) only
    accepts `tf.keras.optimizers.legacy` optimizers with TensorFlow >= 2.11:
    `CaseOptimizer((Bop.is_binary_variable, Bop()),
    default_optimizer=tf.keras.optimizers.legacy.Adam(1e-3))`. Bop only flips signs and
    never changes latent magnitudes, so with Bop an L1,inf regularizer cannot move the
    magnitude-aware scale (a constraint still can); the L1,inf method is meant for
    optimizers that train the latent weights (Adam, SGD).

    # Arguments
        name: a name from `available()` or an alias (case-insensitive, `_` = `-`).
        num_classes: number of logits.
        input_shape: `(height, width, channels)` of the images.
        weight_bits, activation_bits: the bit widths; see `BIT_WIDTHS`.
        kernel_quantizer: replaces the default 1-bit kernel quantizer (weight_bits=1).
        kernel_constraint: replaces the default kernel constraint (`"none"`: none).
        kernel_regularizer: regularizer of every binarized layer's latent kernel.
        synchronized_bn: synchronized BatchNorm (see above).
        weights: None (random initialization); a path for `model.load_weights` (a
            TensorFlow checkpoint or `.h5`/`.weights.h5` file saved from the same
            model); or, for larq-zoo models only, `"imagenet"`, which larq-zoo downloads
            (needs network, `num_classes=1000`, `input_shape=(224, 224, 3)`).
        **model_kwargs: per model (see `entry(name).model_kwargs`): `mean`, `std` (input
            normalization); CIFAR models also `activation` (after each BatchNorm;
            default `"hard_tanh"` with binary activations, `"relu"` otherwise) and
            `name` (model name); ResNets also `shortcut` (`"pad"`: parameter-free,
            default for ResNet-20; `"conv"`: 1x1 conv + BN, default for ResNet-18).

    # Returns
        An uncompiled `tf.keras.Model` mapping `(batch, *input_shape)` images in [0, 1]
        to `(batch, num_classes)` logits.

    # Raises
        ValueError: for an unknown name (the message lists the available ones), an
            unsupported bit width or combination, or an invalid argument.
        TypeError: for a keyword argument the model does not take.
        FileNotFoundError: if `weights` names a file that does not exist.
        OSError: if larq-zoo cannot download the ImageNet weights (offline).

    # Example
    ```python
    from larq_lipschitz.regularizers import L1InfLipschitz

    model = get("resnet20", kernel_regularizer=L1InfLipschitz(1e-5))
    teacher = get("resnet20", weight_bits=32, activation_bits=32)
    logits = model(tf.random.uniform((2, 32, 32, 3)))
    ```
    """
    spec = entry(name)
    num_classes = _check_int(num_classes, "num_classes")
    shape = _check_input_shape(input_shape)
    for value, what in (
        (weight_bits, "weight_bits"),
        (activation_bits, "activation_bits"),
    ):
        if not _is_int(value):
            raise ValueError(f"{spec.name}: {what} must be an integer, got {value!r}.")
    weight_bits, activation_bits = int(weight_bits), int(activation_bits)
    if (weight_bits, activation_bits) not in spec.bit_widths:
        raise ValueError(
            f"{spec.name}: weight_bits={weight_bits}, activation_bits={activation_bits} "
            f"is not supported; supported W/A: {_widths(spec)}."
        )
    if not isinstance(synchronized_bn, bool):
        raise ValueError(
            f"{spec.name}: synchronized_bn must be a bool, got {synchronized_bn!r}."
        )
    unknown = sorted(set(model_kwargs) - set(spec.model_kwargs))
    if unknown:
        raise TypeError(
            f"{spec.name}: unexpected keyword argument(s) {', '.join(unknown)}; this "
            f"model also takes: {', '.join(spec.model_kwargs) or 'nothing else'}."
        )
    _check_quantizer(kernel_quantizer, weight_bits, spec.name)
    _check_control(kernel_constraint, "kernel_constraint", spec.name)
    _check_control(kernel_regularizer, "kernel_regularizer", spec.name)
    _check_weights(weights, spec.family, spec.name)
    no_constraint = (
        isinstance(kernel_constraint, str) and kernel_constraint == NO_CONSTRAINT
    )
    constraint = None if no_constraint else kernel_constraint

    if spec.family == "larq-zoo":
        model = zoo.build(
            spec.name,
            num_classes=num_classes,
            input_shape=shape,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            kernel_quantizer=kernel_quantizer,
            kernel_constraint=constraint,
            replace_constraint=kernel_constraint is not None,
            kernel_regularizer=kernel_regularizer,
            synchronized_bn=synchronized_bn,
            weights=weights,
            **model_kwargs,
        )
    else:
        binary_weights = weight_bits == 1
        if kernel_constraint is None:
            constraint = DEFAULT_KERNEL_CONSTRAINT if binary_weights else None
        binarization = cifar.Binarization(
            input_quantizer=DEFAULT_INPUT_QUANTIZER if activation_bits == 1 else None,
            kernel_quantizer=(
                DEFAULT_KERNEL_QUANTIZER
                if kernel_quantizer is None
                else kernel_quantizer
            )
            if binary_weights
            else None,
            kernel_constraint=constraint,
            kernel_regularizer=kernel_regularizer,
        )
        kwargs = dict(model_kwargs)
        kwargs.setdefault(
            "name", f"{spec.name.replace('-', '_')}_w{weight_bits}a{activation_bits}"
        )
        model = spec.builder(
            num_classes=num_classes,
            input_shape=shape,
            binarization=binarization,
            synchronized_bn=synchronized_bn,
            **kwargs,
        )
        if weights is not None:
            model.load_weights(os.fspath(weights))
    if kernel_regularizer is not None or kernel_constraint is not None:
        _check_controls(model)
    log.debug("Built %s (%d parameters).", model.name, model.count_params())
    return model


def stage_output_names(model: tf.keras.Model) -> list[str]:
    """Names of the model's stage outputs, `stage1_out`, `stage2_out`, ..., in order.

    Registry models name the output layer of each stage this way: ResNet-20 has 3
    stages, ResNet-18 4, VGG-Small 3 (one per max-pool block), the larq-zoo models 4
    (the last residual addition at each resolution). These are the features the LCR
    baseline compares with those of the same model at 32/32.

    # Raises
        ValueError: if the model has no such layers or the numbering has a gap.

    # Example
    ```python
    names = stage_output_names(get("resnet20"))
    assert names == ["stage1_out", "stage2_out", "stage3_out"]
    ```
    """
    found = []
    for layer in model.layers:
        match = STAGE_NAME_PATTERN.match(layer.name)
        if match:
            found.append((int(match.group(1)), layer.name))
    found.sort()
    if not found:
        raise ValueError(
            f"Model {model.name!r} has no layers named stage1_out, stage2_out, ...; "
            "the registry's models have them (larq_lipschitz.models.get)."
        )
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(
            f"Model {model.name!r}: stage outputs are numbered {numbers}, expected "
            f"1..{len(found)} without gaps."
        )
    return [layer_name for _, layer_name in found]


def _binary_param_count(model: tf.keras.Model) -> int:
    count = 0
    for layer in binarized_layers(model):
        quantizer = getattr(layer, "kernel_quantizer", None) or getattr(
            layer, "depthwise_quantizer", None
        )
        if getattr(quantizer, "precision", None) == 1:
            kernel = getattr(layer, "depthwise_kernel", None) or layer.kernel
            count += int(kernel.shape.num_elements())
    return count


def model_figures(model: tf.keras.Model) -> dict[str, Any]:
    """Larq-summary-style figures of a built model, as plain Python values.

    - `params`: trainable parameters (what papers quote; BatchNorm moving statistics
      and the fixed normalization are not counted);
    - `binary_params`: kernel weights stored in 1 bit (kernels of binarized layers whose
      quantizer has precision 1);
    - `binarized_layers`: number of binarized layers;
    - `memory_mib`: size of all weights, moving statistics included, with 1 bit per
      binary weight and 32 bits for every other value, in MiB (2^20 bytes);
    - `fp32_memory_mib`: the same with every value in 32 bits.

    # Example
    ```python
    figures = model_figures(get("resnet20"))
    assert figures["binarized_layers"] == 18
    ```
    """
    trainable = sum(int(w.shape.num_elements()) for w in model.trainable_weights)
    total = sum(int(w.shape.num_elements()) for w in model.weights)
    binary = _binary_param_count(model)
    bits = binary + 32 * (total - binary)
    return {
        "params": trainable,
        "binary_params": binary,
        "binarized_layers": len(binarized_layers(model)),
        "memory_mib": round(bits / 8 / 2**20, 3),
        "fp32_memory_mib": round(32 * total / 8 / 2**20, 3),
    }


def describe(
    names: Sequence[str] | None = None,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
) -> list[dict[str, Any]]:
    """One row of plain values per model, for `larq-lipschitz models` (and JSON).

    Each model is built at 1/1 bits with `num_classes` and `input_shape` (larq-zoo
    models at 32x32 too, so their counts are not the ImageNet ones). Columns: `name`,
    `family`, `params`, `binary_params`, `binarized_layers`, `memory_mib`,
    `fp32_memory_mib` (see `model_figures`), `bit_widths` (W/A, e.g.
    `"1/1, 1/32, 32/32"`), `aliases` and `reference`. Building every model takes some
    seconds.

    # Example
    ```python
    rows = describe(["resnet20", "vgg-small"])
    assert rows[0]["binarized_layers"] == 18
    ```
    """
    rows = []
    for model_name in available() if names is None else names:
        spec = entry(model_name)
        model = get(spec.name, num_classes=num_classes, input_shape=input_shape)
        figures = model_figures(model)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                **figures,
                "bit_widths": _widths(spec),
                "aliases": ", ".join(spec.aliases),
                "reference": spec.reference,
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# Loading a saved model
# --------------------------------------------------------------------------------------


class ModelFileError(ValueError):
    """A saved model file is corrupt, foreign, or holds weights that are not finite."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _check_keras_archive(path: pathlib.Path) -> None:
    """Refuse a `.keras` file that is not an intact zip of a Keras 2 model."""
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path}: not a valid .keras model file (no zip directory: the file is "
            "truncated or corrupt); copy or save it again."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC
            names = set(archive.namelist())
            metadata = (
                archive.read("metadata.json") if "metadata.json" in names else None
            )
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ModelFileError(
            f"{path}: the model file is corrupt ({_first_line(err)}); copy or save it "
            "again."
        ) from None
    if damaged is not None:
        raise ModelFileError(
            f"{path}: the model file is corrupt (member {damaged} fails its CRC check); "
            "copy or save it again."
        )
    if "config.json" not in names:
        raise ModelFileError(
            f"{path}: not a Keras model file (the zip holds no config.json)."
        )
    try:
        version = str(json.loads(metadata or b"{}").get("keras_version", ""))
    except (ValueError, AttributeError):
        version = ""
    if version and not version.startswith("2."):
        raise ModelFileError(
            f"{path}: saved by Keras {version}, but larq-lipschitz runs on Keras 2 "
            "(tf-keras 2.x) and cannot load it; save the model with tf-keras, or "
            "retrain it with this package."
        )


def _layers_of(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(_layers_of(layer))
        else:
            found.append(layer)
    return found


def check_finite_weights(model: tf.keras.Model, where: str = "") -> None:
    """Raise `ModelFileError` naming the first layer whose weights are not all finite.

    Every weight counts, BatchNorm moving statistics included: a NaN moving variance
    makes every prediction NaN as surely as a NaN kernel does.

    # Arguments
        model: a built Keras model.
        where: what to name at the start of the message (e.g. the model's file).

    # Raises
        ModelFileError: a weight holds NaN or infinite values.

    # Example
    ```python
    check_finite_weights(get("resnet20"))  # a fresh model passes
    ```
    """
    prefix = f"{where}: " if where else ""
    for layer in _layers_of(model):
        for weight in layer.weights:
            values = np.asarray(weight.numpy())
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise ModelFileError(
                    f"{prefix}layer {layer.name!r} holds {bad} NaN or infinite values "
                    f"in {weight.name} (of {values.size}); a model whose training "
                    "diverged cannot be evaluated or deployed: retrain it."
                )


def load_saved(path: str | os.PathLike, *, check_finite: bool = True) -> tf.keras.Model:
    """Load a saved Keras model (`.keras`, `.h5` or a SavedModel folder), uncompiled.

    The file is checked before Keras sees it, so that what is wrong with it comes out as
    one line naming the file rather than as a traceback from deep inside Keras:

    - a `.keras` file must be an intact zip (every member passes its CRC check) holding
      `config.json`, written by Keras 2 (`metadata.json`'s `keras_version` 2.x; a
      Keras 3 file is refused with that reason);
    - whatever Keras then fails on (an unknown layer class, e.g. from another version
      of this package, a weights file that does not fit the configuration) is reported
      with the first line of its message;
    - with `check_finite`, every weight of the loaded model must be finite (see
      `check_finite_weights`).

    # Arguments
        path: the saved model.
        check_finite: refuse a model with NaN or infinite weights.

    # Returns
        The loaded, uncompiled `tf.keras.Model`.

    # Raises
        FileNotFoundError: nothing exists at `path`.
        ModelFileError: (a `ValueError`) the file is corrupt, truncated, foreign,
            written by Keras 3, not loadable, or holds non-finite weights.

    # Example
    ```python
    model = get("resnet20")
    model.save("/tmp/resnet20.keras")
    again = load_saved("/tmp/resnet20.keras")
    ```
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file.")
    if path.is_file() and path.suffix == ".keras":
        _check_keras_archive(path)
    try:
        model = tf.keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises anything from ValueError to KeyError here
        raise ModelFileError(
            f"{path}: cannot be loaded as a Keras model ({_first_line(err)}); it may "
            "have been saved by another version of larq-lipschitz, Larq or Keras."
        ) from None
    if check_finite:
        check_finite_weights(model, str(path))
    return model
