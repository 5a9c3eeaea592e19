"""cold_start.py: the cold start's seconds, per phase (the worker tests in test_device.py check
the logged line of a real start)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.shared.harness import load_copy, shared_copies

COPIES = shared_copies("cold_start.py")


@pytest.fixture(scope="module", params=COPIES, ids=[path.parent.name for path in COPIES])
def cold_start(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(request.param)


def test_cold_start_phases_add_up(cold_start: ModuleType) -> None:
    ticks = iter([104.0, 104.5, 110.0, 111.25])
    cold = cold_start.ColdStart(started=100.0, clock=lambda: next(ticks))
    for phase in ("imports", "download", "load to cuda", "warm-up"):
        cold.done(phase)
    assert cold.summary() == "Cold start 11.2s: imports 4.0s, download 0.5s, load to cuda 5.5s, warm-up 1.2s"
