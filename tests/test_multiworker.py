"""Two worker processes train one run with MultiWorkerMirroredStrategy on 127.0.0.1.

Each worker runs a small driver script that calls `training.train` on real CIFAR-10 with
its own `TF_CONFIG` (ports picked free at run time) and saves the model's weights when
training ends to a file the test names. Both must end with the same weights bit for bit;
only the chief (worker 0) may write a run folder: worker 1 is given a folder of its own,
which must stay absent, and a private temporary folder, which must be empty at the end.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import larq_lipschitz  # noqa: F401
from larq_lipschitz import runs

import numpy as np
import pytest
import tensorflow as tf

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TIMEOUT = 480  # seconds for the two workers together, on a loaded 2-core machine

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import larq_lipschitz
    from larq_lipschitz.training import TrainConfig, train
    import numpy as np
    import tensorflow as tf

    config, output, weights_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

    class SaveWeights(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.initial = self.model.get_weights()

        def on_train_end(self, logs=None):
            final = self.model.get_weights()
            np.savez(weights_file, *self.initial, *final, count=len(final))

    config["noise_sigmas"] = tuple(config["noise_sigmas"])
    results = train(TrainConfig(**config), output, callbacks=[SaveWeights()])
    keys = ("strategy", "replicas", "synchronized_bn", "test_accuracy", "resumed_at_epoch")
    print("RESULTS " + json.dumps({k: results[k] for k in keys}), flush=True)
    """
)


def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _launch(tmp_path, config, attempt):
    """Start both workers; return (processes, log paths, outputs, weight files)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    processes, logs, outputs, weights = [], [], [], []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir(exist_ok=True)
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="2",
            TMPDIR=str(scratch),
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        )
        output = tmp_path / f"run{index}"
        weight_file = tmp_path / f"weights{index}-{attempt}.npz"
        log = tmp_path / f"worker{index}-{attempt}.log"
        with open(log, "wb") as sink:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(driver),
                        json.dumps(config),
                        str(output),
                        str(weight_file),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
        outputs.append(output)
        weights.append(weight_file)
    return processes, logs, outputs, weights


def _wait(processes):
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline:
            raise TimeoutError("the workers did not finish in time")
        if any(p.poll() not in (None, 0) for p in processes):
            time.sleep(5)  # let the other worker report its side, then stop
            break
        time.sleep(0.5)
    return [p.poll() for p in processes]


def _weights(path):
    with np.load(path) as data:
        count = int(data["count"])
        arrays = [data[f"arr_{i}"] for i in range(2 * count)]
    return arrays[:count], arrays[count:]


def test_two_workers_end_with_the_same_weights_and_only_the_chief_writes(
    tmp_path, cifar_archive
):
    config = dict(
        model="resnet20",
        data=str(cifar_archive),
        regularizer="l1inf",
        epochs=2,
        batch_size=64,  # global: 32 per worker
        train_examples=128,
        noise_sigmas=[],
        seed=3,
    )
    for attempt in range(3):
        processes, logs, outputs, weight_files = _launch(tmp_path, config, attempt)
        try:
            codes = _wait(processes)
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=60)
        text = [log.read_text(errors="replace") for log in logs]
        if codes == [0, 0]:
            break
        # A port picked free can be taken by another program before a worker binds it.
        if not any(
            "Address already in use" in t or "Failed to add port" in t for t in text
        ):
            pytest.fail(
                f"workers failed with {codes}:\n" + "\n".join(t[-3000:] for t in text)
            )
    else:
        pytest.fail("no free ports could be bound in three attempts")

    reports = [
        json.loads(
            next(line for line in t.splitlines() if line.startswith("RESULTS "))[8:]
        )
        for t in text
    ]
    for report in reports:
        # tf.distribute.MultiWorkerMirroredStrategy's class name in TensorFlow 2.19
        assert report["strategy"] == "CollectiveAllReduceStrategy"
        assert report["replicas"] == 2
        assert report["synchronized_bn"] is True
        assert report["resumed_at_epoch"] == 0
    assert reports[0]["test_accuracy"] == reports[1]["test_accuracy"]

    (start0, final0), (start1, final1) = (_weights(w) for w in weight_files)
    assert len(final0) == len(final1) > 50
    for a, b in zip(start0, start1, strict=True):
        np.testing.assert_array_equal(a, b)
    moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(final0, start0, strict=True)
    )
    assert moved > 1e-3, "training changed nothing: equal weights would prove nothing"
    for a, b in zip(final0, final1, strict=True):
        assert np.array_equal(a, b)

    chief, other = outputs
    assert not other.exists(), sorted(p.name for p in other.rglob("*"))
    assert sorted(p.name for p in (tmp_path / "tmp1").iterdir()) == []
    state = tf.train.get_checkpoint_state(str(chief / "checkpoints"))
    assert state.model_checkpoint_path.endswith("ckpt-2")
    results = json.loads((chief / runs.RESULTS_FILE).read_text())
    assert results["strategy"] == "CollectiveAllReduceStrategy"
    assert len(results["history"]["loss"]) == 2
    saved = tf.keras.models.load_model(chief / runs.MODEL_FILE, compile=False)
    for a, b in zip(saved.get_weights(), final0, strict=True):
        np.testing.assert_array_equal(a, b)
