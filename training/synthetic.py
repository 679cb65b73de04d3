"""A small random dataset in MURA's (or the flat) layout, for tests and demos of the training pipeline.

The images are noise with a bright shape that depends on the body part and, for 'fractured' studies, a dark
diagonal line: enough signal that even an untrained backbone separates them a little, so a training run on it
shows the plumbing works. They are not radiographs, and any accuracy measured on them means nothing; a
`SYNTHETIC.md` marker at the dataset root says so, and `read_dataset` reports it (`Dataset.synthetic`).

The structure copies real MURA where it matters to the splitting code: patient ids shared by two body parts
(one person, studies of two parts), patients with one or two studies of one to three images, and the four CSVs
in MURA's exact format.
"""

from __future__ import annotations

import itertools
import logging
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from training.dataset import DEFAULT_PARTS, MURA_FOLDER, SYNTHETIC_MARKER
from training.records import normalize_part

log = logging.getLogger(__name__)

VALID_FRACTION = 0.2
MIN_IMAGE_SIZE = 32
MARKER_TEXT = """# Synthetic data: NOT radiographs

This folder was written by `bfd make-synthetic`. Every image is random synthetic data for tests and demos:
noise, a bright shape that depends on the body part, and a dark diagonal line on 'positive' (fractured)
studies. None of it is a radiograph or comes from a patient.

A model trained or evaluated on it learns nothing about fractures: any accuracy, AUC or threshold measured
here is meaningless. Use MURA-v1.1 (or another real, labelled dataset) for real results.
"""

Grid = tuple[np.ndarray, np.ndarray]  # (y, x) coordinates in [0, 1)


@dataclass(frozen=True)
class _Study:
    origin: Literal["train", "valid"]
    part: str
    patient: str
    number: int
    label: int
    images: int

    def folder(self) -> str:
        return f"study{self.number}_{'positive' if self.label else 'negative'}"


def _disc(grid: Grid, cy: float, cx: float) -> np.ndarray:
    y, x = grid
    return ((y - cy) ** 2 + (x - cx) ** 2) < 0.22**2


def _bars(grid: Grid, cy: float, cx: float) -> np.ndarray:
    y, x = grid
    return (np.abs(y - cy) < 0.3) & (np.sin((x - cx) * 6 * np.pi) > 0.3)


def _ring(grid: Grid, cy: float, cx: float) -> np.ndarray:
    y, x = grid
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    return (r2 > 0.14**2) & (r2 < 0.26**2)


def _cross(grid: Grid, cy: float, cx: float) -> np.ndarray:
    y, x = grid
    return ((np.abs(y - cy) < 0.07) & (np.abs(x - cx) < 0.3)) | ((np.abs(x - cx) < 0.07) & (np.abs(y - cy) < 0.3))


def _square(grid: Grid, cy: float, cx: float) -> np.ndarray:
    y, x = grid
    return (np.abs(y - cy) < 0.2) & (np.abs(x - cx) < 0.2)


PATTERNS: tuple[Callable[[Grid, float, float], np.ndarray], ...] = (_disc, _bars, _ring, _cross, _square)
_PART_PATTERN = {"elbow": 0, "hand": 1, "shoulder": 2}


def _pattern_for(part: str) -> Callable[[Grid, float, float], np.ndarray]:
    """The default parts get distinct shapes; other parts a stable one chosen from the name."""
    index = _PART_PATTERN.get(part, zlib.crc32(part.encode()) % len(PATTERNS))
    return PATTERNS[index]


def _render(rng: np.random.Generator, grid: Grid, part: str, label: int) -> np.ndarray:
    """Noise + the part's bright shape (jittered) + for positives a dark diagonal line: one uint8 image."""
    size = grid[0].shape[0]
    image = rng.normal(70.0, 18.0, size=(size, size))
    cy, cx = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    image[_pattern_for(part)(grid, cy, cx)] += 120.0
    if label:
        y, x = grid
        offset = rng.uniform(-0.15, 0.15)
        line = np.abs((y - x) - offset) < max(1.5 / size, 0.03)
        image[line] = rng.normal(15.0, 5.0, size=int(line.sum()))
    return np.clip(image, 0, 255).astype(np.uint8)


def _plan(parts: Sequence[str], patients_per_part: int, rng: random.Random) -> list[_Study]:
    """Which studies exist: ~80/20 train/valid patients per part, both labels in each, a few shared patients."""
    n_valid = max(1, round(patients_per_part * VALID_FRACTION))
    n_train = patients_per_part - n_valid
    next_id = itertools.count(1)
    ids: dict[tuple[str, str, int], str] = {}
    for part in parts:
        for origin, count in (("train", n_train), ("valid", n_valid)):
            for index in range(count):
                ids[(part, origin, index)] = f"patient{next(next_id):05d}"
    # Like real MURA, some people have studies of two body parts: the same patient id under both parts.
    if len(parts) >= 2:
        ids[(parts[1], "train", n_train - 1)] = ids[(parts[0], "train", 0)]
    if len(parts) >= 3:
        ids[(parts[2], "valid", n_valid - 1)] = ids[(parts[1], "valid", 0)]

    studies: list[_Study] = []
    origins: tuple[tuple[Literal["train", "valid"], int], ...] = (("train", n_train), ("valid", n_valid))
    for part in parts:
        for origin, count in origins:
            for index, labels in enumerate(_study_labels(count, rng)):
                studies.extend(
                    _Study(
                        origin=origin,
                        part=part,
                        patient=ids[(part, origin, index)],
                        number=number,
                        label=label,
                        images=rng.randint(1, 3),
                    )
                    for number, label in enumerate(labels, start=1)
                )
    return studies


def _study_labels(patients: int, rng: random.Random) -> list[list[int]]:
    """Each patient's study labels: half the patients fractured, one or two studies each.

    Labels are mostly per patient (so a patient-level split can spread both labels), with one mixed patient
    (a fractured study, then a normal one) as in real MURA; a lone patient gets one study of each label, so
    every part has both labels in train and in valid.
    """
    if patients == 1:
        return [rng.sample([0, 1], 2)]
    patient_labels = [i % 2 for i in range(patients)]
    rng.shuffle(patient_labels)
    result = [[label] * rng.randint(1, 2) for label in patient_labels]
    if patients >= 4:
        mixed = next(i for i, label in enumerate(patient_labels) if label == 1)
        result[mixed] = [1, 0]
    return result


def _study_dir(out: Path, study: _Study, layout: Literal["mura", "flat"]) -> tuple[Path, str]:
    """The study's folder and, for MURA, its path as MURA's CSVs write it."""
    if layout == "mura":
        relative = f"{MURA_FOLDER}/{study.origin}/XR_{study.part.upper()}/{study.patient}/{study.folder()}"
    else:
        relative = f"{study.part.capitalize()}/{study.patient}/{study.folder()}"
    return out / relative, relative


def make_synthetic(
    out: Path,
    *,
    parts: Sequence[str] = DEFAULT_PARTS,
    patients_per_part: int = 10,
    layout: Literal["mura", "flat"] = "mura",
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """Write a small random dataset to `out` (absent or empty) and return the root to pass to `read_dataset`.

    Deterministic for a seed. Meaningless for accuracy: see the SYNTHETIC.md it writes.
    """
    out = Path(out)
    names = [normalize_part(part) for part in ([parts] if isinstance(parts, str) else parts)]
    if not names or "" in names or len(set(names)) != len(names):
        raise ValueError(f"parts must be distinct non-empty names, got {list(parts)!r}")
    if patients_per_part < 2:
        raise ValueError("patients_per_part must be at least 2 (one train and one valid patient per part)")
    if layout not in ("mura", "flat"):
        raise ValueError(f"layout must be 'mura' or 'flat', got {layout!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")

    studies = _plan(names, patients_per_part, random.Random(seed))
    rng = np.random.default_rng(seed)
    axis = (np.arange(image_size) + 0.5) / image_size
    grid: Grid = (axis[:, None] * np.ones((1, image_size)), np.ones((image_size, 1)) * axis[None, :])
    image_lines: dict[str, list[str]] = {"train": [], "valid": []}
    study_lines: dict[str, list[str]] = {"train": [], "valid": []}
    for study in studies:
        folder, relative = _study_dir(out, study, layout)
        folder.mkdir(parents=True, exist_ok=True)
        study_lines[study.origin].append(f"{relative}/,{study.label}")
        for number in range(1, study.images + 1):
            pixels = _render(rng, grid, study.part, study.label)
            Image.fromarray(pixels).save(folder / f"image{number}.png", compress_level=1)
            image_lines[study.origin].append(f"{relative}/image{number}.png")
    if layout == "mura":
        for origin in ("train", "valid"):
            (out / MURA_FOLDER / f"{origin}_image_paths.csv").write_text("".join(f"{x}\n" for x in image_lines[origin]))
            (out / MURA_FOLDER / f"{origin}_labeled_studies.csv").write_text(
                "".join(f"{x}\n" for x in study_lines[origin])
            )
    (out / SYNTHETIC_MARKER).write_text(MARKER_TEXT)
    n_images = sum(study.images for study in studies)
    log.info("wrote %d synthetic images (%d studies, %s layout) to %s", n_images, len(studies), layout, out)
    return out
