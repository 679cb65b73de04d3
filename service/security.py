"""Keeping strangers out of a deployed service: an optional API key on every /v1 and /api route, and CORS.

Off by default (the local demo needs neither). With `BFD_API_KEY` set, a request must carry the key in
`X-API-Key` or `Authorization: Bearer <key>`; the comparison is constant-time. Health, readiness, metrics,
the OpenAPI docs and the web page's static files stay open (probes and the login-free page shell).
Serving without a key on an address other than loopback is allowed but loud (`exposure_warning`).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.settings import Settings


async def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Header(description="the deployment's API key, when one is set")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """FastAPI dependency: passes when no key is configured or the request carries the right one."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = x_api_key
    if given is None and authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if given is None:
        raise ServiceError(
            401,
            "api_key_required",
            "this deployment needs an API key: send X-API-Key or Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ServiceError(403, "api_key_invalid", "the API key is not valid for this deployment")


ApiKeyDep = Depends(require_api_key)


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Browsers on these origins may call the API (the page served at / needs none: same origin)."""
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Image-Name"],
            expose_headers=["Retry-After"],
        )


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the service on this machine: 127.0.0.0/8, ::1 or localhost."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:  # another name: it may resolve to anything, so it does not count as loopback
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def exposure_warning(settings: Settings) -> str | None:
    """The start-up warning for a service open to the network (a non-loopback bind and no API key), else None."""
    if settings.api_key is not None or is_loopback(settings.host):
        return None
    shown = settings.host or "all interfaces"
    return (
        f"EXPOSED WITHOUT AN API KEY: listening on {shown} (port {settings.port}), which is not a loopback "
        "address, and BFD_API_KEY is unset: anyone who can reach this port can upload images and read every "
        "stored result (/v1, /api). Set BFD_API_KEY to a long random key, or bind 127.0.0.1."
    )
