"""The Comprehensive SR: the study's result as a TID 1500 Measurement Report, in the shape of IHE AI Results.

Document content, in order:
- observation context: the algorithm as the device observer (TID 1004): Device Observer Name = the bundle's
  name, Model Name = name and version, **Serial Number = the bundle's sha256**; each measurement group also
  carries an Algorithm Identification (TID 4019: name, version, and 'bundle sha256 <hex>' and 'trained
  true/false' as Algorithm Parameters);
- procedure reported: plain radiography;
- imaging measurements: per source image one group, tracking identifier 'Image <n>', finding 'Fracture of
  bone', finding site the body part (SNOMED CT, `codes.finding_site`), P(fractured) as a Probability
  measurement in {probability}, and qualitative evaluations: Fracture of bone present/absent at the decision
  threshold, the high-sensitivity ('suspicious') and high-specificity ('definite') operating points when the
  bundle has them. With a heatmap the group is TID 1410 and its region the heatmap's hottest box (a closed
  POLYLINE SCOORD on the source image); without one it is TID 1501 referencing the source image. Then one
  group 'Study' (TID 1501, every source image) with the study rule's answer and the rule in words;
- a Comment with the research-use disclaimer, and, for an untrained bundle, the UNTRAINED warning.

An abstention (the model is out of its depth) makes every evaluation of its group Indeterminate, never Absent,
and adds the reason as text; P is still reported, as the core reports it. An untrained bundle's evaluations
are all Indeterminate too: its numbers mean nothing, and a system reading coded findings must not show a
definite 'absent' (or 'present') from it; its P is reported, and the UNTRAINED warning says why.

Every UID made here (SOP Instance, tracking identifiers, the device observer's) is under the `uid_root` given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from inference.dicom_objects import codes
from inference.dicom_objects.findings import Algorithm, ImageFinding
from inference.dicom_objects.patient_study import CONSTRUCTION_CHARSET, restore_identity, stand_in
from inference.dicom_objects.region import region_of
from inference.dicom_objects.series import MANUFACTURER, Series, equipment, stamp
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, derived_uid, new_uid
from inference.results import DISCLAIMER, UNTRAINED_WARNING, FractureAnswer, StudyAnswer

Group = PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
STUDY_TRACKING_ID = "Study"


def image_tracking_id(index: int) -> str:
    """The human-readable tracking identifier of the group of the `index`-th (1-based) source image."""
    return f"Image {index}"


def device_uid(algorithm: Algorithm, uid_root: str = DEFAULT_UID_ROOT) -> str:
    """The Device Observer UID: derived from the bundle's sha256 (under `uid_root`), so one bundle is one device
    in every report of a site."""
    return derived_uid(uid_root, "bone-fracture-detection", algorithm.sha256)


def structured_report(
    findings: Sequence[ImageFinding],
    study: StudyAnswer,
    algorithm: Algorithm,
    series: Series,
    uid_root: str = DEFAULT_UID_ROOT,
) -> Dataset:
    """One Comprehensive SR for the study of `findings` (all of one study: the caller checks)."""
    groups: list[Group] = [_image_group(n, finding, algorithm, uid_root) for n, finding in enumerate(findings, 1)]
    groups.append(_study_group(findings, study, algorithm, uid_root))
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm, uid_root),
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}",
        serial_number=algorithm.sha256,
    )
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_device_context=ObserverContext(
                observer_type=dicom_codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=codes.PLAIN_RADIOGRAPHY,
        imaging_measurements=groups,
    )
    content = report[0].ContentSequence
    content.append(_text(codes.COMMENT, DISCLAIMER))
    if not algorithm.trained:
        content.append(_text(codes.UNTRAINED, UNTRAINED_WARNING))
    sr = ComprehensiveSR(
        evidence=[stand_in(finding.source) for finding in findings],
        content=report,
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        is_complete=True,  # everything the algorithm has to say; PRELIMINARY and UNVERIFIED: no one signed it
        specific_character_set=CONSTRUCTION_CHARSET,
        **equipment(algorithm),
    )
    restore_identity(sr, findings[0].source)
    stamp(sr, series)
    sr.CodingSchemeIdentificationSequence = [codes.local_scheme_identification()]
    return sr


def _image_group(index: int, finding: ImageFinding, algorithm: Algorithm, uid_root: str) -> Group:
    source, answer = finding.source, finding.answer
    region = region_of(finding.cam, int(source.Rows), int(source.Columns))
    common: dict[str, Any] = {
        "tracking_identifier": TrackingIdentifier(uid=new_uid(uid_root), identifier=image_tracking_id(index)),
        "finding_type": codes.FRACTURE,
        "finding_sites": [FindingSite(codes.finding_site(answer.body_part.label))],
        "algorithm_id": _algorithm_id(algorithm),
        "measurements": [_probability(answer.fracture.probability)],
        "qualitative_evaluations": _evaluations(answer.fracture, decided=algorithm.trained and not answer.abstained),
    }
    group: Group
    if region is None:
        group = MeasurementsAndQualitativeEvaluations(
            **common, source_images=[SourceImageForMeasurementGroup.from_source_image(source)]
        )
    else:
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            **common,
            referenced_region=ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=region.corners(),
                source_image=SourceImageForRegion.from_source_image(source),
            ),
        )
    if answer.abstained:
        _add_text(group, codes.ABSTENTION, answer.abstention_reason or "no reason given")
    return group


def _study_group(findings: Sequence[ImageFinding], study: StudyAnswer, algorithm: Algorithm, uid_root: str) -> Group:
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=new_uid(uid_root), identifier=STUDY_TRACKING_ID),
        finding_type=codes.FRACTURE,
        finding_sites=[FindingSite(codes.finding_site(study.body_part.label))],
        algorithm_id=_algorithm_id(algorithm),
        measurements=[_probability(study.fracture.probability)],
        qualitative_evaluations=_evaluations(study.fracture, decided=algorithm.trained and not study.abstained),
        source_images=[SourceImageForMeasurementGroup.from_source_image(f.source) for f in findings],
    )
    _add_text(group, codes.STUDY_RULE, study.rule)
    if study.abstained:
        _add_text(group, codes.ABSTENTION, study.abstention_reason or "no reason given")
    return group


def _evaluations(fracture: FractureAnswer, *, decided: bool) -> list[QualitativeEvaluation]:
    """Fracture at the decision threshold, then each operating point known; all Indeterminate unless `decided`
    (a trained bundle that did not abstain)."""

    def value(flag: bool) -> CodedConcept:
        if not decided:
            return codes.INDETERMINATE
        return codes.PRESENT if flag else codes.ABSENT

    evaluations = [QualitativeEvaluation(codes.FRACTURE, value(fracture.label == "fractured"))]
    for name, flag in ((codes.SUSPICIOUS, fracture.suspicious), (codes.DEFINITE, fracture.definite)):
        if flag is not None:
            evaluations.append(QualitativeEvaluation(name, value(flag)))
    return evaluations


def _probability(p: float) -> Measurement:
    return Measurement(name=codes.PROBABILITY, value=float(p), unit=codes.PROBABILITY_UNIT)


def _algorithm_id(algorithm: Algorithm) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"bundle sha256 {algorithm.sha256}", f"trained {str(algorithm.trained).lower()}"],
        manufacturer=MANUFACTURER,
    )


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _add_text(group: Group, name: CodedConcept, value: str) -> None:
    """A TEXT item in the group's container (TID 1501 and 1410 are extensible)."""
    group[0].ContentSequence.append(_text(name, value))
