"""The Secondary Capture: the heatmap overlay with the answer's text burned in a band above it.

What any PACS viewer can show, even one that renders neither SR nor presentation states. One per source
image (each overlay is of one image), referencing it in Source Image Sequence; the text is repeated in Image
Comments. Without an overlay the object is the text band alone (the source is not decoded again here).

The text wraps to the capture's width (at spaces; a word wider than the room is broken between characters),
the band growing a line at a time: a narrow radiograph cut the sentences at its right edge. Lines are
measured with the very font that draws them, to the right edge of their ink.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from inference.dicom_objects.findings import Algorithm
from inference.dicom_objects.patient_study import CONSTRUCTION_CHARSET, restore_identity
from inference.dicom_objects.series import Series, equipment, stamp
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, new_uid

BAND_LINE_PX = 18
BAND_MARGIN_PX = 4  # left, right and above the text
TEXT_ONLY_WIDTH_PX = 640  # the width of a summary without an overlay: room for the longest summary line
COMMENTS_MAX_CHARS = 10240  # Image Comments is an LT


def with_text_band(rgb: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """(H + band, W, 3) uint8: `rgb` (H, W, 3) uint8 under a black band carrying `lines` in white, each
    wrapped to W (`wrap`); the band is as tall as the wrapped rows need.

    `rgb` None: the band alone, TEXT_ONLY_WIDTH_PX wide.
    """
    height, width = (0, TEXT_ONLY_WIDTH_PX) if rgb is None else rgb.shape[:2]
    rows = [row for line in lines for row in wrap(line, width)]
    band = BAND_LINE_PX * len(rows) + 2 * BAND_MARGIN_PX
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    if rgb is not None:
        canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB"), (0, band))
    for index, row in enumerate(rows):
        canvas.paste((255, 255, 255), (BAND_MARGIN_PX, BAND_MARGIN_PX + index * BAND_LINE_PX), _line_mask(row))
    return np.asarray(canvas, dtype=np.uint8)


@functools.lru_cache(maxsize=4096)
def wrap(line: str, width_px: int) -> tuple[str, ...]:
    """`line` as rows that each fit a band `width_px` wide between its margins (`text_right_px`).

    Greedy at spaces; a word wider than the room is broken between characters. A row holds at least one
    character, so a band too narrow for any (under about 16 px) still shows each one, cut. Cached: a
    study's images share most lines and widths.
    """
    room = width_px - 2 * BAND_MARGIN_PX
    rows: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = f"{current} {word}" if current else word
        if text_right_px(candidate) <= room:
            current = candidate
            continue
        if current:
            rows.append(current)
        current = word
        while text_right_px(current) > room and len(current) > 1:
            cut = _fitting_prefix(current, room)
            rows.append(current[:cut])
            current = current[cut:]
    rows.append(current)
    return tuple(rows)


def text_right_px(text: str) -> int:
    """How far right of where it is drawn `text`'s ink reaches, in pixels, in the band's font."""
    return int(np.ceil(_font().getbbox(text)[2])) if text else 0


def _fitting_prefix(word: str, room: int) -> int:
    """The length of the longest prefix of `word` that fits `room` (at least 1)."""
    low, high = 1, len(word)  # text_right_px(word[:low]) fits or low is 1; word[:high] does not fit
    while high - low > 1:
        middle = (low + high) // 2
        if text_right_px(word[:middle]) <= room:
            low = middle
        else:
            high = middle
    return low


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


@functools.lru_cache(maxsize=1024)
def _line_mask(line: str) -> Image.Image:
    """One line of text as an L mask, rendered once: most lines of a summary (the disclaimer, the untrained
    warning, the model) repeat on every image, and FreeType takes about a millisecond a line. White pasted
    through it onto the black band gives the very pixels drawing the text there would."""
    font = _font()
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
    uid_root: str = DEFAULT_UID_ROOT,
) -> Dataset:
    """An SC image (RGB, explicit VR little endian) of `overlay_rgb` (H, W, 3) uint8 and `lines`, in the source study.

    Tolerates what the older DICOM output tolerated: a source without Study Instance UID gets a new study,
    one without SOP Class/Instance UID no Source Image Sequence. New UIDs are under `uid_root`.
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
        study_instance_uid=str(source.get("StudyInstanceUID") or new_uid(uid_root)),
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=new_uid(uid_root),
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
