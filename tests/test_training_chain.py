"""The whole training chain on synthetic MURA-layout data with a random backbone (weights=None), as CI runs it.

read -> patient-level split -> cached features -> router + specialists -> export -> evaluate on the ONNX
bundle; then a second training run that must take every feature from the cache.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from bfd.cli import main  # noqa: E402
from inference.bundle import load_bundle  # noqa: E402
from training.synthetic import make_synthetic  # noqa: E402

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    data = make_synthetic(root / "data", patients_per_part=14, seed=3)
    # One corrupt file, listed in MURA's CSV like any other image: it must be skipped and counted, not crash.
    study = next((data / "MURA-v1.1" / "train" / "XR_HAND").glob("patient*/study*"))
    corrupt = study / "image99.png"
    corrupt.write_bytes(PNG_SIGNATURE + b"truncated")
    with (data / "MURA-v1.1" / "train_image_paths.csv").open("a", encoding="utf-8") as handle:
        handle.write(corrupt.relative_to(data).as_posix() + "\n")
    cache = root / "cache"
    first = root / "run1"
    common = ["--data", str(data), "--weights", "none", "--cache-dir", str(cache), "--no-progress"]
    assert main(["train", *common, "--out", str(first)]) == 0
    second = root / "run2"
    assert main(["train", *common, "--out", str(second)]) == 0
    bundle = root / "bundle"
    assert main(["export", "--keras-dir", str(first), "--out", str(bundle)]) == 0
    report = root / "report"
    evaluate = ["evaluate", "--data", str(data), "--bundle", str(bundle), "--out", str(report), "--no-progress"]
    assert main([*evaluate, "--split-file", str(first / "split.csv"), "--bootstrap", "200"]) == 0
    return {"data": data, "run1": first, "run2": second, "bundle": bundle, "report": report, "corrupt": corrupt}


def _split_rows(run: Path) -> list[dict[str, str]]:
    with (run / "split.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_split_is_by_patient_and_covers_every_part_label_and_split(chain: dict[str, Path]) -> None:
    rows = _split_rows(chain["run1"])
    splits_of_patient: dict[str, set[str]] = {}
    for row in rows:
        splits_of_patient.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_patient.values()), "a patient's images in two splits"
    counts = json.loads((chain["run1"] / "split_counts.json").read_text())
    assert sorted(counts) == ["elbow", "hand", "shoulder"]
    for part, by_label in counts.items():
        for label in ("fractured", "normal"):
            for split in ("train", "val", "test"):
                assert by_label[label][split] > 0, (part, label, split)
    assert sum(v for labels in counts.values() for splits in labels.values() for v in splits.values()) == len(rows)


def test_training_writes_what_export_takes(chain: dict[str, Path]) -> None:
    run = chain["run1"]
    for name in ("router", "specialist_elbow", "specialist_hand", "specialist_shoulder"):
        assert (run / f"{name}.keras").is_file()
        assert (run / f"curves_{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    history = json.loads((run / "history.json").read_text())
    for entry in history.values():
        assert 1 <= entry["epochs_run"] <= 25
        assert 1 <= entry["best_epoch"] <= entry["epochs_run"]
        # early stopping restores the best epoch: at most `patience` epochs after it were run
        assert entry["epochs_run"] - entry["best_epoch"] <= 3 or entry["epochs_run"] == 25
    info = json.loads((run / "models.json").read_text())
    assert info["trained"] is False  # random backbone on synthetic data: never a result
    assert info["body_parts"] == ["elbow", "hand", "shoulder"]
    for points in info["thresholds"].values():
        assert points["decision"] == points["high_sensitivity"]
        assert 0.0 <= points["high_sensitivity"] <= 1.0
        assert points["high_specificity"] is not None


def test_unreadable_image_is_skipped_and_counted(chain: dict[str, Path]) -> None:
    summary = json.loads((chain["run1"] / "train_summary.json").read_text())
    skipped = json.loads((chain["run1"] / "skipped.json").read_text())
    assert list(skipped) == [chain["corrupt"].relative_to(chain["data"]).as_posix()]
    assert summary["features"]["skipped"] == 1
    assert summary["split_unit"] == "patient"
    assert summary["features"]["computed"] + summary["features"]["reused"] == len(_split_rows(chain["run1"])) - 1


def test_second_run_takes_every_feature_from_the_cache(chain: dict[str, Path]) -> None:
    first = json.loads((chain["run1"] / "train_summary.json").read_text())["features"]
    second = json.loads((chain["run2"] / "train_summary.json").read_text())["features"]
    assert first["computed"] > 0
    assert first["reused"] == 0
    assert second["computed"] == 0
    assert second["reused"] == first["computed"]
    # same data, seed and cached features: the same heads, so the same operating points
    assert json.loads((chain["run2"] / "thresholds.json").read_text()) == json.loads(
        (chain["run1"] / "thresholds.json").read_text()
    )


def test_bundle_carries_the_runs_thresholds_and_untrained_flag(chain: dict[str, Path]) -> None:
    manifest = load_bundle(chain["bundle"]).manifest
    assert manifest.trained is False
    assert manifest.graph.form == "fused"  # the heads share the one frozen backbone
    run_thresholds = json.loads((chain["run1"] / "thresholds.json").read_text())
    assert {part: t.model_dump() for part, t in manifest.thresholds.items()} == run_thresholds


def test_evaluation_report_has_every_metric(chain: dict[str, Path]) -> None:
    report = json.loads((chain["report"] / "report.json").read_text())
    corrupt = chain["corrupt"].relative_to(chain["data"]).as_posix()
    test_rows = [r for r in _split_rows(chain["run1"]) if r["split"] == "test" and r["relative_path"] != corrupt]
    assert report["body_part"]["images"] == len(test_rows)
    assert report["bundle"]["trained"] is False
    assert report["warnings"]
    assert "abnormal" in report["note"]
    body = report["body_part"]
    assert body["accuracy"]["method"] == "wilson"
    assert sum(map(sum, body["confusion_matrix"])) == len(test_rows)
    assert "bootstrap" in body["kappa"]["method"]
    bootstrapped: list[bool] = []
    for part in ("elbow", "hand", "shoulder"):
        for level in ("image_level", "study_level"):
            entry = report["per_part"][part][level]
            for name in ("accuracy", "sensitivity", "specificity"):
                assert entry[name]["method"] == "wilson"
                assert 0.0 <= entry[name]["low"] <= entry[name]["value"] <= entry[name]["high"] <= 1.0
            for name in ("auroc", "kappa"):
                # a tiny test split can leave the bootstrap without an interval; then it says so
                assert "bootstrap" in entry[name]["method"] or entry[name]["low"] is None
                bootstrapped.append(entry[name]["low"] is not None)
            confusion = entry["confusion"]
            assert confusion["tp"] + confusion["fp"] + confusion["tn"] + confusion["fn"] == entry["n"]
            assert set(entry["operating_points"]) == {"high_sensitivity", "high_specificity"}
        assert report["per_part"][part]["study_level"]["n"] == report["test_set"][part]["studies"]
    assert any(bootstrapped)
    for level in ("image_level", "study_level"):
        assert report["end_to_end"][level]["accuracy"]["method"] == "wilson"
    markdown = (chain["report"] / "report.md").read_text()
    assert "UNTRAINED" in markdown
    assert "abnormal" in markdown
    for figure in ("body_part_confusion.png", "fracture_confusion.png", "roc.png"):
        assert (chain["report"] / figure).read_bytes().startswith(PNG_SIGNATURE)
        assert figure in markdown


def test_evaluate_recomputes_the_same_split_without_the_split_file(chain: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["evaluate", "--data", str(chain["data"]), "--bundle", str(chain["bundle"]), "--out", str(out)]
    assert main([*args, "--bootstrap", "100", "--no-progress"]) == 0
    recomputed = json.loads((out / "report.json").read_text())
    with_file = json.loads((chain["report"] / "report.json").read_text())
    assert recomputed["test_set"] == with_file["test_set"]
    assert recomputed["body_part"]["confusion_matrix"] == with_file["body_part"]["confusion_matrix"]
