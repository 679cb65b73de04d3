"""How well a heatmap points at annotated fractures: the pointing game, energy inside the boxes, and baselines.

Frames. The model sees the displayed image (EXIF orientation applied) stretched to 224 x 224 without
letterboxing, and a Grad-CAM grid (h, w) covers that square; so grid cell (row i, column j) covers
[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h) of the displayed image of W x H pixels, whatever its aspect.
FracAtlas's boxes are in that displayed frame too, so mapping the heatmap back is one scale per axis.

- Pointing game: the heatmap's maximum (the centre of its highest cell, which is also where the bilinear
  overlay the service draws peaks) is a hit when it falls inside any box. A flat heatmap (all cells equal,
  e.g. Grad-CAM all zeros) points nowhere and counts as a miss.
- Energy fraction: the share of the heatmap, stretched bilinearly over the image as the service's overlay is,
  that lies inside the union of the boxes.
- Baselines: a heatmap peaked at the image centre (a Gaussian on the same grid), so the figures have something
  to beat, and the fraction of the image the boxes cover, the expected hit rate of a pointer dropped at random.

Pure numpy and Pillow: testable on synthetic heatmaps whose answers are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from training import metrics
from training.fracatlas import Box

WORK_MAX_SIDE = 512  # energy is integrated on the image shrunk to this (the service's overlay size)
CENTRE_SIGMA = 0.25  # the centre baseline's spread, as a fraction of the image side


@dataclass(frozen=True)
class Localisation:
    """One image's localisation figures (coordinates in displayed-image pixels)."""

    hit: bool
    peak_x: float | None  # None for a flat heatmap
    peak_y: float | None
    energy_fraction: float | None  # None when the heatmap is zero everywhere
    centre_hit: bool
    centre_energy_fraction: float
    box_area_fraction: float


def peak_point(heatmap: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """The centre of the heatmap's highest cell, in pixels of a `width` x `height` image; None when flat.

    Ties go to the first cell in row-major order (only exact float ties; a real Grad-CAM rarely has any).
    """
    grid = _grid(heatmap)
    if float(grid.max()) == float(grid.min()):
        return None
    row, column = np.unravel_index(int(np.argmax(grid)), grid.shape)
    rows, columns = grid.shape
    return float((column + 0.5) * width / columns), float((row + 0.5) * height / rows)


def inside_any(x: float, y: float, boxes: Sequence[Box]) -> bool:
    return any(box.contains(x, y) for box in boxes)


def pointing_hit(heatmap: np.ndarray, boxes: Sequence[Box], width: int, height: int) -> bool:
    """True when the heatmap's maximum lies inside any box (a flat heatmap never hits)."""
    peak = peak_point(heatmap, width, height)
    return peak is not None and inside_any(peak[0], peak[1], boxes)


def box_area_fraction(boxes: Sequence[Box], width: int, height: int) -> float:
    """Area of the union of the boxes (clipped to the image) over the image's area, exactly."""
    clipped = [
        (max(0.0, b.x_min), max(0.0, b.y_min), min(float(width), b.x_max), min(float(height), b.y_max)) for b in boxes
    ]
    clipped = [c for c in clipped if c[2] > c[0] and c[3] > c[1]]
    if not clipped or width <= 0 or height <= 0:
        return 0.0
    # Coordinate compression: the union is exact on the grid the box edges make.
    xs = sorted({v for c in clipped for v in (c[0], c[2])})
    ys = sorted({v for c in clipped for v in (c[1], c[3])})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            if any(c[0] <= x0 and x1 <= c[2] and c[1] <= y0 and y1 <= c[3] for c in clipped):
                area += (x1 - x0) * (y1 - y0)
    return area / (width * height)


def energy_fraction(heatmap: np.ndarray, boxes: Sequence[Box], width: int, height: int) -> float | None:
    """Share of the bilinearly stretched heatmap inside the union of the boxes; None when it is zero everywhere."""
    grid = np.clip(_grid(heatmap), 0.0, None)
    if float(grid.sum()) <= 0.0:
        return None
    scale = min(1.0, WORK_MAX_SIDE / max(width, height))
    work_w, work_h = max(1, round(width * scale)), max(1, round(height * scale))
    stretched = Image.fromarray(grid.astype(np.float32))  # 2-D float32: mode F
    stretched = stretched.resize((work_w, work_h), Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(stretched, dtype=np.float64), 0.0, None)
    total = float(heat.sum())
    if total <= 0.0:
        return None
    mask = _coverage(boxes, width, height, work_w, work_h)
    return float((heat * mask).sum() / total)


def centre_heatmap(shape: tuple[int, int]) -> np.ndarray:
    """A Gaussian peaked at the image centre, on a grid of `shape` (rows, columns): the baseline to beat."""
    rows, columns = shape
    y = (np.arange(rows) + 0.5) / rows - 0.5
    x = (np.arange(columns) + 0.5) / columns - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * CENTRE_SIGMA**2))


def localise(heatmap: np.ndarray, boxes: Sequence[Box], width: int, height: int) -> Localisation:
    """Every figure for one image: the heatmap's, the centre baseline's, and the boxes' share of the image."""
    if not boxes:
        raise ValueError("localisation needs at least one box")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    grid = _grid(heatmap)
    peak = peak_point(grid, width, height)
    return Localisation(
        hit=peak is not None and inside_any(peak[0], peak[1], boxes),
        peak_x=None if peak is None else peak[0],
        peak_y=None if peak is None else peak[1],
        energy_fraction=energy_fraction(grid, boxes, width, height),
        # The baseline's peak is the exact centre (its grid's centre cell when the grid is odd).
        centre_hit=inside_any(width / 2, height / 2, boxes),
        centre_energy_fraction=energy_fraction(centre_heatmap(grid.shape), boxes, width, height) or 0.0,
        box_area_fraction=box_area_fraction(boxes, width, height),
    )


def summarise(cases: Sequence[Localisation], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Hit rates with Wilson intervals; mean energy fractions with image-bootstrap intervals (JSON-ready)."""
    count = len(cases)
    energies = [c.energy_fraction for c in cases if c.energy_fraction is not None]
    return {
        "images": count,
        "pointing_game": metrics.proportion(sum(c.hit for c in cases), count).as_dict(),
        "centre_baseline_pointing_game": metrics.proportion(sum(c.centre_hit for c in cases), count).as_dict(),
        "random_pointer_expected_hit_rate": _mean([c.box_area_fraction for c in cases]),
        "flat_heatmaps": sum(c.peak_x is None for c in cases),
        "energy_fraction": _mean_estimate(energies, n_resamples, seed),
        "centre_baseline_energy_fraction": _mean_estimate([c.centre_energy_fraction for c in cases], n_resamples, seed),
    }


def as_dict(case: Localisation) -> dict[str, Any]:
    return asdict(case)


def _grid(heatmap: np.ndarray) -> np.ndarray:
    grid = np.asarray(heatmap, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"a heatmap must be a non-empty 2-D grid, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("a heatmap must be finite")
    return grid


def _coverage(boxes: Sequence[Box], width: int, height: int, work_w: int, work_h: int) -> np.ndarray:
    """(work_h, work_w) in [0, 1]: how much of each working pixel the union of the boxes covers.

    Each box's coverage is exact (overlap lengths per axis); overlapping boxes take the larger coverage, which
    is exact wherever they do not share a partly covered pixel.
    """
    sx, sy = work_w / width, work_h / height
    mask = np.zeros((work_h, work_w), dtype=np.float64)
    for box in boxes:
        columns = _overlap(box.x_min * sx, box.x_max * sx, work_w)
        rows = _overlap(box.y_min * sy, box.y_max * sy, work_h)
        np.maximum(mask, rows[:, None] * columns[None, :], out=mask)
    return mask


def _overlap(low: float, high: float, count: int) -> np.ndarray:
    """(count,) overlap of [low, high] with each unit cell [k, k + 1)."""
    starts = np.arange(count, dtype=np.float64)
    return np.clip(np.minimum(high, starts + 1.0) - np.maximum(low, starts), 0.0, 1.0)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _mean_estimate(values: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    """A mean with a bootstrap-over-images 95% interval (the images are the independent units here)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return metrics.Estimate(None, None, None, "none").as_dict()
    interval = metrics.bootstrap_interval(
        lambda rows: float(array[rows].mean()), list(range(array.size)), n_resamples=n_resamples, seed=seed
    )
    return metrics.Estimate(
        value=float(array.mean()),
        low=None if interval is None else interval[0],
        high=None if interval is None else interval[1],
        method=f"image bootstrap ({n_resamples} resamples)",
    ).as_dict() | {"images": int(array.size)}
