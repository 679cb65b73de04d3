"""Keeping strangers out of a deployed service: an optional API key on every /v1 and /api route, and CORS.

Off by default (the local demo needs neither). With `BFD_API_KEY` set, a request must carry the key in
`X-API-Key` or `Authorization: Bearer <key>`; the comparison is constant-time. Health, readiness, metrics,
the OpenAPI docs and the web page's static files stay open (probes and the login-free page shell).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware

from service.errors import ServiceError


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
