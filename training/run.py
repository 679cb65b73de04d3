"""`bfd train` end to end: read -> split by patient -> cached features -> heads -> operating points -> run folder.
(Data without patient ids, FracAtlas, is split by image: the log and the summary's `split_unit` say so.)

The run folder is what `bfd export --keras-dir RUN` takes: `router.keras`, `specialist_<part>.keras` (each the
full uint8-input model of `training.architecture`, all sharing one frozen backbone, so the export fuses them
into one graph) and `models.json` (parts, trained flag, thresholds, validation metrics), plus the history,
curves, split file and counts that let a reader check the run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training import metrics
from training.architecture import (
    FRACTURE_LABELS,
    build_backbone,
    build_classifier,
)
from training.dataset import DEFAULT_PARTS, Dataset, read_dataset
from training.features import (
    ExtractionResult,
    FeatureCache,
    backbone_fingerprint,
    default_cache_root,
    extract_features,
    feature_extractor,
)
from training.heads import HeadConfig, TrainedHead, TrainingError, predict_head, train_head
from training.plots import plot_history
from training.records import ImageRecord
from training.splits import (
    SplitMode,
    assign_splits,
    format_counts,
    patient_counts,
    split_counts,
    split_unit,
    write_split_file,
)

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
COUNTS_FILE = "split_counts.json"
HISTORY_FILE = "history.json"
THRESHOLDS_FILE = "thresholds.json"
SUMMARY_FILE = "train_summary.json"
SKIPPED_FILE = "skipped.json"
RUN_INFO_FILE = "models.json"  # read by export.sources
FRACTURED = FRACTURE_LABELS.index("fractured")  # class index of 'fractured' in every specialist


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    out: Path
    weights: str | None = None  # 'imagenet', None (random backbone: demo and tests only) or a weights file
    parts: tuple[str, ...] | None = DEFAULT_PARTS  # None: every part the data holds
    split: SplitMode = "patient"
    seed: int = 0
    cache_root: Path | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    sensitivity_target: float = 0.90
    specificity_target: float = 0.90
    batch_size: int = 32
    progress: bool = True
    force: bool = False


@dataclass
class TrainResult:
    out: Path
    parts: list[str]
    trained: bool
    extraction: ExtractionResult
    thresholds: dict[str, dict[str, float | None]]
    outputs: list[Path]
    counts: dict[str, dict[str, dict[str, int]]]
    patients: dict[str, int]


def train(options: TrainOptions) -> TrainResult:
    """Run the whole training and write the run folder; raises DatasetError/SplitError/TrainingError."""
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        if not options.force:
            raise TrainingError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    dataset = read_dataset(options.data, options.parts)
    for problem in dataset.problems:
        log.warning("dataset: %s", problem)
    splits = assign_splits(dataset.records, options.split, seed=options.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_split_file(out / SPLIT_FILE, dataset.records, splits)
    counts = split_counts(dataset.records, splits)
    patients = patient_counts(dataset.records, splits)
    (out / COUNTS_FILE).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    unit = split_unit(dataset.records)
    log.info("split by %s (%s, seed %d):\n%s", unit, options.split, options.seed, format_counts(counts, patients))

    keras.utils.set_random_seed(options.seed)  # a random backbone (weights=None) must be the same on a rerun
    backbone = build_backbone(options.weights)
    fingerprint = backbone_fingerprint(backbone)
    cache = FeatureCache.for_backbone(options.cache_root or default_cache_root(), fingerprint, "bilinear")
    extraction = extract_features(
        dataset.records,
        feature_extractor(backbone),
        cache,
        batch_size=options.batch_size,
        progress=options.progress,
    )
    (out / SKIPPED_FILE).write_text(json.dumps(extraction.skipped, indent=2) + "\n", encoding="utf-8")
    usable = [(r, s) for r, s in zip(dataset.records, splits, strict=True) if r.relative_path in extraction.features]
    if not usable:
        raise TrainingError(f"{options.data}: no readable images ({len(extraction.skipped)} skipped)")

    parts = dataset.parts
    router = _fit(
        "router", parts, usable, lambda r: parts.index(r.part), lambda r: True, extraction.features, options.head
    )
    specialists = {
        part: _fit(
            f"specialist_{part}",
            list(FRACTURE_LABELS),
            usable,
            lambda r: FRACTURED if r.label == 1 else 1 - FRACTURED,
            lambda r, part=part: r.part == part,
            extraction.features,
            options.head,
        )
        for part in parts
    }
    thresholds, validation = _operating_points(specialists, usable, extraction.features, options)
    trained = options.weights is not None and not dataset.synthetic
    outputs = _write_run(out, dataset, backbone, router, specialists, thresholds, validation, trained, options)
    summary = {
        "data": str(options.data),
        "layout": dataset.layout,
        "synthetic": dataset.synthetic,
        "body_parts": parts,
        "split": options.split,
        "seed": options.seed,
        "split_unit": unit,  # 'image' for FracAtlas: its 'patients' below are images
        "patients_per_split": patients,
        "backbone_weights": _weights_label(options.weights),
        "backbone_fingerprint": fingerprint,
        "feature_cache": str(cache.directory),
        "features": extraction.summary(),
        "dataset_problems": dataset.problems,
        "trained": trained,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    outputs.append(out / SUMMARY_FILE)
    return TrainResult(out, parts, trained, extraction, thresholds, outputs, counts, patients)


def _fit(
    name: str,
    class_names: list[str],
    usable: list[tuple[ImageRecord, str]],
    target: Any,
    include: Any,
    features: dict[str, np.ndarray],
    config: HeadConfig,
) -> TrainedHead:
    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = [r for r, s in usable if s == split and include(r)]
        x = np.stack([features[r.relative_path] for r in chosen]) if chosen else np.zeros((0, 2, 2048), np.float32)
        return x, np.asarray([target(r) for r in chosen], dtype=np.int64)

    train_x, train_y = arrays("train")
    val_x, val_y = arrays("val")
    return train_head(name, class_names, train_x, train_y, val_x, val_y, config)


def _operating_points(
    specialists: dict[str, TrainedHead],
    usable: list[tuple[ImageRecord, str]],
    features: dict[str, np.ndarray],
    options: TrainOptions,
) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    """Per part, on the validation split at study level: the high-sensitivity and high-specificity thresholds."""
    thresholds: dict[str, dict[str, float | None]] = {}
    validation: dict[str, Any] = {}
    for part, trained in specialists.items():
        records = [r for r, s in usable if s == "val" and r.part == part]
        scores = predict_head(trained.head, np.stack([features[r.relative_path][0] for r in records]))[:, FRACTURED]
        study_labels, study_scores, study_patients = study_level(records, scores)
        sensitive = metrics.high_sensitivity_threshold(study_labels, study_scores, options.sensitivity_target)
        specific = metrics.high_specificity_threshold(study_labels, study_scores, options.specificity_target)
        if sensitive is None:
            log.warning("%s: no fractured study in validation; decision threshold left at 0.5", part)
        thresholds[part] = {
            "decision": 0.5 if sensitive is None else float(sensitive),
            "high_sensitivity": None if sensitive is None else float(sensitive),
            # no observed score qualifies -> just above the highest; P(fractured) itself never exceeds 1
            "high_specificity": None if specific is None else min(float(specific), 1.0),
        }
        decision = thresholds[part]["decision"]
        assert decision is not None
        validation[part] = {
            "studies": len(study_labels),
            "images": len(records),
            "sensitivity_target": options.sensitivity_target,
            "specificity_target": options.specificity_target,
            "study_auroc": metrics.auroc(study_labels, study_scores),
            "at_decision": asdict(metrics.binary_confusion(study_labels, (study_scores >= decision).astype(int))),
        }
    return thresholds, validation


def study_level(records: list[ImageRecord], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per study: label, mean of its images' P(fractured) (MURA's rule) and patient, in first-seen order."""
    grouped: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        grouped.setdefault(record.study, []).append(index)
    labels = np.asarray([records[rows[0]].label for rows in grouped.values()], dtype=np.int64)
    means = np.asarray([float(np.mean(scores[rows])) for rows in grouped.values()], dtype=np.float64)
    patients = [records[rows[0]].patient for rows in grouped.values()]
    return labels, means, patients


def _weights_label(weights: str | None) -> str:
    if weights is None or str(weights).lower() == "none":
        return "none"
    return "imagenet" if weights == "imagenet" else Path(weights).name


def _write_run(
    out: Path,
    dataset: Dataset,
    backbone: keras.Model,
    router: TrainedHead,
    specialists: dict[str, TrainedHead],
    thresholds: dict[str, dict[str, float | None]],
    validation: dict[str, Any],
    trained: bool,
    options: TrainOptions,
) -> list[Path]:
    outputs = [out / SPLIT_FILE, out / COUNTS_FILE, out / SKIPPED_FILE]
    heads = {"router": router, **{f"specialist_{part}": head for part, head in specialists.items()}}
    history: dict[str, Any] = {}
    for name, fitted in heads.items():
        n_classes = len(dataset.parts) if name == "router" else len(FRACTURE_LABELS)
        model = build_classifier(n_classes, backbone=backbone, head=fitted.head, name=name)
        model.save(out / f"{name}.keras")
        outputs.append(out / f"{name}.keras")
        title = name if trained else f"{name} (trained=false: random backbone or synthetic data)"
        outputs.append(plot_history(fitted.history, title, out / f"curves_{name}.png", fitted.best_epoch))
        history[name] = {
            "history": fitted.history,
            "best_epoch": fitted.best_epoch,
            "epochs_run": fitted.epochs_run,
            "train_images": fitted.train_images,
            "val_images": fitted.val_images,
            "class_counts": fitted.class_counts,
        }
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    (out / THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=2) + "\n", encoding="utf-8")
    run_info = {
        "body_parts": dataset.parts,
        "trained": trained,
        "backbone_weights": _weights_label(options.weights),
        "resize": "bilinear",
        "thresholds": thresholds,
        "metrics": {
            "validation_study_level": validation,
            "note": "MURA's positive label means 'abnormal' (fracture, hardware, degenerative disease, ...).",
        },
    }
    (out / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    return [*outputs, out / HISTORY_FILE, out / THRESHOLDS_FILE, out / RUN_INFO_FILE]
