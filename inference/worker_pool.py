"""Worker processes for work that holds the GIL (codecs, pure-Python DICOM building), started and replaced one way.

The pool starts on first use, from a forkserver: workers are forked from a clean server process, never from the
service, whose onnxruntime and decode threads make fork unsafe (spawn where there is no forkserver). A worker
that dies breaks the whole executor (`BrokenProcessPool` for everything in flight); `replace` drops it so the
next `current()` starts a new one, once, however many callers saw it break.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)


class WorkerProcesses:
    """`processes` workers, each running `initializer` once at start; thread-safe."""

    def __init__(self, processes: int, initializer: Callable[[], None] | None = None, *, what: str = "worker") -> None:
        if processes < 1:
            raise ValueError(f"a worker pool needs at least one process, got {processes}")
        self.processes = processes
        self.initializer = initializer
        self.what = what  # for the log line when one dies
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def current(self) -> ProcessPoolExecutor:
        """The running executor, started now if there is none."""
        with self._lock:
            if self._pool is None:
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context(method), initializer=self.initializer
                )
            return self._pool

    def replace(self, broken: ProcessPoolExecutor) -> bool:
        """Drop a broken executor; True when it was the current one (the first caller to see it broken)."""
        with self._lock:
            replaced = self._pool is broken
            if replaced:
                self._pool = None
                log.warning("a %s process died; its pool is replaced", self.what)
        broken.shutdown(wait=False, cancel_futures=True)
        return replaced

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
