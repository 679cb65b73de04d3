"""Worker processes for work that holds the GIL (codecs, pure-Python DICOM building), started and replaced one way.

The pool starts on first use, from a forkserver: workers are forked from a clean server process, never from the
service, whose onnxruntime and decode threads make fork unsafe (spawn where there is no forkserver). A worker
that dies breaks the whole executor (`BrokenProcessPool` for everything in flight); `replace` drops it so the
next `current()` starts a new one, once, however many callers saw it break.

Workers die with the service however it dies, `kill -9` included: each watches the service process from a
thread of its own (`_watch_service`) and ends itself when the service is gone. Nothing else would end them:
a worker waits on a pipe whose write end it holds itself, and the forkserver (their parent, not the
service, so `PR_SET_PDEATHSIG` in a worker watches the wrong process) waits until every process holding its
"alive" pipe has ended, workers included. Once the workers are gone the forkserver and multiprocessing's
resource tracker see their pipes close and end too.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)

SERVICE_GONE_EXIT_CODE = 70  # a worker whose service died exits with this (EX_SOFTWARE), without clean-up
POLL_S = 1.0  # where there is no pidfd (not Linux 5.3+): how often a worker asks whether the service lives


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
                    self.processes,
                    mp_context=multiprocessing.get_context(method),
                    initializer=functools.partial(_start_worker, os.getpid(), self.initializer),
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


def _start_worker(service_pid: int, initializer: Callable[[], None] | None) -> None:
    """A worker's start: watch the service first (a slow initializer must not outlive it), then initialize."""
    _watch_service(service_pid)
    if initializer is not None:
        initializer()


def _watch_service(service_pid: int) -> None:
    """End this process as soon as `service_pid` has ended, from a daemon thread.

    A pidfd becomes readable when the process has ended (all its threads: unlike `PR_SET_PDEATHSIG`, the
    thread that started us may come and go), and it names that process, never a later one given the same pid.
    The thread needs the GIL to act, so a worker busy in a codec that holds it ends when that decode does.
    """
    try:
        pidfd = os.pidfd_open(service_pid)
    except ProcessLookupError:  # the service ended before this worker started
        _service_gone()
    except (AttributeError, OSError):  # no pidfd here (not Linux, or a kernel before 5.3): ask every POLL_S
        threading.Thread(target=_poll_service, args=(service_pid,), name="watch-service", daemon=True).start()
    else:
        threading.Thread(target=_wait_readable, args=(pidfd,), name="watch-service", daemon=True).start()


def _wait_readable(pidfd: int) -> None:
    waiting = select.poll()  # not select(): it cannot watch a descriptor numbered 1024 or more
    waiting.register(pidfd, select.POLLIN)
    while not waiting.poll():
        pass
    _service_gone()


def _poll_service(service_pid: int) -> None:
    while True:
        time.sleep(POLL_S)
        try:
            os.kill(service_pid, 0)
        except ProcessLookupError:
            _service_gone()
        except PermissionError:  # alive, under another user: not ours to judge
            continue


def _service_gone() -> None:
    # os._exit, not sys.exit: from this thread nothing else would end the process, and no clean-up is wanted
    # (the results it would send back have nobody to go to)
    os._exit(SERVICE_GONE_EXIT_CODE)
