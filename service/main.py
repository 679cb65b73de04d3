"""The app factory: `create_app(settings)`; the lifespan opens the bundle, starts the batcher, opens the store."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.analysis_api import router as analysis_router
from service.api import router
from service.bundle import load_bundle
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.pages import mount_pages
from service.predictor import Predictor
from service.schemas import DISCLAIMER, UNTRAINED_WARNING
from service.security import ApiKeyDep, exposure_warning, install_cors
from service.settings import Settings
from service.store import ResultsStore, StoreUnavailableError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = load_bundle(settings.bundle)
        if not bundle.manifest.trained:
            log.warning("%s (bundle %s)", UNTRAINED_WARNING, settings.bundle)
        predictor = Predictor(bundle, settings, metrics)
        await predictor.start()
        app.state.predictor = predictor
        # Never raises: a URL that cannot be used or a database that is down costs only /api/analysis (503),
        # and the store logs what is wrong (password hidden). Predictions, /readyz and the page are unaffected.
        store = ResultsStore(settings.database_url)
        app.state.store = store
        with contextlib.suppress(StoreUnavailableError):
            await store.ensure_ready()
        if (warning := exposure_warning(settings)) is not None:
            log.warning("%s", warning)
        app.state.ready = True
        log.info("ready: %s %s on %s", bundle.model_name, bundle.model_version, predictor.engine.active_provider)
        try:
            yield
        finally:
            app.state.ready = False
            await predictor.stop()
            await store.close()

    app = FastAPI(
        title="Bone-fracture detection",
        summary="Body-part routing then fracture specialists on radiographs.",
        description=DISCLAIMER,
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs is served from local files (service.pages): FastAPI's default loads a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(analysis_router, dependencies=[ApiKeyDep])
    mount_pages(app)
    install_cors(app, settings.cors_origins)
    paths = frozenset(getattr(route, "path", "") for route in [*app.routes, *router.routes]) - {""}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=paths)
    return app
