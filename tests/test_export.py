"""Deployment with Larq Compute Engine: conversion, the operator table, the deployed
model against Keras on real CIFAR-10 images, noise evaluation, the `export` command and
its errors.

The reference for every number is computed here: Keras logits of the same images, NumPy
accuracies and agreement, the model's own weights for the sizes, and, for the operator
table, which layer must have become which operator by construction (the order of the
graph, and a copy of the model with two kernels swapped).
"""

import json
import logging
import os
import pathlib
import sys

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from larq_lipschitz import (
    cli,
    evaluation,
    export,
    models,
    perturbations,
    robustness,
    runs,
)
from larq_lipschitz.data import load_cifar10

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("larq_compute_engine")

NUM_IMAGES = 300


def _train_steps(model: tf.keras.Model, images, labels, steps: int = 2) -> None:
    """Eager Adam steps: BatchNorm statistics and betas leave their initial values."""
    optimizer = tf.keras.optimizers.Adam(5e-3)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for step in range(steps):
        x = images[32 * step : 32 * (step + 1)]
        y = labels[32 * step : 32 * (step + 1)]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def _tiny_bnn(activation_bits: int = 1, batch_size: int | None = None, seed: int = 0):
    """A Sequential Larq model: a float first layer, 3 binary convs, a binary dense."""
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    binary = dict(
        input_quantizer="ste_sign" if activation_bits == 1 else None,
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
    )
    return tf.keras.Sequential(
        [
            tf.keras.Input((32, 32, 3), batch_size=batch_size),
            layers.Conv2D(
                16, 3, strides=2, padding="same", use_bias=False, name="first"
            ),
            layers.BatchNormalization(name="bn0"),
            lq.layers.QuantConv2D(
                32, 3, padding="same", pad_values=1.0, name="bin1", **binary
            ),
            layers.BatchNormalization(name="bn1"),
            layers.MaxPooling2D(name="pool"),
            lq.layers.QuantConv2D(32, 3, padding="same", name="bin2", **binary),
            layers.BatchNormalization(name="bn2"),
            lq.layers.QuantConv2D(32, 3, padding="same", name="bin3", **binary),
            layers.BatchNormalization(name="bn3"),
            layers.GlobalAveragePooling2D(name="gap"),
            lq.layers.QuantDense(10, name="bin_dense", **binary),
            layers.BatchNormalization(name="bn_out"),
        ],
        name=f"tiny_bnn_a{activation_bits}",
    )


@pytest.fixture(scope="module")
def cifar(cifar_archive):
    splits = load_cifar10(
        cifar_archive, batch_size=100, train_examples=64, augment=False
    )
    train_x, train_y = next(iter(splits.train))
    test_x, test_y = [], []
    for x, y in splits.test.take(NUM_IMAGES // 100):
        test_x.append(x.numpy())
        test_y.append(y.numpy())
    return {
        "train": (train_x, train_y),
        "test": (np.concatenate(test_x), np.concatenate(test_y)),
        "test_batches": splits.test.take(NUM_IMAGES // 100),
    }


@pytest.fixture(scope="module")
def resnet20(cifar, tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    model = models.get("resnet20")
    _train_steps(model, *cifar["train"])
    path = tmp_path_factory.mktemp("resnet20") / "resnet20.tflite"
    return model, export.convert(model, path), path


@pytest.fixture(scope="module")
def tiny(cifar, tmp_path_factory):
    model = _tiny_bnn()
    _train_steps(model, *cifar["train"])
    path = tmp_path_factory.mktemp("tiny") / "tiny.tflite"
    return model, export.convert(model, path), path


def _row(report: dict, name: str) -> dict:
    (row,) = [r for r in report["layers"] if r["layer"] == name]
    return row


def _numpy_reference(model, deployed, images, labels) -> dict:
    keras_logits = model(images, training=False).numpy().astype(np.float64)
    lce_logits = deployed.predict(images).astype(np.float64)
    diff = np.abs(keras_logits - lce_logits)
    return {
        "agreement": np.mean(keras_logits.argmax(1) == lce_logits.argmax(1)),
        "max_logit_difference": diff.max(),
        "keras_accuracy": np.mean(keras_logits.argmax(1) == labels),
        "deployed_accuracy": np.mean(lce_logits.argmax(1) == labels),
    }


# ------------------------------------------------------------------------------------
# ResNet-20
# ------------------------------------------------------------------------------------


def test_resnet20_binarized_convolutions_become_binary_operators(resnet20):
    model, report, path = resnet20
    assert report["binarized_layers"] == 18 and report["binary_layers"] == 18
    convs = [r for r in report["layers"] if r["class"] == "QuantConv2D"]
    assert len(convs) == 18
    assert all(
        r["deployed_as"] == "LceBconv2d" and r["weight_bits"] == 1 for r in convs
    )
    # Each binary conv is matched to its own operator, in the order of the network.
    indices = [r["operator_index"] for r in convs]
    assert indices == sorted(indices) and len(set(indices)) == 18
    assert _row(report, "stem_conv")["deployed_as"] == "CONV_2D"
    assert _row(report, "stem_conv")["binary"] is False
    assert _row(report, "logits")["deployed_as"] == "FULLY_CONNECTED"
    assert report["operators"]["LceBconv2d"] == 18
    assert report["operators"]["LceQuantize"] == 18
    # Sizes: the file on disk, and 4 bytes per Keras weight value.
    assert report["tflite_bytes"] == path.stat().st_size
    expected = 4 * sum(w.size for w in model.get_weights())
    assert report["float32_bytes"] == expected
    # 1-bit kernels: the flatbuffer is far smaller than the float model.
    assert report["tflite_bytes"] < report["float32_bytes"] / 8
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_resnet20_deployed_model_matches_keras_on_real_images(resnet20, cifar):
    model, _, path = resnet20
    deployed = export.DeployedModel(path)
    assert deployed.input_shape == (1, 32, 32, 3) and deployed.output_shape == (1, 10)
    images, labels = cifar["test"]
    report = export.verify(model, deployed, cifar["test_batches"])
    reference = _numpy_reference(model, deployed, images, labels)
    assert report["num_examples"] == NUM_IMAGES
    for key, value in reference.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert report["agreement"] >= 0.99
    assert report["logit_match_fraction"] >= 0.95
    assert report["mean_logit_difference"] < 0.01


# ------------------------------------------------------------------------------------
# A tiny Sequential Larq model
# ------------------------------------------------------------------------------------


def test_tiny_model_operator_table(tiny):
    _, report, _ = tiny
    for name in ("bin1", "bin2", "bin3"):
        row = _row(report, name)
        assert row["deployed_as"] == "LceBconv2d" and row["binary"], row
    # One-padding lets the first binary conv write bitpacked output for the max-pool.
    assert _row(report, "bin1")["bitpacked_output"] is True
    assert _row(report, "bin2")["bitpacked_output"] is False
    assert report["operators"].get("LceBMaxPool2d") == 1
    dense = _row(report, "bin_dense")
    assert dense["binarized"] and not dense["binary"]
    assert dense["deployed_as"] == "FULLY_CONNECTED" and dense["weight_bits"] == 32
    first = _row(report, "first")
    assert first["deployed_as"] == "CONV_2D" and not first["binarized"]
    assert report["binarized_layers"] == 4 and report["binary_layers"] == 3


def test_operator_table_matches_by_weights_not_by_shape(tiny):
    model, report, path = tiny
    swapped = tf.keras.models.clone_model(model)
    swapped.set_weights(model.get_weights())
    a, b = swapped.get_layer("bin2"), swapped.get_layer("bin3")
    ka, kb = a.kernel.numpy(), b.kernel.numpy()
    a.kernel.assign(kb)
    b.kernel.assign(ka)
    table = export.operator_report(swapped, path)
    assert (
        _row(table, "bin2")["operator_index"] == _row(report, "bin3")["operator_index"]
    )
    assert (
        _row(table, "bin3")["operator_index"] == _row(report, "bin2")["operator_index"]
    )
    # Fresh random kernels match no binary operator of the file.
    stranger = _tiny_bnn(seed=7)
    table = export.operator_report(stranger, path.read_bytes())
    assert not any(r["binary"] for r in table["layers"])


def test_tiny_model_matches_keras_and_verify_counts(tiny, cifar):
    model, _, path = tiny
    images, labels = cifar["test"]
    report = export.verify(model, path, cifar["test_batches"], num_examples=150)
    deployed = export.DeployedModel(path)
    reference = _numpy_reference(model, deployed, images[:150], labels[:150])
    assert report["num_examples"] == 150  # cut inside the second batch of 100
    for key, value in reference.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert report["agreement"] >= 0.99
    # Calling the object is predict; a batch is the same as its images one by one.
    batch = deployed(images[:5])
    single = np.concatenate([deployed.predict(images[i : i + 1]) for i in range(5)])
    np.testing.assert_array_equal(batch, single)


def test_real_activations_stay_float_fixed_batch_is_padded(cifar, tmp_path, caplog):
    model = _tiny_bnn(activation_bits=32, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="larq_lipschitz.export"):
        report = export.convert(model, tmp_path / "a32.tflite")
    assert report["binary_layers"] == 0 and report["binarized_layers"] == 4
    assert "4 of 4 binarized layers stay float operators" in caplog.text
    for name in ("bin1", "bin2", "bin3"):
        assert _row(report, name)["deployed_as"] == "CONV_2D"
    deployed = export.DeployedModel(tmp_path / "a32.tflite")
    assert deployed.batch_size == 4
    images = cifar["test"][0][:10]  # 4 + 4 + 2 padded
    keras_logits = model(images, training=False).numpy()
    np.testing.assert_allclose(
        deployed.predict(images), keras_logits, rtol=1e-4, atol=1e-4
    )


def test_untrained_model_gets_a_warning(tmp_path, caplog):
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            tf.keras.layers.BatchNormalization(),
            lq.layers.QuantConv2D(
                8, 3, input_quantizer="ste_sign", kernel_quantizer="ste_sign"
            ),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="larq_lipschitz.export"):
        export.convert(model, tmp_path / "fresh.tflite")
    assert "untrained" in caplog.text


# ------------------------------------------------------------------------------------
# Noise evaluation of the deployed model
# ------------------------------------------------------------------------------------


def test_evaluate_deployed_against_reference(tiny, cifar):
    model, _, path = tiny
    deployed = export.DeployedModel(path)
    sigmas = (0.0, 0.3)
    report = export.evaluate_deployed(path, cifar["test_batches"], sigmas, seed=3)
    assert report["num_examples"] == NUM_IMAGES
    assert report["gaussian_0"] == report["clean"]
    # Reference: noise drawn batch by batch with the batch key, predicted here.
    hits = {s: 0 for s in sigmas}
    for i, (x, y) in enumerate(cifar["test_batches"]):
        for s in sigmas:
            noisy = perturbations.add_noise(
                x, "gaussian", s, seed=tf.constant([3, i], tf.int64)
            )
            hits[s] += int(
                np.sum(deployed.predict(noisy.numpy()).argmax(1) == y.numpy())
            )
    assert report["clean"] == hits[0.0] / NUM_IMAGES
    assert report["gaussian_0.3"] == hits[0.3] / NUM_IMAGES
    # The Keras evaluation sees the same noisy images: at most a few disagreements.
    keras = evaluation.noise_report(model, cifar["test_batches"], sigmas, seed=3)
    for key in ("clean", "gaussian_0.3"):
        assert abs(keras[key] - report[key]) <= 3 / NUM_IMAGES, key
    with pytest.raises(ValueError, match=r"sigmas must be finite numbers in \[0, 1\]"):
        export.evaluate_deployed(path, cifar["test_batches"], (-0.1,))


# ------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------


def test_unconvertible_layer_is_named_and_nothing_is_written(tmp_path):
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, name="fine_conv")(inputs)
    x = tf.keras.layers.Lambda(lambda t: tf.math.cumprod(t, axis=1), name="odd_layer")(
        x
    )
    x = tf.keras.layers.Dense(2, name="after")(x)
    model = tf.keras.Model(inputs, x)
    target = tmp_path / "model.tflite"
    target.write_bytes(b"previous file")
    with pytest.raises(export.ExportError, match="odd_layer") as info:
        export.convert(model, target)
    assert "Cumprod" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]
    with pytest.raises(TypeError, match="tf.keras.Model"):
        export.convert("not a model", target)


def test_deployed_model_input_errors(tiny, tmp_path):
    _, _, path = tiny
    deployed = export.DeployedModel(path)
    with pytest.raises(ValueError, match="uint8"):
        deployed.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        deployed.predict(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(FileNotFoundError):
        export.DeployedModel(tmp_path / "absent.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"0123456789abcdef")
    with pytest.raises(export.ExportError, match="not a TensorFlow Lite"):
        export.DeployedModel(tmp_path / "junk.tflite")
    with pytest.raises(ValueError, match="num_threads"):
        export.DeployedModel(path, num_threads=0)


def test_missing_lce_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "larq_compute_engine", None)
    with pytest.raises(
        export.LCENotInstalledError, match=r'pip install "larq-lipschitz\[deploy\]"'
    ):
        export.convert(_tiny_bnn(), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


# ------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------


def _fake_run(folder: pathlib.Path, model, archive) -> pathlib.Path:
    folder.mkdir(parents=True)
    model.save(folder / runs.MODEL_FILE)
    runs.atomic_write_json(
        folder / runs.RESULTS_FILE,
        {
            "format": runs.RESULTS_FORMAT,
            "status": "finished",
            "config": {"model": "tiny", "dataset": "cifar10", "data": str(archive)},
        },
    )
    return folder


def test_cli_export(tiny, cifar_archive, tmp_path, capsys):
    model, _, _ = tiny
    run = _fake_run(tmp_path / "run", model, cifar_archive)
    code = cli.main(["export", str(run), "--examples", "200", "--noise", "0.05"])
    printed = capsys.readouterr().out
    assert code == 0
    assert (run / "model.tflite").is_file()
    data = json.loads((run / "export.json").read_text())
    assert data["tflite_bytes"] == (run / "model.tflite").stat().st_size
    assert data["verification"]["num_examples"] == 200
    assert data["verification"]["agreement"] >= 0.99
    assert data["binary_layers"] == 3 and data["binarized_layers"] == 4
    assert {r["layer"] for r in data["layers"] if r["binary"]} == {
        "bin1",
        "bin2",
        "bin3",
    }
    assert set(data["deployed_noise_accuracy"]) >= {"clean", "gaussian_0.05"}
    assert data["versions"]["larq-compute-engine"].startswith("0.16")
    assert "agreement" in printed and "LceBconv2d" in printed
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_cli_export_errors(tiny, cifar_archive, tmp_path, capsys, monkeypatch):
    model, _, _ = tiny
    run = _fake_run(tmp_path / "run", model, cifar_archive)
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / runs.RESULTS_FILE).write_text((run / runs.RESULTS_FILE).read_text())
    assert cli.main(["export", str(no_model)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained model" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(no_model)) == [runs.RESULTS_FILE]

    assert cli.main(["export", str(tmp_path / "absent")]) == 2
    assert "no such run folder" in capsys.readouterr().err

    assert cli.main(["export", str(run), "--noise", "0.05,-1"]) == 2
    assert "--noise sigmas must be finite numbers in [0, 1]" in capsys.readouterr().err
    assert not (run / "model.tflite").exists()

    monkeypatch.setitem(sys.modules, "larq_compute_engine", None)
    assert cli.main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "larq-lipschitz[deploy]"' in err and len(err.splitlines()) == 1
    assert not (run / "model.tflite").exists()
    monkeypatch.undo()

    with pytest.raises(SystemExit):
        cli.main(["export", str(run), "--examples", "0"])


# ------------------------------------------------------------------------------------
# The robustness suite on the deployed model
# ------------------------------------------------------------------------------------


def test_run_suite_on_the_deployed_model_matches_a_direct_evaluation(tiny, cifar):
    model, _, path = tiny
    deployed = export.DeployedModel(path)
    settings = dict(
        seed=5,
        num_examples=200,
        batch_size=100,
        noise_levels={"gaussian": (0.1,)},
        corruptions=("contrast", "gaussian_noise"),
        severities=(1, 5),
    )
    report = robustness.run_suite(deployed, cifar["test_batches"], "all", **settings)
    assert report["evaluated"] == {
        "kind": "deployed",
        "path": str(path),
        "bytes": path.stat().st_size,
        "batch_size": 1,
    }
    assert report["attacks"]["skipped"] == robustness.DEPLOYED_ATTACKS_NOTE
    assert report["attacks"]["results"] == [] and report["certified"] is None
    # Reference: each batch perturbed here with its batch index, predicted by the
    # interpreter, hits counted in NumPy.
    images, labels = cifar["test"]

    def direct(name, level) -> float:
        fn = perturbations.perturbation_fn(name, level, 5)
        hits = 0
        for i in range(2):
            x = images[100 * i : 100 * (i + 1)]
            y = labels[100 * i : 100 * (i + 1)]
            noisy = fn(tf.constant(x), batch_index=tf.constant(i, tf.int64)).numpy()
            hits += int(np.sum(deployed.predict(noisy).argmax(1) == y))
        return hits / 200

    clean = np.mean(deployed.predict(images[:200]).argmax(1) == labels[:200])
    assert report["clean_accuracy"] == clean
    assert report["noise"]["results"][0]["accuracy"] == direct("gaussian", 0.1)
    for row in report["corruptions"]["results"]:
        assert row["accuracy"] == direct(row["name"], row["severity"]), row
    # The Keras model on the same perturbed images: only sign flips may differ.
    keras = robustness.run_suite(
        model, cifar["test_batches"], "corruptions", **settings
    )
    differences = robustness.accuracy_differences(report, keras)
    assert differences["settings"] == 1 + 4
    assert differences["max_abs"] <= 3 / 200
    with pytest.raises(ValueError, match="suite 'attacks' on a deployed model"):
        robustness.run_suite(deployed, cifar["test_batches"], "attacks")


def test_evaluate_deployed_command_end_to_end(
    tiny, cifar, cifar_archive, tmp_path, capsys
):
    model, _, _ = tiny
    run = _fake_run(tmp_path / "run", model, cifar_archive)
    common = ["--examples", "100", "--batch-size", "50", "--corruptions", "contrast"]
    common += ["--severities", "1,3"]
    assert cli.main(["export", str(run), "--examples", "100"]) == 0
    assert cli.main(["evaluate", str(run), "--suite", "corruptions", *common]) == 0
    keras_files = {
        name: (run / name).read_bytes()
        for name in os.listdir(run)
        if name.startswith("robustness")
    }
    assert set(keras_files) == {
        "robustness.json",
        "robustness.csv",
        "robustness_severity.png",
        "robustness_corruptions.png",
    }
    capsys.readouterr()
    argv = ["evaluate", str(run), "--deployed", *common, "--gaussian", "0.05"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # The Keras model's report is untouched; the deployed one has its own files.
    for name, content in keras_files.items():
        assert (run / name).read_bytes() == content, name
    data = json.loads((run / "robustness_deployed.json").read_text())
    assert data["evaluated"]["kind"] == "deployed"
    assert data["evaluated"]["path"] == str(run / "model.tflite")
    assert data["suite"] == "all" and data["num_examples"] == 100
    assert data["attacks"]["skipped"] and data["certified"] is None
    assert [r["severity"] for r in data["corruptions"]["results"]] == [1, 3]
    # Its clean accuracy is the interpreter's on the same 100 images.
    direct = export.evaluate_deployed(
        run / "model.tflite", cifar["test_batches"], (), num_examples=100
    )
    assert data["clean_accuracy"] == direct["clean"]
    comparison = data["keras_comparison"]
    assert comparison["source"] == str(run / "robustness.json")
    assert comparison["settings"] == 1 + 2  # clean, contrast 1 and 3
    assert comparison["max_abs"] <= 3 / 100
    rows = (run / "robustness_deployed.csv").read_text().splitlines()
    assert rows[0] == "family,name,severity,accuracy"
    assert len(rows) == 1 + 1 + 7 + 2  # clean, 1 + 3 + 3 noise levels, 2 severities
    for name in (
        "robustness_deployed_severity.png",
        "robustness_deployed_corruptions.png",
    ):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "attacks and certified accuracy not run" in printed
    assert "deployed - Keras accuracy over 3 settings" in printed
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]

    # An explicit flatbuffer elsewhere, a noise-only suite: the report is replaced.
    elsewhere = tmp_path / "shipped.tflite"
    elsewhere.write_bytes((run / "model.tflite").read_bytes())
    argv = ["evaluate", str(run), "--deployed", str(elsewhere), "--suite", "noise"]
    assert cli.main([*argv, "--examples", "50", "--gaussian", "0.1"]) == 0
    data = json.loads((run / "robustness_deployed.json").read_text())
    assert data["evaluated"]["path"] == str(elsewhere) and data["corruptions"] is None
    assert data["keras_comparison"] is None  # other images than robustness.json's
    for name, content in keras_files.items():
        assert (run / name).read_bytes() == content, name
