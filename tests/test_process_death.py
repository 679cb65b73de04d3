"""`kill -9` of `bfd serve` takes its worker processes with it: no forkserver or worker lives on, adopted by init.

Before this was built, the codec workers (compressed DICOM), the DICOM result-object builder, their forkserver
and multiprocessing's resource tracker (about 200 MB) all survived the service: each waited on a pipe that
another of them held open. Now every worker watches the service process and ends when it does; the others
then see their pipes close.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from factories import build_tiny_bundle
from test_codec_pool import jpeg2000_dicom

from inference import worker_pool
from loadtest.servers import bfd_serve

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)")
DEADLINE_S = 30.0  # generous: a loaded CI machine; the processes end within a second here


def survivors(processes: list[psutil.Process], deadline_s: float) -> list[str]:
    """The processes still running (zombies are ended) once `deadline_s` has passed, or none earlier."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_workers_die_when_the_service_is_killed(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    env = {
        "BFD_DECODE_PROCESSES": "1",  # codec workers: started by the first compressed frame
        "BFD_DICOM_DESTINATION": "ORTHANC@127.0.0.1:9",  # the node: its object builder starts a worker at start
        "BFD_DICOM_PORT": "0",
        "BFD_DICOM_BUILD_PROCESSES": "1",
        "BFD_DICOM_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    with bfd_serve(bundle, tmp_path / "serve", env=env) as server:
        answer = httpx.post(
            f"{server.url}/v1/predict",
            content=jpeg2000_dicom((200, 160)),
            headers={"content-type": "application/dicom"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        children = server.ps.children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        # the forkserver and at least its two workers (codec, object builder): the case this test is about
        assert sum("forkserver" in command for command in commands) >= 3, commands
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        try:
            left = survivors(children, DEADLINE_S)
        finally:
            for child in children:  # whatever this test finds, it leaves nothing behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
    assert left == [], f"still running {DEADLINE_S:g} s after the service was killed: {left}"


def test_a_worker_whose_service_is_already_gone_ends_at_once() -> None:
    """The race of a service killed while its worker starts: the worker's first look finds it gone."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid names no process now
    code = f"import time, inference.worker_pool as w; w._start_worker({ended.pid}, None); time.sleep(60)"
    result = subprocess.run([sys.executable, "-c", code], timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == worker_pool.SERVICE_GONE_EXIT_CODE
