"""Predictions held in flight across a signal: the drain tests of `bfd serve` and of its container."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx


@dataclass
class Burst:
    statuses: list[int] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)  # time.monotonic() of each answer


@contextmanager
def predictions_in_flight(url: str, data: bytes, count: int, filename: str = "x.jpg") -> Iterator[Burst]:
    """`count` predictions, each on a connection opened beforehand, sent together; yields once they are queued or
    running, so the caller can signal the server then; waits for every answer on the way out."""
    burst = Burst()
    connected = threading.Barrier(count + 1)

    def post() -> None:
        with httpx.Client(timeout=120) as client:
            client.get(f"{url}/healthz")  # the connection is open before the signal
            connected.wait(timeout=30)
            burst.statuses.append(client.post(f"{url}/v1/predict", files={"file": (filename, data)}).status_code)
            burst.finished.append(time.monotonic())

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    connected.wait(timeout=30)
    time.sleep(0.3)  # the ResNet50 inferences are queued or running: more than a second of work on 2 cores
    try:
        yield burst
    finally:
        for thread in threads:
            thread.join(timeout=120)
