"""`bfd evaluate --data <FracAtlas>`: external validation of a bundle, run for real on tiny ONNX bundles.

The tiny bundles (tests/factories.py) answer from each image's mean intensity m and their feature map is the
image's brightness per 32x32 cell, so every figure of the report can be predicted from the prepared pixels:
the router's probabilities (hence abstention and routing), P(fractured) = m + the part's offset, and, with
heads whose gradient is positive everywhere, a Grad-CAM that peaks at the brightest cell. The expectations
below are computed that way, independently of training.external, and the metrics checked against scikit-learn.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from factories import (
    build_tiny_bundle,
    expected_body_part_probs,
    expected_m,
    read_manifest_json,
    replace_file,
    write_manifest_json,
)
from fracatlas_data import SUBSET, Synthetic, cell_centre, copy_subset, patch_image, write_fracatlas
from PIL import Image
from sklearn import metrics as sklearn_metrics

from bfd.cli import main
from inference.preprocessing import ImageError, prepare_image_file
from training.fracatlas import MIXED, read_fracatlas
from training.localisation import energy_fraction

PARTS = ("elbow", "hand", "leg", "shoulder")  # sorted, as a manifest requires
OFFSETS = {"elbow": 0.0, "hand": 0.05, "leg": -0.02, "shoulder": 0.1}
MIN_ROUTER_PROBABILITY = 0.8  # put in the manifest: the evaluation must use the bundle's own policy
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def positive_heads(parts: tuple[str, ...]) -> bytes:
    """heads.npz whose 'fractured' score grows with every pooled feature: Grad-CAM is then the brightness map."""
    arrays: dict[str, Any] = {}
    for key, classes in [("router", len(parts)), *((f"specialist/{p}", 2) for p in parts)]:
        last = np.zeros((50, classes), dtype=np.float32)
        last[:, 0] = 1.0
        layers = [np.full((2048, 128), 1 / 2048, np.float32), np.full((128, 50), 1 / 128, np.float32), last]
        for index, kernel in enumerate(layers):
            arrays[f"{key}/{index}/kernel"] = kernel
            arrays[f"{key}/{index}/bias"] = np.zeros(kernel.shape[1], dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def tiny_bundle(root: Path, parts: tuple[str, ...], thresholds: dict[str, Any], form: str = "fused") -> Path:
    bundle = build_tiny_bundle(
        root,
        form=form,  # type: ignore[arg-type]
        parts=parts,
        thresholds=thresholds,
        specialist_offsets={p: OFFSETS[p] for p in parts},
    )
    replace_file(bundle, "heads.npz", positive_heads(parts))
    manifest = read_manifest_json(bundle)
    manifest["abstention"] = {"min_router_probability": MIN_ROUTER_PROBABILITY, "max_colourfulness": None}
    write_manifest_json(bundle, manifest)
    return bundle


def expectations(root: Path, parts: tuple[str, ...], keep_mixed: bool = False) -> list[dict[str, Any]]:
    """What the tiny bundle must say about each image, from its prepared pixels alone."""
    rows = []
    for image in read_fracatlas(root, keep_mixed=keep_mixed).images:
        try:
            prepared = prepare_image_file(image.path)
        except ImageError:
            continue  # the service refuses it: the evaluation must skip and count it (see unreadable)
        m = expected_m(prepared.pixels)
        probs = expected_body_part_probs(prepared.pixels, len(parts))
        cells = prepared.pixels[..., 0].astype(np.float64).reshape(7, 32, 7, 32).mean(axis=(1, 3))
        row, column = np.unravel_index(int(np.argmax(cells)), cells.shape)
        width, height = prepared.original_width, prepared.original_height
        peak = ((column + 0.5) * width / 7, (row + 0.5) * height / 7)
        routed = parts[int(np.argmax(probs))]
        rows.append(
            {
                "image": image,
                "m": m,
                "routed": routed,
                "p_routed": float(np.clip(m + OFFSETS[routed], 0, 1)),
                "abstained": float(probs.max()) < MIN_ROUTER_PROBABILITY,
                "cells": cells,
                "peak": peak,
                "hit": any(b.contains(*peak) for b in image.boxes),
                "width": width,
                "height": height,
            }
        )
    return rows


def unreadable(root: Path) -> dict[str, str]:
    """Relative path -> reason, for the images the service's preprocessing refuses (the subset holds one)."""
    refused = {}
    for image in read_fracatlas(root, keep_mixed=True).images:
        try:
            prepare_image_file(image.path)
        except ImageError as error:
            refused[image.relative_path] = error.reason
    return refused


def p_under(row: dict[str, Any], part: str) -> float:
    return float(np.clip(row["m"] + OFFSETS[part], 0, 1))


def midpoint_thresholds(rows: list[dict[str, Any]], region_parts: dict[str, str]) -> dict[str, Any]:
    """Per part: decision between the middle scores, high-specificity between the upper-quartile ones (never a
    score itself, so float32 vs float64 cannot flip a comparison)."""
    thresholds = {}
    for region, part in region_parts.items():
        scores = sorted(p_under(r, part) for r in rows if r["image"].region == region)
        middle, upper = len(scores) // 2, (3 * len(scores)) // 4
        decision = (scores[middle - 1] + scores[middle]) / 2
        strict = (scores[upper - 1] + scores[upper]) / 2
        thresholds[part] = {"decision": decision, "high_sensitivity": decision, "high_specificity": strict}
    return thresholds


def evaluate(data: Path, bundle: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ["evaluate", "--data", str(data), "--bundle", str(bundle), "--out", str(out), "--no-progress"]
    assert main([*args, "--bootstrap", "200", *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("external")
    rows = expectations(SUBSET, PARTS)
    mapped = {"hand": "hand", "leg": "leg", "shoulder": "shoulder"}  # the default table, for these parts
    thresholds = midpoint_thresholds(rows, mapped)
    bundle = tiny_bundle(root / "bundle", PARTS, thresholds)
    report = evaluate(SUBSET, bundle, root / "report")
    return {"report": report, "rows": rows, "thresholds": thresholds, "bundle": bundle, "out": root / "report"}


def _rows(evaluated: dict[str, Any], region: str) -> list[dict[str, Any]]:
    return [r for r in evaluated["rows"] if r["image"].region == region]


@pytest.mark.parametrize("region", ["hand", "leg", "shoulder"])
def test_each_mapped_region_is_scored_like_sklearn(evaluated: dict[str, Any], region: str) -> None:
    report = evaluated["report"]
    assert report["region_map"] == {"hand": "hand", "leg": "leg", "shoulder": "shoulder"}
    entry = report["per_region"][region]
    level = entry["specialist"]
    rows = _rows(evaluated, region)
    labels = [r["image"].label for r in rows]
    scores = [p_under(r, region) for r in rows]  # the region's own specialist, offset included
    points = evaluated["thresholds"][region]
    predicted = [int(s >= points["decision"]) for s in scores]
    assert 0 < sum(labels) < len(labels)
    assert 0 < sum(predicted) < len(predicted)
    assert level["n"] == entry["images"] == len(rows)
    assert entry["fractured"] == sum(labels)
    assert level["sensitivity"]["value"] == pytest.approx(sklearn_metrics.recall_score(labels, predicted))
    assert level["specificity"]["value"] == pytest.approx(sklearn_metrics.recall_score(labels, predicted, pos_label=0))
    assert level["accuracy"]["value"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    assert level["auroc"]["value"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert level["kappa"]["value"] == pytest.approx(sklearn_metrics.cohen_kappa_score(labels, predicted))
    for name in ("sensitivity", "specificity", "accuracy"):
        assert level[name]["method"] == "wilson"
        assert level[name]["low"] <= level[name]["value"] <= level[name]["high"]
    for name in ("auroc", "kappa"):
        assert level[name]["method"] == "image bootstrap (200 resamples)"
    strict = [int(s >= points["high_specificity"]) for s in scores]
    operating = level["operating_points"]["high_specificity"]
    assert operating["specificity"]["value"] == pytest.approx(sklearn_metrics.recall_score(labels, strict, pos_label=0))
    assert operating["sensitivity"]["value"] == pytest.approx(sklearn_metrics.recall_score(labels, strict))
    assert "high_sensitivity" in level["operating_points"]


@pytest.mark.parametrize("region", ["hand", "leg", "shoulder"])
def test_routing_and_abstention_on_in_scope_regions(evaluated: dict[str, Any], region: str) -> None:
    entry = evaluated["report"]["per_region"][region]
    rows = _rows(evaluated, region)
    assert entry["routing"]["routed_to_part"]["numerator"] == sum(r["routed"] == region for r in rows)
    assert entry["routing"]["abstained"]["numerator"] == sum(r["abstained"] for r in rows)
    assert entry["routing"]["router_choice"] == dict(sorted(Counter(r["routed"] for r in rows).items()))
    answered = [r for r in evaluated["rows"] if r["image"].region == region and not r["abstained"]]
    thresholds = {p: evaluated["thresholds"].get(p, {"decision": 0.5})["decision"] for p in PARTS}
    flagged = [r["p_routed"] >= thresholds[r["routed"]] for r in answered]
    end = entry["end_to_end"]
    assert end["answered"] == len(answered)
    assert end["answered_by_another_part"] == sum(r["routed"] != region for r in answered)
    assert end["sensitivity"]["numerator"] == sum(f for f, r in zip(flagged, answered, strict=True) if r["image"].label)
    assert end["sensitivity"]["denominator"] == sum(r["image"].label for r in answered)


def test_out_of_scope_rate_counts_abstentions_and_answers(evaluated: dict[str, Any]) -> None:
    out = evaluated["report"]["out_of_scope"]
    rows = _rows(evaluated, "hip")  # the only region these parts do not cover
    abstained = sum(r["abstained"] for r in rows)
    assert 0 < abstained < len(rows), "the fixture must hold both outcomes to test anything"
    assert out["regions"] == ["hip"]
    assert out["images"] == len(rows)
    assert out["abstained"]["numerator"] == abstained
    assert out["answered"]["numerator"] == len(rows) - abstained
    assert out["abstained"]["value"] == pytest.approx(abstained / len(rows))
    assert out["abstention_reasons"] == {"router unsure of the body part": abstained}
    assert out["router_choice"] == dict(sorted(Counter(r["routed"] for r in rows).items()))
    answered = Counter(r["routed"] for r in rows if not r["abstained"])
    assert out["router_choice_when_answered"] == dict(sorted(answered.items()))
    assert out["per_region"]["hip"]["images"] == len(rows)


def test_localisation_on_the_real_subset(evaluated: dict[str, Any]) -> None:
    located = [r for r in evaluated["rows"] if r["image"].region in ("hand", "leg", "shoulder") and r["image"].boxes]
    report = evaluated["report"]["localisation"]
    cases = {case["image_id"]: case for case in report["images"]}
    assert set(cases) == {r["image"].image_id for r in located}
    areas = []
    for row in located:
        case = cases[row["image"].image_id]
        assert (case["width"], case["height"]) == (row["width"], row["height"])
        assert (case["peak_x"], case["peak_y"]) == pytest.approx(row["peak"])
        assert case["hit"] == row["hit"]
        assert case["energy_fraction"] == pytest.approx(
            energy_fraction(row["cells"], row["image"].boxes, row["width"], row["height"]), abs=1e-6
        )
        boxes = row["image"].boxes
        areas.append(sum(b.area for b in boxes) / (row["width"] * row["height"]))  # the subset's boxes never overlap
    overall = report["overall"]
    assert overall["images"] == len(located)
    assert overall["pointing_game"]["numerator"] == sum(r["hit"] for r in located)
    assert overall["random_pointer_expected_hit_rate"] == pytest.approx(np.mean(areas))
    assert overall["flat_heatmaps"] == 0
    assert report["per_region"]["leg"]["images"] == sum(r["image"].region == "leg" for r in located)


def test_report_says_what_the_figures_mean(evaluated: dict[str, Any]) -> None:
    report, out = evaluated["report"], evaluated["out"]
    assert report["kind"] == "external_validation_fracatlas"
    assert report["bundle"]["trained"] is False
    assert report["warnings"]
    assert report["data"]["evaluated"] == len(evaluated["rows"])
    assert report["data"]["mixed_left_out"]["images"] == 4
    truncated = unreadable(SUBSET)
    assert truncated, "the subset keeps one of FracAtlas's truncated JPEGs"
    assert report["data"]["skipped_images"] == truncated
    assert all("truncated" in reason for reason in truncated.values())
    markdown = (out / "report.md").read_text()
    for phrase in ("UNTRAINED", "'fracture'", "'abnormal'", "coarse", "not a split", "resample images", "CC BY 4.0"):
        assert phrase in markdown, phrase
    for figure in ("roc.png", "localisation_examples.png"):
        assert (out / figure).read_bytes().startswith(PNG_SIGNATURE)
        assert figure in markdown


def test_the_region_map_flag_replaces_the_table(evaluated: dict[str, Any], tmp_path: Path) -> None:
    report = evaluate(SUBSET, evaluated["bundle"], tmp_path / "r", "--region-map", "hand=hand", "shoulder=shoulder")
    assert report["region_map"] == {"hand": "hand", "shoulder": "shoulder"}
    assert sorted(report["per_region"]) == ["hand", "shoulder"]
    out = report["out_of_scope"]
    assert out["regions"] == ["leg", "hip"]
    rows = [r for r in evaluated["rows"] if r["image"].region in ("leg", "hip")]
    assert out["images"] == len(rows)
    assert out["abstained"]["numerator"] == sum(r["abstained"] for r in rows)
    assert sorted(out["per_region"]) == ["hip", "leg"]
    assert {case["image_id"] for case in report["localisation"]["images"]} == {
        r["image"].image_id for r in evaluated["rows"] if r["image"].region in ("hand", "shoulder") and r["image"].boxes
    }
    # a region mapped to another part is scored with that part's specialist
    crossed = evaluate(SUBSET, evaluated["bundle"], tmp_path / "x", "--region-map", "leg=hand")
    scores = [p_under(r, "hand") for r in _rows(evaluated, "leg")]
    labels = [r["image"].label for r in _rows(evaluated, "leg")]
    assert crossed["per_region"]["leg"]["specialist"]["auroc"]["value"] == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, scores)
    )


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["hand=wrist"], "does not have"),
        (["foot=hand"], "not a FracAtlas region"),
        (["hand"], "REGION=PART"),
        (["hand=hand", "hand=shoulder"], "mapped twice"),
    ],
)
def test_bad_region_maps_are_refused(
    evaluated: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, pairs: list[str], message: str
) -> None:
    args = ["evaluate", "--data", str(SUBSET), "--bundle", str(evaluated["bundle"]), "--out", str(tmp_path / "r")]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--no-progress", "--region-map", *pairs]) == 2
    assert message in caplog.text
    assert not (tmp_path / "r" / "report.json").exists()


def test_an_unreadable_image_is_skipped_and_counted(evaluated: dict[str, Any], tmp_path: Path) -> None:
    data = copy_subset(tmp_path / "FracAtlas")
    broken = next(r["image"] for r in evaluated["rows"] if r["image"].region == "hip")
    (data / broken.relative_path).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    report = evaluate(data, evaluated["bundle"], tmp_path / "r")
    assert set(report["data"]["skipped_images"]) == {broken.relative_path, *unreadable(SUBSET)}
    assert report["data"]["evaluated"] == len(evaluated["rows"]) - 1
    assert report["out_of_scope"]["images"] == len(_rows(evaluated, "hip")) - 1


def test_mixed_films_can_be_kept_and_are_reported_apart(evaluated: dict[str, Any], tmp_path: Path) -> None:
    report = evaluate(SUBSET, evaluated["bundle"], tmp_path / "r", "--keep-mixed")
    rows = [r for r in expectations(SUBSET, PARTS, keep_mixed=True) if r["image"].region == MIXED]
    assert report["data"]["mixed_left_out"]["images"] == 0
    assert report["mixed"]["images"] == len(rows) == 4
    assert report["mixed"]["abstained"]["numerator"] == sum(r["abstained"] for r in rows)
    assert report["mixed"]["router_choice"] == dict(sorted(Counter(r["routed"] for r in rows).items()))
    # neither scored in scope nor counted out of scope
    assert report["out_of_scope"]["images"] == len(_rows(evaluated, "hip"))
    assert report["per_region"]["hand"]["images"] == len(_rows(evaluated, "hand"))


def test_a_split_file_restricts_the_evaluation_to_its_test_split(evaluated: dict[str, Any], tmp_path: Path) -> None:
    from training.fracatlas import as_records
    from training.splits import assign_splits, write_split_file

    records = as_records(read_fracatlas(SUBSET).images)
    splits = assign_splits(records, seed=0)
    write_split_file(tmp_path / "split.csv", records, splits)
    report = evaluate(SUBSET, evaluated["bundle"], tmp_path / "r", "--split-file", str(tmp_path / "split.csv"))
    assert report["data"]["evaluated"] == splits.count("test")
    assert "test split" in report["data"]["images"]
    assert "by image" in report["data"]["images"]


# --- known answers: synthetic films with a bright patch where the heatmap must peak -----------------------------


def _synthetic(root: Path) -> tuple[Path, dict[str, bool]]:
    """Fractured films whose bright cell is (or is not) inside the box, through a stretch and EXIF rotations."""
    portrait = patch_image(300, 600, (5, 1))
    landscape = patch_image(600, 300, (2, 4))  # as displayed; stored on its side with EXIF orientation 6
    square = patch_image(400, 400, (0, 6))  # as displayed; stored upside down with EXIF orientation 3

    def box(width: int, height: int, cell: tuple[int, int]) -> tuple[float, float, float, float]:
        x, y = cell_centre(width, height, cell)
        return (x - 10, y - 10, x + 10, y + 10)

    images = [
        Synthetic("IMG0000001", portrait, ("hand",), True, [box(300, 600, (5, 1))]),
        Synthetic("IMG0000002", portrait, ("hand",), True, [box(300, 600, (1, 5))]),
        Synthetic("IMG0000003", landscape, ("shoulder",), True, [box(600, 300, (2, 4))], orientation=6),
        Synthetic("IMG0000004", square, ("hand",), True, [box(400, 400, (0, 6))], orientation=3),
        Synthetic("IMG0000005", square, ("hand",), True, [box(400, 400, (6, 0))], orientation=3),
        Synthetic("IMG0000006", portrait, ("hand",)),
        Synthetic("IMG0000007", landscape, ("shoulder",)),
        Synthetic("IMG0000008", portrait, ("leg",), True, [box(300, 600, (5, 1))]),  # out of scope: not located
    ]
    hits = {"IMG0000001": True, "IMG0000002": False, "IMG0000003": True, "IMG0000004": True, "IMG0000005": False}
    return write_fracatlas(root, images), hits


@pytest.mark.parametrize("form", ["fused", "split"])
def test_pointing_game_on_known_answers_through_the_pipeline(tmp_path: Path, form: str) -> None:
    data, hits = _synthetic(tmp_path / "FracAtlas")
    with Image.open(data / "images" / "Fractured" / "IMG0000003.jpg") as stored:
        assert stored.size == (300, 600)  # on its side: only EXIF orientation makes it 600 x 300
    parts = ("elbow", "hand", "shoulder")
    bundle = tiny_bundle(tmp_path / "bundle", parts, {}, form=form)
    report = evaluate(data, bundle, tmp_path / "r")
    cases = {case["image_id"]: case for case in report["localisation"]["images"]}
    assert {name: case["hit"] for name, case in cases.items()} == hits
    assert (cases["IMG0000003"]["width"], cases["IMG0000003"]["height"]) == (600, 300)
    assert (cases["IMG0000003"]["peak_x"], cases["IMG0000003"]["peak_y"]) == pytest.approx(
        cell_centre(600, 300, (2, 4))
    )
    overall = report["localisation"]["overall"]
    assert overall["pointing_game"]["numerator"] == sum(hits.values())
    assert overall["pointing_game"]["denominator"] == len(hits)
    assert overall["centre_baseline_pointing_game"]["numerator"] == 0  # no box holds its image's centre
    assert overall["random_pointer_expected_hit_rate"] == pytest.approx(
        np.mean([400 / (300 * 600)] * 2 + [400 / (600 * 300)] + [400 / (400 * 400)] * 2)
    )
    for name in ("IMG0000001", "IMG0000003", "IMG0000004"):  # most of the map is on the bright cell, inside the box
        assert cases[name]["energy_fraction"] > cases[name]["centre_energy_fraction"]
    assert report["out_of_scope"]["images"] == 1
    assert (tmp_path / "r" / "localisation_examples.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_bundle_without_any_covered_region_still_reports_abstention(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "bundle", ("elbow",), {})
    data = copy_subset(tmp_path / "FracAtlas")
    shutil.rmtree(data / "Annotations" / "COCO JSON")  # VOC alone is enough
    report = evaluate(data, bundle, tmp_path / "r")
    assert report["region_map"] == {}
    assert report["per_region"] == {}
    assert report["out_of_scope"]["regions"] == ["hand", "leg", "hip", "shoulder"]
    assert report["out_of_scope"]["images"] == report["data"]["evaluated"]
    assert report["localisation"]["overall"]["images"] == 0


def test_external_validation_loads_no_tensorflow() -> None:
    """`bfd evaluate` runs where the service runs, without TensorFlow: so does its FracAtlas path."""
    modules = ("training.external", "training.external_report", "training.fracatlas", "training.localisation")
    script = f"import sys\nfor name in {modules!r}: __import__(name)\n"
    script += "print(sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
