"""03_embeddings/batcher.py on its own: batch choice, head-of-line blocking, idle start, failures.

The batcher is driven with a fake model (a function of the batch's payloads) on a real thread, so
each behaviour is checked by counting batches, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.shared.harness import REPO, load_copy

BATCHER_PATH = REPO / "03_embeddings" / "batcher.py"


@pytest.fixture(scope="module")
def batcher() -> ModuleType:
    return load_copy(BATCHER_PATH)


@pytest.fixture
def thread() -> Any:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-model")
    yield executor
    executor.shutdown(wait=True)


def items(module: ModuleType, lengths_by_job: list[list[int]], groups: list[Any] | None = None) -> list[Any]:
    """Waiting items for jobs of the given text lengths, in arrival order."""
    waiting = []
    for seq, lengths in enumerate(lengths_by_job):
        job = module.Job(seq, [None] * len(lengths), None, len(lengths), len(lengths))
        group = groups[seq] if groups else None
        waiting += [
            module.Item(job, i, (seq, i), length, group, order=seq * 1000 + i) for i, length in enumerate(lengths)
        ]
    return waiting


# ---- choosing a batch (pure) --------------------------------------------------------------------


def test_the_smallest_job_anchors_the_batch_and_similar_lengths_fill_it(batcher: ModuleType) -> None:
    big = [10, 200, 11, 190, 12, 180, 13, 170]
    waiting = items(batcher, [big, [100]])
    batch = batcher.take_batch(waiting, max_tokens=400, max_texts=8)
    payloads = [item.payload for item in batch]
    assert (1, 0) in payloads, "the one-text job rides in the next batch"
    assert batcher.padded_tokens([item.length for item in batch]) <= 400
    # Its length neighbours came along (170 and 180 pad to 180 × 2 = 360), not the short ones.
    assert sorted(item.length for item in batch) == [100, 170]
    assert len(waiting) == len(big) + 1 - len(batch)


def test_the_budget_and_the_text_cap_cut_the_batch(batcher: ModuleType) -> None:
    waiting = items(batcher, [[8] * 100])
    assert len(batcher.take_batch(waiting, max_tokens=80, max_texts=50)) == 10  # 10 × 8 tokens
    assert len(batcher.take_batch(waiting, max_tokens=10_000, max_texts=50)) == 50
    assert len(waiting) == 40


def test_one_text_over_the_budget_still_goes_alone(batcher: ModuleType) -> None:
    waiting = items(batcher, [[512, 3, 3]])
    batch = batcher.take_batch(waiting, max_tokens=16, max_texts=8)
    assert [item.length for item in batch] in ([3, 3], [512])
    while waiting:
        batcher.take_batch(waiting, max_tokens=16, max_texts=8)  # every text is taken eventually


def test_texts_of_different_groups_never_share_a_batch(batcher: ModuleType) -> None:
    waiting = items(batcher, [[5, 5], [5, 5]], groups=["query: ", "passage: "])
    first = batcher.take_batch(waiting, max_tokens=1000, max_texts=10)
    assert {item.group for item in first} == {"query: "} and len(first) == 2


def test_a_padding_bound_leaves_a_far_longer_text_for_a_later_batch(batcher: ModuleType) -> None:
    """32 one-line queries as they arrive on a CPU: 31 of 10 tokens and one of 33. Together they are
    padded to 1,056 tokens for 343 of their own; with the bound (1.5 × 343 + 128 = 642) the long
    one waits, without it they all go."""
    bound = batcher.PaddingBound(ratio=1.5, slack=128)
    lengths = [[10]] * 15 + [[33]] + [[10]] * 16
    assert len(batcher.take_batch(items(batcher, lengths), max_tokens=2_048, max_texts=32)) == 32
    waiting = items(batcher, lengths)
    first = batcher.take_batch(waiting, max_tokens=2_048, max_texts=32, padding=bound)
    assert [item.length for item in first] == [10] * 31
    assert [item.length for item in batcher.take_batch(waiting, 2_048, 32, padding=bound)] == [33]


def test_the_padding_slack_keeps_a_small_batch_whole(batcher: ModuleType) -> None:
    """Eight queries, one of them 33 tokens: padded to 264 tokens for 103 of their own, within
    1.5 × 103 + 128 = 282. A second pass would cost more than the padding it saves."""
    waiting = items(batcher, [[10]] * 7 + [[33]])
    bound = batcher.PaddingBound(ratio=1.5, slack=128)
    assert len(batcher.take_batch(waiting, max_tokens=2_048, max_texts=32, padding=bound)) == 8


# ---- the running batcher ------------------------------------------------------------------------


def recording_model(calls: list[list[Any]], gate: threading.Event | None = None):
    def run(payloads: list[Any]) -> list[Any]:
        if gate is not None:
            gate.wait(timeout=10)
        calls.append(list(payloads))
        return [f"vector of {payload}" for payload in payloads]

    return run


def test_a_one_text_job_is_not_blocked_behind_a_512_text_job(batcher: ModuleType, thread: Any) -> None:
    """A 1-text job arriving just after a 512-text job rides in the second batch (the big job's first
    was already running) and is answered when that batch ends, while the big job needs seventeen."""
    calls: list[list[Any]] = []
    completed: list[int] = []

    def model(payloads: list[Any]) -> list[Any]:
        calls.append(list(payloads))
        time.sleep(0.01)  # a forward pass takes time: the answer must not wait for the next ones
        completed.append(len(payloads))
        return [f"vector of {payload}" for payload in payloads]

    queue = batcher.TokenBudgetBatcher(model, thread, max_tokens=10_000, max_texts=32)
    finished_after: dict[str, int] = {}

    async def job(name: str, count: int) -> list[Any]:
        result = await queue.submit([f"{name}-{i}" for i in range(count)], [20] * count)
        finished_after[name] = len(completed)
        return result

    async def main() -> tuple[list[Any], list[Any]]:
        big = asyncio.create_task(job("big", 512))
        await asyncio.sleep(0)  # the big job is queued and its first batch started
        small = asyncio.create_task(job("small", 1))
        return await big, await small

    big, small = asyncio.run(main())
    assert small == ["vector of small-0"]
    assert big == [f"vector of big-{i}" for i in range(512)]
    assert len(calls) == 17  # 513 texts, 32 per batch
    assert "small-0" in calls[1], "the small job's text went into the very next batch"
    assert finished_after["small"] == 2, finished_after
    assert finished_after["big"] == 17


def test_an_idle_model_starts_at_once_without_a_timer(batcher: ModuleType, thread: Any) -> None:
    """The first batch is handed to the model thread before the event loop runs anything timed."""
    calls: list[list[Any]] = []
    gate = threading.Event()
    queue = batcher.TokenBudgetBatcher(recording_model(calls, gate), thread, max_tokens=1000, max_texts=8)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(queue.submit(["a"], [3]))
        for _ in range(3):  # three turns of the loop: no timer of any length can have fired
            await asyncio.sleep(0)
        assert queue.batches == 1, "the batch waited instead of starting"
        assert loop.time() - started < 1.0
        gate.set()
        return await task

    assert asyncio.run(main()) == ["vector of a"]


def test_texts_that_arrive_while_the_model_is_busy_share_the_next_batch(batcher: ModuleType, thread: Any) -> None:
    calls: list[list[Any]] = []
    gate = threading.Event()
    queue = batcher.TokenBudgetBatcher(recording_model(calls, gate), thread, max_tokens=1000, max_texts=64)

    async def main() -> list[list[Any]]:
        first = asyncio.create_task(queue.submit(["first"], [3]))
        await asyncio.sleep(0)
        others = [asyncio.create_task(queue.submit([f"t{i}", f"u{i}"], [3, 4])) for i in range(10)]
        await asyncio.sleep(0)
        gate.set()
        await first
        return await asyncio.gather(*others)

    results = asyncio.run(main())
    assert results == [[f"vector of t{i}", f"vector of u{i}"] for i in range(10)]
    assert [len(call) for call in calls] == [1, 20]


def out_of_memory_when(condition):
    def run(payloads: list[Any]) -> list[Any]:
        if condition(payloads):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"vector of {payload}" for payload in payloads]

    return run


def test_out_of_memory_splits_the_batch_and_fails_only_the_text_that_cannot_fit(
    batcher: ModuleType, thread: Any
) -> None:
    errors: list[BaseException] = []
    # Batches of more than two texts, and any batch holding "huge", run out of memory.
    run = out_of_memory_when(lambda payloads: len(payloads) > 2 or "huge" in payloads)
    queue = batcher.TokenBudgetBatcher(run, thread, max_tokens=10_000, max_texts=16, on_error=errors.append)

    async def main() -> list[Any]:
        jobs = [["a", "b", "c", "d"], ["e", "huge"], ["f"]]
        tasks = [queue.submit(texts, [5] * len(texts)) for texts in jobs]
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, second, third = asyncio.run(main())
    assert first == ["vector of a", "vector of b", "vector of c", "vector of d"]
    assert third == ["vector of f"]
    assert isinstance(second, torch.cuda.OutOfMemoryError)
    assert errors and all(isinstance(error, torch.cuda.OutOfMemoryError) for error in errors)


def test_a_fatal_error_fails_the_whole_batch_without_retries(batcher: ModuleType, thread: Any) -> None:
    class DeviceLost(RuntimeError):
        pass

    calls: list[int] = []

    def run(payloads: list[Any]) -> list[Any]:
        calls.append(len(payloads))
        raise DeviceLost("the GPU fell off the bus")

    queue = batcher.TokenBudgetBatcher(run, thread, max_tokens=1000, max_texts=16, fatal=(DeviceLost,))

    async def main() -> list[Any]:
        gathered = [queue.submit(["a", "b"], [3, 3]), queue.submit(["c"], [3])]
        return await asyncio.gather(*gathered, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, DeviceLost) for result in results)
    assert sum(calls) <= 3 and len(calls) <= 2, "a fatal error is never retried"


def test_a_cancelled_jobs_texts_never_reach_the_model(batcher: ModuleType, thread: Any) -> None:
    calls: list[list[Any]] = []
    gate = threading.Event()
    queue = batcher.TokenBudgetBatcher(recording_model(calls, gate), thread, max_tokens=1000, max_texts=64)

    async def main() -> Any:
        first = asyncio.create_task(queue.submit(["first"], [3]))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(queue.submit(["never"] * 5, [3] * 5))
        kept = asyncio.create_task(queue.submit(["kept"], [3]))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.sleep(0)
        gate.set()
        await first
        return await kept

    assert asyncio.run(main()) == ["vector of kept"]
    assert all("never" not in call for call in calls)


# ---- fairness: no job waits forever (take_batch driven directly, no model, no clock) -------------


class Stream:
    """A queue fed with jobs as a busy worker's would be: `arrive` adds a job, `batch` takes the next
    batch and records, for every job, the most batches it was passed over in a row, and any run of
    passes longer than the proof in batcher.py allows (MAX_PASSED_OVER + J - 1, J the jobs waiting
    when its count reached MAX_PASSED_OVER)."""

    def __init__(self, module: ModuleType, max_tokens: int, max_texts: int, padding: Any = None) -> None:
        self.module, self.max_tokens, self.max_texts, self.padding = module, max_tokens, max_texts, padding
        self.waiting: list[Any] = []
        self.jobs: list[Any] = []
        self.batches = 0
        self.passes: dict[int, int] = {}  # job seq -> passed over in a row now
        self.jobs_waiting_at_limit: dict[int, int] = {}  # job seq -> J, during a run past MAX_PASSED_OVER
        self.longest: dict[int, int] = {}  # job seq -> its longest run of passes
        self.over_the_bound: list[tuple[int, int, int]] = []  # (job seq, passes, J)
        self.done_at: dict[int, int] = {}  # job seq -> the batch that took its last text

    def arrive(self, lengths: list[int]) -> int:
        seq = len(self.jobs)
        job = self.module.Job(seq, [None] * len(lengths), None, len(lengths), len(lengths))
        self.jobs.append(job)
        self.waiting += [self.module.Item(job, i, (seq, i), n, order=seq * 100_000 + i) for i, n in enumerate(lengths)]
        self.passes[seq] = self.longest[seq] = 0
        return seq

    def batch(self) -> list[Any]:
        limit = self.module.MAX_PASSED_OVER
        waiting_jobs = {item.job.seq for item in self.waiting}
        for seq in waiting_jobs:
            if self.passes[seq] == limit:
                self.jobs_waiting_at_limit[seq] = len(waiting_jobs)
        taken = self.module.take_batch(self.waiting, self.max_tokens, self.max_texts, padding=self.padding)
        self.batches += 1
        lengths = [item.length for item in taken]
        assert self.module.padded_tokens(lengths) <= max(self.max_tokens, max(lengths))
        if self.padding is not None and len(taken) > 1:  # the anchor alone goes whatever its length
            assert self.padding.allows(self.module.padded_tokens(lengths), sum(lengths))
        served = {item.job.seq for item in taken}
        for seq in waiting_jobs:
            if seq in served:
                self.passes[seq] = 0
                self.jobs_waiting_at_limit.pop(seq, None)
                continue
            self.passes[seq] += 1
            self.longest[seq] = max(self.longest[seq], self.passes[seq])
            jobs = self.jobs_waiting_at_limit.get(seq)
            if jobs is not None and self.passes[seq] > limit + jobs - 1:
                self.over_the_bound.append((seq, self.passes[seq], jobs))
        for item in taken:
            if item.job.waiting == 0:
                self.done_at[item.job.seq] = self.batches
        return taken


def one_line() -> int:
    return 12  # a one-line query: 12 tokens with [CLS] and [SEP]


@pytest.mark.parametrize(
    ("max_tokens", "max_texts", "long_job"),
    [
        (16_384, 256, [8_192, 8_192]),  # the GPU defaults, two documents of a long-context model's window
        (16_384, 256, [8_192] * 5),
        (16_384, 256, [8_192]),  # a one-text document: already bounded by arrival order, still checked
        (65_536, 1_024, [8_192] * 9),  # a raised budget on a big GPU
        (2_048, 32, [512] * 3),  # the CPU defaults, 512-token documents
    ],
)
def test_a_long_job_is_served_within_the_bound_under_steady_one_line_traffic(
    batcher: ModuleType, max_tokens: int, max_texts: int, long_job: list[int]
) -> None:
    """Twenty one-line queries arrive for every batch (the GPU takes them all in one), and a job of
    long documents arrives among them. Every one-line job anchors the batch before it (it has the
    fewest texts waiting) and the budget has no room for a long document beside them: before aging,
    the long job was never taken in 2,000 batches. Now it is passed over exactly MAX_PASSED_OVER
    batches, then anchors one, and each of its batches takes as many of its texts as fit."""
    stream = Stream(batcher, max_tokens, max_texts)
    arrivals = min(20, max_texts // 2)
    for _ in range(arrivals):
        stream.arrive([one_line()])
    long_seq = stream.arrive(long_job)
    per_batch = max(1, max_tokens // long_job[0])
    rounds = -(-len(long_job) // per_batch)
    for _ in range(2_000):
        stream.batch()
        for _ in range(arrivals):
            stream.arrive([one_line()])
        if long_seq in stream.done_at:
            break
    assert long_seq in stream.done_at, f"the long job waited {stream.batches} batches and was never finished"
    assert stream.done_at[long_seq] <= rounds * (batcher.MAX_PASSED_OVER + 1), stream.done_at[long_seq]
    # One-line queries lost at most one batch in MAX_PASSED_OVER + 1 to it: none waited more than that.
    assert max(stream.longest[seq] for seq in stream.done_at if seq != long_seq) <= 1
    assert not stream.over_the_bound


@pytest.mark.parametrize(
    ("max_tokens", "max_texts", "window", "cpu_padding"),
    [(16_384, 256, 8_192, False), (2_048, 32, 512, False), (2_048, 32, 512, True)],
)
@pytest.mark.parametrize("seed", range(2))
def test_no_job_is_passed_over_more_than_the_proven_bound(
    batcher: ModuleType, max_tokens: int, max_texts: int, window: int, cpu_padding: bool, seed: int
) -> None:
    """A random mix at and past saturation (one-line queries, RAG chunks, long documents, jobs of
    one to 64 texts, up to 30 jobs arriving per batch): every job, passed over MAX_PASSED_OVER
    times while J jobs waited, is passed over at most MAX_PASSED_OVER + J - 1 times in a row (the
    proof in batcher.py), and every job is finished. With the CPU's padding bound too (the
    encoder's CPU_PADDING): it only keeps texts out of a batch, never the anchor."""
    import random

    rng = random.Random(seed)
    padding = batcher.PaddingBound(ratio=1.5, slack=128) if cpu_padding else None
    stream = Stream(batcher, max_tokens, max_texts, padding)
    for _ in range(150):
        for _ in range(rng.choice([0, 1, 4, 12, 30])):
            kind = rng.random()
            if kind < 0.8:
                stream.arrive([rng.randint(6, 20)])
            elif kind < 0.95:
                stream.arrive([rng.randint(30, window // 2) for _ in range(rng.randint(1, 64))])
            else:
                stream.arrive([window] * rng.randint(1, 6))
        if stream.waiting:
            stream.batch()
    while stream.waiting:
        stream.batch()
    assert len(stream.done_at) == len(stream.jobs)
    assert not stream.over_the_bound, stream.over_the_bound[:5]
    assert max(stream.longest.values()) > batcher.MAX_PASSED_OVER, "the mix never reached the aging rule"
