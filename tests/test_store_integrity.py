"""The store never takes the service down, and never loses data silently.

Pinned: a SQLite store has no `-shm` file, so truncating, freezing (chattr +i) or deleting its files under a
running `bfd serve` costs at most the storage routes (201 or a 503 with a reason, never a dropped connection),
and the process lives on (it died of SIGBUS); its database file deleted or replaced under the service answers 503
(not 201 into a deleted file), predictions and /readyz unaffected, the log says so once, no empty database is
made in its place, and a file put back at the path is adopted with ids continuing past every id handed out;
a `-wal` deleted alone loses nothing; ids are never reused after the newest rows are deleted (AUTOINCREMENT on
SQLite, through migration 0003, which keeps earlier rows; PostgreSQL's sequences); the file is the service's
alone while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part, serving
from sqlalchemy import create_engine
from test_store_faults import SteppedClock

from inference.backoff import retry_delay_s as backoff_delay_s
from loadtest.servers import Server, bfd_serve
from service.store import (
    BACKOFF_MAX_S,
    MIGRATIONS_DIR,
    NewAnalysis,
    ResultsStore,
    StoreUnavailableError,
)

pytestmark = pytest.mark.anyio

RESULT = {
    "model": {"name": "tiny", "version": "0", "trained": False},
    "body_part": {"label": "hand"},
    "fracture": {"label": "normal", "probability": 0.1},
}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "bundle")


def png(index: int = 1) -> bytes:
    return encode_png(image_for_part(index, 3)[:40, :50])


def _assert_refused(response: httpx.Response) -> None:
    """A 503 from the storage routes: JSON with the store's generic reason."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "store_unavailable", body
    assert body["detail"].startswith("results store unavailable; predictions still work"), body


def _store_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("results.sqlite3*"))


# --- a real `bfd serve`: faults of the files cost at most the storage routes, never the process ---------------


@contextmanager
def _immutable(files: list[Path]) -> Iterator[None]:
    """chattr +i on `files` (skips where the file system or the user cannot), undone on the way out."""
    done: list[Path] = []
    try:
        for path in files:
            made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
            if made.returncode != 0:
                pytest.skip(f"chattr +i is not possible here: {made.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=False)


def _post_while_alive(server: Server, rounds: int = 3) -> list[int]:
    """POST /api/analysis and /v1/predict `rounds` times; every answer must come (a dropped connection means the
    process died); the storage answers' statuses."""
    statuses = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for index in range(rounds):
            try:
                stored = client.post("/api/analysis", files={"image": (f"after{index}.png", png(index % 3))})
                predicted = client.post("/v1/predict", files={"file": (f"p{index}.png", png(index % 3))})
            except httpx.TransportError as error:
                server.process.wait(timeout=30)
                raise AssertionError(
                    f"the connection dropped ({error!r}): bfd serve exited with {server.process.returncode}, "
                    f"expected it alive; log tail:\n{server.log_text()[-2000:]}"
                ) from error
            assert stored.status_code in (201, 503), stored.text
            if stored.status_code == 503:
                _assert_refused(stored)
            assert predicted.status_code == 200, predicted.text
            assert server.process.poll() is None
            statuses.append(stored.status_code)
    return statuses


@pytest.mark.parametrize("fault", ["truncated", "immutable", "deleted"])
def test_store_files_truncated_immutable_or_deleted_never_kill_the_service(
    bundle: Path, tmp_path: Path, fault: str
) -> None:
    folder = tmp_path / "serve"
    with bfd_serve(bundle, folder) as server:
        first = httpx.post(f"{server.url}/api/analysis", files={"image": ("before.png", png(0))}, timeout=60)
        assert first.status_code == 201, first.text
        files = _store_files(folder)
        names = [path.name for path in files]
        if fault == "truncated":
            for path in files:
                os.truncate(path, 0)
            _post_while_alive(server)
        elif fault == "immutable":
            with _immutable(files):
                _post_while_alive(server)
        else:
            for path in files:
                path.unlink()
            assert _post_while_alive(server) == [503, 503, 503]  # never 201 into a file that is gone
            assert (httpx.get(f"{server.url}/readyz", timeout=60)).status_code == 200
            assert not (folder / "results.sqlite3").exists()
        # asserted after the requests, so that a -shm still made fails with what it does (SIGBUS) first
        assert not any(name.endswith("-shm") for name in names), names
        assert "results.sqlite3" in names
        assert server.process.poll() is None
    # stopped by SIGTERM, gracefully (uvicorn re-raises the signal once shut down), not by SIGBUS
    log_tail = server.log_path.read_text(errors="replace")[-3000:]
    assert server.process.returncode in (0, -signal.SIGTERM), (server.process.returncode, log_tail)
    assert "Application shutdown complete" in log_tail


# --- a deleted or replaced database: 503 until a file is back, then adopted; nothing silently lost -------------


def _backup(path: Path, into: Path) -> None:
    """A consistent copy of a database file no one else has open (SQLite's online backup API)."""
    with sqlite3.connect(path) as source, sqlite3.connect(into) as target:
        source.backup(target)
    source.close()
    target.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_database_deleted_or_replaced_while_running_answers_503_until_one_is_back(
    bundle: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "db" / "results.sqlite3"
    url = f"sqlite+aiosqlite:///{path}"
    async with serving(bundle, database_url=url) as (_, client):
        ids = [(await client.post("/api/analysis", files={"image": (f"{i}.png", png(i))})).json()["id"] for i in (0, 1)]
    backup = tmp_path / "backup.sqlite3"
    _backup(path, backup)  # the service stopped: the file is free to copy

    async with serving(bundle, database_url=url) as (app, client):
        store: ResultsStore = app.state.store
        clock = SteppedClock()
        store.clock = clock
        third = await client.post("/api/analysis", files={"image": ("2.png", png(2))})
        assert third.status_code == 201, third.text
        ids.append(third.json()["id"])
        assert ids == [1, 2, 3]

        if how == "deleted":
            for name in ("results.sqlite3", "results.sqlite3-wal"):
                (path.parent / name).unlink()
        else:  # an older copy put over it, as a restore while running would
            shutil.copy(backup, tmp_path / "incoming.sqlite3")
            os.replace(tmp_path / "incoming.sqlite3", path)

        stored = await client.post("/api/analysis", files={"image": ("lost.png", png(0))})
        _assert_refused(stored)  # not 201 into a file that is gone
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/v1/predict", files={"file": ("p.png", png(1))})).status_code == 200

        if how == "deleted":
            for _ in range(3):  # probes after each window: still nothing to adopt, and no empty file made
                clock.advance(BACKOFF_MAX_S)
                _assert_refused(await client.get("/api/analysis"))
                _assert_refused(await client.get("/api/analysis/1"))
            assert not path.exists(), "the store made a new database in place of the deleted one"
            shutil.copy(backup, path)  # the backup restored

        clock.advance(BACKOFF_MAX_S)
        again = await client.post("/api/analysis", files={"image": ("again.png", png(1))})
        assert again.status_code == 201, again.text
        assert again.json()["id"] == 4  # past every id handed out, though the restored file's newest is 2
        listed = (await client.get("/api/analysis", params={"limit": 10})).json()
        assert sorted(item["id"] for item in listed["items"]) == [1, 2, 4]
        assert (await client.get("/api/analysis/3")).status_code == 404  # lost with the file, never reused

    errors = [r.getMessage() for r in caplog.records if r.name == "service.store" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # what happened, once
    assert how in errors[0]
    assert str(path) in errors[0]
    if how == "replaced":  # the old file's -wal, left at the path, was moved aside: never replayed into the new one
        assert "kept as" in errors[0]
        assert len(list(path.parent.glob("results.sqlite3-wal.orphaned-*"))) == 1
    assert any("adopted the database file" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'analyses'").fetchone() == (4,)
    connection.close()


async def test_a_wal_deleted_alone_loses_nothing(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite3"
    async with serving(bundle, database_url=f"sqlite+aiosqlite:///{path}") as (app, client):
        store: ResultsStore = app.state.store
        clock = SteppedClock()
        store.clock = clock
        for i in range(3):  # still in the -wal only: far from the checkpoint at 1000 pages
            assert (await client.post("/api/analysis", files={"image": (f"{i}.png", png(i))})).status_code == 201
        (tmp_path / "results.sqlite3-wal").unlink()
        _assert_refused(await client.get("/api/analysis"))
        clock.advance(BACKOFF_MAX_S)
        listed = await client.get("/api/analysis")
        assert listed.status_code == 200, listed.text
        assert listed.json()["total"] == 3
        assert (await client.post("/api/analysis", files={"image": ("3.png", png(0))})).json()["id"] == 4
    with sqlite3.connect(path) as connection:
        assert [row[0] for row in connection.execute("SELECT id FROM analyses ORDER BY id")] == [1, 2, 3, 4]
    connection.close()


async def test_a_wal_without_its_database_is_moved_aside_not_replayed(tmp_path: Path) -> None:
    """A -wal left at the path by a file that is gone (deleted while a service was stopping) would be replayed
    into the new database: pages of the old one in the new one."""
    path = tmp_path / "results.sqlite3"
    (tmp_path / "results.sqlite3-wal").write_bytes(b"left by a database that is gone")
    store = ResultsStore(f"sqlite+aiosqlite:///{path}")
    try:
        await store.ensure_ready()
        assert (await store.add(NewAnalysis("a.png", "0" * 64, RESULT))).id == 1
    finally:
        await store.close()
    [aside] = tmp_path.glob("results.sqlite3-wal.orphaned-*")
    assert aside.read_bytes() == b"left by a database that is gone"


async def test_the_file_is_the_services_alone_and_has_no_shared_memory(tmp_path: Path) -> None:
    """The consequence of keeping the WAL index in heap memory, as documented: no -shm, no second opener."""
    path = tmp_path / "results.sqlite3"
    store = ResultsStore(f"sqlite+aiosqlite:///{path}")
    try:
        await store.ensure_ready()
        await asyncio.gather(*(store.add(NewAnalysis(f"{i}.png", "0" * 64, RESULT)) for i in range(20)))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite3", "results.sqlite3-wal"]
        other = sqlite3.connect(path, timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM analyses").fetchall()
        other.close()
    finally:
        await store.close()
    with sqlite3.connect(path) as connection:  # free once the store is closed
        assert connection.execute("SELECT count(*) FROM analyses").fetchone() == (20,)
    connection.close()


async def test_a_second_store_of_the_process_on_the_file_is_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not after the 30 s busy timeout, and the log says why."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'results.sqlite3'}"
    first, second = ResultsStore(url), ResultsStore(url)
    try:
        await first.ensure_ready()
        async with asyncio.timeout(5):
            with pytest.raises(StoreUnavailableError):
                await second.ensure_ready()
        assert any("another results store of this process holds" in r.getMessage() for r in caplog.records)
        await first.close()
        clock = SteppedClock()
        second.clock = clock
        clock.advance(BACKOFF_MAX_S)
        await second.ensure_ready()  # the file is free again
    finally:
        await first.close()
        await second.close()


def test_the_back_off_doubles_up_to_its_ceiling_and_never_overflows() -> None:
    """`initial * 2 ** (failures - 1)` raised OverflowError from the 1025th failure in a row on."""
    assert [backoff_delay_s(n, 1.0, 30.0) for n in (0, 1, 2, 3, 5, 6)] == [1.0, 1.0, 2.0, 4.0, 16.0, 30.0]
    for failures in (1024, 1025, 10**6, 10**18):
        assert backoff_delay_s(failures, 1.0, 30.0) == 30.0
    assert backoff_delay_s(10**6, 1e-9, 1e300) == 1e-9 * 2.0**64  # a tiny start still ends finite


async def test_a_store_failing_past_a_thousand_times_in_a_row_still_backs_off(tmp_path: Path) -> None:
    """A store kept off its file for a long time (here: another store of the process holds it, the cheapest
    failure there is) keeps answering StoreUnavailableError with the longest back-off, never OverflowError."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'results.sqlite3'}"
    clock = SteppedClock()
    holder, kept_off = ResultsStore(url), ResultsStore(url, clock=clock)
    try:
        await holder.ensure_ready()
        for _ in range(1100):
            with pytest.raises(StoreUnavailableError) as refused:
                await kept_off.ensure_ready()
            clock.advance(BACKOFF_MAX_S)
        assert refused.value.retry_after_s == BACKOFF_MAX_S
    finally:
        await holder.close()
        await kept_off.close()


# --- ids are never reused ---------------------------------------------------------------------------------------


async def _delete_newest(store: ResultsStore) -> int:
    assert store.engine is not None
    async with store.engine.begin() as connection:
        newest = (await connection.exec_driver_sql("SELECT max(id) FROM analyses")).scalar_one()
        await connection.exec_driver_sql(f"DELETE FROM analyses WHERE id = {int(newest)}")
    return int(newest)


async def test_ids_are_never_reused_after_the_newest_rows_are_deleted(bundle: Path, database_url: str) -> None:
    async with serving(bundle, database_url=database_url) as (app, client):
        for i in range(3):
            await client.post("/api/analysis", files={"image": (f"{i}.png", png(i))})
        deleted = await _delete_newest(app.state.store)
        created = (await client.post("/api/analysis", files={"image": ("next.png", png(0))})).json()
        assert created["id"] > deleted, (created["id"], deleted)
    async with serving(bundle, database_url=database_url) as (app, client):  # and after a restart
        deleted = await _delete_newest(app.state.store)
        created = (await client.post("/api/analysis", files={"image": ("later.png", png(1))})).json()
        assert created["id"] > deleted, (created["id"], deleted)


def _upgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with create_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


async def test_migration_0003_keeps_the_rows_and_makes_sqlite_ids_autoincrement(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _upgrade(f"sqlite:///{path}", "0002")  # a store as the previous release left it
    with sqlite3.connect(path) as connection:
        for i in range(3):
            connection.execute(
                "INSERT INTO analyses (created_at, image_name, image_sha256, model_name, model_version, trained, "
                "body_part, fracture_label, p_fractured, abstained, result) "
                f"VALUES ('2026-12-01 00:00:0{i}', 'old{i}.png', 's', 'm', 'v', 0, 'hand', 'normal', 0.1, 0, '{{}}')"
            )
        connection.execute(
            "INSERT INTO outbox (created_at, destination, study_ref, sop_class_uid, sop_instance_uid, attempts, "
            "next_attempt_at) VALUES ('2026-12-01', 'PACS', 's', '1.2', '1.2.3', 0, '2026-12-01')"
        )
    connection.close()

    store = ResultsStore(f"sqlite+aiosqlite:///{path}")
    try:
        old = await store.list(image_name=None, limit=10, offset=0)
        assert sorted(row.image_name for row in old[0]) == ["old0.png", "old1.png", "old2.png"]
        deleted = await _delete_newest(store)
        added = await store.add(NewAnalysis("new.png", "0" * 64, RESULT))
        assert (deleted, added.id) == (3, 4)
    finally:
        await store.close()

    with sqlite3.connect(path) as connection:
        tables = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
        indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        outbox = connection.execute("SELECT id, sop_instance_uid FROM outbox").fetchall()
    connection.close()
    assert "AUTOINCREMENT" in tables["analyses"]
    assert "AUTOINCREMENT" in tables["outbox"]
    assert "uq_outbox_destination_instance" in tables["outbox"]
    assert {
        "ix_analyses_created_at",
        "ix_analyses_image_name",
        "ix_analyses_image_sha256",
        "ix_outbox_pending",
        "ix_outbox_study_ref",
    } <= indexes
    assert outbox == [(1, "1.2.3")]
