"""The `evaluate` and `compare` subcommands of the `larq-lipschitz` command line.

`add_commands(subparsers)` adds both to the parser that `larq_lipschitz.cli` builds:

    larq-lipschitz evaluate RUN_DIR [--suite noise|corruptions|attacks|all] [--examples N]
                            [--reference RUN_DIR] [--data PATH] [--seed S] ...
                            [--deployed [PATH.tflite]] [--threads N]
    larq-lipschitz compare RUN_DIR... [--output DIR]

Errors in what the user asked for (an unknown suite or corruption, a severity outside
1..5, a folder without `results.json` or `model.keras`, a corrupt model file, a
reference without corruption results, `--deployed` without a converted model) raise
`ValueError` or `runs.RunError` before anything is written; the main program prints
them as one line and exits with status 2. Usage errors that argparse finds (an unknown
`--suite`, `--examples 0`) are one line too (`OneLineParser`).

`load_run(run_dir)` is the checked loading of a run folder's results and model that
the commands share.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
import types
from typing import TYPE_CHECKING

from larq_lipschitz import runs
from larq_lipschitz.cli import _float_list

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = ["OneLineParser", "add_commands", "load_run", "one_line_errors"]

#: The default suite of `evaluate` (with `--deployed`, "all" means noise and corruptions).
_DEFAULT_SUITE = "all"


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line, exit status 2.

    argparse prints the whole usage block before the error; the `larq-lipschitz`
    commands promise one line naming the problem, so this prints only
    `PROG: error: MESSAGE (see `PROG --help`)`.

    ```python
    parser = OneLineParser(prog="demo")
    parser.add_argument("--n", type=int)
    # parser.parse_args(["--n", "x"]) prints one line and exits with status 2
    ```
    """

    def error(self, message: str):  # argparse calls this for every usage error
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give an existing parser (e.g. a subcommand's) `OneLineParser`'s error line."""
    parser.error = types.MethodType(OneLineParser.error, parser)
    return parser


def load_run(run_dir: str | pathlib.Path) -> tuple[dict, tf.keras.Model]:
    """The results and the trained model of a run folder, each checked.

    `results.json` must be of this package's format (`runs.load_results`); the model
    is loaded with `models.registry.load_saved`, which refuses a truncated or corrupt
    file, a Keras 3 file, a file Keras cannot load (e.g. a layer class of another
    version) and weights that are NaN or infinite, each with one line naming the file.

    # Returns
        `(results, model)`.

    # Raises
        runs.RunError: no run folder, no or incompatible results, no model file.
        ValueError: (`ModelFileError`) the model file cannot be used.
    """
    from larq_lipschitz.models.registry import load_saved

    results = runs.load_results(run_dir)
    path = pathlib.Path(run_dir) / runs.MODEL_FILE
    if not path.is_file():
        raise runs.RunError(f"{path}: the run folder holds no trained model.")
    return results, load_saved(path)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` and `compare` subcommands (each sets `func` to its handler)."""
    from larq_lipschitz.robustness import SUITES

    p = subparsers.add_parser(
        "evaluate",
        help="robustness suite of a trained run: noise, CIFAR-10-C corruptions, attacks",
        description=(
            "Evaluate a run's model on its test set clean and under additive noise, "
            "the CIFAR-10-C corruptions at severities 1-5, and FGSM/PGD attacks with "
            "certified accuracy; write robustness.json, robustness.csv, "
            "robustness_severity.png and robustness_corruptions.png into RUN_DIR."
        ),
    )
    one_line_errors(p)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--suite",
        default=None,
        choices=SUITES,
        help="default: all (with --deployed: noise and corruptions)",
    )
    p.add_argument(
        "--examples", type=_positive_int, default=None, help="first N test images only"
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="RUN_DIR",
        help="evaluated run whose robustness.json is the reference of the corruption "
        "error CE and mCE",
    )
    p.add_argument(
        "--data", default=None, help="dataset archive, if not the one the run used"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the noise, corruptions and PGD starts (default 0, the same for "
        "every run, so that runs are compared on the same perturbed images)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=200)
    p.add_argument(
        "--corruptions",
        type=_names,
        default=None,
        help="comma-separated corruption names (default: all synthesized ones)",
    )
    p.add_argument(
        "--severities", type=_ints, default=(1, 2, 3, 4, 5), help="default 1,2,3,4,5"
    )
    p.add_argument(
        "--gaussian",
        type=_float_list,
        default=None,
        help="Gaussian noise sigmas (pixel scale) instead of the defaults",
    )
    p.add_argument(
        "--cifar10-corrupted-dir",
        default=None,
        metavar="DIR",
        help="tensorflow-datasets data folder with cifar10_corrupted prepared: use the "
        "released CIFAR-10-C images instead of synthesizing them",
    )
    p.add_argument(
        "--eps",
        type=_float_list,
        default=None,
        help="L-inf radii of the attacks and certificates, [0, 1] pixel scale "
        "(default 1/255,2/255,4/255)",
    )
    p.add_argument("--pgd-steps", type=_positive_int, default=None, help="default 10")
    p.add_argument("--pgd-restarts", type=_positive_int, default=None, help="default 1")
    p.add_argument(
        "--no-certify",
        action="store_true",
        help="skip the certified accuracy of the attack suite",
    )
    p.add_argument(
        "--deployed",
        nargs="?",
        const="",
        default=None,
        metavar="PATH.tflite",
        help="evaluate the converted Larq Compute Engine model (default: "
        "RUN_DIR/model.tflite, written by `larq-lipschitz export RUN_DIR`) through LCE's "
        "interpreter instead of the Keras model, with noise and corruptions (attacks "
        "need the Keras model); writes robustness_deployed.json/.csv/.png. Put it "
        "after RUN_DIR",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="interpreter threads with --deployed (default 1)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser(
        "compare",
        help="side-by-side table and plot of several runs",
        description=(
            "Read results.json (and robustness.json, bounds.json, certification.json "
            "where present) of each RUN_DIR and write comparison.md, comparison.json and "
            "comparison.png into --output."
        ),
    )
    one_line_errors(p)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", default=".", help="folder to write into (default: .)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing comparison in --output",
    )
    p.set_defaults(func=_cmd_compare)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from larq_lipschitz.export import ExportError, LCENotInstalledError

    try:
        return _evaluate(args)
    except (ExportError, LCENotInstalledError) as err:
        print(f"larq-lipschitz evaluate: error: {err}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    from larq_lipschitz import robustness

    deployed = args.deployed is not None
    suite = args.suite or _DEFAULT_SUITE
    if deployed:
        attack_options = [
            option
            for option, given in (
                ("--eps", args.eps is not None),
                ("--pgd-steps", args.pgd_steps is not None),
                ("--pgd-restarts", args.pgd_restarts is not None),
                ("--no-certify", args.no_certify),
            )
            if given
        ]
        if attack_options:
            raise ValueError(
                f"{', '.join(attack_options)} configure the attacks, which run on the "
                "Keras model only; leave them out with --deployed."
            )
    elif args.threads != 1:
        raise ValueError(
            "--threads sets the interpreter of --deployed; add --deployed."
        )
    wants_corruptions = suite in ("corruptions", "all")
    if args.reference is not None and not wants_corruptions:
        raise ValueError(
            f"--reference needs the corruption suite (--suite corruptions or all), "
            f"got --suite {suite}."
        )
    noise_levels = None
    if args.gaussian is not None:
        noise_levels = {**robustness.DEFAULT_NOISE_LEVELS, "gaussian": args.gaussian}
    settings = dict(
        seed=args.seed,
        num_examples=args.examples,
        batch_size=args.batch_size,
        noise_levels=noise_levels,
        corruptions=args.corruptions,
        severities=args.severities,
        cifar10_corrupted_dir=args.cifar10_corrupted_dir,
        epsilons=args.eps if args.eps is not None else robustness.DEFAULT_EPSILONS,
        attack_steps=args.pgd_steps if args.pgd_steps is not None else 10,
        attack_restarts=args.pgd_restarts if args.pgd_restarts is not None else 1,
    )
    # fail before loading anything
    robustness._check_arguments(suite, deployed=deployed, **settings)
    if args.reference is not None:
        reference = robustness.read_robustness(args.reference)
        if not (reference.get("corruptions") or {}).get("results"):
            raise runs.RunError(
                f"{args.reference}: its robustness report holds no corruption results; "
                "evaluate it with --suite corruptions or all first."
            )
    if deployed:
        return _evaluate_deployed(args, suite, settings)

    from larq_lipschitz.cli import _test_split

    results, model = load_run(args.run_dir)
    test = _test_split(results, batch_size=args.batch_size, data=args.data)
    start = time.perf_counter()
    report = robustness.run_suite(
        model, test, suite, certified=not args.no_certify, **settings
    )
    paths = robustness.write_robustness(report, args.run_dir, reference=args.reference)
    wall = time.perf_counter() - start
    written = robustness.read_robustness(args.run_dir)
    print(f"run: {args.run_dir} ({results['config'].get('model')}, suite {suite})")
    _print_report(report, written, args.reference)
    _print_timing(report, wall)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _deployed_path(args: argparse.Namespace) -> pathlib.Path:
    """The flatbuffer `--deployed` names, or the run folder's, checked to exist."""
    from larq_lipschitz.cli_export import TFLITE_FILE

    run_dir = pathlib.Path(args.run_dir)
    if args.deployed:
        path = pathlib.Path(args.deployed)
        if not path.is_file():
            raise runs.RunError(f"{path}: no such deployed model file (.tflite).")
        return path
    path = run_dir / TFLITE_FILE
    if not path.is_file():
        raise runs.RunError(
            f"{run_dir}: holds no deployed model ({TFLITE_FILE}); convert it first with "
            f"`larq-lipschitz export {run_dir}`."
        )
    keras_file = run_dir / runs.MODEL_FILE
    if keras_file.is_file() and keras_file.stat().st_mtime > path.stat().st_mtime:
        log.warning(
            "%s is older than %s: it may be the conversion of an earlier model; run "
            "`larq-lipschitz export %s` again to deploy the current one",
            path,
            keras_file,
            run_dir,
        )
    return path


def _evaluate_deployed(args: argparse.Namespace, suite: str, settings: dict) -> int:
    from larq_lipschitz import export, robustness
    from larq_lipschitz.cli import _test_split

    export._lce()  # fail before loading anything when LCE is missing
    run_dir = pathlib.Path(args.run_dir)
    results = runs.load_results(run_dir)
    path = _deployed_path(args)
    deployed = export.DeployedModel(path, num_threads=args.threads)
    test = _test_split(results, batch_size=args.batch_size, data=args.data)
    start = time.perf_counter()
    report = robustness.run_suite(deployed, test, suite, certified=False, **settings)
    keras_report = None
    if (run_dir / robustness.REPORT_FILE).is_file():
        try:
            keras_report = robustness.read_robustness(run_dir)
        except runs.RunError as err:
            log.warning("the Keras model's report is not compared: %s", err)
    differences = (
        None
        if keras_report is None
        else robustness.accuracy_differences(report, keras_report)
    )
    report["keras_comparison"] = (
        None
        if differences is None
        else {"source": str(run_dir / robustness.REPORT_FILE), **differences}
    )
    paths = robustness.write_robustness(report, run_dir, reference=args.reference)
    wall = time.perf_counter() - start
    written = robustness.read_robustness(run_dir, deployed=True)

    print(
        f"run: {run_dir} ({results['config'].get('model')}), deployed model {path} "
        f"({deployed.size_bytes:,} bytes, LCE interpreter), suite {suite}"
    )
    _print_report(report, written, args.reference)
    if differences is not None:
        worst = differences["worst"]
        print(
            f"deployed - Keras accuracy over {differences['settings']} settings "
            f"(same images, from {robustness.REPORT_FILE}): clean "
            f"{differences['clean']:+.4f}, largest {worst['difference']:+.4f} "
            f"({worst['name']} {worst['severity']:g}), mean |difference| "
            f"{differences['mean_abs']:.4f}"
        )
    elif keras_report is not None:
        print(
            f"not compared with {robustness.REPORT_FILE}: it was evaluated with another "
            "seed, batch size or number of images"
        )
    _print_timing(report, wall)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _print_report(report: dict, written: dict, reference: str | None) -> None:
    print(
        f"clean accuracy: {report['clean_accuracy']:.4f} on {report['num_examples']} "
        "test images"
    )
    noise = (report.get("noise") or {}).get("results") or []
    for family in dict.fromkeys(r["family"] for r in noise):
        cells = ", ".join(
            f"{r['level']:g}: {r['accuracy']:.4f}"
            for r in noise
            if r["family"] == family
        )
        print(f"noise {family}: {cells}")
    corruptions = report.get("corruptions") or {}
    if corruptions.get("skipped"):
        print(f"corruptions skipped: {corruptions['skipped']}")
    elif corruptions:
        mca = corruptions["mean_corruption_accuracy"]
        over = len(corruptions["mean_over"])
        missing = ", ".join(corruptions["missing_standard"]) or "none"
        print(
            f"mean corruption accuracy ({corruptions['source']}): "
            f"{'–' if mca is None else f'{mca:.4f}'} over {over} of 15 standard "
            f"corruptions (not evaluated: {missing})"
        )
        if written.get("mce") is not None:
            print(f"mCE relative to {reference}: {written['mce']:.3f}")
    attacks = report.get("attacks") or {}
    if attacks.get("skipped"):
        print(f"attacks and certified accuracy not run: {attacks['skipped']}")
    if attacks.get("error"):
        print(f"attacks not run: {attacks['error']}")
    for method in ("fgsm", "pgd"):
        rows = [r for r in attacks.get("results") or [] if r["method"] == method]
        if rows:
            cells = ", ".join(
                f"{r['epsilon_255']:g}/255: {r['accuracy']:.4f}" for r in rows
            )
            print(f"{method.upper()} accuracy: {cells}")
    certified = report.get("certified")
    if certified is not None:
        if certified["supported"]:
            cells = ", ".join(
                f"{r['epsilon_255']:g}/255: {r['certified_accuracy']:.4f}"
                for r in certified["results"]
            )
            print(f"certified accuracy: {cells}")
        else:
            print(f"certified accuracy not available: {certified['reason']}")


def _print_timing(report: dict, wall: float) -> None:
    timing = report["timing"]
    print(
        f"wall time: {wall:.1f} s ({timing['suite_seconds']:.1f} s in the suite) for "
        f"{timing['images']:,} image evaluations; plain inference of the same images: "
        f"{timing['plain_equivalent_seconds']:.1f} s "
        f"({timing['plain_inference']['images_per_second']:.0f} img/s); "
        f"ratio {timing['time_ratio']:.2f}"
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    import pathlib

    from larq_lipschitz.compare import write_comparison

    existing = [
        name
        for name in ("comparison.md", "comparison.json", "comparison.png")
        if (pathlib.Path(args.output) / name).exists()
    ]
    if existing and not args.force:
        raise ValueError(
            f"{args.output} already holds {', '.join(existing)}; pass --force to replace "
            "them or choose another --output folder."
        )
    paths = write_comparison(args.run_dirs, args.output)
    print(paths["markdown"].read_text(encoding="utf-8"), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
