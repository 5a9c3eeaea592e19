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
  * A `PaddingBound` (the encoder sets one on a CPU) also keeps the padded size within a multiple
    of the texts' own tokens: a far longer text waits for a batch of texts nearer its length.
  * Only texts of one `group` share a batch (the caller decides what cannot be mixed), and only
    texts of one `run`: a job may bring its own model function (the reranker's pairs do).
  * Aging: a job passed over MAX_PASSED_OVER batches in a row (batches taken while it had texts
    waiting, none of them in it) anchors the next batch itself, the most passed over first.

Why aging, and its bound. Without it a job of several long texts can wait forever: under steady
one-line traffic there is always a job with one text waiting, which anchors every batch, and the
budget leaves no room beside short texts for an 8,192-token one (three texts padded to 8,192 are
over 16,384 tokens). With it, no job is passed over more than MAX_PASSED_OVER + J - 1 batches in a
row, J the jobs waiting when it reached MAX_PASSED_OVER (at most MAX_CONCURRENCY): from then on
every batch is anchored by a job passed over at least as often (ties: the older first); each batch
empties that set of jobs ahead of it by one at least (an anchor's count goes back to 0), and a job
that arrives later starts at 0 and can only ever count less than it. Its texts then ride in the
batch it anchors, so a job of n texts is served in at most n × (MAX_PASSED_OVER + J) batches, and
beside one such job, one-line queries keep MAX_PASSED_OVER of every MAX_PASSED_OVER + 1 batches.
Tested by driving take_batch with streams of jobs (tests/embeddings/test_batcher.py).

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

# Batches a waiting job can be passed over in a row before it anchors the next one itself. Small
# enough that a long document waits at most a few batches more than a one-line query (on a GPU,
# a batch of 16,384 tokens takes tens of milliseconds); large enough that one-line queries, which
# anchor most batches, keep 8 of every 9 batches when long jobs compete with them.
MAX_PASSED_OVER = 8


@dataclass(eq=False)
class Job:
    """One caller's texts: their results fill in as batches finish."""

    seq: int  # arrival order
    results: list[Any]
    future: asyncio.Future[list[Any]]
    waiting: int  # texts not yet taken into a batch
    left: int  # texts without a result yet
    run: Callable[[list[Any]], Sequence[Any]] | None = None  # its own model function, else the batcher's
    passed_over: int = 0  # batches taken in a row while it waited, none of its texts in them


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


@dataclass(frozen=True)
class PaddingBound:
    """How much padding a batch may carry: its padded tokens at most `ratio` × its texts' own
    tokens + `slack`. Where a forward pass costs about its padded tokens plus a fixed part (a CPU:
    the weights are read once per pass), padding is work thrown away, and a text far longer than
    the rest is cheaper in a later batch of texts near its length; `slack`, the fixed part in
    tokens, keeps a small batch whole, where splitting it would cost a second pass's fixed part."""

    ratio: float
    slack: int

    def allows(self, padded: int, own: int) -> bool:
        return padded <= self.ratio * own + self.slack


def take_batch(
    waiting: list[Item],
    max_tokens: int,
    max_texts: int,
    max_passed_over: int = MAX_PASSED_OVER,
    padding: PaddingBound | None = None,
) -> list[Item]:
    """Remove the next batch from `waiting` and return it (see the module's docstring).

    The anchor always goes, even alone over `max_tokens`: a text as long as the model's window
    must still be embedded. With `padding`, a text joins only while the batch's padded tokens
    stay within that bound of its own: one that would pad it more waits for texts nearer its length.
    """
    if overdue := [item for item in waiting if item.job.passed_over >= max_passed_over]:
        anchor = min(overdue, key=lambda item: (-item.job.passed_over, item.job.seq, item.order))
    else:
        anchor = min(waiting, key=lambda item: (item.job.waiting, item.job.seq, item.order))
    peers = sorted((item for item in waiting if item.group == anchor.group), key=lambda item: (item.length, item.order))
    low = high = peers.index(anchor)  # the batch is peers[low : high + 1], sorted by length
    own_tokens = anchor.length  # the batch's tokens before padding

    def fits(size: int, longest: int, added: int) -> bool:
        padded = size * longest
        return padded <= max_tokens and (padding is None or padding.allows(padded, own_tokens + added))

    while high - low + 1 < max_texts:
        size = high - low + 2
        # A longer text raises the padding of the whole batch; a shorter one is padded to the longest.
        longer_fits = high + 1 < len(peers) and fits(size, peers[high + 1].length, peers[high + 1].length)
        shorter_fits = low > 0 and fits(size, peers[high].length, peers[low - 1].length)
        if not (longer_fits or shorter_fits):
            break
        closer_is_longer = longer_fits and (
            not shorter_fits or peers[high + 1].length - anchor.length <= anchor.length - peers[low - 1].length
        )
        if closer_is_longer:
            high += 1
            own_tokens += peers[high].length
        else:
            low -= 1
            own_tokens += peers[low].length
    batch = peers[low : high + 1]
    taken = set(map(id, batch))
    waiting[:] = [item for item in waiting if id(item) not in taken]
    served = {item.job for item in batch}
    for item in batch:
        item.job.waiting -= 1
    for job in {item.job for item in waiting}:  # the jobs still waiting: passed over, or served
        job.passed_over = 0 if job in served else job.passed_over + 1
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
        padding: PaddingBound | None = None,
    ) -> None:
        self.run, self.executor = run, executor
        self.max_tokens, self.max_texts, self.padding = max_tokens, max_texts, padding
        self.fatal, self.on_error = fatal, on_error
        self.waiting: list[Item] = []
        self.batches = 0  # model calls made (retries of a split batch included), for logs and tests
        self._arrivals = 0
        self._drainer: asyncio.Task[None] | None = None

    async def submit(
        self,
        payloads: Sequence[Any],
        lengths: Sequence[int],
        group: Hashable = None,
        run: Callable[[list[Any]], Sequence[Any]] | None = None,
    ) -> list[Any]:
        """Queue one job's texts and wait for all their results, in order. `run`, when given, is the
        model function for this job's texts instead of the batcher's own (they never share a batch
        with texts of another `run`): another model on the same thread and in the same queue."""
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        job = Job(self._arrivals, [None] * len(payloads), loop.create_future(), len(payloads), len(payloads), run)
        if not payloads:
            return []
        group = group if run is None else (run, group)
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
            batch = take_batch(self.waiting, self.max_tokens, self.max_texts, padding=self.padding)
            await self._encode(batch)

    async def _encode(self, batch: list[Item]) -> None:
        batch = [item for item in batch if not item.job.future.done()]  # a failed or cancelled job's texts
        if not batch:
            return
        self.batches += 1
        loop = asyncio.get_running_loop()
        run = batch[0].job.run or self.run  # one group, so one run: see `submit`
        try:
            results = await loop.run_in_executor(self.executor, run, [item.payload for item in batch])
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
