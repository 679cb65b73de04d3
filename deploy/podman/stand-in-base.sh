#!/usr/bin/env bash
# Makes `python:3.11-slim` available to podman where Docker Hub cannot be reached (air-gapped build hosts, this
# project's CI): the official image when it is here or can be pulled, else a STAND-IN bootstrapped from
# Debian's archive. Shared by the tests (tests/podman_fixtures.py) and by users.
#
#   deploy/podman/stand-in-base.sh            # prints the image it settled on
#
# The stand-in is not the official image: Debian bookworm's own Python 3.11 (/usr/bin/python3, with
# python3-venv and python3-pip) instead of python.org's build in /usr/local; `python` is a symlink at
# /usr/local/bin/python, where the official image has its interpreter, so the Dockerfile runs unchanged. It
# carries THIS host's trusted CA certificates (/etc/ssl/certs/ca-certificates.crt), which pip inside the build
# needs where HTTPS goes through an inspecting proxy; an image built on it is for testing here, not for
# shipping. Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), PULL_TIMEOUT_S (default 60).
# Needs root (debootstrap) and podman; run deploy/podman/host-setup.sh first where containers do not start.
set -euo pipefail

image=python:3.11-slim
official=docker.io/library/$image
local_name=localhost/$image  # how podman names an image tagged with the short name

if podman image exists "$image"; then
    podman image inspect --format '{{.RepoTags}}' "$image" >&2
    echo "$image"
    exit 0
fi
if timeout "${PULL_TIMEOUT_S:-60}" podman pull --quiet "$official" >/dev/null 2>&1; then
    # also as localhost/python:3.11-slim: the Dockerfile's short name then resolves here even where
    # registries.conf has no unqualified-search-registries (Debian's podman: "short-name did not resolve")
    podman tag "$official" "$local_name"
    echo "$official"
    exit 0
fi
echo "stand-in-base: $official cannot be pulled: bootstrapping a stand-in from Debian bookworm" >&2
if ! command -v debootstrap >/dev/null 2>&1 && ! [ -x /usr/sbin/debootstrap ]; then
    echo "stand-in-base: debootstrap not found (apt-get install debootstrap)" >&2
    exit 1
fi
PATH=$PATH:/usr/sbin

root=$(mktemp -d "${TMPDIR:-/var/tmp}/bfd-stand-in.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
ln -s /usr/bin/python3 "$root/usr/local/bin/python"
ln -s /usr/bin/python3 "$root/usr/local/bin/python3"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    --change 'LABEL org.opencontainers.image.description="STAND-IN for python:3.11-slim: Debian bookworm minbase with Debian python3, made by deploy/podman/stand-in-base.sh where the official image cannot be pulled; carries the build host CA certificates"' \
    --message "stand-in for $image (deploy/podman/stand-in-base.sh)" \
    - "$local_name" >/dev/null
echo "$local_name"
