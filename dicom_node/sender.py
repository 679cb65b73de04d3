"""The delivery loop: takes what is due from the outbox, sends it, and records each attempt.

Results are sent in batches of up to BATCH objects, each batch one association or one STOW-RS request, up
to `parallel` batches at once: a C-STORE waits for its answer, so a PACS that answers slowly (Orthanc as
packaged: about 50 ms an object) is fed over several associations rather than one. A batch that fails for a
reason that may pass (destination down, out of resources) is retried with back-off (`retry_initial_s`
doubling to `retry_max_s`); a permanent refusal of a batch is retried one object at a time, so one bad
object cannot hold back the others, and an object refused on its own is given up (kept in the outbox and
the audit with the reason). A database outage only delays the loop. Each attempt goes to the audit log.
`wake()` starts a round at once (new results); otherwise the loop looks every `poll_s`.

Results go only to a destination configured now; the outbox's address is never parsed and contacted. An entry
pending for a destination no longer configured (the setting was corrected, and the service restarted, while
results waited) is re-addressed to the current destination, the first of `destinations`, in the outbox, the
log and the audit (`readdressed`, from and to), then sent there. Why not hold it: the node has one
destination, where the operator says all its results go now; an operator who fixes a typo expects the waiting
results at the corrected address, and nothing would ever release held ones. The old address, perhaps a
stranger's host, never receives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from dicom_node.audit import AuditLog
from dicom_node.delivery import DeliveryError, deliver
from dicom_node.destination import Destination
from dicom_node.events import NodeEvents
from dicom_node.outbox import Claimed, Outbox
from inference.backoff import retry_delay_s

log = logging.getLogger(__name__)

BATCH = 16
PARALLEL = 4  # batches (associations, STOW-RS requests) in flight at once, all destinations together
POLL_S = 1.0


class DeliveryLoop:
    def __init__(
        self,
        outbox: Outbox,
        audit: AuditLog,
        destinations: Sequence[Destination],
        *,
        calling_ae: str,
        timeout_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        poll_s: float = POLL_S,
        parallel: int = PARALLEL,
        events: NodeEvents | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if not destinations:
            raise ValueError("a delivery loop needs a destination, got none")
        self.outbox = outbox
        self.audit = audit
        # the outbox names a destination by `describe()` (no credentials); the configured ones are known by it
        self.destinations = {d.describe(): d for d in destinations}
        self.current = destinations[0].describe()  # where entries for a destination no longer configured go
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.parallel = parallel
        self.lease_s = max(60.0, 4 * timeout_s)
        self.events = events or NodeEvents()
        self.tls = tls  # C-STORE deliveries over TLS (dicom_node.tls)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()  # set when a round found nothing due (tests and shutdown wait on it)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dicom-delivery")

    def wake(self) -> None:
        self.idle.clear()
        self._wake.set()

    async def stop(self) -> None:
        """Stop after the attempt in progress; what is not delivered stays in the outbox for the next start."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.round()
            except Exception as error:  # the store is down (it backs off itself) or something unexpected
                log.warning("DICOM delivery round failed (%s: %s); retrying", type(error).__name__, error)
                sent = 0
            if sent == 0:
                self.idle.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
                self._wake.clear()

    async def round(self) -> int:
        """One round: claim what is due and try it; returns how many entries were tried."""
        now = datetime.now(UTC)
        claimed = await self.outbox.claim(BATCH * self.parallel, now, self.lease_s)
        tried = len(claimed)
        claimed = await self._configured(claimed)
        by_destination: dict[str, list[Claimed]] = defaultdict(list)
        for entry in claimed:
            by_destination[entry.destination].append(entry)
        batches = [
            (destination, entries[start : start + BATCH])
            for destination, entries in by_destination.items()
            for start in range(0, len(entries), BATCH)
        ]
        slots = asyncio.Semaphore(self.parallel)

        async def send(destination: str, entries: Sequence[Claimed]) -> None:
            async with slots:
                await self._send(destination, entries, one_by_one_on_refusal=True)

        await asyncio.gather(*(send(destination, entries) for destination, entries in batches))
        return tried

    async def _configured(self, claimed: Sequence[Claimed]) -> list[Claimed]:
        """The claimed entries, each addressed to a destination configured now: those for another (an old
        setting) are re-addressed to the current one, or given up where the object is already held for it."""
        stale = [e for e in claimed if e.destination not in self.destinations]
        if not stale:
            return list(claimed)
        moved = set(await self.outbox.readdress([e.id for e in stale], self.current))
        by_old: dict[str, list[Claimed]] = defaultdict(list)
        for entry in stale:
            by_old[entry.destination].append(entry)
        for old, entries in by_old.items():
            kept = [e for e in entries if e.id in moved]
            log.warning(
                "DICOM delivery: %d object(s) waiting for %s, which is no longer configured, go to %s instead%s",
                len(entries),
                old,
                self.current,
                f" ({len(entries) - len(kept)} already held for it)" if len(kept) < len(entries) else "",
            )
            self.events.delivery("readdressed", len(kept))
            self.audit.write(
                "readdressed",
                study_ref=sorted({e.study_ref for e in entries}),
                previous_destination=old,
                destination=self.current,
                sop_instance_uids=[e.sop_instance_uid for e in kept],
                already_held=[e.sop_instance_uid for e in entries if e.id not in moved],
                reason="its destination is no longer configured: never sent there",
            )
        return [
            e if e.destination in self.destinations else replace(e, destination=self.current, attempts=0)
            for e in claimed
            if e.destination in self.destinations or e.id in moved
        ]

    async def _send(self, destination: str, entries: Sequence[Claimed], *, one_by_one_on_refusal: bool) -> None:
        uids = [e.sop_instance_uid for e in entries]
        target = self.destinations[destination]  # `_configured`: only a destination configured now
        try:
            delivered = await asyncio.to_thread(
                deliver,
                target,
                [e.payload for e in entries],
                calling_ae=self.calling_ae,
                timeout_s=self.timeout_s,
                tls=self.tls,
            )
        except DeliveryError as error:
            if not error.retriable and one_by_one_on_refusal and len(entries) > 1:
                for entry in entries:
                    await self._send(destination, [entry], one_by_one_on_refusal=False)
                return
            attempts = max(e.attempts for e in entries) + 1
            retry_at = None
            if error.retriable:
                delay = retry_delay_s(attempts, self.retry_initial_s, self.retry_max_s)
                retry_at = datetime.now(UTC) + timedelta(seconds=delay)
            await self.outbox.failed([e.id for e in entries], error.reason, retry_at)
            self._audit(entries, destination, "retry" if error.retriable else "refused", error.reason, attempts)
            log.warning(
                "DICOM delivery of %d object(s) to %s failed (%s)%s",
                len(entries),
                destination,
                error.reason,
                f"; retrying at {retry_at:%H:%M:%S}" if retry_at else "; given up",
            )
            return
        statuses = ",".join(sorted({_status(d.status, target.kind) for d in delivered}))
        await self.outbox.delivered([e.id for e in entries], f"delivered ({statuses})", datetime.now(UTC))
        self._audit(entries, destination, "delivered", statuses, max(e.attempts for e in entries) + 1)
        log.info("DICOM delivery: %d object(s) to %s", len(uids), destination)

    def _audit(self, entries: Sequence[Claimed], destination: str, outcome: str, status: str, attempt: int) -> None:
        self.events.delivery(outcome, len(entries))
        self.audit.write(
            "delivery",
            study_ref=sorted({e.study_ref for e in entries}),
            destination=destination,
            sop_instance_uids=[e.sop_instance_uid for e in entries],
            outcome=outcome,
            status=status,
            attempt=attempt,
        )


def _status(status: int | None, kind: str) -> str:
    """A DIMSE status in hex, an HTTP status (STOW-RS) as a number."""
    if status is None:
        return "ok"
    return f"{status:#06x}" if kind == "dimse" else f"HTTP {status}"
