"""Slow and silent clients against a real `bfd serve` process, over real sockets.

Many connections that trickle their bodies, or never finish their headers, must not stop anybody else from
being served, and must themselves be cut: bodies with 408 (too slow), headers with 408 and a closed
connection (too late). Before this was built, a slot was held while a body arrived, with no time limit, so
as many slow senders as the queue held made every other request get 503 for as long as they lasted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part

from loadtest.servers import bfd_serve

pytestmark = pytest.mark.anyio

SLOW_BODIES = 24  # three times the queue bound below
SILENT_HEADERS = 8


async def _slow_body(host: str, port: int, stop: asyncio.Event) -> bytes:
    """Declare a 400 KB PNG body, then send one byte every 0.2 s until the server answers; its answer."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/predict HTTP/1.1\r\nhost: test\r\ncontent-type: image/png\r\ncontent-length: 400000\r\n\r\n"
    )
    await writer.drain()

    async def trickle() -> None:
        while not stop.is_set():
            writer.write(b"\x00")
            await writer.drain()
            await asyncio.sleep(0.2)

    sending = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(reader.read(), 60)  # until the server closes the connection
    finally:
        sending.cancel()
        writer.close()


async def _silent_headers(host: str, port: int) -> tuple[bytes, bool]:
    """Start a request and never finish its headers; what the server sent and whether it closed."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/predict HTTP/1.1\r\nhost: test\r\n")
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(4096), 60)
        closed = await asyncio.wait_for(reader.read(1), 10) == b""
        return answer, closed
    finally:
        writer.close()


async def test_slow_senders_are_cut_and_delay_nobody(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    env = {
        "BFD_MAX_QUEUE_SIZE": "8",
        "BFD_UPLOAD_TIMEOUT_S": "30",
        "BFD_UPLOAD_MIN_BYTES_PER_S": "20000",
        "BFD_HEADER_TIMEOUT_S": "2",
    }
    with bfd_serve(bundle, tmp_path / "serve", env=env) as server:
        host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
        stop = asyncio.Event()
        slow = [asyncio.create_task(_slow_body(host, port, stop)) for _ in range(SLOW_BODIES)]
        silent = [asyncio.create_task(_silent_headers(host, port)) for _ in range(SILENT_HEADERS)]
        await asyncio.sleep(1.0)  # every slow sender is connected and mid-body
        image = encode_png(image_for_part(1)[:64, :64])
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            served = await asyncio.gather(
                *(client.post("/v1/predict", files={"file": (f"n{i}.png", image)}) for i in range(6))
            )
            assert all(not task.done() for task in slow)  # the normal requests were served while they trickled
            slow_answers = await asyncio.gather(*slow)
            stop.set()
            silent_answers = await asyncio.gather(*silent)
            metrics = (await client.get("/metrics")).text
            after = await client.post("/v1/predict", files={"file": ("after.png", image)})
        assert server.process.poll() is None
    assert [r.status_code for r in served] == [200] * 6
    for answer in slow_answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload_too_slow" in answer
        assert b"connection: close" in answer.lower()
    for answer, closed in silent_answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert closed
    assert f"bfd_slow_uploads_total {float(SLOW_BODIES)}" in metrics
    assert after.status_code == 200
