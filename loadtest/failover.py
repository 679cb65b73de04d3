"""Failover: replicas behind HAProxy under open-loop load, one killed with SIGKILL, every request counted.

    python -m loadtest.failover --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/postgres

On a fresh database of that PostgreSQL server (created per run, kept for inspection), `--replicas` `bfd serve`
processes (not containers: README "Replicas and failover") start at the same moment, each with its DICOM node on
(its own DIMSE port, one destination: a storage SCP of this process, `loadtest.dicom_destination`), behind HAProxy
from Debian (`loadtest.haproxy`: /readyz checked every 500 ms, DOWN after 2 failures, connection failures retried
on another server). Then:
1. capacity: a closed loop through HAProxy on `POST /api/analysis` with the realistic radiographs
   (`loadtest.images.realistic_image_set`); the load's rate is `--load-fraction` of it (or `--rate`);
2. open-loop load (Poisson arrivals) for `--duration-s`, every request named and tagged (X-Request-Id);
3. results pending on the replica to be killed, `--dicom-lead-s` before the kill: the destination holds (takes
   C-STOREs in, answers none) and a study is C-STOREd to replica r1's DICOM port; r1 answers it, puts its result
   objects in the shared outbox, leases them and starts sending; the run waits until every object is leased and
   only r1 is sending;
4. at `--kill-at-s`, r1 gets SIGKILL and the destination starts accepting. HAProxy's stats socket says when it
   marked r1 DOWN; its log says where each request went;
5. counted: every request sent is answered (201), refused (503 with Retry-After) or failed (anything else); each
   failure is matched to HAProxy's log line (failed ones must have been in flight on r1 when it died); the ids
   answered 201 are looked up in `GET /api/analysis` (lost: answered, not stored); the destination must hold every
   result object exactly once, sent by a survivor once r1's lease ran out (120 s: `dicom_node.sender` leases for
   `max(60, 4 x the delivery timeout of 30 s)`; neither is a setting, so the run lasts about two minutes past the
   kill, whatever `--duration-s` says).
On a 2-core machine replicas add no throughput (they share the cores): this is about failover and consistency.
The accounting and the printed figures are `loadtest.failover_report`'s; HAProxy is `loadtest.haproxy`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydicom
from pynetdicom import AE

from dicom_node.config import NodeConfig
from loadtest.dicom_destination import RecordingDestination
from loadtest.dicom_studies import XRAY, make_study, part10_bytes
from loadtest.drivers import Lanes, Upload, poisson_schedule
from loadtest.failover_report import Attempt, count_deliveries, count_requests, summary
from loadtest.haproxy import REQUEST_ID, HAProxy
from loadtest.images import ATTRIBUTION, realistic_image_set
from loadtest.machine import machine_description
from loadtest.replicas import create_database, outbox_rows, replica_env, start_replicas, stop_all
from loadtest.servers import Server, free_port
from loadtest.stats import percentiles

Json = dict[str, Any]
ANALYSIS = "/api/analysis"
DELIVERY_TIMEOUT_S = NodeConfig.delivery_timeout_s  # a held C-STORE gives up after it (not a setting)
LEASE_S = max(60.0, 4 * DELIVERY_TIMEOUT_S)  # as dicom_node.sender.DeliveryLoop leases: 120 s (not a setting)
MAX_IN_FLIGHT = 256


@dataclass
class Plan:
    bundle: Path
    postgres: str  # a postgresql+asyncpg URL of the server (any database of it): each run creates a fresh one
    folder: Path  # logs, HAProxy's config, the report
    images: Path = XRAY
    replicas: int = 3
    duration_s: float = 60.0
    kill_at_s: float = 20.0
    dicom_lead_s: float = 10.0  # the study goes to the replica to be killed this long before the kill
    load_fraction: float = 0.7
    rate: float | None = None  # requests/s; None: load_fraction x the capacity measured first
    capacity_s: float = 10.0
    capacity_warmup_s: float = 3.0
    capacity_concurrency: int = 6
    check_interval_ms: int = 500
    fall: int = 2
    dicom_images: int = 3
    delivery_wait_s: float = 60.0  # how long past the lease's end the run waits for the last result object
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the setting when the run cannot show what it is for."""
        if self.replicas < 2:
            raise ValueError(f"replicas must be at least 2 (one is killed, one must survive), got {self.replicas}")
        if not 0 < self.kill_at_s < self.duration_s:
            raise ValueError(f"kill_at_s must be inside the load (0, {self.duration_s:g}), got {self.kill_at_s:g}")
        if not 3 <= self.dicom_lead_s <= DELIVERY_TIMEOUT_S - 10:
            raise ValueError(
                f"dicom_lead_s must be 3..{DELIVERY_TIMEOUT_S - 10:g}, got {self.dicom_lead_s:g}: the study needs a "
                f"few seconds to be answered and its results leased, and the replica's held delivery gives up after "
                f"{DELIVERY_TIMEOUT_S:g} s, giving its lease back itself before it is killed"
            )
        if self.dicom_images < 1:
            raise ValueError(f"dicom_images must be at least 1, got {self.dicom_images}")


def analysis_body(name: str, data: bytes, media_type: str, boundary: str) -> bytes:
    """A one-image multipart body for POST /api/analysis; the file name becomes the stored image name."""
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
    head += f"Content-Type: {media_type}\r\n\r\n"
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode()


class AnalysisLanes(Lanes):
    """`loadtest.drivers.Lanes` posting to /api/analysis, each request named and tagged for HAProxy's log.

    One connection per request (`Connection: close`): a request that dies with its replica is then answered 502
    by HAProxy and logged, naming the replica. On a kept-alive client connection HAProxy answers such a request,
    unless it is the connection's first, by closing the connection without an answer or a log line, as the
    server itself would have (the client sees 'server disconnected'; browsers retry): still a failure, counted
    here, but one HAProxy's log could not show in flight.
    """

    boundary = f"bfd-failover-{uuid.uuid4().hex}"

    async def analyse(self, request_id: str, name: str, upload: Upload, offset_s: float, due: float) -> Attempt:
        media_type = upload[2] if len(upload) > 2 else "image/jpeg"
        body = analysis_body(name, upload[1], media_type, self.boundary)
        headers = {
            "content-type": f"multipart/form-data; boundary={self.boundary}",
            "connection": "close",
            REQUEST_ID: request_id,
        }
        client = await self._acquire()
        sent = time.time()
        try:
            response = await client.post(ANALYSIS, content=body, headers=headers)
        except httpx.HTTPError as error:
            done = time.time()
            status, retry_after, analysis_id = f"transport:{type(error).__name__}", False, None
        else:
            done = time.time()
            status, retry_after = str(response.status_code), "retry-after" in response.headers
            analysis_id = int(response.json()["id"]) if response.status_code == 201 else None
        finally:
            self.idle.put_nowait(client)
        latency_ms = (time.perf_counter() - due) * 1e3
        return Attempt(request_id, name, offset_s, sent, done, latency_ms, status, retry_after, analysis_id)


async def measure_capacity(url: str, uploads: Sequence[Upload], plan: Plan) -> Json:
    """Answers (201) per second of a closed loop of `capacity_concurrency` clients, after a warm-up."""
    lanes = AnalysisLanes(url, plan.capacity_concurrency)
    window_start = time.time() + plan.capacity_warmup_s
    window_end = window_start + plan.capacity_s
    attempts: list[Attempt] = []

    async def worker(k: int) -> None:
        i = k
        while time.time() < window_end:
            upload = uploads[i % len(uploads)]
            name = f"capacity-{i:05d}-{upload[0]}"
            attempts.append(await lanes.analyse(f"c{i}", name, upload, 0.0, time.perf_counter()))
            i += plan.capacity_concurrency

    try:
        await asyncio.gather(*(worker(k) for k in range(plan.capacity_concurrency)))
    finally:
        await lanes.aclose()
    in_window = [a for a in attempts if window_start <= a.done_wall_s <= window_end]
    answered = [a for a in in_window if a.outcome == "answered"]
    return {
        "concurrency": plan.capacity_concurrency,
        "seconds": plan.capacity_s,
        "answered_per_s": len(answered) / plan.capacity_s,
        "statuses": dict(Counter(a.status for a in in_window)),
        "latency_ms": percentiles([a.latency_ms for a in answered]),
    }


async def open_loop(
    url: str,
    uploads: Sequence[Upload],
    rate: float,
    plan: Plan,
    prepare: Callable[[], Awaitable[Json]],
    kill: Callable[[], float],
) -> tuple[list[Attempt], float, float, Json]:
    """Poisson arrivals at `rate` for `duration_s`. `prepare()` starts `dicom_lead_s` before `kill_at_s`; `kill()`
    runs at `kill_at_s`, or once `prepare()` is done if that is later. Returns the attempts, the wall times of the
    load's start and of the kill, and what `prepare()` returned."""
    schedule = poisson_schedule(rate, plan.duration_s, plan.seed)
    lanes = AnalysisLanes(url, MAX_IN_FLIGHT)
    start, start_wall_s = time.perf_counter(), time.time()

    async def killer() -> tuple[float, Json]:
        prepare_at = start + max(0.0, plan.kill_at_s - plan.dicom_lead_s)
        await asyncio.sleep(max(0.0, prepare_at - time.perf_counter()))
        preparing = asyncio.ensure_future(prepare())
        await asyncio.sleep(max(0.0, start + plan.kill_at_s - time.perf_counter()))
        prepared = await preparing
        return kill(), prepared

    try:
        killing = asyncio.ensure_future(killer())
        tasks = []
        for i, offset in enumerate(schedule):
            due = start + offset
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            if killing.done() and killing.exception() is not None:
                break  # the run cannot show what it is for: say why, without waiting out the load
            upload = uploads[i % len(uploads)]
            name = f"failover-{i:05d}-{upload[0]}"
            tasks.append(asyncio.ensure_future(lanes.analyse(f"f{i}", name, upload, offset, due)))
        attempts = list(await asyncio.gather(*tasks))
        killed_wall_s, prepared = await killing
    finally:
        await lanes.aclose()
    return attempts, start_wall_s, killed_wall_s, prepared


async def stored_names(url: str) -> dict[int, str]:
    """Every stored analysis, id -> image name, read page by page through the load balancer."""
    found: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        offset = 0
        while True:
            response = await client.get(ANALYSIS, params={"limit": 200, "offset": offset})
            response.raise_for_status()
            page = response.json()
            found.update({int(item["id"]): str(item["image_name"]) for item in page["items"]})
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return found


def send_study(port: int, called_ae: str, images: int) -> list[int]:
    """C-STORE a new study of `images` radiographs to a node; the status of each."""
    datasets = [pydicom.dcmread(io.BytesIO(part10_bytes(ds))) for ds in make_study(images)]
    ae = AE(ae_title="FAILOVERSCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"no association with the node at port {port} ({called_ae})")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


async def results_pending_on(
    database_url: str, destination: RecordingDestination, ae_title: str, expected: int, timeout_s: float
) -> Json:
    """Wait until the outbox holds `expected` objects, every one leased, and only `ae_title` is sending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await outbox_rows(database_url)
        now = datetime.now(UTC)
        leased = [r for r in rows if r.claimed_until is not None and r.claimed_until > now and r.delivered_at is None]
        senders = {calling for _, calling in list(destination.holding)}
        if len(rows) == expected and len(leased) == expected and senders == {ae_title}:
            ends = [r.claimed_until.timestamp() for r in leased if r.claimed_until is not None]
            return {
                "objects": expected,
                "leased": len(leased),
                "senders_held": sorted(senders),
                "lease_end_wall_s": max(ends),
                "claim_wall_s": min(ends) - LEASE_S,
                "lease_s": LEASE_S,
            }
        await asyncio.sleep(0.2)
    raise RuntimeError(
        f"results not pending on {ae_title} after {timeout_s:g} s: {len(rows)} outbox rows (expected {expected}), "
        f"{len(leased)} leased, destination holding C-STOREs from {sorted(senders)}"
    )


def kill_now(server: Server) -> tuple[float, list[psutil.Process]]:
    """SIGKILL `server`; the wall time just before, and its child processes as they were."""
    try:
        children = server.ps.children(recursive=True)
    except psutil.Error:
        children = []
    killed_wall_s = time.time()
    server.process.kill()
    server.process.wait(timeout=30)
    return killed_wall_s, children


def _error_lines(server: Server) -> list[str]:
    text = server.log_text()
    return [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]


async def run(plan: Plan) -> Json:
    """The whole run (see the module docstring); the report as JSON-ready data."""
    plan.check()
    uploads = realistic_image_set(plan.images)
    database_url = await create_database(
        plan.postgres, f"bfd_failover_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
    )
    destination = RecordingDestination()
    names = [f"r{k + 1}" for k in range(plan.replicas)]
    ae_titles = {name: f"BFD{name.upper()}" for name in names}
    dicom_ports = {name: free_port() for name in names}
    envs = {
        name: replica_env(
            database_url,
            BFD_DICOM_PORT=str(dicom_ports[name]),
            BFD_DICOM_AE_TITLE=ae_titles[name],
            BFD_DICOM_DESTINATION=destination.address,
            BFD_DICOM_OUTPUTS="sr,gsps,sc",
            BFD_DICOM_QUIET_S="1",
            BFD_DICOM_RETRY_INITIAL_S="0.5",
            BFD_DICOM_RETRY_MAX_S="2",
            BFD_DICOM_AUDIT_LOG=str(plan.folder / f"{name}-audit.jsonl"),
        )
        for name in names
    }
    report: Json = {
        "started_at": datetime.now(UTC).isoformat(),
        "machine": machine_description(),
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()},
        "database": database_url.rsplit("/", 1)[1],
        "replicas_are": "bfd serve processes, not containers",
    }
    started = time.monotonic()
    servers = start_replicas(plan.bundle, plan.folder, envs)
    report["replicas_ready_s"] = round(time.monotonic() - started, 1)
    by_name = {s.name: s for s in servers}
    killed_name = names[0]
    victim = by_name[killed_name]
    orphans: list[psutil.Process] = []
    proxy: HAProxy | None = None
    try:
        ports = {s.name: int(s.url.rsplit(":", 1)[1]) for s in servers}
        proxy = HAProxy(
            plan.folder / "haproxy", ports, free_port(), check_interval_ms=plan.check_interval_ms, fall=plan.fall
        )
        proxy.wait_until_up()
        capacity = None
        if plan.rate is None:
            capacity = await measure_capacity(proxy.url, uploads, plan)
            rate = plan.load_fraction * capacity["answered_per_s"]
        else:
            rate = plan.rate
        report["capacity"] = capacity
        report["rate_per_s"] = rate

        async def prepare() -> Json:
            """Results pending on r1: the destination holds, r1 answers a study and leases its results."""
            destination.hold()
            statuses = await asyncio.to_thread(
                send_study, dicom_ports[killed_name], ae_titles[killed_name], plan.dicom_images
            )
            objects = 1 + 2 * plan.dicom_images
            pending = await results_pending_on(database_url, destination, ae_titles[killed_name], objects, 60.0)
            return pending | {"sent_statuses": statuses}

        def kill() -> float:
            killed_wall_s, children = kill_now(victim)
            orphans.extend(children)
            destination.accept()
            return killed_wall_s

        attempts, start_wall_s, kill_wall_s, pending = await open_loop(proxy.url, uploads, rate, plan, prepare, kill)
        expected = {r.sop_instance_uid for r in await outbox_rows(database_url)}
        load_end_wall_s = time.time()
        down = proxy.first_change(killed_name, "DOWN", kill_wall_s)
        first_not_up = next((c for c in proxy.changes if c.server == killed_name and c.wall_s >= kill_wall_s), None)

        deadline = pending["lease_end_wall_s"] + plan.delivery_wait_s
        while set(destination.acknowledged()) < expected and time.time() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)  # a few delivery rounds more: a second copy would show up now
        rows_after = await outbox_rows(database_url)

        stored = await stored_names(proxy.url)
        logged = proxy.requests()
        report["orphans_alive_after_kill"] = sum(p.is_running() for p in orphans)
        report["http"] = count_requests(
            attempts, logged, stored, killed_name, kill_wall_s, down.wall_s if down is not None else None
        )
        report["detection"] = {
            "check": f"GET /readyz every {plan.check_interval_ms} ms, DOWN after {plan.fall} failures",
            "down_ms_after_kill": round((down.wall_s - kill_wall_s) * 1e3) if down else None,
            "first_change_ms_after_kill": round((first_not_up.wall_s - kill_wall_s) * 1e3) if first_not_up else None,
            "first_change": first_not_up.status if first_not_up else None,
            "changes": [
                {"server": c.server, "status": c.status, "ms_after_kill": round((c.wall_s - kill_wall_s) * 1e3)}
                for c in proxy.changes
            ],
        }
        report["dicom"] = count_deliveries(destination, pending, expected, ae_titles[killed_name], kill_wall_s)
        report["dicom"]["outbox_after"] = {
            "delivered": sum(r.delivered_at is not None for r in rows_after),
            "payload_kept": sum(r.has_payload for r in rows_after),
        }
        report["kill_s_after_load_start"] = round(kill_wall_s - start_wall_s, 2)
        report["load_s"] = round(load_end_wall_s - start_wall_s, 1)
        report["dicom"]["sent_statuses"] = pending["sent_statuses"]
        report["survivor_log_errors"] = {s.name: _error_lines(s)[:5] for s in servers if s is not victim}
    finally:
        if proxy is not None:
            proxy.stop()
        if victim.process.poll() is None:
            victim.process.kill()
        stop_all([s for s in servers if s is not victim])
        victim.log_file.close()
        for process in orphans:  # item 6 of issue 25: a killed server's workers outlive it; ours go now
            if process.is_running():
                process.kill()
        destination.close()
    report["finished_at"] = datetime.now(UTC).isoformat()
    report["attribution"] = ATTRIBUTION
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options left out are left out of the namespace too: Plan's defaults are the run's (one place)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--postgres", required=True, help="postgresql+asyncpg:// URL of the server (any database)")
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--images", type=Path, help="radiographs, by part (default: tests/data/xray)")
    parser.add_argument("--replicas", type=int, help=f"default {Plan.replicas}")
    parser.add_argument("--duration-s", type=float, help=f"default {Plan.duration_s:g}")
    parser.add_argument("--kill-at-s", type=float, help=f"default {Plan.kill_at_s:g}")
    parser.add_argument(
        "--dicom-lead-s", type=float, help=f"the study goes to r1 this long before (default {Plan.dicom_lead_s:g})"
    )
    parser.add_argument("--load-fraction", type=float, help=f"default {Plan.load_fraction:g}")
    parser.add_argument("--rate", type=float, help="requests/s instead of measuring capacity")
    parser.add_argument("--capacity-s", type=float, help=f"default {Plan.capacity_s:g}")
    parser.add_argument("--dicom-images", type=int, help=f"default {Plan.dicom_images}")
    parser.add_argument("--seed", type=int, help=f"default {Plan.seed}")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/failover"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(folder=args.out, **{name: value for name, value in vars(args).items() if name != "out"})
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(plan))
    (args.out / "failover.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"report: {args.out / 'failover.json'}; logs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
