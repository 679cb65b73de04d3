"""Servers under test as real processes: started on a free port, ready when a path answers 200, stopped gracefully.

The one place that starts a server and waits for it, for the benchmarks and for the tests that drive `bfd serve`
over real HTTP (`bfd_serve`): the log of each server goes to a file (a pipe nobody drains can fill and stall
it), and psutil reads CPU and RSS from its pid and its child processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil


@dataclass
class Server:
    """A server under test: its process, URL and psutil handle (CPU and RSS are read from its pid)."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log_file: IO[bytes]
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.process.pid)

    def log_text(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def rss_mb(self, children: bool = True) -> float:
        """Resident memory of the server and (unless told not to) its child processes (e.g. codec workers), MiB."""
        try:
            processes = [self.ps, *(self.ps.children(recursive=True) if children else ())]
        except psutil.Error:
            return float("nan")
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a child that just ended
                continue
        return total / 2**20

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and its live child processes."""
        return sum(cpu_times(self.ps))


def cpu_times(process: psutil.Process, children: bool = True) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and (with `children`) its live children; nan once it is gone."""
    try:
        processes = [process, *(process.children(recursive=True) if children else ())]
    except psutil.Error:
        return float("nan"), float("nan")
    user = system = 0.0
    for each in processes:
        try:
            times = each.cpu_times()
        except psutil.Error:  # a child that just ended
            continue
        user, system = user + times.user, system + times.system
    return user, system


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BFD = [sys.executable, "-m", "bfd.cli"]
REPO = Path(__file__).resolve().parent.parent


def start_server(
    name: str,
    command: Sequence[str],
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str],
    timeout_s: float,
    *,
    inherit_env: bool = True,
) -> Server:
    """Start `command` (which must take --port last) and wait until `ready_path` answers 200."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    full = [*command, "--port", str(port)]
    full_env = {**(os.environ if inherit_env else {}), **env}
    process = subprocess.Popen(full, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    server = Server(name, full, process, f"http://127.0.0.1:{port}", log_path, log_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_file.close()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(server.url + ready_path, timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"{name} was not ready in {timeout_s:.0f} s; see {log_path}")


def stop_server(server: Server, grace_s: float = 90) -> int | None:
    """SIGTERM, a graceful wait, then SIGKILL; returns the exit code."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=30)
    server.log_file.close()
    return server.process.returncode


@contextmanager
def bfd_serve(
    bundle: Path,
    folder: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout_s: float = 120.0,
) -> Iterator[Server]:
    """`bfd serve` on `bundle`, ready to answer; stopped (SIGTERM, then SIGKILL) on exit unless it already exited.

    Its results store and its log live in `folder`: a store of its own (two processes migrating one SQLite
    file is not what the callers measure), a log file. The API key of the calling environment is dropped
    unless `env` sets one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k != "BFD_API_KEY"}
    full_env["BFD_DATABASE_URL"] = f"sqlite+aiosqlite:///{folder / 'results.sqlite3'}"
    full_env.update(env or {})
    command = [*BFD, *args, "serve", "--bundle", str(bundle)]
    server = start_server("serve", command, "/readyz", folder, full_env, ready_timeout_s, inherit_env=False)
    try:
        yield server
    finally:
        stop_server(server, grace_s=20)
