"""What the DICOM node reports as it works, for whoever counts it (the service's Prometheus metrics).

As with the predictor's `inference.events`, the node knows nothing of a metrics library: it calls these
hooks, which do nothing here; the service subclasses `NodeEvents` (`service.metrics.NodeMetricsEvents`).
"""

from __future__ import annotations

from dicom_node.studies import Door


class NodeEvents:
    """No-op hooks; every one is called on the event-loop thread and must return at once."""

    def instance(self, door: Door, status: int) -> None:
        """One instance answered at a door: 0x0000 'stored' (taken), or the status it was refused with."""

    def own_result(self, door: Door) -> None:
        """One of the node's own result objects came back (a routing loop): answered 'stored', not analysed."""

    def recovered(self, instances: int) -> None:
        """Instances a previous run received and did not answer, taken back from the spool at start-up."""

    def answered(self, instances: int, objects: int) -> None:
        """A study answered: its instances, and the result objects put in the outbox for it."""

    def tls_refused(self) -> None:
        """A connection to the TLS port turned away at the handshake (plain TCP, an untrusted certificate, silence)."""

    def delivery(self, outcome: str, objects: int) -> None:
        """One delivery attempt of `objects` result objects: 'delivered', 'retry' or 'refused' (given up); or
        'readdressed': pending for a destination no longer configured, moved to the one configured now."""
