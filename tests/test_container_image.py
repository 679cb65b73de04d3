"""The CPU image, built from the unmodified ./Dockerfile with podman and run as a container, hardened as in
production: read-only root filesystem with a tmpfs /tmp and a volume on /data, every capability dropped, no
new privileges.

Built by deploy/podman/build.sh (Docker's image format: OCI would drop the HEALTHCHECK) on python:3.11-slim,
or, where Docker Hub cannot be reached (here and in CI), on a STAND-IN for it bootstrapped from Debian's
archive by deploy/podman/stand-in-base.sh: Debian's Python 3.11 rather than python.org's, so what this proves
about the official base is that the Dockerfile, the wheels and the service work on a Debian with Python 3.11.
Skipped loudly without podman, required where BFD_REQUIRE_CONTAINER=1 (CI). Build time, image size, time to
ready and the SIGTERM drain time are written to the terminal.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from in_flight import predictions_in_flight
from podman_fixtures import (
    EMPTY_BUNDLE,
    ROOT,
    BuiltImage,
    Container,
    podman,
    report,
    running,
    service_image,
    wait_ready,
)

XRAY = ROOT / "tests" / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md
TAG = "localhost/bfd-test:cpu"
NO_BUNDLE_TAG = "localhost/bfd-test:cpu-nobundle"
UID = 10001
# As production runs it (docker-compose.yml, deploy/k8s): podman's --read-only would also mount tmpfs on /run
# and /var/tmp unless told not to; only /tmp is meant to be writable (and /data, a volume).
HARDENED = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs",
    "/tmp",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)
# A slow machine must not turn the drain test's burst into 503s: it is about draining, not admission.
PATIENT = ("--env", "BFD_MAX_QUEUE_WAIT_MS=60000")


def _stop_grace_s() -> float:
    """docker-compose.yml's stop_grace_period (the Kubernetes one is checked in test_deploy_files.py)."""
    text = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return float(text["services"]["bfd"]["stop_grace_period"].removesuffix("s"))


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    found: dict[str, str] = {}
    yield found
    for name, value in found.items():
        report(request.config, f"container image: {name}: {value}")


@pytest.fixture(scope="module")
def image(figures: dict[str, str]) -> BuiltImage:
    built = service_image(TAG)
    figures["build time (layers cached or not, as found)"] = f"{built.build_s:.1f} s"
    figures["image size"] = f"{built.size_bytes / 1e6:.0f} MB"
    return built


@pytest.fixture(scope="module")
def data_volume() -> Iterator[str]:
    name = f"bfd-test-data-{os.getpid()}"
    podman().run("volume", "create", name)
    yield name
    podman().run("volume", "rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def served(image: BuiltImage, data_volume: str, figures: dict[str, str]) -> Iterator[Container]:
    name = f"bfd-test-image-{os.getpid()}"
    with running(image.tag, name, *HARDENED, "--volume", f"{data_volume}:/data") as container:
        figures["time to ready (podman run to /readyz 200)"] = f"{wait_ready(container):.1f} s"
        yield container


def _exec(container: Container, *command: str, check: bool = True) -> str:
    result = podman().run("exec", container.name, *command, check=check)
    return result.stdout + result.stderr


def _radiograph() -> Path:
    return sorted(XRAY.rglob("*.jpg"))[0]


def test_health_and_readiness_answer(served: Container) -> None:
    assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{served.url}/readyz", timeout=10).status_code == 200


def test_predicts_a_radiograph_and_stores_it_in_the_data_volume(served: Container) -> None:
    path = _radiograph()
    response = httpx.post(f"{served.url}/v1/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["body_part"]["label"] in ("elbow", "hand", "shoulder")
    assert 0.0 <= prediction["fracture"]["probability"] <= 1.0
    stored = httpx.post(f"{served.url}/api/analysis", files={"image": (path.name, path.read_bytes())}, timeout=60)
    assert stored.status_code == 201, stored.text
    found = httpx.get(f"{served.url}/api/analysis/{stored.json()['id']}", timeout=10)
    assert found.json()["image_name"] == path.name
    # the image's default store: SQLite in /data, which is the volume (the root filesystem is read-only)
    assert "results.sqlite3" in _exec(served, "ls", "/data")


def test_image_carries_the_healthcheck_and_it_passes(image: BuiltImage, served: Container) -> None:
    config = podman().inspect("image", image.tag)
    healthcheck = config.get("Healthcheck")  # podman's key; Docker's is Config.Healthcheck
    assert healthcheck, "no HEALTHCHECK in the image: built as OCI? (deploy/podman/build.sh uses --format docker)"
    assert "/healthz" in " ".join(healthcheck["Test"])
    result = podman().run("healthcheck", "run", served.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_uid_10001_without_capabilities_on_a_read_only_root(served: Container) -> None:
    status = dict(line.split(":\t", 1) for line in _exec(served, "cat", "/proc/1/status").splitlines() if ":\t" in line)
    assert status["Uid"].split() == [str(UID)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(UID)] * 4, status["Gid"]
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, f"{capabilities} {status[capabilities]}"
    assert status["NoNewPrivs"].strip() == "1"
    assert podman().inspect("container", served.name)["HostConfig"]["ReadonlyRootfs"] is True
    mounts = {
        fields[1]: fields for fields in (line.split() for line in _exec(served, "cat", "/proc/1/mounts").splitlines())
    }
    assert "ro" in mounts["/"][3].split(","), mounts["/"]
    assert mounts["/tmp"][2] == "tmpfs"
    for read_only in ("/app", "/opt/venv", "/app/models/bundle", "/var/tmp", "/run"):
        refused = _exec(served, "touch", f"{read_only}/probe", check=False)
        assert "Read-only file system" in refused, f"{read_only}: {refused}"
    for writable in ("/tmp", "/data"):
        _exec(served, "touch", f"{writable}/probe")
        _exec(served, "rm", f"{writable}/probe")


def test_no_tensorflow_and_pip_check_clean(image: BuiltImage) -> None:
    checked = podman().run("run", "--rm", image.tag, "pip", "check", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = podman().run("run", "--rm", image.tag, "pip", "list", "--format", "json")
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "onnxruntime" in installed
    assert not installed & {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "tf-keras"}, installed
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('tensorflow', 'keras')))"
    assert podman().run("run", "--rm", image.tag, "python", "-I", "-c", probe, check=False).returncode == 0


def _build_steps(output: str) -> dict[str, str]:
    """podman build's output by step: the instruction line ("RUN ...") to what followed it."""
    steps: dict[str, str] = {}
    for chunk in re.split(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: ", output, flags=re.MULTILINE)[1:]:
        instruction, _, rest = chunk.partition("\n")
        steps[instruction] = rest
    return steps


def test_a_source_change_reinstalls_the_project_alone(
    image: BuiltImage, tmp_path: Path, figures: dict[str, str]
) -> None:
    """The dependencies have a layer of their own, taken from pyproject.toml before any source is copied: after a
    change to the code, a rebuild reuses it and reinstalls only the project. The `image` build has just filled
    the cache; this builds a copy of the tracked files with one source file changed."""
    context = tmp_path / "context"
    tracked = podman().command("git", "ls-files", "-z").stdout.split("\0")
    for relative in filter(None, tracked):
        source = ROOT / relative
        if source.is_file():
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            (context / relative).write_bytes(source.read_bytes())
    changed = context / "inference" / "__init__.py"
    # a change never built before (an earlier run's change would be found in the cache)
    change = f"\n# a change to the sources: {uuid.uuid4()}\n"
    changed.write_text(changed.read_text(encoding="utf-8") + change, encoding="utf-8")
    rebuilt = service_image("localhost/bfd-test:source-change", EMPTY_BUNDLE, context)
    figures["rebuild after a source change"] = f"{rebuilt.build_s:.1f} s"
    podman().run("rmi", "--force", rebuilt.tag, check=False)
    steps = _build_steps(rebuilt.output)
    (dependencies,) = [rest for instruction, rest in steps.items() if "--requirement" in instruction]
    (project,) = [rest for instruction, rest in steps.items() if "--no-deps" in instruction]
    assert "Using cache" in dependencies, dependencies
    assert "Using cache" not in project, project


def test_no_bundle_image_refuses_to_start_naming_the_missing_file() -> None:
    image = service_image(NO_BUNDLE_TAG, EMPTY_BUNDLE)
    result = podman().run("run", "--rm", *HARDENED, image.tag, timeout=120, check=False)
    assert result.returncode == 2, result.stdout + result.stderr  # `bfd serve`'s "cannot serve"
    assert "/app/models/bundle/manifest.json" in result.stdout + result.stderr, result.stdout + result.stderr


def test_sigterm_answers_the_requests_in_flight_then_exits_0(image: BuiltImage, figures: dict[str, str]) -> None:
    """`podman stop` with the compose file's grace period, while a burst of predictions is queued or running:
    each is answered, then the service exits 0 (not killed at the end of the grace period)."""
    name = f"bfd-test-drain-{os.getpid()}"
    with running(image.tag, name, *HARDENED, *PATIENT) as container:
        wait_ready(container)
        with predictions_in_flight(container.url, _radiograph().read_bytes(), 16) as burst:
            grace_s = _stop_grace_s()
            signalled = time.monotonic()
            # podman stop sends the image's STOPSIGNAL (SIGTERM) and waits up to --time before SIGKILL
            podman().run("stop", "--time", str(int(grace_s)), name, timeout=grace_s + 30)
            drain_s = time.monotonic() - signalled
        state = podman().inspect("container", name)["State"]
        log = container.logs()
    figures["SIGTERM drain (podman stop, 16 requests in flight, to exit)"] = f"{drain_s:.1f} s"
    assert burst.statuses == [200] * 16, burst.statuses
    assert max(burst.finished) > signalled, "nothing was in flight when the signal came"
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']}:\n{log[-3000:]}"
    assert drain_s < grace_s
    assert re.search(r"Application shutdown complete", log), log[-3000:]
