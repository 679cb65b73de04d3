"""`bfd evaluate` on a tiny ONNX bundle whose answers are known, checked against scikit-learn.

The tiny bundle's router sends a constant image to the part whose centre intensity is nearest, and its
specialists answer P(fractured) = mean intensity / 255 (see tests/factories.py). So every expected metric
can be computed independently from the images' pixel values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import build_tiny_bundle, encode_png, expected_body_part_probs, expected_m, image_for_part

from bfd.cli import main
from training.dataset import read_dataset
from training.splits import write_split_file

sklearn_metrics = pytest.importorskip("sklearn.metrics")

PARTS = ["elbow", "hand", "shoulder"]
# (part, patient, study, label, [(routed part index, brightness shift) per image]); shift > 0 raises P(fractured)
STUDIES = [
    ("elbow", "patient00001", "study1", 1, [(0, 6), (0, 9)]),
    ("elbow", "patient00002", "study1", 0, [(0, -5)]),
    ("elbow", "patient00003", "study1", 1, [(0, 2)]),
    ("elbow", "patient00003", "study2", 0, [(0, -8), (0, 3)]),
    ("elbow", "patient00004", "study1", 0, [(0, 1)]),
    ("elbow", "patient00005", "study1", 1, [(0, -2)]),  # a missed fracture at the decision threshold
    ("hand", "patient00006", "study1", 1, [(1, 7), (2, 4)]),  # second view misrouted to shoulder
    ("hand", "patient00007", "study1", 0, [(1, -6)]),
    ("hand", "patient00008", "study1", 0, [(1, -1), (1, 2)]),
    ("hand", "patient00009", "study1", 1, [(1, 5)]),
    ("shoulder", "patient00010", "study1", 1, [(2, 3)]),
    ("shoulder", "patient00011", "study1", 0, [(2, -4)]),
    ("shoulder", "patient00012", "study1", 0, [(0, -3)]),  # whole study misrouted to elbow
    ("shoulder", "patient00013", "study1", 1, [(2, 8), (2, 1)]),
]


def _centre(index: int) -> float:
    return (index + 0.5) / len(PARTS)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "Dataset"
    expected = []
    for part, patient, study, label, images in STUDIES:
        folder = data / part.capitalize() / patient / f"{study}_{'positive' if label else 'negative'}"
        folder.mkdir(parents=True)
        for number, (routed, shift) in enumerate(images, start=1):
            image = image_for_part(routed, len(PARTS), shift)
            (folder / f"image{number}.png").write_bytes(encode_png(image))
            expected.append(
                {
                    "relative_path": f"{part.capitalize()}/{patient}/{folder.name}/image{number}.png",
                    "part": PARTS.index(part),
                    "study": f"{part}/{patient}/{study}",
                    "patient": patient,
                    "label": label,
                    "p": expected_m(image),
                    "router": expected_body_part_probs(image, len(PARTS)),
                }
            )
    (data / "Elbow" / "patient00002" / "study1_negative" / "image2.png").write_bytes(b"broken")
    # decision = the part's centre; the high-specificity point a little above it
    thresholds = {
        p: {"decision": _centre(i), "high_sensitivity": _centre(i), "high_specificity": _centre(i) + 0.02}
        for i, p in enumerate(PARTS)
    }
    bundle = build_tiny_bundle(root / "bundle", thresholds=thresholds)
    dataset = read_dataset(data)
    split_file = root / "split.csv"
    write_split_file(split_file, dataset.records, ["test"] * len(dataset.records))
    out = root / "report"
    args = [
        "evaluate",
        "--data",
        str(data),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--split-file",
        str(split_file),
    ]
    assert main([*args, "--bootstrap", "200", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "expected": expected, "thresholds": thresholds, "out": out}


def test_unreadable_image_is_skipped_and_listed(evaluated: dict) -> None:
    report = evaluated["report"]
    assert list(report["data"]["skipped_images"]) == ["Elbow/patient00002/study1_negative/image2.png"]
    assert report["body_part"]["images"] == len(evaluated["expected"])


def test_body_part_accuracy_and_confusion_match_sklearn(evaluated: dict) -> None:
    rows = evaluated["expected"]
    truth = [r["part"] for r in rows]
    routed = [int(np.argmax(r["router"])) for r in rows]
    body = evaluated["report"]["body_part"]
    assert body["confusion_matrix"] == sklearn_metrics.confusion_matrix(truth, routed, labels=[0, 1, 2]).tolist()
    assert body["accuracy"]["value"] == pytest.approx(sklearn_metrics.accuracy_score(truth, routed))
    assert body["kappa"]["value"] == pytest.approx(sklearn_metrics.cohen_kappa_score(truth, routed))


@pytest.mark.parametrize("part", PARTS)
def test_specialist_metrics_match_sklearn_at_image_and_study_level(evaluated: dict, part: str) -> None:
    index = PARTS.index(part)
    rows = [r for r in evaluated["expected"] if r["part"] == index]
    studies: dict[str, list[dict]] = {}
    for row in rows:
        studies.setdefault(row["study"], []).append(row)
    levels = {
        "image_level": ([r["label"] for r in rows], [r["p"] for r in rows]),
        "study_level": (
            [members[0]["label"] for members in studies.values()],
            [float(np.mean([m["p"] for m in members])) for members in studies.values()],  # MURA: mean of images
        ),
    }
    decision = evaluated["thresholds"][part]["decision"]
    for level, (labels, scores) in levels.items():
        entry = evaluated["report"]["per_part"][part][level]
        predicted = [int(s >= decision) for s in scores]
        assert entry["n"] == len(labels)
        assert entry["auroc"]["value"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
        assert entry["sensitivity"]["value"] == pytest.approx(sklearn_metrics.recall_score(labels, predicted))
        assert entry["specificity"]["value"] == pytest.approx(
            sklearn_metrics.recall_score(labels, predicted, pos_label=0)
        )
        assert entry["accuracy"]["value"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
        kappa = entry["kappa"]["value"]
        assert kappa == pytest.approx(sklearn_metrics.cohen_kappa_score(labels, predicted))
        strict = evaluated["thresholds"][part]["high_specificity"]
        specific = [int(s >= strict) for s in scores]
        point = entry["operating_points"]["high_specificity"]
        assert point["specificity"]["value"] == pytest.approx(
            sklearn_metrics.recall_score(labels, specific, pos_label=0)
        )


def test_end_to_end_counts_router_errors_as_errors(evaluated: dict) -> None:
    rows = evaluated["expected"]
    thresholds = evaluated["thresholds"]
    correct = errors = 0
    for row in rows:
        routed = int(np.argmax(row["router"]))
        # the tiny specialists all answer m, whichever part they serve
        flagged = row["p"] >= thresholds[PARTS[routed]]["decision"]
        errors += routed != row["part"]
        correct += routed == row["part"] and flagged == bool(row["label"])
    images = evaluated["report"]["end_to_end"]["image_level"]
    assert images["router_errors"] == errors == 2
    assert images["accuracy"]["numerator"] == correct
    by_study: dict[str, list[dict]] = {}
    for row in rows:
        by_study.setdefault(row["study"], []).append(row)
    # a study's part is the argmax of its images' summed router probabilities
    misrouted = sum(
        int(np.argmax(sum(r["router"] for r in members))) != members[0]["part"] for members in by_study.values()
    )
    studies = evaluated["report"]["end_to_end"]["study_level"]
    assert studies["router_errors"] == misrouted >= 1
    assert studies["studies"] == len(STUDIES)


def test_report_files_are_written(evaluated: dict) -> None:
    out: Path = evaluated["out"]
    markdown = (out / "report.md").read_text()
    assert "UNTRAINED" in markdown
    assert "abnormal" in markdown
    for name in ("report.json", "body_part_confusion.png", "fracture_confusion.png", "roc.png"):
        assert (out / name).stat().st_size > 0


def test_evaluate_refuses_a_missing_bundle_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "Dataset" / "Elbow" / "patient00001" / "study1_positive"
    data.mkdir(parents=True)
    (data / "image1.png").write_bytes(encode_png(image_for_part(0)))
    args = ["evaluate", "--data", str(tmp_path / "Dataset"), "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path)]
    assert main(args) == 2
