"""Keras 2 selection at import time, and the command line's basic contract."""

import os
import subprocess
import sys

import pytest


def _python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(env_overrides, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_importing_first_selects_keras2_for_larq():
    done = _python(
        "import larq_lipschitz, tensorflow as tf, larq, tf_keras\n"
        "assert tf.keras.layers.Dense is tf_keras.layers.Dense\n"
        "print(type(larq.layers.QuantDense(2)).__mro__[1].__module__)"
    )
    assert done.returncode == 0, done.stderr
    assert "larq" in done.stdout


def test_importing_after_keras3_fails_with_instructions():
    done = _python("import tensorflow\nimport larq_lipschitz")
    assert done.returncode != 0
    assert "ImportError" in done.stderr
    assert "TF_USE_LEGACY_KERAS=1" in done.stderr
    assert "before tensorflow" in done.stderr


def test_importing_after_tensorflow_with_env_var_set_works():
    done = _python(
        "import tensorflow\nimport larq_lipschitz, larq", TF_USE_LEGACY_KERAS="1"
    )
    assert done.returncode == 0, done.stderr


def test_cli_works_even_when_the_environment_asks_for_keras3():
    done = subprocess.run(
        [sys.executable, "-m", "larq_lipschitz", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "0"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    import larq_lipschitz

    assert done.stdout.strip() == larq_lipschitz.__version__


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "epochs must be a positive integer"),
        (["train", "--strength", "-1"], "strength must be a finite number >= 0"),
        (["train", "--strength", "nan"], "strength must be a finite number >= 0"),
        (["train", "--learning-rate", "inf"], "learning_rate must be a finite number"),
        (["train", "--noise", "0.1,2"], "noise sigma must be in [0, 1]"),
    ],
)
def test_cli_rejects_bad_hyperparameters_in_one_line(args, message, tmp_path, capsys):
    from larq_lipschitz.cli import main

    out = tmp_path / "run"
    assert main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err
    assert not out.exists()  # nothing is written for a rejected configuration
