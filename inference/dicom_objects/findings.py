"""What the result objects are written from: who produced the result, the per-image findings, a region.

Plain frozen dataclasses, so a door (the HTTP API, the DICOM node) can hold them without importing highdicom's
types; the builders in this package turn them into DICOM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from inference.bundle import Bundle
from inference.results import ImagePrediction


@dataclass(frozen=True)
class Algorithm:
    """Who produced the result: the bundle's name and version, its sha256 and whether it was trained.

    `sha256` pins the exact bundle: `of_bundle` takes it over manifest.json, which itself lists the sha256 of
    every graph and weights file, so one digest names the whole bundle.
    """

    name: str
    version: str
    sha256: str
    trained: bool

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> Algorithm:
        """The algorithm a loaded bundle is (its manifest's sha256 as the bundle's digest)."""
        manifest = bundle.manifest
        return cls(name=manifest.name, version=manifest.version, sha256=bundle.sha256, trained=manifest.trained)


@dataclass(frozen=True)
class Region:
    """A box in source image pixel coordinates (column = x, row = y), half-open: [x0, x1) x [y0, y1).

    DICOM's image-relative coordinates (SR SCOORD, GSPS PIXEL units) put 0.0 at the top-left corner of the
    top-left pixel and (Columns, Rows) at the bottom-right corner of the last one, so these values are
    written as they are.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def corners(self) -> np.ndarray:
        """(5, 2) float: the closed rectangle as (column, row) points, first point repeated last."""
        return np.array(
            [[self.x0, self.y0], [self.x1, self.y0], [self.x1, self.y1], [self.x0, self.y1], [self.x0, self.y0]],
            dtype=np.float64,
        )


@dataclass(frozen=True, eq=False)  # ndarray fields: identity equality
class ImageFinding:
    """One source image and what the core answered about it.

    `overlay_rgb` None: the image's Secondary Capture is the summary text alone (no second decode of the
    source here, outside the core's decode budgets); the SR and the GSPS do not need it.
    """

    source: pydicom.Dataset  # the source instance as received (may hold PixelData; never modified)
    answer: ImagePrediction  # the core's answer for it
    cam: np.ndarray | None  # (7, 7) Grad-CAM 0..1 over the model input; None when not computed
    overlay_rgb: np.ndarray | None  # (H, W, 3) uint8 heatmap overlay for the Secondary Capture
    # The core's rendering range (inference.dicom.DicomImage.value_range): the GSPS window of a source without
    # its own VOI, so the source is not decoded again here. None: found from the source (decoded if need be).
    value_range: tuple[float, float] | None = None
