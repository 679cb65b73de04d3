"""Statistics of a load step: latency percentiles, outcomes by status, and the server's Prometheus histograms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

Json = dict[str, Any]
PREDICT = "/v1/predict"


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
