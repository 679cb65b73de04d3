"""The results store: past analyses in SQLite (embedded, the default) or PostgreSQL (several replicas).

SQLAlchemy's async engine over aiosqlite or asyncpg; the schema is owned by Alembic migrations
(`service/migrations`), applied at start-up and whenever the store comes back, so an upgrade never loses
stored results. Stored per analysis: the answer JSON (without the overlay PNG, which is derived and large),
image name, image sha256, model name/version, timestamps; never the image bytes unless `store_images` is
set, and never DICOM patient data (the answer holds none).

An unreachable database never takes predictions down: every call raises `StoreUnavailableError` (503 with
the reason) and the next call tries again, so the store recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, String, event, func, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 5.0
# What a database that is down, unreachable or refusing us raises, through the drivers and SQLAlchemy.
_UNAVAILABLE = (OperationalError, InterfaceError, DBAPIError, OSError, ConnectionError, asyncio.TimeoutError)


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
    """The database cannot be reached or used right now; the message says why."""


@dataclass(frozen=True)
class NewAnalysis:
    image_name: str
    image_sha256: str
    result: dict[str, Any]  # the ImagePrediction JSON, overlay PNG removed
    image_bytes: bytes | None = None
    image_media_type: str | None = None


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _connect_args(url: str) -> dict[str, Any]:
    if _is_sqlite(url):
        return {"timeout": 30}  # seconds a writer waits for the lock: concurrent posts queue, none is lost
    if "asyncpg" in url:
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


class ResultsStore:
    """Async access to the analyses table, creating and migrating it as needed."""

    def __init__(self, url: str) -> None:
        self.url = url
        if _is_sqlite(url):
            database = url.split("///", 1)[-1]
            if database and database != ":memory:":
                # a folder that cannot be made surfaces as 'unreachable' on first use, not as a crash here
                with contextlib.suppress(OSError):
                    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(
            url, connect_args=_connect_args(url), pool_pre_ping=not _is_sqlite(url)
        )
        if _is_sqlite(url):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._migrated = False
        self._migrate_lock = asyncio.Lock()

    async def ensure_ready(self) -> None:
        """Apply the migrations once (again after an outage); raises StoreUnavailableError."""
        if self._migrated:
            return
        async with self._migrate_lock:
            if self._migrated:
                return
            try:
                async with asyncio.timeout(30), _process_migration_lock(), self.engine.begin() as connection:
                    await connection.run_sync(_upgrade_to_head)
            except _UNAVAILABLE as error:
                raise StoreUnavailableError(_reason(error)) from error
            except Exception as error:  # a failed migration must not take predictions down with it
                log.exception("results store migration failed")
                raise StoreUnavailableError(
                    f"results store migration failed ({type(error).__name__}: {error})"
                ) from error
            self._migrated = True
            log.info("results store ready at %s", _redacted(self.url))

    async def add(self, analysis: NewAnalysis) -> Analysis:
        await self.ensure_ready()
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
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
        except _UNAVAILABLE as error:
            self._forget_schema(error)
            raise StoreUnavailableError(_reason(error)) from error
        return row

    async def get(self, analysis_id: int) -> Analysis | None:
        await self.ensure_ready()
        try:
            async with self._sessions() as session:
                return await session.get(Analysis, analysis_id)
        except _UNAVAILABLE as error:
            self._forget_schema(error)
            raise StoreUnavailableError(_reason(error)) from error

    async def list(self, *, image_name: str | None, limit: int, offset: int) -> tuple[list[Analysis], int]:
        """Newest first (ties broken by id), optionally for one image name; plus the total count."""
        await self.ensure_ready()
        query = select(Analysis)
        count = select(func.count()).select_from(Analysis)
        if image_name is not None:
            query = query.where(Analysis.image_name == image_name)
            count = count.where(Analysis.image_name == image_name)
        query = query.order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(limit).offset(offset)
        try:
            async with self._sessions() as session:
                rows = list((await session.scalars(query)).all())
                total = int((await session.scalar(count)) or 0)
        except _UNAVAILABLE as error:
            self._forget_schema(error)
            raise StoreUnavailableError(_reason(error)) from error
        return rows, total

    def _forget_schema(self, error: BaseException) -> None:
        """After an outage the database may be a fresh one: check the migrations again next time."""
        if isinstance(error, SQLAlchemyError | OSError | ConnectionError):
            self._migrated = False

    async def close(self) -> None:
        await self.engine.dispose()


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


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _reason(error: BaseException) -> str:
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"results store unreachable ({type(error).__name__}: {detail[0] if detail else 'no detail'})"
