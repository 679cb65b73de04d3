"""Domain errors and their ONE mapping to HTTP: every error answer is JSON with a reason, never a bare 5xx."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batching import BatcherClosedError, QueueFullError
from service.preprocessing import ImageError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a human reason."""

    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.headers = headers or {}


class InferenceFailedError(ServiceError):
    def __init__(self, reason: str) -> None:
        super().__init__(500, "inference_failed", f"inference failed for this batch: {reason}")


class _SheddingLog:
    """Logs load shedding (503 overloaded / shutting down) once per interval with a count, not once per request.

    Under 2x overload the service refuses thousands of requests a minute by design; a line each would drown
    the log that operators read, and /metrics already counts every one of them.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._last = -math.inf
        self._suppressed = 0

    def record(self, code: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._suppressed += 1
            return
        extra = f" (and {self._suppressed} more refused since the last line)" if self._suppressed else ""
        log.warning("refusing requests with 503 %s: %s%s", code, reason, extra)
        self._last, self._suppressed = now, 0


_SHEDDING_CODES = frozenset({"overloaded", "shutting_down", "store_unavailable"})

_IMAGE_CODES = {413: "image_too_large", 415: "unsupported_media_type", 422: "undecodable_image"}


def from_image_error(error: ImageError, image_name: str | None = None) -> ServiceError:
    """Map a preprocessing error (its `status` says which 4xx) to a ServiceError naming the image."""
    prefix = f"{image_name}: " if image_name else ""
    status = error.status if error.status in _IMAGE_CODES else 422
    return ServiceError(status, _IMAGE_CODES[status], prefix + error.reason)


def queue_full(error: QueueFullError) -> ServiceError:
    retry_after = max(1, math.ceil(error.retry_after_s))
    return ServiceError(503, "overloaded", f"server busy: {error}", headers={"Retry-After": str(retry_after)})


def error_body(status: int, code: str, reason: str) -> dict[str, object]:
    return {"detail": reason, "code": code, "status": status}


def reason_of(response: Any) -> str:
    """The reason in an error answer (an httpx response): `error_body`'s detail, else the body as text.

    For clients of the service (`bfd predict --url`, the desktop): something other than the service may
    answer too (a proxy's HTML 502), and its text is then the best reason there is.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)
    return str(response.text).strip()[:500] or response.reason_phrase or f"HTTP {response.status_code}"


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on the app."""
    shedding = _SheddingLog()

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        if error.code in _SHEDDING_CODES:
            shedding.record(error.code, error.reason)
        elif error.status >= 500:
            log.error("%s %s -> %d %s", request.method, request.url.path, error.status, error.reason)
        return JSONResponse(error_body(error.status, error.code, error.reason), error.status, error.headers)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, error: QueueFullError) -> JSONResponse:
        return await _service_error(request, queue_full(error))

    @app.exception_handler(BatcherClosedError)
    async def _closed(request: Request, error: BatcherClosedError) -> JSONResponse:
        mapped = ServiceError(503, "shutting_down", "server is shutting down", {"Retry-After": "1"})
        return await _service_error(request, mapped)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in error.errors()
        )
        return JSONResponse(error_body(422, "invalid_request", reasons or "invalid request"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(error.status_code, code, str(error.detail)), error.status_code, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        reason = f"internal error ({type(error).__name__}); the service keeps serving"
        return JSONResponse(error_body(500, "internal_error", reason), 500)
