"""Hostile and broken inputs, one table: each row is one mistake a user can make.

A row names the entry point a user would hit (the command line, run in-process through
`larq_lipschitz.cli.main`, or the Python function when that is the entry point) and a
fragment of the message it must give. The test asserts, for a command, exit status 2
and exactly one line on stderr that starts with `larq-lipschitz [COMMAND]: error:` and
holds the fragment; for a function, the exception class and a one-line message with
the fragment. For every row that could write (train, evaluate, export, compare), the
folder it would write into is snapshotted byte by byte before and after: nothing may
change, and a folder that did not exist must still not exist.

The broken inputs are built here, in temporary folders: gzip tar archives in the
official CIFAR-10 binary layout (`cifar-10-batches-bin/data_batch_1.bin` ...,
3,073-byte records) with a few records, then truncated, with bytes flipped, with a
bad gzip header, or holding the members of another dataset; run folders holding a tiny
saved Larq model and a `results.json` written with `larq_lipschitz.runs`, then with an
incompatible results format, a truncated or bit-flipped `model.keras`, a model file
marked as written by Keras 3, a layer class this package does not know, NaN weights.
Nothing trains; only the unknown-model row reads the real CIFAR-10 archive.
"""

import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from typing import Any

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from larq_lipschitz import cli, export, models, perturbations, robustness, runs
from larq_lipschitz.data import DataFormatError, load_cifar10
from larq_lipschitz.models.registry import ModelFileError, load_saved
from larq_lipschitz.regularizers import L1InfLipschitz
from larq_lipschitz.training import TrainConfig

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

HAS_LCE = importlib.util.find_spec("larq_compute_engine") is not None
needs_lce = pytest.mark.skipif(not HAS_LCE, reason="larq-compute-engine not installed")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

RECORD = 3073
MEMBERS = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


# --------------------------------------------------------------------------------------
# Building the broken inputs
# --------------------------------------------------------------------------------------


def _records(count: int, record_bytes: int = RECORD, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, (count, record_bytes), dtype=np.uint8)
    table[:, 0] %= 10
    return table.tobytes()


def _tar_gz(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())
    return path


def _tiny_bnn() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    binary = dict(
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
    )
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input((32, 32, 3)),
            layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
            layers.BatchNormalization(),
            lq.layers.QuantConv2D(8, 3, padding="same", name="binary_conv", **binary),
            layers.BatchNormalization(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10, name="logits"),
        ],
        name="tiny_bnn",
    )


def _rewrite_zip(path: pathlib.Path, change: Callable[[dict[str, bytes]], None]):
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    change(files)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def _keras3_metadata(files: dict[str, bytes]) -> None:
    meta = json.loads(files["metadata.json"])
    files["metadata.json"] = json.dumps({**meta, "keras_version": "3.6.0"}).encode()


def _unknown_layer(files: dict[str, bytes]) -> None:
    config = json.loads(files["config.json"])
    layer = config["config"]["layers"][3]  # the QuantConv2D
    layer["class_name"] = "larq_lipschitz>FutureConv2D"
    layer.pop("module", None)
    layer.pop("registered_name", None)
    files["config.json"] = json.dumps(config).encode()


@dataclasses.dataclass
class World:
    """Every broken input, built once for the module."""

    root: pathlib.Path
    paths: dict[str, pathlib.Path]
    model: tf.keras.Model  # the tiny BNN of the run folders
    resnet20: tf.keras.Model
    _tflite: pathlib.Path | None = None

    def __getattr__(self, name: str) -> pathlib.Path:
        try:
            return self.__dict__["paths"][name]
        except KeyError:
            raise AttributeError(name) from None

    def tflite(self) -> pathlib.Path:
        """The tiny model converted with LCE (built on first use)."""
        if self._tflite is None:
            self._tflite = self.root / "tiny.tflite"
            export.convert(self.model, self._tflite)
        return self._tflite


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    paths: dict[str, pathlib.Path] = {"missing": root / "absent" / "cifar.tar.gz"}
    layout = {
        f"cifar-10-batches-bin/{m}": _records(3, seed=i) for i, m in enumerate(MEMBERS)
    }
    paths["few_records"] = _tar_gz(root / "few_records.tar.gz", layout)
    good = paths["few_records"].read_bytes()
    paths["truncated"] = root / "truncated.tar.gz"
    paths["truncated"].write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    middle = len(flipped) // 2
    flipped[middle : middle + 16] = bytes(
        b ^ 0xFF for b in flipped[middle : middle + 16]
    )
    paths["flipped"] = root / "flipped.tar.gz"
    paths["flipped"].write_bytes(bytes(flipped))
    paths["bad_gzip"] = root / "bad_gzip.tar.gz"
    paths["bad_gzip"].write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    paths["not_archive"] = (
        root / "cifar-10-binary.tar.gz"
    )  # the right name, wrong bytes
    paths["not_archive"].write_bytes(np.random.default_rng(1).bytes(5000))
    paths["cifar100"] = _tar_gz(
        root / "cifar-100-binary.tar.gz",
        {
            "cifar-100-binary/train.bin": _records(2, RECORD + 1),
            "cifar-100-binary/test.bin": _records(2, RECORD + 1),
        },
    )
    paths["cifar10_python"] = _tar_gz(
        root / "cifar-10-python.tar.gz",
        {
            "cifar-10-batches-py/data_batch_1": b"pickle",
            "cifar-10-batches-py/meta": b"",
        },
    )
    paths["random_members"] = _tar_gz(
        root / "random_members.tar.gz",
        {"photos/cat.jpg": b"\xff\xd8", "notes.txt": b"hi"},
    )
    folder = root / "cifar100_records" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for m in MEMBERS:
        (folder / m).write_bytes(_records(2, RECORD + 1))
    paths["cifar100_records"] = folder.parent
    folder = root / "member_is_folder" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for m in MEMBERS:
        (folder / m).mkdir()
    paths["member_is_folder"] = folder.parent
    paths["locked"] = root / "locked.tar.gz"
    paths["locked"].write_bytes(good)
    os.chmod(paths["locked"], 0)

    # A finished run, built without training, and its broken copies.
    model = _tiny_bnn()
    run = root / "run"
    run.mkdir()
    model.save(run / runs.MODEL_FILE)
    config = {"model": "tiny", "dataset": "cifar10", "data": str(paths["few_records"])}
    runs.atomic_write_json(
        run / runs.RESULTS_FILE,
        {"format": runs.RESULTS_FORMAT, "status": "finished", "config": config},
    )
    paths["run"] = run

    def variant(name: str, change: Callable[[pathlib.Path], None]) -> None:
        folder = root / name
        shutil.copytree(run, folder)
        change(folder)
        paths[name] = folder

    def results_format(folder):
        results = json.loads((folder / runs.RESULTS_FILE).read_text())
        (folder / runs.RESULTS_FILE).write_text(json.dumps({**results, "format": 999}))

    def truncate(folder):
        content = (folder / runs.MODEL_FILE).read_bytes()
        (folder / runs.MODEL_FILE).write_bytes(content[: len(content) // 2])

    def flip(folder):
        content = bytearray((folder / runs.MODEL_FILE).read_bytes())
        at = len(content) // 3
        content[at : at + 64] = bytes(b ^ 0xFF for b in content[at : at + 64])
        (folder / runs.MODEL_FILE).write_bytes(bytes(content))

    def nan_weights(folder):
        broken = tf.keras.models.clone_model(model)
        broken.set_weights(model.get_weights())
        kernel = broken.get_layer("binary_conv").kernel
        kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0, 0, 0]], [np.nan]))
        broken.save(folder / runs.MODEL_FILE)

    def foreign_report(folder):
        (folder / robustness.REPORT_FILE).write_text(
            json.dumps({"format": 999, "clean_accuracy": 0.5})
        )

    variant("results_format", results_format)
    variant("results_not_json", lambda f: (f / runs.RESULTS_FILE).write_text("{oops"))
    variant("model_truncated", truncate)
    variant("model_flipped", flip)
    variant(
        "model_keras3", lambda f: _rewrite_zip(f / runs.MODEL_FILE, _keras3_metadata)
    )
    variant(
        "model_unknown_layer",
        lambda f: _rewrite_zip(f / runs.MODEL_FILE, _unknown_layer),
    )
    variant("model_nan", nan_weights)
    variant("foreign_report", foreign_report)
    variant(
        "junk_tflite", lambda f: (f / "model.tflite").write_bytes(b"0123456789abcdef")
    )
    variant("compared", lambda f: (f / "comparison.md").write_text("| run |\n"))

    # Output folders that belong to something else.
    other = root / "other_run"
    other.mkdir()
    other_config = TrainConfig(data=str(paths["few_records"]), seed=7).to_dict()
    runs.atomic_write_json(
        other / "run.json", {"format": runs.RESULTS_FORMAT, "config": other_config}
    )
    runs.atomic_write_json(
        other / runs.RESULTS_FILE,
        {"format": runs.RESULTS_FORMAT, "status": "finished", "config": other_config},
    )
    (other / runs.MODEL_FILE).write_bytes(b"the other run's model")
    paths["other_run"] = other
    foreign = root / "holiday_photos"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"\xff\xd8\xff")
    paths["foreign_folder"] = foreign
    return World(root, paths, model, models.get("resnet20"))


def _pixels(n: int = 4, shape=(32, 32, 3), dtype=np.float32, fill=None) -> np.ndarray:
    x = np.random.default_rng(0).random((n, *shape)).astype(dtype)
    if fill is not None:
        x[n - 1, 3, 4, 1] = fill
    return x


def _dataset(images: np.ndarray, batch: int = 2) -> tf.data.Dataset:
    labels = np.zeros(len(images), np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a row's callables see: the world, and a folder path of this test alone."""

    world: World
    fresh: pathlib.Path  # does not exist; a command that fails must not create it
    archive: pathlib.Path | None  # the real CIFAR-10 archive, for rows that need it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.world, name)


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    fragment: str  # must appear in the message
    argv: Callable[[Ctx], list[str]] | None = None  # a command line, or
    call: Callable[[Ctx], Any] | None = None  # a Python call
    error: type[BaseException] = ValueError  # what `call` raises
    watch: Callable[[Ctx], pathlib.Path] | None = None  # must stay byte-identical
    needs_archive: bool = False
    marks: tuple = ()


def train(c: Ctx, *extra: str) -> list[str]:
    return ["train", *extra, "--output", str(c.fresh)]


def on_data(name: str) -> Callable[[Ctx], list[str]]:
    return lambda c: train(c, "--data", str(getattr(c, name)))


def fresh(c: Ctx) -> pathlib.Path:
    return c.fresh


def folder(name: str) -> Callable[[Ctx], pathlib.Path]:
    return lambda c: getattr(c, name)


ROWS = [
    # --- data paths and archives (train reads them first; nothing may be written) ---
    Row("data-missing", "no such file or folder", on_data("missing"), watch=fresh),
    Row(
        "data-unreadable",
        "cannot be read (Permission denied)",
        on_data("locked"),
        watch=fresh,
        marks=(
            pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway"),
        ),
    ),
    Row(
        "data-member-is-a-folder",
        "cannot be read, it is not a regular file",
        on_data("member_is_folder"),
        watch=fresh,
    ),
    Row(
        "archive-truncated",
        "the archive is truncated",
        on_data("truncated"),
        watch=fresh,
    ),
    Row(
        "archive-bytes-flipped",
        "the file is corrupt",
        on_data("flipped"),
        watch=fresh,
    ),
    Row(
        "archive-bad-gzip",
        "not a valid gzip/tar archive",
        on_data("bad_gzip"),
        watch=fresh,
    ),
    Row(
        "archive-random-bytes",
        "not a valid tar archive",
        on_data("not_archive"),
        watch=fresh,
    ),
    Row(
        "archive-too-few-records",
        "holds 3 records of 3,073 bytes, expected 10,000",
        on_data("few_records"),
        watch=fresh,
    ),
    Row(
        "archive-of-cifar100",
        "this archive is the CIFAR-100 binary version",
        on_data("cifar100"),
        watch=fresh,
    ),
    Row(
        "archive-of-cifar10-python",
        "the CIFAR-10 python (pickle) version",
        on_data("cifar10_python"),
        watch=fresh,
    ),
    Row(
        "archive-random-members",
        "the archive lacks data_batch_1.bin",
        on_data("random_members"),
        watch=fresh,
    ),
    Row(
        "folder-of-cifar100-records",
        "the CIFAR-100 binary layout",
        on_data("cifar100_records"),
        watch=fresh,
    ),
    Row(
        "evaluate-data-truncated",
        "the archive is truncated",
        lambda c: ["evaluate", str(c.run), "--data", str(c.truncated)],
        watch=folder("run"),
    ),
    Row(
        "api-load-truncated-archive",
        "the archive is truncated",
        call=lambda c: load_cifar10(c.truncated),
        error=DataFormatError,
    ),
    # --- hyperparameters ---
    Row(
        "epochs-negative",
        "epochs must be a positive integer, got -1",
        lambda c: train(c, "--epochs", "-1"),
        watch=fresh,
    ),
    Row(
        "batch-zero",
        "batch_size must be a positive integer, got 0",
        lambda c: train(c, "--batch-size", "0"),
        watch=fresh,
    ),
    Row(
        "learning-rate-nan",
        "learning_rate must be a finite number in (0, 10], got nan",
        lambda c: train(c, "--learning-rate", "nan"),
        watch=fresh,
    ),
    Row(
        "learning-rate-inf",
        "learning_rate must be a finite number in (0, 10], got inf",
        lambda c: train(c, "--learning-rate", "inf"),
        watch=fresh,
    ),
    Row(
        "strength-negative",
        "strength must be a finite number >= 0, got -1.0",
        lambda c: train(c, "--strength", "-1"),
        watch=fresh,
    ),
    Row(
        "strength-nan",
        "strength must be a finite number >= 0, got nan",
        lambda c: train(c, "--strength", "nan"),
        watch=fresh,
    ),
    Row(
        "strength-absurd",
        "not a plausible strength",
        lambda c: train(c, "--strength", "1e9"),
        watch=fresh,
    ),
    Row(
        "noise-sigma-2",
        "noise sigma must be in [0, 1] pixel scale, got 2.0",
        lambda c: train(c, "--noise", "0.05,2"),
        watch=fresh,
    ),
    Row(
        "train-examples-zero",
        "train_examples must be a positive integer, got 0",
        lambda c: train(c, "--train-examples", "0"),
        watch=fresh,
    ),
    Row(
        "epochs-not-a-number",
        "argument --epochs: invalid int value: 'many'",
        lambda c: train(c, "--epochs", "many"),
        watch=fresh,
    ),
    Row(
        "api-regularizer-strength-negative",
        "L1InfLipschitz: strength must be a finite number >= 0, got -1.0",
        call=lambda c: L1InfLipschitz(-1.0),
    ),
    Row(
        "api-config-epochs-negative",
        "epochs must be a positive integer, got -1",
        call=lambda c: TrainConfig(epochs=-1),
    ),
    Row(
        "evaluate-gaussian-sigma-2",
        "gaussian noise level must be in [0, 1] pixel scale, got 2.0",
        lambda c: ["evaluate", str(c.run), "--gaussian", "2"],
        watch=folder("run"),
    ),
    Row(
        "evaluate-eps-2",
        "epsilon must be a finite number in [0, 1]",
        lambda c: ["evaluate", str(c.run), "--eps", "2"],
        watch=folder("run"),
    ),
    Row(
        "evaluate-examples-zero",
        "argument --examples: expected a positive integer, got 0",
        lambda c: ["evaluate", str(c.run), "--examples", "0"],
        watch=folder("run"),
    ),
    Row(
        "evaluate-batch-size-nan",
        "argument --batch-size: expected a positive integer, got 'nan'",
        lambda c: ["evaluate", str(c.run), "--batch-size", "nan"],
        watch=folder("run"),
    ),
    Row(
        "export-noise-sigma-2",
        "--noise sigmas must be finite numbers in [0, 1] (pixel scale), got [2.0]",
        lambda c: ["export", str(c.run), "--noise", "0.05,2"],
        watch=folder("run"),
    ),
    Row(
        "export-examples-zero",
        "argument --examples: expected a positive integer, got 0",
        lambda c: ["export", str(c.run), "--examples", "0"],
        watch=folder("run"),
    ),
    # --- unknown names, severities ---
    Row(
        "model-unknown",
        "Unknown model 'resnet21'",
        lambda c: [
            "train",
            "--model",
            "resnet21",
            "--data",
            str(c.archive),
            "--output",
            str(c.fresh),
        ],
        watch=fresh,
        needs_archive=True,
    ),
    Row(
        "regularizer-unknown",
        "argument --regularizer: invalid choice: 'l2inf'",
        lambda c: train(c, "--regularizer", "l2inf"),
        watch=fresh,
    ),
    Row(
        "corruption-unknown",
        "unknown corruption 'haze'",
        lambda c: ["evaluate", str(c.run), "--corruptions", "fog,haze"],
        watch=folder("run"),
    ),
    Row(
        "corruption-not-synthesized",
        "corruption 'frost' is not synthesized",
        lambda c: ["evaluate", str(c.run), "--corruptions", "frost"],
        watch=folder("run"),
    ),
    Row(
        "severity-0",
        "severity must be one of [1, 2, 3, 4, 5], got 0",
        lambda c: ["evaluate", str(c.run), "--severities", "0,1"],
        watch=folder("run"),
    ),
    Row(
        "severity-6",
        "severity must be one of [1, 2, 3, 4, 5], got 6",
        lambda c: ["evaluate", str(c.run), "--severities", "5,6"],
        watch=folder("run"),
    ),
    Row(
        "suite-unknown",
        "argument --suite: invalid choice: 'everything'",
        lambda c: ["evaluate", str(c.run), "--suite", "everything"],
        watch=folder("run"),
    ),
    Row(
        "option-unknown",
        "unrecognized arguments: --sevrities",
        lambda c: ["evaluate", str(c.run), "--sevrities", "1"],
        watch=folder("run"),
    ),
    Row(
        "api-model-unknown",
        "Unknown model 'resnet21'",
        call=lambda c: models.get("resnet21"),
    ),
    Row(
        "api-perturbation-unknown",
        "unknown perturbation 'haze'",
        call=lambda c: perturbations.perturbation_fn("haze", 1),
    ),
    Row(
        "api-severity-0",
        "severity of 'contrast' must be one of [1, 2, 3, 4, 5], got 0",
        call=lambda c: perturbations.perturbation_fn("contrast", 0),
    ),
    Row(
        "api-severity-6",
        "severity of 'fog' must be one of [1, 2, 3, 4, 5], got 6",
        call=lambda c: perturbations.perturbation_fn("fog", 6),
    ),
    # --- images of the wrong shape, NaN / Inf in the data ---
    Row(
        "api-model-on-28x28x1",
        "expected shape=(None, 32, 32, 3), found shape=(2, 28, 28, 1)",
        call=lambda c: c.resnet20(np.zeros((2, 28, 28, 1), np.float32)),
    ),
    Row(
        "api-model-on-unbatched-image",
        "expected shape=(None, 32, 32, 3), found shape=(32, 32, 3)",
        call=lambda c: c.resnet20(np.zeros((32, 32, 3), np.float32)),
    ),
    Row(
        "api-model-built-for-28x28x1",
        "mean and std need one value per input channel (1), got 3 and 3",
        call=lambda c: models.get("resnet20", input_shape=(28, 28, 1)),
    ),
    Row(
        "api-evaluate-28x28x1-images",
        "the model takes images of shape (32, 32, 3), but the test dataset holds images "
        "of shape (28, 28, 1)",
        call=lambda c: robustness.run_suite(
            c.model, _dataset(_pixels(shape=(28, 28, 1))), "noise"
        ),
    ),
    Row(
        "api-evaluate-nan-images",
        "test batch 1 image 1 holds NaN or infinite pixel values (1 in the batch)",
        call=lambda c: robustness.run_suite(
            c.model, _dataset(_pixels(fill=np.nan)), "noise"
        ),
    ),
    Row(
        "api-evaluate-inf-images",
        "test batch 1 image 1 holds NaN or infinite pixel values",
        call=lambda c: robustness.run_suite(
            c.model, _dataset(_pixels(fill=np.inf)), "corruptions", corruptions=["fog"]
        ),
    ),
    Row(
        "api-evaluate-unscaled-images",
        "image 0 has pixel values outside [0, 1]",
        call=lambda c: robustness.run_suite(
            c.model, _dataset(255 * _pixels()), "attacks", attack_steps=1
        ),
    ),
    Row(
        "api-deployed-nan-images",
        "evaluate_deployed: batch 1 image 1 holds NaN or infinite pixel values",
        call=lambda c: export.evaluate_deployed(
            c.world.tflite(), _dataset(_pixels(fill=np.nan)), (0.05,)
        ),
        marks=(needs_lce,),
    ),
    Row(
        "api-deployed-28x28x1-images",
        "DeployedModel.predict: images must have shape (n, 32, 32, 3), got (2, 28, 28, 1)",
        call=lambda c: export.DeployedModel(c.world.tflite()).predict(
            np.zeros((2, 28, 28, 1), np.float32)
        ),
        marks=(needs_lce,),
    ),
    # --- run folders: another run, incompatible or broken files ---
    Row(
        "train-into-another-run",
        "holds a different run (settings that differ:",
        lambda c: ["train", "--data", str(c.few_records), "--output", str(c.other_run)],
        watch=folder("other_run"),
    ),
    Row(
        "train-into-a-foreign-folder",
        "folder is not empty and holds no larq-lipschitz run",
        lambda c: ["train", "--output", str(c.foreign_folder)],
        watch=folder("foreign_folder"),
    ),
    Row(
        "evaluate-no-run-folder",
        "no such run folder",
        lambda c: ["evaluate", str(c.fresh)],
        watch=fresh,
    ),
    Row(
        "evaluate-results-format-999",
        "results format 999 was written by an incompatible larq-lipschitz version",
        lambda c: ["evaluate", str(c.results_format)],
        watch=folder("results_format"),
    ),
    Row(
        "export-results-format-999",
        "results format 999 was written by an incompatible larq-lipschitz version",
        lambda c: ["export", str(c.results_format)],
        watch=folder("results_format"),
    ),
    Row(
        "evaluate-results-not-json",
        "results.json: cannot be read as JSON",
        lambda c: ["evaluate", str(c.results_not_json)],
        watch=folder("results_not_json"),
    ),
    Row(
        "evaluate-model-truncated",
        "model.keras: not a valid .keras model file (no zip directory: the file is "
        "truncated or corrupt)",
        lambda c: ["evaluate", str(c.model_truncated)],
        watch=folder("model_truncated"),
    ),
    Row(
        "export-model-truncated",
        "model.keras: not a valid .keras model file",
        lambda c: ["export", str(c.model_truncated)],
        watch=folder("model_truncated"),
    ),
    Row(
        "evaluate-model-bytes-flipped",
        "model.keras: the model file is corrupt (member model.weights.h5 fails its CRC check)",
        lambda c: ["evaluate", str(c.model_flipped)],
        watch=folder("model_flipped"),
    ),
    Row(
        "bounds-model-bytes-flipped",
        "model.keras: the model file is corrupt",
        lambda c: ["bounds", str(c.model_flipped)],
        watch=folder("model_flipped"),
    ),
    Row(
        "evaluate-model-from-keras3",
        "model.keras: saved by Keras 3.6.0, but larq-lipschitz runs on Keras 2",
        lambda c: ["evaluate", str(c.model_keras3)],
        watch=folder("model_keras3"),
    ),
    Row(
        "evaluate-model-unknown-layer",
        "cannot be loaded as a Keras model (Unknown layer: 'larq_lipschitz>FutureConv2D'",
        lambda c: ["evaluate", str(c.model_unknown_layer)],
        watch=folder("model_unknown_layer"),
    ),
    Row(
        "export-model-nan-weights",
        "layer 'binary_conv' holds 1 NaN or infinite values",
        lambda c: ["export", str(c.model_nan)],
        watch=folder("model_nan"),
    ),
    Row(
        "api-load-model-bytes-flipped",
        "fails its CRC check",
        call=lambda c: load_saved(c.model_flipped / runs.MODEL_FILE),
        error=ModelFileError,
    ),
    Row(
        "evaluate-reference-of-another-version",
        "not a robustness report of this larq-lipschitz version (format 999",
        lambda c: ["evaluate", str(c.run), "--reference", str(c.foreign_report)],
        watch=folder("run"),
    ),
    Row(
        "compare-over-a-comparison",
        "already holds comparison.md; pass --force",
        lambda c: ["compare", str(c.run), "--output", str(c.compared)],
        watch=folder("compared"),
    ),
    # --- the deployed model ---
    Row(
        "deployed-not-exported",
        "holds no deployed model (model.tflite); convert it first with "
        "`larq-lipschitz export",
        lambda c: ["evaluate", str(c.run), "--deployed"],
        watch=folder("run"),
        marks=(needs_lce,),
    ),
    Row(
        "deployed-file-missing",
        "no such deployed model file (.tflite)",
        lambda c: ["evaluate", str(c.run), "--deployed", str(c.fresh / "m.tflite")],
        watch=folder("run"),
        marks=(needs_lce,),
    ),
    Row(
        "deployed-junk-tflite",
        "model.tflite: not a TensorFlow Lite flatbuffer",
        lambda c: ["evaluate", str(c.junk_tflite), "--deployed"],
        watch=folder("junk_tflite"),
        marks=(needs_lce,),
    ),
    Row(
        "deployed-attack-suite",
        "suite 'attacks' on a deployed model: gradient attacks need the gradients",
        lambda c: ["evaluate", str(c.junk_tflite), "--deployed", "--suite", "attacks"],
        watch=folder("junk_tflite"),
    ),
    Row(
        "deployed-attack-options",
        "--eps, --pgd-steps configure the attacks, which run on the Keras model only",
        lambda c: [
            "evaluate",
            str(c.run),
            "--deployed",
            "--eps",
            "0.01",
            "--pgd-steps",
            "3",
        ],
        watch=folder("run"),
    ),
]


def _snapshot(path: pathlib.Path | None) -> dict[str, bytes | None] | None:
    """Every file and folder under `path` with its bytes (None for a folder)."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    found: dict[str, bytes | None] = {}
    for item in sorted(path.rglob("*")):
        name = str(item.relative_to(path))
        found[name] = item.read_bytes() if item.is_file() else None
    return found


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_hostile_input_is_refused_with_one_line(
    row: Row, world, tmp_path, request, capsys
):
    archive = request.getfixturevalue("cifar_archive") if row.needs_archive else None
    ctx = Ctx(world, tmp_path / "fresh", archive)
    watched = row.watch(ctx) if row.watch else None
    before = _snapshot(watched)
    if row.argv is not None:
        argv = row.argv(ctx)
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1, err
        # the subcommand's parser names the subcommand, the top-level one does not
        assert re.match(rf"larq-lipschitz( {argv[0]})?: error: ", lines[0]), lines[0]
        assert row.fragment in lines[0], lines[0]
    else:
        with pytest.raises(row.error) as info:
            row.call(ctx)
        message = str(info.value)
        assert len(message.strip().splitlines()) == 1, message
        assert row.fragment in message, message
    assert _snapshot(watched) == before, f"{watched} changed"
    if watched is not None and before is None:
        assert not watched.exists()


def test_the_table_covers_every_kind_of_input():
    ids = {r.id for r in ROWS}
    assert len(ids) == len(ROWS), "duplicate row ids"
    for prefix in (
        "data-",
        "archive-",
        "evaluate-results-format-999",
        "evaluate-model-",
        "train-into-",
        "deployed-",
        "api-evaluate-nan",
    ):
        assert any(i.startswith(prefix) for i in ids), prefix
    # Every command that can write is watched.
    for r in ROWS:
        if r.argv is not None:
            assert r.watch is not None, r.id


def test_world_inputs_are_what_their_names_say(world):
    """The fixtures themselves, checked independently of the package's reader."""
    with tarfile.open(world.few_records) as tar:
        sizes = {pathlib.PurePosixPath(m.name).name: m.size for m in tar}
    assert sizes == {m: 3 * RECORD for m in MEMBERS}
    good = world.few_records.read_bytes()
    assert world.truncated.read_bytes() == good[: len(good) // 2]
    flipped = world.flipped.read_bytes()
    assert len(flipped) == len(good)
    assert sum(a != b for a, b in zip(flipped, good, strict=True)) == 16
    with zipfile.ZipFile(world.model_keras3 / runs.MODEL_FILE) as archive:
        assert json.loads(archive.read("metadata.json"))["keras_version"] == "3.6.0"
    with zipfile.ZipFile(world.model_flipped / runs.MODEL_FILE) as archive:
        assert archive.testzip() is not None
    loaded = tf.keras.models.load_model(world.model_nan / runs.MODEL_FILE)
    assert np.isnan(loaded.get_layer("binary_conv").kernel.numpy()).sum() == 1
    # The untouched run folder loads: the rows above fail for their own reason.
    results = runs.load_results(world.run)
    model = load_saved(world.run / runs.MODEL_FILE)
    assert results["format"] == runs.RESULTS_FORMAT
    np.testing.assert_array_equal(
        model.get_layer("binary_conv").kernel.numpy(),
        world.model.get_layer("binary_conv").kernel.numpy(),
    )
