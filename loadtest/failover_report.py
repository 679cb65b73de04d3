"""The failover run's accounting (`loadtest.failover`): every request sorted and matched to HAProxy's log, every
DICOM result object matched to what the destination acknowledged, and the figures as lines of text.

Pure functions of what the run recorded; nothing here starts or stops anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.dicom_destination import RecordingDestination
from loadtest.haproxy import LoggedRequest
from loadtest.stats import percentiles

Json = dict[str, Any]
CLOCK_SLACK_S = 0.01  # HAProxy logs milliseconds; our clock reads microseconds


@dataclass
class Attempt:
    """One POST /api/analysis of the load: when (wall clock, for matching HAProxy's log) and what came back."""

    request_id: str
    name: str
    offset_s: float  # scheduled, from the start of the load
    sent_wall_s: float
    done_wall_s: float
    latency_ms: float  # from the scheduled time
    status: str  # HTTP status, or 'transport:<exception>'
    retry_after: bool
    analysis_id: int | None

    @property
    def outcome(self) -> str:
        if self.status == "201":
            return "answered"
        if self.status == "503" and self.retry_after:
            return "refused"
        return "failed"


def _where(attempt: Attempt, logged: LoggedRequest | None, killed: str, kill_wall_s: float) -> Json:
    """A failed request as the client and HAProxy saw it: which server, sent, accepted and ended relative to the
    kill. In flight on the killed replica: HAProxy's line names it, accepted before the kill and ended after."""
    seen: Json = {
        "request_id": attempt.request_id,
        "status": attempt.status,
        "sent_s_before_kill": round(kill_wall_s - attempt.sent_wall_s, 3),
        "failed_s_after_kill": round(attempt.done_wall_s - kill_wall_s, 3),
    }
    if logged is None:
        return seen | {"haproxy": None, "in_flight_on_killed": False}
    in_flight = (
        logged.server == killed
        and logged.accept_wall_s < kill_wall_s + CLOCK_SLACK_S
        and logged.end_wall_s >= kill_wall_s - CLOCK_SLACK_S
    )
    return seen | {
        "server": logged.server,
        "termination": logged.termination,
        "accepted_s_before_kill": round(kill_wall_s - logged.accept_wall_s, 3),
        "ended_s_after_kill": round(logged.end_wall_s - kill_wall_s, 3),
        "in_flight_on_killed": in_flight,
    }


def count_requests(
    attempts: Sequence[Attempt],
    logged: dict[str, LoggedRequest],
    stored: dict[int, str],
    killed: str,
    kill_wall_s: float,
    down_wall_s: float | None,
) -> Json:
    """Every request of the load sorted into answered, refused and failed; failures matched to HAProxy's log;
    stored analyses checked against the 201s."""
    by_outcome: dict[str, list[Attempt]] = {"answered": [], "refused": [], "failed": []}
    for attempt in attempts:
        by_outcome[attempt.outcome].append(attempt)
    answered_ids = {a.analysis_id: a.name for a in by_outcome["answered"] if a.analysis_id is not None}
    lost = sorted(i for i in answered_ids if i not in stored)
    misnamed = sorted(i for i, name in answered_ids.items() if i in stored and stored[i] != name)
    unanswered_names = {a.name for a in attempts if a.outcome != "answered"}
    failures = [_where(a, logged.get(a.request_id), killed, kill_wall_s) for a in by_outcome["failed"]]
    ours = [r for r in logged.values() if r.request_id.startswith("f")]
    after_down = [r for r in ours if r.server == killed and down_wall_s is not None and r.accept_wall_s > down_wall_s]
    answered = by_outcome["answered"]
    return {
        "sent": len(attempts),
        "answered": len(answered),
        "refused_503_retry_after": len(by_outcome["refused"]),
        "failed": len(by_outcome["failed"]),
        "failed_by_status": dict(Counter(a.status for a in by_outcome["failed"])),
        "failed_in_flight_on_killed": sum(f["in_flight_on_killed"] for f in failures),
        "failures": failures,
        "lost": len(lost),
        "lost_ids": lost,
        "stored_under_another_name": misnamed,
        "stored_without_an_answer": sorted(name for name in stored.values() if name in unanswered_names),
        "sent_to_killed_after_down": len(after_down),
        "redispatched": sum(r.retries.startswith("+") for r in ours),
        "by_server": dict(Counter(r.server for r in ours)),
        "answered_latency_ms": percentiles([a.latency_ms for a in answered]),
        "answered_latency_ms_after_kill": percentiles([a.latency_ms for a in answered if a.sent_wall_s >= kill_wall_s]),
    }


def count_deliveries(
    destination: RecordingDestination, rows_before: Json, expected: set[str], killed_ae: str, kill_wall_s: float
) -> Json:
    """The destination's receipts against the objects pending on the killed replica: each once, from whom, when."""
    acknowledged = destination.acknowledged()
    receipts = [r for r in destination.receipts if r.acknowledged]
    times = [r.wall_s for r in receipts]
    lease_end = float(rows_before["lease_end_wall_s"])
    return {
        "objects": len(expected),
        "pending_on_killed_at_kill": rows_before["leased"],
        "lease_s": rows_before["lease_s"],
        "killed_s_after_claim": round(kill_wall_s - rows_before["claim_wall_s"], 2),
        "lease_end_s_after_kill": round(lease_end - kill_wall_s, 2),
        "first_delivery_s_after_kill": round(min(times) - kill_wall_s, 2) if times else None,
        "last_delivery_s_after_kill": round(max(times) - kill_wall_s, 2) if times else None,
        "first_delivery_s_after_lease_end": round(min(times) - lease_end, 2) if times else None,
        "delivered_by": dict(Counter(r.calling_ae for r in receipts)),
        "delivered_by_killed": sum(r.calling_ae == killed_ae for r in receipts),
        "missing": sorted(expected - set(acknowledged)),
        "duplicates": sorted(uid for uid, n in acknowledged.items() if n > 1),
        "unexpected": sorted(set(acknowledged) - expected),
        "held_unacknowledged_on_killed": sum(
            (not r.acknowledged) and r.calling_ae == killed_ae for r in destination.receipts
        ),
        "exactly_once": set(acknowledged) == expected and all(n == 1 for n in acknowledged.values()),
    }


def summary(report: Json) -> str:
    """The figures a reader wants, one line each."""
    http, detection, dicom = report["http"], report["detection"], report["dicom"]
    capacity, latency = report["capacity"], http["answered_latency_ms"]
    lines = [
        f"replicas: {report['plan']['replicas']} bfd serve processes behind HAProxy, ready in "
        f"{report['replicas_ready_s']} s; database {report['database']}",
        f"capacity: {capacity['answered_per_s']:.2f} analyses/s (closed loop, {capacity['concurrency']} clients)"
        if capacity
        else "capacity: not measured (--rate given)",
        f"load: {report['rate_per_s']:.2f} requests/s open loop for {report['plan']['duration_s']:g} s; r1 killed "
        f"(SIGKILL) at {report['kill_s_after_load_start']:g} s; the load's last answer at {report['load_s']:g} s",
        f"requests: sent {http['sent']}, answered {http['answered']}, refused (503 + Retry-After) "
        f"{http['refused_503_retry_after']}, failed {http['failed']} {http['failed_by_status']} "
        f"({http['failed_in_flight_on_killed']} of them in flight on r1 when it died), lost {http['lost']}; "
        f"stored without an answer {len(http['stored_without_an_answer'])}",
        f"HAProxy: r1 DOWN {detection['down_ms_after_kill']} ms after the kill (first change "
        f"'{detection['first_change']}' after {detection['first_change_ms_after_kill']} ms); requests sent to it "
        f"after DOWN {http['sent_to_killed_after_down']}; redispatched {http['redispatched']}; by server "
        f"{http['by_server']}",
        f"answered latency: p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms",
        f"DICOM: {dicom['objects']} result objects leased by r1 at the kill ({dicom['killed_s_after_claim']} s after "
        f"its claim); lease ended {dicom['lease_end_s_after_kill']} s after the kill; delivered by "
        f"{dicom['delivered_by']} "
        f"from {dicom['first_delivery_s_after_kill']} s to {dicom['last_delivery_s_after_kill']} s after the kill; "
        f"exactly once: {dicom['exactly_once']} (missing {len(dicom['missing'])}, duplicates "
        f"{len(dicom['duplicates'])}); held unanswered on r1's association: {dicom['held_unacknowledged_on_killed']}",
        f"r1's worker processes alive a moment after its SIGKILL: {report['orphans_alive_after_kill']}",
    ]
    return "\n".join(lines)
