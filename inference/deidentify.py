"""Stored DICOM de-identified by allow-list, after PS3.15 Annex E (Basic Application Level Confidentiality Profile).

`store_images` keeps uploads in the results store; a DICOM upload is kept de-identified (unless
`store_identifiable_images` is set), so the store never becomes a second, unguarded copy of patient data.

The profile's Table E.1-1 lists the attributes to remove; everything it does not name would pass: a public tag
no dictionary knows ((0010,0ABC) LO), an attribute added to the standard after the table, a private group, the
128-byte preamble (free for any use, PS3.10 7.1). So the table is applied the other way round: a new data set is
built from `ALLOWED` alone and nothing else is copied. What is kept, and why:
- **rendering** (`RENDERING`): the Image Pixel, Multi-frame, Modality LUT and VOI LUT attributes that
  `inference.dicom_header.parse_dicom` and `inference.dicom.render_dicom` read (pixel data, size, bits, sign,
  photometric, planar configuration, frames, offset tables, rescale, windows, LUT and palette tables): the
  stored image renders exactly as the service rendered it. Kept as parsed, so nothing is decoded;
- **codes** (`CODES`): Modality, Body Part Examined (the service's hint), Laterality and Image Laterality,
  Burned In Annotation (says the pixels may still show text: the profile's Clean Pixel Data option is not
  applied), Lossy Image Compression and its method, Presentation LUT Shape and Rescale/Modality LUT Type: kept
  only when every value is what a code string can be (PS3.5 6.2: at most 16 of A-Z, 0-9, space, underscore),
  so none of them carries a sentence;
- **identity**: the SOP Class UID (kept when it has a UID's form); the Study, Series and SOP Instance UIDs
  replaced by `replacement_uid` (the same source UID always gives the same new one: the images of one study
  stay one study, across uploads and restarts); the Type 2 attributes of the Patient and General Study modules
  (name, ID, birth date, sex, study date and time, referring physician, study ID, accession number) kept,
  when present, with an empty value (the profile's Z);
- **references**: Referenced Image and Source Image Sequence items (the profile's X/Z/U*), each rebuilt from
  its class UID, its instance UID (replaced) and its frame numbers only; LUT sequence items from their
  descriptor, data and type only. No other sequence is kept, so nothing is nested deeper than one item.
A kept element must have its dictionary VR (a Laterality written as LT holds text, not a code). Then
PatientIdentityRemoved = YES, DeidentificationMethod, the De-identification Method Code Sequence (113100, DCM)
and LongitudinalTemporalInformationModified = REMOVED are set. The preamble is zeroed and the file meta rebuilt
from the class, the new instance UID and the transfer syntax, where the source had them (neither is added: a
bare data set stays bare). None of the profile's options is claimed (patient characteristics, device
identity, dates and descriptions are all gone); pixel data are kept byte for byte, burned-in text included.

Bounded: the file is read through `inference.dicom_file` (inflation and element count capped, as in the
service's own parse), a fixed list of tags is looked up (not every element the file holds), and the pixel
data is copied as parsed, never decoded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

from inference.dicom_file import DEFAULT_MAX_INFLATED_BYTES, read_part10

METHOD = "Annex E Basic Profile by allow-list (bone-fracture-detection)"  # LO: at most 64 characters
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
ZERO_PREAMBLE = bytes(128)

RENDERING = """
    SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit PixelRepresentation
    PlanarConfiguration NumberOfFrames PixelData FloatPixelData DoubleFloatPixelData ExtendedOffsetTable
    ExtendedOffsetTableLengths RescaleIntercept RescaleSlope WindowCenter WindowWidth VOILUTFunction
    RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor BluePaletteColorLookupTableDescriptor
    RedPaletteColorLookupTableData GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
    SegmentedRedPaletteColorLookupTableData SegmentedGreenPaletteColorLookupTableData
    SegmentedBluePaletteColorLookupTableData
"""
CODES = """
    Modality BodyPartExamined Laterality ImageLaterality BurnedInAnnotation LossyImageCompression
    LossyImageCompressionMethod PresentationLUTShape RescaleType
"""
EMPTIED = """
    PatientName PatientID PatientBirthDate PatientSex StudyDate StudyTime ReferringPhysicianName StudyID
    AccessionNumber
"""
REPLACED = "StudyInstanceUID SeriesInstanceUID SOPInstanceUID"

# What happens to a kept element.
KEEP, CODE, CLASS_UID, NEW_UID, EMPTY, ITEMS = "keep", "code", "class_uid", "new_uid", "empty", "items"
_CODE_VALUE = re.compile(r"[A-Z0-9 _]{0,16}")
_UID_VALUE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_MAX_CHARS = 64


class DeidentificationError(ValueError):
    """The DICOM file could not be de-identified (so it must not be stored); the reason holds no patient data."""


def _rules(**by_action: str) -> dict[int, str]:
    """{tag: action} for the keywords listed under each action; a keyword pydicom does not know fails at import
    (a typo would otherwise silently drop an attribute the rendering needs)."""
    from pydicom.datadict import tag_for_keyword

    rules = {}
    for action, keywords in by_action.items():
        for keyword in keywords.split():
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"unknown DICOM keyword {keyword!r} in the de-identification allow-list")
            rules[int(tag)] = action
    return rules


_LUT_ITEM = _rules(keep="LUTDescriptor LUTData", code="ModalityLUTType")
_REFERENCE_ITEM = _rules(
    class_uid="ReferencedSOPClassUID", new_uid="ReferencedSOPInstanceUID", keep="ReferencedFrameNumber"
)
ITEM_RULES: dict[int, dict[int, str]] = {
    **dict.fromkeys(_rules(items="ModalityLUTSequence VOILUTSequence"), _LUT_ITEM),
    **dict.fromkeys(_rules(items="ReferencedImageSequence SourceImageSequence"), _REFERENCE_ITEM),
}
ALLOWED: dict[int, str] = {
    **_rules(keep=RENDERING, code=CODES, empty=EMPTIED, new_uid=REPLACED, class_uid="SOPClassUID"),
    **dict.fromkeys(ITEM_RULES, ITEMS),
}


def _prefix(uid_root: str | None) -> str:
    """generate_uid's prefix for `uid_root` (written as BFD_DICOM_UID_ROOT is: no trailing dot); None: pydicom's."""
    from pydicom.uid import PYDICOM_ROOT_UID

    from inference.dicom_objects.uids import check_uid_root  # one rule for every UID root

    if uid_root is None:
        return PYDICOM_ROOT_UID
    try:
        return f"{check_uid_root(uid_root)}."
    except ValueError as error:
        raise ValueError(f"uid_root {uid_root!r}: {error}") from None


def replacement_uid(uid: str, uid_root: str | None = None) -> str:
    """The UID that replaces `uid`, under `uid_root` (None: pydicom's example root): always the same for the same
    source UID and root, unrelated to it otherwise."""
    return _replaced(uid, _prefix(uid_root))


def _replaced(uid: Any, prefix: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=prefix, entropy_srcs=[str(uid)]))


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]


def _is_code(value: Any) -> bool:
    return all(isinstance(v, str) and _CODE_VALUE.fullmatch(v) for v in _values(value))


def _is_uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _UID_MAX_CHARS and bool(_UID_VALUE.fullmatch(value))


def _has_dictionary_vr(element: Any) -> bool:
    from pydicom.datadict import dictionary_VR

    expected = dictionary_VR(element.tag)
    return bool(expected == element.VR or element.VR in expected.split(" or "))


def _kept(source: Any, rules: Mapping[int, str], prefix: str) -> Any:
    """A new Dataset holding what `rules` allow of `source` (looked up tag by tag: unlisted elements are never read)."""
    from pydicom.dataelem import DataElement, empty_value_for_VR
    from pydicom.dataset import Dataset

    kept = Dataset()
    for tag, action in rules.items():
        if tag not in source:
            continue
        element = source[tag]
        if not _has_dictionary_vr(element):
            continue
        value = element.value
        if action == KEEP or (action == CODE and _is_code(value)) or (action == CLASS_UID and _is_uid(value)):
            kept.add(element)
        elif action == EMPTY:
            kept.add(DataElement(tag, element.VR, empty_value_for_VR(element.VR)))
        elif action == NEW_UID:
            kept.add(DataElement(tag, "UI", _replaced(value, prefix) if value else ""))
        elif action == ITEMS:
            kept.add(DataElement(tag, "SQ", [_kept(item, ITEM_RULES[tag], prefix) for item in value or []]))
    return kept


def _transfer_syntax(meta: Any, dataset: Any) -> str:
    """The source's transfer syntax: its file meta's, else the encoding it was read in (a file meta without one)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        if not _is_uid(str(syntax)):
            raise ValueError("the transfer syntax UID does not have a UID's form")
        return str(syntax)
    implicit, little = dataset.original_encoding  # (None, None) for a data set made in memory
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian


def _rebuilt_meta(meta: Any, dataset: Any, prefix: str) -> Any:
    """A new file meta: the SOP class, the new SOP instance UID and the transfer syntax; version and
    implementation are pydicom's, nothing of the sender's (its AE titles, implementation, private information)."""
    from pydicom.dataset import FileMetaDataset, validate_file_meta
    from pydicom.uid import UID

    source_class, source_instance = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    sop_class = dataset.get("SOPClassUID") or (source_class if _is_uid(source_class) else None)
    instance = dataset.get("SOPInstanceUID") or (_replaced(source_instance, prefix) if source_instance else None)
    if not sop_class or not instance:
        raise ValueError("the file names no SOP class or instance UID for its file meta")
    rebuilt = FileMetaDataset()
    rebuilt.FileMetaInformationGroupLength = 0  # computed when written
    rebuilt.MediaStorageSOPClassUID = UID(str(sop_class))
    rebuilt.MediaStorageSOPInstanceUID = UID(str(instance))
    rebuilt.TransferSyntaxUID = UID(_transfer_syntax(meta, dataset))
    validate_file_meta(rebuilt, enforce_standard=True)  # adds the version and pydicom's implementation
    return rebuilt


def deidentify_dataset(dataset: Any, *, uid_root: str | None = None) -> None:
    """De-identify a pydicom Dataset in place (see the module docstring): only `ALLOWED` is left, the preamble
    zeroed and the file meta rebuilt when it had them; new UIDs under `uid_root` (None: pydicom's example root)."""
    from pydicom.dataset import Dataset

    prefix = _prefix(uid_root)
    meta = getattr(dataset, "file_meta", None)
    kept = _kept(dataset, ALLOWED, prefix)
    dataset.clear()
    for element in kept.elements():
        dataset.add(element)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = [code]
    dataset.LongitudinalTemporalInformationModified = "REMOVED"
    if meta:  # rebuilt from what is left (`clear` keeps the encoding the data set was read in)
        dataset.file_meta = _rebuilt_meta(meta, dataset, prefix)
    if getattr(dataset, "preamble", None) is not None:
        dataset.preamble = ZERO_PREAMBLE


def deidentify_dicom(data: bytes, *, uid_root: str | None = None) -> bytes:
    """The DICOM file `data` de-identified by allow-list (its preamble zeroed and its file meta rebuilt where it had
    them, neither added; the same transfer syntax; the pixel data byte for byte), new UIDs under `uid_root` (None:
    pydicom's example root); raises DeidentificationError, ValueError for a bad root."""
    _prefix(uid_root)  # a bad root is the caller's error, not this file's: said as such, before the try
    try:
        # force: uploads sent as application/dicom may lack the preamble (the predictor parsed them the same way)
        dataset = read_part10(data, force=True, max_inflated_bytes=DEFAULT_MAX_INFLATED_BYTES).dataset
        deidentify_dataset(dataset, uid_root=uid_root)
        buffer = io.BytesIO()
        dataset.save_as(buffer)  # as it is: a preamble and a file meta only where the source had them
    except Exception as error:  # pydicom raises many types; their messages may quote values, so none is kept
        raise DeidentificationError(
            f"the DICOM file could not be de-identified ({type(error).__name__} while reading or writing it)"
        ) from None
    return buffer.getvalue()
