"""The DIMSE door against hostile peers, on a real `bfd serve` process: nothing a connection says about itself
sizes a buffer, a stalled PDU is cut off in seconds, one host cannot take every association slot, an
A-ASSOCIATE-RQ is judged by its calling AE and its context count before it is decoded, and what a peer wrote
reaches the log escaped, one line per refused association (`dicom_node.pdu_reading`, `dicom_node.scp`).

The peers here are raw sockets writing PDUs by hand (what no DICOM library would send) and, for the genuine
senders, pynetdicom. Memory is the server's RSS with its child processes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest
from factories import build_tiny_bundle
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from loadtest.bench_dicom import PeakRss
from loadtest.dicom_studies import make_study
from loadtest.servers import Server, bfd_serve, free_port

pytestmark = pytest.mark.slow

MiB = 2**20
ALLOWED = "GOODSCU"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LITTLE = b"1.2.840.10008.1.2"
SECOND_ADDRESS = "127.0.0.2"  # another peer on the loopback network: Linux routes all of 127/8 to lo


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("hostile-node")
    bundle = build_tiny_bundle(folder / "bundle")
    port = free_port()
    env = {
        "BFD_DICOM_PORT": str(port),
        "BFD_DICOM_HOST": "0.0.0.0",  # noqa: S104 - the tests' second peer address must reach it
        "BFD_DICOM_DESTINATION": f"PACS@127.0.0.1:{free_port()}",  # nobody there: results wait in the outbox
        "BFD_DICOM_ALLOWED_AES": ALLOWED,
        "BFD_DICOM_AUDIT_LOG": str(folder / "audit.jsonl"),
        "BFD_LOG_LEVEL": "info",
    }
    with bfd_serve(bundle, folder / "serve", env=env) as server:
        server.dicom_port = port  # type: ignore[attr-defined]
        _settled_rss(server)  # the object builder's worker warms up after start-up: not the peers' doing
        yield server


def _port(server: Server) -> int:
    return int(server.dicom_port)  # type: ignore[attr-defined]


def _connect(server: Server, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(server)), timeout=30, source_address=(source, 0))


def _echo(server: Server, source: str = "127.0.0.1") -> bool:
    """A genuine C-ECHO from `source`: True when the association was accepted and answered."""
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", _port(server), ae_title="BFD", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(calling: bytes, contexts: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing `contexts` Verification contexts, written by hand."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for index in range(contexts):
        syntaxes = _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, IMPLICIT_LITTLE)
        items.append(_item(0x20, bytes([(2 * index + 1) % 256, 0, 0, 0]) + syntaxes))
    items.append(_item(0x50, _item(0x51, struct.pack(">I", 16384))))
    fixed = struct.pack(">HH", 1, 0) + b"BFD".ljust(16) + calling.ljust(16)[:16] + bytes(32)
    body = fixed + b"".join(items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _closed_by_peer(sock: socket.socket, within_s: float) -> bytes | None:
    """What the server wrote before closing the connection, or None if it was still open after `within_s`."""
    sock.settimeout(within_s)
    received = b""
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except TimeoutError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return received
    return None


def _rss_mib(server: Server) -> float:
    return server.rss_mb()


def _settled_rss(server: Server, timeout_s: float = 60.0) -> float:
    """The server's RSS once it stopped moving (two readings a second apart within 2 MiB)."""
    last = _rss_mib(server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _rss_mib(server)
        if abs(now - last) < 2:
            return now
        last = now
    return last


def _wait_for_rss_peak(server: Server, seconds: float) -> float:
    peak = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, _rss_mib(server))
        time.sleep(0.05)
    return peak


def test_pdu_headers_claiming_gigabytes_allocate_nothing_and_are_aborted(node: Server) -> None:
    """Before: two connections each sending only a header claiming 2 GiB took the service from 430 to 4,528 MiB
    (no association, no AE title, with the calling AE restricted)."""
    assert _echo(node)
    before = _rss_mib(node)
    claims = [(0x01, 1 << 30), (0x04, 1 << 30)] + [(0x01, 100 * MiB)] * 6 + [(0x04, 100 * MiB)] * 6
    sockets = []
    for index, (pdu_type, length) in enumerate(claims):
        sock = _connect(node, "127.0.0.1" if index < 7 else SECOND_ADDRESS)
        sock.sendall(struct.pack(">BBI", pdu_type, 0, length))
        sockets.append(sock)
    peak = _wait_for_rss_peak(node, 2.0)
    answers = [_closed_by_peer(sock, 15) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert all(answer is not None for answer in answers), "a connection claiming a huge PDU was kept open"
    # each was told why (A-ABORT, source: service provider) before it was closed
    assert all(answer and answer[0] == 0x07 for answer in answers), answers
    assert peak - before < 50, f"RSS rose {peak - before:.0f} MiB for PDU headers alone"
    assert _echo(node)
    assert "A-ASSOCIATE-RQ PDU of 1,073,741,824 bytes" in node.log_text()


def test_half_sent_pdus_are_cut_off_and_one_peer_cannot_take_every_slot(node: Server) -> None:
    """Before: 16 connections that sent a 6-byte header and then nothing held all 16 association slots for as long
    as they liked, and genuine C-ECHOs got 'local limit exceeded'."""
    stalled = []
    for _ in range(16):
        sock = _connect(node, SECOND_ADDRESS)
        sock.sendall(associate_rq(ALLOWED.encode(), 1)[:6])  # a header announcing a real request, then nothing
        stalled.append(sock)
    time.sleep(0.5)
    # the eight past the per-peer limit were closed at once, and a sender from elsewhere still gets in
    assert _echo(node, "127.0.0.1")
    started = time.monotonic()
    outcomes = [_closed_by_peer(sock, 40) for sock in stalled]
    for sock in stalled:
        sock.close()
    assert all(outcome is not None for outcome in outcomes), "a stalled connection was held open"
    assert time.monotonic() - started < 40
    # their slots are free again: the same address gets in
    assert _echo(node, SECOND_ADDRESS)
    log = node.log_text()
    assert "closed at once" in log
    assert "a PDU stalled" in log


def test_an_associate_request_is_judged_before_it_is_decoded(node: Server) -> None:
    """Before: one 6 MB A-ASSOCIATE-RQ with 100,000 presentation contexts cost 11 s of CPU before it was
    rejected for its calling AE."""
    huge = associate_rq(b"STRANGER", 100_000)
    assert len(huge) > 4 * MiB
    sock = _connect(node)
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(huge)  # refused on its length: the server never reads the rest
    answer = _closed_by_peer(sock, 15)
    sock.close()
    assert answer is not None
    assert answer[:1] == b"\x07", answer  # A-ABORT

    too_many = associate_rq(ALLOWED.encode(), 129)  # small enough, but more contexts than the standard allows
    sock = _connect(node)
    sock.sendall(too_many)
    answer = _closed_by_peer(sock, 15)
    sock.close()
    assert answer is not None
    assert answer[:1] == b"\x07", answer
    assert "proposing 129 presentation contexts" in node.log_text()

    stranger = associate_rq(b"STRANGER", 128)
    sock = _connect(node)
    sock.sendall(stranger)
    answer = _closed_by_peer(sock, 15)
    sock.close()
    # the standard rejection: A-ASSOCIATE-RJ, rejected-permanent, service user, calling AE not recognised
    assert answer == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
    assert _echo(node)


def test_what_a_peer_wrote_reaches_the_log_escaped_one_line_per_refusal(node: Server) -> None:
    """Before: a calling AE title with a newline forged a log line, and each bad A-ASSOCIATE-RQ logged a full
    traceback."""
    before = node.log_text()
    sock = _connect(node)
    sock.sendall(associate_rq(b"EVIL\nFORGED LINE", 1))
    assert _closed_by_peer(sock, 15) is not None
    sock.close()
    broken = associate_rq(ALLOWED.encode(), 1)
    broken = broken[:-8] + b"\x51\x00\xff\xff" + broken[-4:]  # a user-information sub-item overrunning the PDU
    sock = _connect(node)
    sock.sendall(broken)
    assert _closed_by_peer(sock, 15) is not None
    sock.close()
    time.sleep(0.5)
    new = node.log_text()[len(before) :]
    lines = new.splitlines()
    assert any("EVIL\\nFORGED LINE" in line for line in lines), new
    assert not any(line.startswith("FORGED") for line in lines), new
    assert "Traceback" not in new
    refusals = [line for line in lines if "DICOM association from" in line]
    assert len(refusals) == 2, new
    assert _echo(node)


def test_a_command_set_without_end_is_refused(node: Server) -> None:
    """pynetdicom gathered a DIMSE command set's fragments without limit: a peer that never sends the last one
    grew it for ever."""
    rq = associate_rq(ALLOWED.encode(), 1)
    sock = _connect(node)
    sock.sendall(rq)
    sock.settimeout(15)
    accept = sock.recv(65536)
    assert accept[:1] == b"\x02", accept  # A-ASSOCIATE-AC
    fragment = b"\x01" + bytes(60_000)  # command, not the last fragment
    pdv = struct.pack(">IB", len(fragment) + 1, 1) + fragment
    pdu = struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
    answer = None
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        for _ in range(4):
            sock.sendall(pdu)
        answer = _closed_by_peer(sock, 15)
    sock.close()
    assert answer is None or answer[:1] in (b"", b"\x07")
    assert "DIMSE command set over 65,536 bytes" in node.log_text()
    assert _echo(node)


def test_the_test_peers_are_distinct_addresses() -> None:
    """The per-peer tests need a second loopback address (Linux gives all of 127/8 to lo)."""
    with socket.socket() as server, socket.socket() as client:
        server.bind(("0.0.0.0", 0))  # noqa: S104
        server.listen(1)
        client.bind((SECOND_ADDRESS, 0))
        client.connect(("127.0.0.1", server.getsockname()[1]))
        accepted, address = server.accept()
        accepted.close()
    assert address[0] == SECOND_ADDRESS


def _declared_8000x8000(index: int) -> Dataset:
    """A DX declaring 8000x8000 8-bit pixels (64 MB of pixel data): received, parsed, refused by the decoder."""
    (ds,) = make_study(1, modality="DX", size=(64, 64))
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 8000
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(8000 * 8000)
    return ds


def _with_private_element(index: int) -> Dataset:
    """A small DX carrying a 20 MB private element: analysed; only what the result objects read is kept."""
    (ds,) = make_study(1, modality="DX", size=(256, 256))
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00110010, "LO", "HOSTILE")
    ds.add_new(0x00111010, "OB", bytes([index % 256]) * (20 * 10**6))
    return ds


def _store_over_one_association(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title=ALLOWED)
    for ds in datasets[:2]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD", max_pdu=4 * MiB)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_what_waiting_studies_keep_is_charged_and_memory_stays_within_the_budgets(tmp_path: Path) -> None:
    """Before: instances whose decode was refused counted 0 bytes while their upload and parsed data set stayed
    referenced (12 of them: RSS 430 -> 1,396 MiB, held bytes 0), instances with a 40 MB private element counted
    2.3 MB for about 400 MB kept, and 36 such instances over 3 associations grew RSS by about 820 MB with no study
    waiting at all. Here 18 instances (9 declaring 8000x8000 pixels, 64 MB each; 9 with a 20 MB private element;
    756 MB sent) arrive over 3 associations at once, each in its own study kept open: the service's RSS (with its
    child processes) stays within the held-bytes and decode budgets plus a stated margin."""
    held_budget, decode_budget, margin = 200 * 10**6, 300 * 10**6, 120 * 10**6  # margin: 3 PDUs of 4 MiB,
    # the interpreter's and allocator's slack, the answers; stated, not hidden
    bundle = build_tiny_bundle(tmp_path / "bundle")
    port = free_port()
    env = {
        "BFD_DICOM_PORT": str(port),
        "BFD_DICOM_DESTINATION": f"PACS@127.0.0.1:{free_port()}",
        "BFD_DICOM_ALLOWED_AES": ALLOWED,
        "BFD_DICOM_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "BFD_DICOM_QUIET_S": "600",  # every study waits: what it keeps stays held
        "BFD_DICOM_HELD_BYTES_BUDGET": str(held_budget),
        "BFD_DECODE_MEMORY_BUDGET_BYTES": str(decode_budget),
        "BFD_MAX_IMAGE_DECODE_BYTES": str(decode_budget),
        "BFD_MAX_QUEUE_WAIT_MS": "60000",
    }
    batches = [
        [(_declared_8000x8000 if (n + k) % 2 else _with_private_element)(3 * n + k) for n in range(6)] for k in range(3)
    ]
    sent = sum(len(ds.PixelData) + (20 * 10**6 if 0x00111010 in ds else 0) for batch in batches for ds in batch)
    with bfd_serve(bundle, tmp_path / "serve", env=env) as server:
        before = _settled_rss(server)
        peak = PeakRss(server, every_s=0.02)
        peak.start()
        with ThreadPoolExecutor(3) as pool:
            statuses = [s for batch in pool.map(partial(_store_over_one_association, port), batches) for s in batch]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _metric(server, "bfd_dicom_receiving_bytes") > 0:
            time.sleep(0.5)
        time.sleep(3)  # the last analyses finish
        rss = peak.stop()["rss_mb"]
        held = _metric(server, "bfd_dicom_held_bytes")
    assert statuses.count(0) >= 9, statuses  # most were taken; the rest were told to retry (0xA700)
    assert set(statuses) <= {0x0000, 0xA700}, statuses
    assert 0 < held <= held_budget
    grown = (rss["max"] - before) * MiB

    bound = held_budget + decode_budget + margin
    assert grown <= bound, f"RSS grew {grown / 1e6:.0f} MB for {sent / 1e6:.0f} MB sent; bound {bound / 1e6:.0f} MB"


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return float("nan")


def test_a_pdu_stalled_mid_data_is_cut_off_and_its_charge_given_back(node: Server) -> None:
    """A P-DATA-TF's bytes count against the held-bytes budget as they arrive; a peer that stops sending them
    is cut off within seconds, and what it had sent is given back."""
    sock = _connect(node)
    sock.sendall(associate_rq(ALLOWED.encode(), 1))
    sock.settimeout(15)
    assert sock.recv(65536)[:1] == b"\x02"  # A-ASSOCIATE-AC
    announced = 2 * MiB
    sock.sendall(struct.pack(">BBI", 0x04, 0, announced) + bytes(announced // 2))
    deadline = time.monotonic() + 10
    while _metric(node, "bfd_dicom_receiving_bytes") < announced // 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(node, "bfd_dicom_receiving_bytes") >= announced // 2  # charged while it arrives
    answer = _closed_by_peer(sock, 30)
    sock.close()
    assert answer is not None
    assert answer[:1] in (b"", b"\x07")
    deadline = time.monotonic() + 10
    while _metric(node, "bfd_dicom_receiving_bytes") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(node, "bfd_dicom_receiving_bytes") == 0
    assert _echo(node)
