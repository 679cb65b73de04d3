"""`bfd train --data <FracAtlas>` end to end on the committed subset, random backbone (weights none), as CI runs it.

FracAtlas has no patient ids: the run must split by image, stratified by region and label, say so in its split
file and output, and train a router over FracAtlas's regions with one specialist per region.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from fracatlas_data import SUBSET, copy_subset  # noqa: E402

from bfd.cli import main  # noqa: E402
from training.fracatlas import REGIONS, SPLIT_UNIT_NOTE, read_fracatlas  # noqa: E402

pytestmark = pytest.mark.slow


def test_train_on_the_fracatlas_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_subset(tmp_path / "FracAtlas")
    images = read_fracatlas(data).images  # mixed films are left out of training too
    broken = next(image for image in images if image.region == "hip" and image.label == 0)
    (data / broken.relative_path).write_bytes(b"\xff\xd8\xff\xe0 truncated")  # must be skipped and counted
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--weights", "none", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert SPLIT_UNIT_NOTE in printed
    # no patients row in the counts table: without patient ids it would only repeat the image counts
    assert not any(line.startswith("all") and "patients" in line for line in printed.splitlines())
    with (out / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["relative_path"] for row in rows) == sorted(image.relative_path for image in images)
    assert {row["split_unit"] for row in rows} == {"image"}
    strata = Counter((row["part"], row["label"], row["split"]) for row in rows)
    for region in REGIONS:
        for label in ("fractured", "normal"):
            for split in ("train", "val", "test"):
                assert strata[(region, label, split)] > 0, (region, label, split)
    info = json.loads((out / "models.json").read_text())
    assert info["body_parts"] == sorted(REGIONS)
    assert info["trained"] is False  # random backbone
    for name in ("router", *(f"specialist_{region}" for region in sorted(REGIONS))):
        assert (out / f"{name}.keras").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["layout"] == "fracatlas"
    assert summary["split_unit"] == "image"  # no patient ids: its 'patients_per_split' are images
    truncated = "images/Non_fractured/IMG0004070.jpg"  # FracAtlas's own: see tests/data/fracatlas/README.md
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(skipped) == sorted([broken.relative_path, truncated])
    assert summary["features"]["skipped"] == 2
    assert summary["features"]["computed"] == len(images) - 2


def test_mura_split_mode_is_refused_on_fracatlas(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = ["train", "--data", str(SUBSET), "--out", str(tmp_path / "run"), "--weights", "none", "--split", "mura"]
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    assert "FracAtlas" in caplog.text
    assert not (tmp_path / "run").exists()
