"""Soak: many short train -> evaluate -> export cycles in one process, watching for leaks.

Each cycle runs the command line in-process, exactly as a user would type it:

    larq-lipschitz train    --model M --train-examples 256 --epochs 1 --noise "" ...
    larq-lipschitz evaluate RUN --suite corruptions --examples 200 --corruptions C ...
    larq-lipschitz export   RUN --examples 200
    (larq-lipschitz evaluate RUN --deployed ...   with --evaluate-deployed)

`--suite all` evaluates noise and the attacks too. TensorFlow keeps memory of every
function it traces, also after the function and its model are gone (tensorflow issue
#62854, open); `attack_accuracy` traces a gradient function per call, six per attack
suite, and with ResNet-20 that is about 330 MiB per cycle that never comes back (about
40 MiB per FGSM call on 200 images, measured). The default suite leaves the attacks out
so that the soak measures the package; run it with `--suite all` to see that growth.

into a fresh run folder on the real CIFAR-10 archive. After every cycle (and once before
the first, the baseline) it collects garbage and records the resident set size and its
peak (`/proc/self/status` VmRSS / VmHWM; `resource.getrusage` where there is no /proc),
the open file descriptors (`/proc/self/fd`), the threads, and the entries that appeared
in the temporary folder since the baseline. The temporary folder is private to the soak
(`TMPDIR` points to a new folder before TensorFlow loads), so files other processes put
in /tmp are not counted, while everything this process creates through Python's
`tempfile` or TensorFlow's C++ code lands there.

Verdict, printed and written with `--json`:

- RSS growth per cycle over the second half of the cycles, from cycle ceil(N/2) on
  (least-squares slope; the first half lets caches, the parsed archive and
  TensorFlow's kernels settle), must stay below `--max-rss-growth` MiB per cycle;
- open file descriptors after the last cycle minus after the first: at most
  `--max-fd-growth`;
- live Python objects that hold models (TensorFlow variables, Keras models,
  `tf.function`s, counted through the garbage collector): none may accumulate after the
  first cycle. RSS that grows while these stay flat is memory TensorFlow keeps in its
  C++ runtime, not objects the package holds on to;
- temporary entries: none may accumulate after the first cycle (growth 0), and none may
  be left in a run folder (`*.tmp` of an atomic write). TensorFlow's AutoGraph writes
  the converted source of every new `tf.function` and dataset function to
  `__autograph_generated_file*.py` in the temporary folder and deletes them only at
  exit; these are counted apart (files and KiB per cycle), reported, and not part of
  the check, since they are TensorFlow's and do not outlive the process.

The exit status is 0 when every check passes, 1 otherwise. Not part of CI: a full soak
takes 10 to 20 minutes on two CPU cores.

    python benchmarks/soak.py                      # 20 cycles, ResNet-20 1/1
    python benchmarks/soak.py --cycles 4 --json soak.json
    python benchmarks/soak.py --cycles 6 --suite all  # attacks too (memory grows)
    python benchmarks/soak.py --clear-session      # tf.keras.backend.clear_session()
                                                   # after each cycle, for comparison
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import resource
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
#: TensorFlow's AutoGraph writes the source of every function it converts to a file
#: named so in the temporary folder and deletes them all at exit.
AUTOGRAPH_PREFIX = "__autograph_generated_file"
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-binary.tar.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak test: repeated train -> evaluate -> export in one process."
    )
    p.add_argument(
        "archive",
        nargs="?",
        default=str(DEFAULT_ARCHIVE),
        help=f"CIFAR-10 binary archive (default {DEFAULT_ARCHIVE})",
    )
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--train-examples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--examples", type=int, default=200, help="evaluate/export images")
    p.add_argument(
        "--suite",
        default="corruptions",
        choices=("noise", "corruptions", "attacks", "all"),
        help="suite of evaluate (default corruptions; 'all' adds noise and the attacks, "
        "whose traced gradient functions TensorFlow does not free: several hundred "
        "MiB per cycle with ResNet-20, so mind the memory of the machine)",
    )
    p.add_argument("--corruptions", default="gaussian_noise,contrast,fog")
    p.add_argument("--severities", default="1,3,5")
    p.add_argument(
        "--evaluate-deployed",
        action="store_true",
        help="also run `evaluate --deployed` (the LCE interpreter) every cycle",
    )
    p.add_argument(
        "--clear-session",
        action="store_true",
        help="call tf.keras.backend.clear_session() after each cycle",
    )
    p.add_argument("--keep-runs", action="store_true", help="keep every run folder")
    p.add_argument(
        "--workdir",
        default=None,
        help="where the run folders go (default: a new folder in the system's "
        "temporary folder, removed at the end unless --keep-runs)",
    )
    p.add_argument("--max-rss-growth", type=float, default=4.0, help="MiB per cycle")
    p.add_argument("--max-fd-growth", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.cycles < 3:
        p.error("--cycles must be at least 3")
    return args


# --------------------------------------------------------------------------------------
# Process figures
# --------------------------------------------------------------------------------------


def _rss_mib() -> float:
    gc.collect()
    status = _status()
    if "VmRSS" in status:
        return status["VmRSS"] / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status() -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads from /proc/self/status; {} without /proc."""
    try:
        text = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _fds() -> list[str]:
    """What each open file descriptor points to (without the listing's own)."""
    folder = "/proc/self/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    targets = []
    for name in names:
        try:
            targets.append(os.readlink(os.path.join(folder, name)))
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
    return sorted(targets)


def live_objects() -> dict[str, int]:
    """Live TensorFlow variables, Keras models and tf.functions the collector knows."""
    import tensorflow as tf

    function_type = getattr(
        tf.types.experimental,
        "PolymorphicFunction",
        tf.types.experimental.GenericFunction,
    )
    counts = {"variables": 0, "keras_models": 0, "tf_functions": 0}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, tf.Variable):
                counts["variables"] += 1
            elif isinstance(obj, tf.keras.Model):
                counts["keras_models"] += 1
            elif isinstance(obj, function_type):
                counts["tf_functions"] += 1
        except ReferenceError:  # a weak proxy whose object is gone
            continue
    return counts


def measure(tmp_root: pathlib.Path, baseline_tmp: set[str]) -> dict:
    gc.collect()
    status = _status()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kib = status.get("VmHWM", usage.ru_maxrss)  # Linux ru_maxrss is in KiB
    fds = _fds()
    new_tmp = sorted(set(os.listdir(tmp_root)) - baseline_tmp)
    autograph = [n for n in new_tmp if n.startswith(AUTOGRAPH_PREFIX)]
    return {
        "rss_mib": status.get("VmRSS", usage.ru_maxrss) / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "fds": len(fds),
        "fd_targets": fds,
        "threads": status.get("Threads"),
        "live": live_objects(),
        "tmp_entries": [n for n in new_tmp if not n.startswith(AUTOGRAPH_PREFIX)],
        "autograph_files": len(autograph),
        "autograph_kib": sum(_size(tmp_root / n) for n in autograph) / 1024,
    }


def _size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def slope(values: list[float]) -> float:
    """Least-squares slope of values against their index."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


# --------------------------------------------------------------------------------------
# One cycle
# --------------------------------------------------------------------------------------


def run_cycle(cli, args, run_dir: pathlib.Path) -> dict:
    growth = {}

    def command(argv: list[str]) -> float:
        before = _rss_mib()
        start = time.perf_counter()
        code = cli.main(["-q", *argv])
        if code != 0:
            raise SystemExit(f"soak: `larq-lipschitz {' '.join(argv)}` exited {code}")
        seconds = time.perf_counter() - start
        name = argv[0] if "--deployed" not in argv else "evaluate_deployed"
        growth[name] = _rss_mib() - before
        return seconds

    times = {}
    times["train"] = command(
        [
            "train",
            "--model",
            args.model,
            "--data",
            args.archive,
            "--train-examples",
            str(args.train_examples),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--noise",
            "",
            "--output",
            str(run_dir),
        ]
    )
    suite = [
        "--examples",
        str(args.examples),
        "--corruptions",
        args.corruptions,
        "--severities",
        args.severities,
    ]
    times["evaluate"] = command(
        ["evaluate", str(run_dir), "--suite", args.suite, *suite]
    )
    times["export"] = command(
        ["export", str(run_dir), "--examples", str(args.examples)]
    )
    if args.evaluate_deployed:
        if args.suite == "attacks":
            raise SystemExit("soak: --evaluate-deployed needs a suite without attacks")
        times["evaluate_deployed"] = command(
            ["evaluate", str(run_dir), "--deployed", "--suite", args.suite, *suite]
        )
    results = json.loads((run_dir / "results.json").read_text())
    exported = json.loads((run_dir / "export.json").read_text())
    return {
        "seconds": times,
        "rss_growth_mib": growth,
        "clean_accuracy": results["test_accuracy"],
        "agreement": exported["verification"]["agreement"],
        "leftover_tmp_files": sorted(
            str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp*")
        ),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not pathlib.Path(args.archive).is_file():
        print(f"soak: no CIFAR-10 archive at {args.archive}", file=sys.stderr)
        return 2
    owned_workdir = args.workdir is None
    workdir = pathlib.Path(
        args.workdir or tempfile.mkdtemp(prefix="larq-lipschitz-soak-runs-")
    )
    workdir.mkdir(parents=True, exist_ok=True)
    # A private temporary folder, before TensorFlow (and its C++ code) reads TMPDIR.
    tmp_root = pathlib.Path(tempfile.mkdtemp(prefix="larq-lipschitz-soak-tmp-"))
    os.environ["TMPDIR"] = str(tmp_root)
    tempfile.tempdir = None  # re-read TMPDIR
    assert pathlib.Path(tempfile.gettempdir()) == tmp_root
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return soak(args, workdir, tmp_root)
    finally:  # also when a command fails or the soak is interrupted
        if owned_workdir and not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(tmp_root, ignore_errors=True)


def soak(
    args: argparse.Namespace, workdir: pathlib.Path, tmp_root: pathlib.Path
) -> int:
    import larq_lipschitz  # noqa: F401  (selects Keras 2 before TensorFlow loads)

    # isort: split
    from larq_lipschitz import cli

    import tensorflow as tf

    baseline_tmp = set(os.listdir(tmp_root))
    baseline = measure(tmp_root, baseline_tmp)
    print(
        f"soak: {args.cycles} cycles of {args.model}, {args.train_examples} training "
        f"images x {args.epochs} epoch(s), evaluate/export on {args.examples} images; "
        f"baseline RSS {baseline['rss_mib']:.0f} MiB, {baseline['fds']} fds; "
        f"temporary folder {tmp_root}"
    )
    header = (
        f"{'cycle':>5} {'train s':>8} {'eval s':>7} {'export s':>8} {'RSS MiB':>8} "
        f"{'dRSS':>7} {'d train':>7} {'d eval':>7} {'d exp':>7} {'peak':>7} {'fds':>5} "
        f"{'threads':>7} {'tmp':>4} {'autogr':>6} "
        f"{'clean':>6} {'agree':>6}"
    )
    print(header)
    cycles = []
    previous = baseline["rss_mib"]
    start = time.perf_counter()
    for i in range(1, args.cycles + 1):
        run_dir = workdir / f"cycle{i:03d}"
        figures = run_cycle(cli, args, run_dir)
        if args.clear_session:
            tf.keras.backend.clear_session()
        m = measure(tmp_root, baseline_tmp)
        row = {"cycle": i, **figures, **m}
        cycles.append(row)
        t, g = figures["seconds"], figures["rss_growth_mib"]
        print(
            f"{i:5d} {t['train']:8.1f} {t['evaluate']:7.1f} {t['export']:8.1f} "
            f"{m['rss_mib']:8.1f} {m['rss_mib'] - previous:+7.1f} "
            f"{g['train']:+7.1f} {g['evaluate']:+7.1f} {g['export']:+7.1f} "
            f"{m['peak_rss_mib']:7.0f} {m['fds']:5d} {m['threads'] or 0:7d} "
            f"{len(m['tmp_entries']):4d} {m['autograph_files']:6d} "
            f"{figures['clean_accuracy']:6.3f} "
            f"{figures['agreement']:6.3f}",
            flush=True,
        )
        previous = m["rss_mib"]
        if not args.keep_runs and i > 1:
            shutil.rmtree(workdir / f"cycle{i - 1:03d}", ignore_errors=True)

    half = cycles[(len(cycles) - 1) // 2 :]  # at least two cycles
    growth = slope([c["rss_mib"] for c in half])
    fd_growth = cycles[-1]["fds"] - cycles[0]["fds"]
    tmp_growth = len(cycles[-1]["tmp_entries"]) - len(cycles[0]["tmp_entries"])
    leftovers = sorted({f for c in cycles for f in c["leftover_tmp_files"]})
    new_fds = sorted(set(cycles[-1]["fd_targets"]) - set(cycles[0]["fd_targets"]))
    live_growth = {
        key: cycles[-1]["live"][key] - cycles[0]["live"][key]
        for key in cycles[0]["live"]
    }
    checks = {
        "rss_growth": growth <= args.max_rss_growth,
        "live_objects": all(v <= 0 for v in live_growth.values()),
        "fd_growth": fd_growth <= args.max_fd_growth,
        "tmp_growth": tmp_growth <= 0,
        "run_folder_tmp_files": not leftovers,
    }
    verdict = {
        "rss_growth_mib_per_cycle_second_half": growth,
        "rss_total_growth_mib": cycles[-1]["rss_mib"] - cycles[0]["rss_mib"],
        "rss_growth_mib_per_command_second_half": {
            name: sum(c["rss_growth_mib"][name] for c in half) / len(half)
            for name in half[0]["rss_growth_mib"]
        },
        "fd_growth_after_first_cycle": fd_growth,
        "live_object_growth_after_first_cycle": live_growth,
        "new_fd_targets": new_fds[:20],
        "tmp_entries_after_first_cycle": len(cycles[0]["tmp_entries"]),
        "tmp_growth_after_first_cycle": tmp_growth,
        "tmp_entries_at_end": cycles[-1]["tmp_entries"][:20],
        "run_folder_tmp_files": leftovers,
        "autograph_files_per_cycle_second_half": slope(
            [c["autograph_files"] for c in half]
        ),
        "autograph_kib_per_cycle_second_half": slope(
            [c["autograph_kib"] for c in half]
        ),
        "thread_growth_after_first_cycle": (cycles[-1]["threads"] or 0)
        - (cycles[0]["threads"] or 0),
        "checks": checks,
        "passed": all(checks.values()),
    }
    wall = time.perf_counter() - start
    print(
        f"verdict: RSS {growth:+.2f} MiB/cycle over cycles {half[0]['cycle']}-"
        f"{half[-1]['cycle']} (limit {args.max_rss_growth:g}; "
        f"{verdict['rss_total_growth_mib']:+.1f} MiB from cycle 1 to "
        f"{args.cycles}); fds {fd_growth:+d} after cycle 1 (limit "
        f"{args.max_fd_growth}); temporary entries {tmp_growth:+d} after cycle 1 "
        f"({verdict['tmp_entries_after_first_cycle']} after cycle 1); threads "
        f"{verdict['thread_growth_after_first_cycle']:+d}; live variables/models/"
        f"tf.functions {'/'.join(f'{v:+d}' for v in live_growth.values())} after "
        f"cycle 1; run-folder .tmp files "
        f"{len(leftovers)}; TensorFlow AutoGraph files "
        f"{verdict['autograph_files_per_cycle_second_half']:+.1f}/cycle "
        f"({verdict['autograph_kib_per_cycle_second_half']:+.1f} KiB/cycle, deleted "
        f"at exit) -> {'PASS' if verdict['passed'] else 'FAIL'} "
        f"({', '.join(k for k, ok in checks.items() if not ok) or 'all checks met'}); "
        f"{wall:.0f} s"
    )
    if new_fds:
        print("new file descriptors: " + ", ".join(new_fds[:10]))
    if args.json:
        report = {
            "settings": {k: v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {
                "tensorflow": tf.__version__,
                "python": sys.version.split()[0],
            },
            "temporary_folder": str(tmp_root),
            "baseline": baseline,
            "cycles": cycles,
            "verdict": verdict,
            "wall_seconds": wall,
        }
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
