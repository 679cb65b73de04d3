"""Load benchmark: our service vs the naive ONNX endpoint vs the original-style Keras pipeline, in ONE run.

    python -m loadtest.bench_load --bundle models/demo --images tests/data/xray --duration-s 20 --overload-s 60

This module owns the scripted comparison under load (what `loadtest.bench_service` does for our service
alone, extended to the baselines of `loadtest.baselines` and to open-loop and overload behaviour):

1. each server is started as its own process, one at a time, on a fresh free port: `bfd serve` on the bundle,
   then `python -m loadtest.baselines naive` (with --naive-tuned also `naive --tuned`) and `... keras`
   (skipped with --skip-keras, or when TensorFlow is missing);
2. each is driven with the same JPEG uploads (real radiographs re-encoded at 500-2500 px, see
   `bench_service.make_uploads`) by an async httpx client in this process, closed loop at each --concurrency
   for --duration-s after a --warmup-s warm-up that is not counted (only completions inside the window count);
3. for our service only, open loop: Poisson arrivals at 50% and 90% of the capacity measured in step 2, then
   2x capacity for --overload-s. Latency is measured from each request's SCHEDULED send time, so a slow
   server (or a late load generator) cannot hide its queueing (no coordinated omission). Refusals (503 with
   Retry-After) are counted apart from accepted requests; any other 5xx is flagged; the server's RSS is
   sampled before, during and after, and one request right after the overload must be answered 200.

Every step records throughput (img/s), p50/p90/p99 latency, errors by status, server CPU% and RSS (psutil on
the server's pid) and, for our service, the batch-size distribution from its Prometheus `bfd_batch_size`
histogram. JSON and Markdown go to --out (`load_benchmark.json`, `load_benchmark.md`) with the machine's
description and the throughput ratios ours/naive and ours/keras at each concurrency.

The load generator shares the machine's cores with the server under test (its own CPU% is recorded, and so
is everything else's on the machine: a step with a high 'other CPU %' was disturbed), so compare figures
within one run, not across machines. It hands each request a client of one keep-alive connection (`Lanes`):
a single httpx client with hundreds of connections becomes the bottleneck itself. The images are FracAtlas
radiographs, CC BY 4.0 (Abedeen et al., Scientific Data 10, 521 (2023); see tests/data/xray/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from inference.bundle import read_manifest
from loadtest.drivers import Body, answer_of, auth_headers, closed_loop, compare_answers, encode_bodies, open_loop
from loadtest.images import ATTRIBUTION, SIZES_PX, make_uploads_at
from loadtest.load_report import BASELINES, ratios, render_markdown, targets
from loadtest.machine import machine_description
from loadtest.servers import Server, start_server, stop_server

Json = dict[str, Any]
OPEN_LOOP_FRACTIONS = (0.5, 0.9)
OVERLOAD_FRACTION = 2.0


def run_closed_steps(server: Server, bodies: Sequence[Body], args: argparse.Namespace, metrics: bool) -> list[Json]:
    steps = []
    for concurrency in args.concurrency:
        step = asyncio.run(closed_loop(server, bodies, concurrency, args.warmup_s, args.duration_s, metrics))
        steps.append(step)
        _progress(server.name, step)
    return steps


def run_ours(bodies: Sequence[Body], args: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> Json:
    command = [sys.executable, "-m", "bfd.cli", "--log-level", "warning", "serve", "--bundle", str(args.bundle)]
    load = [round(v, 2) for v in os.getloadavg()]
    server = start_server("ours", command, "/readyz", log_dir, env, args.start_timeout_s)
    try:
        result: Json = {"command": server.command, "load_average_at_start": load}
        result["answer"] = asyncio.run(answer_of(server.url, bodies[0]))
        result["closed_loop"] = run_closed_steps(server, bodies, args, metrics=True)
        capacity = max(step["throughput_img_s"] for step in result["closed_loop"])
        result["capacity_img_s"] = capacity
        open_steps = []
        for index, fraction in enumerate(OPEN_LOOP_FRACTIONS):
            step = asyncio.run(
                open_loop(server, bodies, fraction * capacity, args.warmup_s, args.duration_s, args.seed + index, True)
            )
            step["fraction_of_capacity"] = fraction
            open_steps.append(step)
            _progress(server.name, step)
        result["open_loop"] = open_steps
        result["overload"] = run_overload(server, bodies, capacity, args)
        _progress(server.name, result["overload"])
    finally:
        result_code = stop_server(server)
    result["exit_code"] = result_code
    return result


def run_overload(server: Server, bodies: Sequence[Body], capacity: float, args: argparse.Namespace) -> Json:
    """2x capacity for --overload-s, then: did it answer 200 at once, and did RSS come back down?"""
    rss_before = server.rss_mb()
    step = asyncio.run(
        open_loop(server, bodies, OVERLOAD_FRACTION * capacity, 0.0, args.overload_s, args.seed + 99, True)
    )
    step["fraction_of_capacity"] = OVERLOAD_FRACTION
    step["boundedness"] = boundedness(server, step, capacity)
    started = time.perf_counter()
    recovered = asyncio.run(answer_of(server.url, bodies[1 % len(bodies)]))
    recovered["latency_ms"] = (time.perf_counter() - started) * 1e3
    step["recovered"] = recovered
    step["rss_mb"] = {"before": rss_before, "during_max": step["server_rss_mb"]["max"], "after": server.rss_mb()}
    step["only_503_refusals"] = step["other_5xx"] == 0 and all(status in {"200", "503"} for status in step["statuses"])
    return step


def boundedness(server: Server, step: Json, capacity: float) -> Json:
    """Is the accepted requests' latency bounded under overload? The figures behind the answer, all reported.

    A full admission queue plus the running batch, (max_queue_size + max_batch_size) images (the service's own
    /v1/models), drains in that many images over the service rate: at the closed-loop capacity, and at the
    rate actually achieved during the overload (lower when overload itself costs throughput). 'bounded' means
    the accepted p99 (a) does not grow from the first half of the window to the second (by more than 1.5x),
    which unbounded queueing would, and (b) stays within 2x of the full-queue time at the achieved rate.
    """
    response = httpx.get(server.url + "/v1/models", headers=auth_headers(), timeout=10)
    batching = response.json().get("batching", {}) if response.status_code == 200 else {}
    queue, batch = batching.get("max_queue_size"), batching.get("max_batch_size")
    achieved = step["throughput_img_s"]
    full = (queue + batch) if queue and batch else None
    at_capacity = full / capacity * 1e3 if full and capacity else None
    at_achieved = full / achieved * 1e3 if full and achieved else None
    p99 = step["latency_ms"]["p99"]
    first, second = step["accepted_p99_by_half_ms"]
    bounded = None
    if p99 is not None and first is not None and second is not None and at_achieved is not None:
        bounded = second <= 1.5 * first and p99 <= 2 * at_achieved
    return {
        "max_queue_size": queue,
        "max_batch_size": batch,
        "full_queue_ms_at_capacity": at_capacity,
        "full_queue_ms_at_achieved_rate": at_achieved,
        "achieved_img_s": achieved,
        "accepted_p99_ms": p99,
        "accepted_p99_first_half_ms": first,
        "accepted_p99_second_half_ms": second,
        "bounded": bounded,
    }


def run_baseline(
    name: str, command: Sequence[str], bodies: Sequence[Body], args: argparse.Namespace, log_dir: Path
) -> Json:
    load = [round(v, 2) for v in os.getloadavg()]
    try:
        server = start_server(name, command, "/healthz", log_dir, {}, args.start_timeout_s)
    except RuntimeError as error:  # a baseline that cannot start is reported, not fatal to the whole run
        print(f"[{name}] did not start: {error}", file=sys.stderr, flush=True)
        return {"command": list(command), "failed": str(error)[-2000:]}
    try:
        result: Json = {"command": server.command, "load_average_at_start": load}
        result["answer"] = asyncio.run(answer_of(server.url, bodies[0]))
        result["closed_loop"] = run_closed_steps(server, bodies, args, metrics=False)
    finally:
        result_code = stop_server(server)
    result["exit_code"] = result_code
    return result


def _precision(bundle: Path) -> str:
    """fp32 or int8: ratios between servers only compare like with like when these agree."""
    return str(read_manifest(bundle).precision)


def ensure_split_bundle(args: argparse.Namespace, log_dir: Path) -> Path:
    """The split bundle for the naive baseline: given, found in loadtest/results, or exported once now."""
    command = [sys.executable, "-m", "loadtest.baselines", "split-bundle", "--bundle", str(args.bundle)]
    if args.split_bundle is not None:
        command += ["--out", str(args.split_bundle)]
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "split-bundle.log").open("wb") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"no split bundle for the naive baseline; see {log_dir / 'split-bundle.log'}")
    return Path(done.stdout.decode().strip().splitlines()[-1])


def _progress(name: str, step: Json) -> None:
    latency = step["latency_ms"]
    label = f"c{step['concurrency']}" if step["kind"] == "closed" else f"{step['fraction_of_capacity']:.0%} capacity"
    p99 = f"{latency['p99']:.0f}" if latency["p99"] is not None else "-"
    print(
        f"[{name} {label}] {step['throughput_img_s']:.1f} img/s, p99 {p99} ms, statuses {step['statuses']}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--split-bundle", type=Path, help="split twin for the naive baseline (default: found/made)")
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument(
        "--sizes", type=int, nargs="+", choices=SIZES_PX, default=list(SIZES_PX), help="longest sides of the uploads"
    )
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per step")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="uncounted seconds before each step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--overload-s", type=float, default=60.0, help="seconds at 2x capacity")
    parser.add_argument("--skip-keras", action="store_true", help="no Keras baseline (e.g. TensorFlow missing)")
    parser.add_argument("--skip-naive", action="store_true", help="no naive ONNX baseline")
    parser.add_argument(
        "--naive-tuned", action="store_true", help="also the naive endpoint with the service's onnxruntime threads"
    )
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrivals")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.now(UTC)
    log_dir = args.out / "logs"
    uploads = make_uploads_at(args.images, args.sizes)
    if not uploads:
        print(f"no PNG/JPEG images under {args.images}", file=sys.stderr)
        return 2
    sizes_kb = [len(data) / 1e3 for _, data in uploads]
    bodies = encode_bodies(uploads)
    report: Json = {
        "started_at": started_at.isoformat(),
        "machine": machine_description(),
        "config": {
            "bundle": str(args.bundle),
            "bundle_precision": _precision(args.bundle),
            "images": str(args.images),
            "uploads": len(uploads),
            "upload_sides_px": args.sizes,
            "upload_kb_min_max": [min(sizes_kb), max(sizes_kb)],
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "concurrency": args.concurrency,
            "open_loop_fractions": list(OPEN_LOOP_FRACTIONS),
            "overload_fraction": OVERLOAD_FRACTION,
            "overload_s": args.overload_s,
            "seed": args.seed,
        },
        "attribution": ATTRIBUTION,
        "servers": {},
    }
    servers: Json = report["servers"]
    with tempfile.TemporaryDirectory(prefix="bfd-load-") as scratch:
        # Our service keeps a results store; keep it out of the working directory.
        env = {"BFD_DATABASE_URL": os.environ.get("BFD_DATABASE_URL", f"sqlite+aiosqlite:///{scratch}/results.sqlite3")}
        servers["ours"] = run_ours(bodies, args, log_dir, env)
    if args.skip_naive:
        servers["naive"] = {"skipped": "--skip-naive"}
    else:
        try:
            split: Path | None = ensure_split_bundle(args, log_dir)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            servers["naive"] = {"failed": str(error)}
            split = None
        if split is not None:
            report["config"]["split_bundle"] = str(split)
            report["config"]["split_bundle_precision"] = _precision(split)
            command = [sys.executable, "-m", "loadtest.baselines", "naive", "--bundle", str(args.bundle)]
            command += ["--split-bundle", str(split)]
            servers["naive"] = run_baseline("naive", command, bodies, args, log_dir)
            if args.naive_tuned:
                servers["naive-tuned"] = run_baseline("naive-tuned", [*command, "--tuned"], bodies, args, log_dir)
    if args.skip_keras:
        servers["keras"] = {"skipped": "--skip-keras"}
    elif importlib.util.find_spec("tensorflow") is None:
        servers["keras"] = {"skipped": "TensorFlow is not installed (pip install -e '.[export]')"}
    else:
        command = [sys.executable, "-m", "loadtest.baselines", "keras", "--bundle", str(args.bundle)]
        servers["keras"] = run_baseline("keras", command, bodies, args, log_dir)
    for name in BASELINES:
        if "answer" in servers.get(name, {}):
            servers[name]["answer_vs_ours"] = compare_answers(servers["ours"]["answer"], servers[name]["answer"])
    report["ratios"] = ratios(servers, args.concurrency)
    report["targets"] = targets(report)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished_at"] = datetime.now(UTC).isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "load_benchmark.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
