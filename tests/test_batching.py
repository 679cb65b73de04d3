"""DynamicBatcher: batch formation, per-caller results, failures, cancellation, admission and shutdown.

No timed sleeps synchronise these tests. A gated handler (threading.Event) holds a batch running in the
inference thread while the test enqueues more; `_settle()` is a zero-time yield (`sleep(0)`) that lets
tasks just created run up to their first await, which asyncio's FIFO ready queue makes deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from inference.batching import BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError

pytestmark = pytest.mark.anyio


class Spy:
    """A handler recording each batch; with `gated`, every call waits for `gate` and flags `started`."""

    def __init__(self, fn: Callable[[int], Any] = lambda x: x * 10, *, gated: bool = False) -> None:
        self.fn = fn
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, items: list[int]) -> Sequence[Any]:
        self.batches.append(list(items))
        self.started.set()
        assert self.gate.wait(5), "test never opened the gate"
        return [self.fn(x) for x in items]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    async def wait_started(self) -> None:
        """Block (off the loop) until a batch is inside the handler, then re-arm for the next one."""
        assert await asyncio.to_thread(self.started.wait, 5), "handler never called"
        self.started.clear()


@asynccontextmanager
async def running(handler: Callable[[list[int]], Sequence[Any]], **kw: Any) -> AsyncIterator[DynamicBatcher]:
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_queue_size", 32)
    batcher: DynamicBatcher[int, Any] = DynamicBatcher(handler, **kw)
    await batcher.start()
    try:
        yield batcher
    finally:
        if isinstance(handler, Spy):
            handler.gate.set()  # never leave the inference thread blocked
        await batcher.stop(timeout_s=5)


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def _hold_first_batch(batcher: DynamicBatcher, spy: Spy, item: int = 0) -> asyncio.Task[Any]:
    """Start a one-item batch and return once the handler is running it (the gate still closed)."""
    task = asyncio.create_task(batcher.submit(item))
    await spy.wait_started()
    return task


async def test_single_submit_runs_at_once_with_no_added_wait() -> None:
    spy = Spy()
    async with running(spy, max_wait_ms=0) as batcher:
        started = time.perf_counter()
        assert await asyncio.wait_for(batcher.submit(3), 2) == 30
        assert time.perf_counter() - started < 1.0
    assert spy.sizes == [1]


async def test_full_batch_does_not_wait_for_the_timer() -> None:
    spy = Spy()
    async with running(spy, max_batch_size=2, max_wait_ms=60_000) as batcher:
        results = await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2)), 2)
    assert results == [10, 20]
    assert spy.sizes == [2]


async def test_max_wait_gathers_submits_arriving_apart() -> None:
    spy = Spy()
    async with running(spy, max_batch_size=3, max_wait_ms=60_000) as batcher:
        tasks = []
        for x in (1, 2, 3):  # each arrives after the worker has already seen the previous one
            tasks.append(asyncio.create_task(batcher.submit(x)))
            await _settle()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert results == [10, 20, 30]
    assert spy.sizes == [3]


async def test_timer_closes_a_partial_batch() -> None:
    spy = Spy()
    async with running(spy, max_batch_size=8, max_wait_ms=50) as batcher:
        started = time.perf_counter()
        assert await asyncio.wait_for(batcher.submit(4), 2) == 40
        assert time.perf_counter() - started >= 0.04
    assert spy.sizes == [1]


@pytest.mark.parametrize(("max_batch_size", "expected"), [(8, [1, 5]), (4, [1, 4, 1])])
async def test_items_accumulate_while_a_batch_runs(max_batch_size: int, expected: list[int]) -> None:
    spy = Spy(gated=True)
    async with running(spy, max_batch_size=max_batch_size) as batcher:
        first = await _hold_first_batch(batcher, spy)
        rest = [asyncio.create_task(batcher.submit(x)) for x in range(1, 6)]
        await _settle()
        assert (batcher.in_flight, batcher.queue_depth) == (1, 5)
        spy.gate.set()
        assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert spy.sizes == expected


async def test_each_caller_gets_its_own_answer() -> None:
    spy = Spy(lambda x: x * x + 1)
    async with running(spy, max_batch_size=4) as batcher:
        xs = [7, 3, 11, 0, 5, 9, 2, 13, 6, 1]
        results = await asyncio.gather(*(batcher.submit(x) for x in xs))
    assert results == [x * x + 1 for x in xs]


async def test_exception_at_one_position_fails_only_that_caller() -> None:
    spy = Spy(lambda x: ValueError(f"bad {x}") if x < 0 else x)
    async with running(spy) as batcher:
        results = await asyncio.gather(*(batcher.submit(x) for x in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 1
    assert results[2] == 3
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "bad -2"
    assert spy.sizes == [3]


async def test_raising_handler_fails_its_batch_and_the_next_batch_succeeds() -> None:
    calls: list[list[int]] = []

    def handler(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise OSError("device lost")
        return items

    async with running(handler) as batcher:
        failed = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        assert all(isinstance(r, OSError) and str(r) == "device lost" for r in failed)
        assert await batcher.submit(3) == 3
    assert calls == [[1, 2], [3]]


async def test_wrong_output_length_fails_every_member_clearly() -> None:
    async with running(lambda items: items[:-1]) as batcher:
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        with pytest.raises(RuntimeError, match="returned 0 outputs for 1 inputs"):  # and the loop lives on
            await batcher.submit(9)
    for r in results:
        assert isinstance(r, RuntimeError)
        assert "returned 1 outputs for 2 inputs" in str(r)


async def test_cancelled_callers_are_skipped_and_counted() -> None:
    spy = Spy(gated=True)
    stats: list[BatchStats] = []
    async with running(spy, on_batch=stats.append) as batcher:
        first = await _hold_first_batch(batcher, spy)
        rest = [asyncio.create_task(batcher.submit(x)) for x in range(1, 6)]
        await _settle()
        rest[1].cancel()
        rest[3].cancel()
        spy.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert [r for r in results if not isinstance(r, BaseException)] == [0, 10, 30, 50]
    assert isinstance(results[2], asyncio.CancelledError)
    assert spy.batches == [[0], [1, 3, 5]]
    assert [(s.size, s.skipped) for s in stats] == [(1, 0), (3, 2)]


async def test_all_cancelled_batch_never_calls_the_handler() -> None:
    spy = Spy(gated=True)
    stats: list[BatchStats] = []
    async with running(spy, on_batch=stats.append) as batcher:
        first = await _hold_first_batch(batcher, spy)
        rest = [asyncio.create_task(batcher.submit(x)) for x in (1, 2)]
        await _settle()
        for task in rest:
            task.cancel()
        spy.gate.set()
        assert await first == 0
        assert await batcher.submit(3) == 30
    assert spy.batches == [[0], [3]]
    assert [(s.size, s.skipped, s.run_seconds) for s in stats][1] == (0, 2, 0.0)


async def test_full_queue_refuses_at_once_and_release_frees_a_slot() -> None:
    spy = Spy(gated=True)
    async with running(spy, max_batch_size=1, max_queue_size=2) as batcher:
        first = await _hold_first_batch(batcher, spy)  # running: does not count against the bound
        a, b = batcher.admit(), batcher.admit()
        assert (batcher.queue_depth, batcher.in_flight) == (2, 1)
        with pytest.raises(QueueFullError, match="queue full") as refused:
            batcher.admit()
        assert refused.value.retry_after_s >= 1
        a.release()
        a.release()  # idempotent
        assert batcher.queue_depth == 1
        with batcher.admit() as c:  # the freed slot; leaving the block unsubmitted returns it
            assert batcher.queue_depth == 2
        assert batcher.queue_depth == 1
        c.release()
        assert batcher.queue_depth == 1
        task = asyncio.create_task(b.submit(5))
        spy.gate.set()
        assert await first == 0
        assert await task == 50


async def test_ticket_cannot_be_submitted_twice_or_after_release() -> None:
    async with running(Spy()) as batcher:
        ticket = batcher.admit()
        assert await ticket.submit(1) == 10
        with pytest.raises(RuntimeError, match="already submitted"):
            await ticket.submit(2)
        released = batcher.admit()
        released.release()
        with pytest.raises(RuntimeError, match="already released"):
            await released.submit(3)
        assert batcher.queue_depth == 0


async def test_stop_drains_accepted_work_and_refuses_new() -> None:
    spy = Spy(gated=True)
    async with running(spy, max_batch_size=2) as batcher:
        first = await _hold_first_batch(batcher, spy)
        queued = [asyncio.create_task(batcher.submit(x)) for x in (1, 2, 3)]
        reserved = batcher.admit()  # accepted before stop, decoded after it began
        await _settle()
        stopping = asyncio.create_task(batcher.stop(drain=True, timeout_s=5))
        await _settle()
        with pytest.raises(BatcherClosedError):
            batcher.admit()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(9)
        late = asyncio.create_task(reserved.submit(4))
        spy.gate.set()
        await stopping
        assert await asyncio.gather(first, *queued, late) == [0, 10, 20, 30, 40]
        with pytest.raises(BatcherClosedError):
            batcher.admit()
    assert sorted(x for b in spy.batches for x in b) == [0, 1, 2, 3, 4]


async def test_stop_without_drain_fails_queued_work() -> None:
    spy = Spy(gated=True)
    async with running(spy) as batcher:
        first = await _hold_first_batch(batcher, spy)
        queued = asyncio.create_task(batcher.submit(1))
        reserved = batcher.admit()
        await _settle()
        stopping = asyncio.create_task(batcher.stop(drain=False))
        await _settle()
        with pytest.raises(BatcherClosedError):
            await queued
        with pytest.raises(BatcherClosedError):
            await reserved.submit(2)
        spy.gate.set()  # the running batch still completes
        await stopping
        assert await first == 0
    assert spy.batches == [[0]]


async def test_stop_timeout_fails_waiting_callers() -> None:
    spy = Spy(gated=True)
    async with running(spy) as batcher:
        first = await _hold_first_batch(batcher, spy)
        queued = asyncio.create_task(batcher.submit(1))
        await _settle()
        await batcher.stop(timeout_s=0.05)
        for task in (first, queued):
            with pytest.raises(BatcherClosedError):
                await task


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer >= 1, got 2.5"),
        ({"max_queue_size": 0}, "max_queue_size must be an integer >= 1, got 0"),
        ({"max_wait_ms": -1}, "max_wait_ms must be a finite number >= 0.*got -1"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms .*got nan"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"max_batch_size": 4, "max_queue_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(Spy(), **settings)


async def test_admit_before_start_is_refused() -> None:
    with pytest.raises(RuntimeError, match="start"):
        DynamicBatcher(Spy(), max_batch_size=1, max_queue_size=1).admit()


async def test_on_batch_receives_stats() -> None:
    spy = Spy(gated=True)
    stats: list[BatchStats] = []
    async with running(spy, max_batch_size=2, on_batch=stats.append) as batcher:
        first = await _hold_first_batch(batcher, spy)
        rest = [asyncio.create_task(batcher.submit(x)) for x in (1, 2, 3)]
        await _settle()
        spy.gate.set()
        await asyncio.gather(first, *rest)
    assert [(s.size, s.skipped, s.queue_depth_after) for s in stats] == [(1, 0, 3), (2, 0, 1), (1, 0, 0)]
    assert all(s.run_seconds >= 0 for s in stats)


async def test_raising_on_batch_is_logged_and_batching_continues(caplog: pytest.LogCaptureFixture) -> None:
    def broken(stats: BatchStats) -> None:
        raise ZeroDivisionError("metrics broke")

    with caplog.at_level(logging.ERROR, logger="inference.batching"):
        async with running(Spy(), on_batch=broken) as batcher:
            assert await batcher.submit(1) == 10
            assert await batcher.submit(2) == 20
    assert sum("on_batch callback failed" in r.getMessage() for r in caplog.records) == 2
