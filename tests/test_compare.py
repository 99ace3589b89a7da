"""`compare`: the side-by-side table, its JSON and plot, from hand-written run folders.

The run folders hold files of the formats `train`, `evaluate`, `bounds` and `certify`
write, with known numbers, so every cell of the table can be checked against them.
"""

import json
import pathlib

import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from larq_lipschitz import cli, compare, robustness, runs

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(model: str, regularizer: str, strength: float, **extra) -> dict:
    return {
        "format": runs.RESULTS_FORMAT,
        "status": "finished",
        "config": {
            "model": model,
            "dataset": "cifar10",
            "regularizer": regularizer,
            "strength": strength,
        },
        "data": {"num_examples": {"train": 50000, "validation": 0, "test": 10000}},
        **extra,
    }


def _run(folder: pathlib.Path, results: dict, **files: dict) -> pathlib.Path:
    folder.mkdir(parents=True)
    runs.atomic_write_json(folder / runs.RESULTS_FILE, results)
    for name, content in files.items():
        runs.atomic_write_json(folder / f"{name}.json", content)
    return folder


@pytest.fixture
def two_runs(tmp_path):
    """A: trained and evaluated (robustness.json); B: trained, bounds and certify run."""
    a = _run(
        tmp_path / "plain",
        _results(
            "resnet20",
            "none",
            0.0,
            test_accuracy=0.6125,
            noise_accuracy={
                "gaussian_0.02": 0.601,
                "gaussian_0.05": 0.55,
                "gaussian_0.1": 0.41,
            },
            mean_epoch_seconds=90.5,
            test_seconds=4.3,
            lipschitz_bounds=[
                {"epoch": 0, "lipschitz_inf": 30.0, "lipschitz_2": 9.0},
                {"epoch": 1, "lipschitz_inf": 12.5, "lipschitz_2": 3.25},
            ],
        ),
        robustness={
            "format": robustness.REPORT_FORMAT,
            "suite": "all",
            "num_examples": 500,
            "clean_accuracy": 0.614,
            "noise": {
                "results": [
                    {"family": "gaussian", "level": 0.05, "accuracy": 0.52},
                    {"family": "uniform", "level": 0.05, "accuracy": 0.58},
                ]
            },
            "corruptions": {
                "source": "synthesized",
                "mean_corruption_accuracy": 0.4512,
            },
            "mce": 0.9734,
            "attacks": {
                "results": [
                    {"method": "fgsm", "epsilon": 1 / 255, "accuracy": 0.35},
                    {"method": "pgd", "epsilon": 1 / 255, "accuracy": 0.302},
                    {"method": "pgd", "epsilon": 2 / 255, "accuracy": 0.1},
                ]
            },
            "certified": {
                "supported": True,
                "results": [{"epsilon": 1 / 255, "certified_accuracy": 0.104}],
            },
        },
        # bounds.json is ignored while results.json logged bounds
        bounds={"inf": {"network_bound": 99.0}, "2": {"network_bound": 99.0}},
    )
    b = _run(
        tmp_path / "l1inf",
        _results(
            "resnet20",
            "l1inf",
            1e-4,
            test_accuracy=0.58,
            noise_accuracy={"gaussian_0.05": 0.57},
            mean_epoch_seconds=80.25,
            test_seconds=None,
        ),
        bounds={"inf": {"network_bound": 7.0}, "2": {"network_bound": 2.125}},
        certification={
            "results": [
                {"epsilon": 0.0, "certified_accuracy": 0.58},
                {"epsilon": 1 / 255, "certified_accuracy": 0.2},
            ]
        },
    )
    return a, b


def _table(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def test_the_table_holds_both_rows_with_the_right_numbers(two_runs):
    a, b = two_runs
    rows = _table(compare.comparison_markdown(compare.compare_runs([a, b])))
    assert [r["run"] for r in rows] == ["plain", "l1inf"]
    plain, l1inf = rows
    assert plain["model"] == "resnet20" and plain["regularizer"] == "none"
    assert plain["strength"] == "0" and l1inf["strength"] == "0.0001"
    # robustness.json wins over results.json where both hold a value
    assert plain["clean"] == "61.40%" and plain["examples"] == "500"
    assert l1inf["clean"] == "58.00%" and l1inf["examples"] == "10000"
    assert plain["gaussian σ=0.05"] == "52.00%" and l1inf["gaussian σ=0.05"] == "57.00%"
    assert plain["gaussian σ=0.02"] == "60.10%" and l1inf["gaussian σ=0.02"] == "–"
    assert plain["gaussian σ=0.1"] == "41.00%"
    assert plain["mean corruption"] == "45.12%" and l1inf["mean corruption"] == "–"
    assert plain["mCE"] == "0.973" and l1inf["mCE"] == "–"
    assert plain["PGD ε=1/255"] == "30.20%" and plain["PGD ε=2/255"] == "10.00%"
    assert l1inf["PGD ε=1/255"] == "–"
    # certified: robustness.json for A, certification.json for B
    assert (
        plain["certified ε=1/255"] == "10.40%"
        and l1inf["certified ε=1/255"] == "20.00%"
    )
    assert plain["certified ε=0/255"] == "–" and l1inf["certified ε=0/255"] == "58.00%"
    # bounds: the last logged epoch for A, bounds.json for B
    assert plain["L∞ bound"] == "12.5" and plain["L2 bound"] == "3.25"
    assert l1inf["L∞ bound"] == "7" and l1inf["L2 bound"] == "2.125"
    assert plain["s / epoch"] == "90.5" and l1inf["s / epoch"] == "80.2"
    assert plain["test s"] == "4.3" and l1inf["test s"] == "–"


def test_missing_measurements_show_as_a_dash(tmp_path):
    bare = _run(tmp_path / "bare", _results("vgg-small", "lcr", 3.2, test_accuracy=0.5))
    rows = _table(compare.comparison_markdown(compare.compare_runs([bare])))
    (row,) = rows
    assert row["clean"] == "50.00%"
    for column in (
        "mean corruption",
        "PGD",
        "certified",
        "L∞ bound",
        "L2 bound",
        "s / epoch",
        "test s",
    ):
        assert row[column] == "–", column


def test_files_are_written_and_well_formed(two_runs, tmp_path):
    a, b = two_runs
    paths = compare.write_comparison([a, b], tmp_path / "out")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert len(_table(markdown)) == 2
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert [r["name"] for r in data["runs"]] == ["plain", "l1inf"]
    assert data["runs"][0]["gaussian"] == {"0.02": 0.601, "0.05": 0.52, "0.1": 0.41}
    assert data["runs"][1]["lipschitz_inf"] == 7.0 and data["runs"][1]["mce"] is None
    assert data["runs"][0]["sources"]["lipschitz"].startswith("results.json")
    assert data["runs"][1]["sources"]["certified"] == "certification.json"
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    first = _run(
        tmp_path / "x" / "run", _results("resnet20", "none", 0.0, test_accuracy=0.4)
    )
    second = _run(
        tmp_path / "y" / "run", _results("resnet20", "none", 0.0, test_accuracy=0.45)
    )
    rows = compare.compare_runs([first, second])
    assert [r["name"] for r in rows] == [str(first), str(second)]
    assert [r["clean_accuracy"] for r in rows] == [0.4, 0.45]


def test_compare_command_writes_into_the_current_folder_by_default(
    two_runs, tmp_path, monkeypatch, capsys
):
    a, b = two_runs
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == [
        "comparison.json",
        "comparison.md",
        "comparison.png",
    ]
    assert "| plain |" in printed and "| l1inf |" in printed
    assert _table(printed) == _table(
        (work / "comparison.md").read_text(encoding="utf-8")
    )


def test_compare_refuses_unusable_folders_and_writes_nothing(
    two_runs, tmp_path, capsys
):
    a, _ = two_runs
    out = tmp_path / "out"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / runs.RESULTS_FILE).write_text("{not json", encoding="utf-8")
    bad_report = _run(
        tmp_path / "bad_report", _results("resnet20", "none", 0.0, test_accuracy=0.4)
    )
    (bad_report / robustness.REPORT_FILE).write_text('{"format": 99}', encoding="utf-8")
    for folder, message in (
        (tmp_path / "absent", "no such run folder"),
        (broken, "cannot be read as JSON"),
        (bad_report, "not a robustness report"),
    ):
        assert cli.main(["compare", str(a), str(folder), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()
    with pytest.raises(ValueError, match="at least one run folder"):
        compare.compare_runs([])


def test_compare_refuses_to_replace_a_comparison_without_force(
    two_runs, tmp_path, capsys
):
    a, b = two_runs
    out = tmp_path / "out"
    out.mkdir()
    (out / "comparison.md").write_text("my notes")
    assert cli.main(["compare", str(a), str(b), "--output", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "comparison.md").read_text() == "my notes"
    assert cli.main(["compare", str(a), str(b), "--output", str(out), "--force"]) == 0
    assert "| plain |" in (out / "comparison.md").read_text()
