"""Prometheus metrics, one registry per app (so tests and several apps in one process don't collide)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.batching import BatchStats
from inference.events import PredictorEvents

if TYPE_CHECKING:
    from inference.predictor import Predictor

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bfd_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "bfd_request_latency_seconds",
            "HTTP latency",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bfd_batch_size", "images per inference batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.inference_seconds = Histogram(
            "bfd_inference_seconds",
            "wall time of one inference batch",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.skipped = Counter(
            "bfd_skipped_images",
            "queued images dropped because their client had gone",
            registry=self.registry,
        )
        self.images = Counter("bfd_images", "images answered", registry=self.registry)
        self.queue_depth = Gauge("bfd_queue_depth", "images admitted and waiting", registry=self.registry)
        self.expected_wait = Gauge(
            "bfd_expected_queue_wait_seconds",
            "expected wait before a new image's batch starts (admission refuses over max_queue_wait_ms)",
            registry=self.registry,
        )
        self.seconds_per_image = Gauge(
            "bfd_service_seconds_per_image",
            "measured busy seconds per image of the whole pipeline (decode and inference), moving average",
            registry=self.registry,
        )
        self.refused = Counter(
            "bfd_admission_refused",
            "images refused with 503 before any work: deadline, queue_full (count bound) or memory",
            ["reason"],
            registry=self.registry,
        )
        self.memory_in_use = Gauge(
            "bfd_memory_budget_bytes_in_use",
            "bytes taken from each memory budget: request bodies held, decode working memory",
            ["budget"],
            registry=self.registry,
        )
        self.decodes_skipped = Counter(
            "bfd_decodes_skipped",
            "images whose decode never ran: a sibling image failed or the client went away first",
            registry=self.registry,
        )
        self.slow_uploads = Counter(
            "bfd_slow_uploads", "request bodies cut with 408 (too slow or too long)", registry=self.registry
        )

    def track(self, predictor: Predictor) -> None:
        """Read the predictor's admission and memory state at scrape time (NaN while there is no estimate)."""
        batcher = predictor.batcher
        self.queue_depth.set_function(lambda: float(batcher.queue_depth))
        self.expected_wait.set_function(lambda: _or_nan(batcher.expected_wait_s()))
        self.seconds_per_image.set_function(lambda: _or_nan(batcher.seconds_per_item))
        self.memory_in_use.labels("decode").set_function(lambda: float(predictor.decode_memory.in_use))
        self.memory_in_use.labels("requests").set_function(lambda: float(predictor.request_memory.in_use))


class MetricsEvents(PredictorEvents):
    """The predictor's events, counted in the app's Prometheus registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()

    def decode_skipped(self) -> None:
        self.metrics.decodes_skipped.inc()

    def answered(self, images: int) -> None:
        self.metrics.images.inc(images)

    def batch(self, stats: BatchStats) -> None:
        if stats.size:
            self.metrics.batch_size.observe(stats.size)
            self.metrics.inference_seconds.observe(stats.run_seconds)
        if stats.skipped:
            self.metrics.skipped.inc(stats.skipped)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so it never buffers bodies or hides client disconnects."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"  # bounded label cardinality
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
