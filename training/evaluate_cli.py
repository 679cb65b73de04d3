"""`bfd evaluate`: run an ONNX bundle on the test split (MURA) or on FracAtlas (external validation), write reports."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the dataset the bundle was trained on (MURA or flat layout), or a FracAtlas folder (external validation)",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder written by `bfd export`")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and PNGs")
    parser.add_argument(
        "--split-file",
        type=Path,
        help="the training run's split.csv (recommended); else the split is recomputed (MURA) or every image is "
        "used (FracAtlas, unless the bundle was trained on it: then pass its split file)",
    )
    parser.add_argument("--split", choices=["patient", "mura"], default="patient", help="when recomputing")
    parser.add_argument("--seed", type=int, default=0, help="split seed when recomputing, and bootstrap seed")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (patients; FracAtlas: images)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--providers", nargs="+", help="onnxruntime providers: auto, cuda, tensorrt, cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fracatlas = parser.add_argument_group("FracAtlas (external validation)")
    fracatlas.add_argument(
        "--region-map",
        nargs="+",
        metavar="REGION=PART",
        help="FracAtlas region -> bundle part, replacing the default table (each region mapped to the part of the "
        "same name when the bundle has it, e.g. hand=hand shoulder=shoulder); unmapped regions are out of scope",
    )
    fracatlas.add_argument("--keep-mixed", action="store_true", help="keep films of several regions (left out)")
    fracatlas.add_argument("--examples", type=int, default=6, help="images in the localisation figure")


def run(args: argparse.Namespace) -> int:
    from inference.bundle import BundleError
    from inference.engine import EngineError
    from training.evaluate import evaluate
    from training.evaluate_options import EvaluateOptions, EvaluationError
    from training.external import KIND, evaluate_external, parse_region_map
    from training.fracatlas import is_fracatlas
    from training.records import DatasetError
    from training.splits import SplitError

    if args.bootstrap < 100:
        log.error("--bootstrap needs at least 100 resamples for a 95%% interval, got %d", args.bootstrap)
        return 2
    if args.examples < 0:
        log.error("--examples must be 0 or more, got %d", args.examples)
        return 2
    try:
        region_map = parse_region_map(args.region_map) if args.region_map else None
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
            region_map=region_map,
            keep_mixed=args.keep_mixed,
            examples=args.examples,
        )
        # A FracAtlas folder is an external test set (training.external); anything else MURA-like.
        report, outputs = (evaluate_external if is_fracatlas(options.data) else evaluate)(options)
    except (BundleError, DatasetError, EngineError, EvaluationError, SplitError) as error:
        log.error("evaluation failed: %s", error)
        return 2
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    if report.get("kind") == KIND:
        _print_external(report)
    else:
        _print_mura(report)
    print(f"report written to {args.out}:")
    for path in outputs:
        print(f"  {path}")
    return 0


def _print_mura(report: dict[str, Any]) -> None:
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


def _print_external(report: dict[str, Any]) -> None:
    data = report["data"]
    print(
        f"FracAtlas: {data['evaluated']} images evaluated, {len(data['skipped_images'])} unreadable skipped, "
        f"{data['mixed_left_out']['images']} mixed films left out"
    )
    print(report["notes"]["label"])
    for region, entry in report["per_region"].items():
        level = entry.get("specialist")
        if level is None:
            print(f"{region} -> {entry['part']}: no image")
            continue
        print(
            f"{region} -> {entry['part']}: sensitivity {_fmt(level['sensitivity']['value'])}, specificity "
            f"{_fmt(level['specificity']['value'])}, AUROC {_fmt(level['auroc']['value'])}, kappa "
            f"{_fmt(level['kappa']['value'])} ({level['n']} images, {entry['fractured']} fractured)"
        )
    out = report["out_of_scope"]
    if out["images"]:
        print(
            f"out of scope ({', '.join(out['regions'])}): abstained on {out['abstained']['numerator']} of "
            f"{out['images']} ({_fmt(out['abstained']['value'])}); answered {out['answered']['numerator']} "
            f"(failures of abstention); router chose {out['router_choice']}"
        )
    pointing = report["localisation"]["overall"]
    print(
        f"localisation on {pointing['images']} fractured images with boxes: pointing game "
        f"{_fmt(pointing['pointing_game']['value'])} (centre baseline "
        f"{_fmt(pointing['centre_baseline_pointing_game']['value'])}, random pointer "
        f"{_fmt(pointing['random_pointer_expected_hit_rate'])}), energy in boxes "
        f"{_fmt(pointing['energy_fraction']['value'])}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
