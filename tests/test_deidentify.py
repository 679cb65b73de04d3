"""De-identification by allow-list (`inference.deidentify`): nothing planted anywhere survives, the image does.

Each source carries identifiers wherever a DICOM file can hold them: the preamble, the file meta, the Patient
and Study modules, free text, dates, private groups (with and without a creator), public tags no dictionary
knows, nested sequences (inside kept ones too), a kept tag written with another VR, overlays, curves, an icon
and trailing padding. Every planted string is first found in the source, then looked for in the de-identified
bytes (inflated when deflated); the image must parse with the service's own parser and render to the same
pixels, for each kind of pixel data the decoder handles.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from inference.deidentify import METHOD, DeidentificationError, deidentify_dicom, replacement_uid
from inference.dicom_header import parse_dicom
from inference.preprocessing import prepare_image

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT_CLASS = "1.2.840.10008.3.1.2.1.1"
ROWS, COLUMNS = 48, 64
PREAMBLE = "PREAMBLE Smith^John MRN-PRE-0001"
PLANTED_UIDS = {name: f"1.2.826.0.1.3680043.8.498.4242{n}" for n, name in enumerate(
    ["study", "series", "instance", "frame", "reference", "referenced_patient", "referenced_study", "icon"]
)}  # fmt: skip
TEXT = {  # keyword: planted value (top level; an attribute the allow-list does not name, or must empty)
    "PatientName": "Smith^Jürgen",
    "PatientID": "MRN-0001",
    "PatientBirthDate": "19610412",
    "PatientAge": "063Y",
    "PatientAddress": "12 Planted Lane, Springfield",
    "PatientMotherBirthName": "Mother^Maiden",
    "IssuerOfPatientID": "ISSUER-PLANTED",
    "AdditionalPatientHistory": "HISTORY fell from a ladder at home",
    "PatientComments": "PATIENT-COMMENT allergic to latex",
    "AccessionNumber": "ACC-PLANTED-1",
    "StudyID": "SID-PLANTED",
    "StudyDate": "20230405",
    "StudyTime": "083729",
    "AcquisitionDateTime": "20230406081500",
    "StudyDescription": "STUDY-DESCRIPTION hand after assault",
    "SeriesDescription": "SERIES-DESCRIPTION left hand",
    "ReferringPhysicianName": "Referrer^Planted",
    "InstitutionName": "St Planted Hospital",
    "StationName": "PLANTED-STATION",
    "OperatorsName": "Operator^Planted",
    "DeviceSerialNumber": "SERIAL-PLANTED",
    "ImageComments": "IMAGE-COMMENT patient Jürgen Smith",
    "DerivationDescription": "DERIVATION by Smith",
}
NESTED = [  # planted inside sequence items
    "Nested^Patient", "OTHER-MRN-77", "OTHER-ISSUER", "REQ-PLANTED-5", "Nested^Physician", "SPS-DESCRIPTION Smith",
    "Hidden^InReference", "PRIVATE-IN-REFERENCE", "UNKNOWN-IN-REFERENCE", "EXPLANATION of Smith's window",
]  # fmt: skip
ELSEWHERE = [  # private, unknown public, wrong VR, overlay, curve, icon, padding, file meta
    "PRIVATE-NINE Smith", "ORPHAN-PRIVATE", "UNKNOWN-PUBLIC-0010", "UNKNOWN-PUBLIC-0028", "LATERALITY of Smith",
    "OVERLAY-DESCRIPTION Smith", "OVERLAY-LABEL", "OVERLAY-PLANTED-BITS", "CURVE-DESCRIPTION Smith",
    "CURVE-DATA-PLANTED", "ICON-PLANTED-PIXELS!", "TRAILING-PADDING-PLANTED", "PLANTED_AE", "PLANTED_IMPL",
    "PRIVATE-META-INFO",
]  # fmt: skip
NEEDLES = [s.encode() for s in [PREAMBLE, *TEXT.values(), *NESTED, *ELSEWHERE, *PLANTED_UIDS.values()]]
IN_PART10_ONLY = {s.encode() for s in [PREAMBLE, "PLANTED_AE", "PLANTED_IMPL", "PRIVATE-META-INFO"]}
Source = Callable[[Dataset], np.ndarray]


# --- sources: one per kind of pixel data the decoder renders -------------------------------------------------------


def _grey(ds: Dataset, bits_stored: int = 12) -> np.ndarray:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ramp = np.linspace(0, 2**bits_stored - 1, ROWS * COLUMNS).reshape(ROWS, COLUMNS)
    return ramp.astype(np.uint16)


def windowed(ds: Dataset) -> np.ndarray:
    """12-bit grey with rescale and two windows (the first renders)."""
    pixels = _grey(ds)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -100, "US"
    ds.WindowCenter, ds.WindowWidth = [1500, 700], [2400, 900]
    ds.VOILUTFunction = "LINEAR"
    return pixels


def luts(ds: Dataset) -> np.ndarray:
    """MONOCHROME1 through a Modality LUT and a VOI LUT, each item with a planted explanation."""
    pixels = _grey(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    modality = Dataset()
    modality.LUTDescriptor = [4096, 0, 16]
    modality.ModalityLUTType = "US"
    modality.LUTExplanation = "EXPLANATION of Smith's window"
    modality.add_new(0x00283006, "US", [(v * 7) % 4096 for v in range(4096)])  # LUT Data
    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 12]
    voi.add_new(0x00283006, "US", [min(4095, v * 2) for v in range(4096)])
    voi.add_new(0x00280ABC, "LO", "UNKNOWN-PUBLIC-0028")  # unknown, inside a kept item
    ds.ModalityLUTSequence, ds.VOILUTSequence = [modality], [voi]
    return pixels


def palette(ds: Dataset) -> np.ndarray:
    """PALETTE COLOR, 8-bit indices, 16-bit palette entries."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for channel, scale in (("Red", 257), ("Green", 128), ("Blue", 40)):
        setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 16])
        table = (np.arange(256, dtype=np.uint32) * scale % 65536).astype("<u2")
        setattr(ds, f"{channel}PaletteColorLookupTableData", table.tobytes())
    return (np.arange(ROWS * COLUMNS) * 7 % 256).astype(np.uint8).reshape(ROWS, COLUMNS)  # no ASCII runs


def rgb(ds: Dataset) -> np.ndarray:
    """8-bit RGB, colour by pixel."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    y, x = np.mgrid[0:ROWS, 0:COLUMNS]
    return np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)


def planted(kind: Source, *, syntax: str = ExplicitVRLittleEndian, part10: bool = True) -> tuple[bytes, Dataset]:
    """A radiograph of `kind` with every identifier of the module docstring planted; its bytes and dataset."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = DIGITAL_XRAY, PLANTED_UIDS["instance"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = PLANTED_UIDS["study"], PLANTED_UIDS["series"]
    ds.FrameOfReferenceUID = PLANTED_UIDS["frame"]
    ds.Modality, ds.BodyPartExamined, ds.ImageLaterality, ds.BurnedInAnnotation = "DX", "HAND", "L", "NO"
    ds.PatientSex = "M"
    for keyword, value in TEXT.items():
        setattr(ds, keyword, value)
    _plant_sequences(ds)
    _plant_elsewhere(ds)
    ds.Rows, ds.Columns = ROWS, COLUMNS
    pixels = kind(ds)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = DIGITAL_XRAY, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.SourceApplicationEntityTitle = "PLANTED_AE"
    ds.file_meta.ImplementationVersionName = "PLANTED_IMPL"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4.4242"
    ds.file_meta.PrivateInformation = b"PRIVATE-META-INFO"
    ds.preamble = PREAMBLE.encode().ljust(128, b"\0")
    buffer = io.BytesIO()
    if part10:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare data set, as some senders of application/dicom post it
        del ds.file_meta
        ds.preamble = None
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue(), ds


def _plant_sequences(ds: Dataset) -> None:
    patient = Dataset()
    patient.ReferencedSOPClassUID, patient.ReferencedSOPInstanceUID = PATIENT_CLASS, PLANTED_UIDS["referenced_patient"]
    patient.PatientName = "Nested^Patient"
    ds.ReferencedPatientSequence = [patient]
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "OTHER-MRN-77", "OTHER-ISSUER", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = PLANTED_UIDS["referenced_study"]
    request = Dataset()
    request.RequestedProcedureID = "REQ-PLANTED-5"
    request.ScheduledPerformingPhysicianName = "Nested^Physician"
    request.ScheduledProcedureStepDescription = "SPS-DESCRIPTION Smith"
    request.ReferencedStudySequence = [study]
    ds.RequestAttributesSequence = [request]
    reference = Dataset()  # a sequence the allow-list keeps: its items rebuilt, not copied
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = DIGITAL_XRAY, PLANTED_UIDS["reference"]
    reference.PatientName = "Hidden^InReference"
    reference.add_new(0x00100ABD, "LO", "UNKNOWN-IN-REFERENCE")
    reference.private_block(0x0031, "PLANTED REFERENCE", create=True).add_new(0x01, "LO", "PRIVATE-IN-REFERENCE")
    ds.ReferencedImageSequence = [reference]
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, 20, 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = b"ICON-PLANTED-PIXELS!"
    icon.SOPInstanceUID = PLANTED_UIDS["icon"]
    ds.IconImageSequence = [icon]


def _plant_elsewhere(ds: Dataset) -> None:
    ds.private_block(0x0009, "PLANTED CREATOR", create=True).add_new(0x01, "LO", "PRIVATE-NINE Smith")
    ds.add_new(0x00291010, "LO", "ORPHAN-PRIVATE")  # a private element without its creator
    ds.add_new(0x00100ABC, "LO", "UNKNOWN-PUBLIC-0010")  # public, in no dictionary
    ds.add_new(0x00280ABC, "LO", "UNKNOWN-PUBLIC-0028")  # ... in the image pixel group
    ds.add_new(0x00200060, "LT", "LATERALITY of Smith")  # a kept tag (Laterality) written as text
    ds.add_new(0x60020010, "US", ROWS)  # an overlay plane (60xx)
    ds.add_new(0x60020011, "US", COLUMNS)
    ds.add_new(0x60020022, "LO", "OVERLAY-DESCRIPTION Smith")
    ds.add_new(0x60020040, "CS", "G")
    ds.add_new(0x60020050, "SS", [1, 1])
    ds.add_new(0x60020100, "US", 1)
    ds.add_new(0x60020102, "US", 0)
    ds.add_new(0x60021500, "LO", "OVERLAY-LABEL")
    ds.add_new(0x60023000, "OW", b"OVERLAY-PLANTED-BITS")
    ds.add_new(0x50000022, "LO", "CURVE-DESCRIPTION Smith")  # curve data (50xx, retired)
    ds.add_new(0x50003000, "OB", b"CURVE-DATA-PLANTED")
    ds.add_new(0xFFFCFFFC, "OB", b"TRAILING-PADDING-PLANTED")
    ds.WindowCenterWidthExplanation = "EXPLANATION of Smith's window"  # free text beside the rendering


def plain(data: bytes) -> bytes:
    """`data` with a deflated data set inflated, so a search sees its values."""
    if data[128:132] != b"DICM":
        return data
    (meta_length,) = struct.unpack_from("<I", data, 140)  # the File Meta Information Group Length's value
    end = 144 + meta_length
    if DeflatedExplicitVRLittleEndian.encode() not in data[144:end]:
        return data
    return data[:end] + zlib.decompress(data[end:], -zlib.MAX_WBITS)


KINDS = [
    pytest.param(windowed, ExplicitVRLittleEndian, True, id="windowed"),
    pytest.param(luts, ExplicitVRLittleEndian, True, id="modality-and-voi-lut-monochrome1"),
    pytest.param(palette, ExplicitVRLittleEndian, True, id="palette"),
    pytest.param(rgb, ExplicitVRLittleEndian, True, id="rgb"),
    pytest.param(windowed, RLELossless, True, id="rle"),
    pytest.param(luts, DeflatedExplicitVRLittleEndian, True, id="deflated"),
    pytest.param(windowed, ExplicitVRLittleEndian, False, id="bare-implicit"),
]


# --- what is stored ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "syntax", "part10"), KINDS)
def test_no_planted_identifier_survives_and_the_image_renders_the_same(kind: Source, syntax: str, part10: bool) -> None:
    data, _ = planted(kind, syntax=syntax, part10=part10)
    needles = [n for n in NEEDLES if part10 or n not in IN_PART10_ONLY]
    assert [n for n in needles if n not in plain(data)] == []  # every one planted where the test can see it

    kept = deidentify_dicom(data)

    found = [n for n in needles if n in plain(kept)]
    assert found == [], f"planted identifiers survived: {found}"
    if part10:
        assert kept[:132] == bytes(128) + b"DICM"  # the preamble zeroed
    else:
        assert kept[128:132] != b"DICM"  # a bare data set stays bare
    before, after = (prepare_image(d, dicom=True, display_max_side=128) for d in (data, kept))
    assert before.dicom is not None
    assert after.dicom is not None
    np.testing.assert_array_equal(after.dicom.pixels, before.dicom.pixels)
    np.testing.assert_array_equal(after.pixels, before.pixels)
    header = parse_dicom(kept, force=True)  # the service's own parse accepts it
    source_header = parse_dicom(data, force=True)
    assert (header.rows, header.columns, header.photometric, header.transfer_syntax, header.pixel_data_bytes) == (
        source_header.rows, source_header.columns, source_header.photometric, source_header.transfer_syntax,
        source_header.pixel_data_bytes,
    )  # fmt: skip
    assert header.dataset.PixelData == source_header.dataset.PixelData  # byte for byte, never decoded


def test_only_known_public_attributes_are_left_and_the_identity_is_recorded_as_removed() -> None:
    data, _ = planted(luts)
    out = pydicom.dcmread(io.BytesIO(deidentify_dicom(data)))
    unknown = [str(e.tag) for e in out.iterall() if e.tag.is_private or not keyword_for_tag(e.tag)]
    assert unknown == []
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == METHOD
    assert "Annex E" in METHOD
    assert len(METHOD) <= 64  # LO
    [code] = out.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):  # fmt: skip
        assert keyword in out, f"{keyword}: Type 2, kept empty"
        assert not str(out[keyword].value), keyword
    for keyword in ("ReferencedPatientSequence", "OtherPatientIDsSequence", "RequestAttributesSequence",
                    "IconImageSequence", "FrameOfReferenceUID", "PatientAge", "Laterality", "SpecificCharacterSet",
                    "InstitutionName", "ImageComments"):  # fmt: skip
        assert keyword not in out, keyword
    kept = (out.Modality, out.BodyPartExamined, out.ImageLaterality, out.BurnedInAnnotation)
    assert kept == ("DX", "HAND", "L", "NO")
    assert out.SOPClassUID == out.file_meta.MediaStorageSOPClassUID == DIGITAL_XRAY
    [reference] = out.ReferencedImageSequence
    assert set(reference.keys()) == {0x00081150, 0x00081155}  # class and instance UID; nothing else of the item
    assert [set(item.keys()) for item in out.ModalityLUTSequence] == [{0x00283002, 0x00283004, 0x00283006}]
    meta = {element.keyword for element in out.file_meta}
    assert meta == {
        "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "ImplementationClassUID", "ImplementationVersionName",
    }  # fmt: skip
    assert out.file_meta.ImplementationVersionName != "PLANTED_IMPL"


def test_uids_are_replaced_the_same_way_every_time_under_the_root_asked_for() -> None:
    data, _ = planted(windowed)
    default = pydicom.dcmread(io.BytesIO(deidentify_dicom(data)))
    assert default.StudyInstanceUID == replacement_uid(PLANTED_UIDS["study"])
    assert replacement_uid(PLANTED_UIDS["study"]) == generate_uid(entropy_srcs=[PLANTED_UIDS["study"]])  # as before
    assert default.SOPInstanceUID == default.file_meta.MediaStorageSOPInstanceUID
    assert default.SOPInstanceUID == replacement_uid(PLANTED_UIDS["instance"])

    root = "1.2.999.77"
    out = pydicom.dcmread(io.BytesIO(deidentify_dicom(data, uid_root=root)))
    again = pydicom.dcmread(io.BytesIO(deidentify_dicom(data, uid_root=root)))
    [reference] = out.ReferencedImageSequence
    uids = [out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID, out.file_meta.MediaStorageSOPInstanceUID,
            reference.ReferencedSOPInstanceUID]  # fmt: skip
    assert all(uid.startswith(f"{root}.") and len(uid) <= 64 for uid in uids), uids
    assert out.StudyInstanceUID == again.StudyInstanceUID == replacement_uid(PLANTED_UIDS["study"], root)
    assert reference.ReferencedSOPInstanceUID == replacement_uid(PLANTED_UIDS["reference"], root)
    assert reference.ReferencedSOPClassUID == DIGITAL_XRAY


@pytest.mark.parametrize("root", ["", "1.2.3.", "1.02.3", "1.2.x", "1." * 30 + "1"])
def test_a_bad_uid_root_is_the_callers_error(root: str) -> None:
    data, _ = planted(windowed)
    with pytest.raises(ValueError, match="uid_root") as refused:
        deidentify_dicom(data, uid_root=root)
    assert not isinstance(refused.value, DeidentificationError)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # planted on purpose
def test_codes_that_hold_text_are_dropped() -> None:
    data, _ = planted(windowed)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BodyPartExamined = "hand of Mr Smith"  # not a code string: lower case, 16+ characters
    ds.ImageLaterality = "SMITH^J"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    kept = deidentify_dicom(buffer.getvalue())
    out = pydicom.dcmread(io.BytesIO(kept))
    assert "BodyPartExamined" not in out
    assert "ImageLaterality" not in out
    assert b"Smith" not in kept
    assert b"SMITH" not in kept


def test_pixel_data_is_copied_not_decoded() -> None:
    """Compressed pixel data no decoder could read is still kept as it was: de-identification never decodes."""
    data, _ = planted(windowed)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    out = pydicom.dcmread(io.BytesIO(deidentify_dicom(buffer.getvalue())))
    assert out.PixelData == ds.PixelData
    assert out.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
