"""Room for one more instance at the node, in one place for both doors and the spool's recovery.

An instance is taken when the core's admission can take an image in time, the memory held for unanswered
studies (with what is being written to the spool) can take its bytes, and, with a spool, so can the spool's
disk budget. While it arrives over DIMSE, its bytes already count against the same memory budget through the
`gate` (`dicom_node.receiving`), and an instance larger than the limit is refused whatever the room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dicom_node.config import NodeConfig
from dicom_node.receiving import ReceiveGate
from dicom_node.spool import Spool
from dicom_node.studies import StudyCollector
from inference.batching import BatcherClosedError, QueueFullError
from inference.predictor import Predictor

WAIT_S = 5.0  # how long an instance's answer may wait for room before 0xA700
# How long a fragment still arriving may wait for memory. Both waits together stay under 10 s, the time Orthanc
# (DicomScuTimeout) and other senders give an answer by default before they drop the association.
ARRIVING_WAIT_S = 2.0
POLL_S = 0.05


class Room:
    def __init__(
        self, predictor: Predictor, collector: StudyCollector, spool: Spool | None, config: NodeConfig
    ) -> None:
        self.predictor = predictor
        self.collector = collector
        self.spool = spool
        self.held_bytes_budget = config.held_bytes_budget
        self.spool_bytes_budget = config.spool_bytes_budget
        self._spooling_bytes = 0  # instances being written to the spool: room taken, not yet in the collector
        self.gate = ReceiveGate(
            max_instance_bytes=config.max_instance_bytes,
            budget=config.held_bytes_budget,
            held=lambda: collector.held_bytes + self._spooling_bytes,
            wait_s=ARRIVING_WAIT_S,
        )

    def too_large(self, size: int) -> str | None:
        """Why an instance of `size` bytes is never taken; None when its size is fine."""
        return self.gate.too_large(size)

    async def wait(self, size: int, study_uid: str, stopping: Callable[[], bool]) -> str | None:
        """None once there is room for `size` bytes; else, after waiting up to WAIT_S, why not.

        The wait is back-pressure: the sender has already sent the instance's bytes, so holding the answer a
        little costs less than refusing it and receiving it all again. Meanwhile its study is kept open (the
        quiet time runs from the end of the wait), so it is not answered in two parts."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + WAIT_S
        while self.lacking(size, count=False) is not None:
            if stopping() or loop.time() >= give_up_at:
                return self.lacking(size, count=True)
            self.collector.touch(study_uid)
            await asyncio.sleep(POLL_S)
        return None

    async def wait_without_limit(self, size: int, study_uid: str) -> None:
        """Until there is room in the core and in memory for an instance already on disk (taken back after a
        restart: its sender was told 'stored' long ago, so it is never refused). One larger than the memory
        budget gets in once nothing else is held."""
        size = min(size, self.held_bytes_budget)
        while self.lacking(size, count=False, spooled=False) is not None:
            self.collector.touch(study_uid)
            await asyncio.sleep(POLL_S)

    def lacking(self, size: int, *, count: bool, spooled: bool = True) -> str | None:
        """What there is no room for now, for `size` more bytes (`count`: a refusal the core's metrics count)."""
        try:
            if count:
                self.predictor.check_capacity(1)
            else:
                self.predictor.batcher.check(1)
        except (QueueFullError, BatcherClosedError) as error:
            return str(error)
        if not self.collector.can_hold(size + self._spooling_bytes):
            return f"held instances at the node's budget ({self.held_bytes_budget} bytes); retry later"
        if not spooled or self.spool is None:
            return None  # already on disk (taken back after a restart), or no spool: memory and the core only
        if self.spool.bytes_kept + self._spooling_bytes + size > self.spool_bytes_budget:
            return f"the spool at the node's disk budget ({self.spool_bytes_budget} bytes); retry later"
        return None

    @contextmanager
    def spooling(self, size: int) -> Iterator[None]:
        """`size` bytes being written to the spool: they hold room in memory and on disk until it is done."""
        self._spooling_bytes += size
        try:
            yield
        finally:
            self._spooling_bytes -= size
