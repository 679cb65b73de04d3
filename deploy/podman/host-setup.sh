#!/usr/bin/env bash
# Checks that this host can build and run the service's containers with podman, and writes the containers.conf
# they run under. Shared by the tests (tests/podman_fixtures.py) and by users; nothing here is needed where
# Docker or a podman that already runs containers is set up.
#
#   deploy/podman/host-setup.sh [--install] CONF
#   export CONTAINERS_CONF=CONF BUILDAH_FORMAT=docker     # what it prints at the end
#
# --install  apt-get install the Debian packages first (root): podman, buildah, runc, netavark, aardvark-dns,
#            iptables, debootstrap (the stand-in base image where python:3.11-slim cannot be pulled:
#            stand-in-base.sh). `make system-deps` installs the same.
#
# What CONF holds, and why (each found by trying on a Debian bookworm VM with podman 4.3):
#   runtime = "runc"   crun (podman's default where installed) refuses a host whose cgroups are v1 plus a
#                      v2 "unified" mount (hybrid); runc runs there and everywhere else.
#   default_ulimits    podman asks for nofile=1048576 by default; runc fails to start any container where the
#                      host's hard limit is lower (here 20000). Capped at the host's hard limits.
#   network_backend    netavark, with aardvark-dns: Compose services find each other by name (`db`). Debian's
#                      podman installed without its recommends may pick CNI, which has no name resolution.
# BUILDAH_FORMAT=docker: podman and buildah build OCI images by default, and the OCI image format has no
# HEALTHCHECK: it is dropped with a warning. Docker's format keeps it (build.sh passes --format docker too).
set -euo pipefail

usage() { echo "usage: $0 [--install] CONF" >&2; exit 2; }
install=0
if [ "${1:-}" = "--install" ]; then install=1; shift; fi
[ $# -eq 1 ] || usage
conf=$1

packages="podman buildah runc netavark aardvark-dns iptables debootstrap"
if [ "$install" = 1 ]; then
    missing=""
    for package in $packages; do
        command -v "$package" >/dev/null 2>&1 || [ -x "/usr/sbin/$package" ] || [ -x "/usr/lib/podman/$package" ] \
            || missing="$missing $package"
    done
    if [ -n "$missing" ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        # shellcheck disable=SC2086  # word splitting wanted: one argument per package
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
    fi
fi

for tool in podman runc netavark aardvark-dns; do
    if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ] && ! [ -x "/usr/lib/podman/$tool" ]; then
        echo "host-setup: $tool not found (Debian: $0 --install CONF, or apt-get install $packages)" >&2
        exit 1
    fi
done

# the host's hard limits; "unlimited" is left to podman's own default (no cap needed)
cap() {  # cap LIMIT CEILING: the smaller of the two, LIMIT may be "unlimited"
    if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi
}
nofile=$(cap "$(ulimit -Hn)" 1048576)
nproc=$(cap "$(ulimit -Hu)" 32768)

mkdir -p "$(dirname "$conf")"
cat >"$conf" <<EOF
# Written by deploy/podman/host-setup.sh: runc as the runtime, default ulimits under this host's hard limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
EOF

# podman reads the file now; a syntax error or an unknown runtime fails here, not in the first build
if ! CONTAINERS_CONF=$conf podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null; then
    echo "host-setup: podman does not start with $conf" >&2
    exit 1
fi
echo "export CONTAINERS_CONF=$conf BUILDAH_FORMAT=docker"
