"""Reading MURA / flat datasets, patient-level splits, split files and `bfd make-synthetic`.

Everything runs on small synthetic datasets written by `training.synthetic` (numpy + Pillow, no TensorFlow),
so the whole file takes a few seconds. Datasets that a test modifies are written fresh for that test.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.dataset import DEFAULT_PARTS, SYNTHETIC_MARKER, read_dataset
from training.records import DatasetError, ImageRecord
from training.splits import (
    DEFAULT_FRACTIONS,
    SPLIT_FILE_COLUMNS,
    SPLITS,
    SplitError,
    assign_splits,
    format_counts,
    patient_counts,
    read_split_file,
    split_counts,
    split_unit,
    write_split_file,
)
from training.synthetic import make_synthetic

MURA = "MURA-v1.1"
CSV_NAMES = ("train_image_paths.csv", "valid_image_paths.csv", "train_labeled_studies.csv", "valid_labeled_studies.csv")


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic MURA dataset (tests that modify data make their own)."""
    return make_synthetic(tmp_path_factory.mktemp("mura") / "data", seed=1)


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("flat") / "data", layout="flat", seed=1)


@pytest.fixture(scope="module")
def big_records(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    root = make_synthetic(tmp_path_factory.mktemp("big") / "data", patients_per_part=40, seed=2)
    return read_dataset(root).records


def _images_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def _csv_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def _patients_by_split(records: Sequence[ImageRecord], splits: Sequence[str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for record, split in zip(records, splits, strict=True):
        seen[record.patient].add(split)
    return seen


def _record(
    patient: str, part: str = "elbow", label: int = 0, *, study: int = 1, image: int = 1, origin: str | None = None
) -> ImageRecord:
    name = f"{part}/{patient}/study{study}_{'positive' if label else 'negative'}/image{image}.png"
    return ImageRecord(
        path=Path("/data") / name,
        relative_path=name,
        part=part,
        patient=patient,
        study=f"{part}/{patient}/study{study}",
        label=label,
        origin=origin,  # type: ignore[arg-type]
    )


def _save_png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


# --- make_synthetic + read_dataset ---------------------------------------------------------------------------


def test_synthetic_mura_is_read_back_with_every_field_right(mura_root: Path) -> None:
    dataset = read_dataset(mura_root)
    assert dataset.layout == "mura"
    assert dataset.root == mura_root.absolute()
    assert dataset.synthetic is True
    assert dataset.problems == []
    assert dataset.parts_found == dataset.parts == sorted(DEFAULT_PARTS)
    assert [r.relative_path for r in dataset.records] == _images_on_disk(mura_root)  # all of them, sorted
    listed = _csv_lines(mura_root / MURA / "train_image_paths.csv") + _csv_lines(
        mura_root / MURA / "valid_image_paths.csv"
    )
    assert sorted(listed) == _images_on_disk(mura_root)
    pattern = re.compile(
        r"MURA-v1\.1/(train|valid)/XR_([A-Z]+)/(patient\d{5})/(study\d)_(positive|negative)/image\d\.png"
    )
    for record in dataset.records:
        origin, part, patient, study, label = pattern.fullmatch(record.relative_path).groups()
        assert record.path == mura_root.absolute() / record.relative_path
        assert record.path.is_file()
        assert (record.origin, record.part, record.patient) == (origin, part.lower(), patient)
        assert record.study == f"{part.lower()}/{patient}/{study}"
        assert record.label == (1 if label == "positive" else 0)


def test_synthetic_mura_looks_like_mura(mura_root: Path) -> None:
    records = read_dataset(mura_root).records
    cells = Counter((r.part, r.origin, r.label) for r in records)
    for part in DEFAULT_PARTS:
        for origin in ("train", "valid"):
            assert cells[(part, origin, 0)] > 0
            assert cells[(part, origin, 1)] > 0
    parts_of = defaultdict(set)
    origins_of = defaultdict(set)
    for record in records:
        parts_of[record.patient].add(record.part)
        origins_of[record.patient].add(record.origin)
    assert any(len(parts) == 2 for parts in parts_of.values())  # one person, two body parts
    assert all(len(origins) == 1 for origins in origins_of.values())  # MURA's train/valid share no patient
    studies = defaultdict(set)
    for record in records:
        studies[record.patient].add(record.study)
    assert all(1 <= len(s) <= 4 for s in studies.values())
    assert max(Counter(r.study for r in records).values()) <= 3
    train = sum(1 for p in origins_of.values() if p == {"train"})
    assert 0.6 <= train / len(origins_of) <= 0.9
    labelled = _csv_lines(mura_root / MURA / "train_labeled_studies.csv")
    line = re.compile(r"MURA-v1\.1/train/XR_[A-Z]+/patient\d{5}/study\d_(positive/,1|negative/,0)")
    assert labelled
    assert all(line.fullmatch(x) for x in labelled)


def test_synthetic_images_are_grayscale_unique_and_carry_signal(mura_root: Path) -> None:
    records = read_dataset(mura_root).records
    digests = {hashlib.sha256(r.path.read_bytes()).hexdigest() for r in records}
    assert len(digests) == len(records)
    pixels = {}
    for record in records:
        with Image.open(record.path) as image:
            assert (image.mode, image.size, image.format) == ("L", (96, 96), "PNG")
            pixels[record.relative_path] = np.asarray(image, dtype=np.float32)
    # positives have a dark diagonal: more near-black pixels on the diagonal band than negatives
    diagonal = np.abs(np.subtract.outer(np.arange(96), np.arange(96))) < 20

    def dark_on_diagonal(record: ImageRecord) -> float:
        return float((pixels[record.relative_path][diagonal] < 35).mean())

    positive = np.mean([dark_on_diagonal(r) for r in records if r.label == 1])
    negative = np.mean([dark_on_diagonal(r) for r in records if r.label == 0])
    assert positive > 3 * negative
    # the parts differ in their bright shape
    means = {
        part: np.mean([pixels[r.relative_path] > 150 for r in records if r.part == part], axis=0)
        for part in DEFAULT_PARTS
    }
    assert np.abs(means["elbow"] - means["hand"]).mean() > 0.1
    assert np.abs(means["hand"] - means["shoulder"]).mean() > 0.1


def test_make_synthetic_is_deterministic_and_marked(tmp_path: Path) -> None:
    first = make_synthetic(tmp_path / "a", seed=5, patients_per_part=3)
    second = make_synthetic(tmp_path / "b", seed=5, patients_per_part=3)
    other = make_synthetic(tmp_path / "c", seed=6, patients_per_part=3)
    files = _images_on_disk(first)
    assert files == _images_on_disk(second)
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any(not (other / f).exists() or (other / f).read_bytes() != (first / f).read_bytes() for f in files)
    marker = (first / SYNTHETIC_MARKER).read_text().lower()
    assert "random synthetic data" in marker
    assert "not radiographs" in marker
    assert "meaningless" in marker


def test_make_synthetic_refuses_a_non_empty_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="patients_per_part"):
        make_synthetic(tmp_path / "x", patients_per_part=1)
    with pytest.raises(ValueError, match="parts"):
        make_synthetic(tmp_path / "y", parts=["elbow", "Elbow"])


def test_synthetic_flat_layout_is_read_back(flat_root: Path, mura_root: Path) -> None:
    dataset = read_dataset(flat_root)
    assert dataset.layout == "flat"
    assert dataset.synthetic is True
    assert dataset.problems == []
    assert not (flat_root / MURA).exists()
    assert not list(flat_root.rglob("*.csv"))
    assert sorted(p.name for p in flat_root.iterdir() if p.is_dir()) == ["Elbow", "Hand", "Shoulder"]
    assert [r.relative_path for r in dataset.records] == _images_on_disk(flat_root)
    pattern = re.compile(r"(Elbow|Hand|Shoulder)/(patient\d{5})/(study\d)_(positive|negative)/image\d\.png")
    for record in dataset.records:
        part, patient, study, label = pattern.fullmatch(record.relative_path).groups()
        assert (record.part, record.patient, record.origin) == (part.lower(), patient, None)
        assert record.study == f"{part.lower()}/{patient}/{study}"
        assert record.label == (1 if label == "positive" else 0)
    # same seed, same people and studies as the MURA layout
    mura = read_dataset(mura_root).records
    assert sorted((r.study, r.label) for r in dataset.records) == sorted((r.study, r.label) for r in mura)


def test_mura_folder_and_its_parent_give_the_same_records(mura_root: Path) -> None:
    via_parent = read_dataset(mura_root)
    via_folder = read_dataset(mura_root / MURA)
    assert via_folder.root == via_parent.root
    assert via_folder.records == via_parent.records
    assert via_folder.synthetic is True  # the marker lies in the MURA folder's parent


def test_walking_without_the_csvs_gives_the_same_records(tmp_path: Path, mura_root: Path) -> None:
    root = make_synthetic(tmp_path / "data", seed=1)
    for name in CSV_NAMES:
        (root / MURA / name).unlink()
    walked = read_dataset(root)
    assert walked.layout == "mura"
    assert walked.problems == []
    assert [(r.relative_path, r.part, r.patient, r.study, r.label, r.origin) for r in walked.records] == [
        (r.relative_path, r.part, r.patient, r.study, r.label, r.origin) for r in read_dataset(mura_root).records
    ]
    assert all(r.path.is_relative_to(root.absolute()) for r in walked.records)


def test_csv_label_mismatch_and_missing_file_are_reported_not_fatal(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "data", seed=1)
    before = read_dataset(root).records
    studies_csv = root / MURA / "train_labeled_studies.csv"
    lines = _csv_lines(studies_csv)
    folder, label = lines[0].rsplit(",", 1)
    lines[0] = f"{folder},{1 - int(label)}"  # the CSV now disagrees with the folder's suffix
    studies_csv.write_text("\n".join(lines) + "\n")
    ghost = "MURA-v1.1/train/XR_ELBOW/patient99999/study1_positive/image1.png"
    with (root / MURA / "train_image_paths.csv").open("a") as handle:
        handle.write(ghost + "\n")

    dataset = read_dataset(root)
    assert len(dataset.problems) == 2
    assert any(folder.rstrip("/").removeprefix("MURA-v1.1/") in p and "CSV label" in p for p in dataset.problems)
    assert any(ghost in p and "does not exist" in p for p in dataset.problems)
    assert ghost not in {r.relative_path for r in dataset.records}
    assert len(dataset.records) == len(before)
    changed = [(b, a) for b, a in zip(before, dataset.records, strict=True) if b != a]
    assert changed
    assert all(a.relative_path.startswith(folder) and a.label == 1 - int(label) for _, a in changed)
    assert all(b.relative_path == a.relative_path for b, a in changed)
    assert len(changed) == sum(r.relative_path.startswith(folder) for r in before)


def test_parts_filter(mura_root: Path) -> None:
    everything = read_dataset(mura_root, parts=None)
    assert everything.parts == sorted(DEFAULT_PARTS)
    elbow = read_dataset(mura_root, parts=["Elbow"])
    assert elbow.parts == ["elbow"]
    assert elbow.parts_found == sorted(DEFAULT_PARTS)
    assert elbow.records == [r for r in everything.records if r.part == "elbow"]
    two = read_dataset(mura_root, parts=("XR_HAND", "shoulder"))
    assert two.parts == ["hand", "shoulder"]
    assert len(two.records) + len(elbow.records) == len(everything.records)


def test_unknown_part_names_the_available_ones(mura_root: Path) -> None:
    with pytest.raises(DatasetError, match="knee") as raised:
        read_dataset(mura_root, parts=("elbow", "knee"))
    assert all(part in str(raised.value) for part in DEFAULT_PARTS)


def test_missing_or_empty_folder_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        read_dataset(tmp_path / "empty")


def test_flat_walk_ignores_hidden_and_foreign_files_and_reads_origins(tmp_path: Path) -> None:
    root = tmp_path / "Dataset"
    study = root / "extra" / "train" / "Elbow" / "patient11186" / "study1_positive"
    _save_png(study / "image1.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(study / "image2.JPG", format="JPEG")
    _save_png(root / "valid" / "XR_HAND" / "patient00002" / "study2_negative" / "a.jpeg")
    _save_png(root / "Shoulder" / "patient00003" / "Study1_Negative" / "image1.png")
    (study / "._image1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    _save_png(root / ".trash" / "Elbow" / "patient00004" / "study1_positive" / "image1.png")
    _save_png(root / "Elbow" / ".patient00005" / "study1_positive" / "image1.png")
    (study / "notes.txt").write_text("not an image")
    (study / "image3.dcm").write_bytes(b"DICM")

    dataset = read_dataset(root, parts=None)
    assert dataset.layout == "flat"
    assert dataset.synthetic is False
    assert dataset.problems == []
    got = [(r.relative_path, r.part, r.patient, r.study, r.label, r.origin) for r in dataset.records]
    assert got == [
        (
            "Shoulder/patient00003/Study1_Negative/image1.png",
            "shoulder",
            "patient00003",
            "shoulder/patient00003/study1",
            0,
            None,
        ),
        (
            "extra/train/Elbow/patient11186/study1_positive/image1.png",
            "elbow",
            "patient11186",
            "elbow/patient11186/study1",
            1,
            "train",
        ),
        (
            "extra/train/Elbow/patient11186/study1_positive/image2.JPG",
            "elbow",
            "patient11186",
            "elbow/patient11186/study1",
            1,
            "train",
        ),
        (
            "valid/XR_HAND/patient00002/study2_negative/a.jpeg",
            "hand",
            "patient00002",
            "hand/patient00002/study2",
            0,
            "valid",
        ),
    ]


def test_image_outside_the_structure_is_reported(tmp_path: Path) -> None:
    _save_png(tmp_path / "Elbow" / "patient00001" / "study1_positive" / "image1.png")
    _save_png(tmp_path / "Elbow" / "patient00001" / "image2.png")
    _save_png(tmp_path / "Elbow" / "patient00001" / "study2_unsure" / "image1.png")
    dataset = read_dataset(tmp_path, parts=["elbow"])
    assert [r.relative_path for r in dataset.records] == ["Elbow/patient00001/study1_positive/image1.png"]
    assert len(dataset.problems) == 2
    assert any("Elbow/patient00001/image2.png" in p for p in dataset.problems)
    assert any("study2_unsure" in p for p in dataset.problems)


def test_hidden_files_are_ignored_in_the_mura_walk_too(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "data", patients_per_part=2)
    for name in CSV_NAMES:
        (root / MURA / name).unlink()
    before = read_dataset(root).records
    some = before[0].path
    (some.parent / f"._{some.name}").write_bytes(b"junk")
    shutil.copytree(some.parent.parent, some.parent.parent.parent / ".cache_patient00001")
    after = read_dataset(root)
    assert after.records == before
    assert after.problems == []


# --- splits ------------------------------------------------------------------------------------------------


def test_no_patient_is_in_two_splits_even_across_parts(big_records: list[ImageRecord]) -> None:
    parts_of = defaultdict(set)
    for record in big_records:
        parts_of[record.patient].add(record.part)
    shared = [patient for patient, parts in parts_of.items() if len(parts) > 1]
    assert shared  # the synthetic data has a person with two body parts
    for seed in range(5):
        splits = assign_splits(big_records, seed=seed)
        assert all(len(names) == 1 for names in _patients_by_split(big_records, splits).values())


def test_split_fractions_follow_the_defaults_for_every_part_and_label(big_records: list[ImageRecord]) -> None:
    splits = assign_splits(big_records, seed=0)
    share = Counter(splits)
    for name, target in zip(SPLITS, DEFAULT_FRACTIONS, strict=True):
        assert abs(share[name] / len(big_records) - target) < 0.04, (name, share)
    counts = split_counts(big_records, splits)
    for part, by_label in counts.items():
        for label, by_split in by_label.items():
            total = sum(by_split.values())
            assert abs(by_split["train"] / total - 0.72) < 0.15, (part, label, by_split)
            assert by_split["val"] > 0
            assert by_split["test"] > 0


def test_default_synthetic_data_fills_every_part_label_and_split(tmp_path: Path) -> None:
    for seed in range(4):
        records = read_dataset(make_synthetic(tmp_path / str(seed), seed=seed)).records
        for mode in ("patient", "mura"):
            counts = split_counts(records, assign_splits(records, mode, seed=seed))
            empty = [
                (p, lab, s) for p, labels in counts.items() for lab, c in labels.items() for s, n in c.items() if n == 0
            ]
            assert empty == [], (seed, mode)


def test_splits_are_deterministic_and_depend_on_the_seed(big_records: list[ImageRecord]) -> None:
    first = assign_splits(big_records, seed=7)
    assert assign_splits(big_records, seed=7) == first
    shuffled = list(big_records)
    random.Random(1).shuffle(shuffled)
    by_path = dict(zip((r.relative_path for r in shuffled), assign_splits(shuffled, seed=7), strict=True))
    assert [by_path[r.relative_path] for r in big_records] == first  # order of the input does not matter
    assert assign_splits(big_records, seed=8) != first


def test_each_split_gets_a_patient_of_a_small_stratum() -> None:
    # one stratum of three patients, one of them with most of the images
    records = [_record("patient1", image=i) for i in range(1, 21)] + [_record("patient2"), _record("patient3")]
    for seed in range(10):
        splits = assign_splits(records, seed=seed)
        assert set(splits) == set(SPLITS)
        assert all(len(names) == 1 for names in _patients_by_split(records, splits).values())


def test_bad_fractions_and_modes_are_refused(big_records: list[ImageRecord]) -> None:
    with pytest.raises(SplitError, match="sum to 1"):
        assign_splits(big_records, fractions=(0.5, 0.3, 0.1))
    with pytest.raises(SplitError, match="mode"):
        assign_splits(big_records, "random")  # type: ignore[arg-type]


def test_mura_mode_keeps_valid_as_test(big_records: list[ImageRecord]) -> None:
    splits = assign_splits(big_records, "mura", seed=0)
    for record, split in zip(big_records, splits, strict=True):
        assert (split == "test") == (record.origin == "valid")
    assert all(len(names) == 1 for names in _patients_by_split(big_records, splits).values())
    train_share = Counter(s for s in splits if s != "test")
    assert abs(train_share["train"] / sum(train_share.values()) - 0.8) < 0.05


def test_mura_mode_needs_origins_and_disjoint_patients(flat_root: Path) -> None:
    with pytest.raises(SplitError, match="origin"):
        assign_splits(read_dataset(flat_root).records, "mura")
    leaking = [_record("patient1", origin="train"), _record("patient1", study=2, origin="valid")]
    with pytest.raises(SplitError, match="patient1"):
        assign_splits(leaking, "mura")


def test_split_counts_and_table(big_records: list[ImageRecord]) -> None:
    splits = assign_splits(big_records, seed=0)
    counts = split_counts(big_records, splits)
    assert sorted(counts) == sorted(DEFAULT_PARTS)
    assert sum(n for labels in counts.values() for c in labels.values() for n in c.values()) == len(big_records)
    assert counts["hand"]["fractured"]["val"] == sum(
        1 for r, s in zip(big_records, splits, strict=True) if r.part == "hand" and r.label == 1 and s == "val"
    )
    only_train = split_counts(big_records[:3], ["train"] * 3)  # the first three are elbow images
    assert set(only_train) == {"elbow"}
    assert set(only_train["elbow"]) == {"fractured", "normal"}
    assert all(set(c) == set(SPLITS) for c in only_train["elbow"].values())
    assert sum(c["train"] for c in only_train["elbow"].values()) == 3
    assert sum(c["val"] + c["test"] for c in only_train["elbow"].values()) == 0

    table = format_counts(counts, patient_counts(big_records, splits))
    assert table.splitlines()[0].split() == ["part", "label", *SPLITS, "total"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table.splitlines()[2:] if not line.startswith("-")}
    assert rows[("elbow", "normal")] == [str(counts["elbow"]["normal"][s]) for s in SPLITS] + [
        str(sum(counts["elbow"]["normal"].values()))
    ]
    assert rows[("all", "images")][-1] == str(len(big_records))
    n_patients = len({r.patient for r in big_records})
    assert rows[("all", "patients")][-1] == str(n_patients)


def test_split_file_round_trips(tmp_path: Path, mura_root: Path) -> None:
    dataset = read_dataset(mura_root)
    splits = assign_splits(dataset.records, "mura", seed=3)
    path = tmp_path / "run" / "split.csv"
    write_split_file(path, dataset.records, splits)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == SPLIT_FILE_COLUMNS
    assert {row[4] for row in rows[1:]} == {"fractured", "normal"}
    records, read_splits = read_split_file(path, dataset.root)
    assert records == dataset.records
    assert read_splits == splits
    moved, _ = read_split_file(path, tmp_path / "elsewhere")  # relative paths: the data may move
    assert moved[0].path == tmp_path / "elsewhere" / dataset.records[0].relative_path


def test_malformed_split_files_are_refused(tmp_path: Path) -> None:
    header = ",".join(SPLIT_FILE_COLUMNS)
    good = "elbow/patient1/study1_positive/image1.png,elbow,patient1,elbow/patient1/study1,fractured,,train"
    cases = {
        "relative_path,part,patient\nx.png,elbow,patient1\n": "missing column",
        f"{header}\n{good.replace('fractured', 'broken')}\n": "label",
        f"{header}\n{good.replace(',train', ',holdout')}\n": "split",
        f"{header}\n{good}\n{good.replace('image1', 'image2').replace(',train', ',test')}\n": "more than one split",
        f"{header}\n{good}\n{good}\n": "listed twice",
        f"{header}\n": "no images",
        f"{header}\n/etc/passwd,elbow,patient1,elbow/patient1/study1,normal,,train\n": "relative path",
    }
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"split{number}.csv"
        path.write_text(text)
        with pytest.raises(SplitError, match=message):
            read_split_file(path, tmp_path)
    with pytest.raises(SplitError, match="cannot read"):
        read_split_file(tmp_path / "absent.csv", tmp_path)


# --- bfd make-synthetic ----------------------------------------------------------------------------------------


def _cli_args(*argv: str) -> argparse.Namespace:
    from training.synthetic_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_make_synthetic_via_bfd_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bfd.cli import main

    out = tmp_path / "synthetic"
    argv = ["make-synthetic", "--out", str(out), "--layout", "flat", "--parts", "Elbow", "hand", "--seed", "4"]
    assert main([*argv, "--patients-per-part", "3", "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "meaningless" in printed
    dataset = read_dataset(out, parts=None)
    assert (dataset.layout, dataset.parts, dataset.synthetic) == ("flat", ["elbow", "hand"], True)
    assert len({r.patient for r in dataset.records if r.part == "elbow"}) == 3
    with Image.open(dataset.records[0].path) as image:
        assert image.size == (48, 48)


def test_make_synthetic_cli_refuses_a_full_folder_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.synthetic_cli import run

    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run(_cli_args("--out", str(out), "--patients-per-part", "2")) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    assert not (out / MURA).exists()

    assert run(_cli_args("--out", str(out), "--patients-per-part", "2", "--force")) == 0
    assert not (out / "old.txt").exists()
    dataset = read_dataset(out)
    assert dataset.layout == "mura"
    assert {r.origin for r in dataset.records} == {"train", "valid"}
    assert "meaningless" in capsys.readouterr().out


def test_the_split_unit_says_whether_images_stood_in_for_patients() -> None:
    """FracAtlas has no patient ids: each image is its own 'patient' (image:<id>), and reports must say so."""
    with_patients = [_record("patient00001"), _record("patient00002")]
    images_only = [_record("image:IMG0000001"), _record("image:IMG0000002")]
    assert split_unit(with_patients) == "patient"
    assert split_unit(images_only) == "image"
    assert split_unit([*with_patients, *images_only]) == "patient and image"
