"""Side-by-side comparison of finished runs: a Markdown table, its JSON and one plot.

For each run folder the comparison reads `results.json` (configuration, clean and
Gaussian-noise accuracy, training and test times, the Lipschitz bounds logged after each
epoch) and, when they exist, `robustness.json` (written by `larq-lipschitz evaluate`),
`bounds.json` (`larq-lipschitz bounds`) and `certification.json`
(`larq-lipschitz certify`). No model is loaded and nothing is evaluated.

Where two files hold the same quantity, the one written for that purpose wins:

- clean accuracy, and Gaussian-noise accuracy level by level: `robustness.json`, else
  `results.json` (a sigma that only `results.json` holds keeps its value, measured on
  the whole test set during training);
- certified accuracy: `robustness.json`, else `certification.json`;
- network Lipschitz bounds (infinity and 2 norm): the last entry of `results.json`'s
  `lipschitz_bounds`, else `bounds.json`.

The `examples` column says how many test images the robustness numbers are based on.
A value that no file holds is shown as "–" in the table and is null in the JSON.

```python
from larq_lipschitz.compare import write_comparison

paths = write_comparison(["runs/none", "runs/l1inf"], output_dir="reports")
print(paths["markdown"].read_text())
```
"""

from __future__ import annotations

import io
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from larq_lipschitz import runs
from larq_lipschitz.robustness import REPORT_FILE, _write_bytes, read_robustness

log = logging.getLogger(__name__)

__all__ = [
    "MISSING",
    "compare_runs",
    "comparison_markdown",
    "run_summary",
    "write_comparison",
]

#: How a missing value is written in the Markdown table.
MISSING = "–"
MARKDOWN_FILE = "comparison.md"
JSON_FILE = "comparison.json"
PLOT_FILE = "comparison.png"


def _key(value: float) -> float:
    """A dictionary key for a noise level or radius that survives float round trips."""
    return round(float(value), 9)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _optional_json(path: pathlib.Path) -> dict | None:
    return runs.read_json(path) if path.is_file() else None


def run_summary(run_dir: str | os.PathLike, name: str | None = None) -> dict:
    """The numbers of one run folder that the comparison shows.

    # Arguments
        run_dir: a folder written by `larq-lipschitz train`.
        name: the row's name; default the folder's name.

    # Returns
        A dict of plain values: `name, path, model, regularizer, strength, examples,
        clean_accuracy, gaussian {sigma: accuracy}, mean_corruption_accuracy, mce,
        pgd {epsilon: accuracy}, fgsm {epsilon: accuracy}, certified {epsilon: accuracy},
        lipschitz_inf, lipschitz_2, epoch_seconds, test_seconds, sources`; a missing
        value is None (or an empty dict). Epsilons are in [0, 1] pixel scale.

    # Raises
        runs.RunError: when the folder or its `results.json` is missing or unreadable,
            or one of the optional files exists but cannot be read.

    # Example
    ```python
    row = run_summary("runs/l1inf")
    print(row["clean_accuracy"], row["lipschitz_inf"])
    ```
    """
    folder = pathlib.Path(run_dir)
    results = runs.load_results(folder)
    config = results.get("config") or {}
    robustness = read_robustness(folder) if (folder / REPORT_FILE).is_file() else None
    sources: dict[str, str] = {}

    row: dict[str, Any] = {
        "name": name or folder.resolve().name,
        "path": str(folder),
        "model": config.get("model"),
        "regularizer": config.get("regularizer"),
        "strength": _number(config.get("strength")),
        "examples": None,
        "clean_accuracy": None,
        "gaussian": {},
        "mean_corruption_accuracy": None,
        "mce": None,
        "pgd": {},
        "fgsm": {},
        "certified": {},
        "lipschitz_inf": None,
        "lipschitz_2": None,
        "epoch_seconds": _number(results.get("mean_epoch_seconds")),
        "test_seconds": _number(results.get("test_seconds")),
    }

    # Accuracy from training (whole test set), then what `evaluate` measured.
    row["clean_accuracy"] = _number(results.get("test_accuracy"))
    if row["clean_accuracy"] is not None:
        sources["clean_accuracy"] = runs.RESULTS_FILE
        tested = ((results.get("data") or {}).get("num_examples") or {}).get("test")
        row["examples"] = tested if isinstance(tested, int) else None
    for key, acc in (results.get("noise_accuracy") or {}).items():
        if key.startswith("gaussian_") and _number(acc) is not None:
            try:
                row["gaussian"][_key(key[len("gaussian_") :])] = float(acc)
            except ValueError:
                continue
    if robustness is not None:
        row["examples"] = robustness.get("num_examples")
        row["clean_accuracy"] = _number(robustness.get("clean_accuracy"))
        sources["clean_accuracy"] = REPORT_FILE
        for r in (robustness.get("noise") or {}).get("results") or []:
            if r.get("family") == "gaussian":
                row["gaussian"][_key(r["level"])] = float(r["accuracy"])
        corruptions = robustness.get("corruptions") or {}
        row["mean_corruption_accuracy"] = _number(
            corruptions.get("mean_corruption_accuracy")
        )
        row["mce"] = _number(robustness.get("mce"))
        for r in (robustness.get("attacks") or {}).get("results") or []:
            if r.get("method") in ("pgd", "fgsm"):
                row[r["method"]][_key(r["epsilon"])] = float(r["accuracy"])
        for r in (robustness.get("certified") or {}).get("results") or []:
            row["certified"][_key(r["epsilon"])] = float(r["certified_accuracy"])
        if row["certified"]:
            sources["certified"] = REPORT_FILE
    row["gaussian"] = dict(sorted(row["gaussian"].items()))

    if not row["certified"]:
        certification = _optional_json(folder / "certification.json")
        for r in (certification or {}).get("results") or []:
            if (
                _number(r.get("epsilon")) is not None
                and _number(r.get("certified_accuracy")) is not None
            ):
                row["certified"][_key(r["epsilon"])] = float(r["certified_accuracy"])
        if row["certified"]:
            sources["certified"] = "certification.json"

    logged = results.get("lipschitz_bounds") or []
    last = logged[-1] if isinstance(logged, list) and logged else {}
    if isinstance(last, Mapping) and (
        _number(last.get("lipschitz_inf")) is not None
        or _number(last.get("lipschitz_2")) is not None
    ):
        row["lipschitz_inf"] = _number(last.get("lipschitz_inf"))
        row["lipschitz_2"] = _number(last.get("lipschitz_2"))
        sources["lipschitz"] = f"{runs.RESULTS_FILE} (lipschitz_bounds, last epoch)"
    else:
        bounds = _optional_json(folder / "bounds.json")
        if bounds is not None:
            row["lipschitz_inf"] = _number(
                (bounds.get("inf") or {}).get("network_bound")
            )
            row["lipschitz_2"] = _number((bounds.get("2") or {}).get("network_bound"))
            sources["lipschitz"] = "bounds.json"
    row["sources"] = sources
    return row


def compare_runs(run_dirs: Iterable[str | os.PathLike]) -> list[dict]:
    """One `run_summary` per run folder, in the given order.

    Rows are named after their folders; when two folders share a name, the paths as
    given are used instead.

    # Raises
        ValueError: when no run folder is given.
        runs.RunError: for a folder that is not a readable finished run.
    """
    dirs = [pathlib.Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("compare: give at least one run folder.")
    names = [d.resolve().name for d in dirs]
    clash = {n for n in names if names.count(n) > 1}
    return [
        run_summary(d, str(d) if n in clash else n)
        for d, n in zip(dirs, names, strict=True)
    ]


def _union(rows: Sequence[dict], field: str) -> list[float]:
    return sorted({k for r in rows for k in r[field]})


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}%"


def _general(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _eps_label(eps: float) -> str:
    scaled = eps * 255
    return f"{scaled:g}/255" if abs(scaled - round(scaled, 3)) < 1e-6 else f"{eps:g}"


def _columns(rows: Sequence[dict]) -> list[tuple[str, Any]]:
    """(header, function row -> cell text) for every column of the table."""
    columns: list[tuple[str, Any]] = [
        ("run", lambda r: r["name"]),
        ("model", lambda r: r["model"] or MISSING),
        ("regularizer", lambda r: r["regularizer"] or MISSING),
        ("strength", lambda r: _general(r["strength"], "g")),
        (
            "examples",
            lambda r: MISSING if r["examples"] is None else str(r["examples"]),
        ),
        ("clean", lambda r: _percent(r["clean_accuracy"])),
    ]
    for sigma in _union(rows, "gaussian"):
        columns.append(
            (f"gaussian σ={sigma:g}", lambda r, s=sigma: _percent(r["gaussian"].get(s)))
        )
    columns.append(
        ("mean corruption", lambda r: _percent(r["mean_corruption_accuracy"]))
    )
    if any(r["mce"] is not None for r in rows):
        columns.append(("mCE", lambda r: _general(r["mce"], ".3f")))
    for eps in _union(rows, "pgd"):
        columns.append(
            (f"PGD ε={_eps_label(eps)}", lambda r, e=eps: _percent(r["pgd"].get(e)))
        )
    for eps in _union(rows, "certified"):
        columns.append(
            (
                f"certified ε={_eps_label(eps)}",
                lambda r, e=eps: _percent(r["certified"].get(e)),
            )
        )
    columns += [
        ("L∞ bound", lambda r: _general(r["lipschitz_inf"], ".4g")),
        ("L2 bound", lambda r: _general(r["lipschitz_2"], ".4g")),
        ("s / epoch", lambda r: _general(r["epoch_seconds"], ".1f")),
        ("test s", lambda r: _general(r["test_seconds"], ".1f")),
    ]
    if not _union(rows, "pgd"):
        columns.insert(-4, ("PGD", lambda r: MISSING))
    if not _union(rows, "certified"):
        columns.insert(-4, ("certified", lambda r: MISSING))
    return columns


def comparison_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of `compare_runs` rows, one row per run.

    Accuracies are percentages with two decimals, bounds four significant digits,
    times seconds; a missing value is "–". One column per Gaussian sigma, PGD epsilon
    and certified epsilon found in any run. A `|` inside a run name is escaped.

    # Example
    ```python
    print(comparison_markdown(compare_runs(["runs/a", "runs/b"])))
    ```
    """
    if not rows:
        raise ValueError("comparison_markdown: no rows.")
    columns = _columns(rows)

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(cell(fn(r)) for _, fn in columns) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    noise_ax, corruption_ax, attack_ax = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))

    plotted = False
    for i, r in enumerate(rows):
        xs = ([0.0] if r["clean_accuracy"] is not None else []) + list(r["gaussian"])
        ys = ([r["clean_accuracy"]] if r["clean_accuracy"] is not None else []) + list(
            r["gaussian"].values()
        )
        if len(xs) > 0:
            noise_ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=r["name"])
            plotted = True
    noise_ax.set_title("accuracy under Gaussian noise", fontsize="medium")
    noise_ax.set_xlabel("sigma (pixel scale; 0 = clean)")
    noise_ax.set_ylabel("accuracy")

    positions = list(range(len(rows)))
    heights = [r["mean_corruption_accuracy"] or 0.0 for r in rows]
    corruption_ax.bar(
        positions, heights, color=[f"C{i % 10}" for i in positions], alpha=0.85
    )
    for x, r in zip(positions, rows, strict=True):
        value = r["mean_corruption_accuracy"]
        corruption_ax.text(
            x,
            (value or 0.0) + 0.01,
            MISSING if value is None else f"{value:.3f}",
            ha="center",
            fontsize="small",
        )
        if r["clean_accuracy"] is not None:
            corruption_ax.plot(
                [x - 0.4, x + 0.4], [r["clean_accuracy"]] * 2, "k--", linewidth=1
            )
    corruption_ax.set_xticks(positions, [r["name"] for r in rows], rotation=20)
    corruption_ax.set_title(
        "mean CIFAR-10-C accuracy (dashed: clean)", fontsize="medium"
    )
    corruption_ax.set_ylabel("accuracy")

    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        if r["pgd"]:
            clean = [] if r["clean_accuracy"] is None else [r["clean_accuracy"]]
            xs = [0.0] * len(clean) + [e * 255 for e in r["pgd"]]
            ys = clean + list(r["pgd"].values())
            attack_ax.plot(xs, ys, "o-", color=color, label=f"{r['name']} PGD")
        if r["certified"]:
            xs = [e * 255 for e in r["certified"]]
            attack_ax.plot(
                xs,
                list(r["certified"].values()),
                "s--",
                color=color,
                label=f"{r['name']} certified",
            )
    attack_ax.set_title(
        "PGD (solid) and certified (dashed) accuracy", fontsize="medium"
    )
    attack_ax.set_xlabel("epsilon (x 1/255, L-inf; 0 = clean)")
    attack_ax.set_ylabel("accuracy")
    for ax, has_data in (
        (noise_ax, plotted),
        (corruption_ax, any(r["mean_corruption_accuracy"] is not None for r in rows)),
        (attack_ax, any(r["pgd"] or r["certified"] for r in rows)),
    ):
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        if not has_data:
            ax.text(
                0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray"
            )
        elif ax is not corruption_ax:
            ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _json_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows with their per-level dicts keyed by strings (JSON keys must be strings)."""
    out = []
    for r in rows:
        r = dict(r)
        for field in ("gaussian", "pgd", "fgsm", "certified"):
            r[field] = {f"{k:g}": v for k, v in r[field].items()}
        out.append(r)
    return out


def write_comparison(
    run_dirs: Iterable[str | os.PathLike], output_dir: str | os.PathLike = "."
) -> dict[str, pathlib.Path]:
    """Write `comparison.md`, `comparison.json` and `comparison.png` for some runs.

    Every run folder is read first; when one cannot be used, nothing is written.
    `comparison.json` holds the rows of `compare_runs` (levels and radii as string keys,
    in [0, 1] pixel scale) and the Markdown table. `comparison.png` shows accuracy
    against the Gaussian sigma per run (sigma 0 = clean), the mean corruption accuracy
    per run, and PGD and certified accuracy against epsilon.

    # Arguments
        run_dirs: run folders, in the order of the rows.
        output_dir: folder to write into (created if missing); default the current one.

    # Returns
        `{"markdown": path, "json": path, "png": path}`.

    # Raises
        ValueError: when no run folder is given.
        runs.RunError: for a folder without a readable `results.json`.

    # Example
    ```python
    write_comparison(["runs/none", "runs/l1inf", "runs/lcr"], "reports")
    ```
    """
    rows = compare_runs(run_dirs)
    table = comparison_markdown(rows)
    png = _plot(rows)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / MARKDOWN_FILE,
        "json": out / JSON_FILE,
        "png": out / PLOT_FILE,
    }
    note = (
        "Accuracies in percent; `examples` is the number of test images of the "
        "robustness evaluation (a Gaussian sigma that only training measured is on the "
        f"whole test set); ε in [0, 1] pixel scale; {MISSING}: not measured. PGD "
        "accuracy is an upper bound on the "
        "robust accuracy, certified accuracy a lower bound; the Lipschitz bounds treat "
        "sign activations by their straight-through relaxation.\n"
    )
    runs.atomic_write_text(
        paths["markdown"], "# Comparison of runs\n\n" + table + "\n" + note
    )
    runs.atomic_write_json(
        paths["json"], {"format": 1, "runs": _json_rows(rows), "markdown": table}
    )
    _write_bytes(paths["png"], png)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
