#!/usr/bin/env bash
# 03_embeddings with BACKEND=openvino (tests/embeddings/test_openvino.py) in the package set of its
# CPU image, in a virtual environment of its own installed from tests/requirements-openvino.lock:
# the image's lock (03_embeddings/requirements-openvino.lock) plus the test runner, with the CPU
# torch (tests/repository/test_locks.py checks the two agree). optimum-intel 2.2 requires transformers < 5.6,
# and the main suite runs 5.24. optimum-intel's torchvision is left out of the lock: no text model
# imports it, and PyPI's build breaks imports on the CPU torch (the image's CUDA torch matches it).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-openvino
lock=tests/requirements-openvino.lock
# Made anew whenever the lock changes, so the environment holds exactly the locked set.
if ! cmp -s "$lock" "$venv/installed.lock"; then
    rm -rf "$venv"
    python -m venv "$venv"
    "$venv/bin/pip" install -q --require-hashes --no-deps -r "$lock"
    cp "$lock" "$venv/installed.lock"
fi
"$venv/bin/python" -m pytest tests/embeddings/test_openvino.py "$@"
