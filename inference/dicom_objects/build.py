"""All result objects of one study from its findings, and their Part 10 bytes.

One call, one study: the SR (one for the study), a GSPS per grey source image, a Secondary Capture per source
image (each overlay is of one image), each kind in a new series of its own, all with the same content date
and time, every new UID under the `uid_root` given (the site's root: `inference.dicom_objects.uids`). The
answers must come from the algorithm named (same name, version and trained flag): an object must never credit
one bundle with another's answer.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.answers import summary_lines
from inference.dicom_objects.findings import Algorithm, ImageFinding
from inference.dicom_objects.patient_study import require
from inference.dicom_objects.presentation_state import is_grey, presentation_state
from inference.dicom_objects.secondary_capture import secondary_capture_image
from inference.dicom_objects.series import Series
from inference.dicom_objects.structured_report import structured_report
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, check_uid_root
from inference.results import StudyAnswer

RESULT_KINDS = ("sr", "gsps", "sc")
_REFERENCED = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns")


def result_objects(
    findings: Sequence[ImageFinding],
    study: StudyAnswer,
    algorithm: Algorithm,
    kinds: Collection[str] = RESULT_KINDS,
    uid_root: str = DEFAULT_UID_ROOT,
) -> list[Dataset]:
    """The study's result objects, in RESULT_KINDS order (SR, then GSPS and SC in the findings' order), every
    UID they create under `uid_root`.

    A colour source (one the core abstains on as not a radiograph) gets no GSPS: a grayscale presentation
    state cannot present it; the SR and its SC still report it. ValueError for no findings, an unknown
    kind, a malformed `uid_root`, findings of more than one study, a source image twice, a source without
    the UIDs and size a reference needs, or answers of another bundle than `algorithm`.
    """
    unknown = sorted(set(kinds) - set(RESULT_KINDS))
    if unknown:
        raise ValueError(f"unknown result kinds {unknown}; expected some of {list(RESULT_KINDS)}")
    check_uid_root(uid_root)
    _check(findings, algorithm)
    now = datetime.now()
    out: list[Dataset] = []

    def new_series(kind: str, of: Sequence[ImageFinding]) -> Series:
        sources = [finding.source for finding in of]
        return Series.new(kind, trained=algorithm.trained, now=now, uid_root=uid_root, sources=sources)

    if "sr" in kinds:
        out.append(structured_report(findings, study, algorithm, new_series("sr", findings), uid_root))
    if "gsps" in kinds:
        grey = [finding for finding in findings if is_grey(finding.source)]
        series = new_series("gsps", grey)
        out.extend(
            presentation_state(f, algorithm, series, instance_number=n, uid_root=uid_root)
            for n, f in enumerate(grey, 1)
        )
    if "sc" in kinds:
        series = new_series("sc", findings)
        out.extend(
            secondary_capture_image(
                f.source,
                f.overlay_rgb,
                summary_lines(f.answer),
                series,
                algorithm=algorithm,
                instance_number=n,
                uid_root=uid_root,
            )
            for n, f in enumerate(findings, 1)
        )
    return out


def _check(findings: Sequence[ImageFinding], algorithm: Algorithm) -> None:
    if not findings:
        raise ValueError("no findings: result objects need at least one source image")
    for finding in findings:
        require(finding.source, *_REFERENCED)
        model = finding.answer.model
        if (model.name, model.version, model.trained) != (algorithm.name, algorithm.version, algorithm.trained):
            raise ValueError(
                f"{finding.source.SOPInstanceUID}: answered by {model.name} {model.version} "
                f"(trained={model.trained}), not by {algorithm.name} {algorithm.version} "
                f"(trained={algorithm.trained})"
            )
    studies = sorted({str(finding.source.StudyInstanceUID) for finding in findings})
    if len(studies) > 1:
        raise ValueError(f"the findings belong to {len(studies)} studies {studies}; one call takes one study")
    instances = [str(finding.source.SOPInstanceUID) for finding in findings]
    twice = sorted({uid for uid in instances if instances.count(uid) > 1})
    if twice:
        raise ValueError(f"source images given more than once: {twice}")


def part10_bytes(dataset: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file in explicit VR little endian (File Meta filled in where missing)."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        dataset.file_meta = meta
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    elif syntax != ExplicitVRLittleEndian:
        raise ValueError(f"expected a dataset in explicit VR little endian, got transfer syntax {syntax}")
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
