"""The `evaluate` and `compare` subcommands of the `larq-lipschitz` command line.

`add_commands(subparsers)` adds both to the parser that `larq_lipschitz.cli` builds:

    larq-lipschitz evaluate RUN_DIR [--suite noise|corruptions|attacks|all] [--examples N]
                            [--reference RUN_DIR] [--data PATH] [--seed S] ...
    larq-lipschitz compare RUN_DIR... [--output DIR]

Errors in what the user asked for (an unknown suite or corruption, a severity outside
1..5, a folder without `results.json` or `model.keras`, a reference without corruption
results) raise `ValueError` or `runs.RunError` before anything is written; the main
program prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import time

from larq_lipschitz import runs
from larq_lipschitz.cli import _float_list

__all__ = ["add_commands"]


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
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--suite", default="all", choices=SUITES, help="default: all")
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
    p.add_argument("--pgd-steps", type=_positive_int, default=10)
    p.add_argument("--pgd-restarts", type=_positive_int, default=1)
    p.add_argument(
        "--no-certify",
        action="store_true",
        help="skip the certified accuracy of the attack suite",
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
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", default=".", help="folder to write into (default: .)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing comparison in --output",
    )
    p.set_defaults(func=_cmd_compare)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from larq_lipschitz import robustness
    from larq_lipschitz.cli import _load_run, _test_split

    wants_corruptions = args.suite in ("corruptions", "all")
    if args.reference is not None and not wants_corruptions:
        raise ValueError(
            f"--reference needs the corruption suite (--suite corruptions or all), "
            f"got --suite {args.suite}."
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
        attack_steps=args.pgd_steps,
        attack_restarts=args.pgd_restarts,
    )
    robustness._check_arguments(args.suite, **settings)  # fail before loading anything
    if args.reference is not None:
        reference = robustness.read_robustness(args.reference)
        if not (reference.get("corruptions") or {}).get("results"):
            raise runs.RunError(
                f"{args.reference}: its robustness report holds no corruption results; "
                "evaluate it with --suite corruptions or all first."
            )

    results, model = _load_run(args.run_dir)
    test = _test_split(results, batch_size=args.batch_size, data=args.data)
    start = time.perf_counter()
    report = robustness.run_suite(
        model, test, args.suite, certified=not args.no_certify, **settings
    )
    paths = robustness.write_robustness(report, args.run_dir, reference=args.reference)
    wall = time.perf_counter() - start
    written = robustness.read_robustness(args.run_dir)

    print(f"run: {args.run_dir} ({results['config'].get('model')}, suite {args.suite})")
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
            print(f"mCE relative to {args.reference}: {written['mce']:.3f}")
    attacks = report.get("attacks") or {}
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
    timing = report["timing"]
    print(
        f"wall time: {wall:.1f} s ({timing['suite_seconds']:.1f} s in the suite) for "
        f"{timing['images']:,} image evaluations; plain inference of the same images: "
        f"{timing['plain_equivalent_seconds']:.1f} s "
        f"({timing['plain_inference']['images_per_second']:.0f} img/s); "
        f"ratio {timing['time_ratio']:.2f}"
    )
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


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
