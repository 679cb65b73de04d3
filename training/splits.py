"""Train/val/test splits at the patient level, their counts, and the split file that records them.

The one rule: no patient's images in two splits, ever. MURA's patient ids are shared across body parts (one
person), so a patient is identified by `patient` alone; two images of one person in train and test would
let a model score on memorised anatomy instead of fractures.

Two modes:

- "patient": patients grouped into strata by (their most frequent body part, whether any of that part's
  studies is positive); each stratum shuffled with a seeded RNG and cut at the fraction boundaries by cumulative image
  count, so every part and label is spread about 72/18/10.
- "mura": MURA's official valid set becomes the test split (as in the MURA paper's comparisons); MURA's
  train set is split by patient into train/val the same stratified way.

The split file (CSV) lists every image with its split, so a run can be reproduced and audited later.

Data without patient ids (FracAtlas) names each image as its own patient (`image:<id>`, IMAGE_GROUP_PREFIX), so
the same code splits it by image, stratified by part and label; its split file then carries a `split_unit`
column saying `image`, because such a split is weaker (two films of one patient can land in two splits).
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

from training.records import ImageRecord, label_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.72, 0.18, 0.10)
SPLIT_FILE_COLUMNS = ("relative_path", "part", "patient", "study", "label", "origin", "split")
LABEL_NAMES = ("fractured", "normal")
IMAGE_GROUP_PREFIX = "image:"  # a record whose patient is unknown is its own group: the split is by image
SPLIT_UNIT_COLUMN = "split_unit"  # written only for image-level records; readers ignore it
SplitMode = Literal["patient", "mura"]


class SplitError(ValueError):
    """The records cannot be split as asked, or a split file is malformed or leaks patients."""


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS):
        raise SplitError(f"need {len(SPLITS)} fractions ({'/'.join(SPLITS)}), got {len(values)}")
    if any(not math.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise SplitError(f"fractions must be non-negative and sum to 1, got {values}")
    if values[0] <= 0:
        raise SplitError("the train fraction must be positive")
    return values  # type: ignore[return-value]


def _stratum(indices: Sequence[int], records: Sequence[ImageRecord]) -> tuple[str, int]:
    """(the patient's most frequent part, whether any image of that part is positive).

    Ties go to the alphabetically first part. Looking at the main part's labels only keeps a patient with a
    fractured hand and a normal elbow from filling the elbow's 'fractured' quota.
    """
    parts = Counter(records[i].part for i in indices)
    top = max(sorted(parts), key=lambda part: parts[part])
    return top, int(any(records[i].label == 1 for i in indices if records[i].part == top))


def _cut(sizes: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """Split index per patient (in the given order): by where each patient's image midpoint falls."""
    total = sum(sizes)
    bounds = [total * sum(fractions[: i + 1]) for i in range(len(fractions))]
    bounds[-1] = math.inf
    counts = [0] * len(fractions)
    cumulative = 0
    for size in sizes:
        middle = cumulative + size / 2
        counts[next(i for i, bound in enumerate(bounds) if middle < bound)] += 1
        cumulative += size
    # With enough patients, every split that should get images gets at least one patient.
    active = [i for i, fraction in enumerate(fractions) if fraction > 0]
    if len(sizes) >= len(active):
        for i in active:
            if counts[i] == 0:
                donor = max(active, key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return [i for i, count in enumerate(counts) for _ in range(count)]


def _split_patients(
    records: Sequence[ImageRecord], indices: Sequence[int], names: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[int, str]:
    """Stratified, seeded patient-level assignment of `indices` (record positions) to `names`."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        by_patient[records[i].patient].append(i)
    strata: dict[tuple[str, int], list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        strata[_stratum(by_patient[patient], records)].append(patient)
    result: dict[int, str] = {}
    for key in sorted(strata):
        patients = strata[key]  # sorted, so the shuffle depends only on the data and the seed
        random.Random(f"{seed}/{key[0]}/{key[1]}").shuffle(patients)
        chosen = _cut([len(by_patient[p]) for p in patients], fractions)
        for patient, split in zip(patients, chosen, strict=True):
            for i in by_patient[patient]:
                result[i] = names[split]
    return result


def assign_splits(
    records: Sequence[ImageRecord],
    mode: SplitMode = "patient",
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> list[str]:
    """One split name per record (aligned with `records`), never putting one patient in two splits.

    Deterministic: the same records (in any order) and seed give the same assignment.
    """
    values = _check_fractions(fractions)
    if mode == "patient":
        chosen = _split_patients(records, range(len(records)), SPLITS, values, seed)
    elif mode == "mura":
        chosen = _split_mura(records, values, seed)
    else:
        raise SplitError(f"unknown split mode {mode!r}: use 'patient' or 'mura'")
    splits = [chosen[i] for i in range(len(records))]
    check_patients_disjoint(records, splits)
    return splits


def _split_mura(records: Sequence[ImageRecord], fractions: Sequence[float], seed: int) -> dict[int, str]:
    without = sum(1 for record in records if record.origin is None)
    if without:
        raise SplitError(
            f"split mode 'mura' needs MURA's train/valid origin on every image; {without} of {len(records)} have "
            "none (not the MURA-v1.1 layout?): use mode 'patient'"
        )
    origins: dict[str, set[str]] = defaultdict(set)
    for record in records:
        origins[record.patient].add(record.origin or "")
    both = sorted(patient for patient, seen in origins.items() if len(seen) > 1)
    if both:
        raise SplitError(
            f"{len(both)} patient(s) appear in both MURA train and valid (e.g. {', '.join(both[:5])}): "
            "the official split would leak them; use mode 'patient'"
        )
    train_fraction, val_fraction = fractions[0], fractions[1]
    renormalised = (train_fraction / (train_fraction + val_fraction), val_fraction / (train_fraction + val_fraction))
    train_indices = [i for i, record in enumerate(records) if record.origin == "train"]
    chosen = _split_patients(records, train_indices, SPLITS[:2], renormalised, seed)
    chosen.update({i: "test" for i, record in enumerate(records) if record.origin == "valid"})
    if len(train_indices) == len(records):
        log.warning("no MURA valid images among the records: the test split is empty")
    return chosen


def check_patients_disjoint(records: Sequence[ImageRecord], splits: Sequence[str]) -> None:
    """Raise SplitError when any patient has images in two splits (or the lists are misaligned)."""
    if len(records) != len(splits):
        raise SplitError(f"{len(records)} records but {len(splits)} split names")
    seen: dict[str, set[str]] = defaultdict(set)
    for record, split in zip(records, splits, strict=True):
        if split not in SPLITS:
            raise SplitError(f"unknown split {split!r} for {record.relative_path}: expected one of {SPLITS}")
        seen[record.patient].add(split)
    leaked = sorted(patient for patient, names in seen.items() if len(names) > 1)
    if leaked:
        raise SplitError(f"{len(leaked)} patient(s) in more than one split, e.g. {', '.join(leaked[:5])}")


def split_counts(records: Sequence[ImageRecord], splits: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Image counts as part -> "fractured"|"normal" -> split, with every key present (zeros included)."""
    if len(records) != len(splits):
        raise SplitError(f"{len(records)} records but {len(splits)} split names")
    counts = {
        part: {label: dict.fromkeys(SPLITS, 0) for label in LABEL_NAMES}
        for part in sorted({record.part for record in records})
    }
    for record, split in zip(records, splits, strict=True):
        if split not in SPLITS:
            raise SplitError(f"unknown split {split!r}: expected one of {SPLITS}")
        counts[record.part][label_name(record.label)][split] += 1
    return counts


def patient_counts(records: Sequence[ImageRecord], splits: Sequence[str]) -> dict[str, int]:
    """Distinct patients per split (every split present)."""
    if len(records) != len(splits):
        raise SplitError(f"{len(records)} records but {len(splits)} split names")
    patients: dict[str, set[str]] = {split: set() for split in SPLITS}
    for record, split in zip(records, splits, strict=True):
        if split not in SPLITS:
            raise SplitError(f"unknown split {split!r}: expected one of {SPLITS}")
        patients[split].add(record.patient)
    return {split: len(names) for split, names in patients.items()}


def split_unit(records: Sequence[ImageRecord]) -> str:
    """What the split kept together: 'patient', 'image' (no patient ids: FracAtlas) or 'patient and image'."""
    by_image = [record.patient.startswith(IMAGE_GROUP_PREFIX) for record in records]
    if all(by_image) and by_image:
        return "image"
    return "patient and image" if any(by_image) else "patient"


def format_counts(
    counts: Mapping[str, Mapping[str, Mapping[str, int]]], patients: Mapping[str, int] | None = None
) -> str:
    """A plain-text table for the console: a row per part and label, columns train/val/test/total.

    `patients` (see `patient_counts`) adds a row of distinct patients per split, the unit the split is made of.
    """
    header = ("part", "label", *SPLITS, "total")
    body: list[tuple[str, ...]] = []
    totals = dict.fromkeys(SPLITS, 0)
    for part in sorted(counts):
        for label in LABEL_NAMES:
            cells = counts[part].get(label, {})
            values = [int(cells.get(split, 0)) for split in SPLITS]
            for split, value in zip(SPLITS, values, strict=True):
                totals[split] += value
            body.append((part, label, *(str(v) for v in values), str(sum(values))))
    summary = [("all", "images", *(str(totals[s]) for s in SPLITS), str(sum(totals.values())))]
    if patients is not None:
        values = [int(patients.get(split, 0)) for split in SPLITS]
        summary.append(("all", "patients", *(str(v) for v in values), str(sum(values))))
    widths = [max(len(row[i]) for row in (header, *body, *summary)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, body), rule, *map(line, summary)])


def write_split_file(path: Path, records: Sequence[ImageRecord], splits: Sequence[str]) -> None:
    """Write every image with its split (CSV, header SPLIT_FILE_COLUMNS), so the split can be reused and audited.

    When any record has no patient id (IMAGE_GROUP_PREFIX), a `split_unit` column says, per row, whether the
    row was split by patient or by image, so nobody mistakes an image-level split for a patient-level one.
    """
    check_patients_disjoint(records, splits)
    by_image = split_unit(records) != "patient"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow((*SPLIT_FILE_COLUMNS, SPLIT_UNIT_COLUMN) if by_image else SPLIT_FILE_COLUMNS)
        for record, split in zip(records, splits, strict=True):
            row: tuple[str, ...] = (
                record.relative_path,
                record.part,
                record.patient,
                record.study,
                label_name(record.label),
                record.origin or "",
                split,
            )
            if by_image:
                row += ("image" if record.patient.startswith(IMAGE_GROUP_PREFIX) else "patient",)
            writer.writerow(row)


def read_split_file(path: Path, root: Path) -> tuple[list[ImageRecord], list[str]]:
    """Read a split file back: records (absolute paths under `root`) and their splits, in file order.

    Raises SplitError naming the line for anything malformed, and when the file puts a patient in two splits.
    Whether the images exist is not checked here.
    """
    path, root = Path(path), Path(root)
    records: list[ImageRecord] = []
    splits: list[str] = []
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise SplitError(f"cannot read split file {path}: {error}") from error
    with handle:
        reader = csv.DictReader(handle)
        missing = [column for column in SPLIT_FILE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise SplitError(f"{path}: not a split file: missing column(s) {', '.join(missing)}")
        seen: set[str] = set()
        for row in reader:
            where = f"{path}:{reader.line_num}"
            values = {column: (row.get(column) or "").strip() for column in SPLIT_FILE_COLUMNS}
            relative = values["relative_path"]
            pure = PurePosixPath(relative)
            if not relative or pure.is_absolute() or ".." in pure.parts:
                raise SplitError(f"{where}: relative_path must be a relative path inside the root, got {relative!r}")
            if relative in seen:
                raise SplitError(f"{where}: {relative} is listed twice")
            seen.add(relative)
            if values["label"] not in LABEL_NAMES:
                raise SplitError(f"{where}: label must be fractured or normal, got {values['label']!r}")
            if values["split"] not in SPLITS:
                raise SplitError(f"{where}: split must be one of {', '.join(SPLITS)}, got {values['split']!r}")
            if values["origin"] not in ("", "train", "valid"):
                raise SplitError(f"{where}: origin must be empty, train or valid, got {values['origin']!r}")
            empty = [column for column in ("part", "patient", "study") if not values[column]]
            if empty:
                raise SplitError(f"{where}: empty {', '.join(empty)}")
            records.append(
                ImageRecord(
                    path=root.joinpath(*pure.parts),
                    relative_path=relative,
                    part=values["part"],
                    patient=values["patient"],
                    study=values["study"],
                    label=1 if values["label"] == "fractured" else 0,
                    origin=values["origin"] or None,  # type: ignore[arg-type]
                )
            )
            splits.append(values["split"])
    if not records:
        raise SplitError(f"{path}: the split file lists no images")
    check_patients_disjoint(records, splits)
    return records, splits
