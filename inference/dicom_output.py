"""DICOM out for one image: the heatmap overlay and the result text as a Secondary Capture in the source's study.

The object is built by `inference.dicom_objects.secondary_capture` (highdicom), the builder every result
object of the core uses: the source's own Patient and General Study module attributes and Specific Character
Set (0008,0005) copied exactly (and only those present in the source: nothing is invented or added), the
Study Instance UID kept, a new series whose description says 'research use only', new UIDs under the root
given (`uid_root`: the site's, BFD_DICOM_UID_ROOT, handed down as data); the text burned into the image (a
band above the overlay, wrapped to its width) and repeated in Image Comments. Without the character set a
name like "Müller^Jürgen" or "山田^太郎" would be written in the default repertoire (ASCII), i.e. as '?'s, and
the PACS would file the result under another patient name.

highdicom is imported on the first call, not with this module: the doors that never write DICOM do not pay
for it at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.answers import UNTRAINED_BANNER
from inference.dicom_objects.uids import DEFAULT_UID_ROOT

if TYPE_CHECKING:
    from inference.dicom_objects import Algorithm

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def secondary_capture(
    source: Any,
    overlay_rgb: np.ndarray,
    lines: Sequence[str],
    *,
    algorithm: Algorithm | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> bytes:
    """A DICOM Part 10 file (explicit VR little endian): `overlay_rgb` (H, W, 3) uint8 plus `lines` of text.

    `lines` are `inference.answers.summary_lines`: an untrained bundle's banner among them marks the series
    description UNTRAINED. `algorithm`, when given, names the bundle as the equipment (model, version, sha256).
    Its series and SOP Instance UIDs are under `uid_root`.
    """
    from inference.dicom_objects import part10_bytes
    from inference.dicom_objects.secondary_capture import secondary_capture_image
    from inference.dicom_objects.series import Series

    trained = algorithm.trained if algorithm is not None else UNTRAINED_BANNER not in lines
    series = Series.new("sc", trained=trained, uid_root=uid_root, sources=[source])
    image = secondary_capture_image(source, overlay_rgb, lines, series, algorithm=algorithm, uid_root=uid_root)
    return part10_bytes(image)
