"""Reading PDUs from a DICOM peer, bounded where the bytes are allocated and in time.

pynetdicom reads a PDU's 6-byte header and then its body, sized by the header's length field and read in one
blocking call: one connection that sent a header claiming 2 GiB (no association, no AE title) took the service
4 GB, and one that sent a header and then nothing held an association slot for ever (accepted sockets have no
time-out). `BoundedDUL` replaces that read for the node's associations:
- **Length.** A PDU's length is checked before a byte of its body is read: a P-DATA-TF at most the maximum
  PDU the node asked its peers to use, an A-ASSOCIATE-RQ at most `MAX_ASSOCIATE_RQ_BYTES`, release and abort
  PDUs their fixed few bytes. Past it, or for a PDU type that does not exist, the association is aborted
  (A-ABORT, invalid PDU parameter) and the connection closed.
- **Memory.** The body is read in chunks into storage that grows as bytes arrive, never sized from the
  header; a P-DATA-TF's bytes are charged to the receive gate (the held-bytes budget) as they arrive and until
  its data is in the instance's buffer (which is charged for it in turn). Its PDVs are views of the body, not
  copies. So an association holds at most one PDU beyond its instance: 16 x 4 MiB for the node.
- **Time.** Once a PDU has begun, each read must bring a byte within `IDLE_S` and the whole PDU must arrive
  within `PDU_BASE_S` plus its length at `MIN_BYTES_PER_S`: a peer that stops mid-PDU is cut off in seconds.
- **Association.** An A-ASSOCIATE-RQ's calling AE title (at a fixed offset) is checked against the allowed
  titles, and its presentation contexts counted (at most 128, PS3.8 9.3.2.2), before pynetdicom decodes it:
  100,000 contexts cost 11 s of CPU before a rejection for the calling AE. A title that is not allowed gets
  the standard A-ASSOCIATE-RJ (calling AE title not recognised).
Each association refused here is one log line, its peer's text escaped (`dicom_node.peer_text`).
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from dicom_node.peer_text import printable

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ"}
PDU_NAMES |= {6: "A-RELEASE-RP", 7: "A-ABORT"}
# An A-ASSOCIATE-RQ with 128 presentation contexts of 10 transfer syntaxes each, and a user identity of 64 KiB
# (a SAML assertion or a JWT), is under 200 KiB.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
FIXED_PDU_BYTES = 1024  # release and abort PDUs hold 4 bytes; an A-ASSOCIATE-RJ too (an AC is bounded as an RQ)
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1..255
ASSOCIATE_RQ_FIXED_BYTES = 68  # protocol version, reserved, called and calling AE titles, 32 reserved bytes
PRESENTATION_CONTEXT_ITEM = 0x20
READ_CHUNK_BYTES = 1024 * 1024
IDLE_S = 10.0  # a PDU begun must keep coming: no byte for this long and the peer is cut off
PDU_BASE_S = 10.0
MIN_BYTES_PER_S = 20_000  # the HTTP door's slowest upload (BFD_UPLOAD_MIN_BYTES_PER_S's default)
# A-ABORT from the service provider (source 2) and A-ASSOCIATE-RJ (PS3.8 9.3.4, 9.3.8)
UNRECOGNISED_PDU, INVALID_PDU_PARAMETER = 1, 6
CALLING_AE_NOT_RECOGNISED = bytes([1, 1, 3])  # rejected permanent, service user, calling AE not recognised


class PduError(ValueError):
    """A PDU the node does not take; the reason says what it was and what is allowed."""

    def __init__(self, reason: str, abort_reason: int = INVALID_PDU_PARAMETER) -> None:
        super().__init__(reason)
        self.abort_reason = abort_reason


class PduCharge(Protocol):
    """What a PDU being read costs the receive budget (`dicom_node.receiving.ReceiveGate`): `charge` without
    waiting (the instance buffers wait and refuse; a PDU of an association already bounded must not stall it),
    `release` what was charged."""

    def charge(self, count: int) -> None: ...

    def release(self, count: int) -> None: ...


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DICOM upper layer with the bounded PDU read; installed on an acceptor's DUL by `bound`."""

    max_pdata_bytes: int
    allowed_aes: frozenset[str]
    budget: PduCharge
    charged: int  # bytes of the last P-DATA-TF still charged (released once its data reached the buffer)
    dropped: bool
    requested: bool  # an A-ASSOCIATE-RQ went to pynetdicom (before it, the acceptor waits for one)

    def _is_transport_event(self) -> bool:
        if self.dropped:  # cut off: nothing more is read from this peer
            return False
        return bool(super()._is_transport_event())

    def release_charge(self) -> None:
        """The last P-DATA-TF's data is in the instance's buffer (or the connection ended): its charge goes."""
        charged, self.charged = self.charged, 0
        if charged:
            self.budget.release(charged)

    def _read_pdu_data(self) -> None:
        self.release_charge()
        if self.dropped or self.socket is None or self.socket.socket is None:
            return
        sock = self.socket.socket
        try:
            header = _read(sock, 6, time.monotonic() + IDLE_S, None)
            if len(header) < 6:
                self.event_queue.put("Evt17")  # closed by the peer
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            _check_length(pdu_type, length, self.max_pdata_bytes)
            deadline = time.monotonic() + PDU_BASE_S + length / MIN_BYTES_PER_S
            body = _read(sock, length, deadline, self._charge if pdu_type == P_DATA else None)
            if len(body) < length:  # closed by the peer mid-PDU
                self.release_charge()
                self.event_queue.put("Evt17")
                return
            if pdu_type == A_ASSOCIATE_RQ and (refusal := self._association_refusal(body)) is not None:
                self._reject(sock, refusal)
                return
            self.requested = self.requested or pdu_type == A_ASSOCIATE_RQ
            if pdu_type == P_DATA:
                pdu: Any = p_data_tf(body)
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
        except PduError as error:
            self._abort(sock, str(error), error.abort_reason)
            return
        except (OSError, TimeoutError) as error:
            self._abort(sock, f"the connection failed mid-PDU ({type(error).__name__}: {error})", None)
            return
        except Exception as error:  # what pynetdicom cannot decode
            self._abort(sock, f"a malformed PDU ({type(error).__name__}: {error})", INVALID_PDU_PARAMETER)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def abort_association(self, reason: str) -> None:
        """Abort the association from within (the DIMSE layer found its data unacceptable)."""
        if self.socket is not None and self.socket.socket is not None and not self.dropped:
            self._abort(self.socket.socket, reason, INVALID_PDU_PARAMETER)

    def _charge(self, count: int) -> None:
        self.budget.charge(count)
        self.charged += count

    def _association_refusal(self, body: bytes | bytearray) -> str | None:
        """Why an A-ASSOCIATE-RQ is rejected as not allowed, from its fixed fields alone; None when it may be
        decoded. PduError when it is malformed or proposes more than 128 presentation contexts."""
        if len(body) < ASSOCIATE_RQ_FIXED_BYTES:
            raise PduError(f"an A-ASSOCIATE-RQ of {len(body)} bytes; its fixed fields alone take 68")
        contexts = _count_items(body, ASSOCIATE_RQ_FIXED_BYTES, PRESENTATION_CONTEXT_ITEM)
        if contexts > MAX_PRESENTATION_CONTEXTS:
            raise PduError(f"an A-ASSOCIATE-RQ proposing {contexts} presentation contexts; at most 128")
        calling = bytes(body[20:36]).decode("ascii", "replace").strip()
        if self.allowed_aes and calling not in self.allowed_aes:
            return f"calling AE title '{printable(calling, 64)}' is not allowed"
        return None

    def _reject(self, sock: socket.socket, reason: str) -> None:
        """The standard A-ASSOCIATE-RJ (calling AE title not recognised), then the connection closed."""
        self._cut(sock, b"\x03\x00\x00\x00\x00\x04\x00" + CALLING_AE_NOT_RECOGNISED, f"rejected: {reason}")

    def _abort(self, sock: socket.socket, reason: str, abort_reason: int | None) -> None:
        """An A-ABORT (service provider) when the peer may still read it, then the connection closed."""
        pdu = b"" if abort_reason is None else b"\x07\x00\x00\x00\x00\x04\x00\x00\x02" + bytes([abort_reason])
        self._cut(sock, pdu, f"aborted: {reason}")

    def _cut(self, sock: socket.socket, last_words: bytes, what: str) -> None:
        self.dropped = True
        self.release_charge()
        peer = getattr(self.assoc.requestor, "address", None) or "?"
        log.warning("DICOM association from %s %s", printable(str(peer), 64), printable(what))
        try:
            sock.settimeout(1.0)
            if last_words:
                sock.sendall(last_words)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.event_queue.put("Evt17")  # the state machine closes the socket and tells the association
        if not self.requested:
            # The acceptor waiting for an A-ASSOCIATE-RQ ends now, not in 30 s: pynetdicom reads None as "nothing
            # came" (its queue's type names only PDUs, hence the cast).
            cast("queue.Queue[Any]", self.to_user_queue).put(None)


def bound(dul: DULServiceProvider, *, max_pdata_bytes: int, allowed_aes: tuple[str, ...], budget: PduCharge) -> None:
    """Give an association's DUL (before its thread starts) the bounded read."""
    dul.__class__ = BoundedDUL
    bounded: BoundedDUL = dul  # type: ignore[assignment]
    bounded.max_pdata_bytes = max_pdata_bytes
    bounded.allowed_aes = frozenset(ae.strip() for ae in allowed_aes)
    bounded.budget = budget
    bounded.charged = 0
    bounded.dropped = False
    bounded.requested = False


def _check_length(pdu_type: int, length: int, max_pdata_bytes: int) -> None:
    limits = {A_ASSOCIATE_RQ: MAX_ASSOCIATE_RQ_BYTES, A_ASSOCIATE_AC: MAX_ASSOCIATE_RQ_BYTES, P_DATA: max_pdata_bytes}
    if pdu_type not in PDU_NAMES:
        raise PduError(f"PDU type {pdu_type:#04x} does not exist", UNRECOGNISED_PDU)
    limit = limits.get(pdu_type, FIXED_PDU_BYTES)
    if length > limit:
        raise PduError(f"a {PDU_NAMES[pdu_type]} PDU of {length:,} bytes; at most {limit:,} are taken")


def _read(sock: socket.socket, length: int, deadline: float, charge: Callable[[int], None] | None) -> bytearray:
    """Up to `length` bytes, in chunks, each charged before it is read; fewer only if the peer closed.
    PduError past the deadline or when no byte came for IDLE_S."""
    data = bytearray()
    while len(data) < length:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PduError(
                f"a PDU too slow: {len(data):,} of {length:,} bytes within its time limit", INVALID_PDU_PARAMETER
            )
        wanted = min(length - len(data), READ_CHUNK_BYTES)
        if charge is not None:
            charge(wanted)  # charged whole: what a short read leaves over stays charged until the PDU is done
        sock.settimeout(min(IDLE_S, left))
        try:
            chunk = sock.recv(wanted)
        except TimeoutError:
            raise PduError(
                f"a PDU stalled: {len(data):,} of {length:,} bytes, then nothing for {min(IDLE_S, left):.0f} s"
            ) from None
        if not chunk:
            break
        data += chunk
    return data


def _count_items(body: bytes | bytearray, offset: int, item_type: int) -> int:
    """How many items of `item_type` the variable field from `offset` holds (PduError when they overrun it)."""
    count = 0
    while offset < len(body):
        if offset + 4 > len(body):
            raise PduError("an A-ASSOCIATE-RQ whose last item is cut short")
        kind, (item_length,) = body[offset], struct.unpack_from(">H", body, offset + 2)
        offset += 4 + item_length
        if offset > len(body):
            raise PduError("an A-ASSOCIATE-RQ whose items overrun it")
        count += kind == item_type
    return count


def p_data_tf(body: bytearray) -> P_DATA_TF:
    """A P-DATA-TF PDU from its body (after the 6-byte header), its PDV values views of `body`, not copies."""
    view = memoryview(body)
    pdu = P_DATA_TF()
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise PduError("a P-DATA-TF whose last PDV item is cut short")
        (item_length,) = struct.unpack_from(">I", view, offset)
        if item_length < 2 or offset + 4 + item_length > len(view):
            raise PduError(f"a P-DATA-TF with a PDV item of {item_length:,} bytes where {len(view) - offset - 4:,} are")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5 : offset + 4 + item_length]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset += 4 + item_length
    return pdu
