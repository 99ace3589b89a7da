"""The `reproduce` subcommand: the comparison grid of the method's tables."""

from __future__ import annotations

import argparse
import math

from larq_lipschitz.cli_reports import _names


def _strengths(text: str) -> dict[str, float]:
    out = {}
    for item in _names(text):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or math.isnan(number):
            raise argparse.ArgumentTypeError(
                f"expected NAME=NUMBER pairs like l1inf=1e-5,lcr=3.2, got {item!r}"
            )
        out[name.strip()] = number
    return out


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `reproduce` subcommand."""
    from larq_lipschitz.reproduce import DEFAULT_REGULARIZERS, PROFILES, TABLES

    p = subparsers.add_parser(
        "reproduce",
        help="train, evaluate and compare no control vs LCR vs L1,inf (a grid of runs)",
        description=(
            "Run the comparison grid of a table: one run per model and regularizer with "
            "the profile's recipe, each evaluated for robustness and bounds, then "
            "comparison.md/.png and time_per_epoch.md in --output. Rerunning the same "
            "command resumes an interrupted grid and never retrains a finished run."
        ),
        epilog="profiles: "
        + "; ".join(f"{p.name}: {p.description}" for p in PROFILES.values()),
    )
    p.add_argument("--table", default="cifar10", choices=TABLES)
    p.add_argument("--profile", default="cpu-short", choices=list(PROFILES))
    p.add_argument(
        "--models", type=_names, default=("resnet20",), help="default: resnet20"
    )
    p.add_argument(
        "--regularizers",
        type=_names,
        default=DEFAULT_REGULARIZERS,
        help="default: " + ",".join(DEFAULT_REGULARIZERS),
    )
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 binary archive (or its folder); without it tensorflow-datasets",
    )
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data folder")
    p.add_argument("--output", default="runs/reproduce-cifar10", help="grid folder")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="choose each strength by a sweep on held-out training images",
    )
    p.add_argument(
        "--strengths",
        type=_strengths,
        default=None,
        help="explicit strengths, e.g. l1inf=1e-5,lcr=3.2 (override profile and sweep)",
    )
    group = p.add_argument_group("profile overrides (for quick trials)")
    group.add_argument("--epochs", type=_count, default=None)
    group.add_argument("--batch-size", type=_count, default=None)
    group.add_argument("--train-examples", type=_count, default=None)
    group.add_argument("--validation-examples", type=_count, default=None)
    group.add_argument(
        "--eval-examples", type=_count, default=None, help="test images of the suite"
    )
    group.add_argument(
        "--suite", default=None, choices=["all", "noise", "corruptions", "attacks"]
    )
    group.add_argument("--sweep-epochs", type=_count, default=None)
    group.add_argument("--sweep-train-examples", type=_count, default=None)
    group.add_argument(
        "--timing-steps",
        type=_count,
        default=None,
        help="steps per round of the side-by-side timing (0: skip it)",
    )
    group.add_argument("--timing-rounds", type=_count, default=None)
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from larq_lipschitz.reproduce import OVERRIDABLE, reproduce

    overrides = {name: getattr(args, name, None) for name in OVERRIDABLE}
    for name in ("epochs", "batch_size", "timing_rounds"):
        if overrides.get(name) == 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
    summary = reproduce(
        args.table,
        args.profile,
        models=args.models,
        regularizers=args.regularizers,
        data=args.data,
        data_dir=args.data_dir,
        output=args.output,
        sweep=args.sweep,
        strengths=args.strengths,
        overrides=overrides,
    )
    for row in summary["runs"]:
        print(
            f"{row['model']:12s} {row['regularizer']:10s} strength {row['strength']:<8g} "
            f"clean {row['test_accuracy']:.4f}  ({row['state']}: {row['run']})"
        )
    print(f"comparison: {summary['files']['markdown']}")
    return 0
