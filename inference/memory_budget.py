"""A byte budget shared by concurrent work, so N parallel requests cannot together exceed a memory bound.

Two uses with two policies: request bodies take their bytes at once or are refused (`try_take`: a body that
waited while holding a connection would only pile up), decodes wait their turn in arrival order (`hold`:
the request was admitted, so its decode is due; it starts as soon as the bytes it needs are free). A single
request larger than the whole budget can never fit and is refused at once, never queued.

Used only on the event-loop thread, so no lock is needed; standard library only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# A request body and the image bytes parsed out of it are both held until the answer: it costs twice its size.
REQUEST_BODY_COPIES = 2


class BudgetExceededError(Exception):
    """The bytes asked for do not fit now (or ever: `larger_than_budget`)."""

    def __init__(self, name: str, wanted: int, in_use: int, total: int) -> None:
        self.larger_than_budget = wanted > total
        why = "more than the whole budget" if self.larger_than_budget else f"{in_use:,} of {total:,} bytes in use"
        super().__init__(f"{name}: {wanted:,} bytes do not fit ({why})")
        self.wanted = wanted
        self.total = total


class ByteBudget:
    """At most `total` bytes taken at once; waiters are served first come, first served."""

    def __init__(self, total: int, name: str = "memory budget") -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{name}: total must be an integer >= 1, got {total!r}")
        self.total = total
        self.name = name
        self._in_use = 0
        self.peak = 0  # the most ever taken at once: the bound this budget promises, observable
        self.waited = 0  # takers that had to wait their turn
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_take(self, wanted: int) -> None:
        """Take `wanted` bytes now or raise BudgetExceededError (never waits, never jumps the queue)."""
        if wanted < 0:
            raise ValueError(f"{self.name}: cannot take {wanted} bytes")
        if self._waiters or self._in_use + wanted > self.total:
            raise BudgetExceededError(self.name, wanted, self._in_use, self.total)
        self._grant(wanted)

    async def take(self, wanted: int) -> None:
        """Wait (in arrival order) until `wanted` bytes are free and take them; cancellable while waiting."""
        if wanted < 0:
            raise ValueError(f"{self.name}: cannot take {wanted} bytes")
        if wanted > self.total:
            raise BudgetExceededError(self.name, wanted, self._in_use, self.total)
        if not self._waiters and self._in_use + wanted <= self.total:
            self._grant(wanted)
            return
        self.waited += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as we were cancelled: give it back
                self.give(wanted)
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # a big waiter leaving may let smaller ones behind it through
            raise

    def give(self, amount: int) -> None:
        """Return bytes taken earlier and let waiters in, in order."""
        self._in_use -= amount
        if self._in_use < 0:
            raise RuntimeError(f"{self.name}: gave back more bytes than were taken")
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            wanted, future = self._waiters[0]
            if future.done():  # cancelled; its task removes it, but never let it block the head
                self._waiters.popleft()
                continue
            if self._in_use + wanted > self.total:
                return
            self._waiters.popleft()
            self._grant(wanted)
            future.set_result(None)

    def _grant(self, wanted: int) -> None:
        self._in_use += wanted
        self.peak = max(self.peak, self._in_use)

    @asynccontextmanager
    async def hold(self, wanted: int) -> AsyncIterator[None]:
        """`take` on entry, `give` on exit, whatever happens in between."""
        await self.take(wanted)
        try:
            yield
        finally:
            self.give(wanted)
