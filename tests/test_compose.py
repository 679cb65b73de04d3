"""docker-compose.yml run for real with podman-compose: the service built from ./Dockerfile, PostgreSQL as its
results store, the bundle mounted read-only, named volumes for the database and /data.

The database is postgres:16 where it can be pulled, else a STAND-IN built from Debian's PostgreSQL
(deploy/podman/stand-in-postgres.sh, passed as BFD_POSTGRES_IMAGE), on the python:3.11-slim stand-in where that
cannot be pulled either (tests/podman_fixtures.py). podman before 4.6 (Debian's is 4.3) ignores
`depends_on: condition: service_healthy`, so the service and the database start together; the service's
results store backs off and answers 503 with Retry-After until the database is up, which this test rides
through the way a client should. Skipped loudly without podman and podman-compose, required where
BFD_REQUIRE_CONTAINER=1 (CI). The static checks of the file (Compose schema, `docker compose config`) are in
tests/test_deploy_files.py.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml
from podman_fixtures import (
    DEMO_BUNDLE,
    ROOT,
    Container,
    podman,
    postgres_image,
    report,
    skip_or_fail,
    tool,
    wait_ready,
)

from loadtest.servers import free_port

COMPOSE_FILE = ROOT / "docker-compose.yml"
XRAY = ROOT / "tests" / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md
PROJECT = f"bfd-test-{os.getpid()}"
UP_TIMEOUT_S = 1200  # `up --build`: a cold build downloads the wheels (cached: seconds)
STORE_TIMEOUT_S = 120  # the store's back-off reaches 30 s between probes; the database is up long before


@dataclass
class Stack:
    command: tuple[str, ...]  # podman-compose -p PROJECT -f docker-compose.yml
    env: dict[str, str | None]  # what the file interpolates (POSTGRES_PASSWORD, ...), on top of podman's set-up
    url: str

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return podman().command(*self.command, *args, timeout=timeout, check=check, env=self.env).stdout

    def container(self, service: str) -> str:
        names = podman().run(
            "ps", "--all", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        (name,) = names
        return name

    def wait_healthy(self, service: str, timeout_s: float = 120) -> None:
        """Runs the service's healthcheck until it passes: podman 4.3 has no timer to run it without systemd."""
        deadline = time.monotonic() + timeout_s
        while podman().run("healthcheck", "run", self.container(service), check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{service} not healthy after {timeout_s} s"
            time.sleep(1)

    def wait_ready(self) -> float:
        return wait_ready(Container(self.container("bfd"), self.url))


def _store_call(method: str, url: str, **kwargs: object) -> httpx.Response:
    """A storage route, retried while it answers 503 + Retry-After (the database not up yet, or the store's
    back-off window after it was not)."""
    deadline = time.monotonic() + STORE_TIMEOUT_S
    while True:
        response = httpx.request(method, url, timeout=60, **kwargs)  # type: ignore[arg-type]
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 5))


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    executable = tool("podman-compose")
    if executable is None:
        skip_or_fail("podman-compose not installed (a test extra: pip install -e '.[test]')")
    if not (DEMO_BUNDLE / "manifest.json").is_file():
        skip_or_fail("models/demo has no bundle: run `make bundle` (make test does)")
    port = free_port()
    # the caller's API key and Compose settings would reach the stack: left out
    env: dict[str, str | None] = {key: None for key in os.environ if key.startswith("COMPOSE_")}
    env |= {
        "BFD_API_KEY": None,
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "BFD_PUBLISH_PORT": str(port),
        "BFD_BUNDLE_DIR": str(DEMO_BUNDLE),
        "BFD_POSTGRES_IMAGE": postgres_image(),
    }
    command = (executable, "-p", PROJECT, "-f", str(COMPOSE_FILE))
    stack = Stack(command, env, f"http://127.0.0.1:{port}")
    started = time.monotonic()
    stack.run("build", "bfd", timeout=UP_TIMEOUT_S)
    report(request.config, f"compose: build (layers cached or not, as found): {time.monotonic() - started:.1f} s")
    try:
        yield stack
    finally:
        stack.run("down", "--volumes", check=False)


def test_podman_compose_accepts_the_file(stack: Stack) -> None:
    resolved = yaml.safe_load(stack.run("config"))
    bfd = resolved["services"]["bfd"]
    named = [volume for volume in bfd["volumes"] if isinstance(volume, str) and volume.endswith(":/data")]
    assert named == ["bfd-data:/data"], bfd["volumes"]
    assert resolved["services"]["db"]["image"] == stack.env["BFD_POSTGRES_IMAGE"]


def test_stores_an_analysis_that_survives_a_restart_and_down_up(stack: Stack, request: pytest.FixtureRequest) -> None:
    """up, both healthy, an analysis stored; the service container restarted finds it; the database stopped
    and started again under the service, it is found again; `down` then `up` (the volumes kept, as `down`
    without -v does) finds it again."""
    started = time.monotonic()
    stack.run("up", "--detach", timeout=UP_TIMEOUT_S)
    stack.wait_healthy("db")
    ready_s = stack.wait_ready()
    report(request.config, f"compose: up to healthy and ready: {time.monotonic() - started:.1f} s")
    stack.wait_healthy("bfd")

    path = sorted(XRAY.rglob("*.jpg"))[0]
    url = f"{stack.url}/api/analysis"
    stored = _store_call("POST", url, files={"image": (path.name, path.read_bytes())})
    assert stored.status_code == 201, stored.text
    record = stored.json()
    mounts = {mount["Destination"]: mount for mount in podman().inspect("container", stack.container("bfd"))["Mounts"]}
    assert mounts["/data"]["Type"] == "volume"
    assert mounts["/data"]["Name"] == f"{PROJECT}_bfd-data"
    assert mounts["/app/models/bundle"]["RW"] is False

    stack.run("restart", "bfd")
    ready_s = stack.wait_ready()
    report(request.config, f"compose: service restart to ready: {ready_s:.1f} s")
    again = _store_call("GET", f"{url}/{record['id']}")
    assert again.status_code == 200, again.text
    assert again.json()["image_sha256"] == record["image_sha256"]

    # The database gone under a running service, as it is at start-up where depends_on's condition is ignored:
    # the storage routes answer 503 + Retry-After, predictions go on, and the store comes back by itself.
    database = stack.container("db")
    podman().run("stop", database)
    refused = httpx.get(f"{url}/{record['id']}", timeout=30)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    predicted = httpx.post(f"{stack.url}/v1/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert predicted.status_code == 200, predicted.text
    podman().run("start", database)
    stack.wait_healthy("db")
    back = _store_call("GET", f"{url}/{record['id']}")
    assert back.status_code == 200, back.text

    stack.run("down")
    volumes = podman().run("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert {f"{PROJECT}_pgdata", f"{PROJECT}_bfd-data"} <= set(volumes)
    stack.run("up", "--detach", timeout=UP_TIMEOUT_S)
    stack.wait_healthy("db")
    stack.wait_ready()
    after = _store_call("GET", f"{url}/{record['id']}")
    assert after.status_code == 200, after.text
    assert after.json()["image_sha256"] == record["image_sha256"]
    listed = _store_call("GET", url, params={"image_name": path.name}).json()
    assert [item["id"] for item in listed["items"]] == [record["id"]]
