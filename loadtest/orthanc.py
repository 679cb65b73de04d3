"""A throwaway Orthanc PACS for tests: generated configuration in a temporary folder, loopback, free ports.

`OrthancServer` writes its JSON configuration (storage and index in its folder, no authentication, remote
access refused, any AE may store, the DICOMweb plugin at /dicom-web/), starts Debian's `Orthanc`, waits for
`GET /system` and offers the REST calls tests need. `stop()` then `start()` brings the same Orthanc back
(same storage, ports and configuration, including modalities and DICOMweb servers added at runtime), so a
test can take the PACS away while results are pending. When Orthanc or its DICOMweb plugin is not installed
the caller skips loudly, or fails when BFD_REQUIRE_ORTHANC=1 (see tests/orthanc_fixtures.py).

Orthanc 1.10 binds its DICOM port on every interface (it has no bind-address option); HTTP answers loopback
clients only (`RemoteAccessAllowed: false`) and modalities are the only peers it sends to.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil
import pydicom

from loadtest.servers import free_port

# Where Debian (and a local build) put the DICOMweb plugin; BFD_ORTHANC_DICOMWEB_PLUGIN overrides.
_PLUGIN_PATTERNS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*-linux-gnu/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/local/lib/orthanc/libOrthancDicomWeb.so*",
)
_STOP_TIMEOUT_S = 15.0

Modality = Sequence[str | int] | Mapping[str, Any]  # ["AET", "host", port] or {"AET": ..., "Host": ..., ...}
DicomWebServer = str | Sequence[str] | Mapping[str, Any]  # "http://..." or ["http://..."] or {"Url": ...}


class OrthancUnavailable(RuntimeError):
    """No Orthanc can be started here; the message says why."""


def find_orthanc() -> Path:
    """The Orthanc executable (BFD_ORTHANC_BINARY, then PATH, then /usr/sbin, /usr/local/sbin)."""
    override = os.environ.get("BFD_ORTHANC_BINARY")
    if override:
        if Path(override).is_file() and os.access(override, os.X_OK):
            return Path(override)
        raise OrthancUnavailable(f"BFD_ORTHANC_BINARY={override} is not an executable file")
    for candidate in (shutil.which("Orthanc"), "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise OrthancUnavailable("no Orthanc executable found (install Debian's 'orthanc' package)")


def find_dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library (BFD_ORTHANC_DICOMWEB_PLUGIN, then Debian's plugin folders)."""
    override = os.environ.get("BFD_ORTHANC_DICOMWEB_PLUGIN")
    if override:
        if Path(override).is_file():
            return Path(override)
        raise OrthancUnavailable(f"BFD_ORTHANC_DICOMWEB_PLUGIN={override} is not a file")
    for pattern in _PLUGIN_PATTERNS:
        for candidate in sorted(glob.glob(pattern)):
            if Path(candidate).is_file():
                return Path(candidate)
    searched = ", ".join(_PLUGIN_PATTERNS)
    raise OrthancUnavailable(f"no libOrthancDicomWeb.so in {searched} (install Debian's 'orthanc-dicomweb')")


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else the reason they cannot run."""
    try:
        find_orthanc()
        find_dicomweb_plugin()
    except OrthancUnavailable as error:
        return str(error)
    return None


class OrthancServer:
    """One Orthanc process and its folder; a context manager (enter starts it, exit kills it and cleans up)."""

    def __init__(
        self,
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        dicomweb_servers: Mapping[str, DicomWebServer] | None = None,
        root: Path | None = None,
        overwrite_instances: bool = False,
        stable_age_s: int = 1,
        startup_timeout_s: float = 30.0,
        extra_config: Mapping[str, Any] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.modalities: dict[str, Modality] = dict(modalities or {})
        self.dicomweb_servers: dict[str, DicomWebServer] = dict(dicomweb_servers or {})
        self.overwrite_instances = overwrite_instances
        self.stable_age_s = stable_age_s
        self.startup_timeout_s = startup_timeout_s
        self.extra_config = dict(extra_config or {})
        self.environment = dict(environment or {})  # added to Orthanc's environment (e.g. DCMTK's TCP_NODELAY=1)
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="bfd-orthanc-")) if root is None else root
        self.http_port: int | None = None
        self._dicom_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: io.BufferedWriter | None = None
        self._client: httpx.Client | None = None

    # --- addresses -------------------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._require(self.http_port)}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def dicom_port(self) -> int:
        return self._require(self._dicom_port)

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def process(self) -> psutil.Process:
        """The running Orthanc process (psutil), e.g. to read its CPU time."""
        if self._process is None:
            raise RuntimeError("Orthanc is not running (call start())")
        return psutil.Process(self._process.pid)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _require(self, port: int | None) -> int:
        if port is None:
            raise RuntimeError("Orthanc has not been started yet: its ports are chosen at the first start()")
        return port

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-max_chars:].decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"

    # --- life cycle ------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc runs with (written to config_path at each start)."""
        return {
            "Name": f"bfd-test-{self.ae_title}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self._require(self.http_port),
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "DicomModalitiesInDatabase": False,  # modalities live here; runtime changes are mirrored below
            "DicomModalities": self.modalities,
            "OverwriteInstances": self.overwrite_instances,
            "StableAge": self.stable_age_s,
            "SaveJobs": False,  # a restart must not replay the previous run's jobs
            "HttpTimeout": 10,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
            "HttpDescribeErrors": True,
            "OrthancExplorerEnabled": False,
            "Plugins": [str(find_dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": self.dicomweb_servers},
            **self.extra_config,
        }

    def start(self) -> None:
        """Start Orthanc (ports chosen at the first start, kept after) and wait until GET /system answers."""
        if self.running:
            return
        executable = find_orthanc()
        if self.http_port is None:
            self.http_port, self._dicom_port = free_port(), free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(executable), str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, **self.environment},
        )
        self._client = httpx.Client(base_url=self.http_url, timeout=30.0)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self._process is not None
            assert self._client is not None
            if self._process.poll() is not None:
                raise OrthancUnavailable(
                    f"Orthanc exited with status {self._process.returncode} at start-up; log:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get("/system").status_code == 200 and _port_open(self.dicom_port):
                    return
            if time.monotonic() > deadline:
                raise OrthancUnavailable(
                    f"Orthanc did not answer GET /system within {self.startup_timeout_s:.0f} s; log:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop Orthanc gracefully (SIGTERM, killed after 15 s); storage, ports and configuration are kept."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=_STOP_TIMEOUT_S)
        self._release()

    def kill(self) -> None:
        """Kill Orthanc at once (SIGKILL) if it runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=_STOP_TIMEOUT_S)
        self._release()

    def _release(self) -> None:
        self._process = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> OrthancServer:
        try:
            self.start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- REST helpers ----------------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("Orthanc is not running (call start())")
        return self._client

    def _json(self, method: str, path: str, body: Any = None, *, content: bytes | None = None) -> Any:
        if content is not None:
            response = self.client.request(method, path, content=content)
        elif body is not None:
            response = self.client.request(method, path, json=body)
        else:
            response = self.client.request(method, path)
        if response.status_code >= 400:
            raise OrthancError(f"{method} {path} answered {response.status_code}: {response.text[:1000]}")
        return response.json() if response.content else None

    def set_modality(self, name: str, ae_title: str, host: str, port: int, **options: Any) -> None:
        """Add or change a DICOM modality now (PUT /modalities/{name}) and for every later start."""
        body = {"AET": ae_title, "Host": host, "Port": port, **options}
        self._json("PUT", f"/modalities/{name}", body)
        self.modalities[name] = body

    def set_dicomweb_server(self, name: str, url: str, **options: Any) -> None:
        """Add or change a DICOMweb server now (PUT /dicom-web/servers/{name}) and for every later start."""
        body = {"Url": url, **options}
        self._json("PUT", f"/dicom-web/servers/{name}", body)
        self.dicomweb_servers[name] = body

    def upload(self, part10: bytes) -> str:
        """POST /instances; the instance's Orthanc id (also when Orthanc already had it: Status AlreadyStored)."""
        answer = self._json("POST", "/instances", content=part10)
        return str(answer["ID"])

    def store_to_modality(self, modality: str, resource_ids: Iterable[str], synchronous: bool = True) -> dict[str, Any]:
        """C-STORE resources (any level) to a modality: POST /modalities/{modality}/store."""
        body = {"Resources": list(resource_ids), "Synchronous": synchronous}
        return dict(self._json("POST", f"/modalities/{modality}/store", body) or {})

    def job(self, job_id: str) -> dict[str, Any]:
        """An asynchronous job's state (GET /jobs/{id}): "State" is Pending, Running, Success, Failure, ..."""
        return dict(self._json("GET", f"/jobs/{job_id}"))

    def stow_to_server(self, server: str, resource_ids: Iterable[str]) -> dict[str, Any]:
        """STOW-RS resources to a DICOMweb server: POST /dicom-web/servers/{server}/stow (synchronous)."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        return dict(self._json("POST", f"/dicom-web/servers/{server}/stow", body) or {})

    def studies(self) -> list[str]:
        """Orthanc ids of every study (GET /studies)."""
        return [str(study) for study in self._json("GET", "/studies")]

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc id of the study with this Study Instance UID, or None (POST /tools/find)."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}}
        found = self._json("POST", "/tools/find", query)
        return str(found[0]) if found else None

    def instance_ids(self, study_instance_uid: str) -> list[str]:
        """Orthanc ids of the study's instances (none when the study is not there)."""
        study = self.find_study(study_instance_uid)
        if study is None:
            return []
        return [str(instance["ID"]) for instance in self._json("GET", f"/studies/{study}/instances")]

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file, byte for byte as Orthanc keeps it (GET /instances/{id}/file)."""
        response = self.client.get(f"/instances/{instance_id}/file")
        if response.status_code != 200:
            raise OrthancError(f"GET /instances/{instance_id}/file answered {response.status_code}")
        return response.content

    def study_instances(self, study_instance_uid: str) -> list[pydicom.Dataset]:
        """Every instance of the study as stored, parsed by pydicom (elements stay raw until read)."""
        files = [self.instance_file(instance) for instance in self.instance_ids(study_instance_uid)]
        return [pydicom.dcmread(io.BytesIO(data)) for data in files]

    def instance_count(self) -> int:
        """How many instances Orthanc holds (GET /statistics)."""
        return int(self._json("GET", "/statistics")["CountInstances"])

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self._json("GET", "/patients"):
            self._json("DELETE", f"/patients/{patient}")


class OrthancError(RuntimeError):
    """Orthanc answered a REST call with an error; the message has its status and body."""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
