"""The evaluation report as a person reads it: Markdown tables and PNG figures from `report.json`'s content."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.plots import plot_confusions, plot_roc, roc_points
from training.records import ImageRecord

UNTRAINED_REPORT_WARNING = "UNTRAINED MODEL: these figures are meaningless as results."


def bundle_facts(manifest: Any) -> dict[str, Any]:
    """What every evaluation report says about the bundle it judged (an untrained one is flagged)."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "trained": manifest.trained,
        "precision": manifest.precision,
        "graph": manifest.graph.form,
    }


@dataclass(frozen=True)
class Predictions:
    """Model outputs for the evaluated images, aligned with `records`."""

    records: list[ImageRecord]
    router_probs: np.ndarray  # (N, P) float
    p_true_part: np.ndarray  # (N,) P(fractured) from the true part's specialist
    p_routed: np.ndarray  # (N,) P(fractured) from the routed part's specialist


def write_figures(report: dict[str, Any], predictions: Predictions, out: Path) -> list[Path]:
    """body_part_confusion.png, fracture_confusion.png and roc.png (study level, with operating points)."""
    parts = report["body_part"]["labels"]
    flag = "" if report["bundle"]["trained"] else "\nUNTRAINED model: meaningless as a result"
    figures = [
        plot_confusions(
            {"router": (np.asarray(report["body_part"]["confusion_matrix"]), parts)},
            "Body part (router) on the test split" + flag,
            out / "body_part_confusion.png",
        )
    ]
    evaluated = {part: entry for part, entry in report["per_part"].items() if "study_level" in entry}
    figures.append(
        plot_confusions(
            {
                part: (np.asarray(entry["study_level"]["confusion"]["matrix"]), ["fractured", "normal"])
                for part, entry in evaluated.items()
            },
            "Fracture specialists, study level, at the decision threshold" + flag,
            out / "fracture_confusion.png",
        )
    )
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for part in evaluated:
        rows = [i for i, r in enumerate(predictions.records) if r.part == part]
        grouped: dict[str, list[int]] = {}
        for i in rows:
            grouped.setdefault(predictions.records[i].study, []).append(i)
        labels = np.asarray([predictions.records[g[0]].label for g in grouped.values()])
        scores = np.asarray([np.mean(predictions.p_true_part[g]) for g in grouped.values()])
        name = f"{part} (AUROC {format_number(report['per_part'][part]['study_level']['auroc']['value'])})"
        curves[name] = roc_points(labels, scores)
        points[name] = {}
        for label, op in report["per_part"][part]["study_level"]["operating_points"].items():
            sensitivity, specificity = op["sensitivity"]["value"], op["specificity"]["value"]
            if sensitivity is not None and specificity is not None:
                points[name][label.replace("_", "-")] = (1 - specificity, sensitivity)
    figures.append(plot_roc(curves, points, "ROC per body part, study level" + flag, out / "roc.png"))
    return figures


def format_number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_estimate(entry: dict[str, Any]) -> str:
    """'0.912 (0.85–0.95)' plus the counts for proportions."""
    text = format_number(entry.get("value"))
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" ({format_number(entry['low'])}–{format_number(entry['high'])})"
    if entry.get("denominator"):
        text += f" [{entry['numerator']}/{entry['denominator']}]"
    return text


def write_markdown(report: dict[str, Any], figures: list[Path], path: Path) -> Path:
    bundle = report["bundle"]
    lines = [
        f"# Evaluation of bundle `{bundle['name']}` {bundle['version']}",
        "",
        f"Precision {bundle['precision']}, {bundle['graph']} graph, trained: **{str(bundle['trained']).lower()}**. "
        f"Data: `{report['data']['path']}`, split: {report['data']['split']}.",
        "",
        "Research use only: these figures describe a model on one dataset, not a diagnostic device.",
        "",
    ]
    lines += [f"> **{warning}**" for warning in report["warnings"]]
    lines += [
        f"> {report['note']}",
        "",
        f"Intervals: proportions {report['intervals']['proportions']}; "
        f"AUROC and kappa {report['intervals']['auroc_kappa']}.",
        "",
        "## Test set",
        "",
        "| part | images | studies | patients | fractured images | fractured studies |",
        "|---|---|---|---|---|---|",
    ]
    for part, counts in report["test_set"].items():
        lines.append(
            f"| {part} | {counts['images']} | {counts['studies']} | {counts['patients']} | "
            f"{counts['fractured_images']} | {counts['fractured_studies']} |"
        )
    skipped = report["data"]["skipped_images"]
    lines += ["", f"Unreadable images skipped: {len(skipped)}.", "", "## Body part (router)", ""]
    body = report["body_part"]
    lines += [
        f"Accuracy {format_estimate(body['accuracy'])}; Cohen's kappa {format_estimate(body['kappa'])}.",
        "",
        "| true \\ predicted | " + " | ".join(body["labels"]) + " |",
        "|---" * (len(body["labels"]) + 1) + "|",
    ]
    for label, row in zip(body["labels"], body["confusion_matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Fracture specialists (each on its own part)", ""]
    for level in ("study_level", "image_level"):
        lines += [
            f"### {level.replace('_', ' ').capitalize()}",
            "",
            "| part | n | threshold | accuracy | sensitivity | specificity | AUROC | kappa | TP/FN/TN/FP |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for part, entry in report["per_part"].items():
            if level not in entry:
                lines.append(f"| {part} | 0 | | | | | | | |")
                continue
            m = entry[level]
            c = m["confusion"]
            lines.append(
                f"| {part} | {m['n']} | {m['threshold']:.3f} | {format_estimate(m['accuracy'])} | "
                f"{format_estimate(m['sensitivity'])} | {format_estimate(m['specificity'])} | "
                f"{format_estimate(m['auroc'])} | {format_estimate(m['kappa'])} | "
                f"{c['tp']}/{c['fn']}/{c['tn']}/{c['fp']} |"
            )
        lines += ["", "Operating points:", ""]
        for part, entry in report["per_part"].items():
            for name, op in entry.get(level, {}).get("operating_points", {}).items():
                lines.append(
                    f"- {part}, {name.replace('_', '-')} (threshold {op['threshold']:.3f}): sensitivity "
                    f"{format_estimate(op['sensitivity'])}, specificity {format_estimate(op['specificity'])}"
                )
        lines.append("")
    lines += ["## Routed pipeline, end to end (router errors included)", ""]
    for level, entry in report["end_to_end"].items():
        count = entry.get("images", entry.get("studies"))
        lines.append(
            f"- {level.replace('_', ' ')}: {count} cases, router errors {entry['router_errors']}; accuracy "
            f"{format_estimate(entry['accuracy'])}, sensitivity {format_estimate(entry['sensitivity'])}, specificity "
            f"{format_estimate(entry['specificity'])}"
        )
    lines += ["", "## Figures", ""]
    lines += [f"![{figure.stem}]({figure.name})" for figure in figures]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
