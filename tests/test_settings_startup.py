"""Settings fail fast and say why (issue 23, finding 9): every setting is checked before the bundle loads, and
`bfd serve` stops with exit 2 and a line naming the setting's environment variable, never with a traceback.

Most tests construct `Settings` from a monkeypatched environment or call its start-up check; a few run the real
`bfd serve` as a process, with an environment free of the caller's `BFD_*` variables.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from factories import build_tiny_bundle, encode_png, image_for_part
from pydantic import ValidationError

from service.settings import Settings
from service.startup_checks import (
    OTHER_BFD_VARIABLES,
    SERVICE_LINK,
    check_environment,
    known_variables,
    problem_lines,
    resolve_bind_address,
)

REPO = Path(__file__).resolve().parent.parent
BFD = [sys.executable, "-m", "bfd.cli"]
NODE = {"BFD_DICOM_DESTINATION": "PACS@127.0.0.1:104", "BFD_DICOM_PORT": "11112"}  # a node that listens
NODE_FIELDS = {"dicom_destination": "PACS@127.0.0.1:104", "dicom_port": 11112}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `BFD_*` variable of the caller's (CI sets some) reaches the settings under test."""
    for name in list(os.environ):
        if name.upper().startswith("BFD_"):
            monkeypatch.delenv(name)


def _refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    """The ValidationError's text for `env`, which must be refused."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return str(caught.value)


# --- threads and processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["BFD_INTRA_OP_THREADS", "BFD_DECODE_THREADS", "BFD_DECODE_PROCESSES", "BFD_DICOM_BUILD_PROCESSES"]
)
def test_thread_and_process_counts_have_an_upper_bound(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """BFD_INTRA_OP_THREADS=100000 hung start-up at about 32,400 threads and used up the machine's processes."""
    text = _refused(monkeypatch, {name: "100000"})
    assert name.removeprefix("BFD_").lower() in text
    assert "less than or equal to" in text


def test_256_threads_are_still_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFD_INTRA_OP_THREADS", "256")
    monkeypatch.setenv("BFD_DECODE_THREADS", "256")
    monkeypatch.setenv("BFD_DECODE_PROCESSES", "0")
    settings = Settings()
    assert (settings.intra_op_threads, settings.decode_threads, settings.decode_processes) == (256, 256, 0)


# --- finite numbers and durations ---------------------------------------------------------------------------

FLOAT_FIELDS = sorted(name for name, field in Settings.model_fields.items() if "float" in str(field.annotation))


def test_the_float_settings_are_found() -> None:
    assert {"max_wait_ms", "max_queue_wait_ms", "dicom_quiet_s", "abstain_max_colourfulness"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_no_float_setting_takes_inf_or_nan(monkeypatch: pytest.MonkeyPatch, field: str, value: str) -> None:
    """BFD_MAX_WAIT_MS=inf and BFD_MAX_QUEUE_WAIT_MS=inf loaded the bundle, then crashed (exit 3)."""
    text = _refused(monkeypatch, {f"BFD_{field.upper()}": value})
    assert field in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BFD_MAX_WAIT_MS", "10001"),
        ("BFD_MAX_QUEUE_WAIT_MS", "600001"),
        ("BFD_UPLOAD_TIMEOUT_S", "3601"),
        ("BFD_HEADER_TIMEOUT_S", "301"),
        ("BFD_KEEP_ALIVE_TIMEOUT_S", "3601"),
        ("BFD_DICOM_RETRY_INITIAL_S", "3601"),
        ("BFD_DICOM_RETRY_MAX_S", "86401"),
    ],
)
def test_durations_have_an_upper_bound(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    text = _refused(monkeypatch, {name: value})
    assert name.removeprefix("BFD_").lower() in text


def test_the_first_retry_is_not_longer_than_the_longest(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _refused(monkeypatch, {"BFD_DICOM_RETRY_INITIAL_S": "600", "BFD_DICOM_RETRY_MAX_S": "300"})
    assert "BFD_DICOM_RETRY_INITIAL_S" in text
    assert "BFD_DICOM_RETRY_MAX_S" in text


# --- AE titles (DICOM PS3.5, VR AE) -------------------------------------------------------------------------

BAD_AE_TITLES = ["   ", "A\\B", "ÄRZTE", "TAB\tX", "ABCDEFGHIJKLMNOPQ"]


@pytest.mark.parametrize("title", BAD_AE_TITLES)
def test_the_nodes_ae_title_follows_the_dicom_standard(monkeypatch: pytest.MonkeyPatch, title: str) -> None:
    """Spaces only, a backslash or non-ASCII passed, loaded the bundle, then crashed in the SCP (exit 3)."""
    text = _refused(monkeypatch, {"BFD_DICOM_AE_TITLE": title})
    assert "BFD_DICOM_AE_TITLE" in text or "dicom_ae_title" in text


@pytest.mark.parametrize("title", BAD_AE_TITLES[1:])  # an all-space entry of a list is dropped as empty
def test_every_allowed_ae_title_follows_the_dicom_standard(monkeypatch: pytest.MonkeyPatch, title: str) -> None:
    text = _refused(monkeypatch, {"BFD_DICOM_ALLOWED_AES": f"ORTHANC,{title}"})
    assert "dicom_allowed_aes" in text
    assert "allowed AE title 2" in text


def test_ae_titles_lose_their_insignificant_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFD_DICOM_AE_TITLE", " BFD-1_X ")
    monkeypatch.setenv("BFD_DICOM_ALLOWED_AES", "ORTHANC, MY PACS ,DCM4CHEE")
    settings = Settings()
    assert settings.dicom_ae_title == "BFD-1_X"
    assert settings.dicom_allowed_aes == ["ORTHANC", "MY PACS", "DCM4CHEE"]


# --- ports and hosts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dicom_host", [None, "127.0.0.1", "0.0.0.0"])
def test_the_dicom_port_is_not_the_http_port(monkeypatch: pytest.MonkeyPatch, dicom_host: str | None) -> None:
    env = {**NODE, "BFD_DICOM_PORT": "8000", "BFD_PORT": "8000"}
    if dicom_host is not None:
        env["BFD_DICOM_HOST"] = dicom_host
    text = _refused(monkeypatch, env)
    assert "BFD_DICOM_PORT" in text
    assert "BFD_PORT" in text


def test_one_port_on_two_addresses_or_any_free_port_is_fine() -> None:
    node = {"dicom_destination": "PACS@127.0.0.1:104"}
    Settings(**node, port=8000, dicom_port=8000, host="127.0.0.1", dicom_host="127.0.0.2")
    Settings(**node, port=0, dicom_port=0)  # 0: the system picks a free port for each


def test_names_of_one_address_on_one_port_are_caught_at_start_up() -> None:
    settings = Settings(dicom_destination="PACS@127.0.0.1:104", port=8000, dicom_port=8000, dicom_host="localhost")
    problems = check_environment(settings, environ={})
    assert any(problem.startswith("BFD_DICOM_PORT:") for problem in problems), problems


@pytest.mark.parametrize(("field", "name"), [("host", "BFD_HOST"), ("dicom_host", "BFD_DICOM_HOST")])
def test_a_bind_address_that_does_not_resolve_is_named(field: str, name: str) -> None:
    """An unresolvable BFD_DICOM_HOST loaded the bundle, then crashed at the SCP's bind (exit 3)."""
    settings = Settings(**NODE_FIELDS, **{field: "no-such-host.invalid"})  # .invalid never resolves (RFC 6761)
    problems = check_environment(settings, environ={})
    assert [p for p in problems if p.startswith(f"{name}:") and "no-such-host.invalid" in p], problems


def test_numeric_addresses_need_no_resolver() -> None:
    # timeout 0: a name would be reported as not resolving in time; a numeric address is answered at once
    assert resolve_bind_address("192.0.2.7", timeout_s=0) == {"192.0.2.7"}
    assert resolve_bind_address("::1", timeout_s=0) == {"::1"}
    assert resolve_bind_address("", timeout_s=0) == {"0.0.0.0", "::"}
    assert "127.0.0.1" in resolve_bind_address("localhost")  # names go through the resolver


def test_good_settings_pass_the_start_up_check(tmp_path: Path) -> None:
    settings = Settings(
        **NODE_FIELDS, dicom_spool_dir=tmp_path / "new" / "spool", dicom_audit_log=tmp_path / "logs" / "audit.jsonl"
    )
    assert check_environment(settings, environ={"BFD_LOG_LEVEL": "debug", "PATH": "/bin"}) == []


# --- concurrency --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "7"])
def test_limit_concurrency_lets_a_client_and_the_probes_in(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """BFD_LIMIT_CONCURRENCY=1 started and answered 503 to everything (uvicorn counts the request's own
    connection against it)."""
    text = _refused(monkeypatch, {"BFD_LIMIT_CONCURRENCY": value})
    assert "limit_concurrency" in text
    assert "greater than or equal to 8" in text


def test_the_lowest_limit_concurrency_serves_a_client_next_to_probes_and_idle_connections(tmp_path: Path) -> None:
    """The floor of 8, on the real server: three idle keep-alive connections open, probes and a prediction
    still answer."""
    from loadtest.servers import bfd_serve

    bundle = build_tiny_bundle(tmp_path / "bundle")
    with bfd_serve(bundle, tmp_path / "serve", env={"BFD_LIMIT_CONCURRENCY": "8"}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server take them
            with httpx.Client(base_url=server.url, timeout=30) as client:
                assert client.get("/healthz").status_code == 200
                assert client.get("/readyz").status_code == 200
                png = encode_png(image_for_part(1)[:40, :40])
                answer = client.post("/v1/predict", files={"file": ("a.png", png, "image/png")})
                assert answer.status_code == 200, answer.text
        finally:
            for connection in idle:
                connection.close()


# --- paths --------------------------------------------------------------------------------------------------


def test_a_spool_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    """BFD_DICOM_SPOOL_DIR naming a file loaded the bundle, then crashed making the folder (exit 3)."""
    a_file = tmp_path / "spool"
    a_file.write_text("not a folder")
    for spool in (a_file, a_file / "below"):
        problems = check_environment(Settings(**NODE_FIELDS, dicom_spool_dir=spool), environ={})
        assert [p for p in problems if p.startswith("BFD_DICOM_SPOOL_DIR:")], problems


def test_an_audit_log_that_is_a_folder_or_under_a_file_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for audit in (tmp_path, a_file / "audit.jsonl"):
        problems = check_environment(Settings(**NODE_FIELDS, dicom_audit_log=audit), environ={})
        assert [p for p in problems if p.startswith("BFD_DICOM_AUDIT_LOG:")], problems


def test_node_paths_are_not_checked_while_the_node_is_off(tmp_path: Path) -> None:
    a_file = tmp_path / "spool"
    a_file.write_text("")
    assert check_environment(Settings(dicom_spool_dir=a_file, dicom_audit_log=tmp_path), environ={}) == []


# --- unknown BFD_* variables --------------------------------------------------------------------------------


def test_a_mistyped_setting_is_named_with_the_nearest_known_one() -> None:
    """BFD_DICOM_QIUET_S=3 was ignored without a word (pydantic-settings reads the fields' names only)."""
    problems = check_environment(Settings(), environ={"BFD_DICOM_QIUET_S": "3", "bfd_max_wiat_ms": "2"})
    assert problems == [
        "BFD_DICOM_QIUET_S: no such setting (did you mean BFD_DICOM_QUIET_S?)",
        "bfd_max_wiat_ms: no such setting (did you mean BFD_MAX_WAIT_MS?)",
    ]


def test_every_setting_and_every_variable_the_project_reads_is_known() -> None:
    environ = {f"BFD_{name.upper()}": "x" for name in Settings.model_fields} | dict.fromkeys(OTHER_BFD_VARIABLES, "1")
    assert check_environment(Settings(), environ=environ) == []


def test_the_allow_list_covers_the_repository() -> None:
    """Every BFD_ name in the project's code and deployment files is a setting or on OTHER_BFD_VARIABLES, so that
    a variable the project reads never stops `bfd serve`."""
    not_variables = {"BFD_RESULT"}  # inference/dicom_objects: a GSPS layer and content label, not a variable
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no list of the project's files: {listed.stderr.strip()}")
    files = listed.stdout.split()
    wanted = re.compile(r"(\.(py|ya?ml|toml|sh)|Makefile|Dockerfile[.\w]*|\.ci/run)$")
    found: dict[str, str] = {}
    for name in files:
        path = REPO / name
        if wanted.search(name) and path.is_file() and path.name != Path(__file__).name:
            for variable in re.findall(r"\bBFD_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
                found.setdefault(variable, name)
    known = known_variables() | not_variables
    unknown = {v: where for v, where in found.items() if v not in known and not SERVICE_LINK.fullmatch(v)}
    assert not unknown, f"add these to service/startup_checks.py OTHER_BFD_VARIABLES (or make them settings): {unknown}"


def test_kubernetes_service_links_are_recognised() -> None:
    problems = check_environment(Settings(), environ={"BFD_SERVICE_HOST": "10.0.0.7", "BFD_PORT_80_TCP_ADDR": "x"})
    assert len(problems) == 2
    assert all("enableServiceLinks: false" in problem for problem in problems)


# --- the new DICOM association limits -----------------------------------------------------------------------


def test_association_limits_reach_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFD_DICOM_MAX_ASSOCIATIONS", "32")
    monkeypatch.setenv("BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER", "4")
    config = Settings(**NODE_FIELDS).node_config()
    assert config is not None
    assert (config.max_associations, config.max_associations_per_peer) == (32, 4)
    monkeypatch.delenv("BFD_DICOM_MAX_ASSOCIATIONS")
    monkeypatch.delenv("BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER")
    defaults = Settings(dicom_destination="PACS@127.0.0.1:104").node_config()
    assert defaults is not None
    assert (defaults.max_associations, defaults.max_associations_per_peer) == (16, 8)


@pytest.mark.parametrize(
    "env",
    [
        {"BFD_DICOM_MAX_ASSOCIATIONS": "0"},
        {"BFD_DICOM_MAX_ASSOCIATIONS": "257"},
        {"BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER": "0"},
        {"BFD_DICOM_MAX_ASSOCIATIONS": "4", "BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER": "5"},
    ],
)
def test_association_limits_are_checked(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    text = _refused(monkeypatch, env)
    assert "dicom_max_associations" in text


# --- the messages -------------------------------------------------------------------------------------------


def test_messages_name_each_setting_on_a_line_and_keep_secrets_and_huge_values_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    huge = "9" * 100_000
    monkeypatch.setenv("BFD_MAX_UPLOAD_BYTES", huge + "x")
    monkeypatch.setenv("BFD_MAX_WAIT_MS", "nan")
    with pytest.raises(ValidationError) as caught:
        Settings(port="tcp://10.0.0.7:80", database_url=["postgresql+asyncpg://user:hunter2@db/bfd"])
    lines = problem_lines(caught.value, flags={"port"})
    assert [line.split(":")[0] for line in lines] == [
        "BFD_MAX_WAIT_MS",
        "BFD_MAX_UPLOAD_BYTES",
        "BFD_DATABASE_URL",
        "BFD_PORT (--port)",
    ]
    assert all(len(line) < 500 for line in lines)
    assert re.search(r"\.\.\. \(1000\d\d characters\)$", lines[1]), lines[1]
    assert "hunter2" not in "\n".join(lines)
    assert "enableServiceLinks: false" in lines[3]


# --- `bfd serve` as a process -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("startup") / "bundle")


def _serve(bundle: Path, folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`bfd serve` with only `env` of BFD_* variables; a server that starts anyway is killed by the timeout."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("BFD_")}
    clean |= {
        "BFD_DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'results.sqlite3'}",
        "BFD_DICOM_AUDIT_LOG": str(folder / "audit.jsonl"),
        "BFD_PORT": "0",
        "PYTHONPATH": str(REPO),  # this checkout's code, run from `folder`
    }
    command = [*BFD, "serve", "--bundle", str(bundle), *args]
    return subprocess.run(command, env=clean | env, cwd=folder, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({**NODE, "BFD_DICOM_AE_TITLE": "A\\B"}, (), "BFD_DICOM_AE_TITLE"),
        ({"BFD_MAX_QUEUE_WAIT_MS": "inf"}, (), "BFD_MAX_QUEUE_WAIT_MS"),
        ({}, ("--max-wait-ms", "inf"), "BFD_MAX_WAIT_MS (--max-wait-ms)"),
        ({"BFD_LIMIT_CONCURRENCY": "1"}, (), "BFD_LIMIT_CONCURRENCY"),
        ({"BFD_DICOM_QIUET_S": "2"}, (), "BFD_DICOM_QIUET_S: no such setting (did you mean BFD_DICOM_QUIET_S?)"),
        ({**NODE, "BFD_DICOM_HOST": "no-such-host.invalid"}, (), "BFD_DICOM_HOST"),
    ],
    ids=["ae-title", "queue-wait-inf", "flag-inf", "limit-concurrency", "typo", "dicom-host"],
)
def test_bfd_serve_stops_with_exit_2_naming_the_setting(
    tiny_bundle: Path, tmp_path: Path, env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    done = _serve(tiny_bundle, tmp_path, env, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert f"invalid setting: {named}" in output, output[-3000:]
    assert "Traceback" not in output


def test_bfd_serve_checks_settings_before_the_bundle(tmp_path: Path) -> None:
    """The settings alone show the problem, so the bundle is not even looked at (this one does not exist)."""
    spool = tmp_path / "spool"
    spool.write_text("a file, not a folder")
    done = _serve(tmp_path / "no-bundle", tmp_path, {**NODE, "BFD_DICOM_SPOOL_DIR": str(spool)})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "invalid setting: BFD_DICOM_SPOOL_DIR" in output
    assert "cannot serve" not in output  # the bundle's refusal
    assert "Traceback" not in output


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    env = {"BFD_MAX_WAIT_MS": "nan", "BFD_INTRA_OP_THREADS": "100000", "BFD_DICOM_QIUET_S": "2"}
    done = _serve(tmp_path / "no-bundle", tmp_path, env)
    lines = [line for line in done.stderr.splitlines() if "invalid setting:" in line]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 3, lines
