"""`larq-lipschitz reproduce`: profiles, argument checks, strength choice, and resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from larq_lipschitz import cli, reproduce

import pytest


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# Profiles and arguments
# --------------------------------------------------------------------------------------


def test_profiles_are_complete_recipes():
    for profile in reproduce.PROFILES.values():
        assert profile.epochs >= 1 and profile.batch_size >= 1
        assert set(profile.sweep_candidates) <= set(reproduce.CONTROLS)
        for name, candidates in profile.sweep_candidates.items():
            assert len(candidates) >= 2, name
            assert all(c > 0 for c in candidates)
        assert profile.strengths["l1inf"] in profile.sweep_candidates["l1inf"]
        assert profile.strengths["lcr"] in profile.sweep_candidates["lcr"]
    paper = reproduce.PROFILES["paper"]
    # the published CIFAR-10 recipe (IR-Net / RBNN / LCR)
    assert (paper.optimizer, paper.learning_rate, paper.epochs) == ("sgd", 0.1, 400)
    assert paper.weight_decay == 1e-4 and paper.batch_size == 128
    assert paper.model_overrides["vgg-small"] == {"epochs": 300, "learning_rate": 0.007}


def test_profile_overrides():
    profile = reproduce.get_profile("cpu-short", {"epochs": 2, "eval_examples": None})
    assert profile.epochs == 2
    assert profile.eval_examples == reproduce.PROFILES["cpu-short"].eval_examples
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        reproduce.get_profile("fast")
    with pytest.raises(ValueError, match="cannot be overridden: optimizer"):
        reproduce.get_profile("paper", {"optimizer": "adam"})


def test_config_follows_profile_and_model_overrides():
    paper = reproduce.PROFILES["paper"]
    vgg = reproduce._config(paper, "vgg-small", None, None, regularizer="l1inf")
    assert (vgg.epochs, vgg.learning_rate, vgg.optimizer) == (300, 0.007, "sgd")
    assert vgg.weight_decay == 1e-4 and vgg.validation_examples == 5000
    resnet = reproduce._config(
        paper, "resnet20", None, None, regularizer="none", bits=32, epochs=3
    )
    assert (resnet.epochs, resnet.learning_rate) == (3, 0.1)
    assert (resnet.weight_bits, resnet.activation_bits) == (32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"table": "imagenet"}, "unknown table 'imagenet'"),
        ({"models": ["resnet99"]}, "unknown model 'resnet99'"),
        ({"regularizers": ["l2"]}, "unknown regularizer 'l2'"),
        ({"regularizers": ["none", "none"]}, "listed twice"),
        ({"models": []}, "at least one model"),
        ({"strengths": {"spectral": 1.0}}, "not in the grid's regularizers"),
        ({"strengths": {"l1inf": -1.0}}, "finite number >= 0"),
        ({"profile": "laptop"}, "unknown profile 'laptop'"),
    ],
)
def test_bad_grids_fail_before_anything_is_written(tmp_path, kwargs, message):
    out = tmp_path / "grid"
    with pytest.raises(ValueError, match=message):
        reproduce.reproduce(output=out, data=tmp_path, **kwargs)
    assert not out.exists()


def test_missing_archive_and_foreign_folder(tmp_path):
    from larq_lipschitz.data import DataError
    from larq_lipschitz.runs import RunError

    with pytest.raises(DataError, match="no such file"):
        reproduce.reproduce(output=tmp_path / "g", data=tmp_path / "nothing.tar.gz")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="holds no reproduce grid"):
        reproduce.reproduce(output=foreign, data=tmp_path)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--strengths", "l1inf"], "NAME=NUMBER"),
        (["--strengths", "l1inf=abc"], "NAME=NUMBER"),
        (["--epochs", "-2"], "integer >= 0"),
        (["--profile", "laptop"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", *argv])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_cli_parses_strengths():
    args = cli.build_parser().parse_args(
        ["reproduce", "--strengths", "l1inf=1e-4, lcr=0.8", "--models", "vgg-small"]
    )
    assert args.strengths == {"l1inf": 1e-4, "lcr": 0.8}
    assert args.models == ("vgg-small",)
    assert args.regularizers == ("none", "lcr", "l1inf")


def test_cli_zero_epochs_is_one_clear_error(capsys):
    assert cli.main(["reproduce", "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["larq-lipschitz reproduce: error: --epochs must be at least 1."]


# --------------------------------------------------------------------------------------
# Strength choice and reports
# --------------------------------------------------------------------------------------


def test_choose_strength_takes_the_best_held_out_score():
    rows = [
        {"strength": 1e-6, "score": 0.41},
        {"strength": 1e-5, "score": 0.47},
        {"strength": 1e-4, "score": 0.45},
    ]
    assert reproduce.choose_strength(rows) == 1e-5
    tie = [{"strength": 3.2, "score": 0.5}, {"strength": 0.8, "score": 0.5}]
    assert reproduce.choose_strength(tie) == 0.8
    with pytest.raises(ValueError, match="no sweep results"):
        reproduce.choose_strength([])


def test_sweep_and_timing_tables_show_the_numbers():
    profile = reproduce.PROFILES["cpu-short"]
    sweeps = {
        "resnet20": {
            "l1inf": {
                "chosen": 1e-5,
                "candidates": [
                    {
                        "strength": 1e-5,
                        "score": 0.4125,
                        "accuracies": {"clean": 0.5, "gaussian_0.1": 0.325},
                    },
                    {
                        "strength": 1e-4,
                        "score": 0.3,
                        "accuracies": {"clean": 0.4, "gaussian_0.1": 0.2},
                    },
                ],
            }
        }
    }
    table = reproduce._sweep_markdown(sweeps, profile)
    assert "| resnet20 | l1inf | 1e-05 | 50.0 | σ=0.1: 32.5 | 41.25 | yes |" in table
    assert "| resnet20 | l1inf | 0.0001 | 40.0 | σ=0.1: 20.0 | 30.00 |  |" in table
    timing = [
        {
            "model": "resnet20",
            "rows": [
                {
                    "regularizer": "none",
                    "train_epoch_seconds": 100.0,
                    "train_ratio_to_none": 1.0,
                    "test_epoch_seconds": 5.0,
                },
                {
                    "regularizer": "lcr",
                    "train_epoch_seconds": 225.0,
                    "train_ratio_to_none": 2.25,
                    "test_epoch_seconds": 5.5,
                },
            ],
        }
    ]
    recorded = [
        {"model": "resnet20", "regularizer": "lcr", "mean_epoch_seconds": 230.4}
    ]
    text = reproduce._timing_markdown(timing, recorded)
    assert "| resnet20 | none | 100.0 | 1.00 | 5.0 | – |" in text
    assert "| resnet20 | lcr | 225.0 | 2.25 | 5.5 | 230.4 |" in text


def test_measure_epoch_times_on_real_batches(cifar_archive):
    timing = reproduce.measure_epoch_times(
        "resnet20",
        {"none": 0.0, "l1inf": 1e-5},
        str(cifar_archive),
        batch_size=32,
        steps=2,
        rounds=1,
        train_images=320,
        test_images=64,
    )
    rows = {r["regularizer"]: r for r in timing["rows"]}
    assert list(rows) == ["none", "l1inf"]
    for row in rows.values():
        assert row["train_step_seconds"] > 0 and row["test_step_seconds"] > 0
        assert row["train_epoch_seconds"] == pytest.approx(
            10 * row["train_step_seconds"]
        )
        assert row["test_epoch_seconds"] == pytest.approx(2 * row["test_step_seconds"])
    assert rows["none"]["train_ratio_to_none"] == 1.0
    assert rows["l1inf"]["train_ratio_to_none"] == pytest.approx(
        rows["l1inf"]["train_step_seconds"] / rows["none"]["train_step_seconds"]
    )


# --------------------------------------------------------------------------------------
# Resume: kill the grid after its first run, rerun, only the missing runs execute
# --------------------------------------------------------------------------------------


def _grid_command(archive, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "larq_lipschitz",
        "reproduce",
        "--regularizers",
        "none,l1inf",
        "--data",
        str(archive),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--train-examples",
        "192",
        "--validation-examples",
        "64",
        "--eval-examples",
        "64",
        "--suite",
        "noise",
        "--timing-steps",
        "0",
    ]


def _run_to_the_end(archive, out, env) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _grid_command(archive, out),
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_killed_grid_resumes_without_redoing_finished_runs(cifar_archive, tmp_path):
    out = tmp_path / "grid"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = out / "runs" / "resnet20-none"
    second = out / "runs" / "resnet20-l1inf"
    proc = subprocess.Popen(
        _grid_command(cifar_archive, out),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (first / "results.json").is_file():
            if proc.poll() is not None:
                pytest.fail(
                    "the grid ended before its first run finished:\n"
                    + proc.stderr.read().decode()[-3000:]
                )
            if time.monotonic() > deadline:
                pytest.fail("the first run of the grid did not finish in 240 s")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    assert not (second / "results.json").is_file(), "killed too late to test resume"
    kept = {name: _sha(first / name) for name in ("results.json", "model.keras")}

    rerun = _run_to_the_end(cifar_archive, out, env)
    assert {name: _sha(first / name) for name in kept} == kept  # not retrained
    summary = json.loads((out / "reproduce.json").read_text())
    states = {r["regularizer"]: r["state"] for r in summary["runs"]}
    assert states["none"] == "reused"
    assert states["l1inf"] in ("trained", "resumed")
    for folder in (first, second):
        results = json.loads((folder / "results.json").read_text())
        assert results["status"] == "finished"
        assert (folder / "robustness.json").is_file()
        assert (folder / "bounds.json").is_file()
    table = (out / "comparison.md").read_text()
    assert "| resnet20-none |" in table and "| resnet20-l1inf |" in table
    strengths = summary["strengths"]["resnet20"]
    assert strengths["l1inf"] == {"strength": 1e-5, "source": "profile cpu-short"}
    assert "trained" in rerun.stdout or "resumed" in rerun.stdout

    # a third invocation of a finished grid trains nothing at all
    second_model = _sha(second / "model.keras")
    _run_to_the_end(cifar_archive, out, env)
    summary = json.loads((out / "reproduce.json").read_text())
    assert {r["state"] for r in summary["runs"]} == {"reused"}
    assert _sha(second / "model.keras") == second_model


def test_sigterm_unwinds_like_ctrl_c(monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) ends a command with a resume hint, exit 143."""

    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        return 0

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_cmd_models", stopped)
    try:
        code = cli.main(["models"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert "terminated; rerun the same command to resume." in capsys.readouterr().err
