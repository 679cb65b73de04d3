"""Faults: an inference error fails only its own batch (500 with a reason) and the next batch succeeds.

The engine's graph call is wrapped to fail on demand (fault injection around the real onnxruntime session);
everything else is the real service.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part, serving
from test_api import until

pytestmark = pytest.mark.anyio


class FaultyEngine:
    """Fails chosen graph runs (counted from 1 after arming); can hold the engine so a batch forms behind it."""

    def __init__(self, predictor: Any) -> None:
        self.fail_runs: set[int] = set()
        self.runs = 0
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        engine = predictor.engine
        name = "run_fused" if engine.fused else "run_router"
        original: Callable[..., Any] = getattr(engine, name)

        def run(images: np.ndarray, **kwargs: Any) -> Any:
            self.entered.set()
            self.hold.wait(timeout=30)
            self.runs += 1
            self.sizes.append(len(images))
            if self.runs in self.fail_runs:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return original(images, **kwargs)

        setattr(engine, name, run)


def png(index: int, shift: int = 0) -> bytes:
    return encode_png(image_for_part(index, 3, shift)[:40, :40])


@pytest.mark.parametrize("form", ["fused", "split"])
async def test_an_inference_error_fails_only_its_batch(tmp_path: Path, form: str) -> None:
    bundle = build_tiny_bundle(tmp_path / form, form=form)
    async with serving(bundle, max_batch_size=4) as (app, client):
        faulty = FaultyEngine(app.state.predictor)
        faulty.fail_runs = {2}  # the second batch: the three requests queued behind the first
        faulty.hold.clear()
        first = asyncio.create_task(client.post("/v1/predict", files={"file": ("first.png", png(0))}))
        await until(faulty.entered.is_set)
        doomed = [
            asyncio.create_task(client.post("/v1/predict", files={"file": (f"d{i}.png", png(1, i))})) for i in range(3)
        ]
        await until(lambda: app.state.predictor.batcher.queued == 3)
        faulty.hold.set()
        first_answer = await first
        failed = await asyncio.gather(*doomed)
        after = await client.post("/v1/predict", files={"file": ("after.png", png(2))})
        ready = await client.get("/readyz")
    assert first_answer.status_code == 200
    assert faulty.sizes[:2] == [1, 3]  # the three formed one batch...
    assert [r.status_code for r in failed] == [500, 500, 500]  # ...and only its members failed
    for answer in failed:
        assert answer.json()["code"] == "inference_failed"
        assert "illegal memory access" in answer.json()["detail"]
    assert after.status_code == 200  # the next batch succeeds: the inference thread lives on
    assert after.json()["predictions"][0]["body_part"]["label"] == "shoulder"
    assert ready.status_code == 200
