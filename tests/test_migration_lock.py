"""Replicas started together on an empty PostgreSQL database migrate its schema once, without an error.

Pinned: three `bfd serve` processes started at the same moment on an empty database all become ready, no log has
an error, a traceback or a store failure (they used to race to create the schema: `IntegrityError: duplicate key
value violates unique constraint "pg_type_typname_nsp_index"` in two of three logs), and alembic_version holds
head once. Timing luck is taken out twice: the replicas' migrations are lined up behind a lock on the schema and
let go together (the race, run every time: the code before the fix failed this test in each of 3 runs, and in 2 of
3 without the gate); and a store whose database's migration lock is held by someone else waits for it, migrating
nothing, then reaches head.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from factories import build_tiny_bundle
from postgres_server import PostgresServer

from loadtest.servers import BFD, Server, start_server, stop_server

BAD_SIGNS = (" ERROR ", " CRITICAL ", "Traceback", "IntegrityError", "results store unavailable")


def _head() -> str:
    from service.store import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _fresh(postgres: PostgresServer, label: str) -> str:
    """A new, empty database on the module's server; its URL."""
    name = f"{label}_{os.getpid()}_{os.urandom(3).hex()}"
    connection = await asyncpg.connect(_dsn(postgres.url))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def _start_together(bundle: Path, folder: Path, url: str, count: int) -> list[Server]:
    """`count` `bfd serve` on the database `url`, started at the same moment (a thread each), once all are ready.
    (Written with `loadtest.servers` alone, so that this test runs unchanged on the code before the fix.)"""
    env = {k: v for k, v in os.environ.items() if k != "BFD_API_KEY"} | {"BFD_DATABASE_URL": url}
    command = [*BFD, "serve", "--bundle", str(bundle)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(start_server, f"replica{k}", command, "/readyz", folder, env, 240.0, inherit_env=False)
            for k in range(1, count + 1)
        ]
    failed = [error for future in futures if (error := future.exception()) is not None]
    servers = [future.result() for future in futures if future.exception() is None]
    if failed:  # every start was awaited: none is left running behind the error
        for server in servers:
            stop_server(server, grace_s=30)
        raise failed[0]
    return servers


async def _versions(url: str) -> list[str] | None:
    """alembic_version's rows; None while the table does not exist."""
    connection = await asyncpg.connect(_dsn(url))
    try:
        if await connection.fetchval("SELECT to_regclass('alembic_version')") is None:
            return None
        return [row["version_num"] for row in await connection.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await connection.close()


async def _waiting_on_locks(connection: asyncpg.Connection) -> int:
    """Sessions of this database waiting for a lock (the schema's, or the migration lock)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    return int(await connection.fetchval(query))


async def _started_at_the_gate(bundle: Path, folder: Path, url: str, count: int) -> list[Server]:
    """`count` replicas started together, their migrations lined up at the schema and let go at once.

    A transaction holds `DROP SCHEMA public` uncommitted: whatever creates a table in it waits for that lock (or,
    with the fix, for the migration lock), so every replica reaches the first CREATE TABLE and waits there; the
    rollback then lets them all go together. The race the replicas ran by chance, run every time.
    """
    gate = await asyncpg.connect(_dsn(url))
    watch = await asyncpg.connect(_dsn(url))  # not the gate's: a transaction sees pg_stat_activity as it first was
    try:
        transaction = gate.transaction()
        await transaction.start()
        await gate.execute("DROP SCHEMA public CASCADE")
        starting = asyncio.ensure_future(asyncio.to_thread(_start_together, bundle, folder, url, count))
        deadline = time.monotonic() + 180
        while await _waiting_on_locks(watch) < count and not starting.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        lined_up = await _waiting_on_locks(watch)
        await transaction.rollback()
        servers = await starting
    finally:
        await gate.close()
        await watch.close()
    if lined_up < count:
        for server in servers:
            stop_server(server, grace_s=30)
        pytest.fail(f"only {lined_up} of {count} replicas reached the migration together")
    return servers


def test_replicas_started_together_migrate_an_empty_database_once(postgres: PostgresServer, tmp_path: Path) -> None:
    url = asyncio.run(_fresh(postgres, "migrate_once"))
    bundle = build_tiny_bundle(tmp_path / "bundle")
    servers = asyncio.run(_started_at_the_gate(bundle, tmp_path / "logs", url, 3))
    try:
        started = [server.ps.create_time() for server in servers]
        logs = {server.name: server.log_text() for server in servers}
    finally:
        for server in servers:
            stop_server(server, grace_s=30)
    assert max(started) - min(started) < 1.0, "the replicas were not started together"
    for name, text in logs.items():
        bad = [line for line in text.splitlines() if any(sign in line for sign in BAD_SIGNS)]
        assert not bad, f"{name} logged:\n" + "\n".join(bad[:10])
        assert "results store ready" in text, f"{name} never had its store ready:\n{text[-2000:]}"
    assert asyncio.run(_versions(url)) == [_head()]


@pytest.mark.anyio
async def test_a_store_waits_for_the_database_migration_lock(postgres: PostgresServer) -> None:
    from service.store import MIGRATION_LOCK_KEY, ResultsStore  # new in the fix: on older code, this test fails

    url = await _fresh(postgres, "lock_wait")
    holder = await asyncpg.connect(_dsn(url))  # another replica, mid-migration
    store = ResultsStore(url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        migrating = asyncio.ensure_future(store.ensure_ready())
        await asyncio.sleep(1.5)
        assert not migrating.done(), "the store migrated while another held the migration lock"
        assert await _versions(url) is None  # nothing created behind the holder's back
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await asyncio.wait_for(migrating, timeout=30)
        assert await _versions(url) == [_head()]
    finally:
        await holder.close()
        await store.close()
