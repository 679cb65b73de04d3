"""Patient and study identity: the source's, exactly, in every result object.

A PACS files an object by its patient and study, so each result object carries the source's Patient module
(PS3.3 C.7.1.1), General Study module (C.7.2.1) and the Patient Study module's age, size and weight
(C.7.2.2) element for element, and Specific Character Set (0008,0005) as the source has it. Only what the
source has: an attribute it lacks (even a Type 2 one, such as Patient's Birth Date) stays absent, so a result
never says more about a patient than its source did.

highdicom's constructors read these attributes from a reference dataset, check and re-encode them; they are
given a header-only stand-in instead (`stand_in`: no pixel data, UTF-8, patient and study values empty), and
`restore_identity` then puts the source's own elements in. The source's PersonName values keep the bytes
they were read with, so under the same character set 'Müller^Jürgen' (ISO_IR 192) or '山田^太郎'
(ISO 2022 IR 87) is written byte for byte as received.
"""

from __future__ import annotations

import copy

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

PATIENT_MODULE = (
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence", "OtherPatientNames",
    "OtherPatientIDsSequence", "ReferencedPatientPhotoSequence", "EthnicGroup", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)  # fmt: skip
GENERAL_STUDY_MODULE = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingService", "RequestingServiceCodeSequence",
    "ReferencedStudySequence", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
)  # fmt: skip
# The Patient Study module's values a source image carries about the patient at this study (the rest of it,
# admission and history, stays with the order and the RIS): without them the results of a study disagree with
# its images on the patient's age (dcentvfy).
PATIENT_STUDY_MODULE = ("PatientAge", "PatientSize", "PatientWeight")
IDENTITY = (*PATIENT_MODULE, *GENERAL_STUDY_MODULE, *PATIENT_STUDY_MODULE)
# What highdicom's constructors read as attributes (a missing one raises there): empty in the stand-in.
_READ_BY_HIGHDICOM = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
# What references, presentation states and display need of the image: never pixel data.
IMAGE_HEADER = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "NumberOfFrames", "PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence", "PatientOrientation",
)  # fmt: skip
CONSTRUCTION_CHARSET = "ISO_IR 192"  # UTF-8 holds any decoded value; the source's own set is restored after
# Everything the result objects read of a source (and the series and patient-study attributes they may copy):
# what a study waiting for its answer keeps of each instance (`results_header`), nothing else.
RESULTS_HEADER = (
    *IDENTITY, *IMAGE_HEADER, "SpecificCharacterSet", "SmallestImagePixelValue", "LargestImagePixelValue",
    "Laterality", "ImageLaterality", "BodyPartExamined", "ViewPosition",
)  # fmt: skip
ELEMENT_OVERHEAD_BYTES = 400  # pydicom's objects per element besides its value (inference.dicom_file)


def results_header(source: Dataset) -> Dataset:
    """The part of `source` the result objects read (RESULTS_HEADER: no pixel data, no private or other
    elements), with its file meta and original encoding; elements are shared, `source` is untouched."""
    kept = Dataset()
    for keyword in RESULTS_HEADER:
        tag = tag_for_keyword(keyword)
        if tag is not None and tag in source:
            kept[tag] = source.get_item(tag)  # the raw element: nothing converted here
    return with_encoding_of(source, kept)


def with_encoding_of(source: Dataset, part: Dataset) -> Dataset:
    """`part` (elements taken from `source`) with `source`'s file meta and original encoding, so its raw
    elements are read as they were written."""
    if hasattr(source, "file_meta"):
        part.file_meta = source.file_meta
    implicit, little = source.original_encoding
    if implicit is not None and little is not None:
        part.set_original_encoding(implicit, little, source.original_character_set)
    return part


def header_bytes(dataset: Dataset) -> int:
    """About what `dataset` holds in memory: its values' bytes and pydicom's objects, sequences included."""
    total = 0
    stack = [dataset]
    while stack:
        current = stack.pop()
        for element in current.elements():
            total += ELEMENT_OVERHEAD_BYTES
            value = element.value
            if isinstance(value, bytes | bytearray | str):
                total += len(value)
            elif isinstance(value, list):  # a Sequence of items, or a multi-value
                stack.extend(item for item in value if isinstance(item, Dataset))
                total += sum(len(str(item)) for item in value if not isinstance(item, Dataset))
            elif value is not None:
                total += len(str(value))
    return total


def stand_in(source: Dataset) -> Dataset:
    """A header-only stand-in of `source` for highdicom's constructors: image header, UIDs, no pixels.

    Patient and study values are left empty: highdicom would parse and check them (a date it cannot read, a
    sex outside M/F/O would refuse the whole object), and `restore_identity` copies the source's anyway.
    """
    out = Dataset()
    for keyword in ("StudyInstanceUID", *IMAGE_HEADER):
        if keyword in source:
            out[keyword] = copy.deepcopy(source[keyword])
    for keyword in _READ_BY_HIGHDICOM:
        setattr(out, keyword, None)
    out.SpecificCharacterSet = CONSTRUCTION_CHARSET
    return out


def restore_identity(out: Dataset, source: Dataset) -> None:
    """Make `out`'s patient, study and character set exactly the source's (absent where the source has none).

    StudyInstanceUID is kept in `out` when the source has none (a builder that tolerates that gave it one).
    """
    for keyword in IDENTITY:
        if keyword == "StudyInstanceUID" and keyword not in source:
            continue
        if keyword in out:
            del out[keyword]
        if keyword in source:
            out[keyword] = copy.deepcopy(source[keyword])
    if "SpecificCharacterSet" in out:
        del out["SpecificCharacterSet"]
    if "SpecificCharacterSet" in source:
        out["SpecificCharacterSet"] = copy.deepcopy(source["SpecificCharacterSet"])


def require(source: Dataset, *keywords: str) -> None:
    """ValueError naming the first of `keywords` the source lacks (what a reference to it cannot do without)."""
    for keyword in keywords:
        if not source.get(keyword):
            name = source.get("SOPInstanceUID", "a source without SOP Instance UID")
            raise ValueError(f"{name}: a result object needs the source's {keyword}; it has none")
