"""Token-budget dynamic batching across jobs, the way dedicated embedding servers (TEI, Infinity) batch.

Every text is its own item in one queue, whichever job it came from. Whenever the model thread is
free, the next batch forms at once from whatever is waiting. There is no timer: an idle model
starts on a text the moment it arrives, and while the model is busy, texts gather by themselves,
which is how batches grow under load.

How a batch is chosen (`take_batch`, a pure function):
  * The anchor is a waiting text of the job with the fewest texts still waiting (the earliest such
    job on a tie), so a one-text query that arrives beside a 512-text job rides in the very next
    batch instead of queueing behind the big job.
  * Around the anchor, the batch takes the waiting texts closest to it in length, as long as the
    padded size (texts × the longest one, what the model really computes) stays within
    `max_tokens` and the count within `max_texts`. Texts of similar length waste little padding.
  * Only texts of one `group` share a batch (the caller decides what cannot be mixed).

A job is answered the moment its own last text is done, whatever else its batches held.

A batch that fails is split in halves and each half retried, down to single texts, so a text that
cannot fit (out of memory) or that breaks the model fails only its own job. `fatal` errors (a lost
GPU) fail every job of the batch at once, since no retry can help.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Job:
    """One caller's texts: their results fill in as batches finish."""

    seq: int  # arrival order
    results: list[Any]
    future: asyncio.Future[list[Any]]
    waiting: int  # texts not yet taken into a batch
    left: int  # texts without a result yet


@dataclass(eq=False)
class Item:
    """One text of one job: what the model needs for it (`payload`) and its length in tokens."""

    job: Job
    index: int
    payload: Any
    length: int
    group: Hashable = None
    order: int = field(default=0)  # queue order, for stable choices


def padded_tokens(lengths: Sequence[int]) -> int:
    """What a batch costs the model: every text is padded to the longest."""
    return len(lengths) * max(lengths, default=0)


def take_batch(waiting: list[Item], max_tokens: int, max_texts: int) -> list[Item]:
    """Remove the next batch from `waiting` and return it (see the module's docstring).

    The anchor always goes, even alone over `max_tokens`: a text as long as the model's window
    must still be embedded.
    """
    anchor = min(waiting, key=lambda item: (item.job.waiting, item.job.seq, item.order))
    peers = sorted((item for item in waiting if item.group == anchor.group), key=lambda item: (item.length, item.order))
    low = high = peers.index(anchor)  # the batch is peers[low : high + 1], sorted by length
    while high - low + 1 < max_texts:
        size = high - low + 2
        # A longer text raises the padding of the whole batch; a shorter one is padded to the longest.
        longer_fits = high + 1 < len(peers) and size * peers[high + 1].length <= max_tokens
        shorter_fits = low > 0 and size * peers[high].length <= max_tokens
        if not (longer_fits or shorter_fits):
            break
        closer_is_longer = longer_fits and (
            not shorter_fits or peers[high + 1].length - anchor.length <= anchor.length - peers[low - 1].length
        )
        if closer_is_longer:
            high += 1
        else:
            low -= 1
    batch = peers[low : high + 1]
    taken = set(map(id, batch))
    waiting[:] = [item for item in waiting if id(item) not in taken]
    for item in batch:
        item.job.waiting -= 1
    return batch


class TokenBudgetBatcher:
    """The queue and its collector; `run(payloads) -> results` encodes one batch on `executor`."""

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        max_tokens: int,
        max_texts: int,
        fatal: tuple[type[BaseException], ...] = (),
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.run, self.executor = run, executor
        self.max_tokens, self.max_texts = max_tokens, max_texts
        self.fatal, self.on_error = fatal, on_error
        self.waiting: list[Item] = []
        self.batches = 0  # model calls made (retries of a split batch included), for logs and tests
        self._arrivals = 0
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, payloads: Sequence[Any], lengths: Sequence[int], group: Hashable = None) -> list[Any]:
        """Queue one job's texts and wait for all their results, in order."""
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        job = Job(self._arrivals, [None] * len(payloads), loop.create_future(), len(payloads), len(payloads))
        if not payloads:
            return []
        for index, (payload, length) in enumerate(zip(payloads, lengths, strict=True)):
            self.waiting.append(Item(job, index, payload, length, group, order=self._arrivals * 1_000_000 + index))
        # The model is idle: start now (the collector task is held, since a loop keeps only weak refs).
        if self._drainer is None or self._drainer.done() or self._drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain())
        try:
            return await job.future
        finally:
            if not job.future.done():  # cancelled: its texts no longer need the model
                self.waiting[:] = [item for item in self.waiting if item.job is not job]

    async def _drain(self) -> None:
        while self.waiting:
            batch = take_batch(self.waiting, self.max_tokens, self.max_texts)
            await self._encode(batch)

    async def _encode(self, batch: list[Item]) -> None:
        batch = [item for item in batch if not item.job.future.done()]  # a failed or cancelled job's texts
        if not batch:
            return
        self.batches += 1
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.run, [item.payload for item in batch])
        except Exception as error:  # noqa: BLE001 - each job gets its own outcome below
            if self.on_error is not None:
                self.on_error(error)
            if len(batch) == 1 or isinstance(error, self.fatal):
                for item in batch:
                    if not item.job.future.done():
                        item.job.future.set_exception(error)
                return
            middle = len(batch) // 2  # the batch is sorted by length: halves of short and of long texts
            await self._encode(batch[:middle])
            await self._encode(batch[middle:])
            return
        for item, result in zip(batch, results, strict=True):
            job = item.job
            if job.future.done():
                continue
            job.results[item.index] = result
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.results)
