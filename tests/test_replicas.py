"""Three replicas behind HAProxy, one killed with SIGKILL under load: nothing stored is lost, only what was in flight
on it fails, HAProxy takes it out within its checks, and its pending DICOM results reach the destination once.

The run is `loadtest.failover` (`python -m loadtest.failover` for the full 60 s; README "Replicas and failover")
with CI-friendly durations: 20 s of open-loop load at 70% of the capacity measured through HAProxy, the kill at
8 s. The replicas are `bfd serve` processes, not containers. HAProxy comes from Debian's package: without it the
test skips loudly, or fails where BFD_REQUIRE_HAPROXY=1 (CI sets it).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from factories import build_tiny_bundle
from postgres_server import PostgresServer

from loadtest.failover import Plan, run, summary
from loadtest.haproxy import HaproxyUnavailable, find_haproxy

REQUIRE_ENV = "BFD_REQUIRE_HAPROXY"


@pytest.fixture
def haproxy() -> None:
    try:
        find_haproxy()
    except HaproxyUnavailable as error:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"HAProxy is required here ({REQUIRE_ENV}=1) but cannot run: {error}")
        pytest.skip(f"!!! replica failover test SKIPPED: {error} !!!")


@pytest.mark.usefixtures("haproxy")
def test_a_replica_killed_under_load_loses_nothing(postgres: PostgresServer, tmp_path: Path) -> None:
    plan = Plan(
        bundle=build_tiny_bundle(tmp_path / "bundle"),
        postgres=postgres.url,
        folder=tmp_path / "run",
        duration_s=20.0,
        kill_at_s=8.0,
        capacity_s=5.0,
        capacity_warmup_s=2.0,
        dicom_images=2,
    )
    report = asyncio.run(run(plan))
    print(summary(report))  # the figures, in the test's output
    http, detection, dicom = report["http"], report["detection"], report["dicom"]

    # every request counted, none stored and lost, only those in flight on the killed replica failed
    assert http["sent"] == http["answered"] + http["refused_503_retry_after"] + http["failed"]
    assert http["sent"] >= 10, http
    assert http["lost"] == 0, http["lost_ids"]
    assert http["stored_under_another_name"] == []
    assert http["failed_in_flight_on_killed"] == http["failed"], http["failures"]
    assert http["answered"] >= 0.8 * http["sent"], http  # 70% of capacity: the survivors keep up
    # HAProxy: DOWN after `fall` failed checks, nothing sent to it afterwards
    assert detection["down_ms_after_kill"] is not None, detection
    assert detection["down_ms_after_kill"] <= (plan.fall + 1) * plan.check_interval_ms, detection
    assert http["sent_to_killed_after_down"] == 0
    # DICOM: what the killed replica had leased reaches the destination once, from a survivor, after the lease
    assert dicom["pending_on_killed_at_kill"] == dicom["objects"] == 1 + 2 * plan.dicom_images
    assert dicom["exactly_once"], dicom
    assert dicom["delivered_by_killed"] == 0
    assert dicom["first_delivery_s_after_lease_end"] >= -0.5, dicom  # not before the lease ran out
    assert dicom["outbox_after"] == {"delivered": dicom["objects"], "payload_kept": 0}
    assert report["survivor_log_errors"] == {"r2": [], "r3": []}
