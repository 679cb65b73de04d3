"""Admission that budgets real cost: the service-rate estimate, deadline admission in the batcher, byte budgets.

The estimator is pure (times are passed in), so its tests use made-up clocks. The batcher tests hold a batch
inside a gated handler (as tests/test_batching.py does) and seed the rate, so the expected wait is known
exactly without sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from inference.batching import DynamicBatcher, QueueFullError
from inference.memory_budget import BudgetExceededError, ByteBudget
from inference.service_rate import ServiceRate

pytestmark = pytest.mark.anyio


# -- the service-rate estimate -------------------------------------------------------------------------------


def test_rate_is_busy_time_between_completions_per_item() -> None:
    rate = ServiceRate(alpha=1.0)  # newest sample only: the arithmetic is visible
    rate.busy(10.0)
    rate.completed(4, now=10.8, run_seconds=0.4)  # 0.8 s busy for 4 items: decode time counts, not just 0.4
    assert rate.seconds_per_item == pytest.approx(0.2)
    rate.completed(2, now=11.0, run_seconds=0.1)  # still busy: the interval starts at the last completion
    assert rate.seconds_per_item == pytest.approx(0.1)


def test_idle_time_is_not_counted_against_the_pipeline() -> None:
    rate = ServiceRate(alpha=1.0)
    rate.busy(0.0)
    rate.completed(1, now=0.05, run_seconds=0.05)
    rate.idle()
    rate.busy(100.0)  # nobody sent anything for 100 s
    rate.completed(1, now=100.05, run_seconds=0.04)
    assert rate.seconds_per_item == pytest.approx(0.05)


def test_rate_never_below_the_model_time_and_averaged() -> None:
    rate = ServiceRate(alpha=0.5)
    rate.completed(1, now=1.0, run_seconds=0.3)  # no busy mark: the model time is the interval
    assert rate.seconds_per_item == pytest.approx(0.3)
    rate.busy(1.0)
    rate.completed(1, now=1.1, run_seconds=0.2)  # interval 0.1 < model time 0.2: take 0.2
    assert rate.seconds_per_item == pytest.approx(0.25)


def test_seed_until_measured_and_wait() -> None:
    rate = ServiceRate()
    assert rate.wait_s(10) is None
    rate.seed(0.02)
    assert rate.wait_s(10) == pytest.approx(0.2)
    rate.seed(5.0)  # a seed never overrides an estimate
    assert rate.seconds_per_item == pytest.approx(0.02)
    assert rate.wait_s(-3) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        ServiceRate(alpha=0)


# -- deadline admission in the batcher -----------------------------------------------------------------------


class Gated:
    """A handler that waits for `gate` on every call (set by the test), flagging `entered`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> Sequence[int]:
        self.entered.set()
        assert self.gate.wait(5), "the test never opened the gate"
        return items


@asynccontextmanager
async def gated_batcher(**kwargs: Any) -> AsyncIterator[tuple[DynamicBatcher[int, int], Gated]]:
    handler = Gated()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(handler, max_batch_size=1, **kwargs)
    await batcher.start()
    try:
        yield batcher, handler
    finally:
        handler.gate.set()
        await batcher.stop(timeout_s=5)


async def test_deadline_refuses_what_could_not_start_in_time() -> None:
    async with gated_batcher(max_queue_size=100, max_queue_wait_ms=1000) as (batcher, handler):
        batcher.seed_seconds_per_item(0.1)  # 100 ms an item: 10 ahead is the limit
        running = asyncio.create_task(batcher.submit(0))
        assert await asyncio.to_thread(handler.entered.wait, 5)
        held = batcher.admit_many(9)  # running 1 + 9 reserved: the next item waits 10 x 100 ms = 1.0 s
        assert batcher.expected_wait_s() == pytest.approx(1.0)
        extra = batcher.admit()  # exactly at the limit: admitted
        with pytest.raises(QueueFullError, match="expected wait 1100 ms is over the 1000 ms limit") as refused:
            batcher.admit()
        assert refused.value.reason == "deadline"
        assert refused.value.expected_wait_s == pytest.approx(1.1)
        assert refused.value.retry_after_s == 1.0  # 0.1 s over, but Retry-After counts whole seconds
        with pytest.raises(QueueFullError):
            batcher.check(1)  # check() refuses the same way, reserving nothing
        assert batcher.queue_depth == 10
        more = batcher.admit_many(2, deadline=False)  # a request's own extra work skips the deadline
        assert batcher.queue_depth == 12
        for ticket in [*held, extra, *more]:
            ticket.release()
        handler.gate.set()
        assert await running == 0
        assert batcher.admit() is not None  # drained: admitted again


async def test_count_bound_stays_as_backstop() -> None:
    async with gated_batcher(max_queue_size=3, max_queue_wait_ms=60_000) as (batcher, _):
        batcher.seed_seconds_per_item(0.001)  # the deadline alone would admit thousands
        tickets = batcher.admit_many(3)
        with pytest.raises(QueueFullError, match="queue full") as refused:
            batcher.admit()
        assert refused.value.reason == "queue_full"
        with pytest.raises(QueueFullError):
            batcher.admit_many(1, deadline=False)
        for ticket in tickets:
            ticket.release()


async def test_idle_batcher_always_admits_and_all_or_none() -> None:
    async with gated_batcher(max_queue_size=100, max_queue_wait_ms=10) as (batcher, _):
        batcher.seed_seconds_per_item(5.0)  # a terrible estimate must not lock everyone out
        first = batcher.admit_many(4)  # idle: admitted although 4 x 5 s is far over 10 ms
        assert len(first) == 4
        with pytest.raises(QueueFullError):
            batcher.admit_many(2)
        assert batcher.queue_depth == 4  # a refused request took none of the slots
        for ticket in first:
            ticket.release()


async def test_measured_rate_replaces_the_seed() -> None:
    async with gated_batcher(max_queue_size=100, max_queue_wait_ms=1000) as (batcher, handler):
        handler.gate.set()
        batcher.seed_seconds_per_item(10.0)
        for item in range(3):  # one at a time: each finds the batcher idle
            assert await batcher.submit(item) == item
        measured = batcher.seconds_per_item
    assert measured is not None
    assert measured < 10.0


# -- byte budgets --------------------------------------------------------------------------------------------


async def test_budget_waiters_are_served_in_order() -> None:
    budget = ByteBudget(100)
    budget.try_take(80)
    order: list[str] = []

    async def wait_for(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    big = asyncio.create_task(wait_for("big", 60))
    await asyncio.sleep(0)
    small = asyncio.create_task(wait_for("small", 10))  # would fit now, but must not overtake `big`
    await asyncio.sleep(0)
    assert order == []
    assert budget.waiting == 2
    with pytest.raises(BudgetExceededError):
        budget.try_take(5)  # nor may anyone jump the queue without waiting
    budget.give(80)
    await asyncio.gather(big, small)
    assert order == ["big", "small"]
    assert budget.in_use == 70


async def test_cancelled_waiter_leaves_and_lets_others_in() -> None:
    budget = ByteBudget(100)
    budget.try_take(50)
    blocked = asyncio.create_task(budget.take(90))
    await asyncio.sleep(0)
    behind = asyncio.create_task(budget.take(40))
    await asyncio.sleep(0)
    assert not behind.done()
    blocked.cancel()
    await asyncio.wait([blocked])
    await asyncio.wait_for(behind, 1)  # the head left: 50 + 40 fits
    assert budget.in_use == 90
    assert budget.waiting == 0


async def test_budget_refuses_what_can_never_fit() -> None:
    budget = ByteBudget(100, "decode memory budget")
    with pytest.raises(BudgetExceededError, match="more than the whole budget") as refused:
        await budget.take(101)
    assert refused.value.larger_than_budget
    async with budget.hold(100):
        assert budget.in_use == 100
    assert budget.in_use == 0
    with pytest.raises(RuntimeError, match="more bytes than were taken"):
        budget.give(1)
    with pytest.raises(ValueError, match="integer >= 1"):
        ByteBudget(0)
