"""`bfd serve`'s HTTP server: uvicorn with its limits taken from settings, plus a time limit on headers.

uvicorn bounds concurrency (`limit_concurrency`: more connections get 503 at once) and idle keep-alive
connections, but a client that opens a connection and then sends its headers a byte at a time holds it for
ever. `HeaderTimeoutProtocol` closes such a connection (with a 408) once `header_timeout_s` have passed
since the request began without the headers being complete. Request bodies have their own limits in
`service.uploads`, where the app can give a reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from service.settings import Settings

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 60


def _header_timeout_protocol(header_timeout_s: float) -> type[Any] | None:
    """An httptools protocol class that closes connections whose request headers are late."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's h11 protocol, without the header time limit
        return None

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_late)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            body = f"request headers not complete within {header_timeout_s:g} s".encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()  # a connection that never sends a byte is timed too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._disarm_header_timer()  # from here the keep-alive timeout applies until the next request
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app: Any, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The server's configuration: bind address, limits and time-outs all from `settings`."""
    protocol = _header_timeout_protocol(settings.header_timeout_s)
    if protocol is None:
        log.warning("httptools is not installed: request headers have no time limit (uvicorn's h11 protocol)")
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        http=protocol or "h11",
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def serve(app: Any, settings: Settings, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM (uvicorn drains in-flight requests for up to GRACEFUL_SHUTDOWN_S)."""
    uvicorn.Server(uvicorn_config(app, settings, log_level)).run()
