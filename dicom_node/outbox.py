"""The outbox's contract: every result object waits in persistent storage until its destination confirms it.

The node puts result objects in, the delivery loop claims what is due, and marks each claim delivered or
failed (with the next attempt's time). The storage (the results store's database, `service.outbox`) is the
door's to provide; the node only needs this protocol. A claim is a lease: a replica that dies while sending
gives its claims back when the lease runs out, and a re-send reuses the object's bytes, hence its SOP
Instance UID, so a destination that got it twice keeps one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class ResultObject:
    """One DICOM result object to deliver."""

    sop_class_uid: str
    sop_instance_uid: str
    payload: bytes  # the Part 10 file


@dataclass(frozen=True)
class Claimed:
    """An outbox entry being sent by this replica until `delivered` or `failed` is called (or its lease ends)."""

    id: int
    destination: str
    study_ref: str
    sop_instance_uid: str
    payload: bytes
    attempts: int  # attempts made before this one


class Outbox(Protocol):
    async def put(self, study_ref: str, destination: str, objects: Sequence[ResultObject]) -> None:
        """Keep `objects` until delivered; an object already held for that destination is kept once."""

    async def claim(self, limit: int, now: datetime, lease_s: float) -> list[Claimed]:
        """Up to `limit` entries due at `now`, oldest first, leased to the caller for `lease_s`."""

    async def delivered(self, ids: Sequence[int], status: str, now: datetime) -> None:
        """Confirmed by the destination: the payload (it carries patient data) is dropped, the row stays."""

    async def readdress(self, ids: Sequence[int], destination: str) -> list[int]:
        """Move claimed entries to `destination` (the one configured now), still claimed, attempts from 0; the
        ids moved. One whose object is already held for `destination` is not moved: it is given up, its payload
        dropped (the one held there goes instead)."""

    async def failed(self, ids: Sequence[int], status: str, retry_at: datetime | None) -> None:
        """Not delivered: tried again at `retry_at`, or never (None: a permanent refusal, kept for the audit)."""

    async def pending(self) -> int:
        """Entries not yet delivered nor given up."""
