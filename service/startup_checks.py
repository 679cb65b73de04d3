"""The start-up check: what `Settings` alone cannot show, run by `bfd serve` before the bundle loads.

`Settings` (service/settings.py) validates each value at construction; this module owns what depends on the
machine and the environment it starts in: `BFD_*` names nobody reads (a typo, a Kubernetes service link), named
with the nearest known one; bind addresses that must resolve (and two listeners on one address); the DICOM
node's spool folder and audit log, of the right kind and writable. And `problem_lines`, the one format for what
either finds: a line per problem naming the environment variable, values cut short, secrets never echoed.
Kept out of construction: tests build Settings many times, and a name's resolution or a folder's existence
belongs to the machine the service starts on, not to the settings.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

from pydantic import ValidationError

from service.settings import ENV_PREFIX, Settings, env_name

# BFD_ variables that are not settings but that the project itself reads, so that `bfd serve` run from a shell, a CI
# job or a compose file that sets them is not refused as mistyped. The one list of them: keep it in step with
# `grep -rn "BFD_" --include=*.py --include=*.yml --include=run .` when a new one is read.
OTHER_BFD_VARIABLES = frozenset(
    {
        "BFD_LOG_LEVEL",  # bfd/cli.py: --log-level's default
        "BFD_CACHE_DIR",  # training/features.py: the feature cache
        "BFD_REQUIRE_POSTGRES",  # tests (CI sets these, .ci/run): fail where the real thing cannot run, not skip
        "BFD_REQUIRE_BROWSER",
        "BFD_REQUIRE_DISPLAY",
        "BFD_REQUIRE_ORTHANC",
        "BFD_REQUIRE_DICOM3TOOLS",  # tests/test_dicom_validation.py: dciodvfy must run
        "BFD_REQUIRE_CONTAINER",  # tests/podman_fixtures.py: the image and Compose tests must run
        "BFD_REQUIRE_HAPROXY",  # tests/test_replicas.py: replicas behind HAProxy must run
        "BFD_BUILD_CONTEXT",  # deploy/podman/build.sh: another build context (tests/podman_fixtures.py)
        "BFD_ORTHANC_BINARY",  # loadtest/orthanc.py
        "BFD_ORTHANC_DICOMWEB_PLUGIN",
        "BFD_CHROMIUM",  # tests/test_web_ui.py
        "BFD_LOAD_IMAGES",  # loadtest/locustfile.py
        "BFD_LOAD_WAIT_S",
        "BFD_BUNDLE_DIR",  # docker-compose.yml: substituted on the host, often exported in the same shell
        "BFD_DICOM_TLS_DIR",
        "BFD_PUBLISH_PORT",  # docker-compose.yml: the host port the service is published on
        "BFD_POSTGRES_IMAGE",  # docker-compose.yml: the PostgreSQL image (a stand-in where Docker Hub is out of reach)
    }
)

# A name that does not answer within this is reported as not resolving (a resolver can take minutes to give up).
RESOLVE_TIMEOUT_S = 5.0
# Values echoed in messages are cut to this many characters, whole messages to MAX_MESSAGE_CHARS: a setting can
# hold megabytes, and some validators quote what they got.
MAX_ECHOED_CHARS = 60
MAX_MESSAGE_CHARS = 400
# What Kubernetes puts in every pod of a namespace for each of its Services (service links): for the Services `bfd`
# and `bfd-dicom` these are BFD_SERVICE_HOST, BFD_PORT=tcp://10.0.0.7:80, BFD_DICOM_PORT_11112_TCP_ADDR, ...
SERVICE_LINK = re.compile(
    r"BFD(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"
)
SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", flags=re.IGNORECASE)
SERVICE_LINK_HINT = "a Kubernetes service link? set enableServiceLinks: false in the pod spec"
# Values never echoed: they hold a key or credentials (a database URL, a DICOMweb URL with user:password).
SECRET_SETTINGS = frozenset({"api_key", "database_url", "dicom_destination"})


def check_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """What the settings alone cannot show, one line per problem (empty: none); `bfd serve` runs it first.

    Mistyped `BFD_*` names in `environ` (default: the process's), bind addresses that do not resolve, and
    the DICOM node's paths (only while the node is on).
    """
    problems = unknown_variables(os.environ if environ is None else environ)
    addresses: dict[str, frozenset[str]] = {}
    node = settings.node_config()
    hosts = {"host": settings.host}
    if node is not None and node.port is not None and settings.dicom_host is not None:
        hosts["dicom_host"] = settings.dicom_host
    for name, host in hosts.items():
        try:
            addresses[name] = resolve_bind_address(host)
        except ValueError as error:
            problems.append(f"{env_name(name)}: {error}")
    both = {"host", "dicom_host"} <= addresses.keys()
    if (
        both
        and settings.port != 0
        and settings.dicom_port == settings.port
        and addresses["host"] & addresses["dicom_host"]
    ):
        problems.append(
            f"BFD_DICOM_PORT: {settings.dicom_port} is BFD_PORT too, and BFD_HOST={settings.host!r} and "
            f"BFD_DICOM_HOST={settings.dicom_host!r} resolve to the same address: give the DICOM node a port "
            "of its own"
        )
    if node is not None:
        if node.spool_dir is not None and (problem := _folder_problem(node.spool_dir)):
            problems.append(f"BFD_DICOM_SPOOL_DIR: {problem}")
        if problem := _file_problem(node.audit_log):
            problems.append(f"BFD_DICOM_AUDIT_LOG: {problem}")
    return problems


def known_variables() -> frozenset[str]:
    """Every `BFD_*` name the project reads: the settings' and `OTHER_BFD_VARIABLES`."""
    return frozenset(env_name(field) for field in Settings.model_fields) | OTHER_BFD_VARIABLES


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line per `BFD_*` name nobody reads, with the nearest known one: a typo would otherwise be ignored."""
    known = known_variables()
    problems = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads names in any case
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        nearest = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        if SERVICE_LINK.fullmatch(upper):
            hint = SERVICE_LINK_HINT
        elif nearest:
            hint = f"did you mean {nearest[0]}?"
        else:
            hint = "README 'The service' lists the settings"
        problems.append(f"{_shorten(name)}: no such setting ({hint})")
    return problems


def problem_lines(error: ValidationError, flags: Collection[str] = ()) -> list[str]:
    """A line per problem naming the setting by its environment name (and its flag where one of `flags` gave it),
    with what came, cut short; never the value of a secret."""
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        if not item["loc"]:  # a rule across settings: its message names them
            lines.append(_shorten(message, MAX_MESSAGE_CHARS))
            continue
        field = str(item["loc"][0])
        where = env_name(field)
        if field in flags:
            where += f" (--{field.replace('_', '-')})"
        value = item["input"]
        got = "" if field in SECRET_SETTINGS or re.search(r"\bgot\b", message) else f", got {_shorten(repr(value))}"
        if isinstance(value, str) and SERVICE_LINK_VALUE.match(value):
            got += f" ({SERVICE_LINK_HINT})"
        lines.append(_shorten(f"{where}: {message}{got}", MAX_MESSAGE_CHARS))
    return lines


def resolve_bind_address(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> frozenset[str]:
    """The addresses a bind to `host` would use; ValueError when it does not resolve within `timeout_s`.

    A numeric address answers at once; '' is every interface (as uvicorn binds it).
    """
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    if not host:
        return frozenset({"0.0.0.0", "::"})
    outcome: list[frozenset[str] | str] = []  # the addresses, or why there are none

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            outcome.append(frozenset(str(info[4][0]) for info in infos))
        except (OSError, UnicodeError) as error:
            outcome.append(str(error))

    # A daemon thread: a resolver that never answers must not keep the process from exiting.
    thread = threading.Thread(target=lookup, name="resolve-bind-address", daemon=True)
    thread.start()
    thread.join(timeout_s)
    expected = "expected a resolvable host name or an IP address"
    if not outcome:
        raise ValueError(f"{expected}, {_shorten(repr(host))} did not resolve within {timeout_s:g} s")
    if isinstance(outcome[0], str):
        raise ValueError(f"{expected}, got {_shorten(repr(host))} ({outcome[0]})")
    return outcome[0]


def _nearest_existing(path: Path) -> Path:
    """`path` or the nearest of its parents that exists (what a mkdir of it would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be used (created with its parents where missing, then written), or None."""
    existing = _nearest_existing(folder)
    if existing == folder.absolute():
        if not existing.is_dir():
            return f"expected a folder (or a path where one can be made), got a file: {_shorten(str(folder))}"
    elif not existing.is_dir():
        return f"expected a folder that can be made, but {_shorten(str(existing))} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"expected a folder this user can write to, {_shorten(str(existing))} is not writable"
    return None


def _file_problem(file: Path) -> str | None:
    """Why a file cannot be appended to at `file` (its folder made where missing), or None."""
    if file.is_dir():
        return f"expected a file, got a folder: {_shorten(str(file))}"
    if file.exists():
        return None if os.access(file, os.W_OK) else f"expected a writable file, {_shorten(str(file))} is not"
    return _folder_problem(file.absolute().parent)


def _shorten(text: str, limit: int = MAX_ECHOED_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
