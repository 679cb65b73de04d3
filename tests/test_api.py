"""The HTTP API against real onnxruntime sessions on tiny bundles (httpx AsyncClient + the app's lifespan)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from factories import (
    DEFAULT_PARTS,
    build_tiny_bundle,
    constant_image,
    encode_jpeg,
    encode_png,
    expected_m,
    image_for_part,
    serving,
)
from PIL import Image

from inference.predictor import Predictor
from service.main import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio

XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md


@pytest.fixture(params=["fused", "split"])
def bundle(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / request.param, form=request.param)


@pytest.fixture
async def client(bundle: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(bundle) as (_, client):
        yield client


def small_png(value: int) -> bytes:
    return encode_png(constant_image(value)[:32, :32])


def png_for_part(index: int, shift: int = 0) -> bytes:
    return encode_png(image_for_part(index, len(DEFAULT_PARTS), shift)[:64, :48])


class Gate:
    """Holds the inference thread inside the engine so tests can queue work deterministically; records batch sizes."""

    def __init__(self, predictor: Predictor) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        engine = predictor.engine
        name = "run_fused" if engine.fused else "run_router"
        original: Callable[..., Any] = getattr(engine, name)

        def gated(images: np.ndarray, **kwargs: Any) -> Any:
            self.sizes.append(len(images))
            self.entered.set()
            self.release.wait(timeout=30)
            return original(images, **kwargs)

        setattr(engine, name, gated)

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.005)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition on the event loop (bounded), for states reached in other threads."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# -- answers -------------------------------------------------------------------------------------------------


async def test_single_multipart_image(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/predict", files={"file": ("elbow.png", png_for_part(0), "image/png")})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["image_name"] == "elbow.png"
    assert prediction["body_part"]["label"] == "elbow"
    assert prediction["body_part"]["source"] == "router"
    assert sum(prediction["body_part"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction["fracture"]["probability"] == pytest.approx(expected_m(image_for_part(0)), abs=1e-5)
    assert prediction["fracture"]["label"] == "normal"  # m = 0.17 < 0.5
    assert prediction["fracture"]["threshold"] == 0.5
    assert "Research use only" in prediction["disclaimer"]
    assert prediction["model"] == {
        "name": "tiny",
        "version": "0.0.1-test",
        "trained": False,
        "precision": "fp32",
        "graph": prediction["model"]["graph"],
    }
    assert prediction["timings_ms"]["batch_size"] >= 1


async def test_several_images_answered_in_order(client: httpx.AsyncClient) -> None:
    files = [("file", (f"img{i}.png", png_for_part(i), "image/png")) for i in (2, 0, 1)]
    response = await client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["image_name"] for p in predictions] == ["img2.png", "img0.png", "img1.png"]
    assert [p["body_part"]["label"] for p in predictions] == ["shoulder", "elbow", "hand"]
    assert predictions[0]["fracture"]["label"] == "fractured"  # m = 0.83


async def test_json_base64_and_data_url(client: httpx.AsyncClient) -> None:
    encoded = base64.b64encode(encode_jpeg(constant_image(200)[:80, :80])).decode()
    for image in (encoded, "data:image/jpeg;base64," + encoded):
        response = await client.post("/v1/predict", json={"image": image, "image_name": "a.jpg"})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["image_name"] == "a.jpg"
        assert prediction["fracture"]["probability"] == pytest.approx(200 / 255, abs=0.01)


async def test_raw_image_body_with_hint(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/predict?body_part=hand",
        content=png_for_part(0),
        headers={"content-type": "image/png", "x-image-name": "raw.png"},
    )
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["image_name"] == "raw.png"
    assert prediction["body_part"]["label"] == "hand"  # the hint wins over the router's 'elbow'
    assert prediction["body_part"]["source"] == "client"


async def test_hint_in_multipart_form(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/predict", files={"file": ("a.png", png_for_part(2))}, data={"body_part": "elbow"})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["body_part"]["label"] == "elbow"


async def test_real_radiograph_jpeg(client: httpx.AsyncClient) -> None:
    path = next(XRAY.rglob("*.jpg"))
    response = await client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["body_part"]["label"] in DEFAULT_PARTS


async def test_trained_flag_and_warning(tmp_path: Path) -> None:
    for trained in (False, True):
        bundle = build_tiny_bundle(tmp_path / str(trained), trained=trained)
        async with serving(bundle) as (_, client):
            prediction = (await client.post("/v1/predict", files={"file": ("a.png", png_for_part(1))})).json()[
                "predictions"
            ][0]
            models = (await client.get("/v1/models")).json()
        assert prediction["model"]["trained"] is trained
        assert models["trained"] is trained
        has_warning = any("UNTRAINED" in w for w in prediction["warnings"])
        assert has_warning is (not trained)
        assert any("UNTRAINED" in w for w in models["warnings"]) is (not trained)


async def test_operating_point_flags(tmp_path: Path) -> None:
    thresholds = {p: {"decision": 0.3, "high_sensitivity": 0.3, "high_specificity": 0.9} for p in DEFAULT_PARTS}
    bundle = build_tiny_bundle(tmp_path, thresholds=thresholds)
    async with serving(bundle) as (_, client):
        response = await client.post("/v1/predict", files={"file": ("a.png", png_for_part(1))})  # m = 0.5
    fracture = response.json()["predictions"][0]["fracture"]
    assert fracture["label"] == "fractured"
    assert fracture["threshold"] == 0.3
    assert fracture["suspicious"] is True
    assert fracture["definite"] is False


# -- batching under concurrency -------------------------------------------------------------------------------


async def test_concurrent_requests_form_batches_and_get_their_own_answers(bundle: Path) -> None:
    async with serving(bundle, max_batch_size=8) as (app, client):
        gate = Gate(app.state.predictor)
        first = asyncio.create_task(client.post("/v1/predict", files={"file": ("x.png", png_for_part(0))}))
        await gate.wait_entered()
        values = [20 + 10 * i for i in range(20)]  # distinct brightness: distinct answers
        posts = [
            asyncio.create_task(
                client.post("/v1/predict", files={"file": (f"{v}.png", encode_png(constant_image(v)[:32, :32]))})
            )
            for v in values
        ]
        await until(lambda: app.state.predictor.batcher.queued == len(values))
        gate.release.set()
        responses = await asyncio.gather(first, *posts)
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses)
    for value, response in zip(values, responses[1:], strict=True):
        prediction = response.json()["predictions"][0]
        assert prediction["image_name"] == f"{value}.png"
        assert prediction["fracture"]["probability"] == pytest.approx(value / 255, abs=1e-5)
    assert gate.sizes[0] == 1
    assert max(gate.sizes[1:]) == 8  # 20 queued images, max batch 8 -> 8, 8, 4
    assert sum(gate.sizes) == 21
    counts = [line for line in metrics.splitlines() if line.startswith("bfd_batch_size_count")]
    assert counts == ["bfd_batch_size_count 4.0"], gate.sizes


async def test_full_queue_refuses_at_once_with_retry_after(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle, max_queue_size=2, max_batch_size=1) as (app, client):
        gate = Gate(app.state.predictor)
        running = asyncio.create_task(client.post("/v1/predict", files={"file": ("r.png", png_for_part(0))}))
        await gate.wait_entered()
        queued = [
            asyncio.create_task(client.post("/v1/predict", files={"file": (f"q{i}.png", png_for_part(1))}))
            for i in range(2)
        ]
        await until(lambda: app.state.predictor.batcher.queued == 2)
        refused = await client.post("/v1/predict", files={"file": ("late.png", png_for_part(2))})
        # Several images need several slots: refused as a whole, not partly answered.
        gate.release.set()
        answered = await asyncio.gather(running, *queued)
        after = await client.post("/v1/predict", files={"file": ("after.png", png_for_part(2))})
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["code"] == "overloaded"
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert after.status_code == 200  # serving normally again


async def test_refusals_under_overload_log_one_warning_not_one_error_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shedding load is the design, not a fault: operators get one WARNING per interval, /metrics the count."""
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle, max_queue_size=1, max_batch_size=1) as (app, client):
        gate = Gate(app.state.predictor)
        running = asyncio.create_task(client.post("/v1/predict", files={"file": ("r.png", png_for_part(0))}))
        await gate.wait_entered()
        queued = asyncio.create_task(client.post("/v1/predict", files={"file": ("q.png", png_for_part(1))}))
        await until(lambda: app.state.predictor.batcher.queued == 1)
        with caplog.at_level("DEBUG", logger="service.errors"):
            refused = [
                await client.post("/v1/predict", files={"file": (f"x{i}.png", png_for_part(2))}) for i in range(25)
            ]
        gate.release.set()
        await asyncio.gather(running, queued)
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in refused] == [503] * 25
    records = [r for r in caplog.records if r.name == "service.errors"]
    assert len(records) == 1
    assert records[0].levelname == "WARNING"
    assert "overloaded" in records[0].getMessage()
    assert 'bfd_requests_total{route="/v1/predict",status="503"} 25.0' in metrics


async def test_client_gone_is_skipped_before_inference(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle) as (app, client):
        gate = Gate(app.state.predictor)
        running = asyncio.create_task(client.post("/v1/predict", files={"file": ("r.png", png_for_part(0))}))
        await gate.wait_entered()
        # A raw ASGI request whose client disconnects while its image waits in the queue.
        disconnect = asyncio.Event()
        body = png_for_part(1)
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/predict",
            "raw_path": b"/v1/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
            "state": {},
        }
        gone = asyncio.create_task(app(scope, receive, send))
        await until(lambda: app.state.predictor.batcher.queued == 1)
        disconnect.set()
        await gone
        gate.release.set()
        assert (await running).status_code == 200
        later = await client.post("/v1/predict", files={"file": ("l.png", png_for_part(2))})
        metrics = (await client.get("/metrics")).text
    assert later.status_code == 200
    assert gate.sizes == [1, 1]  # the gone client's image never reached the engine
    assert "bfd_skipped_images_total 1.0" in metrics
    assert sent[0]["status"] == 499


# -- bad input: a clear 4xx, and the service keeps serving -----------------------------------------------------


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"files": {"file": ("a.txt", b"hello, not an image")}}, 422, "undecodable_image"),
        ({"files": {"file": ("t.png", png_for_part(0)[:60])}}, 422, "undecodable_image"),
        ({"files": {"file": ("zero.png", b"")}}, 422, "undecodable_image"),
        ({"files": {"file": ("a.gif", _gif())}}, 415, "unsupported_media_type"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"hello"}, 415, "unsupported_media_type"),
        ({"json": {"image": "not base64 !!"}}, 422, "invalid_base64"),
        ({"content": b'{"image": ', "headers": {"content-type": "application/json"}}, 422, "invalid_json"),
        ({"json": {"picture": "x"}}, 422, "invalid_json"),
        ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, None),
        ({"files": {"other": ("a.png", png_for_part(0))}}, 422, "missing_file"),
        ({"files": {"file": ("a.png", png_for_part(0))}, "params": {"body_part": "knee"}}, 422, "unknown_body_part"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    response = await client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    assert body["detail"]
    if code:
        assert body["code"] == code
    good = await client.post("/v1/predict", files={"file": ("ok.png", png_for_part(1))})
    assert good.status_code == 200


async def test_one_bad_image_fails_its_request_alone(client: httpx.AsyncClient) -> None:
    good = [client.post("/v1/predict", files={"file": (f"g{i}.png", png_for_part(i))}) for i in range(3)]
    bad = client.post("/v1/predict", files=[("file", ("ok.png", png_for_part(0))), ("file", ("bad.png", b"junk"))])
    responses = await asyncio.gather(*good, bad)
    assert [r.status_code for r in responses] == [200, 200, 200, 422]
    assert "bad.png" in responses[-1].json()["detail"]


async def test_byte_and_pixel_limits(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    big = encode_png(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    async with serving(bundle, max_upload_bytes=50_000, max_pixels=10_000) as (_, client):
        too_many_bytes = await client.post("/v1/predict", files={"file": ("big.png", big)})
        too_many_pixels = await client.post("/v1/predict", files={"file": ("bomb.png", encode_png(constant_image(9)))})

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while streaming
            for _ in range(10):
                yield b"x" * 10_000

        streamed = await client.post("/v1/predict", content=chunked(), headers={"content-type": "image/png"})
        fine = await client.post("/v1/predict", files={"file": ("ok.png", encode_png(constant_image(9)[:50, :50]))})
    assert too_many_bytes.status_code == 413
    assert too_many_bytes.json()["code"] == "payload_too_large"
    assert too_many_pixels.status_code == 413
    assert too_many_pixels.json()["code"] == "image_too_large"
    assert streamed.status_code == 413
    assert fine.status_code == 200


async def test_too_many_images_in_one_request(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    async with serving(bundle, max_images_per_request=2) as (_, client):
        files = [("file", (f"{i}.png", png_for_part(0))) for i in range(3)]
        response = await client.post("/v1/predict", files=files)
    assert response.status_code == 422


# -- the other routes ------------------------------------------------------------------------------------------


async def test_models_health_ready_metrics_docs(client: httpx.AsyncClient, bundle: Path) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["body_parts"] == list(DEFAULT_PARTS)
    assert models["active_provider"] == "CPUExecutionProvider"
    assert models["graph"] in ("fused", "split")
    assert models["batching"]["max_batch_size"] == 16
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}
    await client.post("/v1/predict", files={"file": ("a.png", png_for_part(0))})
    metrics = (await client.get("/metrics")).text
    for name in (
        'bfd_requests_total{route="/v1/predict",status="200"}',
        "bfd_request_latency_seconds_bucket",
        "bfd_batch_size_count",
        "bfd_queue_depth",
        "bfd_inference_seconds_count",
    ):
        assert name in metrics
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"


async def test_not_ready_before_lifespan(tmp_path: Path) -> None:
    app = create_app(Settings(bundle=build_tiny_bundle(tmp_path)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/readyz")).status_code == 503
