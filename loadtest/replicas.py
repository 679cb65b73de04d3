"""Replicas of `bfd serve` sharing one PostgreSQL: a fresh database, the replicas started at the same moment,
and what their shared outbox holds.

Replicas here are `bfd serve` processes on this machine, not containers: the same command the image runs, started
in seconds rather than built in minutes, so the failover run fits a CI job (README "Replicas and failover").
Used by `loadtest.failover` and by the tests of the migration lock and of failover.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from loadtest.servers import BFD, Server, start_server, stop_server

ASYNCPG_SCHEME = "postgresql+asyncpg://"


def plain_dsn(url: str) -> str:
    """A SQLAlchemy `postgresql+asyncpg://` URL as asyncpg takes it."""
    if not url.startswith(ASYNCPG_SCHEME):
        raise ValueError(f"expected a {ASYNCPG_SCHEME}USER@HOST:PORT/DATABASE URL, got {url.split('@')[-1]!r}")
    return "postgresql://" + url[len(ASYNCPG_SCHEME) :]


async def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `server_url` (any database of it); the new database's URL."""
    connection = await asyncpg.connect(plain_dsn(server_url))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def replica_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a replica: ours without an API key or another database, then `settings` (BFD_*)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BFD_API_KEY", "BFD_DATABASE_URL")}
    return {**env, "BFD_DATABASE_URL": database_url, **settings}


def start_replicas(
    bundle: Path, folder: Path, envs: Mapping[str, Mapping[str, str]], ready_timeout_s: float = 240.0
) -> list[Server]:
    """`bfd serve` on `bundle` once per entry of `envs` (name -> full environment), all started at the same
    moment (one thread each), each with its log in `folder`/name.log; returned once every one answers /readyz.
    When one fails to start, the others are stopped and the error raised."""
    command = [*BFD, "serve", "--bundle", str(bundle)]

    def start(name: str) -> Server:
        return start_server(name, command, "/readyz", folder, envs[name], ready_timeout_s, inherit_env=False)

    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        futures = [pool.submit(start, name) for name in envs]
    started, errors = [], []
    for future in futures:
        try:
            started.append(future.result())
        except Exception as error:  # every start is awaited, so none is left running behind the error
            errors.append(error)
    if errors:
        stop_all(started)
        raise errors[0]
    return started


def stop_all(servers: Sequence[Server], grace_s: float = 30.0) -> None:
    for server in servers:
        stop_server(server, grace_s=grace_s)


@dataclass(frozen=True)
class OutboxRow:
    sop_instance_uid: str
    claimed_until: datetime | None
    delivered_at: datetime | None
    attempts: int
    has_payload: bool


async def outbox_rows(database_url: str) -> list[OutboxRow]:
    """Every row of the replicas' shared outbox, oldest first ([] before the schema exists)."""
    connection = await asyncpg.connect(plain_dsn(database_url))
    try:
        if await connection.fetchval("SELECT to_regclass('outbox')") is None:
            return []
        rows = await connection.fetch(
            "SELECT sop_instance_uid, claimed_until, delivered_at, attempts, payload IS NOT NULL AS has_payload "
            "FROM outbox ORDER BY id"
        )
    finally:
        await connection.close()
    return [OutboxRow(**dict(row)) for row in rows]
