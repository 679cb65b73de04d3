"""The UID root (BFD_DICOM_UID_ROOT): every UID the result objects create is under it, and a malformed one
stops the service at start-up naming the setting.

Objects are built by the core's builders from the real core's answers on real radiographs (loadtest's CR/DX
studies); every UID in them (sequences included) is either one of the sources', a UID the standard defines
(1.2.840.10008...), or new and under the configured root. The default is pydicom's example root.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest
from factories import build_tiny_bundle
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID
from test_dicom_objects import run_core

from inference.bundle import load_bundle
from inference.dicom_objects import Algorithm, ImageFinding, result_objects
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, UID_ROOT_MAX_CHARS, new_uid, uid_root_problem
from inference.dicom_output import secondary_capture
from inference.results import StudyAnswer
from loadtest.dicom_studies import make_study, part10_bytes

ROOT = "1.2.3.4.5.6.7"  # a root for the test: any well-formed one
STANDARD = "1.2.840.10008."  # UIDs the standard defines: SOP classes, transfer syntaxes, coding resources
REPO = Path(__file__).resolve().parents[1]


def uids_in(dataset: Dataset) -> Iterable[str]:
    """Every UI value of `dataset`, its sequences' items and its file meta."""
    datasets = [dataset, *([dataset.file_meta] if hasattr(dataset, "file_meta") else [])]
    while datasets:
        current = datasets.pop()
        for element in current:
            if element.VR == "SQ":
                datasets.extend(element.value)
            elif element.VR == "UI" and element.value:
                yield from (str(v) for v in (element.value if element.VM > 1 else [element.value]))


def uids_outside(dataset: Dataset, root: str, known: set[str]) -> list[str]:
    """The UIDs of `dataset` that are neither `known` (the sources'), the standard's, nor under `root`.

    The file meta's Implementation Class UID is pydicom's (the implementation that wrote the file, not an
    object we made): left out."""
    implementation = str(getattr(getattr(dataset, "file_meta", None), "ImplementationClassUID", ""))
    return sorted(
        uid
        for uid in set(uids_in(dataset))
        if uid not in known
        and not uid.startswith(STANDARD)
        and not uid.startswith(f"{root}.")
        and uid != implementation
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ImageFinding], StudyAnswer, Algorithm]:
    """A CR and a DX of one study through the real core: findings with heatmaps, the study's answer."""
    bundle = build_tiny_bundle(tmp_path_factory.mktemp("uid-root") / "tiny")
    files = [part10_bytes(ds) for ds in make_study(2, modality="mixed", body_parts=["hand"])]
    findings, answer = run_core(bundle, files)
    return findings, answer, Algorithm.of_bundle(load_bundle(bundle))


def test_every_new_uid_of_the_result_objects_is_under_the_configured_root(
    study: tuple[list[ImageFinding], StudyAnswer, Algorithm],
) -> None:
    findings, answer, algorithm = study
    known = {uid for finding in findings for uid in uids_in(finding.source)}
    objects = result_objects(findings, answer, algorithm, uid_root=ROOT)
    assert [o.Modality for o in objects] == ["SR", "PR", "PR", "OT", "OT"]
    for out in objects:
        assert uids_outside(out, ROOT, known) == [], out.Modality
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
            assert str(out[keyword].value).startswith(f"{ROOT}."), (out.Modality, keyword)
    sr = objects[0]
    created = set(uids_in(sr)) - known
    assert len(created) >= 2 + len(findings) + 1 + 1  # SOP instance, series, a tracking UID per group, device
    assert all(len(uid) <= 64 for out in objects for uid in uids_in(out))


def test_the_http_doors_secondary_capture_is_under_the_configured_root(
    study: tuple[list[ImageFinding], StudyAnswer, Algorithm],
) -> None:
    findings, _, algorithm = study
    finding = findings[0]
    assert finding.overlay_rgb is not None
    data = secondary_capture(finding.source, finding.overlay_rgb, ["a line"], algorithm=algorithm, uid_root=ROOT)
    out = pydicom.dcmread(io.BytesIO(data))
    assert uids_outside(out, ROOT, set(uids_in(finding.source))) == []
    assert str(out.SOPInstanceUID).startswith(f"{ROOT}.")


def test_the_default_root_is_pydicoms_example_root() -> None:
    from service.settings import Settings

    assert PYDICOM_ROOT_UID.rstrip(".") == DEFAULT_UID_ROOT
    assert Settings().dicom_uid_root == DEFAULT_UID_ROOT
    assert new_uid().startswith(PYDICOM_ROOT_UID)
    node = Settings(dicom_destination="PACS@127.0.0.1:104", dicom_uid_root=ROOT).node_config()
    assert node is not None
    assert node.uid_root == ROOT


@pytest.mark.parametrize("root", [DEFAULT_UID_ROOT, "2.25", "0", "1.2.840.99999", "1" * UID_ROOT_MAX_CHARS])
def test_a_well_formed_root_gives_uids_that_fit(root: str) -> None:
    assert uid_root_problem(root) is None
    uids = {new_uid(root) for _ in range(50)}
    assert len(uids) == 50
    assert all(len(uid) <= 64 and uid.startswith(f"{root}.") for uid in uids)
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids)


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("", "empty"),
        ("1.2.3.", "trailing dot"),
        ("1.02.3", "leading zero"),
        ("1..2", "digits in dot-separated components"),
        ("1.2.a", "digits in dot-separated components"),
        (" 1.2", "digits in dot-separated components"),
        ("1" * (UID_ROOT_MAX_CHARS + 1), f"at most {UID_ROOT_MAX_CHARS} characters"),
    ],
)
def test_a_malformed_root_is_refused_saying_what_was_expected(root: str, expected: str) -> None:
    from pydantic import ValidationError

    from service.settings import Settings
    from service.startup_checks import problem_lines

    problem = uid_root_problem(root)
    assert problem is not None
    assert expected in problem
    if root.strip() == root:  # the setting strips surrounding blanks
        with pytest.raises(ValidationError) as caught:
            Settings(dicom_uid_root=root)
        [line] = problem_lines(caught.value)
        assert line.startswith("BFD_DICOM_UID_ROOT: expected"), line
    with pytest.raises(ValueError, match="expected"):
        new_uid(root)


def test_bfd_serve_stops_at_start_up_naming_the_uid_root(tmp_path: Path) -> None:
    """Exit 2 and a line naming BFD_DICOM_UID_ROOT, before the bundle is looked at (this one does not exist)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BFD_")}
    env |= {
        "BFD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'results.sqlite3'}",
        "BFD_PORT": "0",
        "BFD_DICOM_UID_ROOT": "1.2.826.0.01",
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "bfd.cli", "serve", "--bundle", str(tmp_path / "no-bundle")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "invalid setting: BFD_DICOM_UID_ROOT: expected" in output, output[-3000:]
    assert "leading zero" in output
    assert "Traceback" not in output
