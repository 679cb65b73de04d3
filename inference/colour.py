"""How colourful an image is: the one measure the abstention policy reads, for PNG, JPEG and DICOM alike.

Radiographs are grey (0); photographs and screenshots are not. The measure is the mean absolute deviation of
each channel from the pixel's grey level, on a 64x64 box-filtered thumbnail: cheap on any size, and blind to
the few coloured pixels of a burned-in label.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMB_SIDE = 64  # side of the thumbnail colourfulness is measured on


def colourfulness(rgb: Image.Image) -> float:
    """0 for grey, up to 170 for pure primaries: an RGB Pillow image."""
    thumb = np.asarray(rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.float32)
    return float(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean())
