"""What the node analyses: radiograph SOP classes and the transfer syntaxes the core decodes; and what it
recognises as its own result objects, which it takes without analysing them. One place for both the DIMSE
door (presentation contexts, C-STORE statuses) and the STOW-RS door (failure reasons)."""

from __future__ import annotations

from pydicom.uid import (
    PYDICOM_ROOT_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.dicom_header import J2K_SYNTAXES, JPEG_SYNTAXES, RLE_SYNTAX
from inference.dicom_objects.series import MANUFACTURER, SERIES_NUMBERS

ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# Digital Mammography X-Ray (1.2.840.10008.5.1.4.1.1.1.2[.1]) is a DX too, and out of scope: refused.

# The SOP classes of the result objects, by kind (inference.dicom_objects; the SR is a Comprehensive SR today,
# the other two SR classes are what a TID 1500 report may also be written as).
RESULT_SOP_CLASSES: dict[str, frozenset[str]] = {
    "sr": frozenset(
        {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}
    ),
    "gsps": frozenset({"1.2.840.10008.5.1.4.1.1.11.1"}),
    "sc": frozenset({"1.2.840.10008.5.1.4.1.1.7"}),
}

ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLE_SYNTAX,
    *sorted(JPEG_SYNTAXES),
    *sorted(J2K_SYNTAXES),
)

# DIMSE C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900


def sop_class_refusal(sop_class_uid: str) -> str | None:
    """Why an instance of this SOP class is refused on its class alone (the DIMSE door then keeps none of it
    while it arrives); None when it is analysed, or may be one of the node's own results (its header says:
    `own_result`; what is not is refused with `not_analysed`)."""
    if any(sop_class_uid in classes for classes in RESULT_SOP_CLASSES.values()):
        return None
    return not_analysed(sop_class_uid)


def not_analysed(sop_class_uid: str) -> str | None:
    """Why an instance of this SOP class is not analysed; None when it is."""
    if sop_class_uid in ACCEPTED_SOP_CLASSES:
        return None
    return (
        f"SOP class {sop_class_uid} is not analysed here; this node takes "
        f"{', '.join(sorted(ACCEPTED_SOP_CLASSES.values()))}"
    )


def transfer_syntax_refusal(transfer_syntax: str) -> str | None:
    if transfer_syntax in ACCEPTED_TRANSFER_SYNTAXES:
        return None
    return f"transfer syntax {transfer_syntax} is not decoded here"


def own_result(
    sop_class_uid: str,
    sop_instance_uid: str,
    manufacturer: str,
    series_number: int | None,
    uid_root: str | None = None,
) -> str | None:
    """The kind ('sr', 'gsps', 'sc') when the instance is a result object this node, or another node or door of
    this software, made; None when it is not.

    A result routed back (a PACS auto-route, or the destination set to the node itself) would be analysed
    again, making results of results without end. Its form says it is one of ours: a SOP class the node writes,
    in the series number it gives that kind. Who made it: the Manufacturer the node writes (any installation:
    two nodes routing to each other loop as well), or a SOP Instance UID under this site's UID root (when one is
    set, and not pydicom's example root, which every pydicom user's objects carry). Form and maker are both
    needed: the form alone would take another vendor's Secondary Capture filed as series 9901."""
    kind = next((k for k, classes in RESULT_SOP_CLASSES.items() if sop_class_uid in classes), None)
    if kind is None or series_number != SERIES_NUMBERS[kind]:
        return None
    if manufacturer.strip() == MANUFACTURER:
        return kind
    root = (uid_root or "").rstrip(".")
    if root and root != _EXAMPLE_ROOT and sop_instance_uid.startswith(root + "."):
        return kind
    return None


_EXAMPLE_ROOT = PYDICOM_ROOT_UID.rstrip(".")
