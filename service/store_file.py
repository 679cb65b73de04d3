"""A SQLite results store's file: held by one store of this process, and noticed when deleted or replaced.

Owns what `service.store` needs to trust the file it writes to, so the store itself stays about the gate and
the queries:
- `sqlite_pragmas`: `locking_mode=EXCLUSIVE` before WAL on every connection (no `-shm` to map, so no SIGBUS
  from a damaged one); the lock is the connection's, which is why a store has one connection and why
- `hold` / `release`: a process-wide registry of the files held by a store, so that a second store of this
  process on the same file is refused at once, saying why, instead of waiting out the busy timeout;
- `DatabaseFile`: the device and inode of the file and its `-wal` when the store became ready, compared before
  each call (a stat); a `-wal` that belongs to no file at the path (orphaned) is moved aside, never replayed
  into the next database opened there; once ready, connections open only an existing file (`mode=rw`);
- `raise_id_counters`: an adopted file's AUTOINCREMENT counters moved past every id handed out before.

Imports the standard library and SQLAlchemy's `text` only; never the store (it hands itself in as an owner).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import text

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30  # a writer waits this long for SQLite's lock (another process holding the file)

Identity = tuple[int, int]  # (st_dev, st_ino)


def sqlite_pragmas(connection: Any, _record: Any) -> None:
    """EXCLUSIVE before WAL, on the connection's first access: SQLite then keeps the WAL index in heap memory
    and never maps a `-shm` file, whose truncation would kill the process with SIGBUS (mmap off for the same
    reason); WAL for crash safety; busy_timeout makes a second process wait before it is refused.
    A PoolEvents.connect listener."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA locking_mode=EXCLUSIVE")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA mmap_size=0")
    cursor.close()


def identity(path: Path) -> Identity | None:
    """The (device, inode) of the file at `path`; None when there is none."""
    try:
        found = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # no file there
        return None
    return found.st_dev, found.st_ino


class DatabaseFile:
    """A SQLite store's file and its write-ahead log, for noticing them deleted or replaced (a stat each)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self.seen: tuple[Identity | None, Identity | None] | None = None  # when the store last became ready

    def remember(self) -> None:
        self.seen = (identity(self.path), identity(self.wal))

    def missing(self) -> bool:
        return identity(self.path) is None

    def change(self) -> str | None:
        """What happened to the files since `remember` ('its database file was deleted', ...), or None."""
        if self.seen is None:
            return None
        main, wal = self.seen
        now = identity(self.path)
        if now != main:
            return f"its database file was {'deleted' if now is None else 'replaced'}"
        if wal is not None and identity(self.wal) != wal:
            return "its write-ahead log (-wal) was deleted or replaced"
        return None

    def orphaned_wal(self) -> bool:
        """Whether the -wal at the path belongs to no file there: none is, or it is the one seen with a file
        that has gone. SQLite would replay it into whatever database is opened at the path next."""
        wal = identity(self.wal)
        if wal is None:
            return False
        main = identity(self.path)
        if main is None:
            return True
        return self.seen is not None and main != self.seen[0] and wal == self.seen[1]

    def set_aside_wal(self) -> Path | None:
        """Move an orphaned -wal (`orphaned_wal`) away from the path, keeping it for whoever wants to look;
        its new name, or None when there was none to move or it could not be moved (logged)."""
        if not self.orphaned_wal():
            return None
        aside = self.wal.with_name(f"{self.wal.name}.orphaned-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
        try:
            os.replace(self.wal, aside)
        except OSError as error:
            log.error("results store: could not move the orphaned %s aside (%s); remove it", self.wal, error)
            return None
        log.warning("results store: moved %s, which belongs to no database file there, aside to %s", self.wal, aside)
        return aside

    def open_existing_only(self, _dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        """Once the store has been ready, connect with `mode=rw`: SQLite then refuses a missing file instead of
        creating an empty one (ids from 1 again, under the same path). And never next to an orphaned -wal,
        which SQLite would replay into the file. A DialectEvents.do_connect listener."""
        if self.orphaned_wal():
            raise sqlite3.OperationalError(f"{self.wal} belongs to no database file there: move it aside first")
        if self.seen is not None:
            cargs[:] = [f"file:{quote(str(self.path))}?mode=rw"]
            cparams["uri"] = True


def raise_id_counters(connection: Any, highest: dict[str, int]) -> None:
    """Move AUTOINCREMENT counters up to `highest` (table -> id): an adopted file (a backup restored) must not
    hand out again an id this process handed out from the file it replaced. Run in a sync connection."""
    for table, seq in highest.items():
        params = {"name": table, "seq": seq}
        connection.execute(text("UPDATE sqlite_sequence SET seq = :seq WHERE name = :name AND seq < :seq"), params)
        connection.execute(
            text(
                "INSERT INTO sqlite_sequence (name, seq) SELECT :name, :seq "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = :name)"
            ),
            params,
        )


# The SQLite files held by a store of this process (the lock is the connection's, so a second store on one file
# would wait out the busy timeout and fail): a second store is refused at once, saying why. Weak values: a
# store dropped without `close` frees its file.
_HELD: weakref.WeakValueDictionary[Path, Any] = weakref.WeakValueDictionary()
_HOLDING = threading.Lock()


def hold(path: Path, owner: object) -> str | None:
    """Hold `path` for `owner` (a store); None when it may, else why not (another store of this process holds it)."""
    with _HOLDING:
        holder = _HELD.setdefault(path, owner)
    if holder is owner:
        return None
    return (
        f"another results store of this process holds {path} (a SQLite file is one store's alone: "
        "one app per file, or PostgreSQL)"
    )


def release(path: Path, owner: object) -> None:
    """Let `path` go, if `owner` holds it."""
    with _HOLDING:
        if _HELD.get(path) is owner:
            del _HELD[path]
