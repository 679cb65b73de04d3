"""Receiving a request body: a byte limit, a memory budget and a time limit, whatever the client does.

Clients are slow, large, malicious or gone. A body is refused with 413 as soon as it passes the byte limit
(before reading when Content-Length says so); its bytes are taken from the request memory budget as they
arrive (twice: the body and the upload parsed out of it live together), and a request that does not fit
gets 503 at once; a body that is not complete within `upload_timeout_s`, or that arrives slower than
`upload_min_bytes_per_s` on average once the first `UPLOAD_GRACE_S` are over, is cut with 408 and the
connection closed. No queue slot is held while a body arrives, so slow senders delay nobody else.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.types import Receive

from inference.memory_budget import REQUEST_BODY_COPIES, BudgetExceededError, ByteBudget
from service.errors import ServiceError

UPLOAD_GRACE_S = 5.0  # the minimum rate is not enforced before this: connection set-up, TLS, slow starts


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    timeout_s: float
    min_bytes_per_s: float

    def deadline_s(self, received: int) -> float:
        """Seconds after the first byte by which the next chunk must have arrived, given `received` so far.

        The average rate stays >= min_bytes_per_s exactly while elapsed <= received / min_bytes_per_s.
        """
        if self.min_bytes_per_s <= 0:
            return self.timeout_s
        return min(self.timeout_s, max(UPLOAD_GRACE_S, received / self.min_bytes_per_s))


def too_large(size: int, limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"request body is {size} bytes or more; the limit is {limit}")


def too_slow(received: int, elapsed_s: float, limits: UploadLimits) -> ServiceError:
    rule = f"the body must be complete within {limits.timeout_s:g} s"
    if limits.min_bytes_per_s > 0:
        rule += f" and arrive at {limits.min_bytes_per_s:,.0f} bytes/s or more after the first {UPLOAD_GRACE_S:g} s"
    return ServiceError(
        408,
        "upload_too_slow",
        f"request body too slow: {received:,} bytes in {elapsed_s:.1f} s; {rule}",
        headers={"Connection": "close"},
    )


def out_of_memory(error: BudgetExceededError) -> ServiceError:
    return ServiceError(
        503,
        "overloaded",
        "server busy: the request bodies in memory leave no room for this one",
        headers={"Retry-After": "1"},
    )


class BodyReader:
    """Reads one body under the limits, taking its bytes from `budget`; `release()` gives them back."""

    def __init__(self, budget: ByteBudget, limits: UploadLimits) -> None:
        self._budget = budget
        self._limits = limits
        self.held = 0

    def _take(self, size: int) -> None:
        try:
            self._budget.try_take(size)
        except BudgetExceededError as error:
            raise out_of_memory(error) from error
        self.held += size

    def reserve_declared(self, declared: int | None) -> None:
        """Refuse before reading what the Content-Length already shows too large, or too big for memory now."""
        if declared is None:
            return
        if declared > self._limits.max_bytes:
            raise too_large(declared, self._limits.max_bytes)
        self._take(REQUEST_BODY_COPIES * declared)

    async def read(self, receive: Receive) -> bytes:
        """The whole body, or 413 / 408 / 499 / 503 as soon as one applies."""
        chunks: list[bytes] = []
        size = 0
        started = time.monotonic()
        while True:
            remaining = started + self._limits.deadline_s(size) - time.monotonic()
            if remaining <= 0:
                raise too_slow(size, time.monotonic() - started, self._limits)
            try:
                async with asyncio.timeout(remaining):
                    message = await receive()
            except TimeoutError:
                raise too_slow(size, time.monotonic() - started, self._limits) from None
            if message["type"] == "http.disconnect":
                raise ServiceError(499, "client_closed_request", "client went away while uploading")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limits.max_bytes:
                raise too_large(size, self._limits.max_bytes)
            if REQUEST_BODY_COPIES * size > self.held:
                self._take(REQUEST_BODY_COPIES * size - self.held)  # chunked, or longer than declared
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def release(self) -> None:
        if self.held:
            self._budget.give(self.held)
            self.held = 0
