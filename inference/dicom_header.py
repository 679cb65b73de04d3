"""DICOM headers, parsed and checked before anything is decoded: what decoding the first frame will take.

Two of the three steps of DICOM in (`inference.dicom` renders the third):

1. :func:`parse_dicom` reads the dataset (pixel data bytes included, nothing decoded) and validates every
   attribute the decode depends on: Rows, Columns, Bits Allocated/Stored, Samples per Pixel, Pixel
   Representation, Number of Frames, Photometric Interpretation, rescale, window, LUT sequences and the
   nesting depth of sequences. Anything malformed is a :class:`DicomError` with a reason, never a
   Python exception (an empty VOI LUT Sequence or Rows with two values used to answer 500).
2. :func:`check_pixel_data` checks, still without decoding, that the pixel data can hold what the header
   declares: the length of native data; for compressed data, the first frame's codestream header (JPEG and
   JPEG-LS SOF, JPEG 2000 SIZ, RLE segment table) must agree with Rows, Columns and samples, so no decoder
   allocates for a size other than the one budgeted. :func:`decode_cost` is the memory the decode will need.

Patient identifiers stay inside the parsed dataset; nothing here logs or returns them.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from inference.decode_plan import display_bytes, lut_bytes, with_slack
from inference.dicom_file import BYTES_PER_ELEMENT, DEFAULT_MAX_INFLATED_BYTES, read_part10
from inference.dicom_file import DicomError as DicomError  # re-exported: the decoders' errors live here too
from inference.dicom_file import brief as brief
from inference.dicom_file import inflation_cap as inflation_cap
from inference.dicom_file import looks_like_dicom as looks_like_dicom

log = logging.getLogger(__name__)

# Real images nest a handful of levels (functional groups, request attributes); pydicom recurses per level.
MAX_SEQUENCE_DEPTH = 32
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
PALETTE = "PALETTE COLOR"
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"})
JPEG_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)})
J2K_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)})
RLE_SYNTAX = "1.2.840.10008.1.2.5"
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"


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
    dataset_bytes: int = 0  # what the parsed dataset holds: its values (with the inflated buffer) and objects

    @property
    def bytes_per_sample(self) -> int:
        """Bytes per sample of the decoded array (1-bit data unpacks to one byte per pixel)."""
        return max(1, self.bits_allocated // 8)


# --- 1. header -----------------------------------------------------------------------------------------------------


def read_dataset(
    data: bytes,
    *,
    force: bool = False,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    stop_before_pixels: bool = False,
    inflation_budget_bytes: int | None = None,
) -> Any:
    """pydicom's dataset of `data` within `inference.dicom_file`'s caps, for a door that needs only attributes (the
    DICOM node's UIDs): a deflated data set is inflated under `max_inflated_bytes` (ImageTooLargeError past it),
    and every reading failure is a DicomError with a reason."""
    return read_part10(
        data,
        force=force,
        max_inflated_bytes=max_inflated_bytes,
        stop_before_pixels=stop_before_pixels,
        inflation_budget_bytes=inflation_budget_bytes,
    ).dataset


def parse_dicom(
    data: bytes,
    *,
    force: bool = False,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    inflation_budget_bytes: int | None = None,
) -> DicomHeader:
    """Read the dataset (pixel data not decoded) and validate what the decode depends on; DicomError if not.

    `max_inflated_bytes` caps a deflated data set's inflation; past `inflation_budget_bytes`, when given,
    InflationNotBudgetedError says how much it needs (`inference.dicom_file`)."""

    part10 = read_part10(
        data, force=force, max_inflated_bytes=max_inflated_bytes, inflation_budget_bytes=inflation_budget_bytes
    )
    dataset = part10.dataset
    _check_nesting(dataset)
    keyword = next((k for k in PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        kind = tag_text(dataset, "Modality") or "this"
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
    photometric = (tag_text(dataset, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
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
        tag_floats(dataset, keyword_, single=True)
    if "WindowCenter" in dataset or "WindowWidth" in dataset:
        tag_floats(dataset, "WindowCenter")
        tag_floats(dataset, "WindowWidth")
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
        inflated_bytes=part10.inflated_bytes,
        # every value is a copy of its bytes (of the inflated buffer, which the dataset keeps, when deflated)
        dataset_bytes=(2 * part10.inflated_bytes or len(data)) + part10.elements * BYTES_PER_ELEMENT,
    )


def _is_encapsulated(syntax: str, value: bytes) -> bool:
    """Compressed pixel data; for a private transfer syntax, judged by the first item tag of the value."""
    from pydicom.uid import UID

    try:
        return bool(UID(syntax).is_encapsulated)
    except ValueError:  # not a transfer syntax pydicom knows
        return bytes(value[:4]) == b"\xfe\xff\x00\xe0"


def tag_text(dataset: Any, keyword: str) -> str | None:
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
        raise DicomError(f"{keyword} cannot be read: {type(error).__name__}: {brief(error)}") from error


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


def tag_floats(dataset: Any, keyword: str, *, single: bool = False) -> list[float]:
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
        raise DicomError(f"a DICOM sequence cannot be read: {type(error).__name__}: {brief(error)}") from error


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
            f"the encapsulated DICOM pixel data is broken: {type(error).__name__}: {brief(error)}"
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
    total = header.dataset_bytes or header.pixel_data_bytes  # what the parsed dataset holds (values and objects)
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
