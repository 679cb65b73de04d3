"""How the desktop gets an answer: over HTTP from a running server, or from the real service run in-process.

Both send the same request (POST /v1/predict, multipart field `file`, `?heatmap=true`) and return the one
ImagePrediction JSON object (see service/schemas.py), so the window cannot tell them apart. A refusal of the
server (4xx/5xx) becomes a `ClientError` carrying the server's own `detail`, for the window to show.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import httpx

from service.errors import reason_of

PREDICT_PATH = "/v1/predict"
_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
}


class ClientError(Exception):
    """The answer could not be had; `detail` is the reason to show (the server's own when it gave one)."""

    def __init__(self, detail: str, status: int = 0) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.detail = detail
        self.status = status  # 0: no HTTP answer at all (unreadable file, server unreachable)


@runtime_checkable
class PredictionClient(Protocol):
    """Anything that turns one image file into the service's ImagePrediction JSON."""

    def predict(self, path: Path, heatmap: bool = True) -> dict[str, Any]: ...

    def close(self) -> None: ...


def media_type(path: Path) -> str:
    """The part's content type by suffix; the server sniffs DICOM by its magic bytes anyway."""
    return _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror or error}") from error


def _post(client: httpx.Client, path: Path, heatmap: bool) -> dict[str, Any]:
    """The one request both clients make, and the one way its answer is read."""
    data = _read(path)
    params = {"heatmap": "true"} if heatmap else {}
    try:
        response = client.post(PREDICT_PATH, files={"file": (path.name, data, media_type(path))}, params=params)
    except httpx.HTTPError as error:
        raise ClientError(f"no answer from {client.base_url}: {error}") from error
    if response.status_code >= 400:
        raise ClientError(reason_of(response), response.status_code)
    try:
        predictions = response.json()["predictions"]
        prediction: dict[str, Any] = predictions[0]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ClientError(
            f"unexpected answer from the server: {response.text[:200]!r}", response.status_code
        ) from error
    return prediction


class _OneRequestAtATime:
    """What both clients share: one httpx-style client, used by one request at a time, closed on exit."""

    _client: httpx.Client

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def predict(self, path: Path, heatmap: bool = True) -> dict[str, Any]:
        with self._lock:
            return _post(self._client, Path(path), heatmap)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpClient(_OneRequestAtATime):
    """A running `bfd serve` (or any deployment of the service) at `url`."""

    def __init__(self, url: str, *, timeout_s: float = 120.0, api_key: str | None = None) -> None:
        super().__init__()
        headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"HttpClient({self.url!r})"


class InProcessClient(_OneRequestAtATime):
    """The real service (create_app, its lifespan, batcher and routes) run in this process on `bundle`.

    The app's lifespan opens a results store; /v1/predict never writes to it, so unless the caller or
    BFD_DATABASE_URL names one, it is a throwaway SQLite file removed on `close()` rather than a file
    left in the working directory.
    """

    def __init__(self, bundle: Path, **settings: Any) -> None:
        import os

        from fastapi.testclient import TestClient

        from service.main import create_app
        from service.settings import Settings

        super().__init__()
        self.bundle = Path(bundle)
        self._scratch: str | None = None
        if "database_url" not in settings and not os.environ.get("BFD_DATABASE_URL"):
            self._scratch = tempfile.mkdtemp(prefix="bfd-desktop-")
            settings["database_url"] = f"sqlite+aiosqlite:///{self._scratch}/results.sqlite3"
        self._closed = False
        resolved = Settings(bundle=self.bundle, **settings)
        # A BFD_API_KEY in the environment guards this app too: send it, as a remote client would.
        key = resolved.api_key.get_secret_value() if resolved.api_key else None
        self._client = TestClient(
            create_app(resolved), raise_server_exceptions=False, headers={"X-API-Key": key} if key else None
        )
        try:
            self._client.__enter__()  # runs the lifespan: the bundle is loaded and warmed up here
        except BaseException:
            self._remove_scratch()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.__exit__(None, None, None)
        finally:
            self._remove_scratch()

    @property
    def closed(self) -> bool:
        return self._closed

    def _remove_scratch(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __repr__(self) -> str:
        return f"InProcessClient({str(self.bundle)!r})"
