"""The node's storage SCP as a socket: instances arrive byte-exact through its bulk-reading socket, every
DIMSE connection of the node (accepted, and the delivery's) has Nagle's algorithm off (`dicom_node.tcp`), and
an idle accepted association waits for messages rather than polling for them every millisecond.

Real pynetdicom associations over loopback; no PACS needed.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from dicom_node.config import NodeConfig
from dicom_node.scope import SUCCESS
from dicom_node.scp import MAX_PDU_BYTES, StorageSCP, _BulkReadSocket
from dicom_node.tcp import no_delay_on_open
from loadtest.dicom_studies import make_study, part10_bytes

pytestmark = pytest.mark.anyio


def _nodelay(sock: socket.socket | None) -> bool:
    assert sock is not None, "the association has no connected socket"
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_a_large_instance_arrives_byte_exact_over_a_fast_socket_with_nodelay() -> None:
    (ds,) = make_study(1, modality="DX", bits_stored=12, size=(1500, 1200))  # 3.6 MB of pixel data
    ds = pydicom.dcmread(io.BytesIO(part10_bytes(ds)))
    received: list[bytes] = []
    sockets: list[tuple[type, bool]] = []  # (class, TCP_NODELAY) of each live association's socket
    scp: StorageSCP | None = None

    async def receive(data: bytes, calling_ae: str | None, peer: str | None) -> int:
        assert scp is not None
        sockets.extend(
            (type(assoc.dul.socket), _nodelay(assoc.dul.socket.socket)) for assoc in scp._server.active_associations
        )
        received.append(data)
        return SUCCESS

    scp = StorageSCP(NodeConfig(destination="PACS@127.0.0.1:104", port=0), asyncio.get_running_loop(), receive)
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
    assert sockets == [(_BulkReadSocket, True)]


def test_a_connection_broken_mid_pdu_gives_what_arrived() -> None:
    """As pynetdicom's own recv(): the bytes there were, so its state machine sees the PDU is short."""
    ours, theirs = socket.socketpair()
    reader = _BulkReadSocket.__new__(_BulkReadSocket)  # the read path alone, without an association
    reader.socket = ours
    try:
        theirs.sendall(b"0123456789")
        theirs.close()
        got = reader.recv(1_000_000)
        assert bytes(got) == b"0123456789"
        assert isinstance(got, bytearray)
    finally:
        ours.close()


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
    scp = StorageSCP(NodeConfig(destination="PACS@127.0.0.1:104", port=0), asyncio.get_running_loop(), _never_called)
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


async def _never_called(data: bytes, calling_ae: str | None, peer: str | None) -> int:
    raise AssertionError("no C-STORE in this test")
