"""The one image preprocessing step shared by training, evaluation and serving.

Contract (every model input in this project goes through :func:`prepare_image`):

* Input: the raw bytes of a PNG, JPEG or DICOM file (DICOM is rendered by `service.dicom`: modality and VOI
  LUTs, MONOCHROME1 inverted, scaled to 8 bits). Other formats, undecodable or truncated data, and images
  whose header claims more than ``max_pixels`` pixels are rejected with an :class:`ImageError` subclass
  carrying a human-readable ``reason`` and an HTTP ``status`` hint.
* EXIF orientation is applied, so the model sees the image the way a viewer displays it.
* Output: a ``(size, size, 3)`` ``uint8`` array in RGB channel order. The image is reduced to one grey
  channel (alpha composited onto black; 16-bit, 32-bit and float data scaled by their inferred bit depth,
  never clipped), stretched to ``size x size`` without letterboxing using the resize method named by the
  model bundle (``"bilinear"`` or ``"nearest"``), and the grey channel is replicated three times.
* The 'caffe' normalisation (RGB->BGR, mean subtraction) is NOT done here: it lives inside the ONNX graph
  and the Keras model's first layer. This module only moves bytes.

Only numpy, Pillow and (for DICOM) pydicom are used, so training code can import it without the serving stack.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from service.dicom import DicomError, DicomImage, looks_like_dicom, read_dicom

ResizeMethod = Literal["bilinear", "nearest"]
SUPPORTED_FORMATS = ("PNG", "JPEG")

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_COLOUR_THUMB = 64  # side of the thumbnail colourfulness is measured on
# What Pillow's parsers and decoders raise on hostile or broken input (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


class ImageError(ValueError):
    """The uploaded bytes cannot become a model input; ``status`` is the HTTP code to answer with."""

    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UndecodableImageError(ImageError):
    """Not an image at all, or a PNG/JPEG whose data is truncated or corrupt."""

    status = 422


class UnsupportedImageFormatError(ImageError):
    """A real image, but not PNG, JPEG or DICOM (or a DICOM transfer syntax no installed decoder reads)."""

    status = 415


class ImageTooLargeError(ImageError):
    """The header declares more pixels than allowed (decompression-bomb guard, checked before decoding)."""

    status = 413


@dataclass(frozen=True, eq=False)  # eq on an ndarray field would raise; identity equality and hash instead
class PreparedImage:
    """A model-ready image plus the facts about the source that callers report or check."""

    pixels: np.ndarray  # (size, size, 3) uint8, C-contiguous, R == G == B
    original_width: int  # as displayed (after EXIF orientation), full resolution
    original_height: int
    source_mode: str  # Pillow mode of the file as stored, e.g. "L", "RGB", "I;16", "P", "CMYK"
    colourfulness: float  # mean |channel - pixel mean| on a 64x64 RGB thumbnail, 0..170; 0 for grey sources
    display: np.ndarray | None = None  # (h, w) uint8 grey, aspect kept, when asked for (heatmap overlays)
    dicom: DicomImage | None = None  # for DICOM input: its rendering facts and parsed dataset


def prepare_image(
    data: bytes,
    *,
    size: int = 224,
    resize: ResizeMethod = "bilinear",
    max_pixels: int = 50_000_000,
    display_max_side: int | None = None,
    dicom: bool = False,
) -> PreparedImage:
    """Decode PNG/JPEG/DICOM bytes into the model input contract described in the module docstring.

    `display_max_side` also returns the grey image as displayed, at most that many pixels per side (heatmap
    overlays are drawn on it). `dicom=True` parses the bytes as DICOM even without the Part 10 preamble
    (some senders strip it; the client said `application/dicom`). Raises an :class:`ImageError` subclass
    for any bad input; never lets a Pillow or pydicom exception escape.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if resize not in _RESAMPLE:
        raise ValueError(f"resize must be one of {sorted(_RESAMPLE)}, got {resize!r}")
    if not data:
        raise UndecodableImageError("not an image: got 0 bytes")
    if dicom or looks_like_dicom(data):
        return _prepare_dicom(data, size, resize, max_pixels, display_max_side)

    with _open(data) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
            )
        source_mode = img.mode
        fmt = img.format or "image"
        if fmt in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2..1/8 scale (DCT scaling) while keeping >= 2*size px per side.
            img.draft("L" if img.mode == "L" else "RGB", (2 * size, 2 * size))
        try:
            img.load()
            loaded_size = img.size
            ImageOps.exif_transpose(img, in_place=True)
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
            raise UndecodableImageError(f"could not decode {fmt} data: {exc}") from exc
        if img.size != loaded_size:  # orientation 5..8 swapped the axes
            width, height = height, width
        grey, colourfulness = _to_grey(img)

    return PreparedImage(
        pixels=_model_input(grey, size, resize),
        original_width=width,
        original_height=height,
        source_mode=source_mode,
        colourfulness=colourfulness,
        display=None if display_max_side is None else _display(grey, display_max_side),
    )


def _prepare_dicom(
    data: bytes, size: int, resize: ResizeMethod, max_pixels: int, display_max_side: int | None
) -> PreparedImage:
    try:
        decoded = read_dicom(data, max_pixels=max_pixels)
    except DicomError as error:
        kind = {413: ImageTooLargeError, 415: UnsupportedImageFormatError}.get(error.status, UndecodableImageError)
        raise kind(error.reason) from error
    grey = Image.fromarray(decoded.pixels, mode="L")
    return PreparedImage(
        pixels=_model_input(grey, size, resize),
        original_width=grey.width,
        original_height=grey.height,
        source_mode=f"DICOM {decoded.photometric} {decoded.bits_stored}-bit",
        colourfulness=decoded.colourfulness,
        display=None if display_max_side is None else _display(grey, display_max_side),
        dicom=decoded,
    )


def _model_input(grey: Image.Image, size: int, resize: ResizeMethod) -> np.ndarray:
    """One grey channel stretched to size x size, replicated to 3 channels: (size, size, 3) uint8."""
    plane = np.asarray(grey.resize((size, size), _RESAMPLE[resize]), dtype=np.uint8)
    return np.repeat(plane[:, :, None], 3, axis=2)  # C-contiguous copy


def _display(grey: Image.Image, max_side: int) -> np.ndarray:
    """The grey image as displayed, shrunk (never enlarged) so its longer side is at most `max_side`."""
    scale = min(1.0, max_side / max(grey.width, grey.height))
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return np.asarray(grey if scale == 1.0 else grey.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def prepare_image_file(
    path: str | os.PathLike[str],
    *,
    size: int = 224,
    resize: ResizeMethod = "bilinear",
    max_pixels: int = 50_000_000,
) -> PreparedImage:
    """Read a file and prepare it exactly as an upload would be (training/evaluation entry point)."""
    with open(path, "rb") as fh:
        data = fh.read()
    dicom = str(path).lower().endswith(".dcm")
    return prepare_image(data, size=size, resize=resize, max_pixels=max_pixels, dicom=dicom)


def _open(data: bytes) -> Image.Image:
    """Open lazily (header only), telling undecodable data apart from real but unsupported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own check fired first (> 2 * MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(f"image is too large to decode safely: {exc}") from exc
    except _DECODE_ERRORS as exc:
        first_error: Exception = exc
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Image.DecompressionBombError as exc:
        raise UnsupportedImageFormatError("unsupported image format; send PNG, JPEG or DICOM") from exc
    except _DECODE_ERRORS:
        fmt = None
    if fmt is None:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" adds nothing for a client.
        detail = "" if isinstance(first_error, UnidentifiedImageError) else f": {first_error}"
        raise UndecodableImageError(f"not a PNG, JPEG or DICOM image ({len(data)} bytes){detail}") from first_error
    raise UnsupportedImageFormatError(f"{fmt} images are not supported; send PNG, JPEG or DICOM")


def _to_grey(img: Image.Image) -> tuple[Image.Image, float]:
    """Reduce a loaded image to one 8-bit grey channel; also measure colourfulness for colour sources."""
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return _scale_high_depth(img), 0.0
    if mode == "L":
        return img, 0.0
    if mode == "1":
        return img.convert("L"), 0.0
    if mode == "LA":
        grey, alpha = img.split()
        return ImageChops.multiply(grey, alpha), 0.0  # composite onto black
    if "A" in img.getbands() or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        rgb = ImageChops.multiply(rgba.convert("RGB"), Image.merge("RGB", (alpha, alpha, alpha)))
    else:  # RGB, P, CMYK, YCbCr, ...
        rgb = img.convert("RGB")
    return rgb.convert("L"), _colourfulness(rgb)


def _colourfulness(rgb: Image.Image) -> float:
    """Mean absolute deviation of each channel from the pixel's grey level, on a small thumbnail."""
    thumb = np.asarray(rgb.resize((_COLOUR_THUMB, _COLOUR_THUMB), Image.Resampling.BOX), dtype=np.float32)
    return float(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean())


def _scale_high_depth(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float pixels to 0..255 deliberately.

    Pillow's ``convert("L")`` clips 16-bit values at 255, which turns a 12-bit radiograph white. Integer
    data is scaled by its inferred bit depth, ``bits = max(8, bit_length(max))``, so 0 -> 0 and
    ``2**bits - 1`` -> 255 (negative values clip to 0). Float data in [0, 1] is taken as is, otherwise it
    is scaled by its maximum.
    """
    raw = np.asarray(img)
    values = raw.astype(np.float32)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else 255.0 / peak
    else:
        bits = max(8, int(raw.max()).bit_length()) if raw.size else 8
        scale = 255.0 / (2**bits - 1)
    out = np.rint(np.clip(values * scale, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(out)
