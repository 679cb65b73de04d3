"""What the predictor reports as it works, for whoever counts it (the service's Prometheus metrics).

The core knows nothing of a metrics library: it calls these hooks, which do nothing here. A door that wants
counters subclasses `PredictorEvents` (`service.metrics.MetricsEvents`).
"""

from __future__ import annotations

from inference.batching import BatchStats, RefusalReason


class PredictorEvents:
    """No-op hooks; every one is called on the event-loop thread and must return at once."""

    def refused(self, reason: RefusalReason | str) -> None:
        """Images refused before any work: 'deadline', 'queue_full' or 'memory'."""

    def decode_skipped(self) -> None:
        """An image whose decode never ran: a sibling failed, or its caller went away first."""

    def answered(self, images: int) -> None:
        """Images through the models."""

    def batch(self, stats: BatchStats) -> None:
        """One batch's outcome (its size, the cancelled items it skipped, the model's time)."""
