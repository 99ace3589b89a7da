"""Run folders: atomic result files, version records and checks before reuse.

A run folder holds everything one `larq-lipschitz train` produced:

```
RUN_DIR/
  results.json        configuration, metrics, timings, versions (written last, atomically)
  model.keras         the final trained model
  run.json            the configuration (written once training is about to start)
  checkpoints/        model, optimizer and epoch counter after each finished epoch
  history.csv         per-epoch metrics
  logs/               TensorBoard event files
```

Every JSON file is written to a temporary file in the same folder and then renamed over
the target, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import platform
import sys
import tempfile
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MODEL_FILE = "model.keras"
#: Version of the layout of `results.json`; bumped when a field changes meaning.
RESULTS_FORMAT = 1


class RunError(RuntimeError):
    """A run folder cannot be used as asked (it holds another run, or is unreadable)."""


def _plain(value: Any) -> Any:
    """Turn numpy scalars, paths and non-finite floats into JSON-safe Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(_plain(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising `RunError` that names the file when it is unusable."""
    path = pathlib.Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: file not found.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: cannot be read as JSON ({err}).") from None


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a run's numbers."""
    out = {"python": platform.python_version()}
    for dist in (
        "larq-lipschitz",
        "tensorflow",
        "tf-keras",
        "larq",
        "larq-zoo",
        "tensorflow-datasets",
        "numpy",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """A short description of the machine a run used."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "argv": list(sys.argv),
    }


def load_results(run_dir: str | os.PathLike) -> dict:
    """Read `RUN_DIR/results.json` and check that this package can interpret it."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder.")
    if not (run_dir / RESULTS_FILE).is_file() and (run_dir / "run.json").is_file():
        raise RunError(
            f"{run_dir}: the run has not finished (no {RESULTS_FILE}); rerun its train "
            "command to resume it."
        )
    results = read_json(run_dir / RESULTS_FILE)
    fmt = results.get("format")
    if fmt != RESULTS_FORMAT:
        raise RunError(
            f"{run_dir / RESULTS_FILE}: results format {fmt!r} was written by an "
            f"incompatible larq-lipschitz version (this one reads format {RESULTS_FORMAT})."
        )
    return results


def check_reusable(run_dir: pathlib.Path, config: dict) -> str:
    """Decide what to do with an existing run folder before training into it.

    # Returns
        `"new"` for an empty or absent folder, `"resume"` for an unfinished run with the
        same configuration, `"finished"` for a finished run with the same configuration.

    # Raises
        RunError: the folder holds files of another run, or of something else entirely.
    """
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a folder.")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    if not entries:
        return "new"
    marker = run_dir / "run.json"
    if not marker.is_file():
        raise RunError(
            f"{run_dir}: folder is not empty and holds no larq-lipschitz run; "
            "choose another --output folder."
        )
    previous = read_json(marker)
    trained = (run_dir / "checkpoints").is_dir() or (run_dir / RESULTS_FILE).is_file()
    if previous.get("config") != _plain(config) and not trained:
        return (
            "new"  # an earlier attempt stopped before its first epoch: nothing to keep
        )
    if previous.get("config") != _plain(config):
        changed = sorted(
            k
            for k in set(previous.get("config", {})) | set(config)
            if previous.get("config", {}).get(k) != _plain(config).get(k)
        )
        raise RunError(
            f"{run_dir}: holds a different run (settings that differ: {', '.join(changed)}); "
            "choose another --output folder or delete this one."
        )
    if (run_dir / RESULTS_FILE).is_file():
        return "finished"
    return "resume"
