"""Admission over HTTP: the deadline, decode as admitted work, and the memory budgets, on the real app.

Tiny bundles and the real onnxruntime sessions; `Gate` (tests/test_api.py) holds a batch in the engine so
the queue state is known when a request arrives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from factories import build_tiny_bundle, encode_png, serving
from PIL import Image
from test_api import Gate, png_for_part, until

pytestmark = pytest.mark.anyio


def png16(side: int, seed: int = 0) -> bytes:
    """A 16-bit grey PNG of side x side random 12-bit values: expensive to decode, as real CR/DX exports are."""
    import io

    values = np.random.default_rng(seed).integers(0, 4096, (side, side), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def metric(text: str, name: str) -> float:
    """The value of one sample line of the Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def test_deadline_refuses_before_reading_and_says_why(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle, max_batch_size=1, max_queue_wait_ms=250, max_queue_size=100) as (app, client):
        predictor = app.state.predictor
        gate = Gate(predictor)
        predictor.batcher._rate._seconds_per_item = 0.1  # as if measured: 100 ms an image
        held = asyncio.create_task(client.post("/v1/predict", files={"file": ("r.png", png_for_part(0))}))
        await gate.wait_entered()
        queued = [
            asyncio.create_task(client.post("/v1/predict", files={"file": (f"q{i}.png", png_for_part(1))}))
            for i in range(2)
        ]
        await until(lambda: predictor.batcher.queued == 2)  # 1 running + 2 queued: a new one waits 300 ms
        refused = await client.post("/v1/predict", files={"file": ("late.png", png_for_part(2))})
        metrics_during = (await client.get("/metrics")).text
        gate.release.set()
        answered = await asyncio.gather(held, *queued)
        after = await client.post("/v1/predict", files={"file": ("after.png", png_for_part(2))})
    assert refused.status_code == 503
    assert refused.json()["code"] == "overloaded"
    assert "expected wait 300 ms is over the 250 ms limit" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert after.status_code == 200
    assert metric(metrics_during, "bfd_expected_queue_wait_seconds") == pytest.approx(0.3)
    assert 'bfd_admission_refused_total{reason="deadline"} 1.0' in metrics_during
    assert metric(metrics_during, "bfd_service_seconds_per_image") == pytest.approx(0.1)


async def test_a_failed_image_cancels_its_siblings_decodes(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    heavy = [png16(1000, seed) for seed in range(8)]
    async with serving(bundle, decode_threads=1, max_images_per_request=16) as (_, client):
        files = [("file", ("broken.png", b"\x89PNG\r\n\x1a\n not really"))]
        files += [("file", (f"big{i}.png", data)) for i, data in enumerate(heavy)]
        response = await client.post("/v1/predict", files=files)
        metrics = (await client.get("/metrics")).text
        normal = await client.post("/v1/predict", files={"file": ("ok.png", png_for_part(1))})
    assert response.status_code == 422
    assert "broken.png" in response.json()["detail"]
    # One decode slot: the broken image went first, and the heavy ones behind it never decoded.
    assert metric(metrics, "bfd_decodes_skipped_total") >= len(heavy) - 1
    assert normal.status_code == 200


async def test_decodes_wait_for_the_memory_budget_and_never_exceed_it(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    images = [png16(1200, seed) for seed in range(4)]
    async with serving(bundle, decode_threads=4) as (app, client):
        predictor = app.state.predictor
        from inference.preprocessing import plan_decode

        need = plan_decode(images[0]).working_bytes
        # Room for one of these decodes at a time, although four threads are free.
        predictor.decode_memory.total = need + need // 2
        answers = await asyncio.gather(
            *(client.post("/v1/predict", files={"file": (f"{i}.png", data)}) for i, data in enumerate(images))
        )
        budget = predictor.decode_memory
    assert [a.status_code for a in answers] == [200] * 4
    assert budget.peak <= budget.total
    assert budget.waited >= 1
    assert budget.in_use == 0


async def test_an_image_whose_decode_needs_too_much_memory_gets_413_with_the_figure(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle, max_image_decode_bytes=10_000_000) as (_, client):
        response = await client.post("/v1/predict", files={"file": ("big.png", png16(1500))})
        small = await client.post("/v1/predict", files={"file": ("ok.png", png_for_part(1))})
    assert response.status_code == 413
    body = response.json()
    assert body["code"] == "image_too_large"
    assert "big.png" in body["detail"]
    assert "MB" in body["detail"]  # the figure it would need, against the limit
    assert small.status_code == 200


async def test_request_bodies_are_held_under_the_memory_budget(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    body = encode_png(np.random.default_rng(1).integers(0, 256, (200, 200), dtype=np.uint8))  # ~40 KB
    limit = 2 * len(body) + 1000  # one request of this size fits, two do not
    async with serving(bundle, max_upload_bytes=len(body) + 500, request_memory_budget_bytes=limit) as (app, client):
        gate = Gate(app.state.predictor)
        first = asyncio.create_task(client.post("/v1/predict", content=body, headers={"content-type": "image/png"}))
        await gate.wait_entered()  # its body is held until its answer
        second = await client.post("/v1/predict", content=body, headers={"content-type": "image/png"})
        metrics = (await client.get("/metrics")).text
        gate.release.set()
        assert (await first).status_code == 200
        third = await client.post("/v1/predict", content=body, headers={"content-type": "image/png"})
        budget = app.state.predictor.request_memory
    assert second.status_code == 503
    assert "memory" in second.json()["detail"]
    assert 'bfd_admission_refused_total{reason="memory"} 1.0' in metrics
    assert third.status_code == 200
    assert budget.in_use == 0
    assert budget.peak <= budget.total


async def test_client_gone_while_decoding_drops_its_work(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    heavy = [png16(1000, seed) for seed in range(6)]
    async with serving(bundle, decode_threads=1) as (app, client):
        files = [("file", (f"big{i}.png", data)) for i, data in enumerate(heavy)]
        task = asyncio.create_task(client.post("/v1/predict", files=files))
        predictor = app.state.predictor
        await until(lambda: predictor.decode_memory.in_use > 0)  # decoding has begun
        task.cancel()  # the ASGI transport turns this into the client going away
        await asyncio.wait([task])
        await until(lambda: predictor.decode_memory.in_use == 0 and predictor.batcher.queue_depth == 0)
        metrics = (await client.get("/metrics")).text
        after = await client.post("/v1/predict", files={"file": ("ok.png", png_for_part(1))})
    assert metric(metrics, "bfd_decodes_skipped_total") >= 3
    assert after.status_code == 200


async def test_line_wrapped_base64_is_accepted(tmp_path: Path) -> None:
    import base64
    import textwrap

    bundle = build_tiny_bundle(tmp_path)
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(png_for_part(2)).decode(), 76)) + "\n"
    async with serving(bundle) as (_, client):
        response = await client.post("/v1/predict", json={"image": wrapped, "image_name": "wrapped.png"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["body_part"]["label"] == "shoulder"
