"""`larq-lipschitz train` survives `kill -9` and resumes exactly; a finished run stays put.

A short real-data run (512 CIFAR-10 images, batch 64, 3 epochs of 8 steps) is started in
a subprocess and killed with SIGKILL once epoch 1 is checkpointed and epoch 2 has begun.
While it runs, the folder is sampled continually: every file in it must be complete at
every moment. The same command is then run again: it must resume from the last
checkpoint and end in the state of an uninterrupted run of the same command (started
beside it as the reference): same checkpoint tensors (weights, optimizer slots, step
counter) bit for bit, same history rows, same test accuracy. A third run must find the
finished run and return without training or touching a file.
"""

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import larq_lipschitz  # noqa: F401
from larq_lipschitz import runs

import numpy as np
import pytest
import tensorflow as tf

from tests.run_files import checkpoint_tensors, history_columns

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TIMEOUT = 400  # seconds for one process, generous for a loaded 2-core machine


def _command(archive, out):
    return [
        sys.executable,
        "-m",
        "larq_lipschitz",
        "train",
        "--data",
        str(archive),
        "--train-examples",
        "512",
        "--batch-size",
        "64",
        "--epochs",
        "3",
        "--validation-examples",
        "0",
        "--noise",
        "",
        "--seed",
        "2",
        "--output",
        str(out),
    ]


def _start(command, log_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()  # the child holds its own descriptor


def _stop(process):
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


def _assert_complete(folder):
    """Every file training writes is whole: JSON parses, CSV rows are full, the
    checkpoint index names files that exist. Returns the latest checkpoint number."""
    for name in ("run.json", runs.RESULTS_FILE):
        path = folder / name
        if path.exists():
            json.loads(path.read_text())  # raises on a partial file
    history = folder / "history.csv"
    if history.exists():
        text = history.read_text()
        assert text.endswith("\n"), "history.csv ends in a partial row"
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0][0] == "epoch"
        assert all(len(r) == len(rows[0]) for r in rows), "history.csv has a short row"
        epochs = [int(r[0]) for r in rows[1:]]
        assert epochs == sorted(set(epochs)), f"history.csv repeats epochs: {epochs}"
    state = tf.train.get_checkpoint_state(str(folder / "checkpoints"))
    if state is None:
        return 0
    latest = state.model_checkpoint_path
    assert os.path.exists(latest + ".index"), f"{latest} is named but missing"
    return int(latest.rsplit("-", 1)[1])


def _hidden_leftovers(folder):
    return [
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]


def test_kill_9_during_epoch_2_then_rerun_ends_as_an_uninterrupted_run(
    tmp_path, cifar_archive, capsys, caplog
):
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    logs = {
        name: tmp_path / f"{name}.log" for name in ("killed", "reference", "resumed")
    }
    command = _command(cifar_archive, killed_dir)
    processes = []
    try:
        reference = _start(_command(cifar_archive, reference_dir), logs["reference"])
        processes.append(reference)
        victim = _start(command, logs["killed"])
        processes.append(victim)

        samples = 0
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert victim.poll() is None, logs["killed"].read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 2 never started"
            done = _assert_complete(killed_dir) if killed_dir.exists() else 0
            samples += 1
            if done >= 1 and b"epoch 2 step" in logs["killed"].read_bytes():
                break
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        assert samples > 20  # the folder was looked at throughout the run

        at_kill = _assert_complete(killed_dir)
        assert at_kill in (1, 2)
        assert not (killed_dir / runs.RESULTS_FILE).exists()
        rows_at_kill = (killed_dir / "history.csv").read_text().splitlines()
        assert len(rows_at_kill) == 1 + at_kill

        resumed = _start(command, logs["resumed"])
        processes.append(resumed)
        # The reference is needed only up to its last checkpoint: stop it there, so
        # that its final evaluation does not slow the resumed run down.
        while _assert_complete(reference_dir) < 3 if reference_dir.exists() else True:
            assert reference.poll() is None, logs["reference"].read_text()[-3000:]
            assert time.monotonic() < deadline + TIMEOUT, "the reference never finished"
            time.sleep(0.2)
        reference.kill()
        assert resumed.wait(timeout=TIMEOUT) == 0, logs["resumed"].read_text()[-3000:]
    finally:
        for process in processes:
            _stop(process)

    results = json.loads((killed_dir / runs.RESULTS_FILE).read_text())
    assert results["status"] == "finished"
    assert results["resumed_at_epoch"] == at_kill >= 1
    assert results["history"]["epoch"] == [0.0, 1.0, 2.0]
    assert len(results["history"]["loss"]) == 3
    assert _assert_complete(killed_dir) == 3
    assert _hidden_leftovers(killed_dir) == []

    # The resumed run is the uninterrupted run: same data order, optimizer state, steps.
    assert history_columns(killed_dir) == history_columns(reference_dir)
    got = checkpoint_tensors(str(killed_dir / "checkpoints" / "ckpt-3"))
    want = checkpoint_tensors(str(reference_dir / "checkpoints" / "ckpt-3"))
    assert got.keys() == want.keys()
    assert any("optimizer" in k for k in got), "optimizer state is not checkpointed"
    assert int(got["epochs_done/.ATTRIBUTES/VARIABLE_VALUE"]) == 3
    for name in got:
        assert np.array_equal(got[name], want[name]), name

    # Running the same command again finds the finished run and touches nothing.
    from larq_lipschitz import cli

    watched = (runs.RESULTS_FILE, runs.MODEL_FILE, "history.csv", "run.json")
    files = {
        n: ((killed_dir / n).stat().st_mtime_ns, (killed_dir / n).read_bytes())
        for n in watched
    }
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="larq_lipschitz"):
        assert cli.main(command[3:]) == 0
    out = capsys.readouterr()
    messages = [r.getMessage() for r in caplog.records]
    assert any("not training again" in m for m in messages), messages
    assert not any(m.startswith("training resnet20") for m in messages), messages
    assert f"clean test accuracy: {results['test_accuracy']:.4f}" in out.out
    for name, (mtime, content) in files.items():
        path = killed_dir / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, name


@pytest.mark.parametrize("tail", ["1,0.5", "2,0.25,0.3", ""])
def test_history_pruning_drops_partial_and_retrained_rows(tmp_path, tail):
    """A history file cut short by a kill (as `CSVLogger` could leave one) is repaired."""
    from larq_lipschitz.training import _prune_history, _read_history

    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,accuracy,loss\n0,0.1,2.5\n1,0.2,2.0\n1,0.25,1.9\n2,0.3,1.5\n" + tail
    )
    _prune_history(path, epochs_done=2)
    assert path.read_text() == "epoch,accuracy,loss\n0,0.1,2.5\n1,0.25,1.9\n"
    assert _read_history(path) == {
        "epoch": [0.0, 1.0],
        "accuracy": [0.1, 0.25],
        "loss": [2.5, 1.9],
    }
    _prune_history(path, epochs_done=0)
    assert not path.exists()


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "checkpoints" / "ckpt-3_temp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ckpt-3_temp" / "part").write_bytes(b"x")
    (tmp_path / ".results.json.abc123.tmp").write_text("{")
    (tmp_path / ".model.keras.xyz.tmp.keras").write_bytes(b"PK")
    (tmp_path / ".discarded-checkpoints-77").mkdir()
    (tmp_path / ".lock").write_text("1\n")
    (tmp_path / "run.json").write_text("{}")
    removed = runs.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(
        [
            ".results.json.abc123.tmp",
            ".model.keras.xyz.tmp.keras",
            ".discarded-checkpoints-77",
            os.path.join("checkpoints", "ckpt-3_temp"),
        ]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "checkpoints",
        "run.json",
    ]


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path):
    code = (
        "import sys, larq_lipschitz\n"
        "from larq_lipschitz import runs\n"
        "try:\n"
        "    with runs.run_lock(sys.argv[1]):\n"
        "        print('locked')\n"
        "except runs.RunError as err:\n"
        "    print(err)\n"
    )
    with runs.run_lock(tmp_path):
        held = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert f"another process (pid {os.getpid()}) is training into this folder" in (
        held.stdout
    ), held.stderr[-2000:]
    free = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert free.stdout.strip() == "locked", free.stderr[-2000:]


def test_a_folder_written_before_a_setting_existed_is_still_resumable(tmp_path):
    """run.json of an older version lacks weight_decay: the default counts as equal."""
    from larq_lipschitz.training import TrainConfig, config_defaults

    config = TrainConfig(data=None).to_dict()
    old = {k: v for k, v in config.items() if k != "weight_decay"}
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "config": old}))
    (tmp_path / "checkpoints").mkdir()
    assert runs.check_reusable(tmp_path, config, defaults=config_defaults()) == "resume"
    changed = {**config, "weight_decay": 1e-4}
    with pytest.raises(runs.RunError, match="settings that differ: weight_decay"):
        runs.check_reusable(tmp_path, changed, defaults=config_defaults())


def test_atomic_model_save_replaces_or_keeps_the_old_file(tmp_path):
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    path = tmp_path / runs.MODEL_FILE
    runs.atomic_save_model(model, path)
    first = path.read_bytes()
    loaded = tf.keras.models.load_model(path, compile=False)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    class Broken(tf.keras.Model):
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runs.atomic_save_model(Broken(), path)
    assert path.read_bytes() == first
    assert _hidden_leftovers(tmp_path) == []


def test_resume_flag_refuses_a_folder_with_nothing_to_resume(tmp_path, capsys):
    from larq_lipschitz import cli

    out = tmp_path / "typo"
    assert cli.main(["train", "--resume", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"larq-lipschitz train: error: {out}: holds no run with this configuration to "
        "resume (--resume); drop --resume to start a new run there."
    )
    assert not out.exists()
