"""The one load driver: closed loop (each client sends its next request when the last came back) and open
loop (Poisson arrivals whatever the server does), one keep-alive connection per client, latency timed from each
request's scheduled send time, so a slow server (or a late load generator) cannot hide its queueing.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.resources import Window
from loadtest.servers import Server
from loadtest.stats import Outcome, percentiles, summarise

PREDICT = "/v1/predict"
CLIENT_TIMEOUT_S = 120.0
Json = dict[str, Any]
Upload = tuple[str, bytes] | tuple[str, bytes, str]  # name, bytes, media type (default image/jpeg)


def auth_headers() -> dict[str, str]:
    """A server started with BFD_API_KEY in its environment needs it on every /v1 request (it inherits ours)."""
    key = os.environ.get("BFD_API_KEY", "").strip()
    return {"X-API-Key": key} if key else {}


@dataclass(frozen=True)
class Body:
    """A multipart upload encoded once (the load generator must not spend its CPU re-encoding it)."""

    name: str
    content: bytes
    content_type: str
    auth: tuple[tuple[str, str], ...] = ()

    @property
    def headers(self) -> dict[str, str]:
        return {"content-type": self.content_type, **dict(self.auth)}


def encode_bodies(uploads: Sequence[Upload]) -> list[Body]:
    """Each (name, bytes[, media type]) as a one-file multipart upload (JPEG when no type is given)."""
    auth = tuple(auth_headers().items())
    bodies = []
    for upload in uploads:
        name, data = upload[0], upload[1]
        media_type = upload[2] if len(upload) > 2 else "image/jpeg"
        request = httpx.Request("POST", "http://x" + PREDICT, files={"file": (name, data, media_type)})
        bodies.append(Body(name, request.read(), request.headers["content-type"], auth))
    return bodies


class Lanes:
    """Clients of ONE keep-alive connection each, handed out to requests and returned when they finish.

    One httpx client with hundreds of connections spends its time in httpcore's pool bookkeeping (quadratic
    in connections x waiting requests) and becomes the bottleneck long before the server; lanes keep the
    load generator's cost per request flat. A request waiting for a free lane (at most `cap` in flight) is
    still timed from its scheduled send time, so the wait counts against the server, as it should.
    """

    def __init__(self, url: str, cap: int) -> None:
        self.url = url
        self.cap = cap
        self.created = 0
        self.idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        self.all: list[httpx.AsyncClient] = []
        self._ssl = httpx.create_ssl_context()  # one context for every lane (plain HTTP never uses it)

    async def post(self, body: Body, due: float) -> Outcome:
        client = await self._acquire()
        sent = time.perf_counter()
        try:
            response = await client.post(PREDICT, content=body.content, headers=body.headers)
        except httpx.HTTPError as error:
            return Outcome(due, sent, time.perf_counter(), f"transport:{type(error).__name__}")
        finally:
            self.idle.put_nowait(client)
        retry = response.headers.get("retry-after")
        seconds = float(retry) if retry is not None and retry.strip().isdigit() else None
        return Outcome(due, sent, time.perf_counter(), str(response.status_code), retry is not None, seconds)

    async def _acquire(self) -> httpx.AsyncClient:
        if self.idle.empty() and self.created < self.cap:
            self.created += 1
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            client = httpx.AsyncClient(base_url=self.url, timeout=CLIENT_TIMEOUT_S, limits=limits, verify=self._ssl)
            self.all.append(client)
            return client
        return await self.idle.get()

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.all))


async def closed_loop(
    server: Server,
    bodies: Sequence[Body],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    metrics: bool,
    honour_retry_after: bool = False,
) -> Json:
    """`concurrency` clients each sending the next request as soon as the last came back.

    With `honour_retry_after`, a client told 503 + Retry-After waits that long and then sends the same image
    again, as a well-behaved client does (it still needs that image's answer); otherwise it goes on to its
    next image at once (the harshest client). Sending the same image again keeps the answered mix the offered
    mix: a client that moved on lets the images that cost most be refused more often and flatters the
    capacity (measured on the realistic set, INT8: 17.8 img/s answered with 106 ms of server CPU each when
    clients moved on, 14.1 img/s with 133 ms when they sent the same image again).
    """
    lanes = Lanes(server.url, concurrency)
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s
    window = Window(server, metrics)

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < window_end:
            outcome = await lanes.post(bodies[i % len(bodies)], time.perf_counter())
            outcomes.append(outcome)
            if honour_retry_after and outcome.status == "503" and outcome.retry_after_s:
                await asyncio.sleep(min(outcome.retry_after_s, max(0.0, window_end - time.perf_counter())))
                continue  # the same image again
            i += concurrency

    async def measure() -> Json:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        window.open()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        return await window.close()

    try:
        measuring = asyncio.ensure_future(measure())
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        resources = await measuring
    finally:
        await lanes.aclose()
    counted = [o for o in outcomes if window_start <= o.done <= window_end]
    return {
        "kind": "closed",
        "concurrency": concurrency,
        "honour_retry_after": honour_retry_after,
        "warmup_s": warmup_s,
        **summarise(counted, duration_s),
        **resources,
    }


def poisson_schedule(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process of `rate` per second over `seconds`."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return offsets
        offsets.append(t)


async def open_loop(
    server: Server,
    bodies: Sequence[Body],
    rate: float,
    warmup_s: float,
    duration_s: float,
    seed: int,
    metrics: bool,
    max_in_flight: int = 512,
) -> Json:
    """Requests sent at Poisson arrival times whatever the server does; latency from the scheduled time."""
    schedule = poisson_schedule(rate, warmup_s + duration_s, seed)
    lanes = Lanes(server.url, max_in_flight)
    outcomes: list[tuple[float, Outcome]] = []
    window = Window(server, metrics)

    async def one(i: int, offset: float, due: float) -> None:
        outcomes.append((offset, await lanes.post(bodies[i % len(bodies)], due)))

    async def measure() -> Json:
        await asyncio.sleep(warmup_s)
        window.open()
        await asyncio.sleep(duration_s)
        return await window.close()

    try:
        start = time.perf_counter()
        measuring = asyncio.ensure_future(measure())
        tasks = []
        for i, offset in enumerate(schedule):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, offset, due)))
        resources = await measuring
        await asyncio.gather(*tasks)
        drained_s = time.perf_counter() - start - warmup_s - duration_s
    finally:
        await lanes.aclose()
    counted = [o for offset, o in outcomes if offset >= warmup_s]
    middle = warmup_s + duration_s / 2
    summary = summarise(counted, duration_s)
    accepted = [o for o in counted if o.status == "200"]
    refused = [o for o in counted if o.status == "503"]
    return {
        "kind": "open",
        "arrivals": "poisson",
        "target_rate_img_s": rate,
        "offered_rate_img_s": len(counted) / duration_s,
        "warmup_s": warmup_s,
        **summary,
        # throughput_img_s here: 200s per second of offered load (some complete after the window closes)
        "accepted": len(accepted),
        "refused_503": len(refused),
        "refused_503_with_retry_after": sum(o.retry_after for o in refused),
        "refused_latency_ms": percentiles([o.latency_ms for o in refused]),
        "other_5xx": sum(o.status.isdigit() and o.status.startswith("5") and o.status != "503" for o in counted),
        "transport_errors": sum(o.status.startswith("transport:") for o in counted),
        "send_lag_ms": percentiles([(o.sent - o.due) * 1e3 for o in counted]),
        "max_in_flight": max_in_flight,
        "lanes_used": lanes.created,
        "drain_after_window_s": drained_s,
        # accepted p99 by half of the window (by scheduled time): queueing that grows shows up as a rise
        "accepted_p99_by_half_ms": [
            percentiles([o.latency_ms for offset, o in outcomes if o.status == "200" and low <= offset < high])["p99"]
            for low, high in ((warmup_s, middle), (middle, warmup_s + duration_s))
        ],
        **resources,
    }


async def answer_of(url: str, body: Body) -> Json:
    """The server's body part and P(fractured) for one image (to check the baselines answer as we do)."""
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        response = await client.post(PREDICT, content=body.content, headers=body.headers)
    if response.status_code != 200:
        return {"status": response.status_code, "body": response.text[:500]}
    prediction = response.json()["predictions"][0]
    return {
        "status": 200,
        "image": body.name,
        "body_part": prediction["body_part"]["label"],
        "p_fractured": prediction["fracture"]["probability"],
    }


def compare_answers(ours: Json, theirs: Json) -> Json:
    if ours.get("status") != 200 or theirs.get("status") != 200:
        return {"comparable": False}
    return {
        "comparable": True,
        "same_body_part": ours["body_part"] == theirs["body_part"],
        "p_fractured_abs_diff": abs(ours["p_fractured"] - theirs["p_fractured"]),
    }


# --- the run ------------------------------------------------------------------------------------------------
