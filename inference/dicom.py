"""DICOM in: the header is parsed and checked, the first frame decoded, and rendered the way a viewer shows it.

Three steps, so the cost of a decode is known before any pixel is decoded (`inference.decode_plan`); the
first two are `inference.dicom_header`'s:

1. and 2.: parse and check the header and the pixel data's framing (`inference.dicom_header`: anything
   malformed is a DicomError with a reason, and no decoder allocates for a size other than the one budgeted);
3. :func:`render_dicom` decodes the first frame only and renders it in the standard's order: the modality LUT
   (rescale slope/intercept or LUT) to real units, then the VOI LUT (a LUT sequence, else the first window
   centre/width) to display values, scaled to 8 bits; MONOCHROME1 is inverted so bone is bright; data
   without a window is scaled by its actual range. For 8/16-bit integer data that whole chain is evaluated
   once per possible stored value into a uint8 lookup table (65,536 entries at most), then applied to the
   frame: the same numbers as evaluating it per pixel in float64, without full-size float copies.
   PALETTE COLOR is expanded through its palette (pydicom's ``apply_color_lut``, evaluated on the table),
   YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom (or by the JPEG decoder itself), YBR_RCT / YBR_ICT
   are undone by the JPEG 2000 decoder; colour is then reduced to grey like any colour image, its
   colourfulness measured. Float pixel data and 1-bit data render like other grey data.

Compressed transfer syntaxes decode through pydicom's pixel-data plugins installed with the service:
pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle and pydicom's own RLE, pyjpegls (JPEG-LS), Pillow (baseline
JPEG) and GDCM (JPEG lossless and extended): all permissively licensed, no GPL decoder.

Patient identifiers stay inside the parsed dataset, which only the DICOM outputs (a PACS must file them
next to the originals) ever read; nothing here logs or returns them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.colour import colourfulness
from inference.decode_plan import apply_lut, lut_domain
from inference.dicom_header import (
    JPEG_EXTENDED_12BIT,
    PALETTE,
    DicomError,
    DicomHeader,
    brief,
    check_pixel_data,
    decode_cost,
    first_frame_bytes,
    inflation_cap,
    parse_dicom,
    tag_floats,
    tag_text,
)
from inference.errors import ImageTooLargeError, UnsupportedImageFormatError

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
    # Without a VOI in the file: the (lowest, highest) value after the Modality LUT that the rendering spread over
    # 0..255, so a presentation state can show the source as the model saw it without decoding it again.
    value_range: tuple[float, float] | None = None


def body_part_from_dicom(value: str | None, known: list[str]) -> str | None:
    """The bundle's body part for a BodyPartExamined value, or None when it names none of them."""
    if not value:
        return None
    part = BODY_PART_ALIASES.get(value.strip().upper(), value.strip().lower())
    return part if part in known else None


def read_dicom(data: bytes, *, max_pixels: int, max_decode_bytes: int | None = None) -> DicomImage:
    """Parse, check and render one DICOM file's first frame; an ImageError (DicomError when malformed) if not.

    The service goes through `inference.preprocessing.plan_decode` instead; this is for callers that only want
    the rendering (the desktop preview), with the same pixel limit and, when given, the same decode budget.
    """
    header = parse_dicom(data, max_inflated_bytes=inflation_cap(max_decode_bytes))
    if header.rows * header.columns > max_pixels:
        raise ImageTooLargeError(
            f"image is {header.columns}x{header.rows} = {header.rows * header.columns} pixels, "
            f"more than the limit of {max_pixels}"
        )
    if max_decode_bytes is not None and (cost := decode_cost(header)) > max_decode_bytes:
        raise ImageTooLargeError(f"decoding needs about {cost} bytes; the limit per image is {max_decode_bytes}")
    check_pixel_data(header)
    return render_dicom(header)


# --- 3. decode and render ------------------------------------------------------------------------------------------


def render_dicom(
    header: DicomHeader, decode: Callable[[DicomHeader], tuple[np.ndarray, str]] | None = None
) -> DicomImage:
    """Decode the first frame (with `decode`, default `decode_first_frame`) and render it: (H, W) uint8 grey.

    `decode` lets the caller run the codec elsewhere (`inference.codec_pool`: in a worker process).
    """
    array, photometric = (decode or decode_first_frame)(header)
    dataset = header.dataset
    value_range: tuple[float, float] | None = None
    try:
        if header.photometric == PALETTE:
            pixels, colourfulness = _colour_to_grey(_palette_rgb(array, dataset))
        elif array.ndim == 3:
            if photometric in ("YBR_FULL", "YBR_FULL_422"):  # a decoder that left YCbCr as it was
                from pydicom.pixels import convert_color_space

                array = convert_color_space(array, "YBR_FULL", "RGB")
            pixels, colourfulness = _colour_to_grey(_rgb_to_uint8(array, header.bits_stored))
        else:
            (pixels, value_range), colourfulness = _render_grey(array, header), 0.0
    except DicomError:
        raise
    except Exception as error:  # a LUT or palette pydicom cannot apply, values no rendering can use
        raise DicomError(f"the DICOM image cannot be rendered: {type(error).__name__}: {brief(error)}") from error
    body_part = tag_text(dataset, "BodyPartExamined")
    return DicomImage(
        pixels=pixels,
        colourfulness=colourfulness,
        photometric=header.photometric,
        bits_stored=header.bits_stored,
        transfer_syntax=header.transfer_syntax,
        body_part_examined=body_part.upper() if body_part else None,
        dataset=dataset,
        value_range=value_range,
    )


def decode_first_frame(header: DicomHeader) -> tuple[np.ndarray, str]:
    """The first frame as pydicom's decoders give it (RGB where they convert YCbCr) and its photometric.

    Only the first frame is decoded: max_pixels and the decode budget bound one frame, and decoding every
    frame of a multi-frame file would let a few kilobytes of compressed frames claim gigabytes. The
    decoder is called directly (not ``Dataset.pixel_array``, which caches the array on the dataset and would
    keep it alive as long as the dataset is, i.e. until the answer is sent).
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import ImplicitVRLittleEndian

    syntax = ImplicitVRLittleEndian if header.transfer_syntax == "implicit" else header.transfer_syntax
    # Native grey integers: a view on the dataset's bytes, unused high bits cleared here only when present.
    view = (
        not header.encapsulated
        and header.pixel_keyword == "PixelData"
        and header.bits_allocated in (8, 16)
        and header.samples == 1
    )
    options: dict[str, Any] = {"as_rgb": True}  # pydicom types its options as one TypedDict
    if view:
        options.update(view_only=True, correct_unused_bits=False)
    try:
        array, properties = get_decoder(syntax).as_array(header.dataset, index=0, **options)
    except Exception as error:  # truncated or corrupt pixel data surfaces as many types
        return _decode_fallback(header, error), header.photometric
    if view and header.bits_stored < header.bits_allocated:
        array = _unused_bits_cleared(array, header.bits_stored)
    photometric = str(properties.get("photometric_interpretation", header.photometric)).upper()
    return array, photometric


def _unused_bits_cleared(array: np.ndarray, bits_stored: int) -> np.ndarray:
    """The frame with the bits above BitsStored cleared (or sign-extended), copied only when it needs it.

    PS3.5 8.1.1: those bits cannot be assumed zero (old files keep overlays there). Most writers do leave them
    clear (or sign-extended), and then every value already lies in the BitsStored range: two reductions
    instead of pydicom's copy and two shifts of every frame.
    """
    signed = array.dtype.kind == "i"
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if array.size == 0 or (int(array.max()) <= high and (not signed or int(array.min()) >= low)):
        return array
    shift = 8 * array.dtype.itemsize - bits_stored
    cleared = np.left_shift(array, shift)
    return np.right_shift(cleared, shift, out=cleared)


def _decode_fallback(header: DicomHeader, error: Exception) -> np.ndarray:
    """The first frame when pydicom's plugins failed, else the DicomError to answer with.

    pydicom's GDCM plugin refuses 12-bit JPEG Extended (the common lossy syntax for 12-bit radiographs)
    although GDCM itself decodes it; the only plugin pydicom accepts for it is GPL. So a grey, unsigned
    12-bit JPEG Extended frame is handed to GDCM directly. Otherwise: UnsupportedImageFormatError when no
    installed decoder reads the transfer syntax at all, DicomError when one does and the data is corrupt.
    """
    dataset, syntax = header.dataset, header.transfer_syntax
    name = getattr(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None), "name", syntax)
    if syntax == JPEG_EXTENDED_12BIT and header.bits_stored > 8:
        if header.samples != 1 or header.pixel_representation != 0:
            raise UnsupportedImageFormatError(
                f"DICOM transfer syntax {name} cannot be decoded here for colour or signed data"
            )
        try:
            return _gdcm_jpeg_12bit(header)
        except Exception as gdcm_error:
            raise DicomError(
                f"the DICOM pixel data cannot be decoded: {type(gdcm_error).__name__}: {brief(gdcm_error)}"
            ) from gdcm_error
    if not _decoder_installed(syntax):
        reason = f"DICOM transfer syntax {name} cannot be decoded here: {brief(error)}"
        raise UnsupportedImageFormatError(reason) from error
    raise DicomError(f"the DICOM pixel data cannot be decoded: {type(error).__name__}: {brief(error)}") from error


def _decoder_installed(syntax: str) -> bool:
    """Whether an installed pixel-data plugin reads this transfer syntax (the uncompressed ones always)."""
    from pydicom.pixels import get_decoder

    if syntax == "implicit":  # no file meta: pydicom reads it as uncompressed
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, ImportError):
        return False


def _gdcm_jpeg_12bit(header: DicomHeader) -> np.ndarray:
    """The first frame of grey, unsigned 12-bit JPEG Extended pixel data, decoded by GDCM: (rows, columns) uint16."""
    import gdcm

    dataset, rows, columns = header.dataset, header.rows, header.columns
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(first_frame_bytes(header))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(header.photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(
        gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(dataset.file_meta.TransferSyntaxUID)))
    )
    bits = header.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, 0))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str
    if len(raw) != rows * columns * 2:
        raise ValueError(f"GDCM decoded {len(raw)} bytes, expected {rows * columns * 2}")
    return np.frombuffer(raw, dtype="<u2").reshape(rows, columns)


def _render_grey(array: np.ndarray, header: DicomHeader) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT, VOI LUT or window (else min-max), MONOCHROME1 inverted: (H, W) uint8, and the min-max
    range used (None when the file's VOI decided).

    8/16-bit integer data: the chain is evaluated on every possible stored value (a table of 256 or 65,536
    entries, the very float64 arithmetic a per-pixel evaluation would do) and the table applied to the frame.
    """
    from pydicom.pixels import apply_modality_lut

    dataset = header.dataset
    if array.dtype.kind in "ui" and array.dtype.itemsize <= 2:
        domain, index_dtype = lut_domain(array.dtype)
        index = array.view(index_dtype)
        values = np.asarray(apply_modality_lut(domain, dataset), dtype=np.float64)
        low_high = None
        if not _has_voi(dataset):
            if dataset.get("ModalityLUTSequence"):  # any mapping: the range of the values present
                present = _present(index, domain.size)
                low_high = (float(values[present].min()), float(values[present].max()))
            else:  # rescale is monotonic: the extremes of the stored values give the range
                ends = values[np.array([array.min(), array.max()], dtype=array.dtype).view(index_dtype)]
                low_high = (float(ends.min()), float(ends.max()))
        return apply_lut(_to_display(values, dataset, header.photometric, low_high), index), low_high
    values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():  # float data may hold NaN or infinities: shown as the lowest real value
        values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
    value_range = None if _has_voi(dataset) else (float(values.min()), float(values.max()))
    return _to_display(values, dataset, header.photometric, value_range), value_range


def _present(index: np.ndarray, size: int) -> np.ndarray:
    """Which table positions occur in `index` (bincount chunk by chunk: it converts to intp)."""
    counts = np.zeros(size, dtype=np.int64)
    flat = index.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start : start + (1 << 20)], minlength=size)
    return counts > 0


def _has_voi(dataset: Any) -> bool:
    return bool(dataset.get("VOILUTSequence")) or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _to_display(values: np.ndarray, dataset: Any, photometric: str, low_high: tuple[float, float] | None) -> np.ndarray:
    """Modality-LUT output (float64) -> display values 0..255 uint8, same shape.

    One working copy of `values`, operated on in place, in the very order of operations of the per-pixel
    formulas (so a table evaluated here holds exactly what evaluating every pixel would give).
    """
    from pydicom.pixels import apply_voi_lut

    if dataset.get("VOILUTSequence"):
        # The LUT is indexed by integers; integral float input gives the same entries without pydicom's warning.
        integral = values.size and np.abs(values).max() < 2**53 and np.array_equal(values, np.trunc(values))
        voi_input = values.astype(np.int64) if integral else values
        scaled = np.asarray(apply_voi_lut(voi_input, dataset, prefer_lut=True), dtype=np.float64)
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        scaled /= float(2**bits - 1)
        scaled *= 255.0
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        scaled = _window(values, dataset)
    else:
        low, high = low_high if low_high is not None else (float(values.min()), float(values.max()))
        scaled = values - low
        if high > low:
            scaled /= high - low
            scaled *= 255.0
        else:
            scaled[...] = 0.0
    np.nan_to_num(scaled, copy=False)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    out = np.rint(scaled, out=scaled).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def _window(values: np.ndarray, dataset: Any) -> np.ndarray:
    """The DICOM LINEAR (or LINEAR_EXACT / SIGMOID) window of PS3.3 C.11.2.1.2, onto 0..255 (first window)."""
    centre = tag_floats(dataset, "WindowCenter")[0]
    width = max(tag_floats(dataset, "WindowWidth")[0], 1.0)
    function = (tag_text(dataset, "VOILUTFunction") or "LINEAR").upper()
    if function == "SIGMOID":  # 255 / (1 + exp(-4 (v - c) / w))
        scaled = values - centre
        scaled *= -4.0
        scaled /= width
        np.exp(scaled, out=scaled)
        scaled += 1.0
        return np.divide(255.0, scaled, out=scaled)
    if function == "LINEAR_EXACT":  # (v - c) / w * 255 + 127.5
        scaled = values - centre
        scaled /= width
        scaled *= 255.0
        scaled += 127.5
        return scaled
    scaled = values - (centre - 0.5)  # ((v - (c - 0.5)) / (w - 1) + 0.5) * 255
    scaled /= width - 1.0 if width > 1 else 1.0
    scaled += 0.5
    scaled *= 255.0
    return scaled


def _rgb_to_uint8(rgb: np.ndarray, bits_stored: int) -> np.ndarray:
    """(H, W, 3) colour scaled by its bit depth to uint8 (a lookup table for 16-bit data)."""
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind in "ui" and rgb.dtype.itemsize <= 2:
        domain, index_dtype = lut_domain(rgb.dtype)
        lut = np.rint(np.clip(domain.astype(np.float64) / (2**bits_stored - 1) * 255.0, 0, 255)).astype(np.uint8)
        return apply_lut(lut, rgb.view(index_dtype))
    return np.rint(np.clip(rgb.astype(np.float64) / (2**bits_stored - 1) * 255.0, 0, 255)).astype(np.uint8)


def _palette_rgb(array: np.ndarray, dataset: Any) -> np.ndarray:
    """PALETTE COLOR indices -> (H, W, 3) uint8 through the file's palette (pydicom's apply_color_lut).

    The palette is evaluated once on every possible index, scaled to 8 bits by its nominal entry depth
    (8-bit entries are often stored in 16-bit words), then looked up per channel.
    """
    from pydicom.pixels import apply_color_lut

    if array.dtype.kind not in "ui" or array.dtype.itemsize > 2:
        raise DicomError(f"PALETTE COLOR needs 8- or 16-bit indices, got {array.dtype}")
    domain, index_dtype = lut_domain(array.dtype)
    table = np.asarray(apply_color_lut(domain, dataset))[:, :3].astype(np.float64)
    depth = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    table8 = np.rint(np.clip(table / float(2**depth - 1) * 255.0, 0, 255)).astype(np.uint8)
    index = array.view(index_dtype)
    rgb = np.empty((*array.shape, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = apply_lut(np.ascontiguousarray(table8[:, channel]), index)
    return rgb


def _colour_to_grey(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8), colourfulness(image)
