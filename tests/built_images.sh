#!/usr/bin/env bash
# Builds every example's Dockerfile and runs it (tests/repository/test_built_images.py), as root with buildah,
# a daemonless builder from Debian's packages, on a stand-in for the images' base
# (tests/stand_in_base.sh). Installs what it needs; about 25 minutes from a cold layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null
fi
bash tests/stand_in_base.sh
BUILD_IMAGES=1 python -m pytest tests/repository/test_built_images.py "$@"
