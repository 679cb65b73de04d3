"""The DICOM node's throughput beside the HTTP path's, on the same radiographs, in ONE run.

    python -m loadtest.bench_dicom --bundle models/demo --out loadtest/results

A study set of --instances DICOM instances (--per-study each; CR and DX from the repository's FracAtlas
radiographs, resized to --rows x --columns at 12 bits, uncompressed: the size of a real DX) is built once.
Then, against one `bfd serve` with its DICOM node on and a real Orthanc as the PACS on both sides:
1. HTTP: the instances as application/dicom uploads to /v1/predict, closed loop at --concurrency, after a
   warm-up: img/s (what an HTTP client gets: decode and inference, no heatmap, no result objects);
2. DICOM: the study set is put in Orthanc first; then, on the clock, Orthanc C-STOREs it to the node, one job
   per study and --associations jobs (associations) at once, as a PACS routes studies to an AI node, and the
   node's results (an SR per study, a GSPS and an SC per image) are C-STOREd back into the same studies.
   instances/s = instances / the time until the last result object is in Orthanc.
Target: DICOM instances/s >= 80% of the HTTP img/s. Orthanc, the client and the service share the machine, so
each phase also reports the CPU seconds each process spent, per image, and the service's peak RSS (with its
child processes, sampled every 0.1 s).
JSON and Markdown go to --out (`dicom_benchmark.{json,md}`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.dataset import Dataset

from loadtest.dicom_studies import make_study, part10_bytes
from loadtest.drivers import closed_loop, encode_bodies
from loadtest.images import ATTRIBUTION
from loadtest.machine import machine_description
from loadtest.orthanc import OrthancServer
from loadtest.servers import Server, bfd_serve, cpu_times, free_port

Json = dict[str, Any]
TARGET_RATIO = 0.8
NODE_MODALITY = "bfd"  # the node, as Orthanc knows it


def study_set(instances: int, per_study: int, rows: int, columns: int) -> list[Dataset]:
    out: list[Dataset] = []
    while len(out) < instances:
        n = min(per_study, instances - len(out))
        study = make_study(n, modality="mixed", bits_stored=12, body_parts=["hand", "shoulder"], size=(rows, columns))
        out.extend(pydicom.dcmread(io.BytesIO(part10_bytes(ds))) for ds in study)
    return out


class CpuMeter:
    """CPU seconds each process spent between `start()` and `stop()`: where the machine's time went (system
    time apart: moving 10 MB instances over loopback sockets is the kernel's work)."""

    def __init__(self, processes: dict[str, psutil.Process], client: psutil.Process) -> None:
        self.processes = processes
        self.client = client  # this process: its children (the service, Orthanc) are counted on their own
        self._started: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._started = self._now()

    def _now(self) -> dict[str, tuple[float, float]]:
        now = {name: cpu_times(process) for name, process in self.processes.items()}
        return {**now, "benchmark client": cpu_times(self.client, children=False)}

    def stop(self, count: int) -> Json:
        now = self._now()
        user = {name: now[name][0] - self._started[name][0] for name in now}
        system = {name: now[name][1] - self._started[name][1] for name in now}
        return {
            "cpu_s": {name: round(user[name] + system[name], 2) for name in now},
            "cpu_ms_per_image": {name: round((user[name] + system[name]) / count * 1e3, 1) for name in now},
            "system_ms_per_image": {name: round(system[name] / count * 1e3, 1) for name in now},
        }


class PeakRss:
    """The service's largest resident memory (with its child processes, unless told not to) between `start()`
    and `stop()`."""

    def __init__(self, server: Server, every_s: float = 0.1, children: bool = True) -> None:
        self.server = server
        self.every_s = every_s
        self.children = children
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._before = self._peak = 0.0

    def start(self) -> None:
        self._before = self._peak = self.server.rss_mb(self.children)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            rss = self.server.rss_mb(self.children)
            if rss == rss:  # NaN while a child process is starting or ending
                self._peak = max(self._peak, rss)

    def stop(self) -> Json:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {"rss_mb": {"before": round(self._before), "max": round(self._peak)}}


def push_from_orthanc(orthanc: OrthancServer, study_ids: Sequence[str], timeout_s: float) -> Json:
    """Orthanc (the PACS) C-STOREs every study to the node, one asynchronous job per study, as many jobs at once as
    its ConcurrentJobs; a failed job (e.g. 0xA700 answered for longer than the node holds a sender) is re-run."""
    jobs = {orthanc.store_to_modality(NODE_MODALITY, [study], synchronous=False)["ID"]: study for study in study_ids}
    failures: list[str] = []
    resubmitted = 0
    deadline = time.perf_counter() + timeout_s
    while jobs and time.perf_counter() < deadline:
        for job, study in list(jobs.items()):
            state = orthanc.job(job)["State"]
            if state == "Success":
                del jobs[job]
            elif state == "Failure":
                del jobs[job]
                resubmitted += 1
                if resubmitted > len(study_ids):
                    failures.append(f"study {study}: store job failed again")
                    continue
                jobs[orthanc.store_to_modality(NODE_MODALITY, [study], synchronous=False)["ID"]] = study
        time.sleep(0.1)
    failures.extend(f"study {study}: store job unfinished" for study in jobs.values())
    return {"store_jobs_rerun": resubmitted, "failures": failures}


def results_in(orthanc: OrthancServer, study_uids: Sequence[str], sources: int) -> int:
    """Result objects now in Orthanc for these studies: every instance there but the sources."""
    return sum(len(orthanc.instance_ids(uid)) for uid in study_uids) - sources


def dicom_path(
    orthanc: OrthancServer, datasets: Sequence[Dataset], meter: CpuMeter, memory: PeakRss, args: Any
) -> Json:
    for ds in datasets:  # the PACS holds the study set before the clock starts
        orthanc.upload(part10_bytes(ds))
    study_uids = sorted({str(ds.StudyInstanceUID) for ds in datasets})
    study_ids = [orthanc.find_study(uid) or "" for uid in study_uids]
    expected = len(study_uids) + 2 * len(datasets)  # an SR per study, a GSPS and an SC per image
    meter.start()
    memory.start()
    started = time.perf_counter()
    sent = push_from_orthanc(orthanc, study_ids, args.result_timeout_s)
    acknowledged = time.perf_counter()
    deadline = acknowledged + args.result_timeout_s
    have = 0
    while time.perf_counter() < deadline:
        have = results_in(orthanc, study_uids, len(datasets))
        if have >= expected:
            break
        time.sleep(0.25)
    finished = time.perf_counter()
    seconds = finished - started
    return {
        "instances": len(datasets),
        "studies": len(study_uids),
        "concurrent_store_jobs": args.associations,
        "seconds_until_all_acknowledged": round(acknowledged - started, 2),
        "seconds_until_last_result_in_orthanc": round(seconds, 2),
        "result_objects_expected": expected,
        "result_objects_in_orthanc": have,
        "instances_per_s": round(len(datasets) / seconds, 2) if have >= expected else 0.0,
        **sent,
        **meter.stop(len(datasets)),
        **memory.stop(),
    }


def http_path(server: Server, datasets: Sequence[Dataset], meter: CpuMeter, memory: PeakRss, args: Any) -> Json:
    uploads = [(str(ds.SOPInstanceUID), part10_bytes(ds), "application/dicom") for ds in datasets]
    bodies = encode_bodies(uploads)
    # a well-behaved client (it waits out Retry-After), as the PACS sender waits out 0xA700
    meter.start()
    memory.start()
    result = asyncio.run(
        closed_loop(server, bodies, args.concurrency, args.warmup_s, args.duration_s, False, honour_retry_after=True)
    )
    answered = max(1, round(result["throughput_img_s"] * (args.warmup_s + args.duration_s)))
    return {"concurrency": args.concurrency, **result, **meter.stop(answered), **memory.stop()}


def run(args: argparse.Namespace) -> Json:
    datasets = study_set(args.instances, args.per_study, args.rows, args.columns)
    folder = Path(tempfile.mkdtemp(prefix="bfd-bench-dicom-"))
    port = free_port()
    orthanc_config = {"ConcurrentJobs": args.associations, "DicomScuTimeout": 120}
    orthanc_env = {"TCP_NODELAY": "1"} if args.pacs_tcp_nodelay else {}
    with OrthancServer(
        modalities={NODE_MODALITY: ["BFD", "127.0.0.1", port]}, extra_config=orthanc_config, environment=orthanc_env
    ) as orthanc:
        env = {
            "BFD_DICOM_PORT": str(port),
            "BFD_DICOM_DESTINATION": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "BFD_DICOM_QUIET_S": str(args.quiet_s),
            "BFD_DICOM_STUDY_MAX_INSTANCES": str(args.per_study),
            "BFD_DICOM_AUDIT_LOG": str(folder / "audit.jsonl"),
            **({"BFD_DICOM_SPOOL_DIR": str(folder / "spool")} if args.spool else {}),
        }
        with bfd_serve(args.bundle, folder, env=env) as server:
            meter = CpuMeter({"service": server.ps, "orthanc": orthanc.process}, psutil.Process())
            memory = PeakRss(server)
            http = http_path(server, datasets, meter, memory, args)
            dicom = dicom_path(orthanc, datasets, meter, memory, args)
    ratio = dicom["instances_per_s"] / http["throughput_img_s"] if http["throughput_img_s"] else 0.0
    return {
        "benchmark": "dicom_node",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "bundle": str(args.bundle),
        "pacs": "Orthanc with TCP_NODELAY=1" if args.pacs_tcp_nodelay else "Orthanc as packaged (Nagle on)",
        "node": "spool on (every instance written and synced before 'stored')" if args.spool else "no spool",
        "images": f"{args.instances} instances, {args.per_study} per study, {args.rows}x{args.columns} 12-bit "
        f"uncompressed CR/DX from the repository's radiographs ({ATTRIBUTION})",
        "http": http,
        "dicom": dicom,
        "ratio_dicom_to_http": round(ratio, 3),
        "target_ratio_min": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }


def _cpu(phase: Json) -> str:
    system = phase["system_ms_per_image"]
    return ", ".join(f"{name} {ms:.0f} ({system[name]:.0f} system)" for name, ms in phase["cpu_ms_per_image"].items())


def _rss(phase: Json) -> str:
    rss = phase.get("rss_mb") or {}
    return f"service RSS {rss.get('before', 0)} MiB before, {rss.get('max', 0)} MiB at most"


def render_markdown(report: Json) -> str:
    http, dicom = report["http"], report["dicom"]
    latency = http["latency_ms"]
    return "\n".join(
        [
            "# DICOM node vs HTTP, one run",
            "",
            f"{report['when']}, {report['machine']}; bundle `{report['bundle']}`; {report['pacs']}; "
            f"node: {report.get('node', 'no spool')}; "
            f"{report['images']}.",
            "",
            "| path | throughput | detail | CPU ms per image |",
            "|---|---|---|---|",
            f"| HTTP /v1/predict (application/dicom, concurrency {http['concurrency']}) | "
            f"{http['throughput_img_s']:.2f} img/s | p50 {latency['p50'] or 0:.0f} ms, "
            f"p99 {latency['p99'] or 0:.0f} ms; {_rss(http)} | {_cpu(http)} |",
            f"| Orthanc C-STORE -> node -> SR + GSPS + SC C-STOREd into Orthanc ({dicom['concurrent_store_jobs']} "
            f"associations) | {dicom['instances_per_s']:.2f} instances/s | all sent after "
            f"{dicom['seconds_until_all_acknowledged']} s, last result in Orthanc after "
            f"{dicom['seconds_until_last_result_in_orthanc']} s; {dicom['store_jobs_rerun']} store jobs re-run; "
            f"{_rss(dicom)} | "
            f"{_cpu(dicom)} |",
            "",
            f"Ratio DICOM/HTTP: **{report['ratio_dicom_to_http']:.2f}** (target >= {report['target_ratio_min']}: "
            f"{'met' if report['target_met'] else 'NOT met'}).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--associations", type=int, default=4, help="Orthanc store jobs at once")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--quiet-s", type=float, default=1.0)
    parser.add_argument("--result-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--spool",
        action="store_true",
        help="run the node with its spool on (BFD_DICOM_SPOOL_DIR in the run's temporary folder)",
    )
    parser.add_argument(
        "--pacs-tcp-nodelay",
        action="store_true",
        help="start Orthanc with TCP_NODELAY=1 (DCMTK's switch for Nagle's algorithm); default: as packaged",
    )
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dicom_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "dicom_benchmark.md").write_text(markdown)
    print(markdown)
    return 0 if report["dicom"]["result_objects_in_orthanc"] >= report["dicom"]["result_objects_expected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
