"""The ONE mapping from the core's domain errors to HTTP: every error answer is JSON with a reason, never a bare 5xx.

`http_error()` turns any error the core raises into a `ServiceError` (status, stable code, reason, headers);
the HTTP routes raise ServiceError themselves only for what is HTTP's own (media types, bodies, API keys).
What a client sent is echoed in a reason at most `QUOTED_CHARS` long (`inference.errors.shortened`, as the
core's own reasons quote it), and no reason is longer than `MAX_REASON_CHARS`: a 900 KB body part once came
back in a 900 KB 422.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from inference.batching import BatcherClosedError, QueueFullError
from inference.errors import (
    QUOTED_CHARS,
    DicomOutputError,
    ImageError,
    ImageTooLargeError,
    InferenceError,
    InferenceFailedError,
    UnknownBodyPartError,
    UnsupportedImageFormatError,
    forget_traceback,
    shortened,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 2_000  # a whole reason, whatever it quotes (the core's messages, validation errors)


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a human reason."""

    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        reason = shortened(reason, MAX_REASON_CHARS)
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.headers = headers or {}


# Most specific first: the first class an error is an instance of decides.
_DOMAIN: tuple[tuple[type[Exception], int, str], ...] = (
    (ImageTooLargeError, 413, "image_too_large"),
    (UnsupportedImageFormatError, 415, "unsupported_media_type"),
    (ImageError, 422, "undecodable_image"),
    (UnknownBodyPartError, 422, "unknown_body_part"),
    (DicomOutputError, 422, "dicom_output_needs_dicom"),
    (InferenceFailedError, 500, "inference_failed"),
)
DOMAIN_ERRORS = (InferenceError, QueueFullError, BatcherClosedError)


def http_error(error: Exception) -> ServiceError:
    """The HTTP answer for an error of the core (a ServiceError passes through unchanged)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, QueueFullError):
        retry_after = max(1, math.ceil(error.retry_after_s))
        return ServiceError(503, "overloaded", f"server busy: {error}", headers={"Retry-After": str(retry_after)})
    if isinstance(error, BatcherClosedError):
        return ServiceError(503, "shutting_down", "server is shutting down", {"Retry-After": "1"})
    for kind, status, code in _DOMAIN:
        if isinstance(error, kind):
            return ServiceError(status, code, getattr(error, "reason", str(error)))
    return ServiceError(500, "internal_error", f"internal error ({type(error).__name__}); the service keeps serving")


def http_status(error: Exception) -> int:
    """The HTTP status `http_error` gives `error` (for callers that report only the number)."""
    return http_error(error).status


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


def error_body(status: int, code: str, reason: str) -> dict[str, object]:
    return {"detail": shortened(reason, MAX_REASON_CHARS), "code": code, "status": status}


def validation_reasons(errors: Sequence[Mapping[str, Any]], where: str = "") -> str:
    """pydantic's errors as `loc: msg; ...`, every part shortened (a location may be a key the client chose).

    The `input` of each error (the value the client sent, of any size) is never quoted; a message is pydantic's
    own words but for a validator's, which may quote the input.
    """
    return "; ".join(
        f"{shortened('.'.join(str(p) for p in e.get('loc', ())) or where)}: "
        f"{shortened(str(e.get('msg', 'invalid')), 3 * QUOTED_CHARS)}"
        for e in errors
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on the app."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    shedding = _SheddingLog()

    def respond(request: Request, error: ServiceError) -> JSONResponse:
        if error.code in _SHEDDING_CODES:
            shedding.record(error.code, error.reason)
        elif error.status >= 500:
            log.error("%s %s -> %d %s", request.method, request.url.path, error.status, error.reason)
        return JSONResponse(error_body(error.status, error.code, error.reason), error.status, error.headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return respond(request, error)

    for kind in DOMAIN_ERRORS:

        @app.exception_handler(kind)
        async def _domain_error(request: Request, error: Exception) -> JSONResponse:
            # its traceback held the request's frames (body, upload, parsed image) in a cycle until the next
            # collection of the oldest generation: a refused 30 MB upload stayed in memory that long
            forget_traceback(error)
            return respond(request, http_error(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        reasons = validation_reasons(error.errors())
        return JSONResponse(error_body(422, "invalid_request", reasons or "invalid request"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(error.status_code, code, str(error.detail)), error.status_code, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return respond(request, http_error(error))
