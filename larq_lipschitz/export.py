"""Deployment with Larq Compute Engine: convert, run, verify and evaluate a BNN.

Larq Compute Engine (LCE, `pip install larq-lipschitz[deploy]`) turns a trained Keras
model into a TensorFlow Lite flatbuffer (`.tflite`) in which binarized convolutions are
true binary operators: bitpacked weights, XNOR-popcount arithmetic. This module wraps
that step and checks what came out of it:

- `convert(model, path)` writes the flatbuffer atomically and reports its size, the
  size of the float32 Keras weights, the operators of the converted graph and, for every
  layer with a kernel, the operator it became (`operator_report`).
- `DeployedModel(path)` runs a flatbuffer with LCE's interpreter (`predict` -> logits).
- `verify(model, deployed, dataset)` compares the two on real images: agreement of the
  predicted classes, largest logit difference, both accuracies.
- `evaluate_deployed(path, dataset, noise_sigmas)` measures the clean and Gaussian-noise
  accuracy of the converted model, with the noise of `larq_lipschitz.evaluation`.
- `larq_lipschitz.robustness.run_suite(DeployedModel(path), ...)` runs the noise and
  CIFAR-10-C suites on the converted model (`larq-lipschitz evaluate RUN_DIR
  --deployed`); attacks and certificates need the Keras model.

Which layers become binary operators (observed with LCE 0.16): a Larq `QuantConv2D`
whose input *and* kernel are binarized (1/1 bits) becomes `LceBconv2d`, fed by an
`LceQuantize` that bitpacks its input. Everything else stays a float operator with
float32 weights: convolutions with real inputs (1/32 bits, and the full-precision first
layer) become `CONV_2D`, binarized `QuantDense` and `QuantDepthwiseConv2D` layers become
an `LceQuantize`/`LceDequantize` pair followed by `FULLY_CONNECTED` or
`DEPTHWISE_CONV_2D`. BatchNorm after a binary convolution is folded into it.

```python
import larq_lipschitz
import numpy as np
from larq_lipschitz import export, models

model = models.get("resnet20")
report = export.convert(model, "/tmp/resnet20.tflite")
deployed = export.DeployedModel("/tmp/resnet20.tflite")
logits = deployed.predict(np.random.rand(4, 32, 32, 3).astype("float32"))
```
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from larq_lipschitz import evaluation, perturbations, quantization, runs
from larq_lipschitz.apply import binarized_layers

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = [
    "INSTALL_HINT",
    "LCE_OPERATORS",
    "MATCH_RTOL",
    "DeployedModel",
    "ExportError",
    "LCENotInstalledError",
    "convert",
    "evaluate_deployed",
    "operator_report",
    "verify",
]

#: Custom operators that LCE's interpreter implements.
LCE_OPERATORS = ("LceBconv2d", "LceQuantize", "LceDequantize", "LceBMaxPool2d")
#: The command that installs Larq Compute Engine with this package.
INSTALL_HINT = (
    'pip install "larq-lipschitz[deploy]"; from a source checkout, '
    'pip install -e ".[deploy]"'
)

#: Relative tolerance under which `verify` counts an image's logits as matching.
MATCH_RTOL = 1e-4

_TFLITE_IDENTIFIER = b"TFL3"
_WEIGHTED_FLOAT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_FLOAT32, _INT32 = 0, 2  # tflite TensorType values


class ExportError(RuntimeError):
    """A model cannot be converted, or a flatbuffer cannot be run."""


class LCENotInstalledError(ImportError):
    """Larq Compute Engine is not installed (it is the `deploy` extra)."""


def _lce():
    """The `larq_compute_engine` module, or a clear error naming the install command."""
    try:
        import larq_compute_engine
    except ImportError as err:
        raise LCENotInstalledError(
            "larq-compute-engine is needed to convert or run a deployed model and "
            f"cannot be imported ({err}); install it with `{INSTALL_HINT}`."
        ) from None
    return larq_compute_engine


def _schema():
    _lce()
    from larq_compute_engine.mlir.python import tflite_schema

    return tflite_schema


# --------------------------------------------------------------------------------------
# Reading a flatbuffer
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int
    data: np.ndarray | None  # raw bytes of a constant, None for activations


@dataclasses.dataclass
class _Operator:
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]
    options: dict | None


@dataclasses.dataclass
class _Graph:
    tensors: list[_Tensor]
    operators: list[_Operator]


def _builtin_names(schema) -> dict[int, str]:
    return {
        value: key
        for key, value in vars(schema.BuiltinOperator).items()
        if not key.startswith("_") and isinstance(value, int)
    }


def _read_graph(flatbuffer: bytes) -> _Graph:
    """The first subgraph of a TFLite flatbuffer as plain Python objects."""
    import flatbuffers.flexbuffers

    schema = _schema()
    if len(flatbuffer) < 8 or flatbuffer[4:8] != _TFLITE_IDENTIFIER:
        raise ExportError("not a TensorFlow Lite flatbuffer (no TFL3 identifier).")
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    if model.SubgraphsLength() != 1:
        raise ExportError(
            f"expected a flatbuffer with one subgraph, found {model.SubgraphsLength()}."
        )
    builtin = _builtin_names(schema)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        if custom:
            codes.append(custom.decode())
        else:
            number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            codes.append(builtin.get(number, f"BUILTIN_{number}"))
    sub = model.Subgraphs(0)
    tensors = []
    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        buffer = model.Buffers(t.Buffer())
        data = buffer.DataAsNumpy() if buffer.DataLength() else None
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensors.append(_Tensor((t.Name() or b"").decode(), shape, t.Type(), data))
    operators = []
    for i in range(sub.OperatorsLength()):
        op = sub.Operators(i)
        options = None
        if op.CustomOptionsLength():
            raw = bytes(op.CustomOptionsAsNumpy())
            try:
                options = flatbuffers.flexbuffers.Loads(raw)
            except Exception:  # options of foreign custom ops need not be flexbuffers
                options = None
        operators.append(
            _Operator(
                i,
                codes[op.OpcodeIndex()],
                [int(op.Inputs(j)) for j in range(op.InputsLength())],
                [int(op.Outputs(j)) for j in range(op.OutputsLength())],
                options,
            )
        )
    return _Graph(tensors, operators)


def _constant(graph: _Graph, index: int, dtype: str) -> np.ndarray | None:
    if index < 0 or graph.tensors[index].data is None:
        return None
    t = graph.tensors[index]
    return np.frombuffer(t.data.tobytes(), dtype).reshape(t.shape)


# --------------------------------------------------------------------------------------
# Which Keras layer became which operator
# --------------------------------------------------------------------------------------


def _kernel_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(_kernel_layers(layer))
        elif (
            quantization.kernel_layout(layer) is not None
            and quantization.kernel_variable(layer) is not None
        ):
            found.append(layer)
    return found


def _keras_rows(layer: tf.keras.layers.Layer) -> np.ndarray:
    """The effective kernel with one row per output unit, in TFLite's weight order."""
    kernel = quantization.effective_kernel(layer).numpy()
    if quantization.kernel_layout(layer) == "depthwise":
        kernel = kernel.reshape(*kernel.shape[:-2], -1)  # (..., c * multiplier)
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


def _bconv_rows(graph: _Graph, op: _Operator) -> np.ndarray | None:
    """The +-1 filter of an LceBconv2d (bitpacked along input channels, bit 1 = -1)."""
    if graph.tensors[op.inputs[1]].dtype == _FLOAT32:  # an unpacked (OHWI) filter
        weights = _constant(graph, op.inputs[1], "<f4")
        return None if weights is None else weights.reshape(weights.shape[0], -1)
    words = _constant(graph, op.inputs[1], "<u4")
    channels = (op.options or {}).get("channels_in")
    if words is None or channels is None or graph.tensors[op.inputs[1]].dtype != _INT32:
        return None
    bits = np.unpackbits(
        words.view(np.uint8).reshape(*words.shape, 4), axis=-1, bitorder="little"
    )
    bits = bits.reshape(*words.shape[:-1], -1)[..., :channels]
    return (1.0 - 2.0 * bits).reshape(words.shape[0], -1)


def _float_rows(graph: _Graph, op: _Operator) -> np.ndarray | None:
    if len(op.inputs) < 2 or graph.tensors[op.inputs[1]].dtype != _FLOAT32:
        return None
    weights = _constant(graph, op.inputs[1], "<f4")
    if weights is None:
        return None
    if op.name == "DEPTHWISE_CONV_2D":
        return np.moveaxis(weights, -1, 0).reshape(weights.shape[-1], -1)
    return weights.reshape(weights.shape[0], -1)  # (out, ...) for CONV_2D and dense


def _same_signs(binary: np.ndarray, rows: np.ndarray) -> bool:
    # Larq's sign maps 0 to +1, like LCE's bitpacking.
    return binary.shape == rows.shape and bool(np.all((rows < 0) == (binary < 0)))


def _scaled_copy(stored: np.ndarray, rows: np.ndarray, rtol: float = 1e-3) -> bool:
    """Whether `stored[o, i] = a_o * rows[o, i] * b_i` for some factors a and b.

    A BatchNorm folded into a layer's outputs scales rows (a); one folded into its
    inputs, as the converter does with a BatchNorm before a dense layer, scales
    columns (b).
    """
    if stored.shape != rows.shape or rows.size == 0:
        return False
    nonzero = rows != 0
    if not np.all(stored[~nonzero] == 0):
        return False
    ratio = np.where(nonzero, stored / np.where(nonzero, rows, 1.0), 0.0)
    o, i = np.unravel_index(np.argmax(np.abs(rows)), rows.shape)
    if ratio[o, i] == 0:
        return False
    expected = rows * np.outer(ratio[:, i], ratio[o, :] / ratio[o, i])
    size = np.abs(stored).max()
    return bool(np.abs(stored - expected).max() <= rtol * size + 1e-12)


def _match_by_name(graph: _Graph, candidates, used: set[int], name: str):
    """An unused float operator whose output tensor names mention the layer.

    The fallback for float layers whose weights the converter rewrote beyond factors
    per output and per input. Binary
    convolutions are only ever matched by their bits: their output tensors are often
    named after the next layer.
    """
    pattern = re.compile(rf"(^|/){re.escape(name)}(/|$)")
    for op, _, is_binary in candidates:
        if op.index in used or is_binary:
            continue
        names = [graph.tensors[i].name for i in op.outputs if i >= 0]
        if any(pattern.search(part) for n in names for part in n.split(";")):
            used.add(op.index)
            return op
    return None


def operator_report(
    model: tf.keras.Model, flatbuffer: bytes | str | os.PathLike
) -> dict:
    """The operators of a converted model and the operator each kernel layer became.

    Layers are matched to operators by their weights, not by tensor names (TFLite keeps
    only the first 50 characters of a name and fuses names): an `LceBconv2d` belongs to
    the layer whose effective binary kernel has exactly its bitpacked signs, and a float
    `CONV_2D`, `DEPTHWISE_CONV_2D` or `FULLY_CONNECTED` to the layer whose effective
    kernel it equals up to one factor per output unit and one per input (BatchNorms
    folded into it); a float layer still unmatched is looked up by tensor name.

    # Arguments
        model: the Keras model that was converted.
        flatbuffer: the converted model, as bytes or the path of a `.tflite` file.

    # Returns
        `{"operators": {name: count}, "layers": [row, ...]}` with one row per layer that
        has a kernel, in model order: `layer`, `class`, `binarized` (a Larq layer
        whose kernel quantizer is not the identity), `binary_input` (it also
        binarizes its input), `deployed_as` (operator name, or None where the
        converter rewrote the layer past recognition), `operator_index` (position in
        the converted graph, or None),
        `binary` (it became a true binary operator), `weight_bits` (1 or 32 as stored,
        None if unknown) and `bitpacked_output` (an `LceBconv2d` writing 1-bit output
        straight to the next binary layer; None for other operators).

    # Raises
        ExportError: if `flatbuffer` is not a TFLite flatbuffer.
    """
    if not isinstance(flatbuffer, bytes | bytearray):
        flatbuffer = pathlib.Path(flatbuffer).read_bytes()
    graph = _read_graph(bytes(flatbuffer))
    counts = collections.Counter(op.name for op in graph.operators)
    candidates = []
    for op in graph.operators:
        if op.name == "LceBconv2d":
            candidates.append((op, _bconv_rows(graph, op), True))
        elif op.name in _WEIGHTED_FLOAT_OPS:
            candidates.append((op, _float_rows(graph, op), False))
    used: set[int] = set()
    rows = []
    for layer in _kernel_layers(model):
        keras_rows = _keras_rows(layer)
        match = None
        for op, stored, is_binary in candidates:
            if op.index in used or stored is None:
                continue
            same = _same_signs if is_binary else _scaled_copy
            if same(stored, keras_rows):
                match = op
                used.add(op.index)
                break
        if match is None:
            match = _match_by_name(graph, candidates, used, layer.name)
        binary = match is not None and match.name == "LceBconv2d"
        bitpacked = None
        if binary:
            bitpacked = graph.tensors[match.outputs[0]].dtype == _INT32
        rows.append(
            {
                "layer": layer.name,
                "class": type(layer).__name__,
                "binarized": quantization.is_binarized(layer),
                "binary_input": getattr(layer, "input_quantizer", None) is not None,
                "deployed_as": None if match is None else match.name,
                "operator_index": None if match is None else match.index,
                "binary": binary,
                "weight_bits": None if match is None else (1 if binary else 32),
                "bitpacked_output": bitpacked,
            }
        )
    return {"operators": dict(sorted(counts.items())), "layers": rows}


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


def _float32_bytes(model: tf.keras.Model) -> int:
    return 4 * sum(int(np.prod(w.shape)) for w in model.weights)


def _layer_names(model: tf.keras.Model) -> list[str]:
    names = []
    for layer in model.layers:
        names.append(layer.name)
        if isinstance(layer, tf.keras.Model):
            names.extend(_layer_names(layer))
    return names


def _named_layer(text: str, model: tf.keras.Model) -> str | None:
    """The longest layer name that appears as a path component in `text`."""
    hits = [
        name
        for name in _layer_names(model)
        if re.search(rf"(^|[/;:\"' ]){re.escape(name)}(/|$|[;:\"' ])", text)
    ]
    return max(hits, key=len) if hits else None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _untrained_batchnorm(model: tf.keras.Model) -> list[str]:
    names = []
    for layer in model.submodules:
        if isinstance(layer, tf.keras.layers.BatchNormalization) and layer.built:
            if not np.any(layer.beta.numpy() if layer.center else 0) and not np.any(
                layer.moving_mean.numpy()
            ):
                names.append(layer.name)
    return names


def convert(model: tf.keras.Model, path: str | os.PathLike) -> dict:
    """Convert a Keras model to an LCE flatbuffer at `path`, written atomically.

    The model is converted with `larq_compute_engine.convert_keras_model` (float32 input
    and output, target "arm"; the same file runs on x86 through LCE's reference
    kernels). The bytes go to a temporary file in the target's folder that is renamed
    over `path`, so `path` holds either its old content or the complete new model. A
    model whose converted graph still contains an operator that neither TFLite nor LCE
    implements (LCE's converter emits such operators as unresolved custom operators
    instead of failing) is refused, and nothing is written.

    The flatbuffer has a fixed batch size: 1 for a model built with an unspecified
    batch dimension (`DeployedModel` runs larger batches one slice at a time).

    # Arguments
        model: a built `tf.keras.Model` on float32 inputs.
        path: where to write the `.tflite` file; missing folders are created.

    # Returns
        A dict of plain values: `path`; `tflite_bytes`, the file size; `float32_bytes`,
        4 bytes for every value in `model.weights` (moving statistics included), the
        size of the Keras model stored in float32; `size_ratio = float32_bytes /
        tflite_bytes`; `binarized_layers` and `binary_layers`, how many layers the
        Keras model binarizes and how many became binary operators;
        `convert_seconds`; `larq_compute_engine`, its version; and
        `operator_report`'s `operators` and `layers`.

    # Raises
        LCENotInstalledError: larq-compute-engine is missing.
        ExportError: the model cannot be converted (the message names the layer when
            the converter's error or the unsupported operator reveals it).
        TypeError: `model` is not a Keras model.

    ```python
    report = convert(models.get("resnet20"), "resnet20.tflite")
    assert report["binary_layers"] == report["binarized_layers"] == 18
    ```
    """
    if not isinstance(model, tf.keras.Model):
        raise TypeError(
            f"convert: model must be a tf.keras.Model, got {type(model).__name__}."
        )
    lce = _lce()
    path = pathlib.Path(path)
    if path.is_dir():
        raise ExportError(
            f"convert: {path} is a folder; give the path of a .tflite file."
        )
    untrained = _untrained_batchnorm(model)
    if untrained and any(
        getattr(layer, "input_quantizer", None) is not None
        for layer in binarized_layers(model)
    ):
        log.warning(
            "convert: %d BatchNormalization layers of %r still have zero beta and "
            "moving mean (an untrained model): pre-activations of binary layers can be "
            "exactly 0 there, and float rounding decides their sign differently in "
            "Keras and in LCE, so the two may disagree; train before deploying.",
            len(untrained),
            model.name,
        )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            flatbuffer = lce.convert_keras_model(model)
        except Exception as err:
            where = _named_layer(str(err), model)
            at = f" at layer {where!r}" if where else ""
            raise ExportError(
                f"Larq Compute Engine cannot convert model {model.name!r}{at}: "
                f"{_first_line(err)}"
            ) from err
    for w in caught:
        log.info("convert: larq-compute-engine: %s", str(w.message).strip())
    seconds = time.perf_counter() - start
    graph = _read_graph(flatbuffer)
    builtin = set(_builtin_names(_schema()).values())
    for op in graph.operators:
        if op.name not in builtin and op.name not in LCE_OPERATORS:
            names = " ".join(graph.tensors[i].name for i in op.outputs if i >= 0)
            where = _named_layer(names, model)
            at = f" (layer {where!r})" if where else ""
            raise ExportError(
                f"Larq Compute Engine cannot convert model {model.name!r}: operator "
                f"{op.name!r}{at} has no TFLite or LCE kernel; the converted model could "
                "not run."
            )
    try:
        lce.testing.Interpreter(flatbuffer)
    except Exception as err:
        raise ExportError(
            f"the model {model.name!r} converted, but LCE's interpreter cannot load the "
            f"result ({_first_line(err)})."
        ) from None
    report = operator_report(model, flatbuffer)
    runs.atomic_write_bytes(path, flatbuffer)
    binarized = [r for r in report["layers"] if r["binarized"]]
    binary = [r for r in report["layers"] if r["binary"]]
    stay_float = [r["layer"] for r in binarized if r["deployed_as"] and not r["binary"]]
    unknown = [r["layer"] for r in binarized if not r["deployed_as"]]
    if unknown:
        log.warning(
            "convert: no operator of the flatbuffer could be matched to the binarized "
            "layers %s (the converter rewrote them); see the operator counts.",
            ", ".join(unknown),
        )
    if stay_float:
        log.warning(
            "convert: %d of %d binarized layers stay float operators with float32 "
            "weights (%s): LCE runs a binary convolution only for QuantConv2D layers "
            "whose input and kernel are both binarized.",
            len(stay_float),
            len(binarized),
            ", ".join(stay_float[:6]) + (", ..." if len(stay_float) > 6 else ""),
        )
    result = {
        "path": str(path),
        "tflite_bytes": len(flatbuffer),
        "float32_bytes": _float32_bytes(model),
        "size_ratio": _float32_bytes(model) / len(flatbuffer),
        "binarized_layers": len(binarized),
        "binary_layers": len(binary),
        "convert_seconds": seconds,
        "larq_compute_engine": getattr(lce, "__version__", "unknown"),
        **report,
    }
    log.info(
        "convert: wrote %s (%d bytes, float32 weights %d bytes, %d of %d binarized "
        "layers as binary operators) in %.1f s",
        path,
        result["tflite_bytes"],
        result["float32_bytes"],
        len(binary),
        len(binarized),
        seconds,
    )
    return result


# --------------------------------------------------------------------------------------
# Running and checking the deployed model
# --------------------------------------------------------------------------------------


class DeployedModel:
    """A converted `.tflite` model run by Larq Compute Engine's interpreter.

    `predict(images)` (or calling the object) returns the model's outputs (logits for
    the registry models) as a float32 NumPy array. The interpreter runs one batch of the
    flatbuffer's fixed batch size at a time (1 for models converted with an unspecified
    batch dimension); `predict` splits the images accordingly and pads the last slice.
    On x86 LCE falls back to its reference kernels: correct outputs, not ARM speed, so
    time measured here says nothing about a phone or a Raspberry Pi.

    Only models with one float32 input and one output are supported.

    # Arguments
        path: a `.tflite` file written by `convert`.
        num_threads: interpreter threads.

    # Raises
        FileNotFoundError: no such file.
        ExportError: the file is no TFLite flatbuffer, or the interpreter cannot
            load it.
        LCENotInstalledError: larq-compute-engine is missing.

    ```python
    deployed = DeployedModel("resnet20.tflite")
    logits = deployed.predict(images)  # images: (n, 32, 32, 3) float32 in [0, 1]
    ```
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1):
        if (
            isinstance(num_threads, bool)
            or not isinstance(num_threads, int)
            or num_threads < 1
        ):
            raise ValueError(
                f"DeployedModel: num_threads must be an integer >= 1, got {num_threads!r}."
            )
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such deployed model file.")
        data = self.path.read_bytes()
        if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
            raise ExportError(f"{self.path}: not a TensorFlow Lite flatbuffer.")
        lce = _lce()
        try:
            self._interpreter = lce.testing.Interpreter(data, num_threads=num_threads)
        except Exception as err:
            raise ExportError(
                f"{self.path}: the LCE interpreter cannot load it ({_first_line(err)})."
            ) from None
        shapes_in = self._interpreter.input_shapes
        shapes_out = self._interpreter.output_shapes
        if len(shapes_in) != 1 or len(shapes_out) != 1:
            raise ExportError(
                f"{self.path}: DeployedModel supports one input and one output, the "
                f"model has {len(shapes_in)} and {len(shapes_out)}."
            )
        if np.dtype(self._interpreter.input_types[0]) != np.float32:
            raise ExportError(
                f"{self.path}: DeployedModel needs a float32 input, the model takes "
                f"{np.dtype(self._interpreter.input_types[0])}."
            )
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in shapes_in[0])
        self.output_shape: tuple[int, ...] = tuple(int(d) for d in shapes_out[0])
        self.batch_size: int = self.input_shape[0]
        self.size_bytes: int = len(data)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Outputs for a batch of images, shape `(n, *output_shape[1:])`, float32.

        # Arguments
            images: `(n, *input_shape[1:])` floats (pixels in [0, 1] for the registry
                models; anything convertible with `np.asarray`, e.g. a tf.Tensor).

        # Raises
            ValueError: for integer images or a wrong shape.
        """
        x = np.asarray(images)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"DeployedModel.predict: images must be float pixels, got {x.dtype} "
                "(for uint8 images divide by 255 first)."
            )
        if x.ndim != len(self.input_shape) or x.shape[1:] != self.input_shape[1:]:
            raise ValueError(
                f"DeployedModel.predict: images must have shape (n, "
                f"{', '.join(map(str, self.input_shape[1:]))}), got {x.shape}."
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, b = x.shape[0], self.batch_size
        out = np.empty((n, *self.output_shape[1:]), np.float32)
        for start in range(0, n, b):
            chunk = x[start : start + b]
            size = chunk.shape[0]
            if size < b:
                pad = np.zeros((b - size, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            try:
                result = self._interpreter.interpreter.predict([chunk])
            except RuntimeError as err:
                raise ExportError(
                    f"{self.path}: the LCE interpreter failed ({_first_line(err)})."
                ) from None
            out[start : start + size] = np.asarray(result[0])[:size]
        return out

    __call__ = predict

    def __repr__(self) -> str:
        return (
            f"DeployedModel({str(self.path)!r}, input {self.input_shape}, "
            f"output {self.output_shape}, {self.size_bytes} bytes)"
        )


def _as_deployed(deployed: DeployedModel | str | os.PathLike) -> DeployedModel:
    if isinstance(deployed, DeployedModel):
        return deployed
    return DeployedModel(deployed)


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[-1] > 1:  # one-hot
        return y.argmax(axis=-1)
    return y.reshape(-1).astype(np.int64)


def _batches(dataset: Iterable, num_examples: int | None, caller: str):
    """`(index, images, labels)` of a batched dataset, cut after `num_examples`."""
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int)
        or num_examples < 1
    ):
        raise ValueError(
            f"{caller}: num_examples must be an integer >= 1 or None, got {num_examples!r}."
        )
    seen = 0
    for index, batch in enumerate(dataset):
        try:
            images, labels = batch[0], batch[1]
        except (TypeError, IndexError, KeyError):
            raise ValueError(
                f"{caller}: the dataset must yield (images, labels) batches."
            ) from None
        if len(np.shape(images)) != 4:
            raise ValueError(
                f"{caller}: the dataset must yield batched images (batch, height, width, "
                f"channels), got shape {tuple(np.shape(images))}; call .batch() first."
            )
        if num_examples is not None and seen + int(np.shape(images)[0]) > num_examples:
            keep = num_examples - seen
            images, labels = images[:keep], labels[:keep]
        perturbations.check_pixels(images, caller, f"batch {index}")
        yield index, images, labels
        seen += int(np.shape(images)[0])
        if num_examples is not None and seen >= num_examples:
            return


def verify(
    model: tf.keras.Model,
    deployed: DeployedModel | str | os.PathLike,
    dataset: Iterable,
    num_examples: int | None = None,
) -> dict:
    """Compare a Keras model with its deployed flatbuffer on the same images.

    Both see exactly the same batches; Keras runs in inference mode.

    - agreement = fraction of images with the same argmax class;
    - max_logit_difference = max over images and classes of |z_keras - z_deployed|
      (for a model ending in softmax this is the difference of probabilities);
    - logit_match_fraction = fraction of images with
      max_c |z_keras - z_deployed| <= MATCH_RTOL * max(1, max_c |z_keras|).

    In a network with binary activations the two agree to float rounding (about 1e-5)
    on almost every image, but a pre-activation within rounding distance of 0 can take
    a different sign in the two, and one flipped sign changes the logits by a visible
    amount: expect `max_logit_difference` to be set by a few such images, and judge the
    conversion by `agreement` and `logit_match_fraction`. Networks with real-valued
    activations (1/32, 32/32 bits) have no such jumps.

    # Arguments
        model: the Keras model.
        deployed: a `DeployedModel` or the path of its `.tflite` file.
        dataset: batched `(images, labels)`, e.g. a `tf.data.Dataset`; integer or
            one-hot labels.
        num_examples: use only the first `num_examples` images (all when None).

    # Returns
        `{"num_examples", "agreement", "disagreements", "max_logit_difference",
        "mean_logit_difference", "logit_match_fraction", "keras_accuracy",
        "deployed_accuracy", "deployed_seconds"}` as plain Python values
        (`deployed_seconds`: interpreter wall time for all images).

    # Raises
        ValueError: for an empty or unbatched dataset, a bad `num_examples`, or a batch
            with NaN, infinite or out-of-range pixels (named by batch and image).

    ```python
    report = verify(model, "resnet20.tflite", splits.test, num_examples=500)
    assert report["agreement"] > 0.99
    ```
    """
    deployed = _as_deployed(deployed)
    n = same = hits_keras = hits_deployed = matching = 0
    max_diff = sum_diff = 0.0
    seconds = 0.0
    for _, images, labels in _batches(dataset, num_examples, "verify"):
        x = np.asarray(images, dtype=np.float32)
        y = _labels(labels)
        keras_out = np.asarray(model(x, training=False), dtype=np.float64)
        start = time.perf_counter()
        lce_out = deployed.predict(x).astype(np.float64)
        seconds += time.perf_counter() - start
        diff = np.abs(keras_out - lce_out)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.mean(axis=-1).sum())
        scale = np.maximum(1.0, np.abs(keras_out).max(axis=-1))
        matching += int(np.sum(diff.max(axis=-1) <= MATCH_RTOL * scale))
        k_class, d_class = keras_out.argmax(-1), lce_out.argmax(-1)
        same += int(np.sum(k_class == d_class))
        hits_keras += int(np.sum(k_class == y))
        hits_deployed += int(np.sum(d_class == y))
        n += x.shape[0]
    if n == 0:
        raise ValueError("verify: the dataset is empty.")
    report = {
        "num_examples": n,
        "agreement": same / n,
        "disagreements": n - same,
        "max_logit_difference": max_diff,
        "mean_logit_difference": sum_diff / n,
        "logit_match_fraction": matching / n,
        "keras_accuracy": hits_keras / n,
        "deployed_accuracy": hits_deployed / n,
        "deployed_seconds": seconds,
    }
    log.info(
        "verify: %d images, agreement %.4f, max logit difference %.3g, accuracy Keras "
        "%.4f / deployed %.4f",
        n,
        report["agreement"],
        max_diff,
        report["keras_accuracy"],
        report["deployed_accuracy"],
    )
    return report


def evaluate_deployed(
    path: str | os.PathLike | DeployedModel,
    dataset: Iterable,
    noise_sigmas: Sequence[float] = evaluation.DEFAULT_NOISE_SIGMAS,
    *,
    seed: int = 0,
    num_examples: int | None = None,
) -> dict[str, float]:
    """Clean and Gaussian-noise accuracy of a deployed model.

    The noise is the one `larq_lipschitz.evaluation.noise_report` adds to a Keras model:
    `clip(x + sigma * z, 0, 1)` in [0, 1] pixel space, before the model's own
    normalization, with z drawn by `perturbations.add_noise` from the stateless seed
    `(seed, batch index)`. On the same batched dataset and seed, the Keras and the
    deployed numbers are therefore measured on identical noisy images.

    # Arguments
        path: the `.tflite` file (or a `DeployedModel`).
        dataset: batched `(images, labels)` with images in [0, 1].
        noise_sigmas: standard deviations in pixel units, each >= 0.
        seed: noise seed.
        num_examples: only the first `num_examples` images (all when None).

    # Returns
        `{"clean": acc, "gaussian_<sigma>": acc, ..., "num_examples": n,
        "test_seconds": s}` (keys as in `noise_report`; `test_seconds` is the wall
        time of the clean pass).

    # Raises
        ValueError: for a bad sigma, an empty or unbatched dataset, or a batch with
            NaN, infinite or out-of-range pixels (named by batch and image).

    ```python
    report = evaluate_deployed("resnet20.tflite", splits.test, (0.02, 0.05))
    ```
    """
    sigmas = list(noise_sigmas)
    bad = [
        s
        for s in sigmas
        if isinstance(s, bool)
        or not isinstance(s, int | float | np.number)
        or not np.isfinite(s)
        or not 0 <= s <= 1
    ]
    if bad:
        raise ValueError(
            "evaluate_deployed: noise sigmas must be finite numbers in [0, 1] (pixel "
            f"scale), got {bad}."
        )
    sigmas = [float(s) for s in sigmas]
    deployed = _as_deployed(path)
    perturb = {s: evaluation.gaussian_noise_fn(s, seed) for s in sigmas}
    correct = dict.fromkeys(["clean", *perturb], 0)
    n = 0
    seconds = 0.0
    for index, images, labels in _batches(dataset, num_examples, "evaluate_deployed"):
        y = _labels(labels)
        x = tf.convert_to_tensor(images, tf.float32)
        start = time.perf_counter()
        correct["clean"] += int(np.sum(deployed.predict(x.numpy()).argmax(-1) == y))
        seconds += time.perf_counter() - start
        for s, fn in perturb.items():
            noisy = fn(x, tf.constant(index, tf.int64)).numpy()
            correct[s] += int(np.sum(deployed.predict(noisy).argmax(-1) == y))
        n += len(y)
    if n == 0:
        raise ValueError("evaluate_deployed: the dataset is empty.")
    report: dict[str, float] = {"clean": correct["clean"] / n}
    for s in sigmas:
        report[f"gaussian_{s:g}"] = correct[s] / n
    report["num_examples"] = n
    report["test_seconds"] = seconds
    log.info(
        "evaluate_deployed: %s",
        ", ".join(
            f"{k} {v:.4f}"
            for k, v in report.items()
            if k not in ("num_examples", "test_seconds")
        ),
    )
    return report
