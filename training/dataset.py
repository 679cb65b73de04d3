"""Finding the training images on disk: MURA-v1.1 (with or without its CSVs), the flat per-part layout, FracAtlas.

This module owns the listing only: which image files exist, their body part, patient, study, label and (for
MURA) which official split they came from. Decoding happens later, so an unreadable image is not detected
here; what is detected (a listed file that is missing, a CSV label that disagrees with its folder, an image
outside the patient/study structure) is reported in `Dataset.problems` rather than raised, so one bad line in
a 40,000-image dataset does not stop a training run.

Layouts:

- MURA-v1.1: `<root>/MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyN_positive|negative/imageN.png`,
  with `{train,valid}_image_paths.csv` and `{train,valid}_labeled_studies.csv` inside `MURA-v1.1/` (their
  paths are relative to the folder containing `MURA-v1.1`). `root` may be `MURA-v1.1` itself or its parent.
- flat: `<root>/[...]/<Part>/patientNNNNN/studyN_positive|negative/<image>.png|jpg|jpeg`.
- FracAtlas: `dataset.csv` + `images/Fractured/` + `images/Non_fractured/` (read by `training.fracatlas`: the
  region is the part, and each image is its own patient since FracAtlas has no patient ids).

MURA's "positive" means abnormal in general; this project treats it as "fractured" (label 1).

No TensorFlow here: listing and splitting must work on a machine that only prepares data.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from training import fracatlas
from training.records import ORIGINS, DatasetError, ImageRecord, Origin, label_name, normalize_part

log = logging.getLogger(__name__)

# The same as training.architecture.DEFAULT_PARTS, repeated so this module does not import Keras.
DEFAULT_PARTS = ("elbow", "hand", "shoulder")
SYNTHETIC_MARKER = "SYNTHETIC.md"
MURA_FOLDER = "MURA-v1.1"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
STUDY_PATTERN = re.compile(r"(study\d+)_(positive|negative)", re.IGNORECASE)
PATIENT_PATTERN = re.compile(r"patient\w+", re.IGNORECASE)

Layout = Literal["mura", "flat", "fracatlas"]


@dataclass
class Dataset:
    """The images found under one root, restricted to the requested body parts."""

    root: Path  # the folder relative_path is relative to
    layout: Layout
    records: list[ImageRecord]  # sorted by relative_path, restricted to the requested parts
    parts_found: list[str]  # every part present in the data, sorted (before restriction)
    problems: list[str] = field(default_factory=list)  # human-readable, one per problem
    synthetic: bool = False  # True when SYNTHETIC_MARKER exists in the dataset root

    @property
    def parts(self) -> list[str]:
        """The body parts of the records (the requested ones that were found)."""
        return sorted({record.part for record in self.records})


@dataclass(frozen=True)
class _Parsed:
    part: str
    patient: str
    study: str  # the study key
    label: int  # from the folder suffix


def _parse_components(parts: Sequence[str]) -> _Parsed | None:
    """Read part/patient/study/label from the last four path components (`.../Part/patient/study_x/image`)."""
    if len(parts) < 4:
        return None
    part_dir, patient_dir, study_dir = parts[-4], parts[-3], parts[-2]
    study_match = STUDY_PATTERN.fullmatch(study_dir)
    if study_match is None or PATIENT_PATTERN.fullmatch(patient_dir) is None:
        return None
    part = normalize_part(part_dir)
    if not part:
        return None
    study_name = study_match.group(1).lower()
    label = 1 if study_match.group(2).lower() == "positive" else 0
    return _Parsed(part=part, patient=patient_dir, study=f"{part}/{patient_dir}/{study_name}", label=label)


def _origin_of(components: Sequence[str]) -> Origin | None:
    """The innermost `train`/`valid` folder above the part folder, if any."""
    for component in reversed(components[:-4]):
        lowered = component.lower()
        if lowered == "train":
            return "train"
        if lowered == "valid":
            return "valid"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_image_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(scan_dir: Path, base: Path, skip_top: Iterable[str], problems: list[str]) -> list[ImageRecord]:
    """Every image under `scan_dir` in the part/patient/study structure; hidden files and folders ignored."""
    skip = set(skip_top)
    records = []
    for dirpath, dirnames, filenames in os.walk(scan_dir):
        current = Path(dirpath)
        at_top = current == scan_dir
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d) and not (at_top and d in skip))
        for name in sorted(filenames):
            if _is_hidden(name) or not _has_image_suffix(name):
                continue
            path = current / name
            relative = path.relative_to(base).as_posix()
            components = PurePosixPath(relative).parts
            parsed = _parse_components(components)
            if parsed is None:
                problems.append(f"{relative}: not in a <part>/patient*/studyN_positive|negative folder; skipped")
                continue
            records.append(_record(path, relative, parsed, _origin_of(components)))
    return records


def _record(path: Path, relative: str, parsed: _Parsed, origin: Origin | None) -> ImageRecord:
    return ImageRecord(
        path=path,
        relative_path=relative,
        part=parsed.part,
        patient=parsed.patient,
        study=parsed.study,
        label=parsed.label,
        origin=origin,
    )


def _csv_key(raw: str, mura_dir: Path) -> tuple[str, ...]:
    """A CSV path as components below the MURA folder (its first component names that folder)."""
    components = tuple(c for c in PurePosixPath(raw.strip().replace("\\", "/")).parts if c not in ("", "."))
    if components and components[0] in (MURA_FOLDER, mura_dir.name):
        components = components[1:]
    return components


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)]


def _read_study_labels(path: Path, mura_dir: Path, problems: list[str]) -> dict[tuple[str, ...], int]:
    """`*_labeled_studies.csv`: study folder -> 0/1."""
    labels: dict[tuple[str, ...], int] = {}
    for number, row in _read_csv_rows(path):
        value = row[1].strip() if len(row) >= 2 else ""
        if value not in ("0", "1"):
            problems.append(f"{path.name} line {number}: expected '<study folder>,0|1', got {','.join(row)!r}")
            continue
        labels[_csv_key(row[0], mura_dir)] = int(value)
    return labels


def _read_listed_images(
    path: Path,
    origin: Origin,
    mura_dir: Path,
    base: Path,
    problems: list[str],
) -> list[ImageRecord]:
    """`*_image_paths.csv`: the listed images that exist (labels from their folders, for now)."""
    records = []
    seen: set[str] = set()
    for number, row in _read_csv_rows(path):
        where = f"{path.name} line {number}"
        components = _csv_key(row[0], mura_dir)
        if not components or any(c == ".." or _is_hidden(c) for c in components):
            problems.append(f"{where}: unusable path {row[0]!r}; skipped")
            continue
        parsed = _parse_components(components)
        if parsed is None or not _has_image_suffix(components[-1]):
            problems.append(f"{where}: {row[0]!r} is not a <part>/patient*/studyN_*/image path; skipped")
            continue
        file = mura_dir.joinpath(*components)
        relative = file.relative_to(base).as_posix()
        if relative in seen:
            problems.append(f"{where}: {relative} is listed twice; the repeat is skipped")
            continue
        seen.add(relative)
        if not file.is_file():
            problems.append(f"{where}: {relative} does not exist; skipped")
            continue
        records.append(_record(file, relative, parsed, origin))
    return records


def _apply_study_labels(
    records: list[ImageRecord], study_labels: dict[tuple[str, ...], int], csv_name: str, problems: list[str]
) -> list[ImageRecord]:
    """The study CSV's label wins over the folder suffix; each disagreement is reported once per study."""
    reported: set[str] = set()
    relabelled = []
    for record in records:
        study_key = _study_key(record)
        label = study_labels.get(study_key)
        study_folder = "/".join(study_key)
        if label is None:
            if study_folder not in reported:
                reported.add(study_folder)
                problems.append(f"{csv_name}: study {study_folder} is not listed; using its folder's label")
            relabelled.append(record)
            continue
        if label != record.label and study_folder not in reported:
            reported.add(study_folder)
            problems.append(
                f"{csv_name}: study {study_folder} is labelled {label} ({label_name(label)}) but its folder says "
                f"{label_name(record.label)}; using the CSV label"
            )
        relabelled.append(record if label == record.label else replace(record, label=label))
    return relabelled


def _study_key(record: ImageRecord) -> tuple[str, ...]:
    """The record's study folder as components below the MURA folder (the study CSV's keys)."""
    return PurePosixPath(record.relative_path).parts[1:-1]


def _find_mura_dir(root: Path) -> Path | None:
    """The MURA-v1.1 folder when `root` is it, contains it, or holds MURA's CSVs under another name."""
    if root.name == MURA_FOLDER:
        return root
    if (root / MURA_FOLDER).is_dir():
        return root / MURA_FOLDER
    if any((root / f"{origin}_image_paths.csv").is_file() for origin in ORIGINS):
        return root
    return None


def _read_mura(mura_dir: Path, base: Path, problems: list[str]) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    walked_origins = []
    for origin in ORIGINS:
        image_csv = mura_dir / f"{origin}_image_paths.csv"
        study_csv = mura_dir / f"{origin}_labeled_studies.csv"
        study_labels = _read_study_labels(study_csv, mura_dir, problems) if study_csv.is_file() else None
        if image_csv.is_file():
            found = _read_listed_images(image_csv, origin, mura_dir, base, problems)
            log.debug("%s lists %d existing images", image_csv.name, len(found))
        else:
            walked_origins.append(origin)
            origin_dir = mura_dir / origin
            found = _walk(origin_dir, base, (), problems) if origin_dir.is_dir() else []
            # A walked folder's images are all of this origin, whatever lies above them.
            found = [r if r.origin == origin else replace(r, origin=origin) for r in found]
        if study_labels is not None:
            found = _apply_study_labels(found, study_labels, study_csv.name, problems)
        records.extend(found)
    if walked_origins:
        log.info("no image CSV for %s in %s: walked the folders", "/".join(walked_origins), mura_dir)
    # Anything else inside the MURA folder (outside train/ and valid/) is walked too, without an origin.
    records.extend(_walk(mura_dir, base, ORIGINS, problems))
    return records


def _check_studies(records: Sequence[ImageRecord], problems: list[str]) -> None:
    """One study key with images of both labels means two folders claim the same study."""
    labels: dict[str, set[int]] = defaultdict(set)
    for record in records:
        labels[record.study].add(record.label)
    mixed = [study for study, seen in labels.items() if len(seen) > 1]
    problems.extend(f"study {study} has images labelled both fractured and normal" for study in mixed)


def _requested_parts(parts: Sequence[str] | None) -> list[str] | None:
    if parts is None:
        return None
    names = [parts] if isinstance(parts, str) else list(parts)
    requested = sorted({normalize_part(name) for name in names})
    if not requested or "" in requested:
        raise DatasetError(f"no usable body part requested: {names!r}")
    return requested


def read_dataset(root: str | Path, parts: Sequence[str] | None = DEFAULT_PARTS) -> Dataset:
    """List the images under `root` (MURA-v1.1 or flat layout), keeping only `parts` (None: every part).

    Raises DatasetError when the folder is missing, holds no usable image, or lacks a requested part.
    """
    given = Path(os.path.abspath(Path(root).expanduser()))
    if not given.is_dir():
        raise DatasetError(f"dataset folder {given} does not exist or is not a folder")
    requested = _requested_parts(parts)
    problems: list[str] = []

    fracatlas_root = fracatlas.find_root(given)
    mura_dir = _find_mura_dir(given)
    layout: Layout
    if fracatlas_root is not None:
        base, layout = fracatlas_root, "fracatlas"
        records = fracatlas.training_records(fracatlas_root, problems)
    elif mura_dir is not None:
        base, layout = mura_dir.parent, "mura"
        records = _read_mura(mura_dir, base, problems)
    else:
        base, layout = given, "flat"
        records = _walk(given, base, (), problems)
    synthetic = any((folder / SYNTHETIC_MARKER).is_file() for folder in {given, base})
    if not records:
        raise DatasetError(
            f"no images found under {given}: expected MURA-v1.1, FracAtlas or "
            "<part>/patient*/studyN_positive|negative/*.png"
        )
    records.sort(key=lambda record: record.relative_path)
    _check_studies(records, problems)
    parts_found = sorted({record.part for record in records})
    if requested is not None:
        missing = [part for part in requested if part not in parts_found]
        if missing:
            raise DatasetError(
                f"body part(s) {', '.join(missing)} not found under {given}; available: {', '.join(parts_found)}"
            )
        records = [record for record in records if record.part in requested]
    dataset = Dataset(
        root=base,
        layout=layout,
        records=records,
        parts_found=parts_found,
        problems=problems,
        synthetic=synthetic,
    )
    counts = Counter(record.part for record in records)
    log.info(
        "%s layout at %s: %d images (%s)%s",
        layout,
        base,
        len(records),
        ", ".join(f"{part} {n}" for part, n in sorted(counts.items())),
        " [SYNTHETIC data: meaningless for accuracy]" if synthetic else "",
    )
    if problems:
        log.warning("%d problem(s) while listing %s, e.g. %s", len(problems), given, problems[0])
    return dataset
