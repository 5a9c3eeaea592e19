"""A blocking run on a thread, followed from the event loop: its newest step, a deadline, a clean stop.

Denoising blocks for seconds to minutes, so handler.py runs it on a thread pool and keeps the
event loop free to stream progress and take other jobs. The run reports each step from its thread
(`on_step`); `ThreadRun.next_step` hands the event loop only the newest one: a step overtaken by a
newer one is dropped, never queued, and once the run is done no step is returned (progress not yet
sent is stale next to the result). Past the deadline it raises TimeLimitExceeded; `stop` sets the
`cancelled` event the run checks between steps and waits for its thread to finish. A step reaches
the caller as a progress chunk (`progress_chunk`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any


class TimeLimitExceeded(Exception):
    """Denoising ran past MAX_GENERATION_SECONDS; it is interrupted at its next step."""


class ThreadRun:
    """`work(*args, on_step, cancelled)` running on `executor`, started now, from a coroutine."""

    def __init__(self, executor: Executor, work: Callable[..., Any], *args: Any, seconds: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + seconds if seconds else None  # None: no time limit
        self.cancelled = threading.Event()
        self._newest: tuple[int, int] | None = None
        self._stepped = asyncio.Event()
        self.running = self.loop.run_in_executor(executor, work, *args, self._on_step, self.cancelled)

    def _on_step(self, step: int, total: int) -> None:  # on the run's thread
        self.loop.call_soon_threadsafe(self._note_step, step, total)

    def _note_step(self, step: int, total: int) -> None:  # on the event loop
        self._newest = (step, total)
        self._stepped.set()

    async def next_step(self) -> tuple[int, int] | None:
        """The newest (step, total) since the last call, once there is one; None when the run is done.
        Raises TimeLimitExceeded when the deadline passes first."""
        if self.running.done():
            return None
        waiter = asyncio.ensure_future(self._stepped.wait())
        remaining = None if self.deadline is None else max(self.deadline - self.loop.time(), 0)
        await asyncio.wait({waiter, self.running}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self.running.done():
            return None  # the result is ready: progress not yet sent is stale
        if not self._stepped.is_set():  # the time limit passed first
            raise TimeLimitExceeded
        self._stepped.clear()
        return self._newest

    def result(self) -> Any:
        """What `work` returned (or raised), once next_step has returned None."""
        return self.running.result()

    async def stop(self) -> None:
        """Ask the run to stop at its next step, and wait for its thread: also when the job is
        cancelled or its consumer leaves. What the run raised is the caller's to report, not this."""
        self.cancelled.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(self.running)


def progress_chunk(step: int, total: int) -> dict[str, Any]:
    """The chunk a step streams as: {"status": "progress", "step": 7, "total": 30}."""
    return {"status": "progress", "step": step, "total": total}


def is_progress(chunk: Any) -> bool:
    return isinstance(chunk, dict) and chunk.get("status") == "progress"
