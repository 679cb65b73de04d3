"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, started on a free port, trust auth.

Run as the `postgres` system user when the tests run as root (PostgreSQL refuses to run as root). When no
server binaries are installed the caller skips loudly, or fails when BFD_REQUIRE_POSTGRES=1 (CI sets it).
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.servers import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def _binaries() -> Path:
    for candidate in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve().parent
    raise PostgresUnavailable("no initdb found (install Debian's 'postgresql' package)")


@dataclass
class PostgresServer:
    root: Path
    port: int
    bin_dir: Path
    as_user: Sequence[str]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {(result.stderr or result.stdout)[-1500:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-o", options, "-w", "-t", "60",
                  "-l", str(self.root / "server.log"), "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")


def start_postgres(root: Path) -> PostgresServer:
    """initdb + start; raises PostgresUnavailable with the reason."""
    bin_dir = _binaries()
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root and no runuser to drop to the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        root.mkdir(parents=True, exist_ok=True)
        shutil.chown(root, user="postgres")
        os.chmod(root, 0o700)
    server = PostgresServer(root=root, port=free_port(), bin_dir=bin_dir, as_user=as_user)
    server._run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    server.start()
    return server


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A server for the module; skipped loudly where none can start (a failure with BFD_REQUIRE_POSTGRES=1)."""
    root = Path(tempfile.mkdtemp(prefix="bfd-pg-"))
    try:
        server = start_postgres(root)
    except PostgresUnavailable as error:
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("BFD_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (BFD_REQUIRE_POSTGRES=1) but cannot start: {error}")
        pytest.skip(f"!!! PostgreSQL tests SKIPPED: cannot start a server: {error} !!!")
    yield server
    try:
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, then a new database on the module's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/results.sqlite3"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"t{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    asyncio.run(_create_database(server, name))
    yield server.url.rsplit("/", 1)[0] + f"/{name}"


async def _create_database(server: PostgresServer, name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres", database="postgres")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
