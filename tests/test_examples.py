"""Every example script runs, on a small slice of the real CIFAR-10, so none of them rots."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_train_cifar10(cifar_archive):
    out = _run(
        "train_cifar10.py",
        "--data",
        str(cifar_archive),
        "--train-examples",
        "640",
        "--steps",
        "5",
    )
    assert "clean test accuracy:" in out
    assert out.count("accuracy under gaussian noise") == 3


def test_custom_layer(cifar_archive):
    out = _run("custom_layer.py", "--data", str(cifar_archive), "--steps", "10")
    assert "reloaded from" in out and "test accuracy" in out


def test_regularize_larq_zoo(cifar_archive):
    out = _run("regularize_larq_zoo.py", "--data", str(cifar_archive), "--steps", "3")
    assert "fine-tuned 3 steps, loss" in out


@pytest.mark.parametrize("flag", ["--batch-size", "--no-synchronized-bn", "TF_CONFIG"])
def test_multi_worker_guide_names_real_flags(flag):
    text = (EXAMPLES / "multi_worker.md").read_text()
    assert flag in text
    if flag.startswith("--"):
        from larq_lipschitz.cli import build_parser

        assert (
            flag
            in build_parser()
            ._subparsers._group_actions[0]
            .choices["train"]
            .format_help()
        )
