"""What the node analyses: radiograph SOP classes and the transfer syntaxes the core decodes. One place for
both the DIMSE door (presentation contexts, C-STORE statuses) and the STOW-RS door (failure reasons)."""

from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.dicom_header import J2K_SYNTAXES, JPEG_SYNTAXES, RLE_SYNTAX

ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# Digital Mammography X-Ray (1.2.840.10008.5.1.4.1.1.1.2[.1]) is a DX too, and out of scope: refused.

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
