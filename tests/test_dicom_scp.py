"""The node's storage SCP as a socket: instances arrive byte-exact through its bounded PDU reader, every
DIMSE connection of the node (accepted, and the delivery's) has Nagle's algorithm off (`dicom_node.tcp`), an
idle accepted association waits for messages rather than polling for them every millisecond, and what an
arriving data set may keep in memory is bounded (`dicom_node.receiving`): a SOP class not analysed is never
kept, an instance over the size limit stops being kept at the limit, arriving bytes wait for room in the
held-bytes budget and are refused when none comes, and an association aborted mid-instance gives its bytes back.

Real pynetdicom associations over loopback; no PACS needed.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from dicom_node.config import NodeConfig
from dicom_node.pdu_reading import BoundedDUL
from dicom_node.receiving import ReceiveGate, Withheld
from dicom_node.scope import OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, SUCCESS
from dicom_node.scp import MAX_PDU_BYTES, StorageSCP
from dicom_node.tcp import no_delay_on_open
from loadtest.dicom_studies import make_study, part10_bytes, unsupported_instance

pytestmark = pytest.mark.anyio
CONFIG = NodeConfig(destination="PACS@127.0.0.1:104", port=0)
Answer = tuple[int, str | None]


class PeakGate(ReceiveGate):
    """The node's gate, remembering the most bytes it ever let arriving instances keep."""

    def __init__(self, *, max_instance_bytes: int = 100_000_000, budget: int = 500_000_000, **kwargs: Any) -> None:
        kwargs.setdefault("held", lambda: 0)
        kwargs.setdefault("wait_s", 5.0)
        super().__init__(max_instance_bytes=max_instance_bytes, budget=budget, **kwargs)
        self.peak = 0

    def reserve(self, count: int) -> bool:
        granted = super().reserve(count)
        self.peak = max(self.peak, self.receiving_bytes)
        return granted


def _nodelay(sock: socket.socket | None) -> bool:
    assert sock is not None, "the association has no connected socket"
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_a_large_instance_arrives_byte_exact_through_the_bounded_reader_with_nodelay() -> None:
    (ds,) = make_study(1, modality="DX", bits_stored=12, size=(1500, 1200))  # 3.6 MB of pixel data
    ds = pydicom.dcmread(io.BytesIO(part10_bytes(ds)))
    received: list[bytes] = []
    sockets: list[tuple[type, bool]] = []  # (class, TCP_NODELAY) of each live association's socket
    scp: StorageSCP | None = None

    async def receive(data: bytes | Withheld, calling_ae: str | None, peer: str | None) -> Answer:
        assert scp is not None
        assert isinstance(data, bytes)
        sockets.extend(
            (type(assoc.dul), _nodelay(assoc.dul.socket.socket)) for assoc in scp._server.active_associations
        )
        received.append(data)
        return SUCCESS, None

    scp = StorageSCP(CONFIG, asyncio.get_running_loop(), receive, PeakGate())
    scp.start()
    try:

        def send() -> int:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation, str(ds.file_meta.TransferSyntaxUID))
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="BFD", max_pdu=MAX_PDU_BYTES)
            assert assoc.is_established
            try:
                return int(assoc.send_c_store(ds).Status)
            finally:
                assoc.release()

        assert await asyncio.to_thread(send) == SUCCESS
    finally:
        scp.stop()
    (data,) = received
    got = pydicom.dcmread(io.BytesIO(data))
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert sockets == [(BoundedDUL, True)]


def test_the_delivery_handler_turns_nagle_off_on_an_scu_association() -> None:
    scp_ae = AE(ae_title="PEER")
    scp_ae.add_supported_context(DigitalXRayImageStorageForPresentation)
    server = scp_ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        port = int(server.server_address[1])
        plain = ae.associate("127.0.0.1", port, ae_title="PEER")
        tuned = ae.associate("127.0.0.1", port, ae_title="PEER", evt_handlers=[(evt.EVT_CONN_OPEN, no_delay_on_open)])
        try:
            assert plain.is_established
            assert tuned.is_established
            assert not _nodelay(
                plain.dul.socket.socket if plain.dul.socket else None
            )  # the default: what the handler changes
            assert _nodelay(tuned.dul.socket.socket if tuned.dul.socket else None)
        finally:
            plain.release()
            tuned.release()
    finally:
        server.shutdown()


async def test_an_idle_association_waits_for_messages_instead_of_polling_every_millisecond() -> None:
    """pynetdicom's acceptor loop looks at its message queue every 1 ms (about 6% of a core per open association,
    measured); the node's queue makes each look wait for a message, so an idle association loops ~100 times a
    second, and it still answers at once and is released cleanly."""
    scp = StorageSCP(CONFIG, asyncio.get_running_loop(), _never_called, PeakGate())
    scp.start()
    try:

        def idle_then_echo() -> tuple[int, int, bool]:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="BFD")
            assert assoc.is_established
            (accepted,) = scp._server.active_associations
            queue = accepted.dimse.msg_queue
            looks = 0
            original = queue.get

            def counted(block: bool = True, timeout: float | None = None) -> object:
                nonlocal looks
                looks += 1
                return original(block, timeout)

            queue.get = counted  # type: ignore[method-assign]
            time.sleep(0.5)
            idle_looks = looks
            status = int(assoc.send_c_echo().Status)
            assoc.release()
            return idle_looks, status, assoc.is_released

        idle_looks, status, released = await asyncio.to_thread(idle_then_echo)
    finally:
        scp.stop()
    assert idle_looks < 150  # about 45 with the wait; about 450 with pynetdicom's 1 ms loop
    assert status == SUCCESS
    assert released


async def _never_called(data: bytes | Withheld, calling_ae: str | None, peer: str | None) -> Answer:
    raise AssertionError("no C-STORE in this test")


def _instance(sop_class: str | None = None, pixel_bytes: int | None = None) -> Dataset:
    """A 1.4 MB 12-bit DX read back from its Part 10 bytes; as another SOP class, or with more pixel data."""
    (ds,) = make_study(1, modality="DX", bits_stored=12, size=(1000, 700))
    if sop_class is not None:
        ds = unsupported_instance("CT")
    if pixel_bytes is not None:
        ds.Rows, ds.Columns = pixel_bytes // 2 // 1000, 1000
        ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    return pydicom.dcmread(io.BytesIO(part10_bytes(ds)))


class Recorder:
    """The node's side of the SCP in these tests: what reached it, answered as the node would."""

    def __init__(self) -> None:
        self.incoming: list[bytes | Withheld] = []

    async def __call__(self, data: bytes | Withheld, calling_ae: str | None, peer: str | None) -> Answer:
        self.incoming.append(data)
        if isinstance(data, Withheld):
            return data.status, data.reason
        return SUCCESS, None


async def _with_scp(gate: ReceiveGate, recorder: Recorder, client: Callable[[int], Any]) -> Any:
    scp = StorageSCP(CONFIG, asyncio.get_running_loop(), recorder, gate)
    scp.start()
    try:
        return await asyncio.to_thread(client, scp.port)
    finally:
        scp.stop()


def _store_all(port: int, datasets: list[Dataset]) -> list[tuple[int, str | None]]:
    """C-STORE each over one association: (status, Error Comment) of each."""
    ae = AE(ae_title="TESTSCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD", max_pdu=MAX_PDU_BYTES)
    assert assoc.is_established
    try:
        answers = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            answers.append((int(status.Status), status.get("ErrorComment")))
        return answers
    finally:
        assoc.release()


async def test_an_instance_of_a_class_not_analysed_is_read_and_dropped_never_kept() -> None:
    """A PACS routing a CT series to the node: 40 MB of CT is answered 0x0122 with nothing of it kept, and the
    association goes on to store a radiograph."""
    gate, recorder = PeakGate(), Recorder()
    ct, dx = _instance(sop_class="CT", pixel_bytes=40_000_000), _instance()
    answers = await _with_scp(gate, recorder, lambda port: _store_all(port, [ct, dx]))
    (ct_status, ct_comment), (dx_status, _) = answers
    assert ct_status == SOP_CLASS_NOT_SUPPORTED
    assert ct_comment is not None
    assert "not analysed" in ct_comment
    assert dx_status == SUCCESS
    withheld, kept = recorder.incoming
    assert isinstance(withheld, Withheld)
    assert withheld.sop_instance_uid == ct.SOPInstanceUID
    assert isinstance(kept, bytes)
    assert pydicom.dcmread(io.BytesIO(kept)).SOPInstanceUID == dx.SOPInstanceUID
    assert gate.peak < 2_000_000  # the radiograph's bytes, none of the CT's
    assert gate.receiving_bytes == 0


async def test_an_instance_over_the_size_limit_stops_being_kept_at_the_limit() -> None:
    gate, recorder = PeakGate(max_instance_bytes=3_000_000), Recorder()
    large, small = _instance(pixel_bytes=12_000_000), _instance()
    answers = await _with_scp(gate, recorder, lambda port: _store_all(port, [large, small]))
    (large_status, comment), (small_status, _) = answers
    assert large_status == OUT_OF_RESOURCES
    assert comment is not None
    assert "limit of 3 MB" in comment
    assert small_status == SUCCESS
    withheld, kept = recorder.incoming
    assert isinstance(withheld, Withheld)
    assert withheld.status == OUT_OF_RESOURCES
    assert isinstance(kept, bytes)
    assert gate.peak <= 3_000_000
    assert gate.receiving_bytes == 0


async def test_arriving_bytes_wait_for_room_in_the_budget_then_are_kept() -> None:
    """With the node's held bytes at its budget, an arriving instance waits (its reader stops reading) and is
    taken once room comes: nothing reaches the node before."""
    held = [19_000_000]
    gate, recorder = PeakGate(budget=20_000_000, held=lambda: held[0], wait_s=30.0), Recorder()
    ds = _instance()
    reached_before_room: list[int] = []

    def client(port: int) -> list[tuple[int, str | None]]:
        def make_room() -> None:
            time.sleep(0.5)
            reached_before_room.append(len(recorder.incoming))
            held[0] = 0

        threading.Thread(target=make_room).start()
        return _store_all(port, [ds])

    assert await _with_scp(gate, recorder, client) == [(SUCCESS, None)]
    assert reached_before_room == [0]
    assert isinstance(recorder.incoming[0], bytes)


async def test_arriving_bytes_that_find_no_room_in_time_are_refused_to_retry_later() -> None:
    gate, recorder = PeakGate(budget=20_000_000, held=lambda: 20_000_000, wait_s=0.2), Recorder()
    ((status, comment),) = await _with_scp(gate, recorder, lambda port: _store_all(port, [_instance()]))
    assert status == OUT_OF_RESOURCES
    assert comment is not None
    assert "retry later" in comment
    assert gate.peak == 0
    assert gate.receiving_bytes == 0


async def test_an_association_aborted_mid_instance_gives_its_bytes_back() -> None:
    gate, recorder = PeakGate(), Recorder()
    ds = _instance(pixel_bytes=20_000_000)

    def send_half_then_abort(port: int) -> int:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="BFD", max_pdu=MAX_PDU_BYTES)
        assert assoc.is_established
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        request.DataSet = io.BytesIO(part10_bytes(ds)[132 + 200 :])  # the fragments' bytes: what matters is how many
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        context = assoc.accepted_contexts[0].context_id
        for n, fragment in enumerate(message.encode_msg(context, 1_000_000)):
            if n == 10:
                break
            assoc.dul.send_pdu(fragment)
        deadline = time.monotonic() + 30
        while gate.receiving_bytes < 5_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = gate.receiving_bytes
        assoc.abort()
        return arrived

    arrived = await _with_scp(gate, recorder, send_half_then_abort)
    assert arrived >= 5_000_000  # half an instance was being kept...
    deadline = time.monotonic() + 30
    while gate.receiving_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert gate.receiving_bytes == 0  # ...and went back when the association ended
    assert recorder.incoming == []
