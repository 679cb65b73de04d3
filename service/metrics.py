"""Prometheus metrics, one registry per app (so tests and several apps in one process don't collide)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.events import NodeEvents
from inference.batching import BatchStats
from inference.events import PredictorEvents

if TYPE_CHECKING:
    from dicom_node.node import DicomNode
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

    def track_node(self, node: DicomNode) -> None:
        """The DICOM node's gauges and counters (registered only when the node is on), its state read at scrape
        time."""
        registry = self.registry
        self.dicom_instances = Counter(
            "bfd_dicom_instances",
            "instances answered at the node's doors: status 0x0000 stored (taken), else the refusal's status",
            ["door", "status"],
            registry=registry,
        )
        self.dicom_recovered = Counter(
            "bfd_dicom_instances_recovered", "instances taken back from the spool at start-up", registry=registry
        )
        self.dicom_studies = Counter("bfd_dicom_studies_answered", "studies answered", registry=registry)
        self.dicom_own_results = Counter(
            "bfd_dicom_own_results",
            "the node's own result objects sent back to it (a routing loop), by door: answered stored, not analysed",
            ["door"],
            registry=registry,
        )
        self.dicom_tls_refused = Counter(
            "bfd_dicom_tls_handshakes_refused",
            "connections to the TLS port turned away at the handshake (plain TCP, an untrusted certificate, silence)",
            registry=registry,
        )
        self.dicom_objects = Counter(
            "bfd_dicom_result_objects",
            "result objects: 'made' (put in the outbox), then per delivery attempt 'delivered', 'retry' or "
            "'refused' (given up)",
            ["outcome"],
            registry=registry,
        )
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "bfd_dicom_held_bytes": ("memory held for studies not yet answered", lambda: node.collector.held_bytes),
            "bfd_dicom_receiving_bytes": (
                "memory taken by instances still arriving over DIMSE (counted against the same budget)",
                lambda: node.room.gate.receiving_bytes,
            ),
            "bfd_dicom_held_bytes_budget": ("the held-bytes budget", lambda: node.config.held_bytes_budget),
            "bfd_dicom_waiting_studies": ("studies receiving (not quiet yet)", lambda: node.collector.waiting_studies),
            "bfd_dicom_analyses_in_progress": (
                "instances analysed or being analysed whose study is not answered yet",
                lambda: node.analyser.in_progress,
            ),
            "bfd_dicom_spool_bytes": (
                "bytes of received instances in the spool (0 without one)",
                lambda: node.spool.bytes_kept if node.spool is not None else 0,
            ),
        }
        for name, (description, read) in gauges.items():
            Gauge(name, description, registry=registry).set_function(read)

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


class NodeMetricsEvents(NodeEvents):
    """The DICOM node's events, counted in the app's Prometheus registry (after `Metrics.track_node`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def instance(self, door: str, status: int) -> None:
        self.metrics.dicom_instances.labels(door, f"{status:#06x}").inc()

    def recovered(self, instances: int) -> None:
        self.metrics.dicom_recovered.inc(instances)

    def answered(self, instances: int, objects: int) -> None:
        self.metrics.dicom_studies.inc()
        self.metrics.dicom_objects.labels("made").inc(objects)

    def delivery(self, outcome: str, objects: int) -> None:
        self.metrics.dicom_objects.labels(outcome).inc(objects)

    def tls_refused(self) -> None:
        self.metrics.dicom_tls_refused.inc()

    def own_result(self, door: str) -> None:
        self.metrics.dicom_own_results.labels(door).inc()


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
