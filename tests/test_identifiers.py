"""Identifiers: what the service keeps, sends and shows about patients, keys and itself.

Pinned: the DICOM output keeps the source's Specific Character Set, so non-ASCII patient names come out with
the same decoded value and the same bytes; stored DICOM is de-identified (PS3.15 Annex E Basic Profile)
unless `store_identifiable_images`, and then byte-identical; a non-loopback bind without a key is loud;
/docs works offline (every asset from the app itself); the page and /docs carry a Content-Security-Policy.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part, serving
from fastapi.testclient import TestClient
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from inference.deidentify import DeidentificationError, deidentify_dicom, replacement_uid
from service.main import create_app
from service.pages import PAGE_POLICY, WEB_DIR, inline_script_hashes
from service.security import exposure_warning, is_loopback
from service.settings import Settings
from service.store import ResultsStore

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"
NAME = "Müller^Jürgen"
REFERENCED_UID = "1.2.826.0.1.3680043.8.498.4711"  # an earlier image of the study


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("identifiers") / "bundle")


def radiograph(*, charset: str | list[str] | None = None, name: str = NAME, syntax: str = ExplicitVRLittleEndian,
               preamble: bool = True, **attributes: Any) -> tuple[bytes, Dataset]:  # fmt: skip
    """A small 12-bit MONOCHROME2 DICOM radiograph with patient data; its bytes and its dataset."""
    rows, columns = 60, 80
    pixels = np.zeros((rows, columns), dtype=np.uint16)
    pixels[:, :40] = 4095
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DIGITAL_XRAY
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = name
    ds.PatientID = "PID-4711"
    ds.BodyPartExamined = "HAND"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue(), ds


def raw_value(data: bytes, keyword: str) -> bytes:
    """The value bytes of top-level `keyword` as they are in an explicit VR little endian file (never decoded)."""
    tag = int(tag_for_keyword(keyword) or 0)
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode()
    start = data.index(header, 132)  # after the preamble; the first one is the top-level element (tags ascend)
    (length,) = struct.unpack("<H", data[start + 6 : start + 8])
    return data[start + 8 : start + 8 + length].rstrip(b" \x00")


# --- DICOM output: Specific Character Set ------------------------------------------------------------------------

CHARSET_CASES = [
    ("ISO_IR 192", NAME),  # UTF-8
    ("ISO_IR 192", "山田^太郎"),
    ("ISO_IR 192", "Иванов^Иван"),
    ("ISO_IR 100", NAME),  # Latin-1
    ("ISO_IR 144", "Иванов^Иван"),  # Latin/Cyrillic
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # Japanese, PS3.5 H.3.1's example
]


@pytest.mark.anyio
@pytest.mark.parametrize(("charset", "name"), CHARSET_CASES)
async def test_dicom_output_keeps_the_character_set_and_the_names_bytes(
    bundle: Path, charset: str | list[str], name: str
) -> None:
    data, source = radiograph(charset=charset, name=name, ReferringPhysicianName=name)
    async with serving(bundle) as (_, client):
        response = await client.post("/v1/predict?output=dicom", files={"file": ("x.dcm", data, "application/dicom")})
    assert response.status_code == 200, response.text
    out = pydicom.dcmread(io.BytesIO(response.content))
    assert out.SpecificCharacterSet == source.SpecificCharacterSet
    assert raw_value(response.content, "SpecificCharacterSet") == raw_value(data, "SpecificCharacterSet")
    assert str(out.PatientName) == name
    assert str(out.ReferringPhysicianName) == name
    assert raw_value(response.content, "PatientName") == raw_value(data, "PatientName")
    assert "?" not in str(out.PatientName)


# --- stored DICOM: de-identified unless asked otherwise ----------------------------------------------------------

IDENTIFYING = {
    "PatientBirthDate": "19700101",
    "PatientAddress": "Hauptstraße 1, Berlin",
    "OtherPatientIDs": "OTHER-ID-99",
    "AccessionNumber": "ACC-12345",
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "1 Hospital Road",
    "ReferringPhysicianName": "House^Gregory",
    "PerformingPhysicianName": "Quinn^Michaela",
    "OperatorsName": "Radiographer^Rita",
    "StationName": "XRAYROOM7",
    "DeviceSerialNumber": "SERIAL-0042",
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "StudyID": "STUDY-77",
    "StudyDescription": "Hand left, after a fall at home",
    "ImageComments": "patient Jürgen fell from a ladder",
    "PatientComments": "allergic to latex",
}
NEEDLES = [b"M\xc3\xbcller", b"PID-4711", *(v.encode() for v in IDENTIFYING.values() if isinstance(v, str))]


def identifiable_radiograph(**extra: Any) -> tuple[bytes, Dataset]:
    data, source = radiograph(charset="ISO_IR 192", **IDENTIFYING, **extra)
    ds = pydicom.dcmread(io.BytesIO(data))
    block = ds.private_block(0x0029, "ACME RESEARCH", create=True)
    block.add_new(0x01, "LO", "private note: Mueller Juergen")
    request = Dataset()
    request.RequestedProcedureID = "REQ-31337"
    request.ScheduledProcedureStepID = "SPS-1"
    ds.RequestAttributesSequence = [request]
    reference = Dataset()
    reference.ReferencedSOPClassUID = DIGITAL_XRAY
    reference.ReferencedSOPInstanceUID = REFERENCED_UID
    ds.ReferencedImageSequence = [reference]
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


@pytest.mark.anyio
async def test_stored_dicom_is_de_identified_and_identifiable_only_when_asked(bundle: Path, tmp_path: Path) -> None:
    data, source = identifiable_radiograph()
    png = encode_png(image_for_part(1)[:40, :40])
    url = f"sqlite+aiosqlite:///{tmp_path / 'r.sqlite3'}"
    stored: dict[bool, bytes | None] = {}
    stored_png: dict[bool, bytes | None] = {}
    for identifiable in (False, True):
        settings = {"store_images": True, "store_identifiable_images": identifiable, "database_url": url}
        async with serving(bundle, **settings) as (app, client):
            record = await client.post("/api/analysis", files={"image": ("x.dcm", data, "application/dicom")})
            picture = await client.post("/api/analysis", files={"image": ("p.png", png, "image/png")})
            assert record.status_code == picture.status_code == 201, record.text
            store: ResultsStore = app.state.store
            row, png_row = await store.get(record.json()["id"]), await store.get(picture.json()["id"])
        assert row is not None
        assert png_row is not None
        assert row.image_media_type == "application/dicom"
        stored[identifiable], stored_png[identifiable] = row.image_bytes, png_row.image_bytes

    assert stored[True] == data  # asked for: kept as received, byte for byte
    assert stored_png[False] == stored_png[True] == png  # not DICOM: kept as today
    kept = stored[False]
    assert kept is not None
    for needle in [*NEEDLES, b"REQ-31337", b"Mueller Juergen", b"HOSPITAL_PACS", str(source.StudyInstanceUID).encode()]:
        assert needle not in kept, needle
    out = pydicom.dcmread(io.BytesIO(kept))
    assert str(out.PatientName) == ""
    assert out.PatientID == ""
    assert out.PatientIdentityRemoved == "YES"
    assert "Annex E" in out.DeidentificationMethod
    [code] = out.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert code.CodeMeaning == "Basic Application Confidentiality Profile"
    assert out.StudyInstanceUID == replacement_uid(source.StudyInstanceUID) != source.StudyInstanceUID
    assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID == replacement_uid(source.SOPInstanceUID)
    assert out.PixelData == source.PixelData  # untouched
    assert (out.Rows, out.Columns, out.BitsStored) == (source.Rows, source.Columns, source.BitsStored)


def test_de_identification_applies_the_basic_profile() -> None:
    data, source = identifiable_radiograph()
    out = pydicom.dcmread(io.BytesIO(deidentify_dicom(data)))
    for keyword in ("PatientAddress", "OtherPatientIDs", "InstitutionName", "InstitutionAddress", "StationName",
                    "DeviceSerialNumber", "PerformingPhysicianName", "OperatorsName", "StudyDescription",
                    "ImageComments", "PatientComments", "RequestAttributesSequence"):  # fmt: skip
        assert keyword not in out, f"{keyword} should be removed (X)"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName", "StudyDate", "StudyTime"):  # fmt: skip
        assert keyword in out, f"{keyword} should be kept empty (Z)"
        assert not str(out[keyword].value), f"{keyword} should be empty, got {out[keyword].value!r}"
    assert not any(element.tag.is_private for element in out.iterall())
    assert "SourceApplicationEntityTitle" not in out.file_meta
    [reference] = out.ReferencedImageSequence  # X/Z/U*: kept, its instance UID replaced, its class kept
    assert reference.ReferencedSOPInstanceUID == replacement_uid(REFERENCED_UID)
    assert reference.ReferencedSOPClassUID == DIGITAL_XRAY
    assert out.SOPClassUID == DIGITAL_XRAY
    assert out.BodyPartExamined == "HAND"  # not an identifier: kept for the analysis
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_uids_map_the_same_way_every_time_so_a_study_stays_one_study() -> None:
    first, source = identifiable_radiograph()
    ds = pydicom.dcmread(io.BytesIO(first))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # a second image of the study
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    a, b = (pydicom.dcmread(io.BytesIO(deidentify_dicom(d))) for d in (first, buffer.getvalue()))
    assert a.StudyInstanceUID == b.StudyInstanceUID == replacement_uid(source.StudyInstanceUID)
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert replacement_uid(source.StudyInstanceUID) != replacement_uid(source.SeriesInstanceUID)


def test_de_identification_keeps_the_form_the_file_came_in() -> None:
    data, source = radiograph(syntax=ImplicitVRLittleEndian, preamble=False, PatientBirthDate="19700101")
    kept = deidentify_dicom(data)
    assert kept[128:132] != b"DICM"  # no preamble added
    out = pydicom.dcmread(io.BytesIO(kept), force=True)
    assert str(out.PatientName) == ""
    assert out.PixelData == source.PixelData
    assert b"PID-4711" not in kept


def test_what_cannot_be_de_identified_is_refused_without_patient_data() -> None:
    data, _ = radiograph()
    with pytest.raises(DeidentificationError, match="could not be de-identified") as refused:
        deidentify_dicom(data[:140])  # cut inside its file meta
    assert "PID-4711" not in str(refused.value)
    assert refused.value.__cause__ is None
    assert deidentify_dicom(data)  # and a good file still passes


@pytest.mark.anyio
async def test_stored_dicom_keeps_neither_the_preamble_nor_unknown_elements(bundle: Path, tmp_path: Path) -> None:
    """The audit's finding, through the service: a name in the preamble and in (0010,0ABC) LO were stored."""
    _, source = identifiable_radiograph()
    source.preamble = b"Doe^Jane ID-PREAMBLE-8".ljust(128, b"\0")
    source.add_new(0x00100ABC, "LO", "Doe^Jane UNKNOWN-PUBLIC")
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert b"ID-PREAMBLE-8" in data[:128]
    settings = {"store_images": True, "database_url": f"sqlite+aiosqlite:///{tmp_path / 'r.sqlite3'}"}
    async with serving(bundle, **settings) as (app, client):
        record = await client.post("/api/analysis", files={"image": ("x.dcm", data, "application/dicom")})
        assert record.status_code == 201, record.text
        row = await app.state.store.get(record.json()["id"])
    assert row is not None
    kept = row.image_bytes
    assert kept is not None
    assert kept[:132] == bytes(128) + b"DICM"
    assert b"Doe^Jane" not in kept
    assert 0x00100ABC not in pydicom.dcmread(io.BytesIO(kept))


# --- binding without a key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_loopback_addresses_are_quiet(host: str) -> None:
    assert is_loopback(host)
    assert exposure_warning(Settings(host=host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "bfd.example.org", ""])
def test_a_non_loopback_bind_without_a_key_is_loud(host: str) -> None:
    assert not is_loopback(host)
    warning = exposure_warning(Settings(host=host, port=8123))
    assert warning is not None
    assert "BFD_API_KEY" in warning
    assert "8123" in warning
    assert (host or "all interfaces") in warning
    assert exposure_warning(Settings(host=host, api_key="a-long-random-key")) is None


@pytest.mark.anyio
async def test_the_start_up_log_warns_of_an_exposed_service(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving(bundle, host="0.0.0.0"):
        pass
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "EXPOSED WITHOUT AN API KEY" in r.getMessage()
    ]
    assert len(warnings) == 1
    caplog.clear()
    async with serving(bundle, host="127.0.0.1"):
        pass
    assert not [r for r in caplog.records if "EXPOSED" in r.getMessage()]


# --- /docs offline, and the policies --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=bundle))) as test_client:
        yield test_client


def _references(html: str) -> list[str]:
    """Every URL the page loads or links to: src/href attributes and the schema's URL in the script."""
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url:\s*'([^']+)'""", html)


def test_docs_load_nothing_from_elsewhere_and_every_asset_is_served(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text
    references = _references(page.text)
    assert any(ref.endswith("swagger-ui-bundle.js") for ref in references)
    assert any(ref.endswith(".css") for ref in references)
    assert "/openapi.json" in references
    for reference in references:
        assert not re.match(r"^(https?:)?//", reference), f"/docs loads {reference} from outside the server"
        asset = client.get(reference)
        assert asset.status_code == 200, reference
        assert asset.content, reference
    assert not re.search(r"https?://", page.text), "no absolute URL at all: nothing can reach outside"
    assert '"validatorUrl": null' in page.text  # else Swagger UI sends the schema's URL to validator.swagger.io
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/redoc").status_code == 404  # off: it needs inline styles and blob: workers


def test_docs_policy_allows_its_inline_script_by_hash_only(client: TestClient) -> None:
    for path in ("/docs", "/docs/oauth2-redirect"):
        page = client.get(path)
        policy = page.headers["content-security-policy"]
        hashes = inline_script_hashes(page.text)
        assert hashes, path
        script_src = next(part for part in policy.split(";") if part.strip().startswith("script-src"))
        for source in hashes:
            assert source in script_src, path
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"


def test_the_page_and_its_files_carry_the_security_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == PAGE_POLICY
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "object-src 'none'",
                      "frame-ancestors 'none'", "base-uri 'none'"):  # fmt: skip
        assert directive in PAGE_POLICY
    assert "unsafe-inline" not in PAGE_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    for asset in ("/static/app.js", "/static/style.css", "/static/docs/swagger-ui-bundle.js"):
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff", asset


def test_the_page_has_no_inline_script_or_style_the_policy_would_block() -> None:
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    script = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"""setAttribute\(\s*["']style""", script)
    assert "innerHTML" not in script
