"""The web page at `/`: static files from `service/web/` (plain HTML, CSS and JS: no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.errors import ServiceError

WEB_DIR = Path(__file__).with_name("web")
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    page = WEB_DIR / "index.html"
    if not page.is_file():
        raise ServiceError(404, "not_found", "this install has no web page (service/web/index.html)")
    return FileResponse(page, media_type="text/html")


def mount_pages(app: FastAPI) -> None:
    """`/` and `/static/*`."""
    app.include_router(router)
    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
