"""A DICOM destination the failover run controls: a pynetdicom storage SCP that records every object it receives.

Two modes. `hold()`: a C-STORE is taken in and then not answered (the handler waits), so the sender's delivery
stays in flight and its outbox lease stays taken, as with a PACS that hangs; released by `accept()`, each held
object is answered 'out of resources' (0xA700) and recorded as never acknowledged. `accept()`: every object is
stored (0x0000) and recorded as acknowledged. Exactly once means every expected SOP Instance UID acknowledged
once, whoever sent it (`Receipt.calling_ae` says who).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class Receipt:
    sop_instance_uid: str
    calling_ae: str
    wall_s: float  # time.time() when it was answered (or released unanswered)
    acknowledged: bool


class RecordingDestination:
    """A storage SCP on 127.0.0.1 (`address`: AETITLE@host:port, the node's BFD_DICOM_DESTINATION)."""

    def __init__(self, ae_title: str = "FAILOVERDEST", *, max_hold_s: float = 600.0) -> None:
        self.ae_title = ae_title
        self.max_hold_s = max_hold_s
        self.receipts: list[Receipt] = []
        self.holding: list[tuple[str, str]] = []  # (SOP Instance UID, calling AE) of C-STOREs held now
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()  # accepting
        self._ae = AE(ae_title=ae_title)
        self._ae.supported_contexts = AllStoragePresentationContexts
        server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False: pynetdicom returns the running server
        self._server = server
        self.port = int(server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._released.clear()

    def accept(self) -> None:
        self._released.set()

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        calling = str(event.assoc.requestor.ae_title).strip()
        if not self._released.is_set():
            with self._lock:
                self.holding.append((uid, calling))
            self._released.wait(self.max_hold_s)
            with self._lock:
                self.holding.remove((uid, calling))
                self.receipts.append(Receipt(uid, calling, time.time(), acknowledged=False))
            return OUT_OF_RESOURCES
        with self._lock:
            self.receipts.append(Receipt(uid, calling, time.time(), acknowledged=True))
        return SUCCESS

    def acknowledged(self) -> Counter[str]:
        """How many times each SOP Instance UID was stored (answered 0x0000)."""
        with self._lock:
            return Counter(r.sop_instance_uid for r in self.receipts if r.acknowledged)

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
