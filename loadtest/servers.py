"""Servers under test as real processes: started on a free port, ready when a path answers 200, stopped gracefully.

One place for what `bench_load` and `bench_service` both do, with the log of each server in a file (a pipe
nobody drains can fill and stall it) and psutil on its pid for CPU and RSS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
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

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes (e.g. codec workers), in MiB."""
        try:
            processes = [self.ps, *self.ps.children(recursive=True)]
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
        try:
            processes = [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    name: str, command: Sequence[str], ready_path: str, log_dir: Path, env: dict[str, str], timeout_s: float
) -> Server:
    """Start `command` (which must take --port last) and wait until `ready_path` answers 200."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    full = [*command, "--port", str(port)]
    process = subprocess.Popen(full, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **env})
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


def stop_server(server: Server) -> int | None:
    """SIGTERM, a graceful wait, then SIGKILL; returns the exit code."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=30)
    server.log_file.close()
    return server.process.returncode
