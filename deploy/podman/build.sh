#!/usr/bin/env bash
# Builds the service image with podman, as the tests do (tests/podman_fixtures.py):
#
#   deploy/podman/build.sh TAG [podman build options...]
#   deploy/podman/build.sh bfd:cpu
#   deploy/podman/build.sh bfd:cpu-nobundle --build-arg BUNDLE_DIR=deploy/empty-bundle
#   deploy/podman/build.sh bfd:gpu -f Dockerfile.gpu
#   BFD_BUILD_CONTEXT=/path/to/a/copy deploy/podman/build.sh bfd:copy   # another build context (its Dockerfile)
#
# --format docker: podman builds OCI images by default, and OCI has no HEALTHCHECK (dropped with a warning).
# The base image must be there or pullable: deploy/podman/stand-in-base.sh makes a stand-in where Docker Hub
# cannot be reached. Layers are cached in podman's storage (/var/lib/containers for root): a rebuild after a
# source change reinstalls the project only.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 TAG [podman build options...]" >&2; exit 2; }
tag=$1
shift
cd "$(dirname "$0")/../.."
exec podman build --format docker --tag "$tag" "$@" "${BFD_BUILD_CONTEXT:-.}"
