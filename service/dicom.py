"""DICOM in: the header is parsed and checked, the first frame decoded, and rendered the way a viewer shows it.

Three steps, so the cost of a decode is known before any pixel is decoded (`service.decode_plan`):

1. :func:`parse_dicom` reads the dataset (pixel data bytes included, nothing decoded) and validates every
   attribute the decode depends on: Rows, Columns, Bits Allocated/Stored, Samples per Pixel, Pixel
   Representation, Number of Frames, Photometric Interpretation, rescale, window, LUT sequences and the
   nesting depth of sequences. Anything malformed is a :class:`DicomError` (422) with a reason, never a
   Python exception (an empty VOI LUT Sequence or Rows with two values used to answer 500).
2. :func:`check_pixel_data` checks, still without decoding, that the pixel data can hold what the header
   declares: the length of native data; for compressed data, the first frame's codestream header (JPEG and
   JPEG-LS SOF, JPEG 2000 SIZ, RLE segment table) must agree with Rows, Columns and samples, so no decoder
   allocates for a size other than the one budgeted.
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

Patient identifiers stay inside the parsed dataset, which only the DICOM output (issue: a PACS must file it
next to the originals) ever reads; nothing here logs or returns them.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.decode_plan import apply_lut, display_bytes, lut_bytes, lut_domain, with_slack

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
# Real images nest a handful of levels (functional groups, request attributes); pydicom recurses per level.
MAX_SEQUENCE_DEPTH = 32
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
PALETTE = "PALETTE COLOR"
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"})
JPEG_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)})
J2K_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)})
RLE_SYNTAX = "1.2.840.10008.1.2.5"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"


class DicomError(ValueError):
    """The DICOM file cannot become an image; `status` is the HTTP code to answer with."""

    status = 422

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, eq=False)
class DicomHeader:
    """A parsed, validated DICOM image header: what decoding its first frame will need."""

    dataset: Any = field(repr=False)  # the pydicom Dataset; pixel data read, not decoded
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    frames: int
    photometric: str
    transfer_syntax: str  # UID, or "implicit" for a file without file meta
    pixel_keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData
    encapsulated: bool
    pixel_data_bytes: int  # length of the pixel data element's value (all frames)
    inflated_bytes: int = 0  # Deflated transfer syntax: the inflated size of the data set

    @property
    def bytes_per_sample(self) -> int:
        """Bytes per sample of the decoded array (1-bit data unpacks to one byte per pixel)."""
        return max(1, self.bits_allocated // 8)


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


def read_dicom(data: bytes, *, max_pixels: int, max_decode_bytes: int | None = None) -> DicomImage:
    """Parse, check and render one DICOM file's first frame; raises DicomError (422/413/415) with a reason.

    The service goes through `service.preprocessing.plan_decode` instead; this is for callers that only want
    the rendering (the desktop preview), with the same pixel limit and, when given, the same decode budget.
    """
    header = parse_dicom(data, max_inflated_bytes=max_decode_bytes)
    if header.rows * header.columns > max_pixels:
        raise DicomError(
            f"image is {header.columns}x{header.rows} = {header.rows * header.columns} pixels, "
            f"more than the limit of {max_pixels}",
            413,
        )
    if max_decode_bytes is not None and (cost := decode_cost(header)) > max_decode_bytes:
        raise DicomError(f"decoding needs about {cost} bytes; the limit per image is {max_decode_bytes}", 413)
    check_pixel_data(header)
    return render_dicom(header)


# --- 1. header -----------------------------------------------------------------------------------------------------


def parse_dicom(data: bytes, *, force: bool = False, max_inflated_bytes: int | None = None) -> DicomHeader:
    """Read the dataset (pixel data not decoded) and validate what the decode depends on; DicomError if not."""
    import pydicom

    inflated = _inflated_size(data, max_inflated_bytes) if DEFLATED_SYNTAX.encode() in data[:4096] else 0
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=force or not looks_like_dicom(data))
    except RecursionError as error:
        raise DicomError("not a readable DICOM file: its sequences are nested too deeply to read") from error
    except Exception as error:  # pydicom reports broken files with many exception types
        raise DicomError(f"not a readable DICOM file: {type(error).__name__}: {_short(error)}") from error
    _check_nesting(dataset)
    keyword = next((k for k in PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        kind = _text(dataset, "Modality") or "this"
        raise DicomError(f"the DICOM file holds no image ({kind} object without pixel data)")
    rows, columns = _int(dataset, "Rows", 0, 65535, None), _int(dataset, "Columns", 0, 65535, None)
    if rows < 1 or columns < 1:
        raise DicomError(f"the DICOM image has no size (Rows={rows}, Columns={columns})")
    default_bits = {"PixelData": 8, "FloatPixelData": 32, "DoubleFloatPixelData": 64}[keyword]
    bits_allocated = _int(dataset, "BitsAllocated", 1, 64, None if keyword == "PixelData" else default_bits)
    allowed = (1, 8, 16, 32, 64) if keyword == "PixelData" else (default_bits,)
    if bits_allocated not in allowed:
        raise DicomError(
            f"BitsAllocated must be one of {', '.join(map(str, allowed))} for {keyword}, got {bits_allocated}"
        )
    bits_stored = _int(dataset, "BitsStored", 1, 64, bits_allocated)
    if bits_stored > bits_allocated:
        raise DicomError(f"BitsStored must be at most BitsAllocated ({bits_allocated}), got {bits_stored}")
    samples = _int(dataset, "SamplesPerPixel", 1, 3, 1)
    photometric = (_text(dataset, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
    needed = 1 if photometric in GREY or photometric == PALETTE else 3 if photometric in COLOUR else 0
    if needed == 0:
        raise DicomError(f"PhotometricInterpretation {photometric!r} is not supported")
    if samples != needed:
        raise DicomError(f"PhotometricInterpretation {photometric} needs SamplesPerPixel {needed}, got {samples}")
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "") or "implicit")
    value = _value(dataset, keyword)
    if not value:
        raise DicomError(f"the DICOM {keyword} element is empty")
    for keyword_ in ("RescaleSlope", "RescaleIntercept"):
        _floats(dataset, keyword_, single=True)
    if "WindowCenter" in dataset or "WindowWidth" in dataset:
        _floats(dataset, "WindowCenter")
        _floats(dataset, "WindowWidth")
    _check_lut_sequence(dataset, "ModalityLUTSequence", (8, 16))  # PS3.3 C.11.1.1.1: 8 or 16 bits
    _check_lut_sequence(dataset, "VOILUTSequence", (8, *range(10, 17)))  # PS3.3 C.11.2.1.1: 8 or 10..16
    return DicomHeader(
        dataset=dataset,
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=_int(dataset, "PixelRepresentation", 0, 1, 0),
        frames=_int(dataset, "NumberOfFrames", 1, 2**31 - 1, 1),
        photometric=photometric,
        transfer_syntax=syntax,
        pixel_keyword=keyword,
        encapsulated=syntax != "implicit" and _is_encapsulated(syntax, value),
        pixel_data_bytes=len(value),
        inflated_bytes=inflated,
    )


def _is_encapsulated(syntax: str, value: bytes) -> bool:
    """Compressed pixel data; for a private transfer syntax, judged by the first item tag of the value."""
    from pydicom.uid import UID

    try:
        return bool(UID(syntax).is_encapsulated)
    except ValueError:  # not a transfer syntax pydicom knows
        return bytes(value[:4]) == b"\xfe\xff\x00\xe0"


def _short(error: BaseException, limit: int = 160) -> str:
    text = str(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(dataset: Any, keyword: str) -> str | None:
    try:
        value = dataset.get(keyword)
    except Exception:
        return None
    if value is None or isinstance(value, bytes):
        return None
    return str(value).strip() or None


def _value(dataset: Any, keyword: str) -> Any:
    try:
        return dataset[keyword].value
    except Exception as error:  # pydicom converts raw values lazily; a broken one fails here
        raise DicomError(f"{keyword} cannot be read: {type(error).__name__}: {_short(error)}") from error


def _int(dataset: Any, keyword: str, low: int, high: int, default: int | None) -> int:
    """One integer in [low, high]; `default` when absent (None: the attribute is required)."""
    if keyword not in dataset or _value(dataset, keyword) in (None, "", b""):
        if default is None:
            raise DicomError(f"{keyword} is missing; it is required to decode the image")
        return default
    value = _value(dataset, keyword)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        raise DicomError(f"{keyword} must hold one integer, got {len(value)} values")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise DicomError(f"{keyword} must be an integer, got {str(value)[:40]!r}") from error
    if not low <= number <= high:
        raise DicomError(f"{keyword} must be from {low} to {high}, got {number}")
    return number


def _floats(dataset: Any, keyword: str, *, single: bool = False) -> list[float]:
    """The finite numbers of a DS attribute (empty list when absent)."""
    if keyword not in dataset:
        return []
    value = _value(dataset, keyword)
    many = isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
    values = list(value) if many else [value]
    if single and len(values) != 1:
        raise DicomError(f"{keyword} must hold one number, got {len(values)} values")
    try:
        numbers = [float(str(v).strip()) if isinstance(v, str | bytes) else float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise DicomError(f"{keyword} must hold numbers, got {str(value)[:40]!r}") from error
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise DicomError(f"{keyword} must hold finite numbers, got {str(value)[:40]!r}")
    return numbers


def _check_lut_sequence(dataset: Any, keyword: str, depths: tuple[int, ...]) -> None:
    """A Modality/VOI LUT Sequence, when present, has an item with a LUT Descriptor and LUT Data."""
    if keyword not in dataset:
        return
    sequence = _value(dataset, keyword)
    if not sequence:
        raise DicomError(f"{keyword} is present but holds no item (an item with a LUT is required)")
    try:
        item = sequence[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        entries = len(item["LUTData"].value or b"")
    except Exception as error:
        raise DicomError(f"{keyword} has no readable LUT Descriptor and LUT Data: {type(error).__name__}") from error
    if len(descriptor) != 3 or descriptor[0] < 0 or descriptor[2] not in depths:
        raise DicomError(
            f"{keyword} LUT Descriptor must be (entries, first value, bits in {sorted(set(depths))}), got {descriptor}"
        )
    if entries == 0:
        raise DicomError(f"{keyword} holds an empty LUT Data")


def _check_nesting(dataset: Any) -> None:
    """Refuse sequences nested deeper than MAX_SEQUENCE_DEPTH, walking iteratively (pydicom would recurse)."""
    from pydicom.datadict import dictionary_VR

    stack = [(dataset, 1)]
    try:
        while stack:
            current, depth = stack.pop()
            for element in current.elements():
                vr = element.VR
                if vr is None:
                    try:
                        vr = dictionary_VR(element.tag)
                    except KeyError:
                        continue
                if vr != "SQ":
                    continue
                if depth > MAX_SEQUENCE_DEPTH:
                    raise DicomError(f"the DICOM sequences are nested more than {MAX_SEQUENCE_DEPTH} levels deep")
                stack.extend((item, depth + 1) for item in (current[element.tag].value or []))
    except DicomError:
        raise
    except RecursionError as error:
        raise DicomError("the DICOM sequences are nested too deeply to read") from error
    except Exception as error:
        raise DicomError(f"a DICOM sequence cannot be read: {type(error).__name__}: {_short(error)}") from error


def _inflated_size(data: bytes, limit: int | None) -> int:
    """The inflated size of a Deflated Explicit VR Little Endian data set, counted without keeping it.

    pydicom inflates the whole data set at once while reading: a few megabytes of zeros can inflate to
    gigabytes, so the size is counted first (in bounded chunks) and refused over `limit` (413).
    """
    if not looks_like_dicom(data) or data[132:136] != b"\x02\x00\x00\x00":
        return 0
    (group_length,) = struct.unpack_from("<I", data, 140)
    stream = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending, cap = 0, data[144 + group_length :], limit if limit is not None else 2**31
    try:
        while pending and total <= cap:
            total += len(stream.decompress(pending, 1 << 20))
            pending = stream.unconsumed_tail
    except zlib.error as error:
        raise DicomError(f"the deflated DICOM data set cannot be inflated: {error}") from error
    if total > cap:
        raise DicomError(f"the deflated DICOM data set inflates to more than {cap} bytes", 413)
    return total


# --- 2. pixel data against the header ------------------------------------------------------------------------------


def check_pixel_data(header: DicomHeader) -> None:
    """The pixel data can hold what the header declares (native) or its first codestream agrees (compressed)."""
    if not header.encapsulated:
        expected = native_length(header)
        if header.pixel_data_bytes < expected:
            raise DicomError(
                f"the DICOM pixel data holds {header.pixel_data_bytes} bytes, but Rows x Columns x SamplesPerPixel"
                f" x BitsAllocated x NumberOfFrames = {header.rows}x{header.columns}x{header.samples}"
                f"x{header.bits_allocated}x{header.frames} declare {expected}"
            )
        return
    frame = first_frame_bytes(header)
    if header.transfer_syntax in JPEG_SYNTAXES:
        from pydicom.pixels.utils import _get_jpg_parameters

        info = _get_jpg_parameters(frame)
        if not info:
            raise DicomError("the first frame is not a JPEG codestream (no SOI and SOF markers where expected)")
        kind = "JPEG-LS" if header.transfer_syntax.endswith((".80", ".81")) else "JPEG"
        _compare(header, kind, info["width"], info["height"], info["components"], [info["precision"]])
    elif header.transfer_syntax in J2K_SYNTAXES:
        siz = _j2k_size(frame)
        if siz is None:
            raise DicomError("the first frame is not a JPEG 2000 codestream (no SOC and SIZ markers)")
        _compare(header, "JPEG 2000", *siz)
    elif header.transfer_syntax == RLE_SYNTAX:
        _check_rle(header, frame)


def native_length(header: DicomHeader) -> int:
    """Bytes of uncompressed pixel data the header declares, all frames (PS3.5 8.1.1)."""
    samples = 2 if header.photometric == "YBR_FULL_422" else header.samples  # 4:2:2 stores 2 samples per pixel
    return math.ceil(header.rows * header.columns * samples * header.frames * header.bits_allocated / 8)


def first_frame_bytes(header: DicomHeader) -> bytes:
    """The compressed first frame, taken from the encapsulated pixel data."""
    from pydicom.encaps import get_frame

    ds = header.dataset
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=header.frames, extended_offsets=extended)
    except Exception as error:
        raise DicomError(
            f"the encapsulated DICOM pixel data is broken: {type(error).__name__}: {_short(error)}"
        ) from error
    if not frame:
        raise DicomError("the first frame of the encapsulated DICOM pixel data is empty")
    return bytes(frame)


def _compare(header: DicomHeader, kind: str, width: int, height: int, components: int, bits: list[int]) -> None:
    if (width, height, components) == (header.columns, header.rows, header.samples) and all(
        1 <= b <= header.bits_allocated for b in bits
    ):
        return
    raise DicomError(
        f"the {kind} codestream of the first frame is {width}x{height} with {components} component(s) of "
        f"{max(bits, default=0)} bits, but the DICOM header declares {header.columns}x{header.rows} with "
        f"{header.samples} sample(s) of at most {header.bits_allocated} bits (BitsAllocated)"
    )


def _j2k_size(stream: bytes) -> tuple[int, int, int, list[int]] | None:
    """(width, height, components, bits per component) from a JPEG 2000 SIZ marker (ISO 15444-1 A.5.1)."""
    offset = 0
    if stream.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file: find the contiguous codestream box
        offset = 12
        while offset + 8 <= len(stream) and stream[offset + 4 : offset + 8] != b"jp2c":
            (length,) = struct.unpack_from(">I", stream, offset)
            if length == 1 and offset + 16 <= len(stream):
                (length,) = struct.unpack_from(">Q", stream, offset + 8)
            if length < 8:
                return None
            offset += length
        offset += 8
    if stream[offset : offset + 4] != b"\xff\x4f\xff\x51" or len(stream) < offset + 42:
        return None
    _, _, x, y, x0, y0, _, _, _, _, count = struct.unpack_from(">HHIIIIIIIIH", stream, offset + 4)
    start = offset + 42
    if len(stream) < start + 3 * count:
        return None
    bits = [(stream[start + 3 * i] & 0x7F) + 1 for i in range(count)]
    return x - x0, y - y0, count, bits


def _check_rle(header: DicomHeader, frame: bytes) -> None:
    """The RLE header (PS3.5 G.5) lists one segment per sample byte, each able to yield Rows x Columns bytes.

    PS3.5 G.3.1: a replicate run is 2 bytes (n in -1..-127, then the byte) yielding 1 - n <= 128 bytes; a
    literal run of n + 1 bytes costs n + 2; n = -128 yields nothing. So a segment of L bytes decodes to at
    most 128 * (L // 2) bytes (64 per byte), and a segment shorter than Rows x Columns / 64 is impossible.
    """
    if len(frame) < 64:
        raise DicomError(f"the RLE frame must start with a 64-byte header, got {len(frame)} bytes")
    count, *offsets = struct.unpack_from("<16I", frame)
    expected = header.samples * header.bytes_per_sample
    if header.bits_allocated == 1 or count != expected:
        raise DicomError(
            f"the RLE header lists {count} segments, but SamplesPerPixel x BitsAllocated / 8 = "
            f"{header.samples} x {header.bits_allocated} / 8 needs {expected}"
        )
    starts = offsets[:count]
    ends = [*starts[1:], len(frame)]
    if starts[0] != 64 or any(not s < e <= len(frame) for s, e in zip(starts, ends, strict=True)):
        raise DicomError(f"the RLE segment offsets {starts} do not fit a frame of {len(frame)} bytes")
    needed = header.rows * header.columns
    for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
        most = 128 * ((end - start) // 2)
        if most < needed:
            raise DicomError(
                f"RLE segment {index + 1} holds {end - start} bytes, which decode to at most {most} bytes, "
                f"but Rows x Columns = {header.rows}x{header.columns} need {needed}"
            )


# --- cost ----------------------------------------------------------------------------------------------------------


def decode_cost(header: DicomHeader, display_max_side: int | None = None) -> int:
    """Estimated peak bytes of render_dicom for this header: every full-size buffer its path creates, summed."""
    pixels = header.rows * header.columns
    frame = pixels * header.samples * header.bytes_per_sample
    total = header.pixel_data_bytes + 2 * header.inflated_bytes  # held by the dataset (inflated: + pydicom's copy)
    if header.encapsulated:
        # get_frame's copy of the codestream, the plugin's output buffer, pydicom's array it is copied into;
        # JPEG plugins (Pillow, GDCM) hold their own image too (Pillow: 4 bytes per pixel for colour).
        total += header.pixel_data_bytes + 2 * frame
        if header.transfer_syntax in JPEG_SYNTAXES:
            total += max(frame, pixels * 4 if header.samples > 1 else frame)
        elif header.transfer_syntax in J2K_SYNTAXES:
            total += 2 * pixels * header.samples * 4  # OpenJPEG's int32 component planes, and their tile copy
        if header.transfer_syntax == JPEG_EXTENDED_12BIT and header.bits_stored > 8:
            total += 3 * frame  # the GDCM fallback: its buffer, a str of it (2 bytes per char), the bytes
    else:
        total += frame  # the frame: a view, or a copy when unused high bits are corrected
        if header.bits_allocated == 1:
            total += pixels * header.samples  # unpacked to a byte per pixel
        if header.photometric == "YBR_FULL_422":
            total += frame  # 4:2:2 expanded to full samples
    if header.photometric in ("YBR_FULL", "YBR_FULL_422"):
        total += pixels * 3 * 4 + frame  # pydicom's float32 colour conversion and its cast back
    if header.samples == 1 and header.photometric != PALETTE:
        if header.bytes_per_sample <= 2 and header.pixel_keyword == "PixelData":
            total += pixels + lut_bytes(pixels)  # the uint8 rendering through the lookup table
        else:
            total += 3 * pixels * 8 + 2 * pixels  # float64 values, NaN-free copy, scaled in place; mask, uint8
    else:
        # colour at 8 bits (3), Pillow's RGB (4), its grey (1), np.asarray of it (tobytes chunks + join: 2), lookups
        total += pixels * (3 + 4 + 1 + 2) + 3 * lut_bytes(pixels)
        if header.bytes_per_sample > 2:
            total += 3 * pixels * 8  # float64 scaling of 32-bit colour
    return with_slack(total + display_bytes(header.columns, header.rows, display_max_side))


# --- 3. decode and render ------------------------------------------------------------------------------------------


def render_dicom(
    header: DicomHeader, decode: Callable[[DicomHeader], tuple[np.ndarray, str]] | None = None
) -> DicomImage:
    """Decode the first frame (with `decode`, default `decode_first_frame`) and render it: (H, W) uint8 grey.

    `decode` lets the caller run the codec elsewhere (`service.codec_pool`: in a worker process).
    """
    array, photometric = (decode or decode_first_frame)(header)
    dataset = header.dataset
    try:
        if header.photometric == PALETTE:
            pixels, colourfulness = _colour_to_grey(_palette_rgb(array, dataset))
        elif array.ndim == 3:
            if photometric in ("YBR_FULL", "YBR_FULL_422"):  # a decoder that left YCbCr as it was
                from pydicom.pixels import convert_color_space

                array = convert_color_space(array, "YBR_FULL", "RGB")
            pixels, colourfulness = _colour_to_grey(_rgb_to_uint8(array, header.bits_stored))
        else:
            pixels, colourfulness = _render_grey(array, header), 0.0
    except DicomError:
        raise
    except Exception as error:  # a LUT or palette pydicom cannot apply, values no rendering can use
        raise DicomError(f"the DICOM image cannot be rendered: {type(error).__name__}: {_short(error)}") from error
    body_part = _text(dataset, "BodyPartExamined")
    return DicomImage(
        pixels=pixels,
        colourfulness=colourfulness,
        photometric=header.photometric,
        bits_stored=header.bits_stored,
        transfer_syntax=header.transfer_syntax,
        body_part_examined=body_part.upper() if body_part else None,
        dataset=dataset,
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
    12-bit JPEG Extended frame is handed to GDCM directly. Otherwise: 415 when no installed decoder reads
    the transfer syntax at all, 422 when one does and the data is corrupt or truncated.
    """
    dataset, syntax = header.dataset, header.transfer_syntax
    name = getattr(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None), "name", syntax)
    if syntax == JPEG_EXTENDED_12BIT and header.bits_stored > 8:
        if header.samples != 1 or header.pixel_representation != 0:
            raise DicomError(f"DICOM transfer syntax {name} cannot be decoded here for colour or signed data", 415)
        try:
            return _gdcm_jpeg_12bit(header)
        except Exception as gdcm_error:
            raise DicomError(
                f"the DICOM pixel data cannot be decoded: {type(gdcm_error).__name__}: {_short(gdcm_error)}"
            ) from gdcm_error
    if not _decoder_installed(syntax):
        raise DicomError(f"DICOM transfer syntax {name} cannot be decoded here: {_short(error)}", 415) from error
    raise DicomError(f"the DICOM pixel data cannot be decoded: {type(error).__name__}: {_short(error)}") from error


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


def _render_grey(array: np.ndarray, header: DicomHeader) -> np.ndarray:
    """Modality LUT, VOI LUT or window (else min-max), MONOCHROME1 inverted: (H, W) uint8.

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
        return apply_lut(_to_display(values, dataset, header.photometric, low_high), index)
    values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():  # float data may hold NaN or infinities: shown as the lowest real value
        values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
    return _to_display(values, dataset, header.photometric, None)


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
    centre = _floats(dataset, "WindowCenter")[0]
    width = max(_floats(dataset, "WindowWidth")[0], 1.0)
    function = (_text(dataset, "VOILUTFunction") or "LINEAR").upper()
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
    thumb = np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    colourfulness = float(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean())
    return np.asarray(image.convert("L"), dtype=np.uint8), colourfulness
