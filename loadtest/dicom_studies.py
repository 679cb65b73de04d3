"""Multi-image CR/DX studies for PACS tests, built from the repository's real radiographs.

The pixels come from tests/data/xray/<part>/<label>/*.jpg: sixteen radiographs from **FracAtlas** (Abedeen et
al., "FracAtlas: A Dataset for Fracture Classification, Localization and Segmentation of Musculoskeletal
Radiographs", Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4; data:
doi:10.6084/m9.figshare.22363012), licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Anything
shown or shipped that uses these images must keep this attribution (tests/data/xray/README.md).

Each JPEG is decoded with Pillow (EXIF orientation applied) to 8-bit grey; `bits_stored=12` scales it to 0..4095
in 16-bit words. A study has one Study Instance UID, one series per modality (or `n_series`), the proper SOP
class (CR Image Storage, DX for presentation or for processing), BodyPartExamined from the image's folder, and
a patient module whose name is encoded in the chosen character set (UTF-8 'Müller^Jürgen' by default, or
ISO 2022 IR 87 with PS3.5 H.3.1's Japanese name). Nothing here is a real patient.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from loadtest.images import high_depth

XRAY = Path(__file__).resolve().parent.parent / "tests" / "data" / "xray"
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
MAMMOGRAPHY_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

UTF8 = "ISO_IR 192"
JAPANESE = "ISO 2022 IR 87"
LATIN1 = "ISO_IR 100"
# The name each character set gets by default, and SpecificCharacterSet as written (PS3.5 6.1.2.5.3: ISO 2022
# sets name the default repertoire first, so Japanese is "\ISO 2022 IR 87").
DEFAULT_NAMES = {UTF8: "Müller^Jürgen", LATIN1: "Müller^Jürgen", JAPANESE: "Yamada^Tarou=山田^太郎=やまだ^たろう"}
_CHARSET_VALUES: dict[str, str | list[str]] = {UTF8: UTF8, LATIN1: LATIN1, JAPANESE: ["", JAPANESE]}
# SNOMED CT codes for AnatomicRegionSequence (DX), by the FracAtlas folder name.
_ANATOMY = {
    "hand": ("85562004", "Hand"),
    "shoulder": ("16982005", "Shoulder region structure"),
    "hip": ("29836001", "Hip region structure"),
    "leg": ("30021000", "Lower leg structure"),
}
_LARGE_PIXELS = 1_000_000  # the one 2304x2880 radiograph is left out unless asked for

Modality = Literal["CR", "DX", "mixed"]


@dataclass(frozen=True)
class Radiograph:
    path: Path
    part: str  # folder name: hand, shoulder, hip, leg

    @property
    def body_part(self) -> str:
        return self.part.upper()


def radiographs(*, body_parts: Sequence[str] | None = None, include_large: bool = False) -> list[Radiograph]:
    """The committed FracAtlas radiographs in a fixed order that takes the body parts in turn."""
    by_part: dict[str, list[Radiograph]] = {}
    for path in sorted(XRAY.glob("*/*/*.jpg")):
        part = path.parent.parent.name
        if body_parts is not None and part not in body_parts:
            continue
        if not include_large:
            with Image.open(path) as image:
                if image.width * image.height > _LARGE_PIXELS:
                    continue
        by_part.setdefault(part, []).append(Radiograph(path=path, part=part))
    if not by_part:
        raise ValueError(f"no radiographs under {XRAY} for body parts {body_parts}")
    turns = max(len(found) for found in by_part.values())
    return [found[turn] for turn in range(turns) for found in by_part.values() if turn < len(found)]


def grey_pixels(path: Path, bits_stored: int = 8, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8, or uint16 scaled to 0..2**bits_stored - 1, as a viewer shows the JPEG; resampled to
    `size` (rows, columns) when given, in float, as the realistic image set is (`loadtest.images.high_depth`)."""
    with Image.open(path) as image:
        grey_image = ImageOps.exif_transpose(image).convert("L")
    if size is not None:
        rows, columns = size
        return high_depth(grey_image, (columns, rows), bits_stored).astype(np.uint8 if bits_stored == 8 else np.uint16)
    grey = np.asarray(grey_image)
    if bits_stored == 8:
        return grey
    top = (1 << bits_stored) - 1
    return np.round(grey.astype(np.float64) * (top / 255.0)).astype(np.uint16)


def make_study(
    n_images: int,
    *,
    modality: Modality = "CR",
    dx_purpose: Literal["presentation", "processing"] = "presentation",
    charset: str = UTF8,
    patient_name: str | None = None,
    patient_id: str = "BFD-TEST-0001",
    transfer_syntax: str = ExplicitVRLittleEndian,
    bits_stored: Literal[8, 12] = 8,
    study_uid: str | None = None,
    n_series: int | None = None,
    body_parts: Sequence[str] | None = None,
    include_large: bool = False,
    study_datetime: dt.datetime | None = None,
    size: tuple[int, int] | None = None,
) -> list[Dataset]:
    """`n_images` instances of one study, cycling through the radiographs.

    `modality="mixed"` alternates CR and DX, one series each; otherwise the images are dealt over `n_series`
    series (1 by default). `transfer_syntax` is Explicit VR Little Endian, RLE Lossless or JPEG Baseline
    (8-bit only). `size` (rows, columns) resamples every radiograph to it (e.g. 2500, 2000: a real DX).
    `body_parts` keeps only those folders (hand, hip, leg, shoulder); all take turns by default.
    """
    if n_images < 1:
        raise ValueError(f"a study needs at least one image, got n_images={n_images}")
    if charset not in _CHARSET_VALUES:
        raise ValueError(f"charset must be one of {sorted(_CHARSET_VALUES)}, got {charset!r}")
    if transfer_syntax not in (ExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit):
        raise ValueError(f"transfer_syntax must be Explicit VR LE, RLE Lossless or JPEG Baseline: {transfer_syntax}")
    if transfer_syntax == JPEGBaseline8Bit and bits_stored != 8:
        raise ValueError(f"JPEG Baseline holds 8-bit samples only, got bits_stored={bits_stored}")
    images = radiographs(body_parts=body_parts, include_large=include_large)
    when = study_datetime or dt.datetime.now().replace(microsecond=0)
    study = _study_module(
        study_uid or generate_uid(), charset, patient_name or DEFAULT_NAMES[charset], patient_id, when
    )
    modalities = ["CR", "DX"] if modality == "mixed" else [modality]
    series_count = len(modalities) if modality == "mixed" else (n_series or 1)
    series = [(generate_uid(), index + 1) for index in range(series_count)]
    instances = []
    for index in range(n_images):
        series_index = index % series_count
        this_modality = modalities[index % len(modalities)]
        sop_class = CR_IMAGE_STORAGE
        if this_modality == "DX":
            sop_class = DX_FOR_PRESENTATION if dx_purpose == "presentation" else DX_FOR_PROCESSING
        ds = _image(
            study,
            images[index % len(images)],
            sop_class=sop_class,
            modality=this_modality,
            series_uid=series[series_index][0],
            series_number=series[series_index][1],
            instance_number=index // series_count + 1,
            bits_stored=bits_stored,
            size=size,
        )
        instances.append(_encode(ds, transfer_syntax))
    return instances


def part10_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def unsupported_instance(kind: Literal["MG", "CT"] = "MG") -> Dataset:
    """An image the service must refuse: a mammogram (DX family, MG SOP class) or a CT slice."""
    study = _study_module(generate_uid(), UTF8, DEFAULT_NAMES[UTF8], "BFD-TEST-0002", dt.datetime.now())
    image = radiographs()[0]
    if kind == "MG":
        ds = _image(study, image, sop_class=MAMMOGRAPHY_FOR_PRESENTATION, modality="MG", series_uid=generate_uid(),
                    series_number=1, instance_number=1, bits_stored=12)  # fmt: skip
        ds.BodyPartExamined = "BREAST"
        ds.ImageLaterality = "L"
        ds.ViewPosition = "CC"
        return _encode(ds, ExplicitVRLittleEndian)
    ds = _image(study, image, sop_class=CT_IMAGE_STORAGE, modality="CT", series_uid=generate_uid(), series_number=1,
                instance_number=1, bits_stored=12)  # fmt: skip
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.5, 0.5]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    for keyword in ("PresentationIntentType", "ImagerPixelSpacing", "DetectorType", "AnatomicRegionSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    return _encode(ds, ExplicitVRLittleEndian)


def _study_module(uid: str, charset: str, name: str, patient_id: str, when: dt.datetime) -> Dataset:
    study = Dataset()
    study.SpecificCharacterSet = _CHARSET_VALUES[charset]
    study.PatientName = name
    study.PatientID = patient_id
    study.PatientBirthDate = "19700101"
    study.PatientSex = "M"
    study.StudyInstanceUID = uid
    study.StudyDate = when.strftime("%Y%m%d")
    study.StudyTime = when.strftime("%H%M%S")
    study.AccessionNumber = f"A{int(when.timestamp()) % 10**8:08d}"
    study.ReferringPhysicianName = "Doe^Jane"
    study.StudyID = "1"
    study.StudyDescription = "XR test study"
    return study


def _image(
    study: Dataset,
    radiograph: Radiograph,
    *,
    sop_class: UID,
    modality: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    bits_stored: int,
    size: tuple[int, int] | None = None,
) -> Dataset:
    pixels = grey_pixels(radiograph.path, bits_stored, size)
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDate, ds.SeriesTime = study.StudyDate, study.StudyTime
    ds.ContentDate, ds.ContentTime = study.StudyDate, study.StudyTime
    ds.Manufacturer = "BFD tests"
    ds.BodyPartExamined = radiograph.body_part
    ds.ViewPosition = ""
    ds.PatientOrientation = ""
    ds.ImageLaterality = "U"
    ds.Laterality = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    top = (1 << bits_stored) - 1
    ds.WindowCenter = (top + 1) // 2
    ds.WindowWidth = top + 1
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()
    if modality == "DX" or sop_class == MAMMOGRAPHY_FOR_PRESENTATION:
        processing = sop_class == DX_FOR_PROCESSING
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PROCESSING" if processing else "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "DIRECT"
        code, meaning = _ANATOMY.get(radiograph.part, ("38266002", "Entire body"))
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code, "SCT", meaning
        ds.AnatomicRegionSequence = DicomSequence([region])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax == JPEGBaseline8Bit:
        pixels = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = round(pixels.nbytes / len(buffer.getvalue()), 2)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def study_of(instances: Sequence[Dataset]) -> str:
    """The one Study Instance UID of these instances."""
    uids = {str(ds.StudyInstanceUID) for ds in instances}
    if len(uids) != 1:
        raise ValueError(f"expected one study, got {len(uids)}: {sorted(uids)}")
    return uids.pop()
