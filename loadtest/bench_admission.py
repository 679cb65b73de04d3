"""Admission on realistic radiographs: capacity, then 2x overload for 60 s, for each bundle, in ONE run.

    python -m loadtest.bench_admission --bundle models/demo --bundle models/demo-int8 --images tests/data/xray

Small JPEGs flatter a service: on real radiographs (2000x2500 px, 12/16-bit PNG or DICOM) decoding costs
about as much as inference, and a queue bounded by an image count bounds latency only by accident. This
benchmark drives `bfd serve` with the realistic image set of `loadtest.bench_decode` (the repository's
FracAtlas radiographs at their own sizes as JPEG, 8-bit and 16-bit PNG, and DICOM uncompressed and
compressed) and checks the promises of deadline-aware admission:

1. capacity: closed loop at each --concurrency (default 8 and 32), after a warm-up; capacity = the best;
2. overload: Poisson arrivals at 2x capacity for --overload-s, latency from each request's scheduled time;
3. targets: accepted p99 <= 2 s, refusals (503) p50 <= 50 ms, accepted throughput under overload >= 90% of
   capacity, RSS bounded (never above the RSS before plus the two memory budgets the service promises),
   and no error but 503 (no 5xx, no 4xx, no transport error); a request right after answers 200.

JSON and Markdown go to --out (`admission_benchmark.{json,md}`). The load generator shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from inference.bundle import read_manifest
from loadtest.drivers import Body, answer_of, auth_headers, closed_loop, encode_bodies, open_loop
from loadtest.images import ATTRIBUTION, realistic_image_set
from loadtest.machine import machine_description
from loadtest.servers import Server, start_server, stop_server

Json = dict[str, Any]
TARGETS = {
    "accepted_p99_ms_max": 2000.0,
    "refused_p50_ms_max": 50.0,
    "overload_throughput_fraction_min": 0.9,
}


def memory_bound_mb(server: Server) -> float:
    """The memory the service promises to stay within on top of its idle RSS: its two budgets (/v1/models)."""
    batching = httpx.get(server.url + "/v1/models", headers=auth_headers(), timeout=10).json()["batching"]
    return float(batching["request_memory_budget_bytes"] + batching["decode_memory_budget_bytes"]) / 2**20


def run_bundle(
    bundle: Path, bodies: Sequence[Body], args: argparse.Namespace, log_dir: Path, env: dict[str, str]
) -> Json:
    command = [sys.executable, "-m", "bfd.cli", "--log-level", "warning", "serve", "--bundle", str(bundle)]
    server = start_server(f"ours-{bundle.name}", command, "/readyz", log_dir, env, args.start_timeout_s)
    try:
        result: Json = {"bundle": str(bundle), "precision": read_manifest(bundle).precision, "command": server.command}
        result["answer"] = asyncio.run(answer_of(server.url, bodies[0]))
        steps = []
        for concurrency in args.concurrency:
            # Clients that honour Retry-After and then send the same image again, as any well-behaved client
            # does: the answered mix stays the offered mix, the one the overload step offers (a client
            # retrying a 503 at once measures the cost of refusals, which the overload step measures anyway).
            step = asyncio.run(
                closed_loop(server, bodies, concurrency, args.warmup_s, args.duration_s, True, honour_retry_after=True)
            )
            steps.append(step)
            print(
                f"[{bundle.name} c{concurrency}] {step['throughput_img_s']:.1f} img/s, "
                f"p99 {step['latency_ms']['p99'] or 0:.0f} ms, statuses {step['statuses']}",
                flush=True,
            )
        result["closed_loop"] = steps
        capacity = max(step["throughput_img_s"] for step in steps)
        result["capacity_img_s"] = capacity
        rss_before = server.rss_mb()
        overload = asyncio.run(
            open_loop(server, bodies, 2.0 * capacity, args.warmup_s, args.overload_s, args.seed, True)
        )
        result["overload"] = overload
        result["recovered"] = asyncio.run(answer_of(server.url, bodies[-1]))
        result["admission"] = _admission_state(server)
        result["rss_mb"] = {
            "before_overload": rss_before,
            "max": overload["server_rss_mb"]["max"],
            "after": server.rss_mb(),
        }
        result["targets"] = targets(result, memory_bound_mb(server))
        print(
            f"[{bundle.name} 2x overload] accepted {overload['accepted']}, refused {overload['refused_503']}, "
            f"p99 {overload['latency_ms']['p99'] or 0:.0f} ms, statuses {overload['statuses']}",
            flush=True,
        )
    finally:
        result["exit_code"] = stop_server(server)
    return result


def _admission_state(server: Server) -> Json:
    """The service's own view at the end: its measured seconds per image and its refusals by reason."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    state: Json = {"refused": {}}
    for line in text.splitlines():
        if line.startswith("bfd_service_seconds_per_image "):
            state["seconds_per_image"] = float(line.split()[-1])
        elif line.startswith("bfd_admission_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            state["refused"][reason] = float(line.split()[-1])
        elif line.startswith("bfd_decodes_skipped_total "):
            state["decodes_skipped"] = float(line.split()[-1])
    return state


def targets(result: Json, memory_bound: float) -> Json:
    overload, capacity = result["overload"], result["capacity_img_s"]
    accepted_p99 = overload["latency_ms"]["p99"]
    refused_p50 = overload["refused_latency_ms"]["p50"]
    fraction = overload["throughput_img_s"] / capacity if capacity else None
    non_503 = {status: n for status, n in overload["statuses"].items() if status not in ("200", "503")}
    rss = result["rss_mb"]
    return {
        "accepted_p99_ms": {
            "measured": accepted_p99,
            "met": accepted_p99 is not None and accepted_p99 <= TARGETS["accepted_p99_ms_max"],
        },
        "refused_p50_ms": {
            "measured": refused_p50,
            "met": refused_p50 is None or refused_p50 <= TARGETS["refused_p50_ms_max"],
        },
        "overload_throughput_fraction": {
            "measured": fraction,
            "met": fraction is not None and fraction >= TARGETS["overload_throughput_fraction_min"],
        },
        "rss_bounded": {
            "measured_max_mb": rss["max"],
            "bound_mb": rss["before_overload"] + memory_bound,
            "met": rss["max"] <= rss["before_overload"] + memory_bound,
        },
        "only_503_refusals": {"other_statuses": non_503, "met": not non_503},
        "recovers": {"status": result["recovered"].get("status"), "met": result["recovered"].get("status") == 200},
    }


def render_markdown(report: Json) -> str:
    machine = report["machine"]
    lines = [
        "# Admission on realistic radiographs: capacity, then 2x overload",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, {machine['memory_gib']} GiB, onnxruntime "
        f"{machine['onnxruntime']}; started {report['started_at']}. Image set: {report['image_set']['count']} "
        f"uploads ({', '.join(f'{k}: {v}' for k, v in report['image_set']['kinds'].items())}), "
        f"{report['image_set']['kb_min']:.0f}-{report['image_set']['kb_max']:.0f} KB.",
        "",
        "| bundle | capacity img/s | overload offered img/s | accepted img/s (÷ capacity) | accepted p50 / p99 ms "
        "| refused 503 | refused p50 / p99 ms | other statuses | RSS MB before / max (bound) | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["bundles"]:
        overload, t = result["overload"], result["targets"]
        latency, refused = overload["latency_ms"], overload["refused_latency_ms"]
        met = sum(bool(v["met"]) for v in t.values())
        lines.append(
            f"| {Path(result['bundle']).name} ({result['precision']}) | {result['capacity_img_s']:.1f} | "
            f"{overload['offered_rate_img_s']:.1f} | {overload['throughput_img_s']:.1f} "
            f"({t['overload_throughput_fraction']['measured'] or 0:.2f}) | {latency['p50'] or 0:.0f} / "
            f"{latency['p99'] or 0:.0f} | {overload['refused_503']} | {refused['p50'] or 0:.0f} / "
            f"{refused['p99'] or 0:.0f} "
            f"| {t['only_503_refusals']['other_statuses'] or 'none'} | {result['rss_mb']['before_overload']:.0f} / "
            f"{result['rss_mb']['max']:.0f} ({t['rss_bounded']['bound_mb']:.0f}) | {met}/{len(t)} |"
        )
    lines += ["", "## Targets", ""]
    for result in report["bundles"]:
        for key, value in result["targets"].items():
            detail = ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items() if k != "met"
            )
            lines.append(f"- {Path(result['bundle']).name} {key}: {'met' if value['met'] else 'NOT met'} ({detail})")
    lines += ["", ATTRIBUTION, "Research use only; untrained bundles: only speed and behaviour are meaningful.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", help="repeat for several (default models/demo)")
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bundles = args.bundle or [Path("models/demo")]
    images = realistic_image_set(args.images)
    if not images:
        print(f"no radiographs under {args.images}", file=sys.stderr)
        return 2
    bodies = encode_bodies(images)
    kinds: dict[str, int] = {}
    for _, _, media_type in images:
        kinds[media_type] = kinds.get(media_type, 0) + 1
    sizes_kb = [len(data) / 1e3 for _, data, _ in images]
    report: Json = {
        "started_at": datetime.now(UTC).isoformat(),
        "machine": machine_description(),
        "image_set": {
            "count": len(images),
            "kinds": kinds,
            "kb_min": min(sizes_kb),
            "kb_max": max(sizes_kb),
            "names": [name for name, _, _ in images],
        },
        "config": vars(args) | {"bundle": [str(b) for b in bundles], "images": str(args.images), "out": str(args.out)},
        "targets_wanted": TARGETS,
        "attribution": ATTRIBUTION,
        "bundles": [],
    }
    with tempfile.TemporaryDirectory(prefix="bfd-admission-") as scratch:
        env = {"BFD_DATABASE_URL": f"sqlite+aiosqlite:///{scratch}/results.sqlite3"}
        env |= {key: value for key, value in os.environ.items() if key.startswith("BFD_") and key != "BFD_DATABASE_URL"}
        for bundle in bundles:
            report["bundles"].append(run_bundle(bundle, bodies, args, args.out / "logs", env))
    report["finished_at"] = datetime.now(UTC).isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admission_benchmark.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (args.out / "admission_benchmark.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
