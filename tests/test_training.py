"""The training entry point on real CIFAR-10: it learns, writes its run folder, resumes."""

import json

import larq_lipschitz  # noqa: F401
from larq_lipschitz import runs
from larq_lipschitz.training import TrainConfig, train

import pytest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cifar_archive):
    """A binarized ResNet-20 with the L1,inf penalty, 2 epochs of 150 steps of batch 50."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        model="resnet20",
        data=str(cifar_archive),
        regularizer="l1inf",
        epochs=2,
        batch_size=50,
        train_examples=7500,
        learning_rate=5e-3,
        noise_sigmas=(0.05,),
        seed=1,
    )
    return out, config, train(config, out)


def test_few_hundred_steps_beat_chance_on_the_real_test_set(trained_run):
    _, _, results = trained_run
    # 10 classes: chance is 10%; 300 steps of a 1/1 ResNet-20 reach well above 25%.
    assert results["test_accuracy"] > 0.25
    assert results["data"]["num_examples"]["test"] == 10_000
    assert 0.0 <= results["noise_accuracy"]["gaussian_0.05"] <= 1.0


def test_run_folder_is_complete_and_machine_readable(trained_run):
    out, config, results = trained_run
    on_disk = json.loads((out / runs.RESULTS_FILE).read_text())
    assert on_disk["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert on_disk["config"] == json.loads(json.dumps(config.to_dict()))
    assert len(on_disk["epoch_seconds"]) == 2 and all(
        s > 0 for s in on_disk["epoch_seconds"]
    )
    assert len(on_disk["history"]["loss"]) == 2
    for package in ("tensorflow", "tf-keras", "larq"):
        assert on_disk["versions"][package][0].isdigit()
    assert (out / runs.MODEL_FILE).is_file()
    assert any((out / "logs").rglob("events.out.tfevents*"))


def test_a_finished_run_is_not_trained_again(trained_run):
    out, config, results = trained_run
    before = (out / runs.RESULTS_FILE).stat().st_mtime_ns
    again = train(config, out)
    assert again["test_accuracy"] == results["test_accuracy"]
    assert (out / runs.RESULTS_FILE).stat().st_mtime_ns == before


def test_a_folder_of_another_run_is_refused_untouched(trained_run):
    out, config, _ = trained_run
    before = (out / runs.RESULTS_FILE).read_bytes()
    other = TrainConfig(**{**config.to_dict(), "learning_rate": 1e-3})
    with pytest.raises(runs.RunError, match="learning_rate"):
        train(other, out)
    assert (out / runs.RESULTS_FILE).read_bytes() == before


def test_a_folder_with_foreign_files_is_refused(tmp_path, cifar_archive):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunError, match="holds no larq-lipschitz run"):
        train(TrainConfig(data=str(cifar_archive)), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_failed_start_leaves_the_folder_usable(tmp_path):
    from larq_lipschitz.data import DataError

    out = tmp_path / "run"
    with pytest.raises(DataError):
        train(TrainConfig(data=str(tmp_path / "missing.tar.gz")), out)
    assert not (out / "run.json").exists()  # the corrected command may use the folder


def test_lcr_without_a_usable_teacher_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="needs a trained full-precision teacher"):
        TrainConfig(regularizer="lcr")
    with pytest.raises(ValueError, match="no such file"):
        TrainConfig(regularizer="lcr", teacher=str(tmp_path / "teacher.keras"))


def test_absurd_strength_is_refused():
    with pytest.raises(ValueError, match="not a plausible strength"):
        TrainConfig(strength=1e308)


def test_results_record_how_to_rerun_the_run(trained_run, cifar_archive):
    """Command line, seed, determinism, data checksum and versions are in results.json."""
    import hashlib
    import shlex

    from larq_lipschitz import cli

    out, config, results = trained_run
    assert results["seed"] == 1 and results["deterministic"] is True
    assert (
        results["data_source"]["sha256"]
        == hashlib.sha256(cifar_archive.read_bytes()).hexdigest()
    )
    assert results["data_source"]["path"] == str(cifar_archive.resolve())
    words = shlex.split(results["command"]["shell"])
    args = cli.build_parser().parse_args(words[1:])
    assert cli._train_config(args).to_dict() == config.to_dict()
    assert args.output == str(out.resolve())
    assert results["versions"]["larq-lipschitz"] == larq_lipschitz.__version__


def test_history_file_matches_the_results_and_no_temporary_file_is_left(trained_run):
    import csv

    out, _, results = trained_run
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [float(r["loss"]) for r in rows] == results["history"]["loss"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]
    with runs.run_lock(out):  # released when training ended
        pass


def test_a_folder_locked_by_another_trainer_is_refused_before_anything_is_written(
    tmp_path, cifar_archive
):
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(
        data=str(cifar_archive), train_examples=64, batch_size=64, noise_sigmas=()
    )
    with runs.run_lock(out):
        with pytest.raises(runs.RunError, match="is training into this folder"):
            train(config, out)
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_the_range_of_tensorflow_is_refused_by_name(seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32 - 1\]"):
        TrainConfig(seed=seed)


def test_teacher_path_is_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "teacher.keras").write_bytes(b"placeholder")
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(regularizer="lcr", teacher="teacher.keras")
    assert config.teacher == str(tmp_path.resolve() / "teacher.keras")
    assert config.to_dict()["teacher"] == config.teacher
