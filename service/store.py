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

What clients see is generic (`StoreUnavailableError`'s message: no host, port, user or database name);
the driver's error and the URL, password hidden, go to the log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, String, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 5.0
MIGRATION_TIMEOUT_S = 30.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
# The largest id and offset the store is asked for: `analyses.id` is a 32-bit integer in PostgreSQL.
MAX_ROW_NUMBER = 2**31 - 1
EXPECTED_URL = "sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
# What a database that is down, unreachable or refusing us raises, through the drivers and SQLAlchemy.
# Anything else failing in a store call is unexpected: logged with its traceback, and answered the same way.
_UNAVAILABLE = (OperationalError, InterfaceError, DBAPIError, OSError, ConnectionError, asyncio.TimeoutError)
T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Analysis(Base):
    """One stored analysis of one image."""

    __tablename__ = "analyses"

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
        return {"timeout": 30}  # seconds a writer waits for the lock: concurrent posts queue, none is lost
    if url.get_driver_name() == "asyncpg":
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


def _engine(url_text: str) -> AsyncEngine:
    """The async engine for `url_text`; raises (ValueError, SQLAlchemy's errors, ImportError) when it cannot be."""
    url = make_url(url_text)  # ArgumentError for what is no URL, ValueError for a port that is no number
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"port must be 1..65535, got {url.port}")
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and url.database and url.database != ":memory:":
        # a folder that cannot be made surfaces as 'unavailable' on first use, not as a crash here
        with contextlib.suppress(OSError):
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args=_connect_args(url), pool_pre_ping=not sqlite)
    if sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
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
        self._probing = True
        try:
            await self._migrate(self.engine)
        except Exception as error:
            self._failed(error, "applying the migrations")
            raise self._refusal(self.clock()) from error
        finally:
            self._probing = False
        self._migrated = True
        self._succeeded()
        log.info("results store ready at %s", self.redacted_url)

    def retry_in_s(self) -> float:
        """Seconds left in the current back-off window (0 when the store may be tried now)."""
        return max(0.0, self._retry_at - self.clock())

    async def _migrate(self, engine: AsyncEngine) -> None:
        # connected first, then the process-wide lock: a database that hangs holds up no other store's migration
        async with (
            asyncio.timeout(MIGRATION_TIMEOUT_S),
            engine.begin() as connection,
            _process_migration_lock(),
        ):
            await connection.run_sync(_upgrade_to_head)

    def _refusal(self, now: float) -> StoreUnavailableError:
        seconds = max(1, math.ceil(self._retry_at - now))
        return StoreUnavailableError(_retry_message(seconds), seconds)

    def _failed(self, error: BaseException, doing: str) -> None:
        """Start (or lengthen) the back-off; log the details, once per window, never to clients."""
        self._migrated = False  # the database may come back a fresh one: check the migrations on the probe
        now = self.clock()
        if now < self._retry_at:  # calls already in flight when the window opened: counted once
            log.debug("results store still unavailable (%s)", type(error).__name__)
            return
        self._failures += 1
        delay_s = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self._failures - 1))
        self._retry_at = now + delay_s
        detail = _first_line(getattr(error, "orig", None) or error)
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
        assert self._sessions is not None  # ensure_ready refuses a store without an engine
        try:
            async with self._sessions() as session:
                result = await operation(session)
        except Exception as error:
            self._failed(error, doing)
            raise self._refusal(self.clock()) from error
        self._succeeded()
        return result

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

        return await self.call("storing an analysis", insert)

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

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()


def _retry_message(seconds: int) -> str:
    return f"results store unavailable; predictions still work; retry in {seconds} s"


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no detail"


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets readers work while one writer writes; busy_timeout makes writers wait instead of failing."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


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
