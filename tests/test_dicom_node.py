"""The DICOM node end to end against a real PACS (Orthanc): studies in by C-STORE and STOW-RS, results out
by C-STORE and STOW-RS into the source study, and the faults a hospital network has.

Pinned: Orthanc C-STOREs a multi-image CR/DX study to `bfd serve`; the node answers it once quiet and Orthanc
then holds, in the same study, a TID 1500 SR (parsed by highdicom) referencing every source instance with the
model and a finding per image and per study, a GSPS per image referencing its source and a Secondary Capture
per image, all with the source's patient data byte for byte. The same via STOW-RS in and out. Faults: the
PACS down while results are pending (they arrive once it is back, each once), the node restarted with a
non-empty outbox (delivered after start-up), unsupported SOP classes and transfer syntaxes refused with the
proper status while the node keeps serving, a calling AE that is not allowed rejected, and an audit log that
names every object and no patient.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import highdicom as hd
import httpx
import pydicom
import pytest
from factories import build_tiny_bundle
from orthanc_fixtures import skip_or_fail
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage as SR_CLASS
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage as GSPS_CLASS
from pydicom.uid import SecondaryCaptureImageStorage as SC_CLASS
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from loadtest.bench_dicom import PeakRss
from loadtest.dicom_studies import make_study, part10_bytes, unsupported_instance
from loadtest.orthanc import OrthancServer
from loadtest.servers import Server, bfd_serve, free_port

PATIENT_NAME = "Müller^Jürgen"
SCU_AE = "BFDTESTSCU"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def _node_env(folder: Path, port: int, destination: str, **more: str) -> dict[str, str]:
    return {
        "BFD_DICOM_PORT": str(port),
        "BFD_DICOM_DESTINATION": destination,
        "BFD_DICOM_QUIET_S": "1",
        "BFD_DICOM_ALLOWED_AES": f"ORTHANC,{SCU_AE}",
        "BFD_DICOM_AUDIT_LOG": str(folder / "audit.jsonl"),
        "BFD_DICOM_RETRY_INITIAL_S": "0.5",
        "BFD_DICOM_RETRY_MAX_S": "2",
        "BFD_LOG_LEVEL": "info",
        **more,
    }


@pytest.fixture(scope="module")
def node(bundle: Path, orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`bfd serve` with its DICOM node on, sending to the module's Orthanc by C-STORE."""
    folder = tmp_path_factory.mktemp("node")
    port = free_port()
    env = _node_env(folder, port, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    with bfd_serve(bundle, folder, env=env) as server:
        orthanc.set_modality("bfd", "BFD", "127.0.0.1", port)
        server.dicom_port = port  # type: ignore[attr-defined]
        server.audit = folder / "audit.jsonl"  # type: ignore[attr-defined]
        yield server


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 120.0, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    log = server.log_text()[-4000:] if server is not None else ""
    pytest.fail(f"timed out waiting for {what}\n{log}")


def _results(orthanc: OrthancServer, study_uid: str) -> dict[str, list[Dataset]]:
    by_class: dict[str, list[Dataset]] = {}
    for ds in orthanc.study_instances(study_uid):
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    return by_class


def _expected_total(n: int) -> int:
    return n + 1 + n + n  # sources, one SR, a GSPS and an SC per image


def _audit(server: Server) -> list[dict]:  # type: ignore[type-arg]
    path: Path = server.audit  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _send(port: int, datasets: Sequence[Dataset], calling_ae: str = SCU_AE) -> list[int]:
    """C-STORE from a plain pynetdicom SCU; the status of each (or -1 when no context was accepted)."""
    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD")
    assert assoc.is_established, "association with the node not established"
    statuses = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status) if status else -2)
            except ValueError:  # pynetdicom: no accepted presentation context for this SOP class/syntax
                statuses.append(-1)
    finally:
        assoc.release()
    return statuses


def _roundtrip(datasets: Sequence[Dataset]) -> list[Dataset]:
    return [pydicom.dcmread(io.BytesIO(part10_bytes(ds))) for ds in datasets]


def _check_results(study: Sequence[Dataset], results: dict[str, list[Dataset]]) -> None:
    sources = {str(ds.SOPInstanceUID) for ds in study}
    (sr_ds,) = results[SR_CLASS]
    sr = hd.sr.srread(io.BytesIO(part10_bytes(sr_ds)))
    groups = {
        g.tracking_identifier: g
        for g in [*sr.content.get_planar_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]
    }
    images = [g for name, g in groups.items() if name.startswith("Image")]
    assert len(images) == len(study)  # a finding per image...
    per_image = set()
    for group in images:
        roi = getattr(group, "roi", None)  # planar ROI groups (TID 1410) have one, image groups (TID 1501) not
        if roi is not None:  # TID 1410: the heatmap's region on its source image
            per_image.add(str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        else:
            per_image.update(str(i.referenced_sop_instance_uid) for i in group.source_images)
        assert group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
    assert per_image == sources  # ...referencing every source instance
    study_group = groups["Study"]  # ...and one for the study
    assert {str(i.referenced_sop_instance_uid) for i in study_group.source_images} == sources
    assert {uid for _, _, uid, _ in sr.get_evidence()} >= sources
    assert len(str(sr_ds.DeviceSerialNumber)) == 64  # the bundle's sha256
    assert "RESEARCH USE ONLY" in str(sr_ds.SeriesDescription)
    gsps = results[GSPS_CLASS]
    assert len(gsps) == len(study)
    assert {
        str(g.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID) for g in gsps
    } == sources
    assert len(results[SC_CLASS]) == len(study)
    source = study[0]
    for ds in [sr_ds, *gsps, *results[SC_CLASS]]:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert str(ds.SOPInstanceUID) not in sources
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet
        assert ds["PatientName"].value == source["PatientName"].value
        assert ds.PatientID == source.PatientID


def test_orthanc_c_stores_a_study_and_gets_sr_gsps_and_sc_back(
    node: Server,
    orthanc: OrthancServer,
) -> None:
    study = _roundtrip(make_study(4, modality="mixed", body_parts=["hand", "shoulder"], patient_name=PATIENT_NAME))
    ids = [orthanc.upload(part10_bytes(ds)) for ds in study]
    orthanc.store_to_modality("bfd", ids)
    uid = str(study[0].StudyInstanceUID)
    _wait_for("the results in Orthanc", lambda: len(orthanc.instance_ids(uid)) >= _expected_total(4), server=node)
    results = _results(orthanc, uid)
    _check_results(study, results)
    sr_ds = results[SR_CLASS][0]
    assert "UNTRAINED" in str(sr_ds)  # the tiny bundle is untrained and the SR says so
    assert "UNTRAINED" in sr_ds.SeriesDescription
    events = [
        e for e in _audit(node) if e["event"] == "answered" and e["study_instance_uid"] == str(sr_ds.StudyInstanceUID)
    ]
    (answered,) = events
    assert sr_ds.DeviceSerialNumber == answered["model"]["sha256"]  # the model version, by its digest
    assert len(answered["produced"]) == 1 + 4 + 4
    events = _audit(node)
    assert any(e["event"] == "delivery" and e["outcome"] == "delivered" for e in events)


def test_unsupported_sop_classes_and_transfer_syntaxes_are_refused_and_the_node_keeps_serving(node: Server) -> None:
    port = node.dicom_port  # type: ignore[attr-defined]
    assert _send(port, [unsupported_instance("MG")]) == [0x0122]
    odd = _roundtrip(make_study(1, patient_name=PATIENT_NAME))[0]
    odd.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here, refused at negotiation
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(odd.SOPClassUID, "1.2.840.10008.1.2.4.100")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD")
    assert assoc.is_established
    try:
        accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == odd.SOPClassUID]
        assert accepted == []
        assert int(assoc.send_c_echo().Status) == 0  # still serving
    finally:
        assoc.release()
    good = _roundtrip(make_study(1, patient_name=PATIENT_NAME))
    assert _send(port, good) == [0x0000]


def test_dcmtk_an_independent_dicom_implementation_can_echo_and_store(node: Server, tmp_path: Path) -> None:
    """DCMTK's echoscu and storescu (not pynetdicom, not Orthanc) talk to the node."""
    tools = {name: shutil.which(name) for name in ("echoscu", "storescu")}
    if None in tools.values():
        skip_or_fail(f"DCMTK tools missing ({tools}); `make system-deps` installs the dcmtk package")
    port = str(node.dicom_port)  # type: ignore[attr-defined]
    address = ["-aet", SCU_AE, "-aec", "BFD", "127.0.0.1", port]
    echo = subprocess.run([tools["echoscu"], *address], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    (instance,) = _roundtrip(make_study(1, modality="DX", patient_name=PATIENT_NAME))
    path = tmp_path / "dx.dcm"
    path.write_bytes(part10_bytes(instance))
    store = subprocess.run([tools["storescu"], "-v", *address, str(path)], capture_output=True, text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    assert "Success" in store.stdout + store.stderr  # DCMTK prints the C-STORE response status


@pytest.mark.parametrize(
    ("budget", "reason"),
    [({"BFD_DICOM_HELD_BYTES_BUDGET": "1000"}, "limit of 1 kB"), ({"BFD_DICOM_SPOOL_BYTES_BUDGET": "1000"}, "spool")],
    ids=["memory", "spool"],
)
def test_no_room_answers_out_of_resources_and_the_sender_may_retry(
    bundle: Path, orthanc: OrthancServer, tmp_path: Path, budget: dict[str, str], reason: str
) -> None:
    """An instance the node cannot hold (here: larger than its whole held-bytes budget, refused as it arrives,
    or than the spool's disk budget, after a short wait) is answered 0xA700 'out of resources', never taken and
    dropped; a C-ECHO still answers."""
    port = free_port()
    destination = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    env = _node_env(tmp_path, port, destination, BFD_DICOM_SPOOL_DIR=str(tmp_path / "spool"), **budget)
    with bfd_serve(bundle, tmp_path, env=env) as server:
        server.audit = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
        study = _roundtrip(make_study(1, patient_name=PATIENT_NAME))
        assert _send(port, study) == [0xA700]
        refused = [e for e in _audit(server) if e["event"] == "refused"]
        assert [e["status"] for e in refused] == ["0xa700"]
        assert reason in refused[0]["reason"]
        assert list((tmp_path / "spool").iterdir()) == []  # nothing kept of what was refused
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="BFD")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()


def test_a_routed_ct_series_and_an_oversized_radiograph_are_refused_as_they_arrive_in_bounded_memory(
    bundle: Path, tmp_path: Path
) -> None:
    """A PACS routing rule that sends everything: 3 CT instances of 100 MB are read and dropped (0x0122) and a
    60 MB radiograph over the node's 20 MB limit stops being kept at the limit (0xA700, the limit in the Error
    Comment); the service grows by far less than one of them, and a normal radiograph is stored after."""
    port = free_port()
    env = _node_env(tmp_path, port, "PACS@127.0.0.1:9", BFD_DICOM_MAX_INSTANCE_BYTES="20000000")
    ct = unsupported_instance("CT")
    ct.Rows, ct.Columns = 10_000, 5_000
    ct.PixelData = bytes(ct.Rows * ct.Columns * 2)
    (large,) = make_study(1, modality="DX", patient_name=PATIENT_NAME)
    large.Rows, large.Columns = 6_000, 5_000
    large.BitsAllocated, large.BitsStored, large.HighBit = 16, 12, 11
    large.PixelData = bytes(large.Rows * large.Columns * 2)
    normal = _roundtrip(make_study(1, patient_name=PATIENT_NAME))[0]
    with bfd_serve(bundle, tmp_path, env=env) as server:
        server.audit = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
        peak = PeakRss(server, every_s=0.01, children=False)  # the doors are in the service process
        ae = AE(ae_title=SCU_AE)
        for ds in (ct, large, normal):
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="BFD", max_pdu=0)
        assert assoc.is_established
        peak.start()
        try:
            answers = []
            for ds in (ct, ct, ct, large, normal):
                ds.SOPInstanceUID = pydicom.uid.generate_uid()
                answer = assoc.send_c_store(ds)
                answers.append((int(answer.Status), str(answer.get("ErrorComment", ""))))
        finally:
            rss = peak.stop()["rss_mb"]
            assoc.release()
        assert [status for status, _ in answers] == [0x0122, 0x0122, 0x0122, 0xA700, 0x0000]
        assert "limit of 20 MB" in answers[3][1]
        refused = [e for e in _audit(server) if e["event"] == "refused"]
        assert [e["status"] for e in refused] == ["0x0122"] * 3 + ["0xa700"]
        assert "limit of 20 MB" in refused[3]["reason"]
    grown = rss["max"] - rss["before"]
    assert grown < 60, f"the service's peak RSS grew by {grown} MiB while 360 MB were sent"


def test_hostile_instances_by_stow_rs_are_refused_with_a_reason_in_bounded_memory(node: Server) -> None:
    """A deflate bomb (450 MB inflated) and a file nested too deeply: failed with a reason, nothing inflated."""
    from hostile_inputs import _nested_undefined, deflate_bomb

    boundary = "hostile"
    body = b""
    for part in (deflate_bomb(), _nested_undefined(5000)):
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    rss_before = node.rss_mb()
    answer = httpx.post(
        f"{node.url}/dicomweb/studies",
        content=body,
        headers={"content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=60,
    )
    assert answer.status_code == 409  # none taken
    failed = answer.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in failed] == [[0xC000], [0xC000]]
    assert "inflates to more than" in answer.headers["warning"]
    assert node.rss_mb() - rss_before < 200  # the 450 MB were never inflated
    assert httpx.get(f"{node.url}/readyz", timeout=10).status_code == 200


def test_a_calling_ae_that_is_not_allowed_is_rejected(node: Server) -> None:
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="BFD")  # type: ignore[attr-defined]
    assert assoc.is_rejected
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="BFD")  # type: ignore[attr-defined]
    assert assoc.is_established
    assoc.release()


def test_stow_rs_in_and_stow_rs_out(bundle: Path, orthanc: OrthancServer, tmp_path: Path) -> None:
    port = free_port()
    env = _node_env(tmp_path, port, orthanc.dicomweb_url)
    with bfd_serve(bundle, tmp_path, env=env) as server:
        orthanc.set_dicomweb_server("bfd", f"{server.url}/dicomweb")
        study = _roundtrip(make_study(3, modality="DX", body_parts=["hand"], patient_name=PATIENT_NAME))
        ids = [orthanc.upload(part10_bytes(ds)) for ds in study]
        orthanc.stow_to_server("bfd", ids)  # Orthanc POSTs multipart/related to /dicomweb/studies
        uid = str(study[0].StudyInstanceUID)
        _wait_for("the STOW-RS results", lambda: len(orthanc.instance_ids(uid)) >= _expected_total(3), server=server)
        _check_results(study, _results(orthanc, uid))


def test_results_pending_while_the_pacs_is_down_arrive_once_it_is_back(
    node: Server,
    orthanc: OrthancServer,
) -> None:
    study = _roundtrip(make_study(2, body_parts=["shoulder"], patient_name=PATIENT_NAME))
    uid = str(study[0].StudyInstanceUID)
    orthanc.stop()
    try:
        assert _send(node.dicom_port, study) == [0, 0]  # type: ignore[attr-defined]
        _wait_for(
            "a failed delivery attempt",
            lambda: any(e["event"] == "delivery" and e["outcome"] == "retry" for e in _audit(node)[-50:]),
            server=node,
        )
    finally:
        orthanc.start()
    _wait_for("the results after the outage", lambda: len(orthanc.instance_ids(uid)) >= 1 + 2 + 2, server=node)
    time.sleep(2)  # any duplicate would be sent by now
    uids = [str(ds.SOPInstanceUID) for ds in orthanc.study_instances(uid)]
    assert len(uids) == len(set(uids)) == 1 + 2 + 2  # each once (the sources stayed with the SCU)
    delivered = [
        u
        for e in _audit(node)
        if e["event"] == "delivery" and e["outcome"] == "delivered"
        for u in e["sop_instance_uids"]
        if u in uids
    ]
    assert sorted(delivered) == sorted(uids)  # confirmed once each


def test_a_restarted_node_delivers_its_outbox(bundle: Path, orthanc: OrthancServer, tmp_path: Path) -> None:
    port = free_port()
    env = _node_env(tmp_path, port, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    study = _roundtrip(make_study(2, body_parts=["hand"], patient_name=PATIENT_NAME))
    uid = str(study[0].StudyInstanceUID)
    orthanc.stop()
    try:
        with bfd_serve(bundle, tmp_path, env=env) as server:
            server.audit = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
            assert _send(port, study) == [0, 0]
            _wait_for(
                "results waiting in the outbox",
                lambda: any(e["event"] == "delivery" and e["outcome"] == "retry" for e in _audit(server)),
                server=server,
            )
    finally:
        orthanc.start()
    with bfd_serve(bundle, tmp_path, env=env) as server:
        _wait_for("the outbox delivered after start-up", lambda: len(orthanc.instance_ids(uid)) >= 5, server=server)


def test_a_node_killed_before_answering_answers_from_its_spool_after_the_restart(
    bundle: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    """The sender was told 'stored', then the node died (SIGKILL: no shutdown, nothing answered): the instances
    survive in the spool, are answered after the restart, and the spool is empty again. A spool that cannot be
    written makes the node refuse ('out of resources') rather than promise what it cannot keep."""
    port = free_port()
    spool = tmp_path / "spool"
    env = _node_env(tmp_path, port, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", BFD_DICOM_SPOOL_DIR=str(spool))
    study = _roundtrip(make_study(2, body_parts=["shoulder"], patient_name=PATIENT_NAME))
    uid = str(study[0].StudyInstanceUID)
    with bfd_serve(bundle, tmp_path, env={**env, "BFD_DICOM_QUIET_S": "600"}) as server:
        assert _send(port, study) == [0, 0]
        server.process.kill()  # before the study is quiet: in memory only, but for the spool
        server.process.wait(timeout=30)
    assert orthanc.instance_ids(uid) == []
    assert len(list(spool.glob("*.dcm"))) == 2
    with bfd_serve(bundle, tmp_path, env=env) as server:
        server.audit = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
        _wait_for("the spooled study answered", lambda: len(orthanc.instance_ids(uid)) >= 1 + 2 + 2, server=server)
        _check_results(study, _results(orthanc, uid))
        _wait_for("the spool emptied", lambda: not any(spool.iterdir()), server=server)
        (recovered,) = [e for e in _audit(server) if e["event"] == "recovered"]
        assert sorted(recovered["sop_instance_uids"]) == sorted(str(ds.SOPInstanceUID) for ds in study)
        assert PATIENT_NAME not in json.dumps(recovered)
        spool.rmdir()
        spool.write_bytes(b"")  # the spool cannot be written: 'out of resources', not a 'stored' it cannot keep
        assert _send(port, study[:1]) == [0xA700]
        spool.unlink()
        spool.mkdir()
        assert _send(port, study[:1]) == [0]  # and the node kept serving


def _metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_the_node_took_refused_answered_and_delivered(node: Server) -> None:
    """/metrics shows the node at work: instances by door and status, studies answered, result objects made and
    delivered, and its gauges (memory held against the budget, back to nothing once the study is answered)."""
    stored = ("bfd_dicom_instances_total", (("door", "dimse"), ("status", "0x0000")))
    refused = ("bfd_dicom_instances_total", (("door", "dimse"), ("status", "0x0122")))
    studies = ("bfd_dicom_studies_answered_total", ())
    made = ("bfd_dicom_result_objects_total", (("outcome", "made"),))
    delivered = ("bfd_dicom_result_objects_total", (("outcome", "delivered"),))
    before = _metrics(node)
    study = _roundtrip(make_study(2, body_parts=["hand"], patient_name=PATIENT_NAME))
    assert _send(node.dicom_port, [*study, unsupported_instance("MG")]) == [0, 0, 0x0122]  # type: ignore[attr-defined]

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return _metrics(node).get(key, 0.0) - before.get(key, 0.0)

    _wait_for("the study's results delivered", lambda: delta(delivered) >= 1 + 2 + 2, server=node)
    assert delta(stored) == 2
    assert delta(refused) == 1
    assert delta(studies) == 1
    assert delta(made) == 1 + 2 + 2
    after = _metrics(node)
    assert after[("bfd_dicom_held_bytes_budget", ())] > 0
    assert after[("bfd_dicom_held_bytes", ())] == 0  # answered: nothing held
    assert after[("bfd_dicom_receiving_bytes", ())] == 0  # and nothing still arriving
    assert after[("bfd_dicom_analyses_in_progress", ())] == 0
    assert ("bfd_dicom_spool_bytes", ()) in after


def test_analysed_instances_waiting_for_their_study_keep_little_of_their_bytes(bundle: Path, tmp_path: Path) -> None:
    """30 radiographs of 10 MB (2000x2500, 12-bit) in one study kept open (a long quiet time): once analysed,
    each keeps about 1 MB (overlay, model input; counted in the held bytes), not its received bytes, its parsed
    pixels or its full-size rendering, so the service's memory grows by far less than what was sent."""
    port = free_port()
    env = _node_env(tmp_path, port, "PACS@127.0.0.1:9", BFD_DICOM_QUIET_S="600", BFD_DICOM_STUDY_MAX_INSTANCES="100")
    study = make_study(30, modality="DX", bits_stored=12, size=(2500, 2000))
    sent = sum(len(part10_bytes(ds)) for ds in study)
    assert sent > 290_000_000
    with bfd_serve(bundle, tmp_path, env=env) as server:
        baseline = server.ps.memory_info().rss
        assert _send(port, study) == [0] * 30
        _wait_for(
            "every instance analysed, the study still open",
            lambda: _metrics(server)[("bfd_dicom_held_bytes", ())] < 30 * 2_000_000,
            server=server,
        )
        held = _metrics(server)[("bfd_dicom_held_bytes", ())]
        assert held > 30 * 500_000  # what the analyses keep still counts
        assert _metrics(server)[("bfd_dicom_waiting_studies", ())] == 1
        grown = server.ps.memory_info().rss - baseline
    assert grown < sent / 2, f"the service grew by {grown / 1e6:.0f} MB for {sent / 1e6:.0f} MB sent"


def test_the_audit_log_names_objects_never_patients(node: Server) -> None:
    text = node.audit.read_text(encoding="ascii")  # type: ignore[attr-defined]
    assert text
    for identifier in ("BFD-TEST-0001", "Müller", "M\\u00fcller", "Jürgen"):
        assert identifier not in text
    assert PATIENT_NAME not in node.log_text()
