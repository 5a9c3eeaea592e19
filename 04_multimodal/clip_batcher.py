"""Dynamic batching for CLIP and SigLIP: the encodes of concurrent jobs share forward passes.

Thirty-two jobs of one image each cost thirty-two small forward passes when they run one by one;
a GPU (and even a CPU) encodes the thirty-two images in one pass for little more than the cost of
one. As in the embeddings worker's batcher (the design Infinity and TEI use), a batch starts with the first
waiting encode and closes after `wait_s` (a few milliseconds, far below a network round trip) or
once it holds `max_items` images or `max_items` distinct texts (images and texts are separate
forward passes, each bounded on its own); encodes that arrive while a batch runs form the next one.
A job's encode of more than `max_items` rows (an OpenAI request of 2,048 texts) queues as parts of
`max_items`, each after the one before it is answered: no forward pass holds more than about two
batches' rows whatever a job sends, and the encodes of other jobs go in between its parts, so one
huge job cannot hold the others back. Images and texts of the same batch each get one
forward pass (a text several jobs send, such as the same labels, is encoded once); results are
split back per job.

A batch that fails is split in halves and each half retried, down to one job's encode, as the
embeddings worker does: an input that breaks the model (or a batch too big for the GPU's memory,
whose cache is given back before the retry) fails only its own job, and the others get the
results they get alone. A lost GPU (`torch.AcceleratorError`) fails the whole batch at once: no
retry can bring it back.

Every job's images are preprocessed (resized, normalised) on its own, before it queues, so the
model thread only runs forward passes; a batched result equals the job's solo result (the tests
check it to float precision).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import runpod
import torch

from contrastive import ContrastiveModel

log = runpod.RunPodLogger()

# Failures no smaller batch can get past: the CUDA context is lost, every job of the batch fails.
FATAL_ERRORS: tuple[type[BaseException], ...] = (torch.AcceleratorError,)
# How many batches' worth of jobs a contrastive worker holds (its default MAX_CONCURRENCY, in
# units of BATCH_MAX_ITEMS one-image jobs): one batch on the model while the next one gathers,
# so the model never waits for the SDK to take jobs (a full worker asks for more once a second).
BATCHES_IN_FLIGHT = 2


def jobs_to_fill(max_items: int) -> int:
    """The jobs a CLIP / SigLIP worker takes at once so its batches fill: one-image jobs enough for
    the batch being encoded and the one gathering behind it."""
    return BATCHES_IN_FLIGHT * max_items


@dataclass
class Waiting:
    kind: str  # "images" or "texts"
    payload: Any  # preprocessed image tensors, or a list of texts
    count: int  # rows this job adds to the batch
    result: asyncio.Future[torch.Tensor]

    def rows(self) -> set[str] | int:
        """What this encode adds to its kind's forward pass: its image count, or its texts (a text
        several jobs of the batch send is encoded once)."""
        return self.count if self.kind == "images" else set(self.payload)


class BatchSize:
    """A forming batch's images and distinct texts: it is full once either reaches `max_items`."""

    def __init__(self, max_items: int) -> None:
        self.max_items, self.images = max_items, 0
        self.texts: set[str] = set()

    def add(self, waiting: Waiting) -> None:
        rows = waiting.rows()
        if isinstance(rows, int):
            self.images += rows
        else:
            self.texts |= rows

    def full(self) -> bool:
        return self.images >= self.max_items or len(self.texts) >= self.max_items


def unique_text_rows(model: ContrastiveModel, texts: list[str]) -> torch.Tensor:
    """Each distinct text of the batch encoded once: bulk zero-shot jobs send the same labels with
    every image, so 32 concurrent classify jobs of 10 labels need 10 captions encoded, not 320."""
    position = {text: index for index, text in enumerate(dict.fromkeys(texts))}
    encoded = model.encode_texts(list(position))
    return encoded[torch.tensor([position[text] for text in texts], dtype=torch.long)]


def encode_many(model: ContrastiveModel, batch: list[Waiting]) -> list[torch.Tensor]:
    """One forward pass per kind for the whole batch, split back into each job's rows."""
    results: list[torch.Tensor | None] = [None] * len(batch)
    for kind in ("images", "texts"):
        members = [index for index, waiting in enumerate(batch) if waiting.kind == kind]
        if not members:
            continue
        if kind == "images":
            names = batch[members[0]].payload.keys()
            merged = {name: torch.cat([batch[i].payload[name] for i in members]) for name in names}
            rows = model.encode_images(merged)
        else:
            rows = unique_text_rows(model, [text for i in members for text in batch[i].payload])
        start = 0
        for index in members:
            results[index] = rows[start : start + batch[index].count]
            start += batch[index].count
    return results


class EncodeBatcher:
    """Collects the image and text encodes of concurrent jobs and runs them together on `executor`
    (one thread that owns the model). With `enabled=False` each encode runs alone, in arrival order."""

    def __init__(
        self, model: ContrastiveModel, executor: Executor, max_items: int, wait_s: float, enabled: bool = True
    ) -> None:
        self.model, self.executor = model, executor
        self.max_items, self.wait_s, self.enabled = max_items, wait_s, enabled
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[Waiting] | None = None
        self.collector: asyncio.Task[None] | None = None
        self.batches = 0  # forward-pass rounds made (retries of a split batch included), for the logs and tests

    async def images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        count, step = int(pixels["pixel_values"].shape[0]), self.max_items
        # Every tensor the image processor returns has a row per image (SigLIP 2's patch mask and grid too).
        parts = ({name: rows[start : start + step] for name, rows in pixels.items()} for start in range(0, count, step))
        return await self._in_parts(Waiting("images", part, int(part["pixel_values"].shape[0]), None) for part in parts)

    async def texts(self, texts: list[str]) -> torch.Tensor:
        parts = (texts[start : start + self.max_items] for start in range(0, len(texts), self.max_items))
        return await self._in_parts(Waiting("texts", part, len(part), None) for part in parts)

    async def _in_parts(self, parts: Iterator[Waiting]) -> torch.Tensor:
        """One job's rows, `max_items` at a time, each part queued once the one before it is answered:
        a batch holds at most `max_items` rows of one job (plus what other jobs add before it closes),
        so 2,048 texts cost 32 passes' memory one after another, never one pass's all at once, and
        another job's encode queued meanwhile is batched before this job's next part."""
        return torch.cat([await self._encode(part) for part in parts])

    async def _encode(self, waiting: Waiting) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self.batches += 1
            [rows] = await loop.run_in_executor(self.executor, encode_many, self.model, [waiting])
            return rows
        if self.loop is not loop:  # one collector per event loop (Runpod runs one for the worker's life)
            self.loop, self.queue = loop, asyncio.Queue()
            self.collector = loop.create_task(self._collect(self.queue))  # held: a loop keeps only weak refs
        waiting.result = loop.create_future()
        self.queue.put_nowait(waiting)
        return await waiting.result

    async def _collect(self, queue: asyncio.Queue[Waiting]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            size, deadline = BatchSize(self.max_items), loop.time() + self.wait_s
            size.add(batch[0])
            while not size.full():
                # get_nowait first: on Python 3.11, wait_for(..., 0) times out even when an item is queued.
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
                size.add(batch[-1])
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Waiting]) -> None:
        """Encode `batch` on the model thread and answer each of its encodes; a failed batch is
        split in halves and each retried, so an encode that fails alone fails only its own job."""
        batch = [waiting for waiting in batch if not waiting.result.done()]  # a cancelled job no longer waits
        if not batch:
            return
        self.batches += 1
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, encode_many, self.model, batch)
        except Exception as error:  # noqa: BLE001 - each encode gets its own outcome below
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # before the retry: the halves need the memory the whole one held
            if len(batch) == 1 or isinstance(error, FATAL_ERRORS):
                for waiting in batch:
                    if not waiting.result.done():
                        waiting.result.set_exception(error)
                return
            log.warn(f"A batch of {len(batch)} encodes failed ({type(error).__name__}); retrying it in halves")
            middle = len(batch) // 2
            await self._run(loop, batch[:middle])
            await self._run(loop, batch[middle:])
            return
        size = BatchSize(self.max_items)
        for waiting in batch:
            size.add(waiting)
        log.info(
            f"Encoded a batch of {len(batch)} encodes: {size.images} images, {len(size.texts)} distinct texts"
            f" in {(time.perf_counter() - started) * 1000:.0f} ms"
        )
        for waiting, rows in zip(batch, results, strict=True):
            if not waiting.result.done():  # a cancelled job no longer waits
                waiting.result.set_result(rows)
