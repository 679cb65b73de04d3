"""`bfd evaluate`: the ONNX bundle (not Keras) on the test split, scored the way clinicians read results.

A FracAtlas folder is an external test set instead: `bfd evaluate` hands it to `training.external` (per-region
metrics on true fracture labels, abstention on regions the bundle does not cover, Grad-CAM localisation).

The images go through `inference.preprocessing` and `inference.pipeline.predict_batch`, i.e. exactly the code that
serves, twice: once routed (the product's answer, router errors included) and once with the true body part as
hint (each specialist judged on its own part). Metrics: body-part accuracy and confusion; per part accuracy,
sensitivity, specificity (Wilson 95% intervals), AUROC and Cohen's kappa (patient-level bootstrap 95%
intervals), at image level and at study level (a study's probability is the mean of its images', as MURA
scores it); and the routed pipeline end to end.

No TensorFlow here: evaluation runs where the service runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference.bundle import Manifest, load_bundle
from inference.engine import Engine
from inference.pipeline import predict_batch
from inference.preprocessing import ImageError, prepare_image_file
from training import metrics
from training.dataset import read_dataset
from training.evaluate_options import EvaluateOptions, EvaluationError
from training.evaluation_report import (
    UNTRAINED_REPORT_WARNING,
    Predictions,
    bundle_facts,
    write_figures,
    write_markdown,
)
from training.records import ImageRecord
from training.splits import assign_splits, read_split_file

log = logging.getLogger(__name__)

MURA_NOTE = (
    "MURA's positive label means 'abnormal' (fracture, hardware, degenerative joint disease, lesions, ...), "
    "not strictly 'fracture': on MURA these figures measure abnormality detection."
)


def evaluate(options: EvaluateOptions) -> tuple[dict[str, Any], list[Path]]:
    """Run the bundle on the test split and write report.json, report.md and figures into `options.out`."""
    bundle = load_bundle(options.bundle)
    manifest = bundle.manifest
    test_records = _test_records(options, manifest)
    engine = Engine(bundle, providers=options.providers)
    predictions, skipped = run_bundle(engine, manifest, test_records, options.batch_size, options.progress)
    if not predictions.records:
        raise EvaluationError(f"no readable test image ({len(skipped)} skipped)")
    report = build_report(manifest, predictions, n_resamples=options.n_resamples, seed=options.seed)
    report["data"] = {
        "path": str(options.data),
        "split": str(options.split_file)
        if options.split_file
        else f"recomputed ({options.split}, seed {options.seed})",
        "skipped_images": skipped,
    }
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    figures = write_figures(report, predictions, out)
    write_markdown(report, figures, out / "report.md")
    return report, [out / "report.json", out / "report.md", *figures]


def _test_records(options: EvaluateOptions, manifest: Manifest) -> list[ImageRecord]:
    dataset = read_dataset(options.data, manifest.body_parts)
    if options.split_file is not None:
        records, splits = read_split_file(options.split_file, dataset.root)
    else:
        records, splits = dataset.records, assign_splits(dataset.records, options.split, seed=options.seed)
    test = [r for r, s in zip(records, splits, strict=True) if s == "test" and r.part in manifest.body_parts]
    if not test:
        raise EvaluationError(f"{options.data}: the test split holds no image of {manifest.body_parts}")
    return test


def _prepare(record: ImageRecord, resize: Any) -> np.ndarray | str:
    try:
        return prepare_image_file(record.path, resize=resize).pixels
    except ImageError as error:
        return error.reason
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"


def run_bundle(
    engine: Engine, manifest: Manifest, records: Sequence[ImageRecord], batch_size: int = 16, progress: bool = True
) -> tuple[Predictions, dict[str, str]]:
    """Routed and true-part predictions for every readable record; unreadable ones are skipped and listed."""
    kept: list[ImageRecord] = []
    router_probs: list[np.ndarray] = []
    p_true: list[float] = []
    p_routed: list[float] = []
    skipped: dict[str, str] = {}
    parts = manifest.body_parts
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool,
        tqdm(total=len(records), desc="evaluate", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(records), batch_size):
            chunk = list(records[start : start + batch_size])
            prepared = list(pool.map(lambda r: _prepare(r, manifest.input.resize), chunk))
            good = [(r, p) for r, p in zip(chunk, prepared, strict=True) if isinstance(p, np.ndarray)]
            skipped.update({r.relative_path: p for r, p in zip(chunk, prepared, strict=True) if isinstance(p, str)})
            if good:
                images = np.stack([p for _, p in good])
                routed = predict_batch(engine, images)
                hinted = predict_batch(engine, images, hints=[r.part for r, _ in good])
                for (record, _), by_router, by_hint in zip(good, routed, hinted, strict=True):
                    kept.append(record)
                    probs = by_router.body_part_probs
                    assert probs is not None  # no hint: the router always ran
                    router_probs.append(np.asarray(probs, dtype=np.float64))
                    p_true.append(by_hint.p_fractured)
                    p_routed.append(by_router.p_fractured)
            bar.update(len(chunk))
    for path, reason in skipped.items():
        log.warning("skipped %s: %s", path, reason)
    predictions = Predictions(
        records=kept,
        router_probs=np.stack(router_probs) if router_probs else np.zeros((0, len(parts))),
        p_true_part=np.asarray(p_true, dtype=np.float64),
        p_routed=np.asarray(p_routed, dtype=np.float64),
    )
    return predictions, skipped


def _studies(records: Sequence[ImageRecord]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        grouped.setdefault(record.study, []).append(index)
    return grouped


def build_report(
    manifest: Manifest, predictions: Predictions, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Every metric of the evaluation, JSON-ready, from the predictions (pure numpy: testable without models)."""
    records = predictions.records
    parts = manifest.body_parts
    true_part = np.asarray([parts.index(r.part) for r in records], dtype=np.int64)
    routed_part = np.argmax(predictions.router_probs, axis=1)
    patients = [r.patient for r in records]
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    router_correct = routed_part == true_part
    body_part = {
        "labels": parts,
        "images": len(records),
        "accuracy": metrics.proportion(int(router_correct.sum()), len(records)).as_dict(),
        "kappa": _bootstrapped(
            metrics.cohen_kappa(true_part, routed_part),
            lambda rows: metrics.cohen_kappa(true_part[rows], routed_part[rows]),
            patients,
            n_resamples,
            seed,
        ),
        "confusion_matrix": metrics.confusion_matrix(true_part, routed_part, len(parts)).tolist(),
    }
    per_part: dict[str, Any] = {}
    for index, part in enumerate(parts):
        rows = np.flatnonzero(true_part == index)
        if len(rows) == 0:
            per_part[part] = {"images": 0, "note": "no test image of this part"}
            continue
        part_records = [records[i] for i in rows]
        thresholds = manifest.thresholds[part]
        image_scores = predictions.p_true_part[rows]
        study_labels, study_scores, study_patients = _study_arrays(part_records, image_scores)
        per_part[part] = {
            "thresholds": thresholds.model_dump(),
            "image_level": metrics.level_metrics(
                labels[rows], image_scores, [patients[i] for i in rows], thresholds, n_resamples, seed
            ),
            "study_level": metrics.level_metrics(
                study_labels, study_scores, study_patients, thresholds, n_resamples, seed
            ),
        }
    report: dict[str, Any] = {
        "bundle": bundle_facts(manifest),
        "warnings": [] if manifest.trained else [UNTRAINED_REPORT_WARNING],
        "note": MURA_NOTE,
        "intervals": {
            "proportions": "Wilson score 95%",
            "auroc_kappa": f"patient-level bootstrap 95% percentile ({n_resamples} resamples, seed {seed})",
        },
        "test_set": _test_set(records, parts),
        "body_part": body_part,
        "per_part": per_part,
        "end_to_end": _end_to_end(manifest, predictions, labels, true_part, routed_part),
    }
    return report


def _study_arrays(records: Sequence[ImageRecord], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    grouped = _studies(records)
    study_labels = np.asarray([records[rows[0]].label for rows in grouped.values()], dtype=np.int64)
    study_scores = np.asarray([float(np.mean(scores[rows])) for rows in grouped.values()])
    return study_labels, study_scores, [records[rows[0]].patient for rows in grouped.values()]


def _bootstrapped(
    value: float | None, statistic: Any, groups: Sequence[str], n_resamples: int, seed: int
) -> dict[str, Any]:
    interval = metrics.bootstrap_interval(statistic, groups, n_resamples=n_resamples, seed=seed)
    return metrics.Estimate(
        value=value,
        low=None if interval is None else interval[0],
        high=None if interval is None else interval[1],
        method=f"patient bootstrap ({n_resamples} resamples)",
    ).as_dict()


def _test_set(records: Sequence[ImageRecord], parts: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part in parts:
        mine = [r for r in records if r.part == part]
        summary[part] = {
            "images": len(mine),
            "studies": len({r.study for r in mine}),
            "patients": len({r.patient for r in mine}),
            "fractured_images": sum(r.label for r in mine),
            "fractured_studies": len({r.study for r in mine if r.label == 1}),
        }
    return summary


def _end_to_end(
    manifest: Manifest, predictions: Predictions, labels: np.ndarray, true_part: np.ndarray, routed_part: np.ndarray
) -> dict[str, Any]:
    """The product's answer: routed part's specialist at its decision threshold; a wrong body part is an error."""
    parts = manifest.body_parts
    decision = np.asarray([manifest.thresholds[parts[i]].decision for i in routed_part])
    flagged = predictions.p_routed >= decision
    part_ok = routed_part == true_part
    strict = part_ok & (flagged == (labels == 1))
    images = {
        "images": len(labels),
        "router_errors": int((~part_ok).sum()),
        "accuracy": metrics.proportion(int(strict.sum()), len(labels)).as_dict(),
        "sensitivity": metrics.proportion(int((flagged & (labels == 1)).sum()), int((labels == 1).sum())).as_dict(),
        "specificity": metrics.proportion(int((~flagged & (labels == 0)).sum()), int((labels == 0).sum())).as_dict(),
    }
    # Study level: the study's part is the argmax of its images' summed router probabilities; its probability
    # the mean of its images' (true-part specialist, which is the routed one whenever the study is routed right).
    grouped = _studies(predictions.records)
    study_ok = study_flag_right = study_pos = study_neg = study_tp = study_tn = 0
    for rows in grouped.values():
        part_index = int(np.argmax(predictions.router_probs[rows].sum(axis=0)))
        label = int(labels[rows[0]])
        study_pos += label
        study_neg += 1 - label
        if part_index != true_part[rows[0]]:
            continue  # a misrouted study counts as wrong and, when fractured, as missed (conservative)
        flag = float(np.mean(predictions.p_true_part[rows])) >= manifest.thresholds[parts[part_index]].decision
        study_flag_right += int(flag == bool(label))
        study_ok += 1
        study_tp += int(flag and label == 1)
        study_tn += int(not flag and label == 0)
    studies = {
        "studies": len(grouped),
        "router_errors": len(grouped) - study_ok,
        "accuracy": metrics.proportion(study_flag_right, len(grouped)).as_dict(),
        "sensitivity": metrics.proportion(study_tp, study_pos).as_dict(),
        "specificity": metrics.proportion(study_tn, study_neg).as_dict(),
        "rule": "misrouted studies count as errors (and as missed when fractured)",
    }
    return {"image_level": images, "study_level": studies}
