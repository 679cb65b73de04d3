"""One image of a dataset as the training and evaluation code sees it, whatever the dataset's layout.

Shared by the readers (`training.dataset` for MURA and flat folders, `training.fracatlas`) and everything
downstream (splits, features, evaluation), so no reader has to import another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Origin = Literal["train", "valid"]
ORIGINS: tuple[Origin, ...] = ("train", "valid")


class DatasetError(ValueError):
    """The data cannot be used at all: folder missing, no images, or a requested body part absent."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file and what its location says about it."""

    path: Path  # absolute path of the image file
    relative_path: str  # posix path relative to Dataset.root (stable across machines; used in split files)
    part: str  # lowercase, e.g. "elbow"
    patient: str  # e.g. "patient00001" (MURA patient ids are shared across body parts: one person)
    study: str  # unique study key, e.g. "elbow/patient00001/study1"
    label: int  # 1 fractured (positive), 0 normal (negative)
    origin: Origin | None  # MURA's official split, when the path or CSV says so


def normalize_part(name: str) -> str:
    """`XR_ELBOW`, `Elbow` and `elbow` all name the same part: lowercase without MURA's `XR_` prefix."""
    return name.strip().lower().removeprefix("xr_")


def label_name(label: int) -> str:
    """The words used in split files and reports, so nobody has to remember which of 0/1 is which."""
    return "fractured" if label == 1 else "normal"
