"""DICOM in: pydicom decodes the pixel data and the image is rendered the way a viewer displays it.

Rendering, in the standard's order: the modality LUT (rescale slope/intercept or LUT) to real units, then the
VOI LUT (a LUT sequence, else the first window centre/width) to display values, scaled to 8 bits;
MONOCHROME1 (white = low values) is inverted so bone is bright as in every other radiograph; 12/16-bit data
without a window is scaled by its actual range. Colour DICOM is reduced to grey like any colour image.

Compressed transfer syntaxes decode through pydicom's pixel-data plugins installed with the service:
pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle and pydicom's own RLE, pyjpegls (JPEG-LS), Pillow (baseline
JPEG) and GDCM (JPEG lossless and extended): all permissively licensed, no GPL decoder.

Patient identifiers stay inside the parsed dataset, which only the DICOM output (issue: a PACS must file it
next to the originals) ever reads; nothing here logs or returns them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
# BodyPartExamined (and the anatomy it often carries) -> body part names used by bundles (MURA's parts).
BODY_PART_ALIASES = {
    "ELBOW": "elbow",
    "HAND": "hand",
    "SHOULDER": "shoulder",
    "FINGER": "finger",
    "FOREARM": "forearm",
    "HUMERUS": "humerus",
    "ARM": "humerus",
    "UPPER ARM": "humerus",
    "UPPERARM": "humerus",
    "WRIST": "wrist",
}


class DicomError(ValueError):
    """The DICOM file cannot become an image; `status` is the HTTP code to answer with."""

    status = 422

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, eq=False)
class DicomImage:
    """A rendered DICOM image and the few facts the service may use."""

    pixels: np.ndarray  # (H, W) uint8, grey, bright bone
    colourfulness: float  # as for PNG/JPEG: 0 for grey sources
    photometric: str
    bits_stored: int
    transfer_syntax: str
    body_part_examined: str | None  # upper-case tag value, when present
    dataset: Any = field(repr=False)  # the parsed pydicom Dataset: for the DICOM output only, never logged or returned


def looks_like_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then 'DICM'."""
    return len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def body_part_from_dicom(value: str | None, known: list[str]) -> str | None:
    """The bundle's body part for a BodyPartExamined value, or None when it names none of them."""
    if not value:
        return None
    part = BODY_PART_ALIASES.get(value.strip().upper(), value.strip().lower())
    return part if part in known else None


def read_dicom(data: bytes, *, max_pixels: int) -> DicomImage:
    """Parse and render one DICOM file's first frame; raises DicomError (422/413/415) with a reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as error:
        raise DicomError(f"not a readable DICOM file: {error}") from error
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        kind = getattr(dataset, "Modality", None) or "this"
        raise DicomError(f"the DICOM file holds no image ({kind} object without pixel data)")
    rows, columns = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise DicomError(f"the DICOM image has no size (Rows={rows}, Columns={columns})")
    if rows * columns > max_pixels:
        raise DicomError(
            f"image is {columns}x{rows} = {rows * columns} pixels, more than the limit of {max_pixels}", 413
        )
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "") or "implicit")
    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    try:
        # Only the first frame is decoded: max_pixels bounds one frame, and decoding every frame of a
        # multi-frame file would let a few kilobytes of compressed frames claim gigabytes.
        dataset.pixel_array_options(index=0)
        array = dataset.pixel_array
    except Exception as error:  # truncated or corrupt pixel data surfaces as many types
        array = _decode_fallback(dataset, syntax, samples, error)
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3 or array.ndim == 3:
        pixels, colourfulness = _colour_to_grey(array, dataset)
    else:
        pixels, colourfulness = _render_grey(array, dataset, photometric), 0.0
    body_part = getattr(dataset, "BodyPartExamined", None)
    return DicomImage(
        pixels=pixels,
        colourfulness=colourfulness,
        photometric=photometric,
        bits_stored=int(getattr(dataset, "BitsStored", 8) or 8),
        transfer_syntax=syntax,
        body_part_examined=str(body_part).strip().upper() if body_part else None,
        dataset=dataset,
    )


def _decode_fallback(dataset: Any, syntax: str, samples: int, error: Exception) -> np.ndarray:
    """The first frame when pydicom's plugins failed, else the DicomError to answer with.

    pydicom's GDCM plugin refuses 12-bit JPEG Extended (the common lossy syntax for 12-bit radiographs)
    although GDCM itself decodes it; the only plugin pydicom accepts for it is GPL. So a grey, unsigned
    12-bit JPEG Extended frame is handed to GDCM directly. Otherwise: 415 when no installed decoder reads
    the transfer syntax at all, 422 when one does and the data is corrupt or truncated.
    """
    from pydicom.uid import JPEGExtended12Bit

    name = getattr(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None), "name", syntax)
    bits = int(getattr(dataset, "BitsStored", 8) or 8)
    if syntax == JPEGExtended12Bit and bits > 8:
        if samples != 1 or int(getattr(dataset, "PixelRepresentation", 0) or 0) != 0:
            raise DicomError(f"DICOM transfer syntax {name} cannot be decoded here for colour or signed data", 415)
        try:
            return _gdcm_jpeg_12bit(dataset)
        except Exception as gdcm_error:
            raise DicomError(
                f"the DICOM pixel data cannot be decoded: {type(gdcm_error).__name__}: {gdcm_error}"
            ) from gdcm_error
    if not _decoder_installed(syntax):
        raise DicomError(f"DICOM transfer syntax {name} cannot be decoded here: {error}", 415) from error
    raise DicomError(f"the DICOM pixel data cannot be decoded: {type(error).__name__}: {error}") from error


def _decoder_installed(syntax: str) -> bool:
    """Whether an installed pixel-data plugin reads this transfer syntax (the uncompressed ones always)."""
    from pydicom.pixels import get_decoder

    if syntax == "implicit":  # no file meta: pydicom reads it as uncompressed
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, ImportError):
        return False


def _gdcm_jpeg_12bit(dataset: Any) -> np.ndarray:
    """The first frame of grey, unsigned 12-bit JPEG Extended pixel data, decoded by GDCM: (rows, columns) uint16."""
    import gdcm
    from pydicom.encaps import get_frame

    rows, columns = int(dataset.Rows), int(dataset.Columns)
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(get_frame(dataset.PixelData, 0, number_of_frames=frames, extended_offsets=extended))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(dataset.PhotometricInterpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(
        gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(dataset.file_meta.TransferSyntaxUID)))
    )
    bits = int(dataset.BitsStored)
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, 0))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str
    if len(raw) != rows * columns * 2:
        raise ValueError(f"GDCM decoded {len(raw)} bytes, expected {rows * columns * 2}")
    return np.frombuffer(raw, dtype="<u2").reshape(rows, columns).copy()


def _render_grey(array: np.ndarray, dataset: Any, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float64)
    if "VOILUTSequence" in dataset:
        values = np.asarray(apply_voi_lut(values, dataset, prefer_lut=True), dtype=np.float64)
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        scaled = values / float(2**bits - 1) * 255.0
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        scaled = _window(values, dataset)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    out = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 255.0)).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, list | tuple) or hasattr(value, "__getitem__") else float(value)


def _window(values: np.ndarray, dataset: Any) -> np.ndarray:
    """The DICOM LINEAR (or LINEAR_EXACT / SIGMOID) window of PS3.3 C.11.2.1.2, onto 0..255."""
    try:
        centre = _first(dataset.WindowCenter)
        width = max(_first(dataset.WindowWidth), 1.0)
    except (TypeError, ValueError):
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    function = str(getattr(dataset, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return (values - centre) / width * 255.0 + 127.5
    return ((values - (centre - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5) * 255.0


def _colour_to_grey(array: np.ndarray, dataset: Any) -> tuple[np.ndarray, float]:
    rgb = np.asarray(array)
    if rgb.dtype != np.uint8:
        bits = int(getattr(dataset, "BitsStored", 8) or 8)
        rgb = np.rint(np.clip(rgb.astype(np.float64) / (2**bits - 1) * 255.0, 0, 255)).astype(np.uint8)
    from PIL import Image

    image = Image.fromarray(rgb, mode="RGB")
    thumb = np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    colourfulness = float(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean())
    return np.asarray(image.convert("L"), dtype=np.uint8), colourfulness
