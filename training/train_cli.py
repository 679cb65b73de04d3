"""`bfd train`: train the router and one fracture specialist per body part on MURA (or its flat layout) or FracAtlas."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="MURA-v1.1 (or its parent), a flat Dataset/<Part>, or FracAtlas"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write (then: bfd export --keras-dir)")
    parser.add_argument(
        "--weights", default="imagenet", help="backbone: 'imagenet', 'none' (random: tests/demos only) or an .h5 file"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        help="body parts to train; 'all' for every part (default: elbow hand shoulder; on FracAtlas every region)",
    )
    parser.add_argument(
        "--split",
        choices=["patient", "mura"],
        default="patient",
        help="patient: 72/18/10 by patient (default; FracAtlas has no patient ids: by image); "
        "mura: MURA train -> train/val by patient, MURA valid -> test",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default $BFD_CACHE_DIR or ~/.cache/bfd)")
    parser.add_argument("--epochs", type=int, default=25, help="at most this many epochs per head (<= 25)")
    parser.add_argument("--batch-size", type=int, default=64, help="head training batch size")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience on val_loss")
    parser.add_argument("--no-flip", action="store_true", help="disable horizontal-flip augmentation")
    parser.add_argument("--sensitivity-target", type=float, default=0.90, help="high-sensitivity operating point")
    parser.add_argument("--specificity-target", type=float, default=0.90, help="high-specificity operating point")
    parser.add_argument("--extract-batch-size", type=int, default=32, help="images per backbone batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="replace a non-empty run folder")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.architecture import WeightsUnavailableError
    from training.dataset import DEFAULT_PARTS
    from training.fracatlas import SPLIT_UNIT_NOTE, is_fracatlas
    from training.heads import HeadConfig, TrainingError
    from training.records import DatasetError
    from training.run import TrainOptions, train
    from training.splits import SplitError, format_counts

    for name in ("sensitivity_target", "specificity_target"):
        if not 0.0 < getattr(args, name) <= 1.0:
            log.error("--%s must be in (0, 1], got %s", name.replace("_", "-"), getattr(args, name))
            return 2
    if not 1 <= args.epochs <= 25:
        log.error("--epochs must be between 1 and 25 (the system's limit), got %d", args.epochs)
        return 2
    fracatlas = is_fracatlas(args.data)
    if fracatlas and args.split == "mura":
        log.error("--split mura needs MURA's train/valid folders; %s is FracAtlas: use --split patient", args.data)
        return 2
    requested = [p.lower() for p in args.parts] if args.parts else None
    # FracAtlas's regions are not MURA's parts, so its default is every region it holds.
    parts = None if requested == ["all"] or (requested is None and fracatlas) else tuple(requested or DEFAULT_PARTS)
    options = TrainOptions(
        data=args.data,
        out=args.out,
        weights=None if args.weights.lower() == "none" else args.weights,
        parts=parts,
        split=args.split,
        seed=args.seed,
        cache_root=args.cache_dir,
        head=HeadConfig(
            max_epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, flip=not args.no_flip
        ),
        sensitivity_target=args.sensitivity_target,
        specificity_target=args.specificity_target,
        batch_size=args.extract_batch_size,
        progress=not args.no_progress,
        force=args.force,
    )
    try:
        result = train(options)
    except (DatasetError, SplitError, TrainingError, WeightsUnavailableError) as error:
        log.error("training failed: %s", error)
        return 2
    # Without patient ids every image is its own 'patient': a patients row would only repeat the image counts.
    print(format_counts(result.counts, None if fracatlas else result.patients))
    if fracatlas:
        print(SPLIT_UNIT_NOTE)
    features = result.extraction.summary()
    print(
        f"features: {features['computed']} images computed, {features['reused']} reused from the cache, "
        f"{features['skipped']} unreadable skipped"
        + (
            f" ({features['images_per_second']} img/s, each image and its flip)"
            if features["images_per_second"]
            else ""
        )
    )
    for part, points in result.thresholds.items():
        print(
            f"{part}: decision (high-sensitivity) threshold {points['decision']:.4f}, "
            f"high-specificity threshold {points['high_specificity']}"
        )
    print(f"run written to {result.out}:")
    for path in result.outputs:
        print(f"  {path}")
    print(f"next: bfd export --keras-dir {result.out} --out models/<name>")
    if not result.trained:
        print("WARNING: trained=false (random backbone or synthetic data): these models are meaningless as results.")
    return 0
