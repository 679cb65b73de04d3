"""DICOM out: the heatmap overlay and the result text as a Secondary Capture in the source image's study.

A PACS files an object by its patient and study, so the output copies the input's own Patient and General
Study module attributes (and only those present in the input: nothing is invented or added), keeps the
Study Instance UID, and starts a new series whose description says 'research use only'. The result text is
burned into the image (a band above the overlay) and repeated in Image Comments.

Specific Character Set (0008,0005) is copied exactly as the source has it: without it a name like
"Müller^Jürgen" or "山田^太郎" would be written in the default repertoire (ASCII), i.e. as '?'s, and the PACS
would file the result under another patient name.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_DESCRIPTION = "BFD heatmap - RESEARCH USE ONLY - not a diagnosis"
PATIENT_MODULE = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_MODULE = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
SERIES_NUMBER = 9901  # high, so the research series sorts after the clinical ones
BAND_LINE_PX = 18


def _with_text_band(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The image with a black band above it carrying `lines` in white."""
    height, width, _ = rgb.shape
    band = BAND_LINE_PX * len(lines) + 8
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb, mode="RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, line in enumerate(lines):
        draw.text((4, 4 + index * BAND_LINE_PX), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def secondary_capture(source: Any, overlay_rgb: np.ndarray, lines: Sequence[str]) -> bytes:
    """A DICOM Part 10 file (explicit VR little endian): `overlay_rgb` (H, W, 3) uint8 plus `lines` of text."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    pixels = _with_text_band(overlay_rgb, lines)
    now = datetime.now(UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = Dataset()
    out.file_meta = meta
    if "SpecificCharacterSet" in source:  # first: the names below are encoded with it when the file is written
        out["SpecificCharacterSet"] = copy.deepcopy(source["SpecificCharacterSet"])
    for keyword in (*PATIENT_MODULE, *STUDY_MODULE):
        if keyword in source:
            out[keyword] = source[keyword]
    if "StudyInstanceUID" not in out:
        out.StudyInstanceUID = generate_uid()  # a source without one: at least a valid object
    out.SOPClassUID = SECONDARY_CAPTURE
    out.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    out.Modality = "OT"
    out.ConversionType = "WSD"
    out.SeriesInstanceUID = generate_uid()
    out.SeriesNumber = SERIES_NUMBER
    out.SeriesDescription = SERIES_DESCRIPTION
    out.InstanceNumber = 1
    out.ContentDate = now.strftime("%Y%m%d")
    out.ContentTime = now.strftime("%H%M%S")
    out.Manufacturer = "Bone-Fracture-Detection (research use only)"
    out.BurnedInAnnotation = "YES"
    out.ImageComments = " | ".join(lines)[:10240]
    if "SOPInstanceUID" in source and "SOPClassUID" in source:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        out.SourceImageSequence = [reference]
    out.SamplesPerPixel = 3
    out.PhotometricInterpretation = "RGB"
    out.PlanarConfiguration = 0
    out.Rows, out.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    out.BitsAllocated = 8
    out.BitsStored = 8
    out.HighBit = 7
    out.PixelRepresentation = 0
    out.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
