"""Results store faults: whatever the database URL or the database does, predictions keep working.

Pinned, against SQLite and a real PostgreSQL server: a URL that cannot be used never stops the app from
starting (predict 200, /readyz ready, /api/analysis 503 with a generic reason, the log says what is wrong
without the password); during an outage the store backs off (calls in the window answer 503 at once, and the
connection attempts counted by a SQLAlchemy event do not grow), one call per window probes, no call queues
behind a probe, and the store recovers by itself; no 503 body names the host, port, user or database; ids and
offsets past what the database holds answer 422, not 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part, serving
from postgres_server import PostgresServer
from sqlalchemy import event
from test_results_store import _listening

from loadtest.servers import free_port
from service.store import MAX_ROW_NUMBER, NewAnalysis, ResultsStore, StoreUnavailableError

pytestmark = pytest.mark.anyio

SECRET = "pw-never-shown"
USER = "bfd_clinic_user"
HOST = "db.radiology.example.internal"
DATABASE = "patients_results"
RESULT = {
    "model": {"name": "tiny", "version": "0", "trained": False},
    "body_part": {"label": "hand"},
    "fracture": {"label": "normal", "probability": 0.1},
}


class SteppedClock:
    """A monotonic clock that moves only when the test says: the back-off window, without waiting for it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ConnectionAttempts:
    """Counts every connection the store's engine tries to open (DialectEvents.do_connect fires before each)."""

    def __init__(self, store: ResultsStore) -> None:
        assert store.engine is not None
        self.count = 0
        event.listen(store.engine.sync_engine, "do_connect", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "bundle")


def png(index: int = 1) -> bytes:
    return encode_png(image_for_part(index, 3)[:40, :50])


def _assert_generic(response: httpx.Response, *secrets: str) -> None:
    """A 503 from the storage routes: JSON with a reason, naming none of the connection's details."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"detail", "code", "status"}
    assert body["code"] == "store_unavailable"
    assert "results store unavailable" in body["detail"]
    assert "predictions still work" in body["detail"]
    for secret in secrets:
        assert secret not in response.text, f"{secret!r} leaked into {response.text!r}"
        assert secret not in str(response.headers)


# --- a URL that cannot be used ----------------------------------------------------------------------------------

BAD_URLS = [
    "not-a-url",
    "",
    f"nosuchdatabase+nodriver://{USER}:{SECRET}@{HOST}/{DATABASE}",
    f"postgresql+asyncpg://{USER}:{SECRET}@{HOST}:notaport/{DATABASE}",
    f"postgresql+asyncpg://{USER}:{SECRET}@{HOST}:99999/{DATABASE}",
    f"sqlite:///{DATABASE}.sqlite3",  # a synchronous driver: the async engine refuses it
]


@pytest.mark.parametrize("url", BAD_URLS)
async def test_a_url_that_cannot_be_used_costs_only_the_storage_routes(
    bundle: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(bundle, database_url=url) as (_, client):
        ready = await client.get("/readyz")
        predicted = await client.post("/v1/predict", files={"file": ("a.png", png())})
        listed = await client.get("/api/analysis")
        stored = await client.post("/api/analysis", files={"image": ("a.png", png())})
    assert ready.status_code == 200
    assert predicted.status_code == 200, predicted.text
    for response in (listed, stored):
        _assert_generic(response, USER, SECRET, HOST, DATABASE, "99999", "notaport")
        assert "misconfigured" in response.json()["detail"]
        assert "retry-after" not in response.headers  # retrying cannot help until the URL is fixed
    errors = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "BFD_DATABASE_URL" in r.getMessage()
    ]
    assert errors, "the start-up log must say the database URL cannot be used"
    assert "expected sqlite+aiosqlite:///FILE or postgresql+asyncpg://" in errors[0]
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_the_redacted_url_hides_the_password_even_when_the_url_does_not_parse() -> None:
    for url in BAD_URLS[2:5]:
        store = ResultsStore(url)
        assert SECRET not in store.redacted_url
        assert store.misconfigured is not None
        assert SECRET not in store.misconfigured
        assert SECRET not in store.scrub(f"driver said: {url} and {SECRET}")


# --- an outage: back off, probe once per window, recover ----------------------------------------------------------


@pytest.fixture
def clinic_url(postgres: PostgresServer) -> str:  # noqa: F811 - the shared fixture
    """A database owned by a user of its own, so that the test can look for the user's name in answers."""
    name = f"faults_{free_port()}"

    async def create() -> None:
        import asyncpg

        connection = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="postgres", database="postgres")
        try:
            await connection.execute(
                f"DO $$ BEGIN CREATE ROLE {USER} LOGIN; EXCEPTION WHEN duplicate_object THEN END $$"
            )
            await connection.execute(f'CREATE DATABASE "{name}" OWNER {USER}')
        finally:
            await connection.close()

    asyncio.run(create())
    return f"postgresql+asyncpg://{USER}:{SECRET}@127.0.0.1:{postgres.port}/{name}"


async def test_postgres_stopped_mid_run_answers_503_at_once_and_recovers(
    bundle: Path,
    postgres: PostgresServer,  # noqa: F811 - the shared fixture
    clinic_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    database = clinic_url.rsplit("/", 1)[1]
    secrets = ("127.0.0.1", str(postgres.port), USER, database, SECRET)
    try:
        async with serving(bundle, database_url=clinic_url) as (app, client):
            store: ResultsStore = app.state.store
            clock = SteppedClock()
            store.clock = clock
            attempts = ConnectionAttempts(store)
            first = await client.post("/api/analysis", files={"image": ("before.png", png(0))})
            assert first.status_code == 201, first.text

            postgres.stop()
            down = await client.get("/api/analysis")
            _assert_generic(down, *secrets)
            assert down.headers["retry-after"] == "1"
            tried = attempts.count
            assert tried >= 1  # the failing call itself went to the database

            # Within the window: refused at once, the database not even tried; predictions unaffected.
            within = [
                await client.get("/api/analysis"),
                await client.get(f"/api/analysis/{first.json()['id']}"),
                await client.post("/api/analysis", files={"image": ("during.png", png(1))}),
            ]
            for response in within:
                _assert_generic(response, *secrets)
                assert response.headers["retry-after"] == "1"
            assert attempts.count == tried
            assert (await client.post("/v1/predict", files={"file": ("p.png", png(2))})).status_code == 200
            assert (await client.get("/readyz")).status_code == 200

            # The window over: one probe, which fails, and the window doubles.
            clock.advance(1.0)
            probe = await client.get("/api/analysis")
            _assert_generic(probe, *secrets)
            assert probe.headers["retry-after"] == "2"
            assert attempts.count > tried
            tried = attempts.count
            clock.advance(1.0)  # still inside the doubled window
            _assert_generic(await client.get("/api/analysis"), *secrets)
            assert attempts.count == tried

            # Back: the next probe succeeds, without a restart of the app, and the window resets.
            postgres.start()
            clock.advance(1.0)
            back = await client.get("/api/analysis")
            assert back.status_code == 200, back.text
            assert [item["image_name"] for item in back.json()["items"]] == ["before.png"]
            assert store.retry_in_s() == 0
            again = await client.post("/api/analysis", files={"image": ("after.png", png(1))})
            assert again.status_code == 201, again.text

            postgres.stop()  # a new outage starts again from the shortest window
            _assert_generic(await client.get("/api/analysis"), *secrets)
            assert (await client.get("/api/analysis")).headers["retry-after"] == "1"
    finally:
        if not _listening(postgres.port):
            postgres.start()
    messages = [record.getMessage() for record in caplog.records]
    assert any("results store unavailable at" in m and "***" in m for m in messages), messages
    assert any("results store back at" in m for m in messages)
    assert all(SECRET not in m for m in messages)


async def test_an_unopenable_sqlite_file_backs_off_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    path = blocker / "results.sqlite3"
    clock = SteppedClock()
    store = ResultsStore(f"sqlite+aiosqlite:///{path}", clock=clock)
    attempts = ConnectionAttempts(store)
    try:
        with pytest.raises(StoreUnavailableError) as down:
            await store.ensure_ready()
        assert down.value.retry_after_s == 1
        assert str(tmp_path) not in str(down.value)
        tried = attempts.count
        for _ in range(3):
            with pytest.raises(StoreUnavailableError):
                await store.list(image_name=None, limit=5, offset=0)
        assert attempts.count == tried  # inside the window the file is not even opened

        blocker.unlink()
        blocker.mkdir()
        clock.advance(1.0)
        assert await store.list(image_name=None, limit=5, offset=0) == ([], 0)
        assert attempts.count > tried
    finally:
        await store.close()


async def test_calls_during_a_probe_are_refused_not_queued() -> None:
    """A database that accepts the connection and then says nothing: the probe hangs on it, and meanwhile
    every other call is answered at once (one probe per window; no call waits behind a migration lock)."""
    connected = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = ResultsStore(f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/{DATABASE}", clock=SteppedClock())
    try:
        probe = asyncio.create_task(store.ensure_ready())
        await asyncio.wait_for(connected.wait(), timeout=30)
        for _ in range(3):
            with pytest.raises(StoreUnavailableError) as refused:
                await store.list(image_name=None, limit=5, offset=0)
            assert refused.value.retry_after_s == 1
        with pytest.raises(StoreUnavailableError):
            await store.add(NewAnalysis(image_name="x.png", image_sha256="0" * 64, result=RESULT))
        assert not probe.done()
        assert len(writers) == 1  # the refused calls opened no connection of their own
        for writer in writers:
            writer.close()
        with pytest.raises(StoreUnavailableError):
            await probe
    finally:
        server.close()
        await store.close()


# --- ids and offsets past what the database holds ------------------------------------------------------------------


async def test_ids_and_offsets_past_64_bits_are_422_not_500(bundle: Path, database_url: str) -> None:  # noqa: F811
    huge = "99999999999999999999"
    async with serving(bundle, database_url=database_url) as (_, client):
        created = await client.post("/api/analysis", files={"image": ("a.png", png())})
        assert created.status_code == 201, created.text
        refused = {
            "offset": await client.get("/api/analysis", params={"offset": huge}),
            "offset past int32": await client.get("/api/analysis", params={"offset": MAX_ROW_NUMBER + 1}),
            "limit": await client.get("/api/analysis", params={"limit": huge}),
            "id": await client.get(f"/api/analysis/{huge}"),
            "id past int32": await client.get(f"/api/analysis/{MAX_ROW_NUMBER + 1}"),
            "negative id": await client.get("/api/analysis/-1"),
            "id 0": await client.get("/api/analysis/0"),
        }
        edge_page = await client.get("/api/analysis", params={"offset": MAX_ROW_NUMBER})
        edge_id = await client.get(f"/api/analysis/{MAX_ROW_NUMBER}")
    for what, response in refused.items():
        assert response.status_code == 422, (what, response.text)
        body = response.json()
        assert body["code"] == "invalid_request"
        assert ("offset" if "offset" in what else "limit" if what == "limit" else "analysis_id") in body["detail"]
    assert edge_page.status_code == 200, edge_page.text
    assert edge_page.json()["items"] == []
    assert edge_page.json()["total"] == 1
    assert edge_id.status_code == 404
    assert str(MAX_ROW_NUMBER) in edge_id.json()["detail"]
