"""Delivery of result objects (dicom_node.delivery) to a real Orthanc, by C-STORE and by STOW-RS; no mocks.

Pinned: destinations parse (and bad ones are refused with a clear message, credentials never echoed);
instances from loadtest/dicom_studies.py and a highdicom SR arrive in Orthanc with the exact patient-name bytes
and character set, in every transfer syntax used; delivering the same SOP Instance UID again leaves one
instance; a stopped Orthanc, a wrong called AE title or a closed port is a fast retriable error, and delivery
works again once Orthanc is back; a peer's failure statuses are classed retriable or not (a real pynetdicom
SCP and a real HTTP server answer them, since Orthanc 1.10 has no way to refuse an instance). The harness
tests itself too: Orthanc C-STOREs to a pynetdicom SCP, STOW-RSes to a second Orthanc, and keeps its
instances and runtime configuration over stop() and start().
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from orthanc_fixtures import started_orthanc
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.delivery import Delivered, DeliveryError, deliver
from dicom_node.destination import Destination
from inference.backoff import retry_delay_s
from loadtest.dicom_studies import (
    CR_IMAGE_STORAGE,
    CT_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    JAPANESE,
    LATIN1,
    MAMMOGRAPHY_FOR_PRESENTATION,
    UTF8,
    make_study,
    part10_bytes,
    study_of,
    unsupported_instance,
)
from loadtest.orthanc import OrthancServer
from loadtest.servers import free_port

# PS3.5 H.3.1 (Japanese, ISO 2022 IR 87), and UTF-8 padded to even length: the bytes Orthanc must keep.
VERIFICATION = "1.2.840.10008.1.1"

PN_BYTES = {
    UTF8: "Müller^Jürgen".encode() + b" ",
    JAPANESE: b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
}
CHARSETS: dict[str, str | list[str]] = {UTF8: "ISO_IR 192", JAPANESE: ["", "ISO 2022 IR 87"]}


def dimse(server: OrthancServer, ae_title: str | None = None) -> Destination:
    return Destination.parse(f"{ae_title or server.ae_title}@127.0.0.1:{server.dicom_port}")


def dicomweb(server: OrthancServer) -> Destination:
    return Destination.parse(server.dicomweb_url)


def raw(ds: Dataset, keyword: str) -> bytes:
    """The element's value bytes as stored (pydicom keeps elements raw until they are read)."""
    value = ds.get_item(keyword).value
    assert isinstance(value, bytes), f"{keyword} was already decoded"
    return value


def result_sr(images: list[Dataset]) -> Dataset:
    """A TID 1500 measurement report on the images, made by highdicom (as the node's results are)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="BFD")
    observer = hd.sr.ObserverContext(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                                     observer_identifying_attributes=device)  # fmt: skip
    finding = hd.sr.QualitativeEvaluation(
        name=hd.sr.CodedConcept("121071", "DCM", "Finding"), value=hd.sr.CodedConcept("72704001", "SCT", "Fracture")
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="finding 1"),
        qualitative_evaluations=[finding],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("168537006", "SCT", "Plain radiography"),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(evidence=images, content=report[0], series_instance_uid=generate_uid(),
                                 series_number=100, sop_instance_uid=generate_uid(), instance_number=1,
                                 manufacturer="BFD tests", is_complete=True)  # fmt: skip


# --- Destination.parse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORTHANC@127.0.0.1:4242", Destination("dimse", "ORTHANC", "127.0.0.1", 4242)),
        ("  PACS_1@pacs.example.org:104 \n", Destination("dimse", "PACS_1", "pacs.example.org", 104)),
        ("SIXTEEN_CHARS_AE@h:65535", Destination("dimse", "SIXTEEN_CHARS_AE", "h", 65535)),
        ("A B@10.0.0.1:1", Destination("dimse", "A B", "10.0.0.1", 1)),
        ("PACS@[::1]:11112", Destination("dimse", "PACS", "::1", 11112)),
        ("http://127.0.0.1:8042/dicom-web", Destination("dicomweb", url="http://127.0.0.1:8042/dicom-web")),
        ("HTTPS://pacs.example.org/dicomweb/", Destination("dicomweb", url="https://pacs.example.org/dicomweb")),
        ("https://bfd:s3cret@pacs:8443/wado", Destination("dicomweb", url="https://bfd:s3cret@pacs:8443/wado")),
    ],
)
def test_destination_parses(text: str, expected: Destination) -> None:
    assert Destination.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "AETITLE@host:port"),
        ("PACS", "AETITLE@host:port"),
        ("pacs.example.org:104", "AETITLE@host:port"),
        ("@host:104", "AE title"),
        ("   @host:104", "AE title"),
        ("SEVENTEEN_CHAR_AE@host:104", "at most 16"),
        ("PA\\CS@host:104", "backslash"),
        ("PA\tCS@host:104", "control"),
        ("MÜLLER@host:104", "non-ASCII"),
        ("PACS@host", "host:port"),
        ("PACS@:104", "host:port"),
        ("PACS@host:0", "1 to 65535"),
        ("PACS@host:65536", "1 to 65535"),
        ("PACS@host:", "1 to 65535"),
        ("PACS@host:http", "1 to 65535"),
        ("PACS@ho st:104", "host name"),
        ("PACS@::1:104", "host name"),
        ("ftp://pacs.example.org/dicom", "http(s)://"),
        ("http://", "no host"),
        ("http://pacs:99999/dicom-web", "port"),
        ("http://pacs/dicom-web?token=abc", "no query"),
    ],
)
def test_bad_destinations_are_refused_saying_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Destination.parse(text)


def test_credentials_never_reach_messages_or_descriptions() -> None:
    with pytest.raises(ValueError, match="AETITLE@host:port") as caught:
        Destination.parse("ftp://bfd:s3cret@pacs/dicom")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ValueError, match="no query") as caught:
        Destination.parse("https://bfd:s3cret@pacs/dicom-web?x=1")
    assert "s3cret" not in str(caught.value)
    destination = Destination.parse("https://bfd:s3cret@pacs.example.org:8443/dicom-web")
    assert destination.describe() == "https://pacs.example.org:8443/dicom-web"
    assert "s3cret" not in repr(destination)
    assert Destination.parse("PACS@[::1]:104").describe() == "PACS@[::1]:104"


def test_the_retry_wait_doubles_up_to_its_cap_however_many_attempts_failed() -> None:
    # 2 ** 1024 once overflowed float: after 1,024 failed attempts a delivery froze, with no audit record
    attempts = [1, 2, 10, 1024, 1025, 10**6, 10**12]
    waits = [retry_delay_s(n, initial_s=5.0, max_s=600.0) for n in attempts]
    assert waits[:2] == [5.0, 10.0]
    assert waits[2:] == [600.0] * 5
    assert waits == sorted(waits)
    assert retry_delay_s(10**6, initial_s=1e-9, max_s=3600.0) == 3600.0  # a tiny initial wait reaches the cap too


def test_a_bad_calling_ae_or_a_corrupt_instance_is_refused_before_any_traffic() -> None:
    nowhere = Destination.parse(f"NOBODY@127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="calling AE title"):
        deliver(nowhere, [b"x"], calling_ae="WAY_TOO_LONG_CALLING_AE")
    with pytest.raises(DeliveryError, match="object 2 of 2 is not a DICOM Part 10 file") as caught:
        deliver(nowhere, [part10_bytes(make_study(1)[0]), b"not DICOM at all"])
    assert caught.value.retriable is False
    assert deliver(nowhere, []) == []


# --- loadtest/dicom_studies.py ------------------------------------------------------------------------------------


def test_studies_have_one_uid_proper_sop_classes_and_body_parts() -> None:
    mixed = make_study(4, modality="mixed")
    assert len({ds.StudyInstanceUID for ds in mixed}) == 1
    assert [ds.SOPClassUID for ds in mixed] == [CR_IMAGE_STORAGE, DX_FOR_PRESENTATION] * 2
    assert len({ds.SeriesInstanceUID for ds in mixed}) == 2
    assert {ds.Modality for ds in mixed} == {"CR", "DX"}
    assert [ds.BodyPartExamined for ds in mixed] == ["HAND", "HIP", "LEG", "SHOULDER"]
    assert all(ds.PresentationIntentType == "FOR PRESENTATION" for ds in mixed if ds.Modality == "DX")
    processing = make_study(2, modality="DX", dx_purpose="processing", bits_stored=12, body_parts=["shoulder"])
    assert {ds.SOPClassUID for ds in processing} == {DX_FOR_PROCESSING}
    assert {ds.BodyPartExamined for ds in processing} == {"SHOULDER"}
    pixels = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part10_bytes(processing[0]))).pixel_array
    assert pixels.dtype.itemsize == 2
    assert 255 < int(pixels.max()) <= 4095
    assert processing[0].BitsStored == 12
    uid = generate_uid()
    assert study_of(make_study(3, n_series=3, study_uid=uid)) == uid
    assert unsupported_instance("MG").SOPClassUID == MAMMOGRAPHY_FOR_PRESENTATION
    assert unsupported_instance("CT").SOPClassUID == CT_IMAGE_STORAGE
    with pytest.raises(ValueError, match="8-bit"):
        make_study(1, transfer_syntax=JPEGBaseline8Bit, bits_stored=12)


@pytest.mark.parametrize("charset", [UTF8, JAPANESE, LATIN1])
def test_patient_names_are_encoded_in_the_chosen_character_set(charset: str) -> None:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part10_bytes(make_study(1, charset=charset)[0])))
    expected = PN_BYTES.get(charset, "Müller^Jürgen".encode("latin-1") + b" ")
    assert raw(ds, "PatientName") == expected


# --- delivery to Orthanc ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
@pytest.mark.parametrize(
    ("charset", "transfer_syntax", "modality"),
    [
        (UTF8, ExplicitVRLittleEndian, "mixed"),
        (JAPANESE, ExplicitVRLittleEndian, "CR"),
        (UTF8, RLELossless, "DX"),
        (JAPANESE, JPEGBaseline8Bit, "CR"),
    ],
)
def test_instances_arrive_with_their_exact_patient_name_bytes(
    orthanc: OrthancServer, kind: str, charset: str, transfer_syntax: str, modality: Any
) -> None:
    images = make_study(3, charset=charset, transfer_syntax=transfer_syntax, modality=modality)
    destination = dimse(orthanc) if kind == "dimse" else dicomweb(orthanc)

    delivered = deliver(destination, [part10_bytes(ds) for ds in images], timeout_s=20)

    assert [d.sop_instance_uid for d in delivered] == [ds.SOPInstanceUID for ds in images]
    assert {d.status for d in delivered} == ({0x0000} if kind == "dimse" else {200})
    stored = {ds.SOPInstanceUID: ds for ds in orthanc.study_instances(study_of(images))}
    assert set(stored) == {ds.SOPInstanceUID for ds in images}
    for sent in images:
        kept = stored[sent.SOPInstanceUID]
        assert raw(kept, "PatientName") == PN_BYTES[charset]
        assert kept.SpecificCharacterSet == CHARSETS[charset]  # pydicom decodes it on reading (it needs it)
        assert kept.file_meta.TransferSyntaxUID == transfer_syntax or transfer_syntax == ExplicitVRLittleEndian
        assert kept.SOPClassUID == sent.SOPClassUID
        assert kept.PixelData == sent.PixelData


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_highdicom_sr_is_delivered_with_its_images(orthanc: OrthancServer, kind: str) -> None:
    images = make_study(2)
    sr = result_sr(images)
    destination = dimse(orthanc) if kind == "dimse" else dicomweb(orthanc)

    delivered = deliver(destination, [part10_bytes(ds) for ds in [*images, sr]])

    assert delivered[-1].sop_instance_uid == sr.SOPInstanceUID
    kept = {ds.SOPInstanceUID: ds for ds in orthanc.study_instances(study_of(images))}
    assert kept[sr.SOPInstanceUID].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert raw(kept[sr.SOPInstanceUID], "PatientName") == PN_BYTES[UTF8]


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_delivering_the_same_sop_instance_uid_again_leaves_one_instance(orthanc: OrthancServer, kind: str) -> None:
    images = make_study(2)
    payloads = [part10_bytes(ds) for ds in images]
    destination = dimse(orthanc) if kind == "dimse" else dicomweb(orthanc)
    before = orthanc.instance_count()

    first = deliver(destination, payloads)
    after_first = orthanc.instance_count()
    second = deliver(destination, payloads)  # Orthanc 1.10 answers success and keeps the instance it has
    after_second = orthanc.instance_count()

    assert after_first == before + 2
    assert after_second == after_first
    assert [d.sop_instance_uid for d in second] == [d.sop_instance_uid for d in first]
    assert len(orthanc.instance_ids(study_of(images))) == 2


def test_a_stopped_orthanc_is_a_retriable_error_and_delivery_resumes_when_it_is_back(orthanc: OrthancServer) -> None:
    images = make_study(2)
    payloads = [part10_bytes(ds) for ds in images]
    orthanc.stop()
    try:
        for destination in (dimse(orthanc), dicomweb(orthanc)):
            with pytest.raises(DeliveryError) as caught:
                deliver(destination, payloads, timeout_s=20)
            assert caught.value.retriable is True
            assert destination.describe() in caught.value.reason
            assert caught.value.delivered == ()
    finally:
        orthanc.start()
    assert len(deliver(dimse(orthanc), payloads[:1])) == 1
    assert len(deliver(dicomweb(orthanc), payloads[1:])) == 1
    assert len(orthanc.instance_ids(study_of(images))) == 2


def test_a_wrong_called_ae_title_is_retriable() -> None:
    strict = started_orthanc(ae_title="STRICT", extra_config={"DicomCheckCalledAet": True})
    try:
        payloads = [part10_bytes(ds) for ds in make_study(1)]
        with pytest.raises(DeliveryError, match="rejected the association") as caught:
            deliver(dimse(strict, "NOT_STRICT"), payloads)
        assert caught.value.retriable is True
        assert deliver(dimse(strict), payloads)[0].status == 0x0000
    finally:
        strict.__exit__(None, None, None)


def test_a_closed_port_is_retriable() -> None:
    payloads = [part10_bytes(ds) for ds in make_study(1)]
    port = free_port()
    for destination in (Destination.parse(f"PACS@127.0.0.1:{port}"), Destination.parse(f"http://127.0.0.1:{port}")):
        with pytest.raises(DeliveryError, match="cannot") as caught:
            deliver(destination, payloads, timeout_s=20)
        assert caught.value.retriable is True


def test_a_wrong_dicomweb_path_is_not_retriable(orthanc: OrthancServer) -> None:
    payloads = [part10_bytes(ds) for ds in make_study(1)]
    with pytest.raises(DeliveryError, match="HTTP 404") as caught:
        deliver(Destination.parse(f"{orthanc.http_url}/no-such-service"), payloads)
    assert caught.value.retriable is False


# --- failure statuses from real peers that can refuse ----------------------------------------------------------


class StoreSCP:
    """A real pynetdicom storage SCP on a free loopback port that keeps what it receives and answers `status`."""

    def __init__(
        self, status: int = 0x0000, *, storage: bool = True, ae_title: str = "BFDSCP", answer_after_s: float = 0.0
    ) -> None:
        self.status = status
        self.ae_title = ae_title
        self.answer_after_s = answer_after_s  # a slow PACS: each C-STORE answered this much later
        self.received: list[Dataset] = []
        self.storing = 0  # C-STOREs being answered right now (each association has its own thread)
        self.most_at_once = 0
        self._count_lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        if storage:
            self._ae.supported_contexts = StoragePresentationContexts
        else:
            self._ae.add_supported_context(VERIFICATION)
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._store)])  # fmt: skip
        assert self._server is not None
        self.port = int(self._server.server_address[1])

    def _store(self, event: Any) -> int:
        with self._count_lock:
            self.storing += 1
            self.most_at_once = max(self.most_at_once, self.storing)
        try:
            time.sleep(self.answer_after_s)
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return self.status
        finally:
            with self._count_lock:
                self.storing -= 1

    @property
    def destination(self) -> Destination:
        return Destination.parse(f"{self.ae_title}@127.0.0.1:{self.port}")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture
def store_scp() -> Iterator[StoreSCP]:
    scp = StoreSCP()
    yield scp
    scp.close()


@pytest.mark.parametrize(
    ("status", "retriable"),
    [(0xA700, True), (0xA7FF, True), (0xA900, False), (0xC000, False), (0x0122, False), (0x0110, False)],
)
def test_failure_statuses_are_classed_retriable_or_not(store_scp: StoreSCP, status: int, retriable: bool) -> None:
    images = make_study(2)
    store_scp.status = status

    with pytest.raises(DeliveryError, match=f"{status:#06x}") as caught:
        deliver(store_scp.destination, [part10_bytes(ds) for ds in images])

    assert caught.value.retriable is retriable
    assert caught.value.failed == tuple(ds.SOPInstanceUID for ds in images)
    assert len(store_scp.received) == 2  # one association: every instance was offered


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_warning_statuses_deliver(store_scp: StoreSCP, status: int) -> None:
    images = make_study(2, modality="mixed")
    store_scp.status = status

    delivered = deliver(store_scp.destination, [part10_bytes(ds) for ds in images])

    assert delivered == [Delivered(ds.SOPInstanceUID, status) for ds in images]
    assert [ds.SOPInstanceUID for ds in store_scp.received] == [ds.SOPInstanceUID for ds in images]


def test_a_peer_that_accepts_none_of_the_sop_classes_is_not_retriable() -> None:
    scp = StoreSCP(storage=False)
    try:
        with pytest.raises(DeliveryError, match="accepts none of the SOP classes") as caught:
            deliver(scp.destination, [part10_bytes(make_study(1)[0])])
        assert caught.value.retriable is False
    finally:
        scp.close()


class _StowAnswers(BaseHTTPRequestHandler):
    """Answers every POST with the server's `answer`: (HTTP status, JSON body or None)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, body = self.server.answer  # type: ignore[attr-defined]
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stow_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StowAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def failed_sop(uid: str, reason: int) -> dict[str, Any]:
    item = Dataset()
    item.ReferencedSOPClassUID = CR_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = uid
    item.FailureReason = reason
    response = Dataset()
    response.FailedSOPSequence = [item]
    return response.to_json_dict()


@pytest.mark.parametrize(
    ("status", "reason", "retriable"),
    [(503, None, True), (500, None, True), (429, None, True), (400, None, False), (403, None, False),
     (409, 0xA700, True), (409, 0xC000, False), (202, 0xA900, False), (202, 0xA701, True)],
)  # fmt: skip
def test_stow_answers_are_classed_retriable_or_not(
    stow_server: ThreadingHTTPServer, status: int, reason: int | None, retriable: bool
) -> None:
    images = make_study(2)
    body = failed_sop(images[1].SOPInstanceUID, reason) if reason is not None else None
    stow_server.answer = (status, body)  # type: ignore[attr-defined]
    destination = Destination.parse(f"http://127.0.0.1:{stow_server.server_address[1]}/dicom-web")

    with pytest.raises(DeliveryError) as caught:
        deliver(destination, [part10_bytes(ds) for ds in images])

    assert caught.value.retriable is retriable
    if reason is not None:
        assert caught.value.failed == (images[1].SOPInstanceUID,)
    if status == 202:
        assert caught.value.delivered == (Delivered(images[0].SOPInstanceUID, 202),)


def test_an_unreadable_stow_answer_is_retriable(stow_server: ThreadingHTTPServer) -> None:
    stow_server.answer = (200, {"not": "a DICOM JSON data set"})  # type: ignore[attr-defined]
    destination = Destination.parse(f"http://127.0.0.1:{stow_server.server_address[1]}")

    with pytest.raises(DeliveryError, match="unreadable") as caught:
        deliver(destination, [part10_bytes(make_study(1)[0])])

    assert caught.value.retriable is True


# --- the harness itself ----------------------------------------------------------------------------------------


def test_orthanc_c_stores_to_a_modality_added_at_runtime(orthanc: OrthancServer, store_scp: StoreSCP) -> None:
    images = make_study(3, charset=JAPANESE)
    ids = [orthanc.upload(part10_bytes(ds)) for ds in images]
    orthanc.set_modality("scp", store_scp.ae_title, "127.0.0.1", store_scp.port)

    answer = orthanc.store_to_modality("scp", ids)

    assert answer["FailedInstancesCount"] == 0
    assert sorted(ds.SOPInstanceUID for ds in store_scp.received) == sorted(ds.SOPInstanceUID for ds in images)
    assert {raw(ds, "PatientName") for ds in store_scp.received} == {PN_BYTES[JAPANESE]}


def test_orthanc_stows_to_a_dicomweb_server_added_at_runtime(orthanc: OrthancServer) -> None:
    images = make_study(2)
    ids = [orthanc.upload(part10_bytes(ds)) for ds in images]
    second = started_orthanc(ae_title="SECOND")
    try:
        orthanc.set_dicomweb_server("second", second.dicomweb_url)
        orthanc.stow_to_server("second", ids)
        kept = second.study_instances(study_of(images))
        assert sorted(ds.SOPInstanceUID for ds in kept) == sorted(ds.SOPInstanceUID for ds in images)
    finally:
        second.__exit__(None, None, None)


def test_stop_and_start_keep_instances_ports_and_runtime_configuration(orthanc: OrthancServer) -> None:
    images = make_study(2)
    for ds in images:
        orthanc.upload(part10_bytes(ds))
    orthanc.set_modality("kept", "KEPT", "127.0.0.1", 104)
    count, ports = orthanc.instance_count(), (orthanc.http_port, orthanc.dicom_port)

    orthanc.stop()
    assert not orthanc.running
    orthanc.start()

    assert orthanc.instance_count() == count
    assert (orthanc.http_port, orthanc.dicom_port) == ports
    assert len(orthanc.study_instances(study_of(images))) == 2
    assert orthanc.client.get("/modalities").json().count("kept") == 1


@pytest.mark.anyio
async def test_the_delivery_loop_feeds_a_slow_pacs_over_several_associations(database_url: str, tmp_path: Path) -> None:
    """A C-STORE waits for its answer: with a PACS that answers slowly, batches go over up to `parallel`
    associations at once, every object arrives once, and each is marked delivered in the outbox."""
    from dicom_node.audit import AuditLog
    from dicom_node.outbox import ResultObject
    from dicom_node.sender import BATCH, DeliveryLoop
    from service.outbox import StoreOutbox
    from service.store import ResultsStore

    scp = StoreSCP(answer_after_s=0.05)
    store = ResultsStore(database_url)
    try:
        await store.ensure_ready()
        outbox = StoreOutbox(store)
        images = make_study(3 * BATCH, size=(16, 16))
        objects = [ResultObject(str(ds.SOPClassUID), str(ds.SOPInstanceUID), part10_bytes(ds)) for ds in images]
        await outbox.put("study", scp.destination.describe(), objects)
        loop = DeliveryLoop(outbox, AuditLog(tmp_path / "audit.jsonl"), [scp.destination], calling_ae="BFD",
                            timeout_s=30, retry_initial_s=1, retry_max_s=1, parallel=3)  # fmt: skip
        assert await loop.round() == 3 * BATCH
        assert await outbox.pending() == 0
    finally:
        await store.close()
        scp.close()
    assert sorted(str(ds.SOPInstanceUID) for ds in scp.received) == sorted(o.sop_instance_uid for o in objects)
    assert 2 <= scp.most_at_once <= 3


@pytest.mark.anyio
async def test_results_waiting_for_a_destination_no_longer_configured_go_to_the_current_one(tmp_path: Path) -> None:
    """Results queued while the destination was wrong were delivered, with patient data, to the old address
    after the setting was corrected and the service restarted. Now the restarted loop, configured for the new
    destination only, re-addresses them (outbox, log, audit) and sends them there; the old address, which
    would store them this time, is never contacted again."""
    from dicom_node.audit import AuditLog
    from dicom_node.outbox import ResultObject
    from dicom_node.sender import DeliveryLoop
    from service.outbox import StoreOutbox
    from service.store import ResultsStore

    old, new = StoreSCP(status=0xA700, ae_title="WRONG"), StoreSCP(ae_title="RIGHT")  # busy: try again later
    url = f"sqlite+aiosqlite:///{tmp_path}/results.sqlite3"
    audit = AuditLog(tmp_path / "audit.jsonl")
    images = make_study(3, size=(16, 16))
    objects = [ResultObject(str(ds.SOPClassUID), str(ds.SOPInstanceUID), part10_bytes(ds)) for ds in images]
    settings: dict[str, Any] = {"calling_ae": "BFD", "timeout_s": 30, "retry_initial_s": 0.01, "retry_max_s": 0.01}
    try:
        store = ResultsStore(url)
        try:
            await store.ensure_ready()
            outbox = StoreOutbox(store)
            await outbox.put("study", old.destination.describe(), objects)
            before = DeliveryLoop(outbox, audit, [old.destination], **settings)
            assert await before.round() == 3
            assert len(old.received) == 3  # tried, and told 'out of resources': the results wait in the outbox
            assert await outbox.pending() == 3
        finally:
            await store.close()
        old.status = 0x0000  # were it asked again, the old address would store them now
        store = ResultsStore(url)  # the setting corrected, the service restarted
        try:
            await store.ensure_ready()
            outbox = StoreOutbox(store)
            after = DeliveryLoop(outbox, audit, [new.destination], **settings)
            time.sleep(0.05)  # the retry is due
            assert await after.round() == 3
            assert await outbox.pending() == 0
            entries = await outbox.entries()
            assert {e.destination for e in entries} == {new.destination.describe()}
            assert all(e.delivered_at is not None and e.payload is None for e in entries)
        finally:
            await store.close()
    finally:
        old.close()
        new.close()
    uids = sorted(o.sop_instance_uid for o in objects)
    assert len(old.received) == 3  # nothing more
    assert sorted(str(ds.SOPInstanceUID) for ds in new.received) == uids
    (moved,) = [e for e in audit.read() if e["event"] == "readdressed"]
    assert moved["previous_destination"] == old.destination.describe()
    assert moved["destination"] == new.destination.describe()
    assert sorted(moved["sop_instance_uids"]) == uids
    delivered = [e for e in audit.read() if e["event"] == "delivery" and e["outcome"] == "delivered"]
    assert [e["destination"] for e in delivered] == [new.destination.describe()]
