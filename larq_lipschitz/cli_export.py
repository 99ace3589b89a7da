"""The `larq-lipschitz export` subcommand: a trained run as an LCE flatbuffer.

`add_commands(subparsers)` is called by `larq_lipschitz.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import sys

from larq_lipschitz.cli import _float_list
from larq_lipschitz.cli_reports import _positive_int

log = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"
EXPORT_FILE = "export.json"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to the `larq-lipschitz` parser."""
    p = subparsers.add_parser(
        "export",
        help="convert a trained run to a Larq Compute Engine flatbuffer and verify it",
        description=(
            "Convert RUN_DIR/model.keras with Larq Compute Engine to RUN_DIR/model.tflite "
            "(written atomically), run the flatbuffer with LCE's interpreter on the run's "
            "test set (or its first N images) next to the Keras model, and write "
            "RUN_DIR/export.json: agreement of predicted classes, largest logit "
            "difference, both accuracies, file sizes and the operator each layer became. "
            'Needs the deploy extra: `pip install "larq-lipschitz[deploy]"`.'
        ),
    )
    from larq_lipschitz.cli_reports import one_line_errors

    one_line_errors(p)
    p.add_argument("run_dir", help="run folder written by `larq-lipschitz train`")
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=None,
        help="verify on the first N test images only (default: the whole test set)",
    )
    p.add_argument(
        "--data", default=None, help="dataset archive, if not the one the run used"
    )
    p.add_argument(
        "--noise",
        type=_float_list,
        default=(),
        help="also measure the deployed model's accuracy under Gaussian noise of these "
        "sigmas ([0, 1] pixel scale), e.g. 0.02,0.05,0.1",
    )
    p.add_argument(
        "--threads", type=_positive_int, default=1, help="interpreter threads"
    )
    p.set_defaults(func=_cmd_export)


def _print_table(layers: list[dict]) -> None:
    print(f"{'layer':32s} {'class':22s} {'deployed as':18s} {'binary':>6s}")
    for row in layers:
        deployed = row["deployed_as"] or "(not identified)"
        print(
            f"{row['layer']:32s} {row['class']:22s} {deployed:18s} "
            f"{'yes' if row['binary'] else 'no':>6s}"
        )


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        return _export(args)
    except _errors() as err:
        print(f"larq-lipschitz export: error: {err}", file=sys.stderr)
        return 2


def _errors() -> tuple[type[BaseException], ...]:
    from larq_lipschitz.export import ExportError, LCENotInstalledError

    return ExportError, LCENotInstalledError


def _export(args: argparse.Namespace) -> int:
    from larq_lipschitz import export, runs
    from larq_lipschitz.cli import _test_split
    from larq_lipschitz.cli_reports import load_run

    bad = [s for s in args.noise if not math.isfinite(s) or not 0 <= s <= 1]
    if bad:
        raise ValueError(
            f"--noise sigmas must be finite numbers in [0, 1] (pixel scale), got {bad}."
        )
    export._lce()  # fail before loading anything when LCE is missing
    run_dir = pathlib.Path(args.run_dir)
    results, model = load_run(run_dir)
    target = run_dir / TFLITE_FILE
    converted = export.convert(model, target)
    print(
        f"converted: {target} ({converted['tflite_bytes']:,} bytes; float32 Keras "
        f"weights {converted['float32_bytes']:,} bytes, {converted['size_ratio']:.1f}x)"
    )
    print(
        f"binary operators: {converted['binary_layers']} of "
        f"{converted['binarized_layers']} binarized layers"
    )
    _print_table(converted["layers"])
    print(
        "operators: " + ", ".join(f"{k} {v}" for k, v in converted["operators"].items())
    )
    deployed = export.DeployedModel(target, num_threads=args.threads)
    test = _test_split(results, data=args.data)
    check = export.verify(model, deployed, test, num_examples=args.examples)
    print(
        f"verified on {check['num_examples']} test images: agreement "
        f"{check['agreement']:.4f} ({check['disagreements']} differ), max logit "
        f"difference {check['max_logit_difference']:.3g}"
    )
    print(
        f"accuracy: Keras {check['keras_accuracy']:.4f}, deployed "
        f"{check['deployed_accuracy']:.4f}"
    )
    noise = None
    if args.noise:
        noise = export.evaluate_deployed(
            deployed, test, args.noise, num_examples=args.examples
        )
        for name, acc in noise.items():
            if name.startswith("gaussian_"):
                print(
                    f"deployed accuracy under {name.replace('_', ' sigma=')}: {acc:.4f}"
                )
    report = {
        "run_dir": str(run_dir),
        "model": str(run_dir / runs.MODEL_FILE),
        "tflite": str(target),
        "tflite_bytes": converted["tflite_bytes"],
        "float32_bytes": converted["float32_bytes"],
        "size_ratio": converted["size_ratio"],
        "binarized_layers": converted["binarized_layers"],
        "binary_layers": converted["binary_layers"],
        "operators": converted["operators"],
        "layers": converted["layers"],
        "verification": check,
        "deployed_noise_accuracy": noise,
        "versions": {
            **runs.versions(),
            "larq-compute-engine": converted["larq_compute_engine"],
        },
    }
    runs.atomic_write_json(run_dir / EXPORT_FILE, report)
    print(f"written: {run_dir / EXPORT_FILE}")
    return 0
