"""Service benchmark: the in-process ceiling, then HTTP throughput and latency at concurrency 1, 8, 32, in ONE run.

    python -m loadtest.bench_service --bundle models/demo --images tests/data/xray

Requests are JPEG uploads of real radiographs (FracAtlas, CC BY 4.0: tests/data/xray/README.md) re-encoded
at realistic sizes (longest side 500 to 2500 px). Steps, all on the same images and the same machine:
1. per-image in-process time: decode (`prepare_image`) + inference at batch 1, the latency floor;
2. in-process ceiling: the Predictor (decode pool + batcher + engine) driven directly, no HTTP, 32 in flight;
3. `bfd serve` as a real process, driven over HTTP by this process at concurrency 1, 8 and 32.
Writes JSON and Markdown to --out. The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from inference.bundle import load_bundle
from inference.config import PredictorConfig
from inference.engine import Engine
from inference.pipeline import predict_batch
from inference.predictor import Predictor, Upload
from inference.preprocessing import prepare_image
from loadtest.drivers import Body, closed_loop, encode_bodies
from loadtest.images import make_uploads
from loadtest.servers import Server, start_server, stop_server


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def per_image_in_process_ms(bundle_path: Path, uploads: list[tuple[str, bytes]], rounds: int = 3) -> dict[str, float]:
    """Decode + batch-1 inference per image, serially: what one lone request costs without HTTP."""
    bundle = load_bundle(bundle_path)
    engine = Engine(bundle, providers=["cpu"])
    resize = bundle.manifest.input.resize
    predict_batch(engine, prepare_image(uploads[0][1], resize=resize).pixels[None])
    decode, infer = [], []
    for _ in range(rounds):
        for _, data in uploads:
            t0 = time.perf_counter()
            pixels = prepare_image(data, resize=resize).pixels
            t1 = time.perf_counter()
            predict_batch(engine, pixels[None])
            t2 = time.perf_counter()
            decode.append((t1 - t0) * 1e3)
            infer.append((t2 - t1) * 1e3)
    return {
        "decode_ms_mean": statistics.mean(decode),
        "inference_ms_mean": statistics.mean(infer),
        "total_ms_mean": statistics.mean(decode) + statistics.mean(infer),
        "total_ms_median": statistics.median([d + i for d, i in zip(decode, infer, strict=True)]),
    }


async def in_process_ceiling(
    bundle: Path, uploads: list[tuple[str, bytes]], concurrency: int, seconds: float
) -> dict[str, float]:
    """The service's own machinery without HTTP: images per second with `concurrency` requests in flight."""
    predictor = Predictor(load_bundle(bundle), PredictorConfig())
    await predictor.start()
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop_at:
            name, data = uploads[i % len(uploads)]
            await predictor.predict(predictor.admit(1), [Upload(data, name)])
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    await predictor.stop()
    return {"images_per_second": done / elapsed, "concurrency": concurrency}


async def http_load(server: Server, bodies: list[Body], concurrency: int, seconds: float) -> dict[str, object]:
    """Closed loop at `concurrency` through the one load driver (`loadtest.drivers`), no warm-up window."""
    step = await closed_loop(server, bodies, concurrency, 0.0, seconds, metrics=True)
    latency = step["latency_ms"]
    return {
        "concurrency": concurrency,
        "images_per_second": step["throughput_img_s"],
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "statuses": step["statuses"],
        "mean_batch_size": (step.get("batch_sizes") or {}).get("mean_batch_size") or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument("--seconds", type=float, default=20.0, help="per load level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args()

    uploads = make_uploads(args.images)
    sizes_kb = [len(data) / 1e3 for _, data in uploads]
    report: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "bundle": str(args.bundle),
        "images": len(uploads),
        "upload_kb_min_max": [min(sizes_kb), max(sizes_kb)],
    }
    single = per_image_in_process_ms(args.bundle, uploads)
    report["per_image_in_process"] = single
    ceiling = asyncio.run(in_process_ceiling(args.bundle, uploads, 32, args.seconds))
    report["in_process_ceiling"] = ceiling
    command = [sys.executable, "-m", "bfd.cli", "--log-level", "warning", "serve", "--bundle", str(args.bundle)]
    server = start_server("ours", command, "/readyz", args.out / "logs", {}, timeout_s=120)
    bodies = encode_bodies(uploads)
    try:
        levels = []
        for concurrency in args.concurrency:
            result = asyncio.run(http_load(server, bodies, concurrency, args.seconds))
            levels.append(result)
            print(json.dumps(result))
        report["http"] = levels
    finally:
        stop_server(server)
    top = max(levels, key=lambda level: level["concurrency"])  # type: ignore[arg-type, return-value]
    c1 = next((level for level in levels if level["concurrency"] == 1), None)
    report["ratios"] = {
        "throughput_at_max_concurrency_vs_ceiling": top["images_per_second"] / ceiling["images_per_second"],  # type: ignore[operator]
        "p50_at_c1_vs_in_process_single": (c1["p50_ms"] / single["total_ms_median"]) if c1 else None,  # type: ignore[operator]
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_benchmark.json").write_text(json.dumps(report, indent=2))
    (args.out / "service_benchmark.md").write_text(render_markdown(report))
    print(render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    single, ceiling, ratios = report["per_image_in_process"], report["in_process_ceiling"], report["ratios"]
    lines = [
        f"# Service benchmark ({report['machine']})",
        "",
        f"Bundle `{report['bundle']}`, {report['images']} JPEG uploads of real radiographs "
        f"({report['upload_kb_min_max'][0]:.0f}-{report['upload_kb_min_max'][1]:.0f} KB, 500-2500 px).",
        "",
        f"- one image in-process (decode + batch-1 inference): median {single['total_ms_median']:.1f} ms "
        f"(decode {single['decode_ms_mean']:.1f} ms + inference {single['inference_ms_mean']:.1f} ms, means)",
        f"- in-process ceiling (Predictor, 32 in flight, no HTTP): {ceiling['images_per_second']:.1f} img/s",
        "",
        "| concurrency | img/s | p50 ms | p90 ms | p99 ms | mean batch | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in report["http"]:
        lines.append(
            f"| {level['concurrency']} | {level['images_per_second']:.1f} | {level['p50_ms']:.0f} | "
            f"{level['p90_ms']:.0f} | {level['p99_ms']:.0f} | {level['mean_batch_size']:.1f} | {level['statuses']} |"
        )
    lines += [
        "",
        f"- throughput at the highest concurrency / in-process ceiling: "
        f"{ratios['throughput_at_max_concurrency_vs_ceiling']:.2f}",
        f"- p50 at concurrency 1 / one image in-process: {ratios['p50_at_c1_vs_in_process_single']:.2f}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
