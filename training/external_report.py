"""The FracAtlas external-validation report as a person reads it: Markdown tables and PNG figures.

Figures: `roc.png` (each mapped region, image level, operating points marked) and `localisation_examples.png`
(a few fractured images with the service's heatmap overlay, the fracture boxes, the heatmap's maximum and the
image centre). Every figure of an untrained bundle says so in its title.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Rectangle

from inference.heatmap import overlay
from training import localisation
from training.evaluation_report import format_estimate, format_number
from training.fracatlas import FracAtlasImage
from training.plots import plot_roc, plt, roc_points


@dataclass(frozen=True, eq=False)  # eq on ndarray fields would raise: identity equality instead
class ExternalItem:
    """What the bundle said about one readable image."""

    image: FracAtlasImage
    width: int  # as displayed (EXIF orientation applied), the frame of the boxes
    height: int
    router_probs: np.ndarray  # (P,)
    routed_part: str
    abstained: bool
    abstention_reason: str | None
    answer_label: str  # the routed answer's fracture label ("fractured" / "normal")
    p_routed: float
    p_mapped: float | None  # P(fractured) from the mapped part's specialist; None out of scope
    cam: np.ndarray | None  # (7, 7) Grad-CAM of the mapped part's specialist, for fractured images with boxes
    localisation: localisation.Localisation | None


@dataclass(frozen=True, eq=False)
class Example:
    """One image for the localisation figure: its item and the grey image as displayed (at most 512 px)."""

    item: ExternalItem
    display: np.ndarray  # (h, w) uint8


UNTRAINED_FLAG = "\nUNTRAINED model: meaningless as a result"


def write_figures(
    report: dict[str, Any], items: Sequence[ExternalItem], examples: Sequence[Example], out: Path
) -> list[Path]:
    """roc.png when a mapped region has both labels; localisation_examples.png when there are examples."""
    flag = "" if report["bundle"]["trained"] else UNTRAINED_FLAG
    figures = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for region, entry in report["per_region"].items():
        level = entry.get("specialist")
        if not level or level["auroc"]["value"] is None:
            continue
        mine = [item for item in items if item.image.region == region]
        labels = np.asarray([item.image.label for item in mine])
        scores = np.asarray([item.p_mapped for item in mine], dtype=np.float64)
        name = f"{region} -> {entry['part']} (AUROC {format_number(level['auroc']['value'])})"
        curves[name] = roc_points(labels, scores)
        points[name] = {}
        for label, op in {"decision": level, **level["operating_points"]}.items():
            sensitivity, specificity = op["sensitivity"]["value"], op["specificity"]["value"]
            if sensitivity is not None and specificity is not None:
                points[name][label.replace("_", "-")] = (1 - specificity, sensitivity)
    if curves:
        figures.append(plot_roc(curves, points, "FracAtlas, per region, image level" + flag, out / "roc.png"))
    if examples:
        title = "Grad-CAM vs fracture boxes (FracAtlas)" + flag
        figures.append(plot_examples(examples, title, out / "localisation_examples.png"))
    return figures


def plot_examples(examples: Sequence[Example], title: str, path: Path) -> Path:
    """One panel per example: the service's overlay, the boxes (red), the map's maximum (x) and the centre (+)."""
    columns = min(3, len(examples))
    rows = -(-len(examples) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, example in zip(axes.flat, examples, strict=False):
        item, case = example.item, example.item.localisation
        assert item.cam is not None  # only located items become examples
        assert case is not None
        display = example.display
        sx, sy = display.shape[1] / item.width, display.shape[0] / item.height  # original -> drawn pixels
        axis.imshow(overlay(display, item.cam))
        for box in item.image.boxes:
            axis.add_patch(
                Rectangle(
                    (box.x_min * sx, box.y_min * sy),
                    (box.x_max - box.x_min) * sx,
                    (box.y_max - box.y_min) * sy,
                    fill=False,
                    edgecolor="red",
                    linewidth=1.5,
                )
            )
        if case.peak_x is not None and case.peak_y is not None:
            axis.plot([case.peak_x * sx], [case.peak_y * sy], marker="x", color="white", markersize=10, mew=2)
        axis.plot([item.width / 2 * sx], [item.height / 2 * sy], marker="+", color="cyan", markersize=10, mew=2)
        energy = "n/a" if case.energy_fraction is None else f"{case.energy_fraction:.2f}"
        axis.set_title(
            f"{item.image.image_id} ({item.image.region}): {'hit' if case.hit else 'miss'}\n"
            f"energy in boxes {energy}, boxes {case.box_area_fraction:.1%} of image",
            fontsize=9,
        )
    figure.suptitle(title + "\nred: fracture boxes; x: heatmap maximum; +: image centre", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _abstention_line(name: str, block: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in block["abstention_reasons"].items()) or "none"
    choice = ", ".join(f"{k} {v}" for k, v in block["router_choice"].items()) or "none"
    answered = ", ".join(f"{k} {v}" for k, v in block["router_choice_when_answered"].items()) or "none"
    return (
        f"| {name} | {block['images']} | {format_estimate(block['abstained'])} | "
        f"{format_estimate(block['answered'])} | {reasons} | {choice} | {answered} |"
    )


def write_markdown(report: dict[str, Any], figures: Sequence[Path], path: Path) -> Path:
    bundle, data, notes = report["bundle"], report["data"], report["notes"]
    lines = [
        f"# External validation of bundle `{bundle['name']}` {bundle['version']} on FracAtlas",
        "",
        f"Precision {bundle['precision']}, {bundle['graph']} graph, parts {', '.join(bundle['body_parts'])}, "
        f"trained: **{str(bundle['trained']).lower()}**. Data: `{data['path']}`.",
        "",
        "Research use only: these figures describe a model on one dataset, not a diagnostic device. FracAtlas: "
        "Abedeen et al., Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4, CC BY 4.0.",
        "",
    ]
    lines += [f"> **{warning}**" for warning in report["warnings"]]
    lines += [f"> {notes['label']}", ">", f"> {notes['regions']}", "", f"**Images.** {data['images']}", ""]
    lines += [
        f"Intervals: proportions {report['intervals']['proportions']}; AUROC and kappa "
        f"{report['intervals']['auroc_kappa']}. {notes['bootstrap']}",
        "",
        f"Listed in dataset.csv: {data['listed_in_csv']}; evaluated: {data['evaluated']}; unreadable images "
        f"skipped: {len(data['skipped_images'])}; mixed films left out: {data['mixed_left_out']['images']}"
        + (" (kept: --keep-mixed)" if data["mixed_kept"] else "")
        + f"; dataset problems: {len(data['problems'])}.",
        "",
        "Region map (FracAtlas region -> bundle part): "
        + (", ".join(f"{r} -> {p}" for r, p in report["region_map"].items()) or "none")
        + f"; out of scope: {', '.join(report['out_of_scope']['regions']) or 'none'}.",
        "",
        "## Fracture specialists on their mapped regions (part named, image level)",
        "",
        "| region -> part | n | fractured | threshold | accuracy | sensitivity | specificity | AUROC | kappa | "
        "TP/FN/TN/FP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    operating: list[str] = []
    for region, entry in report["per_region"].items():
        level = entry.get("specialist")
        if level is None:
            lines.append(f"| {region} -> {entry['part']} | 0 | | | | | | | | |")
            continue
        c = level["confusion"]
        lines.append(
            f"| {region} -> {entry['part']} | {level['n']} | {entry['fractured']} | {level['threshold']:.3f} | "
            f"{format_estimate(level['accuracy'])} | {format_estimate(level['sensitivity'])} | "
            f"{format_estimate(level['specificity'])} | {format_estimate(level['auroc'])} | "
            f"{format_estimate(level['kappa'])} | {c['tp']}/{c['fn']}/{c['tn']}/{c['fp']} |"
        )
        for name, op in level["operating_points"].items():
            operating.append(
                f"- {region}, {name.replace('_', '-')} (threshold {op['threshold']:.3f}): sensitivity "
                f"{format_estimate(op['sensitivity'])}, specificity {format_estimate(op['specificity'])}"
            )
    lines += ["", "Operating points:", "", *(operating or ["- none in this bundle's manifest"]), ""]
    lines += ["### What the routed service answered on these regions", ""]
    for region, entry in report["per_region"].items():
        if "routing" not in entry:
            continue
        routing, e2e = entry["routing"], entry["end_to_end"]
        lines.append(
            f"- {region}: routed to {entry['part']} {format_estimate(routing['routed_to_part'])}; abstained "
            f"{format_estimate(routing['abstained'])}; of {e2e['answered']} answers {e2e['answered_by_another_part']} "
            f"came from another part's specialist; sensitivity {format_estimate(e2e['sensitivity'])}, specificity "
            f"{format_estimate(e2e['specificity'])}"
        )
    out = report["out_of_scope"]
    lines += [
        "",
        "## Out of scope: regions the bundle does not cover",
        "",
        "The service should abstain here; every answer is a failure of abstention.",
        "",
        "| region | images | abstained | answered (failure) | abstention reasons | router chose | ... when answered |",
        "|---|---|---|---|---|---|---|",
        _abstention_line("all out of scope", out),
        *(_abstention_line(region, block) for region, block in out["per_region"].items()),
    ]
    if "mixed" in report:
        lines += [
            "",
            f"Mixed films ({report['mixed']['note']}):",
            "",
            "| | images | abstained | answered | reasons | router chose | ... when answered |",
            "|---|---|---|---|---|---|---|",
            _abstention_line("mixed", report["mixed"]),
        ]
    loc = report["localisation"]
    lines += [
        "",
        "## Localisation: does the heatmap point at the fracture?",
        "",
        f"Method: {loc['method']}. Baselines: {loc['baselines']}. Fractured images in mapped regions without "
        f"boxes (not scored): {loc['fractured_without_boxes']}.",
        "",
        "| region | images | pointing game | centre baseline | random pointer | energy in boxes | "
        "centre baseline energy | flat maps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in [("all mapped", loc["overall"]), *loc["per_region"].items()]:
        lines.append(
            f"| {name} | {summary['images']} | {format_estimate(summary['pointing_game'])} | "
            f"{format_estimate(summary['centre_baseline_pointing_game'])} | "
            f"{format_number(summary['random_pointer_expected_hit_rate'])} | "
            f"{format_estimate(summary['energy_fraction'])} | "
            f"{format_estimate(summary['centre_baseline_energy_fraction'])} | {summary['flat_heatmaps']} |"
        )
    if data["problems"]:
        lines += ["", "## Dataset problems", "", *(f"- {problem}" for problem in data["problems"][:50])]
        if len(data["problems"]) > 50:
            lines.append(f"- ... and {len(data['problems']) - 50} more (report.json lists them all)")
    lines += ["", "## Figures", "", *(f"![{figure.stem}]({figure.name})" for figure in figures)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
