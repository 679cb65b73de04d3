"""The one image preprocessing step shared by training, evaluation and serving.

Contract (every model input in this project goes through :func:`prepare_image`):

* Input: the raw bytes of a PNG, JPEG or DICOM file (DICOM is rendered by `inference.dicom`: modality and VOI
  LUTs, MONOCHROME1 inverted, scaled to 8 bits). Other formats, undecodable, truncated or inconsistent data,
  and images whose header claims more than ``max_pixels`` pixels or whose decode would need more than
  ``max_decode_bytes`` (:func:`plan_decode`, from the header alone, before any pixel is decoded) are rejected
  with an :class:`ImageError` subclass (`inference.errors`) carrying a human-readable ``reason``.
* EXIF orientation is applied, so the model sees the image the way a viewer displays it.
* Output: a ``(size, size, 3)`` ``uint8`` array in RGB channel order. The image is reduced to one grey
  channel (alpha composited onto black; 16-bit, 32-bit and float data scaled by their inferred bit depth,
  never clipped; 16-bit data through a uint8 lookup table with the float32 arithmetic of a per-pixel
  scaling, so no full-size float copy is made), stretched to ``size x size`` without letterboxing using the
  resize method named by the model bundle (``"bilinear"`` or ``"nearest"``), and the grey channel is
  replicated three times.
* The 'caffe' normalisation (RGB->BGR, mean subtraction) is NOT done here: it lives inside the ONNX graph
  and the Keras model's first layer. This module only moves bytes.

Only numpy, Pillow and (for DICOM) pydicom are used, so training code can import it without the serving stack.
Every codec used in a thread here releases the GIL while it decodes (Pillow; numpy), so decode threads never
stall the event loop; compressed DICOM frames, whose codecs hold the GIL, can be decoded in worker processes
(`frame_decoder`, see `inference.codec_pool`). libspng (pyspng) was measured faster than Pillow on RGB PNG but
holds the GIL (a 262 ms event-loop stall on one 2000x2500 PNG against 14 ms for Pillow), so it is not used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageChops, ImageOps

from inference.colour import colourfulness
from inference.decode_plan import (
    DECODE_ERRORS,
    SUPPORTED_FORMATS,
    DecodePlan,
    apply_lut,
    check_limits,
    open_image,
    pillow_plan,
)
from inference.dicom import DicomImage, render_dicom
from inference.dicom_header import (
    DicomError,
    DicomHeader,
    check_pixel_data,
    decode_cost,
    inflation_cap,
    looks_like_dicom,
    parse_dicom,
)
from inference.errors import ImageError, ImageTooLargeError, UndecodableImageError, UnsupportedImageFormatError

__all__ = [
    "SUPPORTED_FORMATS",
    "DecodePlan",
    "ImageError",
    "ImageTooLargeError",
    "PreparedImage",
    "ResizeMethod",
    "UndecodableImageError",
    "UnsupportedImageFormatError",
    "plan_decode",
    "prepare_image",
    "prepare_image_file",
]

ResizeMethod = Literal["bilinear", "nearest"]
FrameDecoder = Callable[[DicomHeader], tuple[np.ndarray, str]]  # a DICOM header -> its first frame, photometric

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
DISPLAY_REDUCING_GAP = 2.0  # overlays only; the model input is always resized exactly
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


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


def plan_decode(
    data: bytes,
    *,
    dicom: bool = False,
    size: int = 224,
    max_pixels: int = 50_000_000,
    max_decode_bytes: int | None = None,
    display_max_side: int | None = None,
    inflation_budget_bytes: int | None = None,
) -> DecodePlan:
    """What decoding `data` will cost, from its header alone; raises ImageError (413 over a limit).

    Cheap: Pillow opens lazily, pydicom parses without decoding pixel data. For DICOM the plan carries the
    parsed dataset, and compressed pixel data has had its first codestream checked against the header.
    A deflated DICOM inflating past what the decode limit allows is refused before it is inflated; past
    `inflation_budget_bytes` (when given) InflationNotBudgetedError says how much it needs, so a caller that
    holds memory for the parse can hold more and ask again.
    """
    if not data:
        raise UndecodableImageError("not an image: got 0 bytes")
    if dicom or looks_like_dicom(data):
        try:
            header = parse_dicom(
                data,
                force=dicom,
                max_inflated_bytes=inflation_cap(max_decode_bytes),
                inflation_budget_bytes=inflation_budget_bytes,
            )
            plan = DecodePlan(
                format="DICOM",
                width=header.columns,
                height=header.rows,
                samples=header.samples,
                bytes_per_sample=header.bytes_per_sample,
                frames=header.frames,
                working_bytes=decode_cost(header, display_max_side),
                decoded_width=header.columns,
                decoded_height=header.rows,
                dicom=header,
            )
            check_limits(plan, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
            check_pixel_data(header)  # after the limits: a too-large file is too large whatever its data
        except DicomError as error:
            raise UndecodableImageError(error.reason) from error  # one error class per kind, whatever the format
        return plan
    with open_image(data) as img:
        plan = pillow_plan(img, data, size=size, display_max_side=display_max_side)
    check_limits(plan, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
    return plan


def prepare_image(
    data: bytes,
    *,
    size: int = 224,
    resize: ResizeMethod = "bilinear",
    max_pixels: int = 50_000_000,
    display_max_side: int | None = None,
    dicom: bool = False,
    max_decode_bytes: int | None = None,
    plan: DecodePlan | None = None,
    frame_decoder: FrameDecoder | None = None,
) -> PreparedImage:
    """Decode PNG/JPEG/DICOM bytes into the model input contract described in the module docstring.

    `display_max_side` also returns the grey image as displayed, at most that many pixels per side (heatmap
    overlays are drawn on it). `dicom=True` parses the bytes as DICOM even without the Part 10 preamble
    (some senders strip it; the client said `application/dicom`). `plan` (from :func:`plan_decode` on the
    same bytes, e.g. made by admission control) is reused instead of reading the header again; the limits
    are checked either way. `frame_decoder` decodes a DICOM frame elsewhere (the service's codec pool).
    Raises an :class:`ImageError` subclass for any bad input; never lets a Pillow or pydicom exception escape.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if resize not in _RESAMPLE:
        raise ValueError(f"resize must be one of {sorted(_RESAMPLE)}, got {resize!r}")
    if plan is not None and plan.format == "DICOM" and plan.dicom is None:
        plan = None  # its parsed dataset was let go while it waited for memory: parsed again now
    if plan is None and (not data or dicom or looks_like_dicom(data)):
        plan = plan_decode(
            data,
            dicom=dicom,
            size=size,
            max_pixels=max_pixels,
            max_decode_bytes=max_decode_bytes,
            display_max_side=display_max_side,
        )
    if plan is not None and plan.format == "DICOM":
        check_limits(plan, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
        return _prepare_dicom(plan, size, resize, display_max_side, frame_decoder)

    with open_image(data) as img:
        # The header is planned on the very image decoded below (one open); planning applies the JPEG draft.
        own_plan = pillow_plan(img, data, size=size, display_max_side=display_max_side)
        check_limits(plan or own_plan, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
        width, height = own_plan.width, own_plan.height
        source_mode = own_plan.mode
        fmt = img.format or "image"
        try:
            img.load()
            loaded_size = img.size
            ImageOps.exif_transpose(img, in_place=True)
        except (*DECODE_ERRORS, Image.DecompressionBombError) as exc:
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
    plan: DecodePlan, size: int, resize: ResizeMethod, display_max_side: int | None, decode: FrameDecoder | None
) -> PreparedImage:
    try:
        decoded = render_dicom(plan.dicom, decode)
    except DicomError as error:
        raise UndecodableImageError(error.reason) from error  # one error class per kind, whatever the format
    grey = Image.fromarray(decoded.pixels)  # mode L, sharing the array's memory
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
    """The grey image as displayed, shrunk (never enlarged) so its longer side is at most `max_side`.

    Only overlays are drawn on it (never a model input), so Pillow first box-reduces by an integer factor
    (``reducing_gap``): half the time of the exact resize on a 2000x2500 radiograph, a difference no one sees.
    """
    scale = min(1.0, max_side / max(grey.width, grey.height))
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    if scale == 1.0:
        return np.asarray(grey, dtype=np.uint8)
    return np.asarray(grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=DISPLAY_REDUCING_GAP), dtype=np.uint8)


def prepare_image_file(
    path: str | os.PathLike[str],
    *,
    size: int = 224,
    resize: ResizeMethod = "bilinear",
    max_pixels: int = 50_000_000,
    max_decode_bytes: int | None = None,
) -> PreparedImage:
    """Read a file and prepare it exactly as an upload would be (training/evaluation entry point)."""
    with open(path, "rb") as fh:
        data = fh.read()
    dicom = str(path).lower().endswith(".dcm")
    return prepare_image(
        data, size=size, resize=resize, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes, dicom=dicom
    )


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
    else:  # RGB (used as is: a copy would cost 4 bytes per pixel), P, CMYK, YCbCr, ...
        rgb = img if mode == "RGB" else img.convert("RGB")
    return rgb.convert("L"), colourfulness(rgb)


def _scale_high_depth(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float pixels to 0..255 deliberately.

    Pillow's ``convert("L")`` clips 16-bit values at 255, which turns a 12-bit radiograph white. Integer
    data is scaled by its inferred bit depth, ``bits = max(8, bit_length(max))``, so 0 -> 0 and
    ``2**bits - 1`` -> 255 (negative values clip to 0). Float data in [0, 1] is taken as is, otherwise it
    is scaled by its maximum. 16-bit data goes through a 65,536-entry uint8 table holding exactly what the
    per-pixel float32 arithmetic gives, so no full-size float copy is made.
    """
    raw = np.asarray(img)
    if img.mode.startswith("I;16"):
        raw = raw.astype(np.uint16, copy=False)  # I;16B arrives big-endian
        bits = max(8, int(raw.max()).bit_length()) if raw.size else 8
        domain = np.arange(2**16, dtype=np.float32)
        lut = np.rint(np.clip(domain * (255.0 / (2**bits - 1)), 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(apply_lut(lut, raw))
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
