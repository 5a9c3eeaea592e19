#!/usr/bin/env bash
# A stand-in for the images' base, python:3.11-slim-bookworm, which no registry here serves:
# Debian bookworm's minimal system with its Python 3.11 (debootstrap, from Debian's packages),
# committed into buildah's local storage under the official tag, so every Dockerfile builds
# unchanged with --pull-never. Differences from the official image: Python is Debian's 3.11.2 in
# /usr (the official one is 3.11.x built into /usr/local), and pip installs into
# /usr/local/lib/python3.11/dist-packages. Does nothing when the tag is already there.
# Usage: bash tests/stand_in_base.sh   (as root, with buildah and debootstrap installed)
set -euo pipefail

TAG=docker.io/library/python:3.11-slim-bookworm
if buildah inspect --type image "$TAG" >/dev/null 2>&1; then
    exit 0
fi
root=$(mktemp -d /var/tmp/stand-in-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3.11,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
printf '#!/bin/sh\nexec /usr/bin/python3.11 -m pip "$@"\n' >"$root/usr/local/bin/pip"
chmod +x "$root/usr/local/bin/pip"
# The official image lets pip install system-wide; Debian's Python refuses without this removed.
rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
# PyPI is reached through this machine's certificate authorities (a proxy may sign for it).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*

container=$(buildah from scratch)
mount=$(buildah mount "$container")
cp -a "$root/." "$mount/"
buildah umount "$container" >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$container"
buildah commit --quiet "$container" "$TAG" >/dev/null
buildah rm "$container" >/dev/null
