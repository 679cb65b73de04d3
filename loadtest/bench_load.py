"""Load benchmark: our service vs the naive ONNX endpoint vs the original-style Keras pipeline, in ONE run.

    python -m loadtest.bench_load --bundle models/demo --images tests/data/xray --duration-s 20 --overload-s 60

This module owns the scripted comparison under load (what `loadtest.bench_service` does for our service
alone, extended to the baselines of `loadtest.baselines` and to open-loop and overload behaviour):

1. each server is started as its own process, one at a time, on a fresh free port: `bfd serve` on the bundle,
   then `python -m loadtest.baselines naive` (with --naive-tuned also `naive --tuned`) and `... keras`
   (skipped with --skip-keras, or when TensorFlow is missing);
2. each is driven with the same JPEG uploads (real radiographs re-encoded at 500-2500 px, see
   `bench_service.make_uploads`) by an async httpx client in this process, closed loop at each --concurrency
   for --duration-s after a --warmup-s warm-up that is not counted (only completions inside the window count);
3. for our service only, open loop: Poisson arrivals at 50% and 90% of the capacity measured in step 2, then
   2x capacity for --overload-s. Latency is measured from each request's SCHEDULED send time, so a slow
   server (or a late load generator) cannot hide its queueing (no coordinated omission). Refusals (503 with
   Retry-After) are counted apart from accepted requests; any other 5xx is flagged; the server's RSS is
   sampled before, during and after, and one request right after the overload must be answered 200.

Every step records throughput (img/s), p50/p90/p99 latency, errors by status, server CPU% and RSS (psutil on
the server's pid) and, for our service, the batch-size distribution from its Prometheus `bfd_batch_size`
histogram. JSON and Markdown go to --out (`load_benchmark.json`, `load_benchmark.md`) with the machine's
description and the throughput ratios ours/naive and ours/keras at each concurrency.

The load generator shares the machine's cores with the server under test (its own CPU% is recorded, and so
is everything else's on the machine: a step with a high 'other CPU %' was disturbed), so compare figures
within one run, not across machines. It hands each request a client of one keep-alive connection (`Lanes`):
a single httpx client with hundreds of connections becomes the bottleneck itself. The images are FracAtlas
radiographs, CC BY 4.0 (Abedeen et al., Scientific Data 10, 521 (2023); see tests/data/xray/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench_service import SIZES_PX, make_uploads
from loadtest.servers import Server, start_server, stop_server
from service.bundle import read_manifest

PREDICT = "/v1/predict"
Upload = tuple[str, bytes]
Json = dict[str, Any]
OPEN_LOOP_FRACTIONS = (0.5, 0.9)
OVERLOAD_FRACTION = 2.0
# The lead's targets: throughput ratios at the highest concurrency (32 by default).
TARGETS = {"naive": 2.0, "keras": 5.0}
BASELINES = ("naive", "naive-tuned", "keras")
CLIENT_TIMEOUT_S = 120.0
# A server started with BFD_API_KEY in its environment needs it on every /v1 request (it inherits ours).
AUTH = {"X-API-Key": key} if (key := os.environ.get("BFD_API_KEY", "").strip()) else {}
SAMPLE_EVERY_S = 0.5
ATTRIBUTION = (
    "Images: FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4), "
    "CC BY 4.0, re-encoded at several sizes; see tests/data/xray/README.md."
)


# --- the machine --------------------------------------------------------------------------------------------


def machine_description() -> Json:
    """Cores, CPU model, memory and library versions: the context every figure needs."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


# --- statistics ---------------------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> Json:
    """p50/p90/p99, mean and max (ms); None when there is nothing to summarise."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {
        "n": len(values),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(array.mean()),
        "max": float(array.max()),
    }


def prometheus_snapshot(url: str) -> Json | None:
    """Our service's batch-size histogram, images and /v1/predict requests by status; None without /metrics."""
    try:
        response = httpx.get(url + "/metrics", timeout=10)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    buckets: dict[str, float] = {}
    snapshot: Json = {"buckets": buckets, "sum": 0.0, "count": 0.0, "requests": {}, "images": 0.0, "queue_depth": 0.0}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "bfd_batch_size_bucket":
                buckets[sample.labels["le"]] = sample.value
            elif sample.name == "bfd_batch_size_sum":
                snapshot["sum"] = sample.value
            elif sample.name == "bfd_batch_size_count":
                snapshot["count"] = sample.value
            elif sample.name == "bfd_images_total":
                snapshot["images"] = sample.value
            elif sample.name == "bfd_queue_depth":
                snapshot["queue_depth"] = sample.value
            elif sample.name == "bfd_requests_total" and sample.labels.get("route") == PREDICT:
                snapshot["requests"][sample.labels["status"]] = sample.value
    return snapshot


def batch_distribution(before: Json | None, after: Json | None) -> Json | None:
    """Batches run between two snapshots, by histogram bucket (non-cumulative), with their mean size."""
    if before is None or after is None:
        return None
    edges = sorted(after["buckets"], key=lambda le: float("inf") if le == "+Inf" else float(le))
    counts: dict[str, int] = {}
    previous_edge, previous_cumulative = 0.0, 0.0
    for le in edges:
        cumulative = after["buckets"][le] - before["buckets"].get(le, 0.0)
        upper = float("inf") if le == "+Inf" else float(le)
        label = f">{previous_edge:g}" if upper == float("inf") else _bucket_label(previous_edge, upper)
        if cumulative - previous_cumulative:
            counts[label] = int(cumulative - previous_cumulative)
        previous_edge, previous_cumulative = upper, cumulative
    batches = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    server_requests = {
        status: int(value - before["requests"].get(status, 0.0))
        for status, value in after["requests"].items()
        if value - before["requests"].get(status, 0.0)
    }
    return {
        "batches": int(batches),
        "images": int(images),
        "mean_batch_size": images / batches if batches else None,
        "histogram": counts,
        "server_side_predict_statuses": server_requests,
    }


def _bucket_label(low: float, high: float) -> str:
    first, last = int(low) + 1, int(high)
    return str(last) if first == last else f"{first}-{last}"


# --- driving load -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it was due, sent and done (perf_counter seconds), and what came back."""

    due: float
    sent: float
    done: float
    status: str  # HTTP status, or 'transport:<exception>'
    retry_after: bool = False
    retry_after_s: float | None = None  # the Retry-After header's value, when it had a number

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1e3


@dataclass(frozen=True)
class Body:
    """A multipart upload encoded once (the load generator must not spend its CPU re-encoding it)."""

    name: str
    content: bytes
    content_type: str

    @property
    def headers(self) -> dict[str, str]:
        return {"content-type": self.content_type, **AUTH}


def encode_bodies(uploads: Sequence[Upload]) -> list[Body]:
    bodies = []
    for name, data in uploads:
        request = httpx.Request("POST", "http://x" + PREDICT, files={"file": (name, data, "image/jpeg")})
        bodies.append(Body(name, request.read(), request.headers["content-type"]))
    return bodies


class Lanes:
    """Clients of ONE keep-alive connection each, handed out to requests and returned when they finish.

    One httpx client with hundreds of connections spends its time in httpcore's pool bookkeeping (quadratic
    in connections x waiting requests) and becomes the bottleneck long before the server; lanes keep the
    load generator's cost per request flat. A request waiting for a free lane (at most `cap` in flight) is
    still timed from its scheduled send time, so the wait counts against the server, as it should.
    """

    def __init__(self, url: str, cap: int) -> None:
        self.url = url
        self.cap = cap
        self.created = 0
        self.idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        self.all: list[httpx.AsyncClient] = []
        self._ssl = httpx.create_ssl_context()  # one context for every lane (plain HTTP never uses it)

    async def post(self, body: Body, due: float) -> Outcome:
        client = await self._acquire()
        sent = time.perf_counter()
        try:
            response = await client.post(PREDICT, content=body.content, headers=body.headers)
        except httpx.HTTPError as error:
            return Outcome(due, sent, time.perf_counter(), f"transport:{type(error).__name__}")
        finally:
            self.idle.put_nowait(client)
        retry = response.headers.get("retry-after")
        seconds = float(retry) if retry is not None and retry.strip().isdigit() else None
        return Outcome(due, sent, time.perf_counter(), str(response.status_code), retry is not None, seconds)

    async def _acquire(self) -> httpx.AsyncClient:
        if self.idle.empty() and self.created < self.cap:
            self.created += 1
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            client = httpx.AsyncClient(base_url=self.url, timeout=CLIENT_TIMEOUT_S, limits=limits, verify=self._ssl)
            self.all.append(client)
            return client
        return await self.idle.get()

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.all))


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


def summarise(outcomes: Sequence[Outcome], seconds: float) -> Json:
    """Throughput of 200s, their latency, and every other status counted."""
    ok = [o for o in outcomes if o.status == "200"]
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {
        "seconds": seconds,
        "requests": len(outcomes),
        "ok": len(ok),
        "throughput_img_s": len(ok) / seconds if seconds else 0.0,
        "latency_ms": percentiles([o.latency_ms for o in ok]),
        "statuses": statuses,
        "errors": {status: count for status, count in statuses.items() if status != "200"},
    }


async def closed_loop(
    server: Server,
    bodies: Sequence[Body],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    metrics: bool,
    honour_retry_after: bool = False,
) -> Json:
    """`concurrency` clients each sending the next request as soon as the last came back.

    With `honour_retry_after`, a client told 503 + Retry-After waits that long first, as a well-behaved
    client does; otherwise it retries at once (the harshest client).
    """
    lanes = Lanes(server.url, concurrency)
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s
    window = Window(server, metrics)

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < window_end:
            outcome = await lanes.post(bodies[i % len(bodies)], time.perf_counter())
            outcomes.append(outcome)
            i += concurrency
            if honour_retry_after and outcome.status == "503" and outcome.retry_after_s:
                await asyncio.sleep(min(outcome.retry_after_s, max(0.0, window_end - time.perf_counter())))

    async def measure() -> Json:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        window.open()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        return await window.close()

    try:
        measuring = asyncio.ensure_future(measure())
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        resources = await measuring
    finally:
        await lanes.aclose()
    counted = [o for o in outcomes if window_start <= o.done <= window_end]
    return {
        "kind": "closed",
        "concurrency": concurrency,
        "honour_retry_after": honour_retry_after,
        "warmup_s": warmup_s,
        **summarise(counted, duration_s),
        **resources,
    }


def poisson_schedule(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process of `rate` per second over `seconds`."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return offsets
        offsets.append(t)


async def open_loop(
    server: Server,
    bodies: Sequence[Body],
    rate: float,
    warmup_s: float,
    duration_s: float,
    seed: int,
    metrics: bool,
    max_in_flight: int = 512,
) -> Json:
    """Requests sent at Poisson arrival times whatever the server does; latency from the scheduled time."""
    schedule = poisson_schedule(rate, warmup_s + duration_s, seed)
    lanes = Lanes(server.url, max_in_flight)
    outcomes: list[tuple[float, Outcome]] = []
    window = Window(server, metrics)

    async def one(i: int, offset: float, due: float) -> None:
        outcomes.append((offset, await lanes.post(bodies[i % len(bodies)], due)))

    async def measure() -> Json:
        await asyncio.sleep(warmup_s)
        window.open()
        await asyncio.sleep(duration_s)
        return await window.close()

    try:
        start = time.perf_counter()
        measuring = asyncio.ensure_future(measure())
        tasks = []
        for i, offset in enumerate(schedule):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, offset, due)))
        resources = await measuring
        await asyncio.gather(*tasks)
        drained_s = time.perf_counter() - start - warmup_s - duration_s
    finally:
        await lanes.aclose()
    counted = [o for offset, o in outcomes if offset >= warmup_s]
    middle = warmup_s + duration_s / 2
    summary = summarise(counted, duration_s)
    accepted = [o for o in counted if o.status == "200"]
    refused = [o for o in counted if o.status == "503"]
    return {
        "kind": "open",
        "arrivals": "poisson",
        "target_rate_img_s": rate,
        "offered_rate_img_s": len(counted) / duration_s,
        "warmup_s": warmup_s,
        **summary,
        # throughput_img_s here: 200s per second of offered load (some complete after the window closes)
        "accepted": len(accepted),
        "refused_503": len(refused),
        "refused_503_with_retry_after": sum(o.retry_after for o in refused),
        "refused_latency_ms": percentiles([o.latency_ms for o in refused]),
        "other_5xx": sum(o.status.isdigit() and o.status.startswith("5") and o.status != "503" for o in counted),
        "transport_errors": sum(o.status.startswith("transport:") for o in counted),
        "send_lag_ms": percentiles([(o.sent - o.due) * 1e3 for o in counted]),
        "max_in_flight": max_in_flight,
        "lanes_used": lanes.created,
        "drain_after_window_s": drained_s,
        # accepted p99 by half of the window (by scheduled time): queueing that grows shows up as a rise
        "accepted_p99_by_half_ms": [
            percentiles([o.latency_ms for offset, o in outcomes if o.status == "200" and low <= offset < high])["p99"]
            for low, high in ((warmup_s, middle), (middle, warmup_s + duration_s))
        ],
        **resources,
    }


async def answer_of(url: str, body: Body) -> Json:
    """The server's body part and P(fractured) for one image (to check the baselines answer as we do)."""
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        response = await client.post(PREDICT, content=body.content, headers=body.headers)
    if response.status_code != 200:
        return {"status": response.status_code, "body": response.text[:500]}
    prediction = response.json()["predictions"][0]
    return {
        "status": 200,
        "image": body.name,
        "body_part": prediction["body_part"]["label"],
        "p_fractured": prediction["fracture"]["probability"],
    }


def compare_answers(ours: Json, theirs: Json) -> Json:
    if ours.get("status") != 200 or theirs.get("status") != 200:
        return {"comparable": False}
    return {
        "comparable": True,
        "same_body_part": ours["body_part"] == theirs["body_part"],
        "p_fractured_abs_diff": abs(ours["p_fractured"] - theirs["p_fractured"]),
    }


# --- the run ------------------------------------------------------------------------------------------------


def run_closed_steps(server: Server, bodies: Sequence[Body], args: argparse.Namespace, metrics: bool) -> list[Json]:
    steps = []
    for concurrency in args.concurrency:
        step = asyncio.run(closed_loop(server, bodies, concurrency, args.warmup_s, args.duration_s, metrics))
        steps.append(step)
        _progress(server.name, step)
    return steps


def run_ours(bodies: Sequence[Body], args: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> Json:
    command = [sys.executable, "-m", "bfd.cli", "--log-level", "warning", "serve", "--bundle", str(args.bundle)]
    load = [round(v, 2) for v in os.getloadavg()]
    server = start_server("ours", command, "/readyz", log_dir, env, args.start_timeout_s)
    try:
        result: Json = {"command": server.command, "load_average_at_start": load}
        result["answer"] = asyncio.run(answer_of(server.url, bodies[0]))
        result["closed_loop"] = run_closed_steps(server, bodies, args, metrics=True)
        capacity = max(step["throughput_img_s"] for step in result["closed_loop"])
        result["capacity_img_s"] = capacity
        open_steps = []
        for index, fraction in enumerate(OPEN_LOOP_FRACTIONS):
            step = asyncio.run(
                open_loop(server, bodies, fraction * capacity, args.warmup_s, args.duration_s, args.seed + index, True)
            )
            step["fraction_of_capacity"] = fraction
            open_steps.append(step)
            _progress(server.name, step)
        result["open_loop"] = open_steps
        result["overload"] = run_overload(server, bodies, capacity, args)
        _progress(server.name, result["overload"])
    finally:
        result_code = stop_server(server)
    result["exit_code"] = result_code
    return result


def run_overload(server: Server, bodies: Sequence[Body], capacity: float, args: argparse.Namespace) -> Json:
    """2x capacity for --overload-s, then: did it answer 200 at once, and did RSS come back down?"""
    rss_before = server.rss_mb()
    step = asyncio.run(
        open_loop(server, bodies, OVERLOAD_FRACTION * capacity, 0.0, args.overload_s, args.seed + 99, True)
    )
    step["fraction_of_capacity"] = OVERLOAD_FRACTION
    step["boundedness"] = boundedness(server, step, capacity)
    started = time.perf_counter()
    recovered = asyncio.run(answer_of(server.url, bodies[1 % len(bodies)]))
    recovered["latency_ms"] = (time.perf_counter() - started) * 1e3
    step["recovered"] = recovered
    step["rss_mb"] = {"before": rss_before, "during_max": step["server_rss_mb"]["max"], "after": server.rss_mb()}
    step["only_503_refusals"] = step["other_5xx"] == 0 and all(status in {"200", "503"} for status in step["statuses"])
    return step


def boundedness(server: Server, step: Json, capacity: float) -> Json:
    """Is the accepted requests' latency bounded under overload? The figures behind the answer, all reported.

    A full admission queue plus the running batch, (max_queue_size + max_batch_size) images (the service's own
    /v1/models), drains in that many images over the service rate: at the closed-loop capacity, and at the
    rate actually achieved during the overload (lower when overload itself costs throughput). 'bounded' means
    the accepted p99 (a) does not grow from the first half of the window to the second (by more than 1.5x),
    which unbounded queueing would, and (b) stays within 2x of the full-queue time at the achieved rate.
    """
    response = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10)
    batching = response.json().get("batching", {}) if response.status_code == 200 else {}
    queue, batch = batching.get("max_queue_size"), batching.get("max_batch_size")
    achieved = step["throughput_img_s"]
    full = (queue + batch) if queue and batch else None
    at_capacity = full / capacity * 1e3 if full and capacity else None
    at_achieved = full / achieved * 1e3 if full and achieved else None
    p99 = step["latency_ms"]["p99"]
    first, second = step["accepted_p99_by_half_ms"]
    bounded = None
    if p99 is not None and first is not None and second is not None and at_achieved is not None:
        bounded = second <= 1.5 * first and p99 <= 2 * at_achieved
    return {
        "max_queue_size": queue,
        "max_batch_size": batch,
        "full_queue_ms_at_capacity": at_capacity,
        "full_queue_ms_at_achieved_rate": at_achieved,
        "achieved_img_s": achieved,
        "accepted_p99_ms": p99,
        "accepted_p99_first_half_ms": first,
        "accepted_p99_second_half_ms": second,
        "bounded": bounded,
    }


def run_baseline(
    name: str, command: Sequence[str], bodies: Sequence[Body], args: argparse.Namespace, log_dir: Path
) -> Json:
    load = [round(v, 2) for v in os.getloadavg()]
    try:
        server = start_server(name, command, "/healthz", log_dir, {}, args.start_timeout_s)
    except RuntimeError as error:  # a baseline that cannot start is reported, not fatal to the whole run
        print(f"[{name}] did not start: {error}", file=sys.stderr, flush=True)
        return {"command": list(command), "failed": str(error)[-2000:]}
    try:
        result: Json = {"command": server.command, "load_average_at_start": load}
        result["answer"] = asyncio.run(answer_of(server.url, bodies[0]))
        result["closed_loop"] = run_closed_steps(server, bodies, args, metrics=False)
    finally:
        result_code = stop_server(server)
    result["exit_code"] = result_code
    return result


def _precision(bundle: Path) -> str:
    """fp32 or int8: ratios between servers only compare like with like when these agree."""
    return str(read_manifest(bundle).precision)


def ensure_split_bundle(args: argparse.Namespace, log_dir: Path) -> Path:
    """The split bundle for the naive baseline: given, found in loadtest/results, or exported once now."""
    command = [sys.executable, "-m", "loadtest.baselines", "split-bundle", "--bundle", str(args.bundle)]
    if args.split_bundle is not None:
        command += ["--out", str(args.split_bundle)]
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "split-bundle.log").open("wb") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"no split bundle for the naive baseline; see {log_dir / 'split-bundle.log'}")
    return Path(done.stdout.decode().strip().splitlines()[-1])


def ratios(results: Json, concurrency: Sequence[int]) -> Json:
    """ours / baseline throughput, and baseline / ours p50 latency, at each concurrency."""
    ours = {step["concurrency"]: step for step in results["ours"]["closed_loop"]}
    out: Json = {}
    for baseline in BASELINES:
        theirs_result = results.get(baseline, {})
        if "closed_loop" not in theirs_result:
            continue
        theirs = {step["concurrency"]: step for step in theirs_result["closed_loop"]}
        per_c: Json = {}
        for c in concurrency:
            a, b = ours.get(c), theirs.get(c)
            if a is None or b is None:
                continue
            p50a, p50b = a["latency_ms"]["p50"], b["latency_ms"]["p50"]
            per_c[str(c)] = {
                "throughput": a["throughput_img_s"] / b["throughput_img_s"] if b["throughput_img_s"] else None,
                "p50_latency_theirs_over_ours": p50b / p50a if p50a and p50b else None,
            }
        out[f"ours_vs_{baseline}"] = per_c
    return out


def targets(report: Json) -> Json:
    """The lead's targets, checked on this run's figures (None where not measured)."""
    top = str(max(report["config"]["concurrency"]))
    out: Json = {}
    for baseline, wanted in TARGETS.items():
        key = f"ours_vs_{baseline}_at_c{top}"
        ratio = report["ratios"].get(f"ours_vs_{baseline}", {}).get(top, {}).get("throughput")
        out[key] = {"wanted": wanted, "measured": ratio, "met": None if ratio is None else ratio >= wanted}
        theirs = report["config"].get("split_bundle_precision")
        if baseline.startswith("naive") and theirs not in (None, report["config"]["bundle_precision"]):
            out[key]["like_for_like"] = False  # e.g. our INT8 bundle vs the naive fp32 graphs: say so
    overload = report["servers"]["ours"]["overload"]
    out["overload_only_503_and_recovers"] = {
        "met": bool(overload["only_503_refusals"] and overload["recovered"].get("status") == 200),
        "other_5xx": overload["other_5xx"],
        "recovered_status": overload["recovered"].get("status"),
    }
    bound = overload["boundedness"]
    out["overload_accepted_p99_bounded"] = {
        "met": bound["bounded"],
        "accepted_p99_ms": bound["accepted_p99_ms"],
        "first_half_p99_ms": bound["accepted_p99_first_half_ms"],
        "second_half_p99_ms": bound["accepted_p99_second_half_ms"],
        "full_queue_ms_at_achieved_rate": bound["full_queue_ms_at_achieved_rate"],
    }
    return out


def _progress(name: str, step: Json) -> None:
    latency = step["latency_ms"]
    label = f"c{step['concurrency']}" if step["kind"] == "closed" else f"{step['fraction_of_capacity']:.0%} capacity"
    p99 = f"{latency['p99']:.0f}" if latency["p99"] is not None else "-"
    print(
        f"[{name} {label}] {step['throughput_img_s']:.1f} img/s, p99 {p99} ms, statuses {step['statuses']}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--split-bundle", type=Path, help="split twin for the naive baseline (default: found/made)")
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument(
        "--sizes", type=int, nargs="+", choices=SIZES_PX, default=list(SIZES_PX), help="longest sides of the uploads"
    )
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per step")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="uncounted seconds before each step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--overload-s", type=float, default=60.0, help="seconds at 2x capacity")
    parser.add_argument("--skip-keras", action="store_true", help="no Keras baseline (e.g. TensorFlow missing)")
    parser.add_argument("--skip-naive", action="store_true", help="no naive ONNX baseline")
    parser.add_argument(
        "--naive-tuned", action="store_true", help="also the naive endpoint with the service's onnxruntime threads"
    )
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrivals")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.now(UTC)
    log_dir = args.out / "logs"
    uploads = make_uploads_at(args.images, args.sizes)
    if not uploads:
        print(f"no PNG/JPEG images under {args.images}", file=sys.stderr)
        return 2
    sizes_kb = [len(data) / 1e3 for _, data in uploads]
    bodies = encode_bodies(uploads)
    report: Json = {
        "started_at": started_at.isoformat(),
        "machine": machine_description(),
        "config": {
            "bundle": str(args.bundle),
            "bundle_precision": _precision(args.bundle),
            "images": str(args.images),
            "uploads": len(uploads),
            "upload_sides_px": args.sizes,
            "upload_kb_min_max": [min(sizes_kb), max(sizes_kb)],
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "concurrency": args.concurrency,
            "open_loop_fractions": list(OPEN_LOOP_FRACTIONS),
            "overload_fraction": OVERLOAD_FRACTION,
            "overload_s": args.overload_s,
            "seed": args.seed,
        },
        "attribution": ATTRIBUTION,
        "servers": {},
    }
    servers: Json = report["servers"]
    with tempfile.TemporaryDirectory(prefix="bfd-load-") as scratch:
        # Our service keeps a results store; keep it out of the working directory.
        env = {"BFD_DATABASE_URL": os.environ.get("BFD_DATABASE_URL", f"sqlite+aiosqlite:///{scratch}/results.sqlite3")}
        servers["ours"] = run_ours(bodies, args, log_dir, env)
    if args.skip_naive:
        servers["naive"] = {"skipped": "--skip-naive"}
    else:
        try:
            split: Path | None = ensure_split_bundle(args, log_dir)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            servers["naive"] = {"failed": str(error)}
            split = None
        if split is not None:
            report["config"]["split_bundle"] = str(split)
            report["config"]["split_bundle_precision"] = _precision(split)
            command = [sys.executable, "-m", "loadtest.baselines", "naive", "--bundle", str(args.bundle)]
            command += ["--split-bundle", str(split)]
            servers["naive"] = run_baseline("naive", command, bodies, args, log_dir)
            if args.naive_tuned:
                servers["naive-tuned"] = run_baseline("naive-tuned", [*command, "--tuned"], bodies, args, log_dir)
    if args.skip_keras:
        servers["keras"] = {"skipped": "--skip-keras"}
    elif importlib.util.find_spec("tensorflow") is None:
        servers["keras"] = {"skipped": "TensorFlow is not installed (pip install -e '.[export]')"}
    else:
        command = [sys.executable, "-m", "loadtest.baselines", "keras", "--bundle", str(args.bundle)]
        servers["keras"] = run_baseline("keras", command, bodies, args, log_dir)
    for name in BASELINES:
        if "answer" in servers.get(name, {}):
            servers[name]["answer_vs_ours"] = compare_answers(servers["ours"]["answer"], servers[name]["answer"])
    report["ratios"] = ratios(servers, args.concurrency)
    report["targets"] = targets(report)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished_at"] = datetime.now(UTC).isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "load_benchmark.md").write_text(markdown)
    print(markdown)
    return 0


def make_uploads_at(folder: Path, sizes: Sequence[int]) -> list[Upload]:
    """`bench_service.make_uploads` (each image at every side of SIZES_PX), keeping the chosen sides."""
    wanted = tuple(f"_{side}.jpg" for side in sizes)
    return [upload for upload in make_uploads(folder) if upload[0].endswith(wanted)]


# --- the Markdown report ------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _errors(step: Json) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(step["errors"].items())) or "none"


def _batches(step: Json) -> str:
    batches = step.get("batch_sizes")
    if not batches or not batches["batches"]:
        return "-"
    histogram = " ".join(f"{k}:{v}" for k, v in batches["histogram"].items())
    return f"{batches['mean_batch_size']:.1f} ({histogram})"


def render_markdown(report: Json) -> str:
    machine, config, servers = report["machine"], report["config"], report["servers"]
    lines = [
        "# Load benchmark: our service vs naive ONNX vs original-style Keras",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, {machine['memory_gib']} GiB, "
        f"onnxruntime {machine['onnxruntime']}, Python {machine['python']}; load average at start "
        f"{machine['load_average_at_start']}, at end {machine.get('load_average_at_end')}. Started "
        f"{report['started_at']}.",
        "",
        f"Bundle `{config['bundle']}` ({config.get('bundle_precision', '?')}; the naive baseline runs "
        f"`{config.get('split_bundle', '-')}`, {config.get('split_bundle_precision', '-')}); "
        f"{config['uploads']} JPEG uploads ({config['upload_kb_min_max'][0]:.0f}-"
        f"{config['upload_kb_min_max'][1]:.0f} KB, longest side {config['upload_sides_px']} px). Each step: "
        f"{config['warmup_s']:g} s warm-up (not counted), then {config['duration_s']:g} s measured. The load "
        "generator runs on the same machine (its CPU% is the 'client CPU' column).",
        "",
        "## Closed loop (each client sends its next request when the last one is answered)",
        "",
        "| server | concurrency | img/s | p50 ms | p90 ms | p99 ms | n | errors | server CPU % | client CPU % "
        "| other CPU % | server RSS MB (max) | mean batch (histogram) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in config["concurrency"]:
        for name in ("ours", *BASELINES):
            steps = {s["concurrency"]: s for s in servers.get(name, {}).get("closed_loop", [])}
            if c not in steps:
                continue
            step = steps[c]
            latency = step["latency_ms"]
            lines.append(
                f"| {name} | {c} | {step['throughput_img_s']:.1f} | {_f(latency['p50'])} | {_f(latency['p90'])} | "
                f"{_f(latency['p99'])} | {latency['n']} | {_errors(step)} | {step['server_cpu_percent']:.0f} | "
                f"{step['client_cpu_percent']:.0f} | {step['other_cpu_percent']:.0f} | "
                f"{step['server_rss_mb']['max']:.0f} | {_batches(step)} |"
            )
    for name in BASELINES:
        for outcome in ("skipped", "failed"):
            if outcome in servers.get(name, {}):
                lines.append(f"\n{name}: {outcome} ({servers[name][outcome]})")
    started = [
        f"{name} {servers[name]['load_average_at_start']}"
        for name in servers
        if "load_average_at_start" in servers[name]
    ]
    lines += ["", f"Load average (1, 5, 15 min) when each server started: {', '.join(started)}."]
    lines += ["", "## Ratios (ours / baseline throughput; baseline / ours p50 latency)", ""]
    lines += ["| vs | concurrency | throughput ratio | p50 latency ratio |", "|---|---|---|---|"]
    for key, per_c in report["ratios"].items():
        for c, value in per_c.items():
            lines.append(
                f"| {key.removeprefix('ours_vs_')} | {c} | {_f(value['throughput'], 2)}x | "
                f"{_f(value['p50_latency_theirs_over_ours'], 2)}x |"
            )
    ours = servers["ours"]
    lines += [
        "",
        f"## Our service, open loop (Poisson arrivals; capacity = best closed-loop throughput, "
        f"{ours['capacity_img_s']:.1f} img/s)",
        "",
        "Latency is from each request's scheduled send time. 'accepted' are 200s; 'refused' are 503s.",
        "",
        "| offered | rate img/s | accepted | refused 503 (with Retry-After) | other 5xx | transport errors "
        "| accepted p50 / p90 / p99 ms | refused p99 ms | send lag p99 ms | server / client / other CPU % "
        "| RSS MB before / max | max queue depth | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in [*ours["open_loop"], ours["overload"]]:
        latency, refused = step["latency_ms"], step["refused_latency_ms"]
        lines.append(
            f"| {step['fraction_of_capacity']:.0%} ({step['seconds']:g} s) | {step['offered_rate_img_s']:.1f} | "
            f"{step['accepted']} | {step['refused_503']} ({step['refused_503_with_retry_after']}) | "
            f"{step['other_5xx']} | {step['transport_errors']} | {_f(latency['p50'])} / {_f(latency['p90'])} / "
            f"{_f(latency['p99'])} | {_f(refused['p99'])} | {_f(step['send_lag_ms']['p99'])} | "
            f"{step['server_cpu_percent']:.0f} / {step['client_cpu_percent']:.0f} / {step['other_cpu_percent']:.0f} | "
            f"{step['server_rss_mb']['before']:.0f} / "
            f"{step['server_rss_mb']['max']:.0f} | {_f(step.get('queue_depth_max'))} | {_batches(step)} |"
        )
    overload = ours["overload"]
    rss, recovered, bound = overload["rss_mb"], overload["recovered"], overload["boundedness"]
    lines += [
        "",
        f"Overload: RSS {rss['before']:.0f} MB before, {rss['during_max']:.0f} MB max during, {rss['after']:.0f} MB "
        f"after; the request sent right after answered {recovered.get('status')} in "
        f"{recovered['latency_ms']:.0f} ms; only 503 refusals: {overload['only_503_refusals']}; in-flight requests "
        f"drained {overload['drain_after_window_s']:.1f} s after the last arrival. Accepted p99 "
        f"{_f(bound['accepted_p99_ms'])} ms (first half {_f(bound['accepted_p99_first_half_ms'])}, second half "
        f"{_f(bound['accepted_p99_second_half_ms'])}); a full queue (max_queue_size {bound['max_queue_size']} + "
        f"max_batch_size {bound['max_batch_size']}) takes {_f(bound['full_queue_ms_at_capacity'])} ms to serve at "
        f"the closed-loop capacity, {_f(bound['full_queue_ms_at_achieved_rate'])} ms at the "
        f"{bound['achieved_img_s']:.1f} img/s achieved during the overload.",
        "",
        "## Same answers",
        "",
    ]
    for name in BASELINES:
        check = servers.get(name, {}).get("answer_vs_ours")
        if check and check.get("comparable"):
            lines.append(
                f"- {name} vs ours on `{servers['ours']['answer']['image']}`: same body part "
                f"{check['same_body_part']}, |Δ P(fractured)| {check['p_fractured_abs_diff']:.2g}"
            )
    lines += ["", "## Targets", ""]
    for key, value in report["targets"].items():
        detail = ", ".join(f"{k} {_f(v, 2) if isinstance(v, float) else v}" for k, v in value.items() if k != "met")
        lines.append(
            f"- {key}: {'met' if value['met'] else 'NOT met' if value['met'] is False else 'not measured'} ({detail})"
        )
    lines += ["", ATTRIBUTION, "Research use only; the demo bundle is untrained, so only speed is meaningful.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
