"""Where the heatmap is hottest, in source image pixels.

The model sees the source stretched (aspect not kept) to 224 x 224, and Grad-CAM's 7 x 7 grid covers that
input in equal 32 x 32 cells; so cell (r, c) is the source box columns [c, c+1) * Columns / 7 by rows
[r, r+1) * Rows / 7, for any Rows != Columns.
"""

from __future__ import annotations

import numpy as np

from inference.dicom_objects.findings import Region

GRID_CELLS = 7
HOT_FRACTION = 0.8  # cells this close to the maximum, 4-connected to the hottest one, belong to its region


def hottest_region(cam: np.ndarray, rows: int, columns: int) -> Region:
    """The bounding box of the hottest cell and its 4-connected neighbours >= HOT_FRACTION * max, in source pixels.

    `cam` (7, 7) float, any scale (only its shape and order matter); `rows` x `columns` the source image.
    One blob, not every warm cell: a second, separate warm spot would widen a box until it says nothing.
    Ties for the maximum go to the first cell in row-major order. ValueError for a map without a positive
    finite value (no evidence anywhere: there is no region to show).
    """
    grid = np.asarray(cam, dtype=np.float64)
    if grid.shape != (GRID_CELLS, GRID_CELLS):
        raise ValueError(f"cam must be ({GRID_CELLS}, {GRID_CELLS}), got {grid.shape}")
    if rows < 1 or columns < 1:
        raise ValueError(f"the image must have rows and columns >= 1, got {rows} x {columns}")
    grid = np.where(np.isfinite(grid), grid, -np.inf)
    peak = float(grid.max())
    if not peak > 0.0:
        raise ValueError("the map has no positive value: no region is hotter than another")
    hot = grid >= HOT_FRACTION * peak
    start = np.unravel_index(int(np.argmax(grid)), grid.shape)
    blob = _connected(hot, (int(start[0]), int(start[1])))
    cell_rows = [r for r, _ in blob]
    cell_columns = [c for _, c in blob]
    return Region(
        x0=min(cell_columns) * columns / GRID_CELLS,
        y0=min(cell_rows) * rows / GRID_CELLS,
        x1=(max(cell_columns) + 1) * columns / GRID_CELLS,
        y1=(max(cell_rows) + 1) * rows / GRID_CELLS,
    )


def _connected(mask: np.ndarray, start: tuple[int, int]) -> set[tuple[int, int]]:
    """The cells of `mask` 4-connected to `start` (a flood fill over 49 cells)."""
    seen = {start}
    todo = [start]
    while todo:
        r, c = todo.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and (nr, nc) not in seen:
                seen.add((nr, nc))
                todo.append((nr, nc))
    return seen


def region_of(cam: np.ndarray | None, rows: int, columns: int) -> Region | None:
    """`hottest_region`, or None when there is no map or it shows nothing."""
    if cam is None:
        return None
    values = np.asarray(cam, dtype=np.float64)
    if not (np.isfinite(values) & (values > 0.0)).any():
        return None
    return hottest_region(values, rows, columns)  # a wrong shape still raises: that is a caller's bug
