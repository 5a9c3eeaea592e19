"""The cold start, in parts: seconds from the process's start to the first job, per phase
(imports, download, load, warm-up), logged on one line. One identical copy per example (each
folder is its own Docker build context).

`COLD_START.done(phase)` closes a phase, `COLD_START.report(last_phase)` closes the last one and
logs them all: "Cold start 11.2s: imports 4.0s, download 0.5s, load to cuda 5.5s, warm-up 1.2s".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def process_started() -> float:
    """When this process started (time.time() scale): the imports before this module count too."""
    try:
        import psutil  # a dependency of runpod, so in every image

        return psutil.Process().create_time()
    except (ImportError, OSError):
        return time.time()


@dataclass
class ColdStart:
    """Seconds per phase of a cold start, from the process's start to the first job."""

    started: float
    clock: Callable[[], float] = time.time
    phases: dict[str, float] = field(default_factory=dict)
    _last: float | None = None

    def done(self, phase: str) -> None:
        """Close `phase`: the seconds since the previous phase ended (or since the process started)."""
        now = self.clock()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - (self._last or self.started)
        self._last = now

    def summary(self) -> str:
        total = (self._last or self.started) - self.started
        parts = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.phases.items())
        return f"Cold start {total:.1f}s: {parts}"

    def report(self, last_phase: str) -> None:
        self.done(last_phase)
        _log(self.summary())


def _log(message: str, level: str = "info") -> None:
    import runpod  # the SDK's logger, so these lines look like (and filter like) the worker's others

    getattr(runpod.RunPodLogger(), level)(message)


COLD_START = ColdStart(started=process_started())
