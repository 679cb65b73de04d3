"""What a prediction says, in words and as a PNG: the text lines the window shows and the report it saves.

The sentences are the core's summary carried in every answer (`describe` only lays them out), so the window,
the report, the web page and the DICOM outputs can never disagree; `render_report` draws the heatmap overlay
(or the image) above those sentences and the disclaimer.
Also loads any input the window previews (PNG, JPEG, DICOM) as a Pillow image.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from inference.answers import UNTRAINED_BANNER
from inference.results import DISCLAIMER, UNTRAINED_WARNING

REPORT_WIDTH = 760
PICTURE_BOX = 640  # the picture is scaled to fit this square: small inputs grow, large ones shrink
MARGIN = 24
FONT_SIZE = 16
PREVIEW_MAX_PIXELS = 50_000_000

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_ASCII = str.maketrans({"—": "-", "≥": ">=", "’": "'"})


class PreviewError(ValueError):
    """The file cannot be shown (the server may still say why it cannot be read)."""


@dataclass(frozen=True)
class Description:
    """The sentences a prediction comes down to; `untrained` and `disclaimer` are never optional."""

    body_part: str
    fracture: str
    probabilities: str
    flags: str
    abstention: str
    model: str
    untrained: str | None
    disclaimer: str
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """In reading order, for the report."""
        head = [self.untrained] if self.untrained else []
        body = [self.body_part, self.fracture, self.probabilities, self.flags, self.abstention, self.model]
        return [*head, *body, *(f"Warning: {w}" for w in self.warnings)]


def describe(prediction: Mapping[str, Any]) -> Description:
    """The sentences of one ImagePrediction: the core's own summary (`inference.answers.summarise`), which the
    web page and the DICOM outputs show too; whether the model is untrained comes from `model.trained`."""
    summary = prediction.get("summary") or {}
    trained = bool((prediction.get("model") or {}).get("trained", False))
    warnings = [w for w in prediction.get("warnings") or [] if trained or w != UNTRAINED_WARNING]
    return Description(
        body_part=str(summary.get("body_part", "")),
        fracture=str(summary.get("fracture", "")),
        probabilities=str(summary.get("probabilities", "")),
        flags=str(summary.get("flags", "")),
        abstention=str(summary.get("abstention", "")),
        model=str(summary.get("model", "")),
        untrained=None if trained else str(summary.get("untrained") or UNTRAINED_BANNER),
        disclaimer=str(prediction.get("disclaimer") or DISCLAIMER),
        warnings=warnings,
    )


def load_image(path: Path) -> Image.Image:
    """The file as an RGB image for display: PNG/JPEG by Pillow (EXIF orientation applied), DICOM rendered
    as the service renders it. Raises PreviewError with a reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise PreviewError(f"cannot read {path}: {error.strerror or error}") from error
    from inference.dicom_header import looks_like_dicom

    if looks_like_dicom(data) or Path(path).suffix.lower() in {".dcm", ".dicom"}:
        from inference.config import PredictorConfig
        from inference.dicom import read_dicom
        from inference.errors import ImageError

        budget = PredictorConfig().max_image_decode_bytes  # the service's own per-image limit
        try:
            return Image.fromarray(
                read_dicom(data, max_pixels=PREVIEW_MAX_PIXELS, max_decode_bytes=budget).pixels
            ).convert("RGB")
        except ImageError as error:
            raise PreviewError(error.reason) from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if size[0] * size[1] <= PREVIEW_MAX_PIXELS:
                return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise PreviewError(f"not an image Pillow can read ({error})") from error
    raise PreviewError(f"image is {size[0]}x{size[1]}: too large to preview")


def overlay_image(prediction: Mapping[str, Any]) -> Image.Image | None:
    """The server's Grad-CAM overlay, when it sent one."""
    heatmap = prediction.get("heatmap") or {}
    encoded = heatmap.get("overlay_png_base64")
    if not encoded:
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        return None


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled (up or down) to fit the box, aspect kept."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _font(size: int, bold: bool = False) -> tuple[_Font, bool]:
    """A TrueType font with the dash and the ≥ (DejaVu), else Pillow's own and ASCII text."""
    for name in ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    return ImageFont.load_default(size=size), False


def _wrap(text: str, font: _Font, width: int) -> list[str]:
    """Greedy word wrap by measured pixel width."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def render_report(prediction: Mapping[str, Any], image_path: Path) -> Image.Image:
    """The report: the overlay (or the image), then the prediction's sentences and the disclaimer."""
    overlay = overlay_image(prediction)
    picture = overlay
    if picture is None:
        try:
            picture = load_image(image_path)
        except PreviewError:
            picture = Image.new("RGB", (PICTURE_BOX, PICTURE_BOX // 4), "#444444")
    picture = fit(picture, PICTURE_BOX, PICTURE_BOX)
    description = describe(prediction)
    font, unicode_ok = _font(FONT_SIZE)
    bold, _ = _font(FONT_SIZE, bold=True)
    text_width = REPORT_WIDTH - 2 * MARGIN

    def clean(text: str) -> str:
        return text if unicode_ok else text.translate(_ASCII).encode("ascii", "replace").decode()

    name = str(prediction.get("image_name") or Path(image_path).name)
    view = "Grad-CAM overlay" if overlay is not None else "image"
    blocks: list[tuple[str, _Font, str]] = [(f"Bone-Fracture-Detection report: {name} ({view})", bold, "black")]
    if description.untrained:
        blocks.append((description.untrained, bold, "#b00020"))
    blocks += [
        (line, bold if line.startswith("ABSTAINED") else font, "#b00020" if line.startswith("ABSTAINED") else "black")
        for line in description.lines()
        if line != description.untrained
    ]
    blocks.append((description.disclaimer, bold, "#b00020"))
    wrapped = [(line, f, colour) for text, f, colour in blocks for line in _wrap(clean(text), f, text_width)]
    line_height = FONT_SIZE + 8
    height = MARGIN + picture.height + MARGIN + line_height * len(wrapped) + MARGIN
    report = Image.new("RGB", (REPORT_WIDTH, height), "white")
    report.paste(picture, ((REPORT_WIDTH - picture.width) // 2, MARGIN))
    draw = ImageDraw.Draw(report)
    y = MARGIN + picture.height + MARGIN
    for line, f, colour in wrapped:
        draw.text((MARGIN, y), line, font=f, fill=colour)
        y += line_height
    return report


def save_report(prediction: Mapping[str, Any], image_path: Path, out: Path) -> Path:
    """Render and write the report as PNG to `out`; returns `out`."""
    out = Path(out)
    render_report(prediction, image_path).save(out, format="PNG")
    return out
