"""What the server under test spends during a measured window: CPU (its own, the load generator's, the rest of
the machine's), RSS (with its child processes), queue depth and the batch sizes from its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from loadtest.servers import Server
from loadtest.stats import batch_distribution, prometheus_snapshot

Json = dict[str, Any]
SAMPLE_EVERY_S = 0.5


class Sampler:
    """Samples the server's RSS (and our service's queue depth) in the background during a window."""

    def __init__(self, server: Server, with_metrics: bool) -> None:
        self.server = server
        self.with_metrics = with_metrics
        self.rss: list[float] = []
        self.queue_depth: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=10) as client:
            while True:
                self.rss.append(self.server.rss_mb())
                if self.with_metrics:
                    with contextlib.suppress(httpx.HTTPError):
                        text = (await client.get("/metrics")).text
                        for line in text.splitlines():
                            if line.startswith("bfd_queue_depth "):
                                self.queue_depth.append(float(line.split()[1]))
                await asyncio.sleep(SAMPLE_EVERY_S)


@dataclass
class Window:
    """Server and load-generator resources over a measured window."""

    server: Server
    with_metrics: bool
    started: float = 0.0
    server_cpu0: float = 0.0
    client_cpu0: float = 0.0
    machine0: Any = None
    rss_before: float = 0.0
    metrics_before: Json | None = None
    sampler: Sampler | None = None

    def open(self) -> None:
        self.started = time.perf_counter()
        self.server_cpu0 = self.server.cpu_seconds()
        self.client_cpu0 = _own_cpu_seconds()
        self.machine0 = psutil.cpu_times()
        self.rss_before = self.server.rss_mb()
        self.metrics_before = prometheus_snapshot(self.server.url) if self.with_metrics else None
        self.sampler = Sampler(self.server, self.with_metrics)
        self.sampler.start()

    async def close(self) -> Json:
        elapsed = time.perf_counter() - self.started
        server_cpu = self.server.cpu_seconds() - self.server_cpu0
        client_cpu = _own_cpu_seconds() - self.client_cpu0
        machine = psutil.cpu_times()
        busy = _busy_seconds(machine) - _busy_seconds(self.machine0)
        steal = getattr(machine, "steal", 0.0) - getattr(self.machine0, "steal", 0.0)
        assert self.sampler is not None
        await self.sampler.stop()
        after = prometheus_snapshot(self.server.url) if self.with_metrics else None
        rss = [v for v in self.sampler.rss if v == v] or [self.rss_before]
        result: Json = {
            "server_cpu_percent": 100.0 * server_cpu / elapsed,
            "client_cpu_percent": 100.0 * client_cpu / elapsed,
            # everything else on the machine (other users' work): a step with much of it was disturbed
            "other_cpu_percent": max(0.0, 100.0 * (busy - server_cpu - client_cpu) / elapsed),
            "steal_percent": 100.0 * steal / elapsed,  # taken by the hypervisor (VMs)
            "server_rss_mb": {"before": self.rss_before, "max": max(rss), "end": rss[-1]},
            "batch_sizes": batch_distribution(self.metrics_before, after),
        }
        if self.sampler.queue_depth:
            result["queue_depth_max"] = max(self.sampler.queue_depth)
        return result


def _busy_seconds(times: Any) -> float:
    """Machine-wide busy CPU seconds (all cores): everything but idle, iowait and steal."""
    idle = times.idle + getattr(times, "iowait", 0.0) + getattr(times, "steal", 0.0)
    return float(sum(times)) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system
