"""Stream at the network's pace: send everything that is ready, merged, each time the SDK asks.

In production the runpod SDK POSTs every chunk a handler yields to Runpod and waits for that
POST to finish before it asks the handler for the next chunk. A handler that yields one chunk
per token (or per denoising step) therefore pays one network round trip per chunk, and the job
holds its slot long after the model is done: measured through the SDK's real worker loop, a
128-token stream took 16× longer with 50 ms per POST than with instant POSTs.

`coalesced(chunks, merge)` runs the handler's stream in a task of its own, so the model keeps
producing while a POST is in flight. Each time the SDK asks for the next chunk it gets every
chunk that became ready meanwhile, combined by `merge`: consecutive text deltas are joined
(`merge_text`), superseded progress updates are dropped (`keep_latest`), and a text delta ready
together with the chunk that ends its answer goes inside that chunk (`merge_answer`). With a fast
network nothing changes: a chunk that is alone when asked for goes out alone, at once.

`within_result_budget(chunks, max_bytes)` guards the other end: with `return_aggregate_stream`
the job's result is the list of every chunk, and Runpod drops a result over its payload limit
(20 MB for `/runsync`, 10 MB for `/run`), so a stream that would outgrow it stops with a clear
error instead of losing everything.

This file is copied, identical, into every example that streams (each folder is its own Docker
context); `tests/copied_modules/test_coalesce.py` checks that the copies match and exercises each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Combines the chunks that are ready at once into the ones to send, in order.
Merge = Callable[[list[Any]], list[Any]]


class _Failed:
    """The stream raised: the error travels through the queue behind the chunks before it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


async def coalesced(chunks: AsyncIterator[T], merge: Merge) -> AsyncIterator[T]:
    """`chunks`, produced ahead of the consumer and merged by `merge` whenever several wait.

    An error the stream raises is re-raised here after the chunks that came before it. When the
    consumer stops early (the job is cancelled, or the SDK closes the generator), the producing
    task is cancelled and `chunks` is closed, so the model stops too.
    """
    ready: asyncio.Queue[Any] = asyncio.Queue()  # holds at most what one POST's round trip lets pile up

    async def produce() -> None:
        try:
            async for chunk in chunks:
                ready.put_nowait(chunk)
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer, in order
            ready.put_nowait(_Failed(error))
        finally:
            ready.put_nowait(_END)

    producer = asyncio.create_task(produce())
    try:
        while True:
            batch = [await ready.get()]
            while not ready.empty():
                batch.append(ready.get_nowait())
            end = batch[-1] is _END
            failure = next((item for item in batch if isinstance(item, _Failed)), None)
            items = [item for item in batch if item is not _END and not isinstance(item, _Failed)]
            for chunk in merge(items) if items else ():
                yield chunk
            if failure is not None:
                raise failure.error
            if end:
                return
    finally:
        if not producer.done():
            producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _mergeable(a: Any, b: Any) -> bool:
    """Two text chunks that can become one: SSE strings, or dicts alike but for their text."""
    if isinstance(a, str) and isinstance(b, str):
        return True
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
        return False
    if not (isinstance(a.get("text"), str) and isinstance(b.get("text"), str)):
        return False
    return all(a[key] == b[key] for key in a if key != "text")


def merge_text(items: list[Any]) -> list[Any]:
    """Join consecutive text chunks; anything else (finish reasons, usage, errors) stays as it is.

    SSE strings are concatenated (several whole events in one chunk is valid SSE); native
    `{"text": ...}` chunks join their text when every other field is equal (the same choice
    index, for instance). The order of everything is kept, so a client reads the same text.
    """
    merged: list[Any] = []
    for item in items:
        if merged and _mergeable(merged[-1], item):
            last = merged[-1]
            merged[-1] = last + item if isinstance(last, str) else {**last, "text": last["text"] + item["text"]}
        else:
            merged.append(item)
    return merged


def _ends(text: Any, end: Any) -> bool:
    """A native text delta and, after it, the chunk that ends the same choice (its finish reason)."""
    return (
        isinstance(text, dict)
        and isinstance(end, dict)
        and isinstance(text.get("text"), str)
        and set(text) <= {"index", "text"}
        and "finish_reason" in end
        and "text" not in end
        and text.get("index") == end.get("index")
    )


def merge_answer(items: list[Any]) -> list[Any]:
    """`merge_text`, and text ready together with the chunk that ends its choice goes in that chunk:
    `{"text", "finish_reason", "usage"}`, the shape of a whole answer.

    The SDK POSTs each chunk on its own: a last text delta and the end sent apart would cost the
    job a second round trip after its last token. A client that joins every chunk's `text` and
    reads `finish_reason` where it is reads the same answer either way.
    """
    merged: list[Any] = []
    for item in merge_text(items):
        if merged and _ends(merged[-1], item):
            merged[-1] = {**merged[-1], **item}
        else:
            merged.append(item)
    return merged


def keep_latest(is_update: Callable[[Any], bool]) -> Merge:
    """A merge that drops every update overtaken before it could be sent.

    Updates (progress, for instance) only matter while they are the newest news: an update is
    sent only when nothing came after it. Every chunk that is not an update (the result) is kept,
    in order, so progress never delays a result.
    """

    def merge(items: list[Any]) -> list[Any]:
        return [item for i, item in enumerate(items) if not is_update(item) or i == len(items) - 1]

    return merge


class ResultTooLarge(Exception):
    """The aggregated result would pass its byte budget; the stream was stopped before it did."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(f"the result reached {size:,} bytes, over the {max_bytes:,}-byte limit")
        self.size = size
        self.max_bytes = max_bytes


async def within_result_budget(chunks: AsyncIterator[T], max_bytes: int) -> AsyncIterator[T]:
    """`chunks`, while the JSON list of all of them (the aggregated result) fits `max_bytes`.

    Each chunk is measured as the SDK will send it (`json.dumps`, UTF-8); the first one that would
    take the list past the budget raises ResultTooLarge instead of being yielded.
    """
    size = 0  # the list's brackets, less the separator the first chunk does not have
    async for chunk in chunks:
        size += len(json.dumps(chunk, ensure_ascii=False).encode()) + 2  # the chunk and its ", "
        if size > max_bytes:
            raise ResultTooLarge(size, max_bytes)
        yield chunk
