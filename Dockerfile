# Bone-fracture detection service (`bfd serve`) on ONNX Runtime, CPU image.
# RESEARCH USE ONLY: not a medical device; its output is not a diagnosis.
#
# The serving install only: `pip install .`, no extras, so the image has no training or export stack.
#
# A model bundle (manifest.json + ONNX files, see models/README.md) is served from /app/models/bundle.
# Give it one of two ways:
#   1. Baked in at build time (default: models/demo, written by `make bundle`):
#        make bundle && docker build -t bfd:cpu .
#        docker build --build-arg BUNDLE_DIR=models/my-bundle -t bfd:cpu .
#   2. Mounted at run time, read-only, over /app/models/bundle (a mount hides whatever was baked there);
#      build without a bundle by baking the empty placeholder instead:
#        docker build --build-arg BUNDLE_DIR=deploy/empty-bundle -t bfd:cpu-nobundle .
#        docker run -p 8000:8000 -v "$PWD/models/demo:/app/models/bundle:ro" -v bfd-data:/data bfd:cpu-nobundle
#      Without a mounted bundle that image refuses to start, saying which file is missing.
# Results go to SQLite in the /data volume unless BFD_DATABASE_URL says otherwise (postgresql+asyncpg://...).
#
# No `# syntax=` line: it makes BuildKit fetch a frontend image from Docker Hub before building anything, which
# fails on an air-gapped build host; nothing here needs more than the frontend built into Docker and podman.
# With podman or buildah, build with --format docker (deploy/podman/build.sh does): their default, OCI, has no
# HEALTHCHECK and drops it. Built and run in CI by tests/test_container_image.py (deploy/README.md).

# ---- build: a virtual environment with the project and its dependencies (all binary wheels) ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml changes, so a change
# to the sources reinstalls the project alone (tests/test_container_image.py checks the layer is reused).
COPY pyproject.toml deploy/project_requirements.py ./
RUN python project_requirements.py pyproject.toml > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt
# Then only what `pip install .` needs (the desktop client and the tests stay out of the server image).
COPY README.md ./
COPY bfd/ bfd/
COPY inference/ inference/
COPY clients/ clients/
COPY dicom_node/ dicom_node/
COPY service/ service/
COPY export/ export/
COPY training/ training/
# pip check: every installed distribution's requirements are met (a broken environment fails the build).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -I -c "import onnxruntime, service.main"

# ---- runtime: the venv, the bundle, a non-root user ----
FROM python:3.11-slim AS runtime
ARG BUNDLE_DIR=models/demo
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="bone-fracture-detection" \
      org.opencontainers.image.description="Fracture detection on musculoskeletal radiographs (body-part router, fracture specialists) served over ONNX Runtime, CPU. Research use only: not a medical device, not a diagnosis." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"
# ORT_DISABLE_TELEMETRY: recent onnxruntime wheels on Linux keep a device ID and an event store under
# ~/.cache and try HTTPS uploads; a service that sees radiographs sends nothing anywhere.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    BFD_HOST=0.0.0.0 \
    BFD_PORT=8000 \
    BFD_BUNDLE=/app/models/bundle \
    BFD_DATABASE_URL=sqlite+aiosqlite:////data/results.sqlite3
# A fixed numeric UID/GID (10001) so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 bfd \
    && useradd --system --uid 10001 --gid bfd --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin bfd \
    && mkdir -p /data /app/models/bundle \
    && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The bundle is owned by root and only readable by the service: it cannot alter what it serves.
COPY ${BUNDLE_DIR} /app/models/bundle
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers HTTP); readiness (bundle loaded and warmed up) is GET /readyz.
# No curl in slim images: Python's urllib, which fails on any non-2xx answer or a refused connection.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BFD_PORT', '8000') + '/healthz', timeout=4)"]
CMD ["bfd", "serve"]
