"""Reading FracAtlas: regions, mixed films, labels, boxes, its layout in `read_dataset`, and image-level splits.

Most tests read the committed real subset (tests/data/fracatlas); the expected values come from its own files
(dataset.csv, the folders, the COCO JSON as a second source for the VOC boxes), not from this module.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fracatlas_data import SUBSET, Synthetic, copy_subset, subset_rows, write_fracatlas
from PIL import Image

from inference.preprocessing import ImageError, prepare_image_file
from training.dataset import read_dataset
from training.fracatlas import (
    MIXED,
    REGIONS,
    FracAtlasImage,
    as_records,
    find_root,
    read_fracatlas,
)
from training.records import DatasetError
from training.splits import (
    DEFAULT_FRACTIONS,
    SPLIT_FILE_COLUMNS,
    SPLIT_UNIT_COLUMN,
    SPLITS,
    assign_splits,
    read_split_file,
    write_split_file,
)


def _expected_region(row: dict[str, str]) -> str:
    flagged = [region for region in REGIONS if row[region] == "1"]
    return flagged[0] if len(flagged) == 1 and row["mixed"] == "0" else MIXED


def _coco_boxes() -> dict[str, list[tuple[float, float, float, float]]]:
    data = json.loads((SUBSET / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").read_text())
    names = {image["id"]: image["file_name"] for image in data["images"]}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        boxes.setdefault(names[annotation["image_id"]], []).append((x, y, x + w, y + h))
    return boxes


def test_subset_is_read_with_regions_from_the_flags_and_mixed_films_left_out() -> None:
    rows = subset_rows()
    data = read_fracatlas(SUBSET)
    assert data.listed == len(rows)
    expected = {row["image_id"][:-4]: _expected_region(row) for row in rows}
    kept = {image.image_id: image.region for image in data.images}
    assert kept == {name: region for name, region in expected.items() if region != MIXED}
    assert sorted(i.image_id for i in data.mixed_left_out) == sorted(n for n, r in expected.items() if r == MIXED)
    assert set(kept.values()) == set(REGIONS)  # every region is covered by the subset
    assert any(f"{len(data.mixed_left_out)} mixed film(s)" in problem for problem in data.problems)


def test_keep_mixed_keeps_them_with_every_flagged_region() -> None:
    data = read_fracatlas(SUBSET, keep_mixed=True)
    rows = {row["image_id"][:-4]: row for row in subset_rows()}
    mixed = [image for image in data.images if image.region == MIXED]
    assert len(mixed) >= 2
    assert not data.mixed_left_out
    for image in mixed:
        assert image.regions == tuple(r for r in REGIONS if rows[image.image_id][r] == "1")
        assert len(image.regions) > 1


def test_labels_follow_the_csv_and_a_contradicted_flag_is_reported() -> None:
    data = read_fracatlas(SUBSET, keep_mixed=True)
    rows = {row["image_id"][:-4]: row for row in subset_rows()}
    contradicted = []
    for image in data.images:
        in_fractured = (SUBSET / "images" / "Fractured" / f"{image.image_id}.jpg").is_file()
        assert image.path.is_file()
        assert image.relative_path == f"images/{'Fractured' if in_fractured else 'Non_fractured'}/{image.image_id}.jpg"
        if rows[image.image_id]["fractured"] != str(int(in_fractured)):
            contradicted.append(image.image_id)
        # folder and fracture_count agree in the subset, so they decide
        assert image.label == int(in_fractured) == int(int(rows[image.image_id]["fracture_count"]) > 0)
    assert contradicted, "the subset holds FracAtlas's one contradicted row (IMG0003298)"
    for name in contradicted:
        assert any(name in problem and "fractured=0" in problem for problem in data.problems)
    hardware = [image for image in data.images if image.hardware]
    assert hardware
    assert all(rows[image.image_id]["hardware"] == "1" for image in hardware)


def test_voc_boxes_match_the_coco_file_and_the_fracture_count() -> None:
    coco = _coco_boxes()
    data = read_fracatlas(SUBSET, keep_mixed=True)
    with_boxes = [image for image in data.images if image.boxes]
    assert any(len(image.boxes) >= 3 for image in with_boxes)
    for image in data.images:
        assert image.box_source == "voc"
        assert len(image.boxes) == image.fracture_count
        expected = coco.get(f"{image.image_id}.jpg", [])
        assert len(expected) == len(image.boxes)
        for box, (x0, y0, x1, y1) in zip(image.boxes, expected, strict=True):
            # FracAtlas's VOC files hold the COCO coordinates truncated to whole pixels
            got = (box.x_min, box.y_min, box.x_max, box.y_max)
            np.testing.assert_allclose(got, (x0, y0, x1, y1), rtol=0, atol=1)


def test_boxes_come_from_the_coco_file_when_there_is_no_voc_folder(tmp_path: Path) -> None:
    root = copy_subset(tmp_path / "FracAtlas")
    shutil.rmtree(root / "Annotations" / "PASCAL VOC")
    coco = _coco_boxes()
    data = read_fracatlas(root, keep_mixed=True)
    fractured = [image for image in data.images if image.label == 1]
    assert fractured
    for image in fractured:
        assert image.box_source == "coco"
        assert image.annotation_size is None
        got = np.asarray([(b.x_min, b.y_min, b.x_max, b.y_max) for b in image.boxes])
        np.testing.assert_allclose(got, np.asarray(coco[f"{image.image_id}.jpg"]), rtol=0, atol=1e-9)


def test_annotations_are_in_the_displayed_frame_the_preprocessing_reports() -> None:
    """FracAtlas annotates the image as displayed (EXIF orientation applied), as inference.preprocessing reports it."""
    data = read_fracatlas(SUBSET, keep_mixed=True)
    rotated = 0
    for image in data.images:
        try:
            prepared = prepare_image_file(image.path)
        except ImageError:
            continue  # a truncated JPEG: nothing displayed to compare with
        assert image.annotation_size == (prepared.original_width, prepared.original_height)
        with Image.open(image.path) as stored:
            orientation = stored.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                rotated += 1
                assert image.annotation_size == stored.size[::-1] != stored.size
    assert rotated >= 2  # the subset keeps images stored on their side


def test_problem_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    dark = np.full((40, 30), 30, dtype=np.uint8)
    root = write_fracatlas(
        tmp_path / "FracAtlas",
        [
            Synthetic("IMG0000001", dark, ("hand",)),
            Synthetic("IMG0000002", dark, ("leg",), extra={"hardware": "2"}),
            Synthetic("IMG0000003", dark, ("hip",), extra={"hip": "0"}),  # no region left
            Synthetic("IMG0000004", dark, ("shoulder",), fractured=True),  # fractured, no box
            Synthetic("IMG0000005", dark, ("hand", "leg"), extra={"mixed": "0"}),
        ],
    )
    (root / "images" / "Non_fractured" / "IMG0000001.jpg").rename(root / "images" / "Non_fractured" / "IMG9.jpg")
    with (root / "dataset.csv").open("a", newline="") as handle:
        handle.write("IMG0000005.jpg,1,1,0,0,1,0,0,0,0,1,0,0\r\n")
    data = read_fracatlas(root, keep_mixed=True)
    assert [image.image_id for image in data.images] == ["IMG0000004", "IMG0000005"]
    text = "\n".join(data.problems)
    assert "IMG0000001.jpg): no such file" in text
    assert "IMG0000002.jpg): hardware must be 0 or 1, got '2'" in text
    assert "IMG0000003.jpg): no region flagged" in text
    assert "IMG0000004.jpg): fractured but no fracture box" in text
    assert "IMG0000005.jpg): mixed=0 but regions hand+leg" in text
    assert "IMG0000005.jpg): listed twice" in text
    assert "not listed in dataset.csv, e.g. IMG9.jpg" in text
    assert data.images[1].region == MIXED


def test_a_foreign_csv_or_folder_is_refused(tmp_path: Path) -> None:
    root = copy_subset(tmp_path / "FracAtlas")
    (root / "dataset.csv").write_text("image_id,hand,fractured\nIMG0000275.jpg,1,0\n")
    with pytest.raises(DatasetError, match="missing column.*leg"):
        read_fracatlas(root)
    with pytest.raises(DatasetError, match="not a FracAtlas folder"):
        read_fracatlas(tmp_path / "nowhere")


def test_the_layout_is_found_in_the_folder_or_its_parent(tmp_path: Path) -> None:
    root = copy_subset(tmp_path / "download" / "FracAtlas")
    assert find_root(tmp_path / "download") == root
    assert find_root(root) == root
    assert find_root(tmp_path) is None
    shutil.rmtree(root / "images" / "Non_fractured")
    assert find_root(root) is None


def test_read_dataset_takes_fracatlas_with_regions_as_parts() -> None:
    dataset = read_dataset(SUBSET, None)
    assert dataset.layout == "fracatlas"
    assert dataset.parts == sorted(REGIONS)
    assert dataset.root == SUBSET
    fractured = Counter((r.part, r.label) for r in dataset.records)
    expected = Counter((i.region, i.label) for i in read_fracatlas(SUBSET).images)
    assert fractured == expected
    assert all(record.patient == f"image:{Path(record.relative_path).stem}" for record in dataset.records)
    assert len({record.study for record in dataset.records}) == len(dataset.records)
    only = read_dataset(SUBSET, ["hand", "shoulder"])
    assert only.parts == ["hand", "shoulder"]
    with pytest.raises(DatasetError, match="elbow not found.*available: hand, hip, leg, shoulder"):
        read_dataset(SUBSET)  # MURA's default parts: FracAtlas has no elbow


def _synthetic_images(count: int, seed: int = 0) -> list[FracAtlasImage]:
    rng = random.Random(seed)
    images = []
    for number in range(count):
        region = rng.choice(REGIONS)
        label = int(rng.random() < 0.3)
        folder = "Fractured" if label else "Non_fractured"
        images.append(
            FracAtlasImage(
                image_id=f"IMG{number:07d}",
                path=Path(f"/data/images/{folder}/IMG{number:07d}.jpg"),
                relative_path=f"images/{folder}/IMG{number:07d}.jpg",
                region=region,
                regions=(region,),
                label=label,
                hardware=False,
                multiscan=False,
                views=("frontal",),
                fracture_count=label,
            )
        )
    return images


def test_split_is_by_image_stratified_by_region_and_label_and_seeded() -> None:
    records = as_records(_synthetic_images(1200))
    splits = assign_splits(records, seed=7)
    assert len(splits) == len(records)
    strata: dict[tuple[str, int], Counter[str]] = {}
    for record, split in zip(records, splits, strict=True):
        strata.setdefault((record.part, record.label), Counter())[split] += 1
    assert len(strata) == 2 * len(REGIONS)
    for counts in strata.values():
        total = sum(counts.values())
        for split, fraction in zip(SPLITS, DEFAULT_FRACTIONS, strict=True):
            assert abs(counts[split] - fraction * total) <= 1.0, (counts, total)
    assert assign_splits(list(reversed(records)), seed=7) == list(reversed(splits))  # order does not matter
    assert assign_splits(records, seed=8) != splits


def test_split_file_says_it_is_by_image_and_round_trips(tmp_path: Path) -> None:
    records = as_records(read_fracatlas(SUBSET).images)
    splits = assign_splits(records, seed=0)
    path = tmp_path / "split.csv"
    write_split_file(path, records, splits)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == (*SPLIT_FILE_COLUMNS, SPLIT_UNIT_COLUMN)
    assert {row[SPLIT_UNIT_COLUMN] for row in rows} == {"image"}
    paths = [row["relative_path"] for row in rows]
    assert len(paths) == len(set(paths)) == len(records)  # no image in two splits
    assert {row["split"] for row in rows} == set(SPLITS)
    read_back, read_splits = read_split_file(path, SUBSET)
    assert read_back == records
    assert read_splits == splits
