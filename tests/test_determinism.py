"""`--seed` makes a CPU run repeatable bit for bit, and results.json says how to rerun it.

Three short real-data runs are started side by side in separate processes (so they also
compete for the CPU, which must not matter): two with the same seed, one with another.
The two same-seed runs must end with exactly the same weights, optimizer state and
history; the third must differ. The finished run's results.json must name the command
line (and a shell command that parses back to the same configuration), the versions,
the seed, the data source and the archive's SHA-256 (checked against `hashlib`).
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time

import larq_lipschitz
from larq_lipschitz import cli, runs
from larq_lipschitz.training import TrainConfig, op_determinism, train_command

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.run_files import checkpoint_tensors, history_columns

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TIMEOUT = 400


def _command(archive, out, seed):
    return [
        sys.executable,
        "-m",
        "larq_lipschitz",
        "train",
        "--data",
        str(archive),
        "--train-examples",
        "256",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--noise",
        "",
        "--seed",
        str(seed),
        "--output",
        str(out),
    ]


def _last_checkpoint(folder):
    state = tf.train.get_checkpoint_state(str(folder / "checkpoints"))
    return None if state is None else state.model_checkpoint_path


def test_same_seed_same_bits_other_seed_other_weights(tmp_path, cifar_archive):
    folders = {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"}
    seeds = {"a": 7, "b": 7, "c": 8}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = {}
    try:
        for name, folder in folders.items():
            with open(tmp_path / f"{name}.log", "wb") as log:
                processes[name] = subprocess.Popen(
                    _command(cifar_archive, folder, seeds[name]),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        # Only run "a" needs its final evaluation (for results.json); "b" and "c" are
        # compared through their last checkpoint and stopped once it exists.
        deadline = time.monotonic() + TIMEOUT
        waiting = {"b", "c"}
        while waiting:
            assert time.monotonic() < deadline, "runs did not reach epoch 2"
            for name in sorted(waiting):
                process = processes[name]
                last = _last_checkpoint(folders[name])
                if last is not None and last.endswith("ckpt-2"):
                    process.kill()
                    waiting.discard(name)
                else:
                    assert process.poll() is None, (
                        tmp_path / f"{name}.log"
                    ).read_text()[-3000:]
            time.sleep(0.2)
        code = processes["a"].wait(timeout=TIMEOUT)
        assert code == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)

    weights = {n: checkpoint_tensors(_last_checkpoint(f)) for n, f in folders.items()}
    assert weights["a"].keys() == weights["b"].keys() == weights["c"].keys()
    kernels = [k for k in weights["a"] if "kernel" in k and "optimizer" not in k]
    assert len(kernels) >= 20
    for name in weights["a"]:
        assert np.array_equal(weights["a"][name], weights["b"][name]), name
    assert history_columns(folders["a"]) == history_columns(folders["b"])
    differing = [
        k for k in kernels if not np.array_equal(weights["a"][k], weights["c"][k])
    ]
    assert differing == kernels  # another seed: other initial weights, data, order
    assert (
        history_columns(folders["a"])["loss"] != history_columns(folders["c"])["loss"]
    )

    # results.json holds what it takes to rerun run "a".
    results = json.loads((folders["a"] / runs.RESULTS_FILE).read_text())
    command = _command(cifar_archive, folders["a"], 7)
    assert results["command"]["argv"][1:] == command[3:]
    assert results["command"]["cwd"] == str(ROOT)
    pasted = shlex.split(results["command"]["shell"])
    assert pasted[:2] == ["larq-lipschitz", "train"]
    parsed = cli.build_parser().parse_args(pasted[1:])
    assert (
        cli._train_config(parsed).to_dict() == TrainConfig(**_config(results)).to_dict()
    )
    assert parsed.output == str(folders["a"].resolve()) and parsed.deterministic
    assert results["seed"] == results["config"]["seed"] == 7
    assert results["deterministic"] is True
    digest = hashlib.sha256(cifar_archive.read_bytes()).hexdigest()
    assert results["data_source"] == {
        "dataset": "cifar10",
        "source": "archive",
        "path": str(cifar_archive.resolve()),
        "sha256": digest,
        "checksum_of": "the archive file",
    }
    versions = results["versions"]
    assert versions["tensorflow"] == tf.__version__
    assert versions["larq"] == importlib.metadata.version("larq")
    assert versions["tf-keras"] == importlib.metadata.version("tf-keras")
    assert versions["larq-lipschitz"] == larq_lipschitz.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))


def _config(results):
    config = dict(results["config"])
    config["noise_sigmas"] = tuple(config["noise_sigmas"])
    return config


def _nondefault_config(tmp_path):
    """A configuration in which every field differs from its default."""
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"")
    values = dict(
        model="vgg-small",
        dataset="imagenet2012",
        data=str(tmp_path / "data dir"),  # a space, for the shell quoting
        data_dir=str(tmp_path / "tfds"),
        weight_bits=32,
        activation_bits=32,
        regularizer="lcr",
        strength=0.1 + 0.2,  # 0.30000000000000004: must survive the round trip
        target=1.5,
        teacher=str(teacher),
        epochs=3,
        batch_size=96,
        learning_rate=1e-3 / 3,
        optimizer="sgd",
        weight_decay=1e-4,
        seed=12,
        train_examples=1000,
        validation_examples=100,
        noise_sigmas=(0.01, 1 / 3),
        synchronized_bn=False,
    )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(values) == fields, "train_command must learn the new setting(s)"
    return TrainConfig(**values)


def _round_trip(config, output, deterministic=True):
    words = shlex.split(
        shlex.join(train_command(config, output, deterministic=deterministic))
    )
    assert words[:2] == ["larq-lipschitz", "train"]
    args = cli.build_parser().parse_args(words[1:])
    return args, cli._train_config(args)


def test_the_command_reproduces_a_configuration_with_every_field_changed(tmp_path):
    config = _nondefault_config(tmp_path)
    args, again = _round_trip(config, tmp_path / "out", deterministic=False)
    assert again.to_dict() == config.to_dict()
    assert args.output == str((tmp_path / "out").resolve())
    assert args.deterministic is False


@settings(max_examples=40, deadline=None)
@given(
    regularizer=st.sampled_from(["none", "l1inf", "l1inf-constraint", "spectral"]),
    strength=st.floats(1e-9, 1e3, allow_nan=False) | st.none(),
    lr=st.floats(1e-6, 10.0, allow_nan=False),
    sigmas=st.lists(st.floats(0, 1, allow_nan=False), max_size=3),
    sync=st.sampled_from([None, True, False]),
    examples=st.integers(1, 50_000) | st.none(),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_command_round_trips(
    regularizer, strength, lr, sigmas, sync, examples, seed
):
    if regularizer == "l1inf-constraint" and strength is not None and strength <= 0:
        strength = 1.0
    config = TrainConfig(
        regularizer=regularizer,
        strength=strength,
        learning_rate=lr,
        noise_sigmas=tuple(sigmas),
        synchronized_bn=sync,
        train_examples=examples,
        seed=seed,
    )
    _, again = _round_trip(config, "runs/x")
    assert again.to_dict() == config.to_dict()


def test_op_determinism_is_on_inside_and_restored_afterwards():
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    with op_determinism(True) as on:
        assert on and tf_config.is_op_determinism_enabled()
    assert tf_config.is_op_determinism_enabled() == before
    with op_determinism(False) as on:
        assert on == before


def test_a_folder_source_gets_a_content_checksum(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "b.bin").write_bytes(b"second")
    (folder / "a.bin").write_bytes(b"first")
    (folder / ".hidden").write_bytes(b"ignored")
    expected = hashlib.sha256()
    for name, content in (("a.bin", b"first"), ("b.bin", b"second")):
        expected.update(name.encode() + b"\0")
        expected.update(len(content).to_bytes(8, "little"))
        expected.update(content)
    assert runs.folder_sha256(folder) == expected.hexdigest()
    (folder / "a.bin").write_bytes(b"First")
    assert runs.folder_sha256(folder) != expected.hexdigest()


@pytest.mark.parametrize("value", [None, 1.5, "x"])
def test_train_refuses_callbacks_that_are_not_callbacks(value, tmp_path):
    from larq_lipschitz.training import train

    with pytest.raises(TypeError, match="callbacks must be Keras callbacks"):
        train(TrainConfig(), tmp_path, callbacks=[value])
