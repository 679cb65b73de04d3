"""Bounded receiving: what a C-STORE may put in memory while its data set is still arriving.

pynetdicom gathers a data set's fragments in a BytesIO until the last one, with no limit, and only then calls
the node: a PACS whose routing rule sends a CT series, a tomosynthesis or a multi-gigabyte multi-frame to the
node (or a sender that never stops) would grow the service until the kernel kills it, HTTP included. Here each
data set is gathered in a `ReceiveBuffer`, which at every fragment asks the node's `ReceiveGate`:
- an instance of a SOP class the node does not analyse (from the C-STORE request's command, which comes first)
  is not kept at all: its fragments are read and dropped, and it is answered 0x0122 as before; the SOP classes
  of the node's own result objects (SR, GSPS, Secondary Capture) are kept under the same limits, so that their
  header can tell one of its own results sent back (`dicom_node.scope.own_result`) from another's;
- one larger than `max_instance_bytes` (or the budget) stops being kept once it passes it (0xA700, with the limit);
- the bytes being received by every association, plus what the node holds for unanswered studies, stay within
  the held-bytes budget. A fragment that does not fit waits up to `wait_s` (the association's reader stops
  reading, so TCP slows the sender down), then the instance stops being kept (0xA700: retry later).
An instance that stopped being kept is read to its end and dropped, so the association stays usable and the
sender gets a status. The bytes a buffer reserved go back once the node has its answer, or when the
association ends mid-instance (or, as a last resort, when the buffer is collected).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from dicom_node.scope import OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, sop_class_refusal
from inference.decode_plan import format_bytes

POLL_S = 0.05
# A C-STORE request's command set is about 200 bytes; pynetdicom would gather command fragments without end.
MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True)
class Withheld:
    """An instance the SCP did not keep while receiving it: its UIDs (from the command) and why."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str


class ReceiveGate:
    """The node's rules for bytes in memory while instances arrive (shared by every association; thread-safe).

    `held` reads what the node holds for unanswered studies (an int read from another thread: a snapshot)."""

    def __init__(self, *, max_instance_bytes: int, budget: int, held: Callable[[], int], wait_s: float) -> None:
        if max_instance_bytes < 1 or budget < 1:
            raise ValueError(f"max_instance_bytes and budget must be >= 1, got {max_instance_bytes} and {budget}")
        self.max_instance_bytes = min(max_instance_bytes, budget)  # a larger one could never be held
        self.budget = budget
        self.wait_s = wait_s
        self._held = held
        self._receiving = 0
        self._room = threading.Condition()

    @property
    def receiving_bytes(self) -> int:
        """Bytes of data sets being received (or just received and not yet taken by the node)."""
        return self._receiving

    def too_large(self, size: int) -> str | None:
        """Why an instance of `size` bytes is not taken (at either door); None when its size is fine."""
        if size <= self.max_instance_bytes:
            return None
        return (
            f"instance of {format_bytes(size)} or more is over this node's limit of "
            f"{format_bytes(self.max_instance_bytes)}"
        )

    def reserve(self, count: int) -> bool:
        """Room for `count` more bytes being received, waiting up to `wait_s` for it; False: none came."""
        deadline: float | None = None
        with self._room:
            while self._receiving + self._held() + count > self.budget:
                now = time.monotonic()
                deadline = now + self.wait_s if deadline is None else deadline
                if now >= deadline:
                    return False
                self._room.wait(min(POLL_S, deadline - now))  # held bytes go down without telling us: look again
            self._receiving += count
            return True

    def charge(self, count: int) -> None:
        """Count `count` bytes now, room or not: a PDU being read (`dicom_node.pdu_reading`), which an association
        already bounded must not stall on; the instance buffers then wait for room, and refuse, as it fills."""
        with self._room:
            self._receiving += count

    def release(self, count: int) -> None:
        if count:
            with self._room:
                self._receiving -= count
                self._room.notify_all()


class _Reservation:
    """The bytes one buffer holds in the gate; given back once (explicitly, or when the buffer is collected)."""

    def __init__(self, gate: ReceiveGate) -> None:
        self.gate = gate
        self.count = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.count += count

    def give_back(self) -> None:
        with self._lock:
            count, self.count = self.count, 0
        self.gate.release(count)


class ReceiveBuffer(BytesIO):
    """A DIMSE message's data set, gathered under the gate's rules; `withheld` says why it was not kept.

    pynetdicom writes each data fragment here (on the association's reader thread) after the command set has
    been decoded, so the first write can see the C-STORE request's SOP class, and the transfer syntax of its
    presentation context: the Part 10 preamble and file meta go in first, so that `part10()` is the instance
    as one buffer, without the copy pynetdicom's `encoded_dataset` makes (a second 100 MB for 100 MB)."""

    def __init__(self, message: Any, gate: ReceiveGate, assoc: Any = None) -> None:
        super().__init__()
        self._message = message
        self._gate = gate
        self._assoc = assoc
        self._reservation = _Reservation(gate)
        weakref.finalize(self, self._reservation.give_back)
        self._seen = 0
        self._prefixed = False
        self.withheld: Withheld | None = None

    def part10(self) -> bytes | None:
        """The whole instance as a Part 10 file (the buffer itself, not a copy); None when it was withheld or its
        file meta could not be written first."""
        return self.getvalue() if self._prefixed and self.withheld is None else None

    def write(self, data: Any) -> int:
        count = len(data)
        prefix = b""
        if self._seen == 0 and self.withheld is None:
            self._check_class()
            if self.withheld is None:
                prefix = self._prefix()
        self._seen += count
        if self.withheld is not None:
            return count  # read and dropped
        if (reason := self._gate.too_large(self._seen)) is not None:
            self._withhold(OUT_OF_RESOURCES, reason)
            return count
        if not self._gate.reserve(count + len(prefix)):
            self._withhold(
                OUT_OF_RESOURCES,
                f"held and arriving instances at budget ({format_bytes(self._gate.budget)}); retry later",
            )
            return count
        self._reservation.add(count + len(prefix))
        if prefix:
            super().write(prefix)
            self._prefixed = True
        super().write(data)
        return count

    def release(self) -> None:
        """The node has answered this instance (or the association ended): its reserved bytes go back."""
        self._reservation.give_back()

    def _prefix(self) -> bytes:
        """The Part 10 preamble and file meta of this C-STORE's data set, as pynetdicom's `encoded_dataset`
        writes them; empty when they cannot be known (then `part10()` is None and pynetdicom's copy is used)."""
        from pynetdicom.dsutils import create_file_meta, encode_file_meta

        try:
            command = self._message.command_set
            context = self._assoc._accepted_cx[self._message.context_id]
            meta = create_file_meta(
                sop_class_uid=command.AffectedSOPClassUID,
                sop_instance_uid=command.AffectedSOPInstanceUID,
                transfer_syntax=context.transfer_syntax[0],
            )
            return b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        except Exception:  # not a C-STORE, or no accepted context
            return b""

    def _check_class(self) -> None:
        from pynetdicom.dimse_messages import C_STORE_RQ

        if not isinstance(self._message, C_STORE_RQ):
            return
        sop_class = str(getattr(self._message.command_set, "AffectedSOPClassUID", "") or "")
        if (reason := sop_class_refusal(sop_class)) is not None:
            self._withhold(SOP_CLASS_NOT_SUPPORTED, reason)

    def _withhold(self, status: int, reason: str) -> None:
        command = getattr(self._message, "command_set", None)
        self.withheld = Withheld(
            str(getattr(command, "AffectedSOPClassUID", "") or ""),
            str(getattr(command, "AffectedSOPInstanceUID", "") or ""),
            status,
            reason,
        )
        self.seek(0)
        self.truncate()  # what was kept of it goes now
        self._prefixed = False
        self.release()


def bound_receiving(dimse: Any, gate: ReceiveGate) -> None:
    """Make an association's DIMSE provider gather every incoming data set in a ReceiveBuffer and refuse a command
    set over MAX_COMMAND_BYTES (pynetdicom gathers either without limit), before its reader thread starts.

    The P-DATA's PDU was charged to the gate while it was read (`dicom_node.pdu_reading`); the charge passes to
    the buffer here: given back just before the buffer takes (and charges) its copy."""
    from pynetdicom.dimse_messages import DIMSEMessage

    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:
            message = DIMSEMessage()
            message.data_set = ReceiveBuffer(message, gate, dimse.assoc)
            dimse.message = message
        release = getattr(dimse.dul, "release_charge", None)
        if release is not None:
            release()
        command = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list if data and data[0] & 1)
        if command and dimse.message.encoded_command_set.tell() + command > MAX_COMMAND_BYTES:
            abort = getattr(dimse.dul, "abort_association", None)
            if abort is not None:
                abort(f"a DIMSE command set over {MAX_COMMAND_BYTES:,} bytes")
                return
        receive(primitive)

    dimse.receive_primitive = receive_primitive


def release_unfinished(dimse: Any) -> None:
    """The association ended: the bytes of a data set it was still receiving go back to the gate."""
    message = getattr(dimse, "message", None)
    buffer = getattr(message, "data_set", None)
    if isinstance(buffer, ReceiveBuffer):
        buffer.release()
