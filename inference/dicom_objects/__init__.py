"""The AI's result as DICOM objects, built with highdicom, filed in the source study.

For one study: a Comprehensive SR following TID 1500 (`structured_report`: the algorithm as device observer,
per image a measurement group with finding site, the fracture evaluation, P(fractured), the operating points
and the heatmap's hottest region, then the study's answer), a Grayscale Softcopy Presentation State per grey
image (`presentation_state`: the region and a few words over the untouched source) and a Secondary Capture
per image (`secondary_capture`: the heatmap overlay under the summary text). Every object: a new series per
kind in the source study, 'RESEARCH USE ONLY - not a diagnosis' in its series description, new UIDs under
the root given (`uids`: the site's, or pydicom's example root for research use), the source's patient, study
and character set copied exactly (`patient_study`). An abstention is reported as Indeterminate with its
reason, never as Absent; an untrained bundle says so in the objects and the series descriptions, and its
findings are Indeterminate (undecided in the text), never present or absent.

Modules: `findings` (the inputs), `region` (the hottest region), `codes` (every coded concept), `uids`,
`series`, `patient_study`, one per object kind, and `build` (all objects of a study; Part 10 bytes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from inference.dicom_objects.findings import Algorithm, ImageFinding, Region
from inference.dicom_objects.region import hottest_region
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, check_uid_root

if TYPE_CHECKING:
    from inference.dicom_objects.build import RESULT_KINDS, part10_bytes, result_objects

# The builders load highdicom (about half a second): only when an object is built, not for every door that
# imports the predictor (which needs `Algorithm` alone).
_LAZY = ("RESULT_KINDS", "part10_bytes", "result_objects")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("inference.dicom_objects.build"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_UID_ROOT",
    "RESULT_KINDS",
    "Algorithm",
    "ImageFinding",
    "Region",
    "check_uid_root",
    "hottest_region",
    "part10_bytes",
    "result_objects",
]
