"""HAProxy (from Debian) in front of replicas, as a real process: its config, its health states, its request log.

The failover run (`loadtest.failover`) needs to know when HAProxy took a dead replica out and where each request
went, from HAProxy itself:
- `config`: `/readyz` checked every `check_interval_ms` (`fall` failures mark a server DOWN, `rise` successes
  UP again), `retries` on connection failures with `option redispatch 1` (each retry to another server); no
  retry once a request was sent (`retry-on conn-failure`, HAProxy's default, said out loud): a POST that
  reached a server may have been stored, and sending it again could store it twice;
- `HAProxy`: the process (`haproxy -db`), its log on stdout to a file, one line per request
  (`req id=... server=... status=... term=...`, the client's X-Request-Id captured), and a thread that
  reads the stats socket every `poll_ms` and records each server's state changes with the wall-clock time.
Imports the standard library only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REQUEST_ID = "X-Request-Id"
# One line per request; accept=epoch seconds.milliseconds; tt: total ms from accept to the last byte (-1: not
# finished); retries: '+N' when redispatched to another server.
LOG_FORMAT = "req id=%[capture.req.hdr(0)] server=%s status=%ST term=%tsc retries=%rc accept=%Ts.%ms tt=%Tt path=%HP"


class HaproxyUnavailable(RuntimeError):
    """HAProxy cannot run here; the message says why."""


def find_haproxy() -> Path:
    """The haproxy binary (Debian's package puts it in /usr/sbin)."""
    for candidate in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise HaproxyUnavailable("no haproxy binary found (install Debian's 'haproxy' package: apt-get install haproxy)")


def config(
    port: int,
    servers: Mapping[str, int],
    stats_socket: Path,
    *,
    check_interval_ms: int = 500,
    fall: int = 2,
    rise: int = 2,
    retries: int = 3,
    server_timeout_s: int = 130,
) -> str:
    """haproxy.cfg: 127.0.0.1:`port` in front of `servers` (name -> port on 127.0.0.1), least connections first."""
    lines = [
        "global",
        "    log stdout format raw local0 info",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    maxconn 4000",
        "defaults",
        "    mode http",
        "    log global",
        f'    log-format "{LOG_FORMAT}"',
        "    option redispatch 1",
        f"    retries {retries}",
        "    retry-on conn-failure",
        "    timeout connect 1s",
        "    timeout check 1s",
        "    timeout http-request 30s",
        "    timeout queue 30s",
        f"    timeout client {server_timeout_s}s",
        f"    timeout server {server_timeout_s}s",
        "frontend web",
        f"    bind 127.0.0.1:{port}",
        f"    http-request capture req.hdr({REQUEST_ID}) len 40",
        "    default_backend replicas",
        "backend replicas",
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {check_interval_ms}ms fall {fall} rise {rise}",
        *(f"    server {name} 127.0.0.1:{server_port} check" for name, server_port in servers.items()),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StateChange:
    wall_s: float  # time.time() when the stats socket first showed it
    server: str
    status: str  # HAProxy's: UP, DOWN, 'UP 1/2' (going down), 'DOWN 1/2' (coming up), MAINT, ...


@dataclass(frozen=True)
class LoggedRequest:
    request_id: str
    server: str  # '<NOSRV>' when none was chosen
    status: int
    termination: str  # e.g. '----' (normal), 'SH--' (the server aborted before its headers)
    retries: str  # '0', '1', '+1' (redispatched)
    accept_wall_s: float
    total_ms: int  # -1 when it did not finish

    @property
    def end_wall_s(self) -> float:
        return self.accept_wall_s + max(self.total_ms, 0) / 1e3


def parse_request_line(line: str) -> LoggedRequest | None:
    """A request line of LOG_FORMAT, or None for anything else (server state changes, alerts)."""
    if not line.startswith("req "):
        return None
    fields = dict(part.split("=", 1) for part in line[4:].split(" ") if "=" in part)
    try:
        return LoggedRequest(
            request_id=fields["id"],
            server=fields["server"],
            status=int(fields["status"]),
            termination=fields["term"],
            retries=fields["retries"],
            accept_wall_s=float(fields["accept"]),
            total_ms=int(fields["tt"]),
        )
    except (KeyError, ValueError):
        return None


class HAProxy:
    """A started HAProxy on a free port of 127.0.0.1 (`url`); `stop()` ends it. Every state change of every server
    is recorded in `changes` from the start."""

    def __init__(self, folder: Path, servers: Mapping[str, int], port: int, *, poll_ms: float = 20, **options: int):
        self.folder = folder
        self.binary = find_haproxy()
        folder.mkdir(parents=True, exist_ok=True)
        self.socket_path = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.config_path.write_text(config(port, servers, self.socket_path, **options))
        self.log_path = folder / "haproxy.log"
        self.url = f"http://127.0.0.1:{port}"
        self.poll_ms = poll_ms
        self.changes: list[StateChange] = []
        self._states: dict[str, str] = {}
        self._stop = threading.Event()
        check = subprocess.run([str(self.binary), "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise HaproxyUnavailable(f"haproxy rejects its config: {(check.stderr or check.stdout)[-1500:]}")
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(self.binary), "-db", "-f", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._watch = threading.Thread(target=self._poll, name="haproxy-stats", daemon=True)

    def wait_until_up(self, timeout_s: float = 30.0) -> None:
        """Until every server is UP (checks passed `rise` times); then state changes are watched."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HaproxyUnavailable(f"haproxy exited with {self.process.returncode}: {self.log_text()[-1500:]}")
            try:
                states = self.states()
            except OSError:
                states = {}
            if states and all(status == "UP" for status in states.values()):
                self._states = dict(states)
                self._watch.start()
                return
            time.sleep(0.1)
        raise HaproxyUnavailable(f"servers not all UP in {timeout_s:g} s: {states}")

    def command(self, text: str) -> str:
        """One command on the stats socket (`show stat`, ...), its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.socket_path))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """Each backend server's status as the stats socket shows it now."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname") not in (None, "BACKEND", "FRONTEND"):
                states[row["svname"]] = row.get("status", "")
        return states

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_ms / 1e3):
            try:
                states = self.states()
            except OSError:  # HAProxy stopping
                continue
            now = time.time()
            for server, status in states.items():
                if self._states.get(server) != status:
                    self._states[server] = status
                    self.changes.append(StateChange(now, server, status))

    def first_change(self, server: str, status: str, after_wall_s: float) -> StateChange | None:
        return next(
            (c for c in self.changes if c.server == server and c.status == status and c.wall_s >= after_wall_s), None
        )

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def requests(self) -> dict[str, LoggedRequest]:
        """The logged requests by X-Request-Id (those sent without one are left out)."""
        found = {}
        for line in self.log_text().splitlines():
            request = parse_request_line(line)
            if request is not None and request.request_id not in ("", "-"):
                found[request.request_id] = request
        return found

    def stop(self) -> None:
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join(timeout=5)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
