"""The results store and `/api/analysis`, against SQLite and a real PostgreSQL server.

Pinned: what is stored (and what never is), newest-first paging, lookups, many concurrent writers losing
nothing, migrations that keep earlier results, and an unreachable database that costs only the storage
routes (503 with a reason) and recovers without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest
from factories import build_tiny_bundle, encode_png, image_for_part, serving
from postgres_server import PostgresServer

from loadtest.servers import free_port
from service.store import MIGRATIONS_DIR, Analysis, ResultsStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "bundle")


def png(index: int, shift: int = 0) -> bytes:
    return encode_png(image_for_part(index, 3, shift)[:40, :50])


async def test_analysis_is_stored_and_read_back(bundle: Path, database_url: str) -> None:
    data = png(1, 3)
    async with serving(bundle, database_url=database_url) as (_, client):
        created = await client.post(
            "/api/analysis?heatmap=true",
            files={"image": ("upload.png", data, "image/png")},
            data={"image_name": "left-hand.png"},
        )
        assert created.status_code == 201, created.text
        record = created.json()
        assert record["image_name"] == "left-hand.png"
        assert record["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert record["model_name"] == "tiny"
        assert record["trained"] is False
        assert record["result"]["body_part"]["label"] == "hand"
        assert record["result"]["heatmap"]["overlay_png_base64"]  # the answer has the overlay...
        assert record["disclaimer"]
        fetched = (await client.get(f"/api/analysis/{record['id']}")).json()
    assert fetched["id"] == record["id"]
    assert fetched["result"]["fracture"] == record["result"]["fracture"]
    assert fetched["result"]["heatmap"]["grid"] == record["result"]["heatmap"]["grid"]
    assert fetched["result"]["heatmap"]["overlay_png_base64"] is None  # ...the store keeps only the grid


async def test_history_is_newest_first_paginated_and_filtered(bundle: Path, database_url: str) -> None:
    async with serving(bundle, database_url=database_url) as (_, client):
        ids = []
        for index, name in enumerate(["a.png", "b.png", "a.png", "c.png", "a.png"]):
            response = await client.post("/api/analysis", files={"image": (name, png(index % 3))})
            ids.append(response.json()["id"])
        page = (await client.get("/api/analysis", params={"limit": 2})).json()
        second = (await client.get("/api/analysis", params={"limit": 2, "offset": 2})).json()
        only_a = (await client.get("/api/analysis", params={"image_name": "a.png"})).json()
    assert page["total"] == 5
    assert [item["id"] for item in page["items"]] == ids[::-1][:2]
    assert [item["id"] for item in second["items"]] == ids[::-1][2:4]
    assert only_a["total"] == 3
    assert [item["id"] for item in only_a["items"]] == [ids[4], ids[2], ids[0]]


async def test_unknown_id_and_bad_requests_are_clear_4xx(bundle: Path, database_url: str) -> None:
    async with serving(bundle, database_url=database_url) as (_, client):
        missing = await client.get("/api/analysis/999999")
        not_an_image = await client.post("/api/analysis", files={"image": ("x.png", b"not an image")})
        two = await client.post("/api/analysis", files=[("image", ("a.png", png(0))), ("image", ("b.png", png(1)))])
        paging = await client.get("/api/analysis", params={"limit": 0})
        listed = (await client.get("/api/analysis")).json()
    assert missing.status_code == 404
    assert "999999" in missing.json()["detail"]
    assert not_an_image.status_code == 422
    assert two.status_code == 422
    assert paging.status_code == 422
    assert listed["total"] == 0  # nothing half-stored by the refusals


async def test_concurrent_writers_lose_nothing(bundle: Path, database_url: str) -> None:
    images = [encode_png(image_for_part(i % 3, 3, i % 7 - 3)[: 30 + i, :40]) for i in range(40)]
    async with serving(bundle, database_url=database_url, max_queue_size=64) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/api/analysis", files={"image": (f"img{i}.png", d)}) for i, d in enumerate(images))
        )
        assert [r.status_code for r in responses] == [201] * len(images)
        listed = (await client.get("/api/analysis", params={"limit": 200})).json()
    assert listed["total"] == len(images)
    assert len({r.json()["id"] for r in responses}) == len(images)
    stored = {item["image_name"]: item["image_sha256"] for item in listed["items"]}
    assert stored == {f"img{i}.png": hashlib.sha256(d).hexdigest() for i, d in enumerate(images)}


async def test_image_bytes_are_kept_only_when_enabled(bundle: Path, database_url: str) -> None:
    data = png(2)
    for keep in (False, True):
        async with serving(bundle, database_url=database_url, store_images=keep) as (app, client):
            record = (await client.post("/api/analysis", files={"image": ("s.png", data)})).json()
            store: ResultsStore = app.state.store
            row = await store.get(record["id"])
        assert isinstance(row, Analysis)
        assert row.image_bytes == (data if keep else None)


async def test_results_survive_a_restart_and_the_schema_is_at_head(bundle: Path, database_url: str) -> None:
    async with serving(bundle, database_url=database_url) as (_, client):
        first = (await client.post("/api/analysis", files={"image": ("keep.png", png(0))})).json()
    async with serving(bundle, database_url=database_url) as (app, client):  # a new process: migrations run again
        again = await client.get(f"/api/analysis/{first['id']}")
        store: ResultsStore = app.state.store
        async with store.engine.connect() as connection:
            version = (await connection.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
    assert again.status_code == 200
    assert again.json()["result"] == first["result"]
    assert version == _head_revision()


def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


async def test_unreachable_store_costs_only_storage_routes(bundle: Path) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    async with serving(bundle, database_url=url) as (_, client):
        predicted = await client.post("/v1/predict", files={"file": ("a.png", png(1))})
        stored = await client.post("/api/analysis", files={"image": ("a.png", png(1))})
        listed = await client.get("/api/analysis")
        ready = await client.get("/readyz")
    assert predicted.status_code == 200
    assert stored.status_code == listed.status_code == 503
    assert stored.json()["detail"].startswith("results store unavailable; predictions still work; retry in ")
    assert "127.0.0.1" not in stored.text
    assert "nowhere" not in stored.text  # the database's name is for the log only
    assert int(stored.headers["retry-after"]) >= 1
    assert ready.status_code == 200


async def test_store_recovers_without_a_restart(bundle: Path, postgres: PostgresServer) -> None:
    postgres.stop()
    try:
        async with serving(bundle, database_url=postgres.url) as (_, client):
            down = await client.post("/api/analysis", files={"image": ("a.png", png(0))})
            postgres.start()
            # as a client would: wait as long as Retry-After says, then try again (the store backs off)
            up = await client.post("/api/analysis", files={"image": ("a.png", png(0))})
            for _ in range(5):
                if up.status_code != 503:
                    break
                await asyncio.sleep(float(up.headers["retry-after"]))
                up = await client.post("/api/analysis", files={"image": ("a.png", png(0))})
            listed = (await client.get("/api/analysis", params={"image_name": "a.png"})).json()
    finally:
        if not _listening(postgres.port):  # leave the shared server running for the other tests
            postgres.start()
    assert down.status_code == 503
    assert up.status_code == 201, up.text
    assert listed["total"] >= 1


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sqlite_file_is_a_real_sqlite_database_with_the_table(tmp_path: Path) -> None:
    """The default store is an ordinary SQLite file other tools can read."""
    path = tmp_path / "r.sqlite3"
    bundle = build_tiny_bundle(tmp_path / "b")

    async def one() -> None:
        async with serving(bundle, database_url=f"sqlite+aiosqlite:///{path}") as (_, client):
            await client.post("/api/analysis", files={"image": ("x.png", png(0))})

    asyncio.run(one())
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT image_name, body_part, fracture_label FROM analyses").fetchall()
    assert rows == [("x.png", "elbow", rows[0][2])]
    assert rows[0][2] in ("fractured", "normal")


def test_stores_migrating_at_once_in_one_process_all_get_ready(tmp_path: Path) -> None:
    """Alembic keeps its context in module globals: stores starting together (two apps in one process, the
    desktop's in-process client next to a server) migrate one after the other, on one loop or on several threads."""
    import threading

    urls = [f"sqlite+aiosqlite:///{tmp_path / f'{i}.sqlite3'}" for i in range(4)]

    async def ready_together(batch: list[str]) -> None:
        stores = [ResultsStore(url) for url in batch]
        try:
            await asyncio.gather(*(store.ensure_ready() for store in stores))
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    errors: list[BaseException] = []

    def in_thread(batch: list[str]) -> None:
        try:
            asyncio.run(ready_together(batch))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=in_thread, args=(urls[i : i + 2],)) for i in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    for url in urls:
        with sqlite3.connect(url.split("///", 1)[1]) as connection:
            assert connection.execute("SELECT version_num FROM alembic_version").fetchone() is not None
