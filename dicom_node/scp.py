"""The DIMSE door: a pynetdicom Storage SCP (C-ECHO, C-STORE) that hands instances to the node.

pynetdicom runs each association in its own thread; the handler passes the received bytes to the node on
the event loop (`asyncio.run_coroutine_threadsafe`) and answers with the node's status: Success, 0xA700
'out of resources' when the node cannot take more now (the core's admission or the held-bytes budget: the
sender retries later), 0x0122 for a SOP class the node does not analyse (every storage SOP class is
negotiated so that the sender gets this status rather than a bare rejection), 0xC000 for what does not
parse. Transfer syntaxes the core cannot decode are not accepted at negotiation, the standard's way to say so.
Calling AE titles outside `allowed_aes` are rejected at association (reason: calling AE not recognised).
While a data set arrives, `dicom_node.receiving` bounds what it may keep in memory (refusals before the end
reach the node as `Withheld`); a refusal's reason goes back in the response's Error Comment. With a TLS
context (`dicom_node.tls`) the port speaks TLS only; each handshake runs in its association's thread under a
time limit (pynetdicom's runs in the accept loop without one: one client that connects and says nothing would
keep every other sender out). Every PDU is read under the bounds of `dicom_node.pdu_reading` (length, memory,
time, the A-ASSOCIATE-RQ's calling AE and context count before it is decoded), a DIMSE command set is at most
`MAX_COMMAND_BYTES`, at most `max_associations` associations are served at once and `max_associations_per_peer`
from one address (more are closed at once, so one host cannot take every slot), and pynetdicom's log records
are one escaped line each (`dicom_node.peer_text`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import ssl
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

if TYPE_CHECKING:
    from pynetdicom.association import Association

from dicom_node.config import NodeConfig
from dicom_node.pdu_reading import bound
from dicom_node.peer_text import printable, quiet_pynetdicom
from dicom_node.receiving import ReceiveBuffer, ReceiveGate, Withheld, bound_receiving, release_unfinished
from dicom_node.scope import ACCEPTED_TRANSFER_SYNTAXES, CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from dicom_node.tcp import no_delay

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0
# The largest PDU we ask senders to use: pynetdicom's default (16 KiB) makes a 10 MB radiograph 600 PDUs, and
# reassembling them in Python halved the instances per second (measured: 14 vs 34 per s for 2000x2500 12-bit).
MAX_PDU_BYTES = 4 * 1024 * 1024
# pynetdicom's DUL thread polls every 1 ms when idle: with a few associations open that is thousands of wake-ups
# a second contending for the GIL with decoding (pynetdicom documents `_run_loop_delay` as the knob). 10 ms
# adds at most 10 ms to a message arriving on an idle association; data in flight is read without sleeping.
DUL_IDLE_POLL_S = 0.01
# pynetdicom's acceptor reactor sleeps 1 ms between looks at its DIMSE message queue (hard-coded): about 6% of a
# core per open association, measured, with 4 associations from a PACS a quarter of a core and a GIL hand-over
# every millisecond. Its non-blocking look waits up to this long instead, and returns as soon as a message comes.
ACCEPTOR_IDLE_WAIT_S = 0.01
ERROR_COMMENT_CHARS = 64  # Error Comment (0000,0902) is an LO
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# (part 10 bytes or why they were not kept, calling AE, peer host) -> (status, reason when refused)
Receive = Callable[[bytes | Withheld, str | None, str | None], Coroutine[Any, Any, tuple[int, str | None]]]


class StorageSCP:
    """Listens on `config.host:config.port` until `stop()`."""

    def __init__(
        self,
        config: NodeConfig,
        loop: asyncio.AbstractEventLoop,
        receive: Receive,
        gate: ReceiveGate,
        tls: ssl.SSLContext | None = None,
        on_tls_refused: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.receive = receive
        self.gate = gate
        self.tls = tls
        self.on_tls_refused = on_tls_refused  # called on the event loop, once per connection turned away
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_called_aet = False  # senders often call us by another title; the calling AE is checked
        if config.allowed_aes:
            self.ae.require_calling_aet = list(config.allowed_aes)
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = MAX_PDU_BYTES
        self.ae.network_timeout = 60
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        for context in StoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(context.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification)
        self._server: Any = None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the system chose for port 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not listening")
        return int(self._server.server_address[1])

    def start(self) -> None:
        quiet_pynetdicom()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda _event: 0x0000),
            (evt.EVT_CONN_CLOSE, lambda event: release_unfinished(event.assoc.dimse)),
        ]
        port = self.config.port or 0
        server = cast(
            _GatedServer,
            self.ae.make_server(
                (self.config.host, port),
                evt_handlers=handlers,
                server_class=_GatedServer,
                request_handler=_BoundedHandler,
            ),
        )
        server.receive_gate = self.gate
        server.tls_context = self.tls
        server.on_tls_refused = self._tls_refused
        server.config = self.config
        server.peers = weakref.WeakKeyDictionary()
        server.peers_lock = threading.Lock()
        self._server = server
        self.ae._servers.append(server)  # as AE.start_server does: the server's shutdown() takes it out again
        threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True).start()
        log.info(
            "DICOM storage SCP %s listening on %s:%d%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if self.tls is not None else "",
        )

    def stop(self) -> None:
        """No new associations; the ones in progress are ended."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _tls_refused(self) -> None:
        """Runs in the connection's thread."""
        if self.on_tls_refused is not None:
            self.loop.call_soon_threadsafe(self.on_tls_refused)

    def _on_store(self, event: Any) -> int | Dataset:
        """Runs in the association's thread."""
        buffer = event.request.DataSet
        try:
            return self._answer(event, buffer if isinstance(buffer, ReceiveBuffer) else None)
        finally:
            if isinstance(buffer, ReceiveBuffer):
                buffer.release()  # the node holds it now (or refused it): its bytes count there

    def _answer(self, event: Any, buffer: ReceiveBuffer | None) -> int | Dataset:
        incoming: bytes | Withheld
        if buffer is not None and buffer.withheld is not None:
            incoming = buffer.withheld
        elif buffer is not None and (whole := buffer.part10()) is not None:
            incoming = whole  # the buffer itself: still charged to the gate until the node has charged it
        else:
            try:
                incoming = event.encoded_dataset(include_meta=True)
            except Exception as error:  # what pynetdicom cannot even frame as a data set
                log.warning("C-STORE: data set cannot be encoded (%s)", type(error).__name__)
                return CANNOT_UNDERSTAND
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip() or None
        peer = str(requestor.address) if requestor.address else None
        future: concurrent.futures.Future[tuple[int, str | None]] = asyncio.run_coroutine_threadsafe(
            self.receive(incoming, calling, peer), self.loop
        )
        try:
            status, reason = future.result(timeout=HANDOFF_TIMEOUT_S)
        except Exception as error:  # the loop is busy or shutting down: the sender keeps it and retries
            future.cancel()
            log.warning("C-STORE: the node could not take the instance now (%s)", type(error).__name__)
            return OUT_OF_RESOURCES
        if reason is None:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = reason[:ERROR_COMMENT_CHARS]
        return answer


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, carrying the node's receive gate to each association's handler, and turning
    away a connection from a peer address that already has `max_associations_per_peer` open (before a byte of
    it is read); with a TLS context, connections are wrapped here and their handshake is left to the
    association's thread."""

    receive_gate: ReceiveGate
    tls_context: ssl.SSLContext | None
    on_tls_refused: Callable[[], None]
    config: NodeConfig
    peers: weakref.WeakKeyDictionary[Any, str]  # open connections -> peer address
    peers_lock: threading.Lock

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.tls_context is not None:
            client = self.tls_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        with self.peers_lock:
            open_from_peer = sum(1 for sock, peer in list(self.peers.items()) if peer == host and sock.fileno() >= 0)
            if open_from_peer >= self.config.max_associations_per_peer:
                log.warning(
                    "DICOM connection from %s closed at once: %d associations from that address are open, the most "
                    "one peer may have (BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER)",
                    printable(host, 64),
                    open_from_peer,
                )
                return False  # socketserver closes it
            self.peers[request] = host
        return True


class _WaitingMessageQueue(queue.Queue[Any]):
    """An acceptor's DIMSE message queue whose non-blocking get waits up to ACCEPTOR_IDLE_WAIT_S for a message.

    pynetdicom's reactor asks it for a message without blocking, once per loop; waiting here turns a thousand
    idle loops a second into a hundred, and a message (or the None pynetdicom queues on an abort) still wakes
    the reactor at once. A release the peer requests is seen at most that much later."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(True, ACCEPTOR_IDLE_WAIT_S) if not block else super().get(block, timeout)


class _BoundedHandler(RequestHandler):
    """pynetdicom's request handler, with TCP_NODELAY, calmer idle polling (DUL and reactor), bounded PDU reads
    and bounded receiving under each association, after its TLS handshake (if any) succeeded in time."""

    def handle(self) -> None:
        server = cast(_GatedServer, self.server)
        if isinstance(self.request, ssl.SSLSocket) and not _handshake(self.request, self.client_address):
            server.on_tls_refused()
            server.shutdown_request(self.request)
            return
        super().handle()

    def _create_association(self) -> Association:
        no_delay(self.request)  # dicom_node.tcp: answers go out at once
        server = cast(_GatedServer, self.server)
        assoc = super()._create_association()
        assoc.dul._run_loop_delay = DUL_IDLE_POLL_S  # pynetdicom's documented knob for idle polling
        assoc.dimse.msg_queue = _WaitingMessageQueue()  # before the association's thread starts: nothing queued yet
        gate = server.receive_gate
        bound(
            assoc.dul,
            max_pdata_bytes=MAX_PDU_BYTES,
            allowed_aes=server.config.allowed_aes,
            budget=gate,
        )
        bound_receiving(assoc.dimse, gate)
        return assoc


def _handshake(connection: ssl.SSLSocket, peer: Any) -> bool:
    """The server side of a TLS handshake, within TLS_HANDSHAKE_TIMEOUT_S in all (CPython's do_handshake holds a
    socket's time-out as one deadline for the whole handshake, so trickling bytes does not extend it); False
    (logged) when it failed."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    blocking = connection.gettimeout()
    try:
        connection.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        connection.do_handshake()
        connection.settimeout(blocking)
    except (OSError, ssl.SSLError) as error:  # a plain-TCP sender, an untrusted certificate, a silent client
        reason = getattr(error, "reason", None) or type(error).__name__
        log.warning("DICOM TLS: handshake with %s failed (%s); connection closed", host, reason)
        return False
    return True
