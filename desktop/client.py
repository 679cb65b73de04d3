"""How the desktop gets an answer: over HTTP from a running server, or from the core run in-process.

Over HTTP it sends POST /v1/predict (multipart field `file`, `?heatmap=true`); in-process it calls the core's
Predictor directly (`inference.runner`), without a web server. Both return the one ImagePrediction JSON object
(`inference.results`), so the window cannot tell them apart. A refusal (the server's 4xx/5xx, or the core's
error in-process, with no HTTP status) becomes a `ClientError` carrying the reason, for the window to show.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import httpx

from clients.http import reason_of
from inference.batching import BatcherClosedError, QueueFullError
from inference.config import PredictorConfig
from inference.errors import InferenceError
from inference.runner import LocalPredictor

PREDICT_PATH = "/v1/predict"
DICOM = "application/dicom"
_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
}


class ClientError(Exception):
    """The answer could not be had; `detail` is the reason to show (the server's own when it gave one)."""

    def __init__(self, detail: str, status: int = 0, kind: str | None = None) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.detail = detail
        self.status = status  # 0: no HTTP answer at all (in-process, unreadable file, server unreachable)
        self.kind = kind  # in-process: what the core refused it as, e.g. "undecodable image"


@runtime_checkable
class PredictionClient(Protocol):
    """Anything that turns one image file into the service's ImagePrediction JSON."""

    def predict(self, path: Path, heatmap: bool = True) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _kind(error: BaseException) -> str:
    """The core's error class in words: UndecodableImageError -> "undecodable image"."""
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", type(error).__name__.removesuffix("Error")).lower()
    return words or "error"


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


class InProcessClient:
    """The core's Predictor run in this process on `bundle` (`inference.runner.LocalPredictor`): no server."""

    def __init__(self, bundle: Path, config: PredictorConfig | None = None) -> None:
        self.bundle = Path(bundle)
        self._lock = threading.Lock()
        self._predictor = LocalPredictor(self.bundle, config)

    def predict(self, path: Path, heatmap: bool = True) -> dict[str, Any]:
        path = Path(path)
        data = _read(path)
        with self._lock:
            try:
                answer = self._predictor.predict(data, path.name, heatmap=heatmap, dicom=media_type(path) == DICOM)
            except (InferenceError, QueueFullError, BatcherClosedError) as error:
                raise ClientError(getattr(error, "reason", str(error)), kind=_kind(error)) from error
        return answer.model_dump(mode="json")

    def close(self) -> None:
        self._predictor.close()

    @property
    def closed(self) -> bool:
        return self._predictor.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InProcessClient({str(self.bundle)!r})"
