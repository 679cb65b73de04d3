"""Received instances kept on disk until their study's results are in the outbox, so a crash loses nothing.

The node tells the sender 'stored' as soon as it takes an instance, and the sender forgets it. Until the study
is answered and its results are in the outbox (which is persistent), the instance would exist only in the
node's memory: a crash, an out-of-memory kill or a power cut would lose it without a trace. With a spool
folder set (`BFD_DICOM_SPOOL_DIR`), each instance is written there and synced before the sender hears
'stored', and removed once its study's results are in the outbox (or its study was answered with nothing to
send). At start-up the node takes back whatever is left, as if it had just arrived.

The spool holds the sources with their patient data, as the outbox holds the results: it is off unless set,
and empty once every study received has been answered. Files are named by a random key, never by a UID or
anything else the sender chose; a JSON sidecar says where the instance came from.

What is taken back is sized before it is read: a data file over `max_instance_bytes` (no instance that large
was ever taken; something else put it there, or the limit was lowered) and facts over MAX_FACTS_BYTES are
left in place and logged for an operator, never read whole into memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.studies import Door, ReceivedInstance

log = logging.getLogger(__name__)

DATA_SUFFIX = ".dcm"
FACTS_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600  # readable by the service's user alone: the files carry patient data
MAX_FACTS_BYTES = 64 * 1024  # a sidecar is a few hundred bytes


@dataclass(frozen=True)
class SpooledInstance:
    """One instance left in the spool: where it came from and where its bytes are (not read yet)."""

    key: str
    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    door: Door
    calling_ae: str | None
    peer: str | None
    received_at: float
    path: Path
    size: int  # bytes of the data file, as found
    max_bytes: int | None = None  # the most `load` reads (the node's max instance bytes); None: no limit

    def load(self) -> ReceivedInstance:
        """The instance as the node received it, bytes read back from disk. OSError when the file is now larger
        than `max_bytes` (it grew since it was found): nothing past the limit is read."""
        return ReceivedInstance(
            self.study_uid,
            self.sop_class_uid,
            self.sop_instance_uid,
            _read_at_most(self.path, self.max_bytes),
            self.door,
            self.calling_ae,
            self.peer,
            spool_key=self.key,
        )


class Spool:
    """A folder of received instances, each a Part 10 file and its facts (written and synced, then renamed)."""

    def __init__(self, folder: Path, *, max_instance_bytes: int | None = None) -> None:
        self.folder = folder
        self.max_instance_bytes = max_instance_bytes  # larger data files are left in place, never read
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # patient data: the service's user only
        self._sizes: dict[str, int] = {}  # bytes on disk by key, for the node's disk budget
        self._lock = threading.Lock()  # keep and forget run in worker threads

    @property
    def bytes_kept(self) -> int:
        """Bytes of instances in the spool (what `left` found, plus what was kept since, less what was forgotten)."""
        with self._lock:
            return sum(self._sizes.values())

    def keep(self, instance: ReceivedInstance) -> None:
        """Write `instance` (its bytes, then its facts) so that it survives a crash; sets its `spool_key`.
        Raises OSError when it cannot (disk full, read-only): the node then refuses the instance."""
        key = uuid.uuid4().hex
        facts = {
            "study_uid": instance.study_uid,
            "sop_class_uid": instance.sop_class_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "door": instance.door,
            "calling_ae": instance.calling_ae,
            "peer": instance.peer,
            "received_at": time.time(),
        }
        try:
            self._write(key + DATA_SUFFIX, instance.data)
            self._write(key + FACTS_SUFFIX, json.dumps(facts).encode("utf-8"))  # last: the instance now counts
            _sync_folder(self.folder)
        except OSError:
            self._remove(key)
            raise
        instance.spool_key = key
        with self._lock:
            self._sizes[key] = len(instance.data)

    def forget(self, instances: Iterable[ReceivedInstance]) -> None:
        """The instances' study has been answered (its results are in the outbox): their files go."""
        for instance in instances:
            if instance.spool_key is not None:
                self._remove(instance.spool_key)
                instance.spool_key = None

    def left(self) -> list[SpooledInstance]:
        """What a previous run left, oldest first; half-written files (a crash while writing) are removed."""
        found: list[SpooledInstance] = []
        for path in self.folder.iterdir():
            if path.suffix == PARTIAL_SUFFIX:
                path.unlink(missing_ok=True)
            elif path.suffix == DATA_SUFFIX and not path.with_suffix(FACTS_SUFFIX).exists():
                path.unlink(missing_ok=True)  # its facts were never written: the sender was not told 'stored'
            elif path.suffix == FACTS_SUFFIX:
                entry = self._entry(path)
                if entry is not None:
                    found.append(entry)
        with self._lock:
            self._sizes.update({entry.key: entry.size for entry in found})
        return sorted(found, key=lambda entry: entry.received_at)

    def _entry(self, facts_path: Path) -> SpooledInstance | None:
        key = facts_path.stem
        data_path = facts_path.with_suffix(DATA_SUFFIX)
        try:
            facts = json.loads(_read_at_most(facts_path, MAX_FACTS_BYTES))
            door: Door = "stow-rs" if facts["door"] == "stow-rs" else "dimse"
            study_uid, sop_class_uid = str(facts["study_uid"]), str(facts["sop_class_uid"])
            sop_instance_uid, received_at = str(facts["sop_instance_uid"]), float(facts.get("received_at", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.error("spool: %s is unreadable (%s); left in place for an operator", facts_path.name, error)
            return None
        try:
            size = data_path.stat().st_size
        except OSError:
            log.error("spool: %s has no data file; its facts are removed", facts_path.name)
            facts_path.unlink(missing_ok=True)
            return None
        if self.max_instance_bytes is not None and size > self.max_instance_bytes:
            log.error(
                "spool: %s holds %d bytes, over the node's limit of %d for an instance; left in place for an "
                "operator, not read",
                data_path.name,
                size,
                self.max_instance_bytes,
            )
            return None
        return SpooledInstance(
            key,
            study_uid,
            sop_class_uid,
            sop_instance_uid,
            door,
            facts.get("calling_ae"),
            facts.get("peer"),
            received_at,
            data_path,
            size,
            self.max_instance_bytes,
        )

    def _write(self, name: str, data: bytes) -> None:
        partial = self.folder / (name + PARTIAL_SUFFIX)
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.folder / name)

    def _remove(self, key: str) -> None:
        with self._lock:
            self._sizes.pop(key, None)
        for suffix in (FACTS_SUFFIX, DATA_SUFFIX, DATA_SUFFIX + PARTIAL_SUFFIX, FACTS_SUFFIX + PARTIAL_SUFFIX):
            with contextlib.suppress(OSError):
                (self.folder / (key + suffix)).unlink(missing_ok=True)


def _read_at_most(path: Path, limit: int | None) -> bytes:
    """The file's bytes, sized first on the open file (not the path: it may be replaced meanwhile) and read no
    further than `limit`; OSError (EFBIG) when it holds more."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, over the limit of {limit}", path.name)
        data = file.read() if limit is None else file.read(limit + 1)
    if limit is not None and len(data) > limit:  # it grew while being read
        raise OSError(errno.EFBIG, f"more than the limit of {limit} bytes", path.name)
    return data


def _sync_folder(folder: Path) -> None:
    """The renames themselves survive a power cut once the folder is synced (POSIX; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
