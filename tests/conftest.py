"""Shared fixtures: tiny models built once per test session, offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# The suite never touches the network: every model is built locally or shipped in a wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The SDK logs every job's input and output at its default level, DEBUG: too loud for test reports.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

from tests.shared import tiny_models


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model(kind)` → folder of that tiny model, built on first use and reused after."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = tiny_models.build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get
