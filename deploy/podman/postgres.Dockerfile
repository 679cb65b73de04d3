# A STAND-IN for the official postgres:16 image, for the Compose test and air-gapped hosts where Docker Hub
# cannot be reached: Debian's PostgreSQL (15 on the bookworm stand-in base from stand-in-base.sh; whatever the
# base's Debian release ships otherwise) behind an entrypoint that honours the official image's
# POSTGRES_PASSWORD, POSTGRES_USER and POSTGRES_DB on first start, data in /var/lib/postgresql/data.
#
#   podman build --format docker -f deploy/podman/postgres.Dockerfile -t localhost/bfd-postgres:stand-in deploy/podman
#   BFD_POSTGRES_IMAGE=localhost/bfd-postgres:stand-in podman-compose up -d      # docker-compose.yml's db image
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# DL3008: Debian's packages are not pinned: the base fixes the release, and this image only stands in for a
# test or an air-gapped host. Like the official image: no "main" cluster at install, the data directory is made
# on first start from the POSTGRES_* variables; the postgres user is UID/GID 999, as in the official image.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
    && sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(dirname /usr/lib/postgresql/*/bin/postgres)" /usr/lib/postgresql/bin \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown 999:999 /var/lib/postgresql/data /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER 999:999
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
# as the official image: SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave)
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
