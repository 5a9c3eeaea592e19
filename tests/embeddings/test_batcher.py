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
