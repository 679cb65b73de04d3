"""Where each kind of result object is filed and who it says made it: series, descriptions, equipment.

Each kind goes to a new series of its own in the source study, numbered high so it sorts after the clinical
series; the Secondary Capture keeps 9901, the number the DICOM output has always used. Every series
description says 'RESEARCH USE ONLY - not a diagnosis', and 'UNTRAINED' first when the bundle is: a PACS
list shows the series description long before anyone opens an object.

The image series (GSPS, SC: General Series module) say what their sources show: Body Part Examined and
Laterality. Both are series-level, and a series holds the objects of every image of the study, so each is the
sources' common value: Body Part Examined when every source has the same one, else absent. Laterality is
Type 2C, required of a paired body part when the object has no Image Laterality (ours have none) and not
allowed otherwise: absent when the body part is one of UNPAIRED_BODY_PARTS; else R or L when every source
says so (by Laterality, else Image Laterality), else empty, which is 'unknown' (Laterality knows only R and
L: an image of both sides, B, has none to give). A body part not known to be unpaired, or none, counts as
paired: dciodvfy, the standard's validator, requires Laterality then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from inference.dicom_objects.findings import Algorithm
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, new_uid

RESEARCH_USE = "RESEARCH USE ONLY - not a diagnosis"
MANUFACTURER = "Bone-Fracture-Detection (research use only)"
SERIES_NUMBERS = {"sc": 9901, "sr": 9902, "gsps": 9903}
_LABELS = {"sc": "BFD heatmap", "sr": "BFD AI result", "gsps": "BFD annotations"}
LATERALITIES = ("R", "L")  # Laterality (0020,0060)'s enumerated values
IMAGE_SERIES = ("gsps", "sc")  # the kinds whose objects have a General Series module (the SR has its own)
# Body Part Examined terms of unpaired parts (PS3.16 Annex L): those the standard and dciodvfy both hold unpaired
# (dciodvfy requires Laterality of a few the current standard calls unpaired, such as MANDIBLE: those are
# left out, so a series of them has an empty Laterality, which dciodvfy accepts and the standard tolerates).
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BACK", "BLADDER", "BRAIN", "CEREBELLUM", "CERVIX", "CHEST",
        "CHESTABDOMEN", "CHESTABDPELVIS", "CIRCLEOFWILLIS", "COCCYX", "COLON", "CSPINE", "CTSPINE", "DUODENUM",
        "ESOPHAGUS", "FACE", "GALLBLADDER", "HEAD", "HEADNECK", "HEART", "ILEUM", "JAW", "JEJUNUM", "LARYNX",
        "LIVER", "LSPINE", "LSSPINE", "MAXILLA", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST", "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV", "NOSE", "PANCREAS", "PELVIS", "PENIS", "PHARYNX", "PROSTATE", "RECTUM", "SCALP",
        "SKULL", "SPINE", "SPLEEN", "SSPINE", "STERNUM", "STOMACH", "THYROID", "TLSPINE", "TONGUE", "TRACHEA",
        "TSPINE", "URETHRA", "UTERUS", "VAGINA", "VULVA", "WHOLEBODY",
    }
)  # fmt: skip
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
    """One new series of result objects of one kind, the moment they were made, and what its sources show."""

    kind: str
    uid: str
    number: int
    description: str
    now: datetime
    laterality: str | None = ""  # Laterality (0020,0060): R, L, empty (unknown) or None (absent: unpaired part)
    body_part: str | None = None  # Body Part Examined (0018,0015); None: absent

    @classmethod
    def new(
        cls,
        kind: str,
        *,
        trained: bool,
        now: datetime | None = None,
        uid_root: str = DEFAULT_UID_ROOT,
        sources: Sequence[Dataset] = (),
    ) -> Series:
        """A new series of `kind` whose UID is under `uid_root`, presenting `sources` (the images it is of)."""
        sides = {laterality_of(source) for source in sources}
        parts = {str(source.get("BodyPartExamined") or "").strip() for source in sources}
        body_part = (parts.pop() or None) if len(parts) == 1 else None
        unpaired = body_part is not None and body_part.upper() in UNPAIRED_BODY_PARTS
        laterality = None if unpaired else (sides.pop() if len(sides) == 1 else "")
        return cls(
            kind=kind,
            uid=new_uid(uid_root),
            number=SERIES_NUMBERS[kind],
            description=series_description(kind, trained=trained),
            now=now or datetime.now(),  # DICOM dates and times are local time
            laterality=laterality,
            body_part=body_part,
        )


def laterality_of(source: Dataset) -> str:
    """R or L: the source's Laterality, else its Image Laterality; empty when neither says R or L."""
    for keyword in ("Laterality", "ImageLaterality"):
        side = str(source.get(keyword) or "").strip().upper()
        if side in LATERALITIES:
            return side
    return ""


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
    presentation state has its Presentation Creation Date instead): one moment for every object of a call.
    An image series' Laterality (always: Type 2C) and Body Part Examined (when known)."""
    out.SeriesDescription = series.description
    if series.kind in IMAGE_SERIES:
        if series.laterality is not None:
            out.Laterality = series.laterality or None  # None: present and empty
        if series.body_part:
            out.BodyPartExamined = series.body_part
    if "ContentDate" in out:
        out.ContentDate = series.now.strftime("%Y%m%d")
        out.ContentTime = series.now.strftime("%H%M%S.%f")
