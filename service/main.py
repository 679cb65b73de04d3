"""The app factory: `create_app(settings)`; the lifespan loads the bundle, starts the predictor, opens the store,
and starts the DICOM node when one is configured (it shares the predictor)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from inference.bundle import Bundle, load_bundle
from inference.predictor import Predictor
from inference.results import DISCLAIMER, UNTRAINED_WARNING
from service.analysis_api import router as analysis_router
from service.api import router
from service.dicomweb_api import router as dicomweb_router
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsEvents, MetricsMiddleware, NodeMetricsEvents
from service.pages import mount_pages
from service.pages import router as pages_router
from service.security import ApiKeyDep, exposure_warning, install_cors
from service.settings import Settings
from service.store import ResultsStore, StoreUnavailableError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, bundle: Bundle | None = None) -> FastAPI:
    """The HTTP app on `settings.bundle` (or on `bundle`, already loaded and verified: `bfd serve` checks it
    before it binds a port, and its files are hashed once, not twice)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = bundle or load_bundle(settings.bundle)
        if not loaded.manifest.trained:
            log.warning("%s (bundle %s)", UNTRAINED_WARNING, settings.bundle)
        predictor = Predictor(loaded, settings.predictor_config(), MetricsEvents(metrics))
        metrics.track(predictor)
        await predictor.start()
        app.state.predictor = predictor
        # Never raises: a URL that cannot be used or a database that is down costs only /api/analysis (503),
        # and the store logs what is wrong (password hidden). Predictions, /readyz and the page are unaffected.
        store = ResultsStore(settings.database_url)
        app.state.store = store
        with contextlib.suppress(StoreUnavailableError):
            await store.ensure_ready()
        node = None
        if (node_config := settings.node_config()) is not None:
            from dicom_node.node import DicomNode  # pynetdicom and highdicom load only when the node is on
            from service.outbox import StoreOutbox

            # DICOM and HTTP traffic share this predictor: one admission, one set of models
            node = DicomNode(predictor, StoreOutbox(store), node_config, NodeMetricsEvents(metrics))
            metrics.track_node(node)
            await node.start()
        app.state.dicom_node = node
        if (warning := exposure_warning(settings)) is not None:
            log.warning("%s", warning)
        app.state.ready = True
        log.info("ready: %s %s on %s", loaded.model_name, loaded.model_version, predictor.engine.active_provider)
        try:
            yield
        finally:
            app.state.ready = False
            if node is not None:
                await node.stop()  # waiting studies are answered into the outbox before the predictor stops
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
    app.include_router(dicomweb_router)
    mount_pages(app)
    install_cors(app, settings.cors_origins)
    # This FastAPI keeps included routers' routes behind the app's own list, so each router is asked too.
    routes = [*app.routes, *router.routes, *analysis_router.routes, *dicomweb_router.routes, *pages_router.routes]
    paths = frozenset(getattr(route, "path", "") for route in routes) - {""}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=paths)
    return app
