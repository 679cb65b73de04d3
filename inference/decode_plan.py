"""What decoding an image will cost, known from its header before any pixel is decoded.

A decode is admitted on its real cost, not on its pixel count: a 7000x7000 RGB 16-bit DICOM holds 49 Mpx but
its decode needs about a gigabyte, while a 7000x7000 grey JPEG decoded at 1/8 scale needs a few megabytes.
:class:`DecodePlan` carries the header facts and ``working_bytes``, the estimated peak bytes the decode path
of `inference.preprocessing` / `inference.dicom` allocates: every full-size buffer that path creates is counted
(Pillow's image buffer, numpy copies, decoder output, the compressed frame held while decoding), summed as if
all were alive at once, so the figure is an upper bound of the peak. A test measures real peaks against it.

This module also owns the lazy Pillow open that tells undecodable data from unsupported formats, and
:func:`apply_lut`, the chunked lookup-table application both decode paths use instead of full-size float
copies. Its errors are the core's (`inference.errors`), re-exported by `inference.preprocessing`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from inference.errors import ImageTooLargeError, UndecodableImageError, UnsupportedImageFormatError

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("PNG", "JPEG")
# What Pillow's parsers and decoders raise on hostile or broken input (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)
# Decoder state, tables, Python objects: what a decode allocates besides its full-size buffers.
FIXED_OVERHEAD_BYTES = 4_000_000
# Allocator slack (page rounding, arenas, fragmentation) on top of the buffers counted.
SLACK = 1.1
# apply_lut converts indices to intp one chunk at a time: this many elements at most.
LUT_CHUNK_ELEMENTS = 1 << 16  # 64 k indices (512 kB of intp) stay in cache: measured fastest

# Bytes per pixel of everything the Pillow path allocates at the decoded size, per Pillow mode (Pillow keeps
# RGB, LA, CMYK in 4 bytes per pixel). Each entry names the buffers of inference.preprocessing._to_grey.
PILLOW_BYTES_PER_PIXEL = {
    "1": 1 + 1,  # decoded, convert("L")
    "L": 1,  # decoded, used as is
    "LA": 4 + 1 + 1 + 1,  # decoded, split grey + alpha, multiply
    "P": 1 + 4 + 1,  # decoded, convert("RGB"), convert("L")
    "RGB": 4 + 1,  # decoded, convert("L")
    "CMYK": 4 + 4 + 1,  # decoded, convert("RGB"), convert("L")
    "YCbCr": 4 + 4 + 1,
    # alpha or palette transparency: convert RGBA, alpha, RGB, merged alpha, multiply, L
    "RGBA": 4 + 4 + 1 + 4 + 4 + 4 + 1,
    "I;16": 2 + 2 + 2 + 1,  # decoded, np.asarray (Pillow's tobytes: its chunks, then their join), uint8 lookup
    "I": 4 + 8 + 4 + 4 + 1,  # decoded, np.asarray (chunks + join), float32 values, scaled, uint8 (not from files)
    "F": 4 + 8 + 4 + 4 + 1,
}
TRANSPARENT_BYTES_PER_PIXEL = PILLOW_BYTES_PER_PIXEL["RGBA"] + 1  # "P" + transparency: index buffer first


@dataclass(frozen=True, eq=False)  # eq on a pydicom Dataset field would compare whole datasets
class DecodePlan:
    """Header facts of one image and the estimated peak memory of decoding it (``working_bytes``)."""

    format: str  # "PNG", "JPEG" or "DICOM"
    width: int  # stored width/height of the (first) frame, before any draft reduction
    height: int
    samples: int  # samples per pixel
    bytes_per_sample: int
    frames: int  # frames in the file; only the first is ever decoded
    working_bytes: int  # estimated PEAK bytes the decode allocates, all working copies included
    decoded_width: int = 0  # after JPEG draft reduction (= width otherwise)
    decoded_height: int = 0
    mode: str = ""  # Pillow mode as stored (PNG/JPEG), "" for DICOM
    dicom: Any = None  # inference.dicom.DicomHeader: the parsed dataset, so prepare_image does not parse twice

    @property
    def pixels(self) -> int:
        """Pixels of the one frame decoded, at stored size (what ``max_pixels`` bounds)."""
        return self.width * self.height

    def copies(self) -> float:
        """``working_bytes`` in units of one full-size frame of stored samples."""
        frame = max(1, self.pixels * self.samples * self.bytes_per_sample)
        return self.working_bytes / frame


def check_limits(plan: DecodePlan, *, max_pixels: int, max_decode_bytes: int | None) -> None:
    """Raise ImageTooLargeError (413) when the plan exceeds the pixel limit or the per-image decode budget."""
    if plan.pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {plan.width}x{plan.height} = {plan.pixels} pixels, more than the limit of {max_pixels}"
        )
    if max_decode_bytes is not None and plan.working_bytes > max_decode_bytes:
        samples = f" x {plan.samples} samples" if plan.samples > 1 else ""
        raise ImageTooLargeError(
            f"decoding needs about {format_bytes(plan.working_bytes)} ({plan.width}x{plan.height} px{samples}"
            f" x {plan.bytes_per_sample} bytes x {plan.copies():.1f} working copies); "
            f"the limit per image is {format_bytes(max_decode_bytes)}"
        )


def format_bytes(count: int) -> str:
    """Decimal units, as the settings are written (400_000_000 -> '400 MB')."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            value = count / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{count} bytes"


def with_slack(counted_bytes: int) -> int:
    """The estimate for buffers summing to `counted_bytes`: allocator slack and fixed overhead added."""
    return int(counted_bytes * SLACK) + FIXED_OVERHEAD_BYTES


def display_bytes(width: int, height: int, display_max_side: int | None) -> int:
    """Bytes of the grey display image `inference.preprocessing._display` returns (at most full size).

    np.asarray of a Pillow image goes through tobytes, whose chunks and their join are both alive for a while.
    """
    if display_max_side is None:
        return 0
    scale = min(1.0, display_max_side / max(width, height, 1))
    return 2 * int(width * scale + 1) * int(height * scale + 1)


def pillow_plan(img: Image.Image, data: bytes, *, size: int, display_max_side: int | None) -> DecodePlan:
    """The plan of a lazily opened PNG/JPEG; applies the JPEG draft `prepare_image` uses (header only)."""
    width, height = img.size
    mode = img.mode
    fmt = img.format or "image"
    if fmt in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2..1/8 scale (DCT scaling) while keeping >= 2*size px per side.
        img.draft("L" if mode == "L" else "RGB", (2 * size, 2 * size))
    decoded_width, decoded_height = img.size
    per_pixel = PILLOW_BYTES_PER_PIXEL.get(img.mode, PILLOW_BYTES_PER_PIXEL["RGBA"])
    if mode == "P" and "transparency" in img.info:
        per_pixel = TRANSPARENT_BYTES_PER_PIXEL
    elif "A" in img.getbands():
        per_pixel = max(per_pixel, PILLOW_BYTES_PER_PIXEL["RGBA"])
    working = decoded_width * decoded_height * per_pixel
    if img.mode.startswith("I;16"):
        working += lut_bytes(decoded_width * decoded_height)
    bands = len(img.getbands())
    if fmt in ("JPEG", "MPO") and (img.info.get("progressive") or img.info.get("progression")):
        # A progressive JPEG keeps every DCT coefficient (2 bytes, full stored size) until the last scan,
        # whatever the draft scale.
        working += width * height * bands * 2
    working = with_slack(working + display_bytes(decoded_width, decoded_height, display_max_side))
    bytes_per_sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    return DecodePlan(
        format="JPEG" if fmt == "MPO" else fmt,
        width=width,
        height=height,
        samples=bands,
        bytes_per_sample=bytes_per_sample,
        frames=int(getattr(img, "n_frames", 1) or 1),
        working_bytes=working,
        decoded_width=decoded_width,
        decoded_height=decoded_height,
        mode=mode,
    )


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only), telling undecodable data apart from real but unsupported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own check fired first (> 2 * MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(f"image is too large to decode safely: {exc}") from exc
    except DECODE_ERRORS as exc:
        first_error: Exception = exc
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Image.DecompressionBombError as exc:
        raise UnsupportedImageFormatError("unsupported image format; send PNG, JPEG or DICOM") from exc
    except DECODE_ERRORS:
        fmt = None
    if fmt is None:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" adds nothing for a client.
        detail = "" if isinstance(first_error, UnidentifiedImageError) else f": {first_error}"
        raise UndecodableImageError(f"not a PNG, JPEG or DICOM image ({len(data)} bytes){detail}") from first_error
    raise UnsupportedImageFormatError(f"{fmt} images are not supported; send PNG, JPEG or DICOM")


def lut_domain(dtype: np.dtype[Any]) -> tuple[np.ndarray, np.dtype[Any]]:
    """Every value of a 1- or 2-byte integer dtype, ordered by its unsigned bit pattern, and that index dtype.

    A lookup table computed on this domain is indexed by ``values.view(index_dtype)``: signed values need no
    offset (and no full-size int32 copy), their two's-complement patterns are the table positions.
    """
    index_dtype = np.dtype(np.uint8) if dtype.itemsize == 1 else np.dtype(np.uint16)
    domain = np.arange(2 ** (8 * dtype.itemsize), dtype=index_dtype).view(f"{dtype.kind}{dtype.itemsize}")
    return domain, index_dtype


def apply_lut(lut: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``lut[values]`` for uint8/uint16 `values`, chunk by chunk.

    numpy converts index arrays to intp (8 bytes per element) before a take; doing it per chunk bounds that
    temporary and keeps it in cache, which is also about 1.5x as fast as one take over the whole frame.
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    out = np.empty(flat.shape, dtype=lut.dtype)
    for start in range(0, flat.size, LUT_CHUNK_ELEMENTS):
        stop = start + LUT_CHUNK_ELEMENTS
        np.take(lut, flat[start:stop], out=out[start:stop], mode="clip")  # in range by construction; no check
    return out.reshape(values.shape)


def lut_bytes(elements: int) -> int:
    """What apply_lut allocates beyond its output: one chunk of intp indices."""
    return min(elements, LUT_CHUNK_ELEMENTS) * 8
