"""The robustness suite on a small trained BNN and real CIFAR-10 images, and `evaluate`.

Every accuracy of the suite is checked against an evaluation made here, outside the
suite's input pipeline: predictions of the model on the perturbed batches computed one
by one (NumPy for the contrast corruption and for accuracy, corrupt/add_noise of
`perturbations` on each batch with the same batch key for the random ones), so a
wrong batch key, a mix-up between settings of the switch_case pipeline, a lost batch or
a wrong mean all show.
"""

import csv
import json
import pathlib
import tarfile

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from larq_lipschitz import cli, perturbations, robustness, runs
from larq_lipschitz.attacks import attack_accuracy

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

RECORD = 1 + 32 * 32 * 3
BATCH = 50


def _read_records(archive, wanted: dict[str, int]) -> dict[str, tuple]:
    """The first `count` images and labels of each wanted member, in one pass."""
    out = {}
    with tarfile.open(archive, "r|gz") as tar:  # streamed: one decompression
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if name in wanted:
                count = wanted[name]
                raw = tar.extractfile(member).read(RECORD * count)
                rows = np.frombuffer(raw, np.uint8).reshape(count, RECORD)
                images = rows[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
                out[name] = (np.ascontiguousarray(images), rows[:, 0].astype(np.int32))
    return out


def _tiny_bnn(seed: int = 0) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    binary = dict(
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        padding="same",
        use_bias=False,
    )
    return tf.keras.Sequential(
        [
            tf.keras.Input((32, 32, 3)),
            layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
            layers.BatchNormalization(momentum=0.8),
            lq.layers.QuantConv2D(32, 3, **binary),
            layers.MaxPooling2D(),
            layers.BatchNormalization(momentum=0.8),
            lq.layers.QuantConv2D(32, 3, **binary),
            layers.BatchNormalization(momentum=0.8),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )


@pytest.fixture(scope="module")
def cifar(cifar_archive):
    parts = _read_records(
        cifar_archive, {"data_batch_4.bin": 2000, "test_batch.bin": 300}
    )
    (train_x, train_y), (test_x, test_y) = (
        parts["data_batch_4.bin"],
        parts["test_batch.bin"],
    )
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def model(cifar):
    train_x, train_y, _, _ = cifar
    net = _tiny_bnn()  # BatchNorm momentum 0.8: moving statistics settle in 80 steps
    net.compile(
        tf.keras.optimizers.Adam(5e-3),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    net.fit(train_x / np.float32(255), train_y, batch_size=100, epochs=4, verbose=0)
    return net


def _dataset(images, labels, batch=BATCH):
    pixels = images.astype(np.float32) / 255
    return tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(batch)


def _accuracy(model, batches) -> float:
    """Top-1 accuracy from the model's predictions batch by batch, counted in NumPy."""
    hits = total = 0
    for x, y in batches:
        predicted = np.argmax(model(np.asarray(x), training=False).numpy(), axis=1)
        hits += int(np.sum(predicted == np.asarray(y)))
        total += len(y)
    return hits / total


def _numpy_batches(images, labels, n, batch=BATCH):
    pixels = images[:n].astype(np.float32) / 255
    return [(pixels[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def _numpy_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * factor + means, 0, 1)


@pytest.fixture(scope="module")
def report(model, cifar):
    _, _, test_x, test_y = cifar
    return robustness.run_suite(
        model,
        _dataset(test_x, test_y, batch=100),  # rebatched to BATCH by the suite
        "all",
        seed=3,
        num_examples=200,
        batch_size=BATCH,
        noise_levels={"gaussian": (0.05, 0.1), "salt_and_pepper": (0.03,)},
        corruptions=("contrast", "gaussian_noise", "fog"),
        severities=(1, 3, 5),
        epsilons=(2 / 255,),
        attack_steps=3,
    )


def test_clean_and_noise_accuracy_match_a_direct_evaluation(model, cifar, report):
    _, _, test_x, test_y = cifar
    batches = _numpy_batches(test_x, test_y, 200)
    assert report["num_examples"] == 200 and report["batch_size"] == BATCH
    assert report["clean_accuracy"] == pytest.approx(
        _accuracy(model, batches), abs=1e-12
    )
    assert report["clean_accuracy"] > 0.2  # trained: well above chance
    rows = report["noise"]["results"]
    assert [(r["family"], r["level"]) for r in rows] == [
        ("gaussian", 0.05),
        ("gaussian", 0.1),
        ("salt_and_pepper", 0.03),
    ]
    for r in rows:
        noisy = [
            (perturbations.add_noise(x, r["family"], r["level"], 3, batch_index=i), y)
            for i, (x, y) in enumerate(batches)
        ]
        assert r["accuracy"] == pytest.approx(_accuracy(model, noisy), abs=1e-12)
    # the strongest Gaussian noise changes some predictions (the check above is not vacuous)
    assert (
        rows[1]["accuracy"] != report["clean_accuracy"]
        or rows[2]["accuracy"] != (report["clean_accuracy"])
    )


def test_corruption_accuracy_and_means_match_a_direct_evaluation(model, cifar, report):
    _, _, test_x, test_y = cifar
    batches = _numpy_batches(test_x, test_y, 200)
    section = report["corruptions"]
    assert section["source"] == "synthesized"
    rows = section["results"]
    assert [(r["name"], r["severity"]) for r in rows] == [
        (n, s) for n in ("contrast", "gaussian_noise", "fog") for s in (1, 3, 5)
    ]
    for r in rows:
        if r["name"] == "contrast":  # deterministic: an independent NumPy reference
            factor = perturbations.CORRUPTIONS["contrast"][r["severity"] - 1]
            changed = [(_numpy_contrast(x, factor), y) for x, y in batches]
        else:  # random: the same stream, batch i keyed by i
            changed = [
                (
                    perturbations.corrupt(
                        x, r["name"], r["severity"], 3, batch_index=i
                    ),
                    y,
                )
                for i, (x, y) in enumerate(batches)
            ]
        # float32 rounding may flip a near-tie; one image in 200 at most
        assert abs(r["accuracy"] - _accuracy(model, changed)) <= 1 / 200 + 1e-12
        assert r["category"] == robustness._CATEGORY[r["name"]]
    per = {
        n: np.mean([r["accuracy"] for r in rows if r["name"] == n])
        for n in section["per_corruption"]
    }
    assert section["per_corruption"] == pytest.approx(per)
    assert section["mean_corruption_accuracy"] == pytest.approx(
        np.mean(list(per.values()))
    )
    assert section["mean_over"] == ["gaussian_noise", "fog", "contrast"]
    missing = section["missing_standard"]
    assert (
        len(missing) == 12
        and "frost" in missing
        and "not synthesized" in missing["frost"]
    )
    assert missing["snow"] == "not requested"
    # contrast at severity 5 (x 0.15) costs accuracy on a trained network
    assert rows[2]["accuracy"] < report["clean_accuracy"]


def test_attacks_and_certificates_are_ordered_and_match_attack_accuracy(
    model, cifar, report
):
    _, _, test_x, test_y = cifar
    attacks = {r["method"]: r for r in report["attacks"]["results"]}
    assert set(attacks) == {"fgsm", "pgd"} and report["attacks"]["error"] is None
    assert attacks["pgd"]["epsilon_255"] == pytest.approx(2.0)
    direct = attack_accuracy(
        model, _dataset(test_x[:200], test_y[:200]), 2 / 255, "fgsm"
    )
    assert attacks["fgsm"]["accuracy"] == pytest.approx(direct, abs=1e-12)
    certified = report["certified"]
    assert certified["supported"] and certified["reason"] is None
    cert = certified["results"][0]
    # sound certificate <= any attack's accuracy <= clean accuracy
    assert (
        cert["certified_accuracy"]
        <= attacks["pgd"]["accuracy"]
        <= report["clean_accuracy"]
    )
    assert attacks["fgsm"]["accuracy"] <= report["clean_accuracy"]
    assert cert["clean_accuracy"] == pytest.approx(report["clean_accuracy"])


def test_timing_is_reported_against_plain_inference(report):
    timing = report["timing"]
    plain = timing["plain_inference"]
    assert plain["images"] == 200 and plain["seconds"] > 0
    assert set(timing["sections"]) == {
        "clean",
        "noise",
        "corruptions",
        "attacks",
        "certified",
    }
    assert timing["sections"]["corruptions"]["images"] == 9 * 200
    assert timing["sections"]["noise"]["images"] == 3 * 200
    expected = sum(s["images"] for s in timing["sections"].values()) + 200
    assert timing["images"] == expected
    rate = plain["images"] / plain["seconds"]
    assert timing["time_ratio"] == pytest.approx(
        timing["suite_seconds"] * rate / expected
    )
    assert timing["plain_equivalent_seconds"] == pytest.approx(expected / rate)


def test_every_synthesized_corruption_runs_in_one_pipeline(model, cifar):
    _, _, test_x, test_y = cifar
    calls = []
    out = robustness.run_suite(
        model,
        _dataset(test_x[:40], test_y[:40], batch=20),
        "corruptions",
        seed=1,
        severities=(4,),
        progress=lambda done, total, message: calls.append((done, total, message)),
    )
    section = out["corruptions"]
    names = [r["name"] for r in section["results"]]
    assert sorted(names) == sorted(perturbations.CORRUPTIONS)
    assert names[:14] == [n for n in perturbations.STANDARD_CORRUPTIONS if n != "frost"]
    assert section["mean_over"] == names[:14]
    assert list(section["missing_standard"]) == ["frost"]
    batches = _numpy_batches(test_x, test_y, 40, batch=20)
    for r in section["results"]:
        changed = [
            (perturbations.corrupt(x, r["name"], 4, 1, batch_index=i), y)
            for i, (x, y) in enumerate(batches)
        ]
        assert abs(r["accuracy"] - _accuracy(model, changed)) <= 1 / 40 + 1e-12, r[
            "name"
        ]
    assert section["mean_corruption_accuracy"] == pytest.approx(
        np.mean([r["accuracy"] for r in section["results"][:14]])
    )
    assert section["mean_all_accuracy"] == pytest.approx(
        np.mean([r["accuracy"] for r in section["results"]])
    )
    assert [c[0] for c in calls] == list(range(1, 19)) and calls[-1][1] == 18


def test_released_files_replace_the_synthesized_corruptions(model, cifar, tmp_path):
    import tensorflow_datasets as tfds

    _, _, test_x, test_y = cifar
    with tfds.testing.mock_data(
        num_examples=70, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        out = robustness.run_suite(
            model,
            _dataset(test_x, test_y),
            "corruptions",
            num_examples=60,
            batch_size=25,
            corruptions=("frost", "fog"),
            severities=(2,),
            cifar10_corrupted_dir=str(tmp_path),
        )
        expected = {}
        for name in ("frost", "fog"):
            data = perturbations.load_cifar10_corrupted(name, 2, str(tmp_path), 30)
            images = np.concatenate([x.numpy() for x, _ in data])[:60]
            labels = np.concatenate([y.numpy() for _, y in data])[:60]
            expected[name] = _accuracy(model, [(images, labels)])
    section = out["corruptions"]
    assert section["source"] == "released" and section["data_dir"] == str(tmp_path)
    got = {r["name"]: r["accuracy"] for r in section["results"]}
    assert got == pytest.approx(expected, abs=1e-12)
    assert "frost" not in section["missing_standard"]
    assert section["mean_over"] == ["frost", "fog"]


def test_unsupported_certification_is_recorded_with_its_reason(cifar):
    _, _, test_x, test_y = cifar
    layers = tf.keras.layers
    net = tf.keras.Sequential(
        [
            tf.keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3),
            layers.LayerNormalization(),  # not supported by certify
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )
    calls = []
    clock = robustness._Clock(1, lambda *args: calls.append(args))
    out = robustness._run_certify(
        net, _dataset(test_x[:20], test_y[:20]), (1 / 255,), 20, clock
    )
    assert out["supported"] is False and out["results"] == []
    assert "LayerNormalization" in out["reason"]
    assert calls == [(1, 1, "certified: not supported")]


def _report(accuracies: dict, clean: float = 0.9) -> dict:
    return {
        "format": robustness.REPORT_FORMAT,
        "clean_accuracy": clean,
        "num_examples": 100,
        "corruptions": {
            "source": "synthesized",
            "results": [
                {"name": n, "severity": s + 1, "accuracy": a}
                for n, accs in accuracies.items()
                for s, a in enumerate(accs)
            ],
        },
    }


def test_corruption_error_follows_its_formula():
    rng = np.random.default_rng(7)
    names = ["fog", "contrast", "saturate", "snow"]  # saturate: held out, not in mCE
    mine = {n: rng.uniform(0.3, 0.9, 5) for n in names}
    ref = {n: rng.uniform(0.3, 0.9, 5) for n in names}
    ref["snow"] = np.ones(5)  # the reference makes no error: CE undefined
    errors = robustness.corruption_errors(_report(mine), _report(ref))
    expected = {n: np.sum(1 - mine[n]) / np.sum(1 - ref[n]) for n in names[:3]}
    assert errors["corruption_error"]["snow"] is None and "snow" in errors["undefined"]
    for n in names[:3]:
        assert errors["corruption_error"][n] == pytest.approx(expected[n])
    assert errors["mce_over"] == ["fog", "contrast"]
    assert errors["mce"] == pytest.approx((expected["fog"] + expected["contrast"]) / 2)
    itself = robustness.corruption_errors(_report(mine), _report(mine))
    assert itself["mce"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference report holds no corruption"):
        robustness.corruption_errors(_report(mine), {"clean_accuracy": 0.5})


def test_report_files_are_written_and_well_formed(report, tmp_path):
    paths = robustness.write_robustness(report, tmp_path, reference=report)
    data = json.loads(paths["json"].read_text())
    assert data["clean_accuracy"] == report["clean_accuracy"]
    assert data["mce"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in data["corruption_error"].values())
    assert data["mce_over"] == ["gaussian_noise", "fog", "contrast"]
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    # clean + 3 noise + 3 corruptions x 3 severities + fgsm, pgd + certified
    assert len(rows) == 1 + 3 + 9 + 2 + 1
    assert list(rows[0]) == ["family", "name", "severity", "accuracy"]
    by_key = {
        (r["family"], r["name"], r["severity"]): float(r["accuracy"]) for r in rows
    }
    assert by_key[("corruption", "fog", "3")] == pytest.approx(
        report["corruptions"]["results"][7]["accuracy"]
    )
    assert by_key[("clean", "clean", "0")] == pytest.approx(report["clean_accuracy"])
    for key in ("severity_png", "corruptions_png"):
        png = paths[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert robustness.read_robustness(tmp_path)["format"] == robustness.REPORT_FORMAT


def test_a_report_without_corruptions_writes_no_bar_chart(model, cifar, tmp_path):
    _, _, test_x, test_y = cifar
    out = robustness.run_suite(
        model,
        _dataset(test_x[:30], test_y[:30], batch=30),
        "noise",
        noise_levels={"uniform": [0.1]},
    )
    paths = robustness.write_robustness(out, tmp_path)
    assert "corruptions_png" not in paths and paths["severity_png"].is_file()
    assert len(paths["csv"].read_text().splitlines()) == 1 + 1 + 1
    with pytest.raises(ValueError, match="holds no corruption results"):
        robustness.write_robustness(out, tmp_path / "other", reference=out)
    assert not (tmp_path / "other").exists()


def test_a_deployed_report_gets_its_own_files(report, tmp_path):
    keras_files = robustness.write_robustness(report, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    shipped = {
        **report,
        "evaluated": {"kind": "deployed", "path": "/x/model.tflite", "bytes": 9},
        "attacks": {"skipped": robustness.DEPLOYED_ATTACKS_NOTE, "results": []},
        "certified": None,
    }
    paths = robustness.write_robustness(shipped, tmp_path)
    assert {p.name for p in paths.values()} == {
        "robustness_deployed.json",
        "robustness_deployed.csv",
        "robustness_deployed_severity.png",
        "robustness_deployed_corruptions.png",
    }
    # The Keras model's report is untouched, byte for byte.
    assert {p.name: p.read_bytes() for p in keras_files.values()} == {
        name: before[name] for name in (p.name for p in keras_files.values())
    }
    read = robustness.read_robustness(tmp_path, deployed=True)
    assert read["evaluated"]["kind"] == "deployed"
    assert robustness.read_robustness(tmp_path)["evaluated"]["kind"] == "keras"
    rows = paths["csv"].read_text().splitlines()
    assert len(rows) == 1 + 1 + 3 + 9  # no attack or certified rows
    assert not any(",fgsm," in r or ",ibp," in r for r in rows)


def _settings_report(clean, noise, corruptions, **extra) -> dict:
    return {
        "format": robustness.REPORT_FORMAT,
        "seed": 0,
        "batch_size": 50,
        "num_examples": 200,
        "clean_accuracy": clean,
        "noise": {
            "results": [
                {"family": "gaussian", "level": lv, "accuracy": a}
                for lv, a in noise.items()
            ]
        },
        "corruptions": {
            "results": [
                {"name": n, "severity": s, "accuracy": a}
                for (n, s), a in corruptions.items()
            ]
        },
        **extra,
    }


def test_accuracy_differences_setting_by_setting():
    rng = np.random.default_rng(3)
    noise = {0.05: rng.random(), 0.1: rng.random()}
    corr = {("fog", s): rng.random() for s in (1, 3)}
    keras = _settings_report(0.5, noise, corr)
    shifted_noise = {0.05: noise[0.05] - 0.01, 0.1: noise[0.1]}
    shifted_corr = {("fog", 1): corr[("fog", 1)] + 0.04, ("fog", 3): corr[("fog", 3)]}
    shifted_corr[("contrast", 2)] = 0.3  # only in one report: not compared
    deployed = _settings_report(0.49, shifted_noise, shifted_corr)
    out = robustness.accuracy_differences(deployed, keras)
    expected = np.array([-0.01, -0.01, 0.0, 0.04, 0.0])  # clean, 2 noise, 2 fog
    assert out["settings"] == 5
    assert out["clean"] == pytest.approx(-0.01)
    assert out["max_abs"] == pytest.approx(0.04)
    assert out["mean_abs"] == pytest.approx(np.abs(expected).mean())
    assert out["worst"]["name"] == "fog" and out["worst"]["severity"] == 1
    assert out["worst"]["difference"] == pytest.approx(0.04)
    for key, value in (("seed", 1), ("batch_size", 100), ("num_examples", 10)):
        other = {**keras, key: value}
        assert robustness.accuracy_differences(deployed, other) is None, key


@given(
    index=st.integers(0, 5),
    bad=st.sampled_from([np.nan, np.inf, -np.inf, 1.01, -0.2, 255.0]),
    edge=st.sampled_from([0.0, 1.0, 1 + 5e-6, -5e-6]),
)
@settings(max_examples=25, deadline=None)
def test_check_pixels_names_the_first_bad_image(index, bad, edge):
    x = np.random.default_rng(index).random((6, 4, 4, 3)).astype(np.float32)
    x[0, 0, 0, 0] = edge  # within float tolerance of [0, 1]: accepted
    perturbations.check_pixels(x, "mine", "batch 2")
    x[index, 1, 2, 0] = bad
    if index < 5:
        x[5, 0, 0, 1] = bad  # a later bad image is not the one named
    finite = bool(np.isfinite(bad))
    kind = "has pixel values outside [0, 1]" if finite else "holds NaN or infinite"
    with pytest.raises(ValueError, match=r"^mine: batch 2 image \d+ ") as info:
        perturbations.check_pixels(tf.constant(x), "mine", "batch 2")
    message = str(info.value)
    assert f"image {index} " in message and kind in message
    assert len(message.splitlines()) == 1
    perturbations.check_pixels(np.full(x.shape, 255, np.uint8), "mine")  # uint8 passes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"suite": "everything"}, "unknown suite 'everything'"),
        ({"suite": "corruptions", "corruptions": ["frost"]}, "not synthesized"),
        (
            {"suite": "corruptions", "corruptions": ["haze"]},
            "unknown corruption 'haze'",
        ),
        ({"suite": "corruptions", "severities": [0, 1]}, "severity"),
        ({"suite": "corruptions", "severities": [6]}, "severity"),
        ({"suite": "noise", "noise_levels": {"pink": [0.1]}}, "unknown noise family"),
        ({"suite": "noise", "noise_levels": {"gaussian": [-0.1]}}, "level"),
        (
            {"suite": "noise", "noise_levels": {"uniform": [0.1, 1.5]}},
            r"uniform noise level must be in \[0, 1\] pixel scale, got 1.5",
        ),
        ({"suite": "attacks", "epsilons": [2.0]}, "epsilon"),
        ({"suite": "all", "num_examples": 0}, "num_examples"),
    ],
)
def test_invalid_arguments_are_refused_before_any_image_is_classified(kwargs, message):
    class Untouchable(tf.keras.Model):
        def call(self, x):  # pragma: no cover - must never run
            raise AssertionError("the model was called")

    data = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int32))
    ).batch(2)
    suite = kwargs.pop("suite")
    with pytest.raises(ValueError, match=message):
        robustness.run_suite(Untouchable(), data, suite, **kwargs)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def _fake_run(folder: pathlib.Path, model, archive) -> pathlib.Path:
    folder.mkdir(parents=True)
    model.save(folder / runs.MODEL_FILE)
    runs.atomic_write_json(
        folder / runs.RESULTS_FILE,
        {
            "format": runs.RESULTS_FORMAT,
            "status": "finished",
            "config": {
                "model": "tiny-bnn",
                "dataset": "cifar10",
                "data": str(archive),
                "data_dir": None,
                "regularizer": "l1inf",
                "strength": 1e-4,
                "seed": 0,
            },
            "test_accuracy": 0.3,
            "noise_accuracy": {"gaussian_0.05": 0.25},
            "epoch_seconds": [2.0],
            "mean_epoch_seconds": 2.0,
            "test_seconds": 1.0,
            "lipschitz_bounds": [
                {"epoch": 0, "lipschitz_inf": 10.0, "lipschitz_2": 3.0}
            ],
        },
    )
    return folder


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_evaluate_command_end_to_end_with_a_reference(
    model, cifar, cifar_archive, tmp_path, capsys
):
    _, _, test_x, test_y = cifar
    run = _fake_run(tmp_path / "run", model, cifar_archive)
    settings = dict(
        seed=0,
        num_examples=100,
        batch_size=BATCH,
        corruptions=("contrast", "fog"),
        attack_steps=2,
    )
    # The same model evaluated through the library on the same first 100 test images:
    # the CLI must find the same numbers, so its CE relative to this reference is 1.
    ref = robustness.run_suite(
        model, _dataset(test_x, test_y), "corruptions", **settings
    )
    robustness.write_robustness(ref, tmp_path / "ref")
    code = cli.main(
        [
            "evaluate",
            str(run),
            "--examples",
            "100",
            "--batch-size",
            str(BATCH),
            "--corruptions",
            "contrast,fog",
            "--pgd-steps",
            "2",
            "--eps",
            "0.00784313725490196",
            "--reference",
            str(tmp_path / "ref"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert {
        "robustness.json",
        "robustness.csv",
        "robustness_severity.png",
        "robustness_corruptions.png",
    } <= set(_listing(run))
    data = json.loads((run / "robustness.json").read_text())
    assert data["suite"] == "all" and data["num_examples"] == 100
    assert data["mce"] == pytest.approx(1.0)
    assert data["corruptions"]["results"] == ref["corruptions"]["results"]
    assert data["clean_accuracy"] == ref["clean_accuracy"]
    assert data["reference"]["source"] == str(tmp_path / "ref")
    assert data["timing"]["time_ratio"] > 0
    rows = (run / "robustness.csv").read_text().splitlines()
    # header + clean + 9 noise + 2 x 5 corruptions + fgsm, pgd + certified
    assert len(rows) == 1 + 1 + 9 + 10 + 2 + 1
    assert "mCE relative to" in printed and "ratio" in printed
    assert f"clean accuracy: {ref['clean_accuracy']:.4f}" in printed


def test_evaluate_and_compare_refuse_bad_input_and_write_nothing(
    model, cifar_archive, tmp_path, capsys
):
    run = _fake_run(tmp_path / "run", model, cifar_archive)
    before = _listing(run)
    cases = [
        ["evaluate", str(run), "--corruptions", "contrast,haze"],
        ["evaluate", str(run), "--severities", "1,6"],
        ["evaluate", str(run), "--suite", "noise", "--reference", str(run)],
        ["evaluate", str(run), "--reference", str(run)],  # it holds no robustness.json
        ["evaluate", str(tmp_path / "absent")],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, (argv, err)
        assert _listing(run) == before

    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / runs.RESULTS_FILE).write_text((run / runs.RESULTS_FILE).read_text())
    assert cli.main(["evaluate", str(no_model)]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert _listing(no_model) == [runs.RESULTS_FILE]

    no_results = tmp_path / "no_results"
    no_results.mkdir()
    out = tmp_path / "report"
    assert cli.main(["compare", str(run), str(no_results), "--output", str(out)]) == 2
    assert "results.json" in capsys.readouterr().err
    assert not out.exists()

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(run), "--suite", "everything"])
    assert exit_info.value.code == 2
    assert _listing(run) == before
