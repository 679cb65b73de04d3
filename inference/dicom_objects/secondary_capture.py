"""The Secondary Capture: the heatmap overlay with the answer's text burned in a band above it.

What any PACS viewer can show, even one that renders neither SR nor presentation states. One per source
image (each overlay is of one image), referencing it in Source Image Sequence; the text is repeated in Image
Comments. Without an overlay the object is the text band alone (the source is not decoded again here).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.dicom_objects.findings import Algorithm
from inference.dicom_objects.patient_study import CONSTRUCTION_CHARSET, restore_identity
from inference.dicom_objects.series import Series, equipment, stamp

BAND_LINE_PX = 18
TEXT_ONLY_WIDTH_PX = 640  # the width of a summary without an overlay: room for the longest summary line
COMMENTS_MAX_CHARS = 10240  # Image Comments is an LT


def with_text_band(rgb: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """(H + band, W, 3) uint8: `rgb` (H, W, 3) uint8 under a black band carrying `lines` in white.

    `rgb` None: the band alone, TEXT_ONLY_WIDTH_PX wide.
    """
    height, width = (0, TEXT_ONLY_WIDTH_PX) if rgb is None else rgb.shape[:2]
    band = BAND_LINE_PX * len(lines) + 8
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    if rgb is not None:
        canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB"), (0, band))
    for index, line in enumerate(lines):
        canvas.paste((255, 255, 255), (4, 4 + index * BAND_LINE_PX), _line_mask(line))
    return np.asarray(canvas, dtype=np.uint8)


@functools.lru_cache(maxsize=1024)
def _line_mask(line: str) -> Image.Image:
    """One line of text as an L mask, rendered once: most lines of a summary (the disclaimer, the untrained
    warning, the model) repeat on every image, and FreeType takes about a millisecond a line. White pasted
    through it onto the black band gives the very pixels drawing the text there would."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(line)
    mask = Image.new("L", (max(1, int(right)), max(1, int(bottom))), 0)
    ImageDraw.Draw(mask).text((0, 0), line, fill=255, font=font)
    return mask


def secondary_capture_image(
    source: Dataset,
    overlay_rgb: np.ndarray | None,
    lines: Sequence[str],
    series: Series,
    *,
    algorithm: Algorithm | None = None,
    instance_number: int = 1,
) -> Dataset:
    """An SC image (RGB, explicit VR little endian) of `overlay_rgb` (H, W, 3) uint8 and `lines`, in the source study.

    Tolerates what the older DICOM output tolerated: a source without Study Instance UID gets a new study,
    one without SOP Class/Instance UID no Source Image Sequence.
    """
    if overlay_rgb is not None and (overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3):
        raise ValueError(f"overlay_rgb must be (H, W, 3) uint8, got shape {overlay_rgb.shape}")
    pixels = with_text_band(overlay_rgb, lines)
    image = SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # required by highdicom for PATIENT; replaced below by the source's
        study_instance_uid=str(source.get("StudyInstanceUID") or generate_uid()),
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        specific_character_set=CONSTRUCTION_CHARSET,  # patient and study: the source's, restored below
        **equipment(algorithm),
    )
    restore_identity(image, source)
    stamp(image, series)
    # The overlay is the source as displayed: its orientation is the source's (empty, Type 2C, when unknown).
    image.PatientOrientation = source.get("PatientOrientation")
    image.ConversionType = "WSD"  # rendered by a workstation (the overlay), not digitised from a device
    image.BurnedInAnnotation = "YES"
    image.ImageComments = " | ".join(lines)[:COMMENTS_MAX_CHARS]
    if source.get("SOPClassUID") and source.get("SOPInstanceUID"):
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        image.SourceImageSequence = [reference]
    return image
