"""podman for the container tests (tests/test_container_image.py, tests/test_compose.py), through the same
scripts a user runs (deploy/podman/): the host's containers.conf, the base image (a stand-in where Docker Hub
cannot be reached) and the build.

Where podman is missing or cannot run containers the tests skip with a loud reason, or fail when
BFD_REQUIRE_CONTAINER=1 (CI sets it, so a runner without podman cannot pass by skipping). Everything here is
done once per pytest process (functools.cache): both modules share the host set-up and the image builds, and
podman's layer cache (/var/lib/containers for root) makes a rebuild after a source change reinstall the
project only.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "deploy" / "podman"
DEMO_BUNDLE = ROOT / "models" / "demo"
EMPTY_BUNDLE = "deploy/empty-bundle"
REQUIRE_ENV = "BFD_REQUIRE_CONTAINER"
BUILD_TIMEOUT_S = 1200  # a cold build downloads about 300 MB of wheels; a cached one takes seconds
STAND_IN_TIMEOUT_S = 900  # debootstrap of a minimal Debian with Python, then podman import


def skip_or_fail(reason: str) -> NoReturn:
    """Skip loudly, or fail when BFD_REQUIRE_CONTAINER=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"containers are required here ({REQUIRE_ENV}=1) but cannot run: {reason}")
    pytest.skip(f"!!! container tests SKIPPED: {reason} !!!")


def tool(name: str) -> str | None:
    """A command from this interpreter's environment first (podman-compose is a test extra), else PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@dataclass(frozen=True)
class Podman:
    """podman with this host's containers.conf (host-setup.sh) and Docker's image format for every build."""

    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.command("podman", *args, timeout=timeout, check=check)

    def command(
        self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str | None] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Any command (a script, podman-compose) under this environment, from the repository root; `env` on top
        (None: unset)."""
        merged = {**self.env, **(env or {})}
        environment = {key: value for key, value in merged.items() if value is not None}
        result = subprocess.run(
            args, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def inspect(self, what: str, name: str) -> dict[str, Any]:
        (found,) = json.loads(self.run(what, "inspect", name).stdout)
        return dict(found)


@functools.cache
def podman() -> Podman:
    """podman set up by deploy/podman/host-setup.sh; skips (or fails) where it cannot run containers."""
    if tool("podman") is None:
        skip_or_fail("podman not installed (make system-deps, or deploy/podman/host-setup.sh --install CONF)")
    folder = tempfile.mkdtemp(prefix="bfd-podman-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    conf = Path(folder) / "containers.conf"
    setup = subprocess.run(
        [str(SCRIPTS / "host-setup.sh"), str(conf)], capture_output=True, text=True, timeout=120, check=False
    )
    if setup.returncode != 0:
        skip_or_fail(f"deploy/podman/host-setup.sh failed: {setup.stderr.strip()[-1500:]}")
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "BUILDAH_FORMAT": "docker"}
    return Podman(env)


@functools.cache
def base_image() -> str:
    """python:3.11-slim: the official image where it can be pulled, else the stand-in (stand-in-base.sh)."""
    result = podman().command(str(SCRIPTS / "stand-in-base.sh"), timeout=STAND_IN_TIMEOUT_S, check=False)
    if result.returncode != 0:
        skip_or_fail(f"no python:3.11-slim and no stand-in for it: {result.stderr.strip()[-1500:]}")
    return result.stdout.strip()


@functools.cache
def postgres_image() -> str:
    """postgres:16 where it can be pulled, else the stand-in built from Debian's PostgreSQL."""
    base_image()
    result = podman().command(str(SCRIPTS / "stand-in-postgres.sh"), timeout=STAND_IN_TIMEOUT_S, check=False)
    if result.returncode != 0:
        skip_or_fail(f"no postgres:16 and no stand-in for it: {result.stderr.strip()[-1500:]}")
    return result.stdout.strip()


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    build_s: float  # wall time of deploy/podman/build.sh: cold (no layers cached) or not, as it happened
    size_bytes: int
    output: str  # what the build printed, step by step ("Using cache" where a layer was reused)


@functools.cache
def service_image(tag: str, bundle_dir: str = "models/demo", context: Path = ROOT) -> BuiltImage:
    """The unmodified ./Dockerfile built by deploy/podman/build.sh (Docker format), on base_image(); `context`:
    another build context (a copy of the repository), built with its own Dockerfile."""
    if bundle_dir == "models/demo" and not (context / DEMO_BUNDLE.relative_to(ROOT) / "manifest.json").is_file():
        skip_or_fail("models/demo has no bundle: run `make bundle` (make test does)")
    base_image()
    started = time.monotonic()
    built = podman().command(
        str(SCRIPTS / "build.sh"), tag, "--build-arg", f"BUNDLE_DIR={bundle_dir}",
        timeout=BUILD_TIMEOUT_S, env={"BFD_BUILD_CONTEXT": str(context)},
    )  # fmt: skip
    build_s = time.monotonic() - started
    return BuiltImage(tag, build_s, int(podman().inspect("image", tag)["Size"]), built.stdout + built.stderr)


@dataclass
class Container:
    name: str
    url: str  # http://127.0.0.1:<published port>

    def logs(self) -> str:
        result = podman().run("logs", self.name, check=False)
        return result.stdout + result.stderr


def published_url(name: str, port: int = 8000) -> str:
    """http://host:port of the container's published `port`; podman prints 0.0.0.0 or the bound address."""
    host_port = podman().run("port", name, f"{port}/tcp").stdout.strip().splitlines()[0]
    host, _, number = host_port.rpartition(":")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{number}"


@contextmanager
def running(image: str, name: str, *options: str) -> Iterator[Container]:
    """`podman run -d` with port 8000 published on a free loopback port; removed on the way out."""
    podman().run("rm", "--force", "--volumes", "--time", "0", name, check=False)
    podman().run("run", "--detach", "--name", name, "--publish", "127.0.0.1::8000", *options, image)
    try:
        yield Container(name, published_url(name))
    finally:
        podman().run("rm", "--force", "--volumes", "--time", "0", name, check=False)


def wait_ready(container: Container, timeout_s: float = 180) -> float:
    """Seconds until GET /readyz answers 200 (the bundle loaded and warmed up); fails with the log if never."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = podman().inspect("container", container.name)["State"]
        if not state["Running"] and state["Status"] != "created":
            pytest.fail(f"{container.name} exited ({state['ExitCode']}) before ready:\n{container.logs()[-3000:]}")
        try:
            if httpx.get(f"{container.url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{container.name} not ready after {timeout_s} s:\n{container.logs()[-3000:]}")


def report(config: pytest.Config, line: str) -> None:
    """A figure on the terminal, past pytest's output capture (CI's log keeps it)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
