"""textstream.py: streamed generation (decoding, stop strings, the time limit). One identical copy
per text example (tests/copied_modules/test_copies.py checks the copies)."""

from __future__ import annotations

import asyncio
import threading
from types import ModuleType

import pytest

from tests.shared.harness import load_copy_beside, shared_copies

COPIES = shared_copies("textstream.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def textstream(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy_beside(request.param)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("qwen3"))


def test_incremental_decoder_never_splits_a_character(textstream: ModuleType, tokenizer) -> None:
    text = "Tokyo 東京 🎉🎊 Здравствуйте naïve 𝔘"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "multi-byte characters span several byte-level tokens"
    decoder = textstream.IncrementalDecoder(tokenizer)
    deltas = [decoder.push(token) for token in ids]
    deltas.append(decoder.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_incremental_decoder_keeps_leading_spaces_after_context(textstream: ModuleType, tokenizer) -> None:
    context = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    decoder = textstream.IncrementalDecoder(tokenizer, context)
    ids = tokenizer(" world", add_special_tokens=False)["input_ids"]
    assert "".join(decoder.push(token) for token in ids) + decoder.flush() == " world"


def test_stop_string_filter_holds_back_possible_starts(textstream: ModuleType) -> None:
    stops = textstream.StopStringFilter(["Observation:", "\n\n"])
    released = [stops.push(piece) for piece in ["Thought: go", " Obs", "erv", "e the", " sky\n", "\nnever"]]
    assert released == ["Thought: go", " ", "", "Observe the", " sky", ""]
    assert stops.stopped and stops.flush() == ""
    unfinished = textstream.StopStringFilter(["END"])
    assert unfinished.push("the EN") == "the " and unfinished.flush() == "EN"


def test_a_generation_that_finished_in_time_never_reports_the_time_limit(textstream: ModuleType, tiny_model) -> None:
    """The reader falls behind: generation ends before the deadline, but the rest of its tokens are
    read after it. They were made in time, so they are delivered (on Python 3.11,
    asyncio.wait_for(queue.get(), 0) raises TimeoutError even with items queued). The event loop's
    clock stands still until generation has ended, then jumps past the limit: no race with the
    machine's speed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen3")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    generator = textstream.StreamingGenerator(model, tokenizer, set(), max_concurrency=1, time_limit_s=0.5)
    params = textstream.SamplingParams(max_tokens=8, temperature=0)
    generated = threading.Event()
    run = generator._run

    def run_then_tell(kwargs: dict) -> None:
        run(kwargs)  # its last step queues the end of the stream
        generated.set()

    generator._run = run_then_tell

    async def slow_reader() -> list:
        loop = asyncio.get_running_loop()
        now = [loop.time()]
        loop.time = lambda: now[0]  # the deadline is read from this clock
        try:
            deltas = generator.generate(dict(tokenizer("Once upon a time", return_tensors="pt")), params)
            first = await anext(deltas)
            await asyncio.to_thread(generated.wait)  # generation has ended and queued every token
            now[0] += 10 * generator.time_limit_s  # the reader comes back long past the deadline
            return [first, *[delta async for delta in deltas]]
        finally:
            del loop.time

    *texts, last = asyncio.run(slow_reader())
    assert last.finish_reason == "length" and last.usage.completion_tokens == 8
    assert all(delta.text for delta in texts)
