"""Dynamic batching for a synchronous model: bounded admission, one inference thread, a result per caller.

Policy (batch size, wait, admission) lives here and the model in `handler`, a plain list -> list function,
as LitServe keeps its loop apart from the model hooks. The mechanics follow Ray Serve's `batching.py`: a
future per request, cancelled requests dropped before the batch runs, the output length checked, and a
failing batch fails only its own members while the loop lives on.

Admission is by deadline first: an item is admitted only if the work ahead of it (reserved, queued and
running items) at the measured seconds per item (`inference.service_rate`) lets its batch start within
`max_queue_wait_ms`; `max_queue_size` stays as a hard count bound behind it. An idle batcher always admits.

Concurrency: every field is touched only on the event-loop thread, so no lock is needed (a check then a
change with no `await` between is atomic). Only the handler runs elsewhere, in a single-thread executor:
the loop stays free to accept and decode requests, and exactly one batch runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from inference.service_rate import ServiceRate

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
RefusalReason = Literal["deadline", "queue_full"]


class QueueFullError(Exception):
    """Admission refused so the caller can answer 503 at once; `retry_after_s` feeds a Retry-After header.

    `reason` is "deadline" (the expected wait is over max_queue_wait_ms) or "queue_full" (the count bound).
    """

    def __init__(
        self, name: str, reason: RefusalReason, detail: str, retry_after_s: float, expected_wait_s: float | None
    ) -> None:
        self.retry_after_s = max(1.0, retry_after_s)  # Retry-After is in whole seconds; sooner helps nobody
        super().__init__(f"{name}: {detail}; retry in about {math.ceil(self.retry_after_s)} s")
        self.reason: RefusalReason = reason
        self.expected_wait_s = expected_wait_s


class BatcherClosedError(Exception):
    """Raised for new work once stop() has begun, so shutdown never strands a request silently."""


@dataclass(frozen=True)
class BatchStats:
    """One batch's outcome, handed to `on_batch` so metrics stay outside the batcher."""

    size: int  # items actually run (cancelled ones excluded)
    skipped: int  # cancelled items dropped before running
    run_seconds: float  # handler wall time; 0.0 when every item was cancelled and the handler was not called
    queue_depth_after: int


@dataclass(eq=False)
class _Pending(Generic[In, Out]):
    """A queued item and the future its caller awaits, so results go back to exactly that caller."""

    item: In
    future: asyncio.Future[Out]
    enqueued_at: float  # loop.time(): the max_wait timer of a batch starts at its first item's arrival


class Ticket(Generic[In, Out]):
    """A reserved queue slot. Admission happens here, BEFORE the caller decodes its input,
    so refused requests cost nothing."""

    def __init__(self, batcher: DynamicBatcher[In, Out]) -> None:
        self._batcher = batcher
        self._state = "reserved"  # then "submitted" or "released", never back

    async def submit(self, item: In) -> Out:
        """Enqueue `item` and await its own result or exception; once per ticket, so a slot is one item."""
        if self._state != "reserved":
            raise RuntimeError(f"ticket already {self._state}; admit() a new ticket for each item")
        self._state = "submitted"
        future = self._batcher._enqueue(item)
        # Awaited directly, not shielded: if the caller's task is cancelled (client went away), asyncio
        # cancels this future too, and the worker drops the item before the batch runs.
        return await future

    def release(self) -> None:
        """Give the slot back unsubmitted (e.g. decode failed), so a bad request cannot leak capacity."""
        if self._state == "reserved":
            self._state = "released"
            self._batcher._unreserve()

    def __enter__(self) -> Ticket[In, Out]:
        return self

    def __exit__(self, *exc_info: object) -> None:  # a no-op after submit(): the slot is the queued item's
        self.release()


class DynamicBatcher(Generic[In, Out]):
    """Groups concurrent single-item requests into batches for one synchronous handler thread."""

    def __init__(
        self,
        handler: Callable[[list[In]], Sequence[Out | BaseException]],
        *,
        max_batch_size: int,
        max_queue_size: int,
        max_wait_ms: float = 0.0,
        max_queue_wait_ms: float | None = None,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        for setting, value in (("max_batch_size", max_batch_size), ("max_queue_size", max_queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {setting} must be an integer >= 1, got {value!r}")
        if not 0.0 <= max_wait_ms < math.inf:  # also refuses NaN
            raise ValueError(f"{name}: max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        if max_queue_wait_ms is not None and not 0.0 < max_queue_wait_ms < math.inf:
            raise ValueError(
                f"{name}: max_queue_wait_ms must be a finite number > 0 or None, got {max_queue_wait_ms!r}"
            )
        self._handler = handler
        self._max_batch_size = max_batch_size
        self._max_queue_size = max_queue_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_queue_wait_s = None if max_queue_wait_ms is None else max_queue_wait_ms / 1000.0
        self._rate = ServiceRate()
        self._name = name
        self._on_batch = on_batch
        self._queue: deque[_Pending[In, Out]] = deque()
        self._running: list[_Pending[In, Out]] = []
        self._reserved = 0  # tickets admitted but not yet submitted or released
        self._wake = asyncio.Event()  # set on enqueue, release and stop: the worker's only reasons to look
        self._stopping = False  # admit() refused
        self._closed = False  # submit() refused too: the worker is gone or the queue was discarded
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        """Reserved plus queued items, the number the queue bound applies to (the running batch excluded)."""
        return self._reserved + len(self._queue)

    @property
    def queued(self) -> int:
        """Items submitted and waiting for a batch (decoded, in the service's terms)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items in the batch now running, reported apart from the queue for metrics."""
        return len(self._running)

    @property
    def max_queue_size(self) -> int:
        """The admission bound, exposed for health and metrics."""
        return self._max_queue_size

    @property
    def max_batch_size(self) -> int:
        """The batch bound, exposed for health and metrics."""
        return self._max_batch_size

    @property
    def max_queue_wait_s(self) -> float | None:
        """The admission deadline (None: count bound only)."""
        return self._max_queue_wait_s

    @property
    def seconds_per_item(self) -> float | None:
        """The measured busy seconds per item (None before the first batch and without a seed)."""
        return self._rate.seconds_per_item

    def expected_wait_s(self, count: int = 1) -> float | None:
        """Expected seconds until the batch of the last of `count` new items starts (None: no estimate yet)."""
        return self._rate.wait_s(self._items_ahead + count - 1)

    def seed_seconds_per_item(self, seconds: float) -> None:
        """A first estimate (e.g. from the warm-up run), used until real batches are measured."""
        self._rate.seed(seconds)

    @property
    def _items_ahead(self) -> int:
        """Every item a new one would wait behind: reserved, queued and running."""
        return self._reserved + len(self._queue) + len(self._running)

    def check(self, count: int = 1, *, deadline: bool = True) -> None:
        """Raise QueueFullError / BatcherClosedError if `count` items would be refused now; reserves nothing.

        For callers that want to refuse before spending anything (reading a request body), then admit after.
        """
        if self._stopping:
            raise BatcherClosedError(f"{self._name} is shutting down and accepts no new requests")
        if self._worker is None:
            raise RuntimeError(f"{self._name}: call start() before admit()")
        if count < 1:
            raise ValueError(f"{self._name}: count must be >= 1, got {count}")
        depth = self.queue_depth
        seconds = self._rate.seconds_per_item or 0.0
        if depth + count > self._max_queue_size:
            drain = (depth + count - self._max_queue_size) * seconds
            detail = f"queue full ({depth} waiting, bound {self._max_queue_size})"
            raise QueueFullError(self._name, "queue_full", detail, drain, self.expected_wait_s(count))
        if not deadline or self._max_queue_wait_s is None or self._items_ahead == 0:
            return  # an idle batcher always admits: a poor estimate must never lock everyone out
        expected = self.expected_wait_s(count)
        if expected is not None and expected > self._max_queue_wait_s:
            detail = (
                f"expected wait {expected * 1e3:.0f} ms is over the {self._max_queue_wait_s * 1e3:.0f} ms limit "
                f"({self._items_ahead} images ahead at {seconds * 1e3:.0f} ms each)"
            )
            raise QueueFullError(self._name, "deadline", detail, expected - self._max_queue_wait_s, expected)

    def admit(self) -> Ticket[In, Out]:
        """Reserve a slot in O(1) before any work is done, or refuse at once so overload stays cheap."""
        return self.admit_many(1)[0]

    def admit_many(self, count: int, *, deadline: bool = True) -> list[Ticket[In, Out]]:
        """Reserve `count` slots at once or none. `deadline=False` skips the deadline (not the count bound),
        for more work of a request already admitted (e.g. a study's re-run under its part)."""
        self.check(count, deadline=deadline)
        if self._items_ahead == 0:
            self._rate.busy(time.monotonic())
        self._reserved += count
        return [Ticket(self) for _ in range(count)]

    async def submit(self, item: In) -> Out:
        """Admit and submit in one call, for callers with nothing to decode."""
        with self.admit() as ticket:
            return await ticket.submit(item)

    async def start(self) -> None:
        """Create the worker task and the single inference thread; call once, inside the running loop."""
        if self._worker is not None or self._stopping:
            raise RuntimeError(f"{self._name}: start() may be called once, before stop()")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._worker = asyncio.create_task(self._work(), name=f"{self._name}-worker")

    async def stop(self, *, drain: bool = True, timeout_s: float | None = None) -> None:
        """Refuse new admissions, finish (drain) or fail (no drain) accepted work, then end the thread.

        With drain, tickets reserved before stop() may still submit: their requests were accepted, so the
        worker waits for each to submit or release. Pass `timeout_s` to bound that; on expiry every waiting
        caller gets BatcherClosedError (a handler call already running cannot be interrupted).
        """
        self._stopping = True
        if not drain:
            self._closed = True
            self._fail([*self._queue], "stopped without draining")
            self._queue.clear()
        self._wake.set()
        if self._worker is not None and not self._worker.done():
            try:
                await asyncio.wait_for(self._worker, timeout_s)  # on timeout: cancels the worker, waits
            except TimeoutError:
                logger.warning("%s: stop() timed out after %s s; failing the rest", self._name, timeout_s)
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)  # never block the loop on a stuck call

    # -- internals, all on the event-loop thread --------------------------------------------------------

    def _enqueue(self, item: In) -> asyncio.Future[Out]:
        """Turn a reservation into a queued item; the slot count is unchanged, so no admission check."""
        self._reserved -= 1
        self._wake.set()  # also lets a draining worker see that this reservation is settled
        if self._closed:
            raise BatcherClosedError(f"{self._name} stopped before this request could be queued")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._queue.append(_Pending(item, future, loop.time()))
        return future

    def _unreserve(self) -> None:
        self._reserved -= 1
        if self._items_ahead == 0:
            self._rate.idle()
        self._wake.set()

    def _fail(self, pendings: list[_Pending[In, Out]], reason: str) -> None:
        for pending in pendings:
            if not pending.future.done():
                pending.future.set_exception(BatcherClosedError(f"{self._name}: {reason}"))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Clear-then-wait cannot lose a wake-up: nothing else runs between the check and wait().
                while not self._queue:
                    if self._stopping and (self._closed or self._reserved == 0):
                        return
                    self._wake.clear()
                    await self._wake.wait()
                if self._max_wait_s > 0:
                    await self._gather(loop)
                await self._run_batch(loop)
        except Exception:
            logger.exception("%s: batching worker crashed; failing all waiting requests", self._name)
        finally:  # normal end, crash or cancellation by stop(timeout_s): nobody may be left waiting
            self._closed = True
            self._fail([*self._running, *self._queue], "stopped before this request ran")
            self._queue.clear()

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hold the batch open until full or until max_wait after its first item arrived."""
        deadline = self._queue[0].enqueued_at + self._max_wait_s  # items that waited already wait no more
        while len(self._queue) < self._max_batch_size and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch: list[_Pending[In, Out]] = []
        skipped = 0
        while self._queue and len(batch) < self._max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled by its caller: do not spend model time on it
                skipped += 1
            else:
                batch.append(pending)
        if not batch and not skipped:
            return
        if not batch and self._items_ahead == 0:
            self._rate.idle()
        run_seconds = 0.0
        if batch:
            self._running = batch
            started = time.perf_counter()
            outputs: Sequence[Out | BaseException]
            try:
                outputs = await loop.run_in_executor(self._executor, self._handler, [p.item for p in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(
                        f"{self._name}: handler returned {len(outputs)} outputs for {len(batch)} inputs; "
                        "it must return exactly one output (or exception) per input, in order"
                    )
            except Exception as exc:  # this batch fails, the loop lives on (CancelledError passes by)
                logger.exception("%s: batch of %d failed", self._name, len(batch))
                outputs = [exc] * len(batch)
            run_seconds = time.perf_counter() - started
            self._running = []
            self._rate.completed(len(batch), time.monotonic(), run_seconds)
            if self._items_ahead == 0:
                self._rate.idle()
            for pending, out in zip(batch, outputs, strict=True):
                if pending.future.done():  # cancelled while running: nobody is listening
                    continue
                if isinstance(out, BaseException):
                    pending.future.set_exception(out)
                else:
                    pending.future.set_result(out)
        if self._on_batch is not None:
            try:
                self._on_batch(BatchStats(len(batch), skipped, run_seconds, self.queue_depth))
            except Exception:
                logger.exception("%s: on_batch callback failed; batching continues", self._name)
