#!/usr/bin/env bash
# 03_embeddings with BACKEND=openvino (tests/test_embeddings_openvino.py) in the package set of its
# CPU image, 03_embeddings/requirements-openvino.txt, in a virtual environment of its own:
# optimum-intel 2.2 requires transformers < 5.6, and the main suite runs 5.24.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-openvino
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q -r 03_embeddings/requirements-openvino.txt -r tests/requirements-openvino-tests.txt
# optimum-intel requires torchvision, which no text model imports; PyPI's build breaks imports on
# the CPU torch these tests install (the image's CUDA torch and its torchvision match, so it stays there).
"$venv/bin/pip" uninstall -q -y torchvision 2>/dev/null || true
"$venv/bin/python" -m pytest tests/test_embeddings_openvino.py "$@"
