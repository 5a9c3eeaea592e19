"""coalesce.py: streams that keep up with a slow consumer, in every example that streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.shared.harness import load_copy, shared_copies

COPIES = shared_copies("coalesce.py")


@pytest.fixture(params=COPIES, ids=lambda path: path.parent.name)
def coalesce(request: pytest.FixtureRequest) -> ModuleType:
    path: Path = request.param
    return load_copy(path)


async def ticking(items: list[Any], every_s: float = 0.0, fail: Exception | None = None) -> AsyncIterator[Any]:
    for item in items:
        await asyncio.sleep(every_s)
        yield item
    if fail is not None:
        raise fail


async def consume(stream: AsyncIterator[Any], per_chunk_s: float) -> list[Any]:
    """Like the SDK: after each chunk, a POST of `per_chunk_s` before asking for the next one."""
    received = []
    async for chunk in stream:
        received.append(chunk)
        await asyncio.sleep(per_chunk_s)
    return received


def test_merge_text_joins_consecutive_text_and_keeps_everything_else_in_order(coalesce: ModuleType) -> None:
    finish = {"finish_reason": "stop", "usage": {"prompt_tokens": 1}}
    items = [{"text": "Hel"}, {"text": "lo"}, finish, {"text": "!"}]
    assert coalesce.merge_text(items) == [{"text": "Hello"}, finish, {"text": "!"}]
    events = ['data: {"a": 1}\n\n', 'data: {"b": 2}\n\n']
    assert coalesce.merge_text(events) == ["".join(events)]
    # Chunks of different choices never merge: their other fields differ.
    choices = [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}, {"index": 1, "text": "c"}]
    assert coalesce.merge_text(choices) == [{"index": 0, "text": "a"}, {"index": 1, "text": "bc"}]


def test_merge_answer_puts_the_text_ready_with_the_end_in_the_end(coalesce: ModuleType) -> None:
    """The SDK POSTs each chunk on its own: a last text delta apart from the end costs a round trip."""
    end = {"finish_reason": "length", "usage": {"completion_tokens": 3}}
    assert coalesce.merge_answer([{"text": "a"}, {"text": "b"}, end]) == [{"text": "ab", **end}]
    assert coalesce.merge_answer([end]) == [end]
    assert coalesce.merge_answer([{"text": "a"}]) == [{"text": "a"}]
    # Only into the end of the same choice, and only a plain text delta.
    many = [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}, {"index": 1, "finish_reason": "stop"}]
    assert coalesce.merge_answer(many) == [many[0], {"index": 1, "text": "b", "finish_reason": "stop"}]
    assert coalesce.merge_answer([{"index": 0, "text": "a"}, {"index": 1, "finish_reason": "stop"}]) == [
        {"index": 0, "text": "a"},
        {"index": 1, "finish_reason": "stop"},
    ]
    logprobs = [{"text": "a"}, {"logprobs": {"content": []}}, end]
    assert coalesce.merge_answer(logprobs) == logprobs
    assert coalesce.merge_answer([{"usage": {}}]) == [{"usage": {}}]  # n > 1: the usage ends no choice
    events = ['data: {"a": 1}\n\n', "data: [DONE]\n\n"]
    assert coalesce.merge_answer(events) == ["".join(events)]


def test_keep_latest_drops_overtaken_updates_and_never_a_result(coalesce: ModuleType) -> None:
    merge = coalesce.keep_latest(lambda item: item.get("kind") == "progress")
    p1, p2, p3 = ({"kind": "progress", "step": step} for step in (1, 2, 3))
    result = {"kind": "result", "images": ["..."]}
    assert merge([p1, p2, p3]) == [p3]
    assert merge([p1, p2, result]) == [result]  # the result makes every update before it stale
    assert merge([result]) == [result]


def test_a_slow_consumer_gets_fewer_chunks_with_the_same_content(coalesce: ModuleType) -> None:
    tokens = [{"text": f"t{i} "} for i in range(40)]
    fast = asyncio.run(consume(coalesce.coalesced(ticking(tokens, 0.001), coalesce.merge_text), 0.0))
    slow = asyncio.run(consume(coalesce.coalesced(ticking(tokens, 0.001), coalesce.merge_text), 0.02))
    text = "".join(token["text"] for token in tokens)
    assert "".join(chunk["text"] for chunk in fast) == text
    assert "".join(chunk["text"] for chunk in slow) == text
    assert len(slow) < len(tokens) / 3  # most tokens went out together
    assert slow[0] == tokens[0]  # the first chunk is never held back


def test_the_stream_is_produced_while_the_consumer_waits(coalesce: ModuleType) -> None:
    """The consumer's POST here ends only once the source has produced its last item: a stream that
    waited for its consumer would never get there. Everything produced during that POST goes out
    together in the next chunk, so 20 items arrive in exactly 2 chunks."""

    async def run() -> tuple[list[list[int]], int]:
        produced: list[int] = []
        all_produced = asyncio.Event()

        async def source() -> AsyncIterator[int]:
            for item in range(20):
                produced.append(item)
                yield item
                await asyncio.sleep(0)  # one turn of the event loop per item, like a token
            all_produced.set()

        received: list[list[int]] = []
        produced_before_the_post = -1
        async for chunk in coalesce.coalesced(source(), lambda items: [list(items)]):
            received.append(chunk)
            if len(received) == 1:
                produced_before_the_post = len(produced)
                # The POST. The timeout only turns a hang into a failure; nothing is measured.
                await asyncio.wait_for(all_produced.wait(), timeout=30)
        return received, produced_before_the_post

    received, produced_before_the_post = asyncio.run(run())
    assert [item for chunk in received for item in chunk] == list(range(20))
    assert produced_before_the_post < 20 and len(received) == 2  # the rest was made during the POST


def test_an_error_comes_after_the_chunks_before_it(coalesce: ModuleType) -> None:
    async def run() -> tuple[list[Any], Exception | None]:
        received: list[Any] = []
        try:
            async for chunk in coalesce.coalesced(ticking(["a", "b"], fail=RuntimeError("boom")), coalesce.merge_text):
                received.append(chunk)
        except RuntimeError as error:
            return received, error
        return received, None

    received, error = asyncio.run(run())
    assert "".join(received) == "ab"
    assert str(error) == "boom"


def test_closing_early_stops_the_source(coalesce: ModuleType) -> None:
    closed = asyncio.Event()
    produced: list[int] = []

    async def endless() -> AsyncIterator[int]:
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> None:
        stream = coalesce.coalesced(endless(), coalesce.merge_text)
        async for _ in stream:
            break
        await stream.aclose()
        count = len(produced)
        await asyncio.sleep(0.05)
        assert closed.is_set()
        assert len(produced) == count  # nothing runs on after the consumer left

    asyncio.run(run())


def test_cancelling_the_consumer_cancels_the_producer(coalesce: ModuleType) -> None:
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(60)
            yield 2
        finally:
            closed.set()

    async def run() -> None:
        async def job() -> None:
            async for _ in coalesce.coalesced(slow(), coalesce.merge_text):
                pass

        task = asyncio.create_task(job())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed.is_set()

    asyncio.run(run())


def test_a_stream_stops_before_its_aggregated_result_outgrows_the_budget(coalesce: ModuleType) -> None:
    chunks = [{"text": "x" * 100} for _ in range(50)]  # 50 chunks of 114 JSON bytes each

    async def run(max_bytes: int) -> tuple[list[Any], Exception | None]:
        received: list[Any] = []
        try:
            async for chunk in coalesce.within_result_budget(ticking(chunks), max_bytes):
                received.append(chunk)
        except coalesce.ResultTooLarge as error:
            return received, error
        return received, None

    everything = json.dumps(chunks, ensure_ascii=False)
    received, error = asyncio.run(run(len(everything)))
    assert received == chunks and error is None  # exactly at the limit: all of it
    received, error = asyncio.run(run(len(everything) - 1))
    assert received == chunks[:-1]  # the chunk that would pass the limit is never sent
    assert error is not None and error.max_bytes == len(everything) - 1
    assert len(json.dumps(received)) <= error.max_bytes
