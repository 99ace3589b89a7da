"""Run folders: atomic result files, version records and checks before reuse.

A run folder holds everything one `larq-lipschitz train` produced:

```
RUN_DIR/
  results.json        configuration, metrics, timings, versions, the command line and
                      the data checksum (written last, atomically: the "finished" mark)
  model.keras         the final trained model (atomically)
  run.json            the configuration (written once training is about to start)
  checkpoints/        model, optimizer and epoch counter after each finished epoch
  history.csv         per-epoch metrics (rewritten whole, atomically, every epoch)
  logs/               TensorBoard event files (append-only logs)
  .lock               held by the process that trains into the folder
```

Every file but the TensorBoard logs is written to a temporary file in the same folder,
flushed to disk and then renamed over the target, so a crash never leaves a half-written
file behind (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MODEL_FILE = "model.keras"
LOCK_FILE = ".lock"
#: Temporary names of the atomic writers: `.NAME.RANDOM.tmp` and `.NAME.RANDOM.tmp.keras`.
_TMP_MARK = ".tmp"
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


@contextlib.contextmanager
def _replacing(path: pathlib.Path, suffix: str) -> Iterator[tuple[int, str]]:
    """A temporary file beside `path` that replaces it once the block succeeds.

    Yields `(fd, temporary path)`; the block writes the file. Afterwards the file gets the
    usual mode (mkstemp makes 0600), is flushed to disk and renamed over `path`, and the
    rename is made durable. On any error (or interruption) the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        yield fd, tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file."""
    with _replacing(pathlib.Path(path), ".tmp") as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_model(model: Any, path: str | os.PathLike) -> None:
    """Save a Keras model to `path` (`.keras`) so that readers see the old or the new file.

    The model is saved to a temporary `.keras` file in the same folder, flushed to disk
    and renamed over `path`.
    """
    with _replacing(pathlib.Path(path), f"{_TMP_MARK}.keras") as (fd, tmp):
        os.close(fd)
        model.save(tmp, overwrite=True)


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


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[str]:
    """Delete what an earlier process killed mid-write left behind; return the names.

    That is the temporary files of the atomic writers (hidden `.NAME.*.tmp*` files) in
    the folder, folders set aside by `discard`, and the `*_temp` folders TensorFlow
    writes a checkpoint into before it renames it, in `checkpoints/`. Call it only while
    holding `run_lock`, so that no other process is writing.
    """
    run_dir = pathlib.Path(run_dir)
    removed = []
    candidates = list(run_dir.glob(".*")) + list(
        (run_dir / "checkpoints").glob("*_temp")
    )
    for entry in candidates:
        name = entry.name
        stale = (
            (name.startswith(".") and _TMP_MARK in name and entry.is_file())
            or (name.startswith(".discarded-") and entry.is_dir())
            or (name.endswith("_temp") and entry.is_dir())
        )
        if not stale:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(str(entry.relative_to(run_dir)))
    if removed:
        log.info("removed leftovers of an interrupted write: %s", ", ".join(removed))
    return removed


def discard(folder: str | os.PathLike) -> None:
    """Remove `folder` so that an interruption never leaves part of it in place.

    It is first renamed to a hidden `.discarded-*` sibling (one atomic step: the folder
    is gone for every reader), then deleted; `remove_stale_temporaries` finishes the
    deletion if the process is killed in between.
    """
    folder = pathlib.Path(folder)
    if not folder.exists():
        return
    aside = folder.parent / f".discarded-{folder.name}-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `RUN_DIR/.lock` while the body writes into the folder.

    A second process that tries to train into the same folder meanwhile gets a
    `RunError` instead of interleaving its files with the first one's. The lock is an
    advisory `flock`: the operating system releases it when the process ends, however it
    ends (a `kill -9` included), so a stale lock never blocks a rerun. Where `flock` is
    not available (Windows, some network filesystems) the body runs unlocked, with a
    warning on filesystems that refuse it.

    # Raises
        RunError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = pathlib.Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise RunError(
                f"{run_dir}: another process{f' (pid {holder})' if holder else ''} is "
                "training into this folder; wait for it to end or choose another --output "
                "folder."
            ) from None
        except OSError as err:
            log.warning(
                "%s: cannot be locked (%s); continuing without a lock", path, err
            )
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def folder_sha256(folder: str | os.PathLike) -> str:
    """One SHA-256 over every regular file below `folder`, in sorted path order.

    Each file contributes its path relative to `folder` (UTF-8, then a zero byte), its
    size as 8 little-endian bytes, and its bytes; hidden files are skipped.
    """
    folder = pathlib.Path(folder)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    for file in files:
        digest.update(str(file.relative_to(folder).as_posix()).encode("utf-8") + b"\0")
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


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


def check_reusable(
    run_dir: pathlib.Path, config: dict, defaults: Mapping[str, Any] | None = None
) -> str:
    """Decide what to do with an existing run folder before training into it.

    A setting missing from the folder's `run.json` (written by a version that did not
    have it yet) counts as equal when the new configuration holds its default value
    (`defaults`, by default `larq_lipschitz.training.config_defaults()`).

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
    if defaults is None:
        from larq_lipschitz.training import config_defaults

        defaults = config_defaults()
    wanted = _plain(config)
    stored = previous.get("config")
    if isinstance(stored, dict):
        stored = {
            **{k: v for k, v in _plain(dict(defaults)).items() if k in wanted},
            **stored,
        }
    trained = (run_dir / "checkpoints").is_dir() or (run_dir / RESULTS_FILE).is_file()
    if stored != wanted and not trained:
        return (
            "new"  # an earlier attempt stopped before its first epoch: nothing to keep
        )
    if stored != wanted:
        stored = stored if isinstance(stored, dict) else {}
        changed = sorted(
            k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)
        )
        raise RunError(
            f"{run_dir}: holds a different run (settings that differ: {', '.join(changed)}); "
            "choose another --output folder or delete this one."
        )
    if (run_dir / RESULTS_FILE).is_file():
        return "finished"
    return "resume"
