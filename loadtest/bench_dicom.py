"""The DICOM node's throughput beside the HTTP path's, on the same radiographs, in ONE run.

    python -m loadtest.bench_dicom --bundle models/demo --out loadtest/results

A study set of --instances DICOM instances (--per-study each; CR and DX from the repository's FracAtlas
radiographs, resized to --rows x --columns at 12 bits, uncompressed: the size of a real DX) is built once.
Then, against one `bfd serve` with its DICOM node on and a real Orthanc as the destination:
1. HTTP: the instances as application/dicom uploads to /v1/predict, closed loop at --concurrency, after a
   warm-up: img/s (what an HTTP client gets: decode and inference, no heatmap, no result objects);
2. DICOM: the same instances C-STOREd to the node over --associations parallel associations (a 0xA700 'out
   of resources' answer is retried after a pause, as a PACS does), and the time until the last result object
   (SR, a GSPS and an SC per image) is in Orthanc. instances/s = instances / that time.
Target: DICOM instances/s >= 80% of the HTTP img/s. Orthanc, the sender and the service share the machine.
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

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from loadtest.dicom_studies import make_study, part10_bytes
from loadtest.drivers import closed_loop, encode_bodies
from loadtest.images import ATTRIBUTION
from loadtest.machine import machine_description
from loadtest.orthanc import OrthancServer
from loadtest.servers import Server, bfd_serve, free_port

Json = dict[str, Any]
TARGET_RATIO = 0.8
OUT_OF_RESOURCES = 0xA700


def study_set(instances: int, per_study: int, rows: int, columns: int) -> list[Dataset]:
    out: list[Dataset] = []
    while len(out) < instances:
        n = min(per_study, instances - len(out))
        study = make_study(n, modality="mixed", bits_stored=12, body_parts=["hand", "shoulder"], size=(rows, columns))
        out.extend(pydicom.dcmread(io.BytesIO(part10_bytes(ds))) for ds in study)
    return out


def c_store_all(port: int, datasets: Sequence[Dataset], associations: int) -> Json:
    """Send every instance once, `associations` in parallel; 0xA700 answers are retried after 0.5 s."""
    queue = list(reversed(datasets))
    lock = threading.Lock()
    retries = [0]
    failures: list[str] = []

    def sender() -> None:
        ae = AE(ae_title="BENCHSCU")
        for ds in datasets[:1]:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(sop_class, str(datasets[0].file_meta.TransferSyntaxUID))
        ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", port, ae_title="BFD")
        if not assoc.is_established:
            failures.append("association not established")
            return
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    ds = queue.pop()
                while True:
                    status = assoc.send_c_store(ds)
                    code = int(status.Status) if status else -1
                    if code == OUT_OF_RESOURCES:
                        with lock:
                            retries[0] += 1
                        time.sleep(0.5)
                        continue
                    if code != 0:
                        failures.append(f"{ds.SOPInstanceUID}: status {code:#06x}")
                    break
        finally:
            assoc.release()

    threads = [threading.Thread(target=sender) for _ in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"out_of_resources_retries": retries[0], "failures": failures}


def results_in(orthanc: OrthancServer, study_uids: Sequence[str]) -> int:
    """Result objects (not the sources: Orthanc got only the results) now in Orthanc for these studies."""
    return sum(len(orthanc.instance_ids(uid)) for uid in study_uids)


def dicom_path(server: Server, orthanc: OrthancServer, port: int, datasets: Sequence[Dataset], args: Any) -> Json:
    study_uids = sorted({str(ds.StudyInstanceUID) for ds in datasets})
    expected = len(study_uids) + 2 * len(datasets)  # an SR per study, a GSPS and an SC per image
    started = time.perf_counter()
    sent = c_store_all(port, datasets, args.associations)
    acknowledged = time.perf_counter()
    deadline = acknowledged + args.result_timeout_s
    have = 0
    while time.perf_counter() < deadline:
        have = results_in(orthanc, study_uids)
        if have >= expected:
            break
        time.sleep(0.25)
    finished = time.perf_counter()
    seconds = finished - started
    return {
        "instances": len(datasets),
        "studies": len(study_uids),
        "associations": args.associations,
        "seconds_until_all_acknowledged": round(acknowledged - started, 2),
        "seconds_until_last_result_in_orthanc": round(seconds, 2),
        "result_objects_expected": expected,
        "result_objects_in_orthanc": have,
        "instances_per_s": round(len(datasets) / seconds, 2) if have >= expected else 0.0,
        **sent,
    }


def http_path(server: Server, datasets: Sequence[Dataset], args: Any) -> Json:
    uploads = [(str(ds.SOPInstanceUID), part10_bytes(ds), "application/dicom") for ds in datasets]
    bodies = encode_bodies(uploads)
    # a well-behaved client (it waits out Retry-After), as the PACS sender waits out 0xA700
    result = asyncio.run(
        closed_loop(server, bodies, args.concurrency, args.warmup_s, args.duration_s, False, honour_retry_after=True)
    )
    return {"concurrency": args.concurrency, **result}


def run(args: argparse.Namespace) -> Json:
    datasets = study_set(args.instances, args.per_study, args.rows, args.columns)
    folder = Path(tempfile.mkdtemp(prefix="bfd-bench-dicom-"))
    port = free_port()
    with OrthancServer() as orthanc:
        env = {
            "BFD_DICOM_PORT": str(port),
            "BFD_DICOM_DESTINATION": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "BFD_DICOM_QUIET_S": str(args.quiet_s),
            "BFD_DICOM_STUDY_MAX_INSTANCES": str(args.per_study),
            "BFD_DICOM_AUDIT_LOG": str(folder / "audit.jsonl"),
        }
        with bfd_serve(args.bundle, folder, env=env) as server:
            http = http_path(server, datasets, args)
            dicom = dicom_path(server, orthanc, port, datasets, args)
    ratio = dicom["instances_per_s"] / http["throughput_img_s"] if http["throughput_img_s"] else 0.0
    return {
        "benchmark": "dicom_node",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "bundle": str(args.bundle),
        "images": f"{args.instances} instances, {args.per_study} per study, {args.rows}x{args.columns} 12-bit "
        f"uncompressed CR/DX from the repository's radiographs ({ATTRIBUTION})",
        "http": http,
        "dicom": dicom,
        "ratio_dicom_to_http": round(ratio, 3),
        "target_ratio_min": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }


def render_markdown(report: Json) -> str:
    http, dicom = report["http"], report["dicom"]
    latency = http["latency_ms"]
    return "\n".join(
        [
            "# DICOM node vs HTTP, one run",
            "",
            f"{report['when']}, {report['machine']}; bundle `{report['bundle']}`; {report['images']}.",
            "",
            "| path | throughput | detail |",
            "|---|---|---|",
            f"| HTTP /v1/predict (application/dicom, concurrency {http['concurrency']}) | "
            f"{http['throughput_img_s']:.2f} img/s | p50 {latency['p50'] or 0:.0f} ms, "
            f"p99 {latency['p99'] or 0:.0f} ms |",
            f"| DICOM C-STORE -> SR + GSPS + SC in Orthanc ({dicom['associations']} associations) | "
            f"{dicom['instances_per_s']:.2f} instances/s | all acknowledged after "
            f"{dicom['seconds_until_all_acknowledged']} s, last result in Orthanc after "
            f"{dicom['seconds_until_last_result_in_orthanc']} s; {dicom['out_of_resources_retries']} 0xA700 retries |",
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
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--quiet-s", type=float, default=1.0)
    parser.add_argument("--result-timeout-s", type=float, default=600.0)
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
