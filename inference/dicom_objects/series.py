"""Where each kind of result object is filed and who it says made it: series, descriptions, equipment.

Each kind goes to a new series of its own in the source study, numbered high so it sorts after the clinical
series; the Secondary Capture keeps 9901, the number the DICOM output has always used. Every series
description says 'RESEARCH USE ONLY - not a diagnosis', and 'UNTRAINED' first when the bundle is: a PACS
list shows the series description long before anyone opens an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.dicom_objects.findings import Algorithm

RESEARCH_USE = "RESEARCH USE ONLY - not a diagnosis"
MANUFACTURER = "Bone-Fracture-Detection (research use only)"
SERIES_NUMBERS = {"sc": 9901, "sr": 9902, "gsps": 9903}
_LABELS = {"sc": "BFD heatmap", "sr": "BFD AI result", "gsps": "BFD annotations"}
_LONG_STRING = 64  # LO: Series Description, Manufacturer's Model Name, Device Serial Number


def series_description(kind: str, *, trained: bool) -> str:
    """E.g. 'BFD AI result UNTRAINED - RESEARCH USE ONLY - not a diagnosis' (at most 64 characters, LO)."""
    label = _LABELS[kind] + ("" if trained else " UNTRAINED")
    text = f"{label} - {RESEARCH_USE}"
    if len(text) > _LONG_STRING:
        raise ValueError(f"series description longer than {_LONG_STRING} characters: {text!r}")
    return text


@dataclass(frozen=True)
class Series:
    """One new series of result objects of one kind, and the moment they were made."""

    kind: str
    uid: str
    number: int
    description: str
    now: datetime

    @classmethod
    def new(cls, kind: str, *, trained: bool, now: datetime | None = None) -> Series:
        return cls(
            kind=kind,
            uid=generate_uid(),
            number=SERIES_NUMBERS[kind],
            description=series_description(kind, trained=trained),
            now=now or datetime.now(),  # DICOM dates and times are local time
        )


def equipment(algorithm: Algorithm | None) -> dict[str, Any]:
    """highdicom keyword arguments of the General Equipment module: the bundle as the device.

    The bundle's sha256 (64 hex digits: exactly an LO) is the Device Serial Number: it names the very files.
    """
    if algorithm is None:
        return {"manufacturer": MANUFACTURER}
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": algorithm.name[:_LONG_STRING],
        "software_versions": algorithm.version[:_LONG_STRING],
        "device_serial_number": algorithm.sha256[:_LONG_STRING],
    }


def stamp(out: Dataset, series: Series) -> None:
    """Series description, and content date and time where the IOD has them (highdicom set them then; a
    presentation state has its Presentation Creation Date instead): one moment for every object of a call."""
    out.SeriesDescription = series.description
    if "ContentDate" in out:
        out.ContentDate = series.now.strftime("%Y%m%d")
        out.ContentTime = series.now.strftime("%H%M%S.%f")
