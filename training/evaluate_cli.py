"""`bfd evaluate`: run an ONNX bundle on the test split and write report.json, report.md and figures."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder written by `bfd export`")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and PNGs")
    parser.add_argument(
        "--split-file", type=Path, help="the training run's split.csv (recommended); else the split is recomputed"
    )
    parser.add_argument("--split", choices=["patient", "mura"], default="patient", help="when recomputing")
    parser.add_argument("--seed", type=int, default=0, help="split seed when recomputing, and bootstrap seed")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--providers", nargs="+", help="onnxruntime providers: auto, cuda, tensorrt, cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from service.bundle import BundleError
    from service.engine import EngineError
    from training.dataset import DatasetError
    from training.evaluate import EvaluateOptions, EvaluationError, evaluate
    from training.splits import SplitError

    if args.bootstrap < 100:
        log.error("--bootstrap needs at least 100 resamples for a 95%% interval, got %d", args.bootstrap)
        return 2
    options = EvaluateOptions(
        data=args.data,
        bundle=args.bundle,
        out=args.out,
        split_file=args.split_file,
        split=args.split,
        seed=args.seed,
        batch_size=args.batch_size,
        n_resamples=args.bootstrap,
        providers=tuple(args.providers) if args.providers else None,
        progress=not args.no_progress,
    )
    try:
        report, outputs = evaluate(options)
    except (BundleError, DatasetError, EngineError, EvaluationError, SplitError) as error:
        log.error("evaluation failed: %s", error)
        return 2
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    body = report["body_part"]["accuracy"]
    print(f"body part accuracy {body['value']:.3f} on {report['body_part']['images']} images")
    for part, entry in report["per_part"].items():
        if "study_level" in entry:
            study = entry["study_level"]
            auroc = study["auroc"]["value"]
            print(
                f"{part}: study-level sensitivity {_fmt(study['sensitivity']['value'])}, specificity "
                f"{_fmt(study['specificity']['value'])}, AUROC {_fmt(auroc)} ({study['n']} studies)"
            )
    print(f"report written to {args.out}:")
    for path in outputs:
        print(f"  {path}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
