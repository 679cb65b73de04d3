"""`bfd serve` as a real process for the tests that drive it over real HTTP (end to end, web page, desktop, Locust).

One place knows how to start it on a free port with its own results store and log file, wait until `/readyz`
answers, and stop it, so those tests differ only in what they send.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

BFD = [sys.executable, "-m", "bfd.cli"]
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServeProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def bfd_serve(
    bundle: Path,
    folder: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout_s: float = 120.0,
) -> Iterator[ServeProcess]:
    """`bfd serve` on `bundle`, ready to answer; stopped (SIGTERM, then SIGKILL) on exit unless it already exited.

    Its results store and its log live in `folder`: a store of its own, because two processes migrating one
    SQLite file is not what these tests are about; a log file, because a pipe nobody drains can fill and stall it.
    The API key of the calling environment is dropped unless `env` sets one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k != "BFD_API_KEY"}
    full_env["BFD_DATABASE_URL"] = f"sqlite+aiosqlite:///{folder / 'results.sqlite3'}"
    full_env.update(env or {})
    port = free_port()
    log = folder / "serve.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [*BFD, *args, "serve", "--bundle", str(bundle), "--port", str(port)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    served = ServeProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_ready(served, ready_timeout_s)
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(served: ServeProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(f"bfd serve exited early:\n{served.log_text()[-3000:]}")
        try:
            if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"bfd serve did not become ready in {timeout_s:g} s:\n{served.log_text()[-3000:]}")
