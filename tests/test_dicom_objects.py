"""The DICOM result objects (`inference.dicom_objects`): the SR (TID 1500), GSPS and Secondary Capture.

Sources are real radiographs (tests/data/xray, FracAtlas, CC BY 4.0) put into CR and DX datasets; answers
come from the real core (`Predictor`: decode, route, specialist, Grad-CAM, study rule) on a tiny bundle
(tests/factories.py) with operating points, and on the demo ResNet50 bundle when models/demo is built.
The tiny bundle's elbow specialist answers m + 0.5 (m the image's mean), and with the abstention bar at
0.9999 an image the router has to name abstains while one whose DICOM header names the part does not.
Every object is read back from its Part 10 bytes, the SR through highdicom's own content API.
"""

from __future__ import annotations

import asyncio
import copy
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
import pytest
from factories import build_tiny_bundle
from highdicom.sr import CodedConcept
from highdicom.sr.utils import find_content_items
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from inference.bundle import load_bundle
from inference.config import PredictorConfig
from inference.dicom_objects import RESULT_KINDS, Algorithm, ImageFinding, Region, hottest_region, result_objects
from inference.dicom_objects import codes as bfd_codes
from inference.dicom_objects.build import part10_bytes
from inference.dicom_objects.presentation_state import presentation_state
from inference.dicom_objects.series import Series
from inference.dicom_objects.structured_report import STUDY_TRACKING_ID, image_tracking_id
from inference.predictor import Predictor, Upload
from inference.results import DISCLAIMER, UNTRAINED_WARNING, StudyAnswer

XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "demo"
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RESEARCH = "RESEARCH USE ONLY - not a diagnosis"
PARTS = ("elbow", "hand", "shoulder")
CONFIG = PredictorConfig(
    decode_threads=1, decode_processes=0, intra_op_threads=1, abstain_min_router_probability=0.9999
)


@dataclass(frozen=True)
class Patient:
    charset: str | list[str] | None
    attributes: dict[str, str]  # Patient and General Study module values, shared by the study's images


EUROPEAN = Patient(
    "ISO_IR 192",
    {
        "PatientName": "Müller^Jürgen",
        "PatientID": "PID-4711",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
        "ReferringPhysicianName": "Böhm^Käthe",
        "StudyID": "S-1",
        "AccessionNumber": "ACC-1",
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "StudyDescription": "Ellbogen rechts",
    },
)
JAPANESE = Patient(  # PS3.5 H.3.1's example; no birth date, study ID or accession number: none invented
    ["", "ISO 2022 IR 87"],
    {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう", "PatientID": "PID-0815", "StudyDate": "20240103"},
)


def radiograph(
    path: Path,
    patient: Patient,
    study_uid: str,
    *,
    sop_class: str = CR,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    body_part: str | None = "ELBOW",
    window: tuple[float, float] | None = None,
) -> bytes:
    """A FracAtlas JPEG as an uncompressed DICOM file: grey, `bits_stored` in 8 or 16 bits allocated."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    pixels = (grey << (bits_stored - 8)).astype(np.uint8 if bits_stored == 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if patient.charset is not None:
        ds.SpecificCharacterSet = patient.charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = {CR: "CR", SC: "OT"}.get(sop_class, "DX")
    for keyword, value in patient.attributes.items():
        setattr(ds, keyword, value)
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def run_core(bundle: Path, files: Sequence[bytes]) -> tuple[list[ImageFinding], StudyAnswer]:
    """The real core on `files` (one study): each image's finding (source as parsed, answer, cam, overlay)."""

    async def run() -> tuple[list[ImageFinding], StudyAnswer]:
        predictor = Predictor(load_bundle(bundle), CONFIG)
        await predictor.start()
        try:
            uploads = [Upload(data, f"image{i}.dcm", heatmap=True, dicom=True) for i, data in enumerate(files)]
            results = await predictor.run_images(predictor.admit(len(uploads)), uploads)
            answers = [await predictor.answer(result) for result in results]
            study = (await predictor.study_of(results, answers)).study
            findings = []
            for result, answer in zip(results, answers, strict=True):
                cam, rgb = predictor.overlay(result)
                assert result.prepared.dicom is not None
                findings.append(ImageFinding(result.prepared.dicom.dataset, answer, cam, rgb))
            return findings, study
        finally:
            await predictor.stop()

    return asyncio.run(run())


@dataclass(frozen=True)
class Case:
    files: list[bytes]
    findings: list[ImageFinding]
    study: StudyAnswer
    algorithm: Algorithm
    objects: list[Dataset]
    written: list[bytes]

    def of_class(self, *classes: str) -> list[tuple[Dataset, bytes]]:
        return [
            (pydicom.dcmread(io.BytesIO(b)), b)
            for o, b in zip(self.objects, self.written, strict=True)
            if o.SOPClassUID in classes
        ]


def make_case(bundle: Path, files: list[bytes]) -> Case:
    findings, study = run_core(bundle, files)
    algorithm = Algorithm.of_bundle(load_bundle(bundle))
    objects = result_objects(findings, study, algorithm)
    return Case(files, findings, study, algorithm, objects, [part10_bytes(o) for o in objects])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    points = {"decision": 0.5, "high_sensitivity": 0.3, "high_specificity": 0.7}
    return build_tiny_bundle(
        tmp_path_factory.mktemp("dicom-objects") / "tiny",
        thresholds=dict.fromkeys(PARTS, points),
        specialist_offsets={"elbow": 0.5},
    )


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same bundle with `trained: true` in its manifest: its answers are coded present or absent."""
    points = {"decision": 0.5, "high_sensitivity": 0.3, "high_specificity": 0.7}
    return build_tiny_bundle(
        tmp_path_factory.mktemp("dicom-objects-trained") / "tiny",
        thresholds=dict.fromkeys(PARTS, points),
        specialist_offsets={"elbow": 0.5},
        trained=True,
    )


def european_files() -> list[bytes]:
    """Two images of one study under UTF-8: a CR named by its header (answered), a DX MONOCHROME1 routed (abstains)."""
    study = generate_uid()
    return [
        radiograph(XRAY / "hand/fractured/fracatlas_IMG0001363.jpg", EUROPEAN, study, window=(2048, 4096)),
        radiograph(
            XRAY / "leg/fractured/fracatlas_IMG0002437.jpg", EUROPEAN, study,
            sop_class=DX_PRESENTATION, photometric="MONOCHROME1", bits_stored=16, body_part=None,
        ),
    ]  # fmt: skip


def japanese_files() -> list[bytes]:
    """One 8-bit DX (for processing) under ISO 2022 IR 87, no window, the part in its header."""
    return [
        radiograph(
            XRAY / "hand/normal/fracatlas_IMG0001587.jpg", JAPANESE, generate_uid(), sop_class=DX_PROCESSING,
            bits_stored=8,
        )
    ]  # fmt: skip


@pytest.fixture(scope="module")
def european(bundle: Path) -> Case:
    return make_case(bundle, european_files())


@pytest.fixture(scope="module")
def japanese(bundle: Path) -> Case:
    return make_case(bundle, japanese_files())


@pytest.fixture(scope="module")
def european_trained(trained_bundle: Path) -> Case:
    return make_case(trained_bundle, european_files())


@pytest.fixture(scope="module")
def japanese_trained(trained_bundle: Path) -> Case:
    return make_case(trained_bundle, japanese_files())


def raw_value(data: bytes, keyword: str) -> bytes:
    """The value bytes of top-level `keyword` in an explicit VR little endian Part 10 file (never decoded)."""
    tag = int(tag_for_keyword(keyword) or 0)
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode()
    start = data.index(header, 132)  # the first one after the preamble is the top-level element
    (length,) = struct.unpack("<H", data[start + 6 : start + 8])
    return data[start + 8 : start + 8 + length]


def sr_of(case: Case) -> Any:
    [(_, data)] = case.of_class(*SR_CLASSES)
    return hd.sr.srread(io.BytesIO(data))


def groups_of(report: Any) -> dict[str, Any]:
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    return {group.tracking_identifier: group for group in groups}


def evaluation(group: Any, name: CodedConcept) -> CodedConcept:
    [item] = group.get_qualitative_evaluations(name=name)
    return item.value


def texts(item: Any, name: CodedConcept) -> list[str]:
    return [found.value for found in find_content_items(item, name=name, value_type=hd.sr.ValueTypeValues.TEXT)]


# --- the preconditions the cases are built on ---------------------------------------------------------------------


def test_the_core_answered_as_the_cases_need(european: Case, japanese: Case) -> None:
    named, routed = european.findings
    assert not named.answer.abstained
    assert named.answer.body_part.source == "dicom"
    assert named.answer.fracture.label == "fractured"
    assert (named.answer.fracture.suspicious, named.answer.fracture.definite) == (True, False)
    assert routed.answer.abstained
    assert routed.answer.abstention_reason
    assert european.study.abstained
    assert not japanese.study.abstained
    for finding in [*european.findings, *japanese.findings]:
        assert finding.cam is not None
        assert finding.cam.max() > 0  # the elbow head's map is not empty: there is a region to report


# --- the SR -------------------------------------------------------------------------------------------------------


def test_sr_is_a_tid_1500_report_with_one_group_per_image_and_one_for_the_study(european: Case) -> None:
    sr = sr_of(european)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = groups_of(report)
    assert set(groups) == {image_tracking_id(1), image_tracking_id(2), STUDY_TRACKING_ID}
    for index, finding in enumerate(european.findings, 1):
        group = groups[image_tracking_id(index)]
        assert isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
        roi = group.roi
        assert roi is not None
        [selected_from] = roi.ContentSequence  # SCOORD SELECTED FROM IMAGE
        assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == finding.source.SOPInstanceUID
        assert selected_from.ReferencedSOPSequence[0].ReferencedSOPClassUID == finding.source.SOPClassUID
        assert finding.cam is not None
        box = hottest_region(finding.cam, int(finding.source.Rows), int(finding.source.Columns))
        np.testing.assert_allclose(roi.value, box.corners())
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        [site] = group.finding_sites
        assert site.value == bfd_codes.finding_site("elbow") == CodedConcept("16953009", "SCT", "Elbow joint")
        assert group.finding_type == bfd_codes.FRACTURE
        [p] = group.get_measurements(name=bfd_codes.PROBABILITY)
        assert p.value == pytest.approx(finding.answer.fracture.probability, abs=1e-12)
        assert p.unit == bfd_codes.PROBABILITY_UNIT
    study_group = groups[STUDY_TRACKING_ID]
    referenced = {image.referenced_sop_instance_uid for image in study_group.source_images}
    assert referenced == {f.source.SOPInstanceUID for f in european.findings}
    [p] = study_group.get_measurements(name=bfd_codes.PROBABILITY)
    assert p.value == pytest.approx(european.study.fracture.probability, abs=1e-12)
    assert texts(study_group[0], bfd_codes.STUDY_RULE) == [european.study.rule]
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {f.source.SOPInstanceUID for f in european.findings}


def test_sr_reports_the_fracture_and_both_operating_points(european_trained: Case, japanese_trained: Case) -> None:
    assert european_trained.algorithm.trained
    named = groups_of(sr_of(european_trained).content)[image_tracking_id(1)]
    assert evaluation(named, bfd_codes.FRACTURE) == bfd_codes.PRESENT
    assert evaluation(named, bfd_codes.SUSPICIOUS) == bfd_codes.PRESENT
    assert evaluation(named, bfd_codes.DEFINITE) == bfd_codes.ABSENT
    assert texts(named[0], bfd_codes.ABSTENTION) == []
    study = groups_of(sr_of(japanese_trained).content)[STUDY_TRACKING_ID]
    assert japanese_trained.study.fracture.label == "fractured"
    assert evaluation(study, bfd_codes.FRACTURE) == bfd_codes.PRESENT


def test_an_untrained_bundle_is_undecided_in_the_sr_the_gsps_and_the_sc(european: Case, japanese: Case) -> None:
    """The core labelled these images (one fractured, suspicious, not definite; no abstention), but an untrained
    bundle's labels mean nothing: every coded evaluation is Indeterminate, and no text reads as a finding."""
    named = european.findings[0].answer
    assert not named.model.trained
    assert (named.abstained, named.fracture.label, named.fracture.suspicious) == (False, "fractured", True)
    for case in (european, japanese):
        groups = groups_of(sr_of(case).content)
        assert len(groups) == len(case.findings) + 1
        for name, group in groups.items():
            values = [item.value for item in group.get_qualitative_evaluations()]
            assert len(values) == 3, name  # the fracture and both operating points: coded, undecided
            assert set(values) == {bfd_codes.INDETERMINATE}, name
            [p] = group.get_measurements(name=bfd_codes.PROBABILITY)  # the number is still reported
            assert 0.0 <= p.value <= 1.0
        for state, _ in case.of_class(GSPS):
            words = " ".join(
                text.UnformattedTextValue for text in state.GraphicAnnotationSequence[0].TextObjectSequence
            )
            assert "undecided" in words or "ABSTAINED" in words
            assert "PRESENT" not in words
            assert "absent" not in words
        for capture, _ in case.of_class(SC):
            comments = str(capture.ImageComments)
            assert "Fracture: undecided (untrained model)" in comments
            assert "Fracture: FRACTURED" not in comments
            assert "Fracture: normal" not in comments
            assert ": yes" not in comments
            assert ": no;" not in comments


def test_a_trained_bundle_says_present_and_absent_in_the_gsps_and_the_sc(european_trained: Case) -> None:
    [(named, _), _] = european_trained.of_class(GSPS)
    words = " ".join(text.UnformattedTextValue for text in named.GraphicAnnotationSequence[0].TextObjectSequence)
    assert "Fracture PRESENT" in words
    assert "UNTRAINED" not in words
    [(capture, _), _] = european_trained.of_class(SC)
    assert "Fracture: FRACTURED" in capture.ImageComments
    assert "suspicious (high-sensitivity point): yes" in capture.ImageComments


def test_sr_reports_abstentions_as_indeterminate_never_absent(european_trained: Case) -> None:
    european = european_trained
    groups = groups_of(sr_of(european).content)
    routed = european.findings[1].answer
    for group, reason in ((groups[image_tracking_id(2)], routed.abstention_reason), (groups[STUDY_TRACKING_ID], None)):
        values = [item.value for item in group.get_qualitative_evaluations()]
        assert len(values) == 3  # the fracture and both operating points
        assert all(value == bfd_codes.INDETERMINATE for value in values)
        assert bfd_codes.ABSENT not in values
        assert bfd_codes.PRESENT not in values
        [text] = texts(group[0], bfd_codes.ABSTENTION)
        assert text == (reason or european.study.abstention_reason)
    [p] = groups[image_tracking_id(2)].get_measurements(name=bfd_codes.PROBABILITY)
    assert p.value == pytest.approx(routed.fracture.probability, abs=1e-12)  # still reported, as the core does


def test_sr_names_the_algorithm_its_sha256_and_that_it_is_untrained(european: Case) -> None:
    sr = sr_of(european)
    algorithm = european.algorithm
    assert len(algorithm.sha256) == 64
    [observer] = sr.content.get_observer_contexts(observer_type=dicom_codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.name == algorithm.name == "tiny"
    assert device.serial_number == algorithm.sha256
    assert algorithm.version in (device.model_name or "")
    for group in groups_of(sr.content).values():
        assert texts(group[0], dicom_codes.DCM.AlgorithmName) == [algorithm.name]
        assert texts(group[0], dicom_codes.DCM.AlgorithmVersion) == [algorithm.version]
        assert f"bundle sha256 {algorithm.sha256}" in texts(group[0], dicom_codes.DCM.AlgorithmParameters)
    root = sr.content[0]
    assert texts(root, bfd_codes.UNTRAINED) == [UNTRAINED_WARNING]
    assert texts(root, bfd_codes.COMMENT) == [DISCLAIMER]
    assert sr.DeviceSerialNumber == algorithm.sha256
    assert "UNTRAINED" in sr.SeriesDescription
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"


def test_a_trained_bundle_carries_no_untrained_statement(bundle: Path, japanese: Case) -> None:
    trained = replace(japanese.algorithm, trained=True)
    findings = []
    for finding in japanese.findings:
        model = finding.answer.model.model_copy(update={"trained": True})
        findings.append(replace(finding, answer=finding.answer.model_copy(update={"model": model})))
    objects = result_objects(findings, japanese.study, trained)
    sr = hd.sr.srread(io.BytesIO(part10_bytes(objects[0])))
    assert texts(sr.content[0], bfd_codes.UNTRAINED) == []
    assert all("UNTRAINED" not in o.SeriesDescription for o in objects)
    assert all(RESEARCH in o.SeriesDescription for o in objects)


# --- the GSPS and the SC ------------------------------------------------------------------------------------------


def test_gsps_references_its_untouched_source_and_draws_the_region(european: Case) -> None:
    states = european.of_class(GSPS)
    assert len(states) == len(european.findings)
    for (state, _), finding in zip(states, european.findings, strict=True):
        [series] = state.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == finding.source.SeriesInstanceUID
        assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == finding.source.SOPInstanceUID
        [annotation] = state.GraphicAnnotationSequence
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == finding.source.SOPInstanceUID
        [graphic] = annotation.GraphicObjectSequence
        assert graphic.GraphicType == "POLYLINE"
        assert graphic.GraphicAnnotationUnits == "PIXEL"
        assert finding.cam is not None
        box = hottest_region(finding.cam, int(finding.source.Rows), int(finding.source.Columns))
        np.testing.assert_allclose(np.reshape(graphic.GraphicData, (-1, 2)), box.corners())
        words = " ".join(text.UnformattedTextValue for text in annotation.TextObjectSequence)
        assert RESEARCH in words
        assert "UNTRAINED" in words
        assert ("ABSTAINED" in words) == finding.answer.abstained
        assert f"{finding.answer.fracture.probability:.3f}" in words
    mono2, mono1 = (state for state, _ in states)
    assert mono2.PresentationLUTShape == "IDENTITY"
    assert mono1.PresentationLUTShape == "INVERSE"
    assert float(mono2.SoftcopyVOILUTSequence[0].WindowCenter) == 2048  # the source's own window


@pytest.mark.parametrize(
    ("sop_class", "photometric", "bits_stored", "window"),
    [
        (CR, "MONOCHROME2", 8, None),
        (CR, "MONOCHROME1", 12, (1000.0, 1500.0)),
        (DX_PRESENTATION, "MONOCHROME2", 16, None),
        (DX_PROCESSING, "MONOCHROME1", 10, None),
        (SC, "MONOCHROME2", 12, (2048.0, 4096.0)),
    ],
)
def test_gsps_presents_any_grey_source(
    european: Case, sop_class: str, photometric: str, bits_stored: int, window: tuple[float, float] | None
) -> None:
    data = radiograph(
        XRAY / "hip/fractured/fracatlas_IMG0002607.jpg", EUROPEAN, generate_uid(),
        sop_class=sop_class, photometric=photometric, bits_stored=bits_stored, window=window,
    )  # fmt: skip
    source = pydicom.dcmread(io.BytesIO(data))
    finding = ImageFinding(source, european.findings[0].answer, european.findings[0].cam, None)
    state = pydicom.dcmread(io.BytesIO(part10_bytes(presentation_state(finding, european.algorithm, series()))))
    [voi] = state.SoftcopyVOILUTSequence
    values = np.frombuffer(source.PixelData, dtype=np.uint8 if bits_stored == 8 else np.uint16)
    if window is None:  # min-max of the image: LINEAR's ends at its darkest and brightest value
        low = float(voi.WindowCenter) - 0.5 - (float(voi.WindowWidth) - 1) / 2
        high = float(voi.WindowCenter) - 0.5 + (float(voi.WindowWidth) - 1) / 2
        assert (low, high) == (values.min(), values.max())
    else:
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == window
    assert state.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
    assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPClassUID == sop_class
    assert state.StudyInstanceUID == source.StudyInstanceUID


@pytest.mark.parametrize(
    ("centres", "widths", "explanation"),
    [(2048.0, 4096.0, "DEFAULT"), ([2048.0, 1000.0], [4096.0, 800.0], ["DEFAULT", "BONE"])],
    ids=["one-pair", "two-pairs"],
)
def test_gsps_takes_one_window_pair_with_its_explanation_whole(
    european: Case, centres: Any, widths: Any, explanation: Any
) -> None:
    """PS3.3 C.11.8: one pair per image (the first, which the core rendered with); highdicom 0.28 stored a lone
    explanation one character per value (D\\E\\F\\A\\U\\L\\T)."""
    data = radiograph(XRAY / "hip/fractured/fracatlas_IMG0002607.jpg", EUROPEAN, generate_uid())
    source = pydicom.dcmread(io.BytesIO(data))
    source.WindowCenter, source.WindowWidth, source.WindowCenterWidthExplanation = centres, widths, explanation
    finding = ImageFinding(source, european.findings[0].answer, european.findings[0].cam, None)
    state = pydicom.dcmread(io.BytesIO(part10_bytes(presentation_state(finding, european.algorithm, series()))))
    [voi] = state.SoftcopyVOILUTSequence
    assert voi["WindowCenter"].VM == voi["WindowWidth"].VM == voi["WindowCenterWidthExplanation"].VM == 1
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2048.0, 4096.0)
    assert voi.WindowCenterWidthExplanation == "DEFAULT"


@pytest.mark.parametrize(
    ("laterality", "image_laterality", "body_part", "expected"),
    [
        ("L", "L", "ELBOW", "L"),
        (None, "R", "ELBOW", "R"),
        (None, "B", "ELBOW", ""),
        (None, None, "ELBOW", ""),
        ("", "U", "ELBOW", ""),
        (None, "U", "PELVIS", None),
        ("L", "L", "CHEST", None),
    ],
)
def test_results_carry_the_sources_laterality_body_part_and_patient_study(
    european: Case, laterality: str | None, image_laterality: str | None, body_part: str, expected: str | None
) -> None:
    """General Series' Laterality (Type 2C: the objects have no Image Laterality) from the source's Laterality or
    Image Laterality (R, L; else empty: unknown; absent for an unpaired part), its Body Part Examined, and the
    patient's age, size and weight."""
    source = copy.deepcopy(european.findings[0].source)
    source.BodyPartExamined = body_part
    for keyword, value in (("Laterality", laterality), ("ImageLaterality", image_laterality)):
        if value is not None:
            setattr(source, keyword, value)
    source.PatientAge, source.PatientSize, source.PatientWeight = "047Y", 1.82, 81.5
    finding = replace(european.findings[0], source=source)
    for out in result_objects([finding], european.study, european.algorithm):
        read = pydicom.dcmread(io.BytesIO(part10_bytes(out)))
        assert (read.PatientAge, float(read.PatientSize), float(read.PatientWeight)) == ("047Y", 1.82, 81.5)
        if read.Modality == "SR":  # no General Series module
            assert "Laterality" not in read
            continue
        assert read.get("Laterality") == expected, read.Modality
        assert ("Laterality" in read) == (expected is not None)
        assert read.BodyPartExamined == body_part


def series(kind: str = "gsps") -> Series:
    return Series.new(kind, trained=False)


def test_sc_is_the_overlay_under_the_summary_band_referencing_its_source(european: Case) -> None:
    captures = european.of_class(SC)
    assert len(captures) == len(european.findings)
    for (capture, _), finding in zip(captures, european.findings, strict=True):
        assert finding.overlay_rgb is not None
        height, width, _ = finding.overlay_rgb.shape
        rgb = capture.pixel_array
        assert rgb.shape[1:] == (width, 3)
        assert rgb.shape[0] > height  # the text band above the overlay
        np.testing.assert_array_equal(rgb[-height:], finding.overlay_rgb)
        assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == finding.source.SOPInstanceUID
        assert "UNTRAINED" in capture.ImageComments
        assert "P(fractured)" in capture.ImageComments
        assert capture.BurnedInAnnotation == "YES"


# --- what every object shares -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["european", "japanese"])
def test_every_object_is_in_the_source_study_in_a_new_series_per_kind(
    name: str, request: pytest.FixtureRequest
) -> None:
    case: Case = request.getfixturevalue(name)
    sources = [pydicom.dcmread(io.BytesIO(data)) for data in case.files]
    source_uids = {str(s.SOPInstanceUID) for s in sources} | {str(s.SeriesInstanceUID) for s in sources}
    read = [pydicom.dcmread(io.BytesIO(data)) for data in case.written]
    assert len(read) == 1 + 2 * len(sources)  # one SR, a GSPS and an SC per (grey) image
    assert {str(o.StudyInstanceUID) for o in read} == {str(sources[0].StudyInstanceUID)}
    series_by_class: dict[str, set[str]] = {}
    for out in read:
        series_by_class.setdefault(str(out.SOPClassUID), set()).add(str(out.SeriesInstanceUID))
        assert RESEARCH in out.SeriesDescription
        assert out.Manufacturer == "Bone-Fracture-Detection (research use only)"
        assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert str(out.SOPInstanceUID) not in source_uids
        assert str(out.SeriesInstanceUID) not in source_uids
        assert out.SeriesNumber >= 9900
    assert all(len(uids) == 1 for uids in series_by_class.values())  # one new series per kind
    assert len(set().union(*series_by_class.values())) == len(RESULT_KINDS)
    assert len({str(o.SOPInstanceUID) for o in read}) == len(read)


@pytest.mark.parametrize("name", ["european", "japanese"])
def test_patient_study_and_character_set_are_the_sources_byte_for_byte(
    name: str, request: pytest.FixtureRequest
) -> None:
    case: Case = request.getfixturevalue(name)
    source_bytes = case.files[0]
    source = pydicom.dcmread(io.BytesIO(source_bytes))
    patient = EUROPEAN if name == "european" else JAPANESE
    for data in case.written:
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.SpecificCharacterSet == source.SpecificCharacterSet
        assert raw_value(data, "SpecificCharacterSet") == raw_value(source_bytes, "SpecificCharacterSet")
        for keyword in (*patient.attributes, "StudyInstanceUID"):
            assert raw_value(data, keyword) == raw_value(source_bytes, keyword), keyword
        assert str(out.PatientName) == patient.attributes["PatientName"]
        for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            assert (keyword in out) == (keyword in patient.attributes), keyword  # nothing invented


def test_a_source_without_optional_attributes_gets_valid_objects_with_nothing_invented(bundle: Path) -> None:
    bare = Patient(None, {})
    file = radiograph(XRAY / "hand/fractured/fracatlas_IMG0003396.jpg", bare, generate_uid(), sop_class=SC)
    case = make_case(bundle, [file])
    assert len(case.objects) == 3
    for data in case.written:
        out = pydicom.dcmread(io.BytesIO(data))
        for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "StudyID", "AccessionNumber"):
            assert keyword not in out, keyword
    groups = groups_of(sr_of(case).content)
    assert set(groups) == {image_tracking_id(1), STUDY_TRACKING_ID}


def test_a_colour_photo_is_reported_as_an_abstention_without_a_presentation_state(bundle: Path) -> None:
    path = XRAY / "hand/normal/fracatlas_IMG0002012.jpg"
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    tinted = np.stack([grey, grey // 3, 255 - grey], axis=-1)  # far from grey: the core's colour abstention
    source = pydicom.dcmread(io.BytesIO(radiograph(path, EUROPEAN, generate_uid(), sop_class=SC, bits_stored=8)))
    source.SamplesPerPixel, source.PhotometricInterpretation, source.PlanarConfiguration = 3, "RGB", 0
    source.PixelData = tinted.tobytes()
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    case = make_case(bundle, [buffer.getvalue()])
    [finding] = case.findings
    assert finding.answer.abstained
    assert (finding.answer.abstention_reason or "").startswith("not a radiograph")
    assert [o.Modality for o in case.objects] == ["SR", "OT"]  # no GSPS: a grayscale state cannot present it
    groups = groups_of(sr_of(case).content)
    for name in (image_tracking_id(1), STUDY_TRACKING_ID):
        assert {e.value for e in groups[name].get_qualitative_evaluations()} == {bfd_codes.INDETERMINATE}
    assert texts(groups[image_tracking_id(1)][0], bfd_codes.ABSTENTION) == [finding.answer.abstention_reason]


# --- the rules of a call ------------------------------------------------------------------------------------------


def test_one_call_takes_one_study_and_the_kinds_asked_for(european: Case, japanese: Case) -> None:
    with pytest.raises(ValueError, match="studies"):
        result_objects([*european.findings, *japanese.findings], european.study, european.algorithm)
    with pytest.raises(ValueError, match="more than once"):
        result_objects([european.findings[0]] * 2, european.study, european.algorithm)
    with pytest.raises(ValueError, match="unknown result kinds"):
        result_objects(european.findings, european.study, european.algorithm, kinds=("sr", "pdf"))
    with pytest.raises(ValueError, match="not by"):
        result_objects(european.findings, european.study, replace(european.algorithm, version="other"))
    only_sr = result_objects(european.findings, european.study, european.algorithm, kinds=("sr",))
    assert [o.Modality for o in only_sr] == ["SR"]


def test_an_image_without_a_heatmap_is_reported_without_a_region(european: Case) -> None:
    findings = [replace(f, cam=None, overlay_rgb=None) for f in european.findings]
    sr, *_, capture = result_objects(findings, european.study, european.algorithm)
    groups = groups_of(hd.sr.srread(io.BytesIO(part10_bytes(sr))).content)
    image = groups[image_tracking_id(1)]
    assert isinstance(image, hd.sr.MeasurementsAndQualitativeEvaluations)
    assert [s.referenced_sop_instance_uid for s in image.source_images] == [findings[0].source.SOPInstanceUID]
    assert capture.Columns == 640  # the summary text alone
    states = result_objects(findings, european.study, european.algorithm, kinds=("gsps",))
    assert all("GraphicObjectSequence" not in state.GraphicAnnotationSequence[0] for state in states)


# --- the hottest region -------------------------------------------------------------------------------------------


def test_hottest_region_maps_a_cell_onto_a_non_square_source() -> None:
    cam = np.zeros((7, 7))
    cam[2, 5] = 1.0
    assert hottest_region(cam, rows=2000, columns=2500) == Region(
        x0=5 * 2500 / 7, y0=2 * 2000 / 7, x1=6 * 2500 / 7, y1=3 * 2000 / 7
    )
    assert hottest_region(cam, rows=2500, columns=2000) == Region(
        x0=5 * 2000 / 7, y0=2 * 2500 / 7, x1=6 * 2000 / 7, y1=3 * 2500 / 7
    )


def test_hottest_region_takes_the_hot_blob_and_not_a_separate_warm_spot() -> None:
    cam = np.full((7, 7), 0.1)
    cam[3, 3], cam[3, 4], cam[4, 4] = 1.0, 0.9, 0.85  # one blob, 4-connected, all >= 0.8 of the peak
    cam[4, 3] = 0.5  # inside the box but not hot: the box is still the blob's bounds
    cam[0, 0] = 0.95  # hot but separate
    assert hottest_region(cam, rows=700, columns=1400) == Region(x0=600.0, y0=300.0, x1=1000.0, y1=500.0)
    with pytest.raises(ValueError, match="no positive"):
        hottest_region(np.zeros((7, 7)), rows=10, columns=10)
    with pytest.raises(ValueError, match=r"\(7, 7\)"):
        hottest_region(np.ones((8, 8)), rows=10, columns=10)


# --- the real ResNet50 demo bundle, when built ----------------------------------------------------------------------


@pytest.mark.skipif(
    not (DEMO_BUNDLE / "manifest.json").is_file(), reason="models/demo is not built (bfd export --demo)"
)
def test_the_demo_bundle_answers_into_an_sr() -> None:
    file = radiograph(XRAY / "hand/fractured/fracatlas_IMG0001363.jpg", EUROPEAN, generate_uid(), body_part="HAND")
    case = make_case(DEMO_BUNDLE, [file])
    [finding] = case.findings
    groups = groups_of(sr_of(case).content)
    [p] = groups[image_tracking_id(1)].get_measurements(name=bfd_codes.PROBABILITY)
    assert p.value == pytest.approx(finding.answer.fracture.probability, abs=1e-12)
    assert [s.value for s in groups[image_tracking_id(1)].finding_sites] == [bfd_codes.finding_site("hand")]
    assert case.algorithm.trained is False
    assert texts(sr_of(case).content[0], bfd_codes.UNTRAINED) == [UNTRAINED_WARNING]


@pytest.mark.parametrize("bits_stored", [8, 12])
def test_the_gsps_window_from_the_cores_rendering_equals_the_one_found_by_decoding(bits_stored: Literal[8, 12]) -> None:
    """The node hands the core's min-max range to the GSPS so the source is not decoded twice: same window."""
    from inference.dicom import read_dicom
    from inference.dicom_objects.presentation_state import _window_for
    from loadtest.dicom_studies import make_study
    from loadtest.dicom_studies import part10_bytes as study_bytes

    (source,) = make_study(1, bits_stored=bits_stored)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):  # a source without its own VOI
        if keyword in source:
            del source[keyword]
    data = study_bytes(source)
    rendered = read_dicom(data, max_pixels=50_000_000)
    assert rendered.value_range is not None
    parsed = pydicom.dcmread(io.BytesIO(data))
    [from_core] = _window_for(parsed, rendered.value_range) or []
    [decoded] = _window_for(parsed) or []
    assert from_core.WindowCenter == decoded.WindowCenter
    assert from_core.WindowWidth == decoded.WindowWidth


@pytest.mark.parametrize("name", ["european", "japanese"])
def test_the_node_builds_the_same_objects_in_a_worker_from_the_headers_alone(
    name: str, request: pytest.FixtureRequest
) -> None:
    """The DICOM node builds in a worker process from sources without their pixel data: same objects, the
    patient data still byte for byte, the sources untouched; a worker that died is replaced."""
    from dicom_node.object_builder import ObjectBuilder

    case: Case = request.getfixturevalue(name)
    patient = EUROPEAN if name == "european" else JAPANESE
    builder = ObjectBuilder(1)

    async def build_twice() -> tuple[list[bytes], list[bytes]]:
        first = await builder.build(case.findings, case.study, case.algorithm, RESULT_KINDS)
        executor: Any = builder._workers._pool if builder._workers else None
        for process in list(executor._processes.values()):  # the worker dies between two studies
            process.kill()
            process.join()
        second = await builder.build(case.findings, case.study, case.algorithm, RESULT_KINDS)
        return [o.payload for o in first], [o.payload for o in second]

    try:
        first, second = asyncio.run(build_twice())
    finally:
        builder.close()
    assert all("PixelData" in finding.source for finding in case.findings)
    for written in (first, second):
        parsed = [pydicom.dcmread(io.BytesIO(data)) for data in written]
        assert [str(d.SOPClassUID) for d in parsed] == [str(o.SOPClassUID) for o in case.objects]
        for data in written:
            for keyword in (*patient.attributes, "SpecificCharacterSet", "StudyInstanceUID"):
                assert raw_value(data, keyword) == raw_value(case.files[0], keyword), keyword
    [sr_bytes] = [data for data in first if pydicom.dcmread(io.BytesIO(data)).SOPClassUID in SR_CLASSES]
    assert sorted(groups_of(hd.sr.srread(io.BytesIO(sr_bytes)).content)) == sorted(groups_of(sr_of(case).content))


def test_the_text_band_has_the_pixels_drawing_the_text_gives() -> None:
    """Rows are rendered once and pasted (`with_text_band` caches them): the very pixels of drawing each wrapped
    row on the band, also for non-Latin text and for a word wider than the image (broken between characters)."""
    from PIL import ImageDraw, ImageFont

    from inference.dicom_objects.secondary_capture import BAND_LINE_PX, BAND_MARGIN_PX, with_text_band, wrap

    rng = np.random.default_rng(7)
    lines = ["RESEARCH USE ONLY - not a diagnosis", "Ünïcødé ÄÖ ß – “quotes” …", "P(fractured) = 0.512", "w" * 300]
    for width in (64, 410):
        rows = [row for line in lines for row in wrap(line, width)]
        assert len(rows) > len(lines)  # the long word, at least, was wrapped
        rgb = rng.integers(0, 256, (120, width, 3), dtype=np.uint8)
        band = BAND_LINE_PX * len(rows) + 2 * BAND_MARGIN_PX
        expected = Image.new("RGB", (width, 120 + band), (0, 0, 0))
        expected.paste(Image.fromarray(rgb, mode="RGB"), (0, band))
        draw, font = ImageDraw.Draw(expected), ImageFont.load_default()
        for index, row in enumerate(rows):
            draw.text((BAND_MARGIN_PX, BAND_MARGIN_PX + index * BAND_LINE_PX), row, fill=(255, 255, 255), font=font)
        for _ in range(2):  # rendered, then from the cache
            assert np.array_equal(with_text_band(rgb, lines), np.asarray(expected))


@pytest.mark.parametrize("columns", [96, 180, 373, 1400])
def test_the_sc_text_fits_narrow_and_wide_images(european: Case, columns: int) -> None:
    """Every sentence of the summary is in the band, and no ink reaches the right margin: a narrow radiograph's
    capture cut its sentences at the right edge ('...do n', '...the router said shoulde')."""
    from PIL import ImageFont

    from inference.answers import summary_lines
    from inference.dicom_objects.secondary_capture import BAND_MARGIN_PX, wrap

    finding = european.findings[1]  # the abstained one: the longest summary
    assert finding.overlay_rgb is not None
    overlay = np.asarray(Image.fromarray(finding.overlay_rgb).resize((columns, 300)))
    narrow = replace(finding, overlay_rgb=overlay)
    [capture] = result_objects([narrow], european.study, european.algorithm, kinds=("sc",))
    pixels = pydicom.dcmread(io.BytesIO(part10_bytes(capture))).pixel_array
    assert pixels.shape[1:] == (columns, 3)
    np.testing.assert_array_equal(pixels[-300:], overlay)
    band = pixels[:-300]
    ink = band.max(axis=(0, 2)) > 0  # per column: any text pixel
    assert ink[BAND_MARGIN_PX : BAND_MARGIN_PX + 5].any()
    assert not ink[-BAND_MARGIN_PX:].any(), "text reaches the right edge: cut"
    lines = summary_lines(narrow.answer)
    font = ImageFont.load_default()
    for line in lines:
        rows = wrap(line, columns)
        assert "".join(rows).replace(" ", "") == line.replace(" ", "")  # nothing dropped
        assert all(BAND_MARGIN_PX + font.getbbox(row)[2] <= columns - BAND_MARGIN_PX for row in rows), rows
    text_rows = np.flatnonzero(band.max(axis=(1, 2)) > 0)
    assert text_rows.max() < band.shape[0] - 1  # the band is tall enough for every row: the last is not cut
