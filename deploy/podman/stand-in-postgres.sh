#!/usr/bin/env bash
# Prints the PostgreSQL image for docker-compose.yml's db service (its BFD_POSTGRES_IMAGE): the official
# postgres:16 when it is here or can be pulled, else a STAND-IN built from Debian's PostgreSQL
# (postgres.Dockerfile) on the base that stand-in-base.sh settled on. Shared by tests/test_compose.py and users:
#
#   export BFD_POSTGRES_IMAGE="$(deploy/podman/stand-in-postgres.sh)"
#
# Environment: PULL_TIMEOUT_S (default 60).
set -euo pipefail
official=docker.io/library/postgres:16
stand_in=localhost/bfd-postgres:stand-in
here=$(cd "$(dirname "$0")" && pwd)

if podman image exists "$official" \
    || timeout "${PULL_TIMEOUT_S:-60}" podman pull --quiet "$official" >/dev/null 2>&1; then
    echo "$official"
    exit 0
fi
echo "stand-in-postgres: $official cannot be pulled: building $stand_in from Debian's postgresql" >&2
base=$("$here/stand-in-base.sh")
podman build --format docker --build-arg "BASE_IMAGE=$base" -f "$here/postgres.Dockerfile" \
    -t "$stand_in" "$here" >&2
echo "$stand_in"
