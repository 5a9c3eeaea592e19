"""Shared fixtures: tiny models built once on disk for every test session, offline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The suite never downloads a model: every model is built locally or shipped in a wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The SDK logs every job's input and output at its default level, DEBUG: too loud for test reports.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

from tests.shared import tiny_models

# `pytest -n auto` (the README's command): one test process per core, at most this many. Each
# process holds its own copy of every library and the tiny models its files load (about 2 GB by
# the end), and more processes than cores only make the subprocess-heavy tests wait on each other.
MAX_TEST_PROCESSES = 4


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: environments without it run the suite too
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_TEST_PROCESSES))


@pytest.fixture(scope="session")
def tiny_model() -> Iterator[Callable[[str], Path]]:
    """`tiny_model(kind)` → folder of that tiny model, from the on-disk cache that every test session
    shares (tests/shared/tiny_models/cache.py): built by the first session to ask, never written after.

    A test that changes a model's files works on a copy (shutil.copytree to tmp_path); the session
    fails at its end if a folder it handed out changed.
    """
    handed_out: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}

    def get(kind: str) -> Path:
        if kind not in handed_out:
            folder = tiny_models.cached(kind)
            handed_out[kind] = (folder, tiny_models.listing(folder))
        return handed_out[kind][0]

    yield get
    changed = [str(folder) for folder, before in handed_out.values() if tiny_models.listing(folder) != before]
    assert not changed, f"tests wrote into shared tiny model folders (copy them to tmp_path first): {changed}"
