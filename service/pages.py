"""The pages: the web page at `/` (static files from `service/web/`: plain HTML, CSS and JS, no build step) and
the OpenAPI docs at `/docs`, both working offline and both sent with a Content-Security-Policy.

Hospital networks are often air-gapped, so nothing here comes from a CDN: Swagger UI's JS and CSS are served
from the `fastapi-offline` package (the `swagger-ui-bundle` package carries Swagger UI 4, which cannot render
FastAPI's OpenAPI 3.1 document). ReDoc is off: it injects inline styles and runs blob: workers, which the
policy would have to allow; Swagger UI renders the same document.

The page's policy allows only its own files (`script-src 'self'`, no inline script or style); Swagger UI's
HTML has one inline script, allowed by its sha256 hash rather than 'unsafe-inline'.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

from service.errors import ServiceError

WEB_DIR = Path(__file__).with_name("web")
DOCS_ASSETS_URL = "/static/docs"
DOCS_URL = "/docs"
DOCS_OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# Swagger UI: its own inline script (by hash), its SVG icons as data: URLs, requests to this server only.
_DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self' {hashes}; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# validatorUrl None: Swagger UI would otherwise load a badge from validator.swagger.io, sending it the schema's URL.
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter()


def security_headers(policy: str) -> dict[str, str]:
    """The headers every page and static file is sent with."""
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def inline_script_hashes(html: str) -> list[str]:
    """CSP sources ('sha256-...') for each inline <script> of `html`, hashed exactly as the browser does."""
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


def _with_policy_for_its_scripts(page: HTMLResponse) -> HTMLResponse:
    html = bytes(page.body).decode()
    hashes = " ".join(inline_script_hashes(html))
    page.headers.update(security_headers(_DOCS_POLICY.format(hashes=hashes)))
    return page


class _StaticWithHeaders(StaticFiles):
    """StaticFiles whose answers carry the security headers (nosniff matters most for scripts and styles)."""

    def __init__(self, *, directory: str | os.PathLike[str], policy: str) -> None:
        super().__init__(directory=directory)
        self._headers = security_headers(policy)

    def file_response(
        self, full_path: Any, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(self._headers)
        return response


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    page = WEB_DIR / "index.html"
    if not page.is_file():
        raise ServiceError(404, "not_found", "this install has no web page (service/web/index.html)")
    return FileResponse(page, media_type="text/html", headers=security_headers(PAGE_POLICY))


def swagger_assets_dir() -> Path:
    """Swagger UI's files (swagger-ui-bundle.js, swagger-ui.css, favicon.png) from the fastapi-offline package."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _mount_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI from local files) and its OAuth2 redirect page, as FastAPI's default would have."""
    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} - API docs"

    @app.get(DOCS_URL, include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            oauth2_redirect_url=DOCS_OAUTH2_REDIRECT_URL,
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        return _with_policy_for_its_scripts(page)

    @app.get(DOCS_OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def docs_oauth2_redirect() -> HTMLResponse:
        return _with_policy_for_its_scripts(get_swagger_ui_oauth2_redirect_html())

    # before /static: the first mount whose prefix matches takes the request
    assets = _StaticWithHeaders(directory=swagger_assets_dir(), policy=_DOCS_POLICY.format(hashes=""))
    app.mount(DOCS_ASSETS_URL, assets, name="docs-assets")


def mount_pages(app: FastAPI) -> None:
    """`/`, `/static/*`, `/docs` and `/static/docs/*`; create the app with `docs_url=None, redoc_url=None`."""
    app.include_router(router)
    _mount_docs(app)
    if WEB_DIR.is_dir():
        app.mount("/static", _StaticWithHeaders(directory=WEB_DIR, policy=PAGE_POLICY), name="static")
