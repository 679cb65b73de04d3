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
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from loadtest.servers import start_server, stop_server
from service.bundle import load_bundle
from service.engine import Engine
from service.metrics import Metrics
from service.pipeline import predict_batch
from service.predictor import Predictor, Upload
from service.preprocessing import prepare_image
from service.settings import Settings

SIZES_PX = (500, 1000, 1500, 2000, 2500)


def make_uploads(folder: Path) -> list[tuple[str, bytes]]:
    """Each source radiograph re-encoded as JPEG with its longest side at each of SIZES_PX."""
    uploads = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
        with Image.open(path) as source:
            grey = source.convert("L")
            for side in SIZES_PX:
                scale = side / max(grey.size)
                resized = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.LANCZOS)
                buffer = io.BytesIO()
                resized.save(buffer, format="JPEG", quality=90)
                uploads.append((f"{path.stem}_{side}.jpg", buffer.getvalue()))
    return uploads


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
    settings: Settings, uploads: list[tuple[str, bytes]], concurrency: int, seconds: float
) -> dict[str, float]:
    """The service's own machinery without HTTP: images per second with `concurrency` requests in flight."""
    predictor = Predictor(load_bundle(settings.bundle), settings, Metrics())
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


async def http_load(url: str, uploads: list[tuple[str, bytes]], concurrency: int, seconds: float) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop_at:
                name, data = uploads[i % len(uploads)]
                t0 = time.perf_counter()
                response = await client.post("/v1/predict", files={"file": (name, data, "image/jpeg")})
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "images_per_second": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "statuses": statuses,
    }


def batch_sizes(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("bfd_batch_size_sum", "bfd_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("bfd_batch_size_count", 0.0)
    return {"batches": count, "mean_batch_size": values.get("bfd_batch_size_sum", 0.0) / count if count else 0.0}


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
    settings = Settings(bundle=args.bundle)
    ceiling = asyncio.run(in_process_ceiling(settings, uploads, 32, args.seconds))
    report["in_process_ceiling"] = ceiling
    command = [sys.executable, "-m", "bfd.cli", "--log-level", "warning", "serve", "--bundle", str(args.bundle)]
    server = start_server("ours", command, "/readyz", args.out / "logs", {}, timeout_s=120)
    url = server.url
    try:
        levels = []
        for concurrency in args.concurrency:
            before = batch_sizes(url)
            result = asyncio.run(http_load(url, uploads, concurrency, args.seconds))
            after = batch_sizes(url)
            batches = after["batches"] - before["batches"]
            result["mean_batch_size"] = (
                (after["mean_batch_size"] * after["batches"] - before["mean_batch_size"] * before["batches"]) / batches
                if batches
                else 0.0
            )
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
