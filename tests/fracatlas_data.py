"""FracAtlas-layout folders for tests: the committed real subset, copies of it to break, and synthetic ones.

The real subset (tests/data/fracatlas, see its README) exercises real files; synthetic folders put a bright
patch exactly where a test wants the tiny bundle's Grad-CAM to peak (its feature map is the image's brightness
per 32x32 cell of the 224 x 224 input), so the pointing game's answer is known in advance.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SUBSET = Path(__file__).resolve().parent / "data" / "fracatlas"
HEADER = [
    *("image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "fractured"),
    *("fracture_count", "frontal", "lateral", "oblique"),
]
REGIONS = ("hand", "leg", "hip", "shoulder")
EXIF_ORIENTATION = 0x0112
# What the stored image must be turned by so that exif_transpose(stored) shows the displayed image.
_STORE_FOR_ORIENTATION = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def copy_subset(destination: Path) -> Path:
    """A writable copy of the committed subset (tests that break files work on this)."""
    shutil.copytree(SUBSET, destination)
    return destination


def subset_rows() -> list[dict[str, str]]:
    with (SUBSET / "dataset.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@dataclass
class Synthetic:
    """One synthetic radiograph: its displayed pixels, flags and boxes (in the displayed frame)."""

    image_id: str
    display: np.ndarray  # (H, W) uint8 as a viewer shows it
    regions: tuple[str, ...] = ("hand",)
    fractured: bool = False
    boxes: Sequence[tuple[float, float, float, float]] = ()
    orientation: int = 1  # EXIF orientation stored in the file
    hardware: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # CSV cells to override (to break rows)


def patch_image(
    width: int, height: int, cell: tuple[int, int], *, grid: int = 7, background: int = 30, bright: int = 250
) -> np.ndarray:
    """(height, width) dark image whose cell (row, column) of a grid x grid stretch is bright: Grad-CAM peaks there."""
    row, column = cell
    image = np.full((height, width), background, dtype=np.uint8)
    x0, x1 = round(column * width / grid), round((column + 1) * width / grid)
    y0, y1 = round(row * height / grid), round((row + 1) * height / grid)
    image[y0:y1, x0:x1] = bright
    return image


def cell_centre(width: int, height: int, cell: tuple[int, int], grid: int = 7) -> tuple[float, float]:
    row, column = cell
    return (column + 0.5) * width / grid, (row + 0.5) * height / grid


def write_fracatlas(root: Path, images: Sequence[Synthetic], *, voc: bool = True) -> Path:
    """A folder in FracAtlas's published layout holding `images` (JPEG, quality 95) with VOC annotations."""
    for folder in ("images/Fractured", "images/Non_fractured", "Annotations/PASCAL VOC"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for item in images:
        folder = "Fractured" if item.fractured else "Non_fractured"
        stored = Image.fromarray(item.display)
        turn = _STORE_FOR_ORIENTATION[item.orientation]
        if turn is not None:
            stored = stored.transpose(turn)
        exif = Image.Exif()
        if item.orientation != 1:
            exif[EXIF_ORIENTATION] = item.orientation
        stored.convert("RGB").save(root / "images" / folder / f"{item.image_id}.jpg", quality=95, exif=exif)
        height, width = item.display.shape
        if voc:
            _write_voc(root / "Annotations" / "PASCAL VOC" / f"{item.image_id}.xml", item, width, height)
        flags = {region: int(region in item.regions) for region in REGIONS}
        row = {
            "image_id": f"{item.image_id}.jpg",
            **{k: str(v) for k, v in flags.items()},
            "mixed": str(int(len(item.regions) > 1)),
            "hardware": str(int(item.hardware)),
            "multiscan": "0",
            "fractured": str(int(item.fractured)),
            "fracture_count": str(len(item.boxes)),
            "frontal": "1",
            "lateral": "0",
            "oblique": "0",
        }
        row.update(item.extra)
        rows.append(row)
    with (root / "dataset.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HEADER, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    return root


def _write_voc(path: Path, item: Synthetic, width: int, height: int) -> None:
    objects = "".join(
        f"<object><name>fractured</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in item.boxes
    )
    path.write_text(
        f"<annotation><folder>PASCAL VOC</folder><filename>{item.image_id}.jpg</filename><size><width>{width}"
        f"</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>",
        encoding="utf-8",
    )
