"""Readers of run-folder files shared by the resume and determinism tests."""

import csv
import io

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)

import tensorflow as tf


def checkpoint_tensors(path) -> dict:
    """Every saved tensor of a TensorFlow checkpoint, by name (object graph left out)."""
    reader = tf.train.load_checkpoint(str(path))
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(str(path))
        if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
    }


def history_columns(folder) -> dict[str, list[str]]:
    """`history.csv` of a run folder as columns, without the wall-clock column."""
    rows = list(csv.DictReader(io.StringIO((folder / "history.csv").read_text())))
    return {k: [r[k] for r in rows] for k in rows[0] if k != "epoch_seconds"}
