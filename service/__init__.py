"""The HTTP door onto the core: the FastAPI app and everything only HTTP needs.

Owns the app factory and its lifespan (`main`), the settings (`settings`), the routes (`api`, `analysis_api`,
`pages`), request bodies and their limits (`uploads`), the HTTP server's own limits (`http_server`), the
HTTP-only schemas (`schemas`), the API key and CORS (`security`), Prometheus metrics (`metrics`), the
results store and its migrations (`store`, `migrations`), the web page (`web/`), `bfd serve` (`cli`), and
`errors`, the ONE place that maps the core's errors to HTTP statuses.

May import: the core (`inference`), FastAPI, Starlette, uvicorn, SQLAlchemy, Alembic, prometheus_client.
Never: TensorFlow, `training`, `export`, `desktop`, `loadtest` (tests/test_import_boundaries.py).
"""
