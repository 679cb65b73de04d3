"""`bfd serve`'s HTTP server: uvicorn with its limits taken from settings, plus a time and a size limit on headers.

uvicorn bounds concurrency (`limit_concurrency`: more connections get 503 at once) and idle keep-alive
connections, but a client that opens a connection and then sends its headers a byte at a time holds it for
ever, and httptools keeps whatever request line and headers it is sent, however large (eight slow
connections with large headers once took 250 MB before their time was up). `HeaderLimitsProtocol` closes
such a connection with a 408 once `header_timeout_s` have passed since the request began without the
headers being complete, or with a 431 as soon as the request line and headers pass `max_header_bytes`,
counted as the bytes arrive, before the parser keeps them. Request bodies have their own limits in
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
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; browsers and proxies send a few KiB, nginx allows 32
H11_MAX_INCOMPLETE_EVENT_BYTES = MAX_HEADER_BYTES  # the same bound where uvicorn falls back to h11


def _header_limits_protocol(header_timeout_s: float, max_header_bytes: int) -> type[Any] | None:
    """An httptools protocol class that closes connections whose request headers are late or too large."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's h11 protocol, without the header time limit
        return None

    class HeaderLimitsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        # bytes of the request line and headers received so far; None once they are complete (a body, or idle)
        _header_bytes: int | None = 0

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_late)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_late(self) -> None:
            self._header_timer = None
            self._refuse(b"408 Request Timeout", f"request headers not complete within {header_timeout_s:g} s")

        def _refuse(self, status: bytes, reason: str) -> None:
            """Answer `status` with `reason` and close: the request's headers never reach the app."""
            self._disarm_header_timer()
            if self.transport.is_closing():
                return
            body = reason.encode()
            self.transport.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            # While headers arrive, the parser is fed no more than the bytes left under the limit: headers
            # complete within them go on (with the rest of `data`: a body, the next request); others get 431.
            while data and self._header_bytes is not None:
                room = max_header_bytes - self._header_bytes
                head, data = data[:room], data[room:]
                self._header_bytes += len(head)
                super().data_received(head)
                if self.transport.is_closing():
                    return
                if self._header_bytes is not None and self._header_bytes >= max_header_bytes:
                    self._refuse(
                        b"431 Request Header Fields Too Large",
                        f"request line and headers over {max_header_bytes:,} bytes",
                    )
                    return
            if data:  # a body (and perhaps the start of the next request, counted from the next call on)
                super().data_received(data)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_bytes = 0
            self._arm_header_timer()  # a connection that never sends a byte is timed too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_bytes is None:  # else counted since connection_made or the last request's end
                self._header_bytes = 0
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            self._header_bytes = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._header_bytes = 0  # what comes next is the next request's request line
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._disarm_header_timer()  # from here the keep-alive timeout applies until the next request
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

    return HeaderLimitsProtocol


def uvicorn_config(app: Any, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The server's configuration: bind address, limits and time-outs all from `settings`."""
    protocol = _header_limits_protocol(settings.header_timeout_s, MAX_HEADER_BYTES)
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
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES,
    )


def serve(app: Any, settings: Settings, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM (uvicorn drains in-flight requests for up to GRACEFUL_SHUTDOWN_S)."""
    uvicorn.Server(uvicorn_config(app, settings, log_level)).run()
