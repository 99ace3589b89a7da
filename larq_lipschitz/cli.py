"""The `larq-lipschitz` command line.

Every subcommand prints its progress and results; errors in what the user asked for end
the program with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import larq_lipschitz  # noqa: E402  (selects Keras 2 before TensorFlow loads)

log = logging.getLogger("larq_lipschitz.cli")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _add_train(sub: argparse._SubParsersAction) -> None:
    from larq_lipschitz.training import CONTROLS, DEFAULT_STRENGTH, OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="train a BNN with a Lipschitz control, then evaluate it clean and under noise",
        description=(
            "Train with model.fit under a tf.distribute strategy chosen from the visible "
            "devices (TF_CONFIG: multi-worker; several GPUs: mirrored; else one device), "
            "evaluate on the test set clean and under Gaussian noise, and write "
            "results.json, model.keras, history.csv and TensorBoard logs into --output. "
            "Rerunning the same command resumes an interrupted run (even after kill -9); "
            "a finished run is not trained again. With the same --seed, a run on the same "
            "machine and software gives the same weights bit for bit. Training stops with "
            "an error naming the layer or batch where a NaN or Inf appeared."
        ),
    )
    p.add_argument(
        "--model", default="resnet20", help="model name (see `larq-lipschitz models`)"
    )
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "imagenet2012"])
    p.add_argument(
        "--data",
        default=None,
        help="local dataset archive (CIFAR-10 binary .tar.gz or its extracted folder); "
        "without it tensorflow-datasets is used",
    )
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data folder")
    p.add_argument("--weight-bits", type=int, default=1, choices=[1, 32])
    p.add_argument("--activation-bits", type=int, default=1, choices=[1, 32])
    p.add_argument("--regularizer", default="l1inf", choices=CONTROLS)
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="penalty strength (radius for l1inf-constraint, alpha for lcr); defaults: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_STRENGTH.items() if k != "none"),
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="penalize only the excess over this bound",
    )
    p.add_argument(
        "--teacher", default=None, help="full-precision teacher model (.keras) for lcr"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="decoupled weight decay (e.g. 1e-4 with --optimizer sgd, as in the papers)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-examples", type=int, default=None, help="cap on training images"
    )
    p.add_argument(
        "--validation-examples",
        type=int,
        default=0,
        help="hold out this many training images",
    )
    p.add_argument(
        "--noise",
        type=_float_list,
        default=None,
        help="Gaussian noise sigmas, e.g. 0.02,0.05,0.1",
    )
    p.add_argument(
        "--synchronized-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="synchronize BatchNorm across replicas (default: when more than one replica)",
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TensorFlow op determinism, for bit-for-bit repeatable runs (default: on; "
        "--no-deterministic can be faster on GPUs)",
    )
    p.add_argument("--output", default="runs/demo", help="run folder")
    p.add_argument(
        "--force",
        action="store_true",
        help="retrain even if the run folder holds a finished run",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="only continue the run already in --output: refuse to start a new one "
        "(rerunning the same command resumes anyway; this guards against a wrong path)",
    )
    p.set_defaults(func=_cmd_train)


def _train_config(args: argparse.Namespace):
    """The `TrainConfig` of parsed `train` arguments."""
    from larq_lipschitz.evaluation import DEFAULT_NOISE_SIGMAS
    from larq_lipschitz.training import TrainConfig

    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data=args.data,
        data_dir=args.data_dir,
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        regularizer=args.regularizer,
        strength=args.strength,
        target=args.target,
        teacher=args.teacher,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        seed=args.seed,
        train_examples=args.train_examples,
        validation_examples=args.validation_examples,
        noise_sigmas=args.noise if args.noise is not None else DEFAULT_NOISE_SIGMAS,
        synchronized_bn=args.synchronized_bn,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from larq_lipschitz.training import train

    config = _train_config(args)
    if args.resume:
        import pathlib

        from larq_lipschitz import runs

        if runs.check_reusable(pathlib.Path(args.output), config.to_dict()) == "new":
            raise runs.RunError(
                f"{args.output}: holds no run with this configuration to resume "
                "(--resume); drop --resume to start a new run there."
            )
    results = train(
        config, args.output, force=args.force, deterministic=args.deterministic
    )
    print(f"run folder: {args.output}")
    print(f"clean test accuracy: {results['test_accuracy']:.4f}")
    for name, acc in results["noise_accuracy"].items():
        print(f"accuracy under {name.replace('_', ' sigma=')}: {acc:.4f}")
    if results.get("mean_epoch_seconds") is not None:
        print(f"time per epoch: {results['mean_epoch_seconds']:.1f} s")
    print(f"results: {os.path.join(args.output, 'results.json')}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the available models")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from larq_lipschitz import models

    rows = models.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = list(rows[0].keys())
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))
    return 0


def _load_run(run_dir: str):
    """The results and the trained model of a run folder, each checked."""
    from larq_lipschitz.cli_reports import load_run

    return load_run(run_dir)


def _test_split(results: dict, batch_size: int = 200, data: str | None = None):
    """The test set of the run's dataset, from the source the run was trained on."""
    from larq_lipschitz import data as data_lib

    config = results["config"]
    splits = data_lib.load(
        config["dataset"],
        data if data is not None else config.get("data"),
        batch_size=batch_size,
        data_dir=config.get("data_dir"),
        augment=False,
    )
    return splits.test


def _add_bounds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bounds",
        help="Lipschitz bounds of a trained run (per layer and network, inf and 2 norms)",
        description="Write RUN_DIR/bounds.json and bounds.csv: per-layer and network "
        "Lipschitz bounds in the infinity and 2 norms (BatchNorm folded, effective binary "
        "weights), and for each binarized layer the ratio of its L1,inf to its spectral bound.",
    )
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_bounds)


def _cmd_bounds(args: argparse.Namespace) -> int:
    from larq_lipschitz.bounds import (
        RELAXATION,
        bound_comparison,
        lipschitz_bound,
        write_bounds_report,
    )

    _, model = _load_run(args.run_dir)
    for norm in ("inf", "2"):
        report = lipschitz_bound(model, norm)
        print(f"network Lipschitz bound ({norm} norm): {report.network_bound:.6g}")
    print(f"sign activations: {RELAXATION}")
    rows = bound_comparison(model)
    if rows:
        print(f"{'layer':32s} {'L1,inf':>12s} {'spectral':>12s} {'ratio':>8s}")
        for r in rows:
            print(
                f"{r['layer']:32s} {r['l1_inf']:12.4g} {r['spectral']:12.4g} {r['ratio']:8.3f}"
            )
    paths = write_bounds_report(model, args.run_dir)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_certify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certify",
        help="certified accuracy under L-inf perturbations (interval bound propagation)",
        description="Certified test accuracy of a trained run under ||delta||_inf <= eps "
        "([0, 1] pixel scale) by interval bound propagation; writes certification.json and "
        "certified_accuracy.png into RUN_DIR.",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--eps",
        type=_float_list,
        default=(0.0, 1 / 255, 2 / 255),
        help="comma-separated epsilons in [0, 1] pixel scale (default 0,1/255,2/255)",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=None,
        help="certify only the first N test images",
    )
    p.add_argument(
        "--data", default=None, help="dataset archive, if not the one the run used"
    )
    p.set_defaults(func=_cmd_certify)


def _cmd_certify(args: argparse.Namespace) -> int:
    from larq_lipschitz.certify import certify, write_certification

    if any(not 0 <= e <= 1 for e in args.eps):
        raise ValueError(
            f"--eps values must be in [0, 1] pixel scale, got {list(args.eps)}."
        )
    results, model = _load_run(args.run_dir)
    rows = certify(
        model,
        _test_split(results, data=args.data),
        args.eps,
        num_examples=args.examples,
    )
    print(f"{'epsilon':>10s} {'clean':>8s} {'certified':>10s} {'undecided':>10s}")
    for r in rows:
        print(
            f"{r['epsilon']:10.5f} {r['clean_accuracy']:8.4f} {r['certified_accuracy']:10.4f} "
            f"{r['undecided_fraction']:10.4f}"
        )
    paths = write_certification(rows, args.run_dir)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from larq_lipschitz.cli_reports import OneLineParser

    parser = OneLineParser(
        prog="larq-lipschitz",
        description="L1,inf Lipschitz control for binarized neural networks (Larq, Keras 2).",
    )
    parser.add_argument(
        "--version", action="version", version=larq_lipschitz.__version__
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and results"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_models(sub)
    _add_bounds(sub)
    _add_certify(sub)
    from larq_lipschitz import cli_export, cli_reports, cli_reproduce

    cli_reports.add_commands(sub)
    cli_export.add_commands(sub)
    cli_reproduce.add_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from larq_lipschitz.runs import RunError

    errors: list[type[BaseException]] = [
        ValueError,
        RunError,
        FileNotFoundError,
        FloatingPointError,
    ]
    try:
        from larq_lipschitz.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


class _Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl-C, so that the run can be resumed."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"larq-lipschitz {args.command}: error: {err}", file=sys.stderr)
        return 2
    except _Terminated:
        print("terminated; rerun the same command to resume.", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
