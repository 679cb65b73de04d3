"""The results store: past analyses in SQLite (embedded, the default) or PostgreSQL (several replicas).

SQLAlchemy's async engine over aiosqlite or asyncpg; the schema is owned by Alembic migrations
(`service/migrations`), applied at start-up and whenever the store comes back, so an upgrade never loses
stored results. Stored per analysis: the answer JSON (without the overlay PNG, which is derived and large),
image name, image sha256, model name/version, timestamps; never the image bytes unless `store_images` is
set (and DICOM then de-identified, `inference.deidentify`, unless `store_identifiable_images` is set too).

The store never takes predictions down:
- a database URL that cannot be used (malformed, unknown driver, bad port) makes the store *misconfigured*
  at construction, which never raises: every call then raises `StoreUnavailableError`, the log says why;
- after a failure (database down, unreachable, refusing us) the store backs off: calls within the window
  (1 s, doubling to 30 s, reset by a success) raise `StoreUnavailableError` at once without touching the
  database, and the first call after the window is the one probe (it re-applies the migrations, for a
  database that came back empty); calls arriving while it runs do not queue behind it, they are refused too.
  So an outage costs each request microseconds, not a connect timeout, and the store recovers by itself.

Migrations run once however many replicas start at once: on PostgreSQL the upgrade holds a transaction-level
advisory lock (`MIGRATION_LOCK_KEY`) taken on the migration's own connection, so a replica that starts while
another migrates waits, then finds the schema at head and does nothing (without it, replicas started together
on an empty database raced to create the same tables: `duplicate key value violates unique constraint
"pg_type_typname_nsp_index"`). SQLite needs none: its file is one process's alone.

What clients see is generic (`StoreUnavailableError`'s message: no host, port, user or database name);
the driver's error and the URL, password hidden, go to the log only.

SQLite is held by this process alone, so that no fault of its files can take the process down or lose data
silently (the file's part, its pragmas, identity and one-store registry, is `service.store_file`'s):
- `locking_mode=EXCLUSIVE` before WAL: SQLite keeps the WAL index in heap memory and never creates or maps a
  `-shm` file (a truncated or immutable `-shm` made the service die of SIGBUS); mmap stays off. The price: no
  other process can open the file while the service runs (a second store of this process on it is refused at
  once), and the store has ONE connection, which calls queue for (up to `POOL_TIMEOUT_S`) instead of
  deadlocking on the lock;
- the device and inode of the file (and its `-wal`) are recorded when the store becomes ready and compared
  before each call (a stat, holding the connection): a file deleted or replaced under the service makes the
  store unavailable (503; the log says what happened, once) until a database file is at the path again,
  which the store then adopts (migrating it, and moving its id counters past every id handed out before).
  Once ready, the store opens only an existing file (`mode=rw`): it never makes a new, empty database while
  running;
- ids are never reused: AUTOINCREMENT (migration 0003), so a deleted newest row does not give its id away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, String, event, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from inference.backoff import retry_delay_s
from service.store_file import (
    SQLITE_BUSY_TIMEOUT_S,
    DatabaseFile,
    hold,
    raise_id_counters,
    release,
    sqlite_pragmas,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 5.0
MIGRATION_TIMEOUT_S = 30.0  # connecting, waiting for another replica's migration, and migrating
# The PostgreSQL advisory lock around the Alembic upgrade: one number for every replica of every version of the
# service ('bfd-migr' in ASCII), so it must never change; transaction-level, so a replica that dies mid-migration
# gives it back with its connection.
MIGRATION_LOCK_KEY = 0x6266642D6D696772
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
POOL_TIMEOUT_S = 30.0  # a SQLite call waits this long for the store's one connection: concurrent posts queue
# The largest id and offset the store is asked for: `analyses.id` is a 32-bit integer in PostgreSQL.
MAX_ROW_NUMBER = 2**31 - 1
EXPECTED_URL = "sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
# What a database that is down, unreachable or refusing us raises, through the drivers and SQLAlchemy.
# Anything else failing in a store call is unexpected: logged with its traceback, and answered the same way.
_UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    DBAPIError,
    PoolTimeoutError,
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
)
# The tables whose ids clients or the DICOM node keep: their counters move past every id handed out.
_ID_TABLES = ("analyses", "outbox")
T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Analysis(Base):
    """One stored analysis of one image."""

    __tablename__ = "analyses"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused on SQLite (migration 0003)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    image_name: Mapped[str] = mapped_column(String(512), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(200))
    trained: Mapped[bool] = mapped_column(Boolean)
    body_part: Mapped[str] = mapped_column(String(64))
    fracture_label: Mapped[str] = mapped_column(String(16))
    p_fractured: Mapped[float] = mapped_column(Float)
    abstained: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    image_media_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    image_bytes: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class StoreUnavailableError(RuntimeError):
    """The store cannot be used right now. The message is safe to show clients (no host, user or database).

    `retry_after_s`: whole seconds until the store tries the database again; None when retrying cannot help
    (the database URL is misconfigured: the service log says how).
    """

    def __init__(self, message: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class NewAnalysis:
    image_name: str
    image_sha256: str
    result: dict[str, Any]  # the ImagePrediction JSON, overlay PNG removed
    image_bytes: bytes | None = None
    image_media_type: str | None = None


def _connect_args(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if url.get_driver_name() == "asyncpg":
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def sqlite_path(url: URL) -> Path | None:
    """The file a SQLite URL opens, absolute as SQLAlchemy makes it; None for other databases, in-memory ones
    and SQLite URI filenames (`?uri=true`: what they open is SQLite's to decide)."""
    if url.get_backend_name() != "sqlite" or _in_memory(url) or url.query.get("uri"):
        return None
    return Path(os.path.abspath(str(url.database)))


def _engine(url_text: str) -> AsyncEngine:
    """The async engine for `url_text`; raises (ValueError, SQLAlchemy's errors, ImportError) when it cannot be."""
    url = make_url(url_text)  # ArgumentError for what is no URL, ValueError for a port that is no number
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"port must be 1..65535, got {url.port}")
    sqlite = url.get_backend_name() == "sqlite"
    pool: dict[str, Any] = {}
    if sqlite and not _in_memory(url):
        # ONE connection: it holds the file's lock (locking_mode=EXCLUSIVE); a second would wait out the busy
        # timeout and fail, so calls wait for this one in the pool's queue instead
        pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT_S}
    if (path := sqlite_path(url)) is not None:
        # a folder that cannot be made surfaces as 'unavailable' on first use, not as a crash here
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args=_connect_args(url), pool_pre_ping=not sqlite, **pool)
    if sqlite:
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    return engine


class ResultsStore:
    """Async access to the analyses table, creating and migrating it as needed; never raises but
    `StoreUnavailableError` (see the module docstring for the back-off)."""

    def __init__(
        self,
        url: str,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self.redacted_url = redacted_url(url)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock  # seconds, monotonic; replaceable so tests step through the back-off
        self.engine: AsyncEngine | None = None
        self.misconfigured: str | None = None  # for the log only: why the URL cannot be used
        try:
            self.engine = _engine(url)
        except Exception as error:  # whatever the URL makes SQLAlchemy or a driver raise, start without a store
            self.misconfigured = (
                f"BFD_DATABASE_URL cannot be used ({type(error).__name__}: {self.scrub(str(error))}); "
                f"expected {EXPECTED_URL}, got {self.redacted_url}"
            )
            log.error(
                "results store disabled: %s. Predictions still work; /api/analysis answers 503.", self.misconfigured
            )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False) if self.engine else None
        self._migrated = False
        self._probing = False
        self._failures = 0
        self._retry_at = -math.inf
        self._file: DatabaseFile | None = None  # a SQLite store's file, checked before each call
        self._lost: str | None = None  # what happened to that file, while the store waits for one at its path
        self._highest_ids: dict[str, int] = {}  # per table: the highest id handed out, for an adopted file
        if self.engine is not None and (path := sqlite_path(self.engine.url)) is not None:
            self._file = DatabaseFile(path)
            event.listen(self.engine.sync_engine, "do_connect", self._file.open_existing_only)

    # --- the gate: misconfigured, backing off, probing, or ready -----------------------------------------------

    async def ensure_ready(self) -> None:
        """Pass when the store may be used now; else raise StoreUnavailableError (at once while backing off).

        The one call that finds the schema unchecked (at start-up, after an outage) applies the migrations.
        """
        if self.engine is None:
            raise StoreUnavailableError(
                "results store unavailable: its database URL is misconfigured (see the service log); "
                "predictions still work",
                None,
            )
        now = self.clock()
        if now < self._retry_at:
            raise self._refusal(now)
        if self._migrated:
            return
        if self._probing:  # one probe at a time; the others are refused rather than queued behind it
            raise StoreUnavailableError(_retry_message(1), 1)
        if self._file is not None:
            if (holder := hold(self._file.path, self)) is not None:
                self._failed(OSError(holder), "opening its database file")
                raise self._refusal(self.clock())
            try:
                self._file.set_aside_wal()
                waiting = self._lost is not None and (self._file.missing() or self._file.orphaned_wal())
            except OSError as error:  # a path that cannot even be looked at (permissions): the log says so
                self._failed(error, "looking at its database file")
                raise self._refusal(self.clock()) from error
            if waiting:
                # nothing to adopt yet; the log said what happened when it happened (and a connection now
                # would fail anyway: the store opens only an existing file once it has been ready)
                self._failed(FileNotFoundError(f"no database file at {self._file.path}"), "waiting", quiet=True)
                raise self._refusal(self.clock())
        self._probing = True
        try:
            await self._migrate(self.engine)
        except Exception as error:
            self._failed(error, "applying the migrations")
            raise self._refusal(self.clock()) from error
        finally:
            self._probing = False
        self._migrated = True
        if self._file is not None:
            self._file.remember()
        self._succeeded()
        if self._lost is not None:
            log.warning(
                "results store adopted the database file now at %s (%s before); ids continue past %s",
                self.redacted_url,
                self._lost,
                self._highest_ids or "those in the file",
            )
            self._lost = None
        log.info("results store ready at %s", self.redacted_url)

    def retry_in_s(self) -> float:
        """Seconds left in the current back-off window (0 when the store may be tried now)."""
        return max(0.0, self._retry_at - self.clock())

    async def _migrate(self, engine: AsyncEngine) -> None:
        # connected first, then the process-wide lock: a database that hangs holds up no other store's migration;
        # then the database's lock, in the transaction the upgrade runs in, so other replicas wait for its commit
        async with (
            asyncio.timeout(MIGRATION_TIMEOUT_S),
            engine.begin() as connection,
            _process_migration_lock(),
        ):
            await _database_migration_lock(connection)
            await connection.run_sync(_upgrade_to_head)
            if self._file is not None and self._highest_ids:
                await connection.run_sync(raise_id_counters, dict(self._highest_ids))

    def _refusal(self, now: float) -> StoreUnavailableError:
        seconds = max(1, math.ceil(self._retry_at - now))
        return StoreUnavailableError(_retry_message(seconds), seconds)

    def _failed(self, error: BaseException, doing: str, *, quiet: bool = False) -> None:
        """Start (or lengthen) the back-off; log the details, once per window (not at all when `quiet`: the
        caller has logged what happened), never to clients."""
        self._migrated = False  # the database may come back a fresh one: check the migrations on the probe
        now = self.clock()
        if now < self._retry_at:  # calls already in flight when the window opened: counted once
            log.debug("results store still unavailable (%s)", type(error).__name__)
            return
        self._failures += 1
        delay_s = retry_delay_s(self._failures, self.backoff_initial_s, self.backoff_max_s)
        self._retry_at = now + delay_s
        detail = _first_line(getattr(error, "orig", None) or error)
        if quiet:
            log.debug("results store unavailable while %s (%s); next try in %g s", doing, detail, delay_s)
            return
        if self._file is not None and ("locked" in detail or isinstance(error, TimeoutError)):
            detail += " (has another process the SQLite file open? The service needs it alone; PostgreSQL to share)"
        if not isinstance(error, _UNAVAILABLE):
            log.error("results store failed unexpectedly while %s", doing, exc_info=error)
        log.warning(
            "results store unavailable at %s while %s (%s: %s); refusing storage calls for %g s "
            "(failure %d in a row); predictions still work",
            self.redacted_url,
            doing,
            type(error).__name__,
            self.scrub(detail),
            delay_s,
            self._failures,
        )

    def _succeeded(self) -> None:
        if self._failures:
            log.info("results store back at %s after %d failed attempts", self.redacted_url, self._failures)
        self._failures = 0
        self._retry_at = -math.inf

    async def call(self, doing: str, operation: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `operation` in a session behind the gate; failures start the back-off (StoreUnavailableError)."""
        await self.ensure_ready()
        assert self.engine is not None  # ensure_ready refuses a store without an engine
        assert self._sessions is not None
        try:
            async with self.engine.connect() as connection:
                if self._file is not None:
                    await self._check_file(connection)
                async with self._sessions(bind=connection) as session:
                    result = await operation(session)
        except StoreUnavailableError:
            raise
        except Exception as error:
            self._failed(error, doing)
            raise self._refusal(self.clock()) from error
        self._succeeded()
        return result

    async def _check_file(self, connection: AsyncConnection) -> None:
        """Refuse unless the file is still the one the store made ready. Checked holding the store's one
        connection: no call is using the file meanwhile, and none that queued for it uses a replaced one."""
        assert self._file is not None
        if not self._migrated:  # a call before this one found the file changed (or failed) while this one queued
            raise self._refusal(self.clock())
        change = self._file.change()
        if change is None:
            return
        self._migrated = False
        with contextlib.suppress(Exception):  # best effort: a damaged file may not say
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                found = await connection.exec_driver_sql("SELECT name, seq FROM sqlite_sequence")
                rows: list[Any] = list(found.all())
                for table, seq in rows:
                    self._note_id(str(table), int(seq))
        # Closed now. A file still at its path gets what the WAL holds (so a -wal deleted alone loses nothing);
        # a file deleted or moved does not (SQLite checks), and then its -wal, if still at the path, is moved
        # aside: it belongs to the file that was there, and SQLite would replay it into whatever comes next.
        with contextlib.suppress(Exception):
            await connection.invalidate()
        kept = self._file.set_aside_wal()
        self._lost = change
        log.error(
            "results store: %s while the service ran (%s)%s; storage calls answer 503 "
            "until a database file is at that path again, which the store then adopts (it never creates an "
            "empty one while running). Restore a backup there, or restart the service to start a new, empty "
            "store. Predictions still work",
            change,
            self._file.path,
            f"; the write-ahead log of the file that was there is kept as {kept}" if kept else "",
        )
        self._failed(FileNotFoundError(change), "checking its database file", quiet=True)
        raise self._refusal(self.clock())

    def _note_id(self, table: str, seq: int) -> None:
        if table in _ID_TABLES:
            self._highest_ids[table] = max(seq, self._highest_ids.get(table, 0))

    def scrub(self, text: str) -> str:
        """`text` with this store's URL and password replaced by their redacted forms (for logs)."""
        text = text.replace(self._url, self.redacted_url) if self._url else text
        password = _password(self._url)
        return text.replace(password, "***") if password else text

    # --- the operations --------------------------------------------------------------------------------------------

    async def add(self, analysis: NewAnalysis) -> Analysis:
        result = analysis.result
        row = Analysis(
            created_at=datetime.now(UTC),
            image_name=analysis.image_name[:512],
            image_sha256=analysis.image_sha256,
            model_name=result["model"]["name"],
            model_version=result["model"]["version"],
            trained=bool(result["model"]["trained"]),
            body_part=result["body_part"]["label"],
            fracture_label=result["fracture"]["label"],
            p_fractured=float(result["fracture"]["probability"]),
            abstained=bool(result.get("abstained", False)),
            result=result,
            image_bytes=analysis.image_bytes,
            image_media_type=analysis.image_media_type,
        )

        async def insert(session: AsyncSession) -> Analysis:
            async with session.begin():
                session.add(row)
            return row

        stored = await self.call("storing an analysis", insert)
        self._note_id("analyses", stored.id)
        return stored

    async def get(self, analysis_id: int) -> Analysis | None:
        """The analysis with this id, or None (also for ids no row can have: below 1, above MAX_ROW_NUMBER)."""
        if not 1 <= analysis_id <= MAX_ROW_NUMBER:
            return None

        async def one(session: AsyncSession) -> Analysis | None:
            return await session.get(Analysis, analysis_id)

        return await self.call("reading an analysis", one)

    async def list(self, *, image_name: str | None, limit: int, offset: int) -> tuple[list[Analysis], int]:
        """Newest first (ties broken by id), optionally for one image name; plus the total count."""
        if not (0 <= offset <= MAX_ROW_NUMBER and 1 <= limit <= MAX_ROW_NUMBER):
            raise ValueError(f"limit must be 1..{MAX_ROW_NUMBER} and offset 0..{MAX_ROW_NUMBER}, got {limit}, {offset}")
        query = select(Analysis)
        count = select(func.count()).select_from(Analysis)
        if image_name is not None:
            query = query.where(Analysis.image_name == image_name)
            count = count.where(Analysis.image_name == image_name)
        query = query.order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(limit).offset(offset)

        async def page(session: AsyncSession) -> tuple[list[Analysis], int]:
            rows = list((await session.scalars(query)).all())
            total = int((await session.scalar(count)) or 0)
            return rows, total

        return await self.call("listing analyses", page)

    @property
    def sqlite(self) -> bool:
        """Whether the store is SQLite (one file, WAL): what was deleted can linger on disk until checkpointed."""
        return self.engine is not None and self.engine.url.get_backend_name() == "sqlite"

    async def checkpoint(self, session: AsyncSession) -> None:
        """SQLite: copy the write-ahead log into the database file and truncate it to nothing (`PRAGMA
        wal_checkpoint(TRUNCATE)`), so rows just rewritten (a delivered result's payload, with its patient data,
        dropped) leave no older copy in the `-wal`; PostgreSQL: nothing. Call it inside a store call, after the
        change was committed (a checkpoint waits for no transaction of its own connection). The WAL would be
        checkpointed only after 1000 pages otherwise, and never truncated: the payloads stayed in it."""
        if not self.sqlite:
            return
        busy, _, _ = (await session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))).one()
        if busy:  # one connection, locking_mode=EXCLUSIVE: nothing else should hold the WAL
            log.warning("results store: the write-ahead log could not be checkpointed now; it is at the next one")

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
        if self._file is not None:  # deleted or replaced since the last call: leave no -wal for the next start
            with contextlib.suppress(OSError):
                self._file.set_aside_wal()
            release(self._file.path, self)


def _retry_message(seconds: int) -> str:
    return f"results store unavailable; predictions still work; retry in {seconds} s"


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no detail"


# Alembic keeps its migration context in module globals, so two stores migrating at once in one process (two
# apps in one test run, the desktop's in-process client next to a server) would trip over each other.
_MIGRATING = threading.Lock()


@contextlib.asynccontextmanager
async def _process_migration_lock() -> AsyncIterator[None]:
    """Hold the process-wide migration lock without blocking the event loop (it may be held on this loop)."""
    while not _MIGRATING.acquire(blocking=False):
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        _MIGRATING.release()


async def _database_migration_lock(connection: AsyncConnection) -> None:
    """On PostgreSQL, wait for the database-wide migration lock (`pg_advisory_xact_lock`): held until the
    connection's transaction ends, so the next replica migrates only after this one's schema is committed.
    Other databases: nothing (SQLite is held by one process)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def _upgrade_to_head(connection: Any) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def redacted_url(url: str) -> str:
    """The URL for logs: its password hidden; for a URL that does not parse, everything before its last '@'."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # what does not parse may still hold a password: hide whatever could be one
        scheme, separator, rest = url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        elif not separator and "@" in url:
            return "<unparseable URL, not shown: it may hold a password>"
        return f"{scheme}{separator}{rest}"


def _password(url: str) -> str | None:
    try:
        password = make_url(url).password
    except Exception:
        match = re.search(r"://[^:/@]*:([^@]*)@", url)
        password = match.group(1) if match else None
    return str(password) if password else None
