"""response_shapes.py: deltas into native chunks and OpenAI objects. One identical copy per text
example (tests/copied_modules/test_copies.py checks the copies); each copy is tested with the
textstream.py beside it, whose types it shapes."""

from __future__ import annotations

import asyncio
import json
from types import ModuleType

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.shared.harness import load_copy_beside, shared_copies

COPIES = shared_copies("response_shapes.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def shapes(request: pytest.FixtureRequest) -> ModuleType:
    """The copy's response shapes; its namespace has the engine's data types it shapes (Delta, Usage...)."""
    return load_copy_beside(request.param)


def test_native_chunks(shapes: ModuleType) -> None:
    usage = shapes.Usage(5, 3)
    assert shapes.native_chunk(shapes.Delta(text="hi")) == {"text": "hi"}
    last = shapes.native_chunk(shapes.Delta(finish_reason="stop", usage=usage))
    assert last == {"finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


async def deltas_of(shapes: ModuleType, *texts: str):
    for text in texts:
        yield shapes.Delta(text=text)
    yield shapes.Delta(finish_reason="length", usage=shapes.Usage(4, len(texts)))


def collect_all(stream) -> list:
    async def run() -> list:
        return [item async for item in stream]

    return asyncio.run(run())


def test_openai_chat_objects_parse_with_the_openai_types(shapes: ModuleType) -> None:
    shape = shapes.OpenAIShape.new(chat=True, model="m")
    [whole] = collect_all(shapes.openai_responses(shape, deltas_of(shapes, "Hé", "llo"), False, False))
    parsed = ChatCompletion.model_validate(whole)
    assert parsed.choices[0].message.content == "Héllo" and parsed.usage.total_tokens == 6
    events = collect_all(shapes.openai_responses(shape, deltas_of(shapes, "Hé", "llo"), True, True))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[len("data: ") :])) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Hé", "llo"]
    assert chunks[3].choices[0].finish_reason == "length" and chunks[4].choices == []
    assert chunks[4].usage.completion_tokens == 2 and all(c.usage is None for c in chunks[:4])
    assert all(e.startswith("data: ") and e.endswith("\n\n") and e.count("\n\n") == 1 for e in events)


def test_openai_text_completion_objects(shapes: ModuleType) -> None:
    shape = shapes.OpenAIShape.new(chat=False, model="m")
    [whole] = collect_all(shapes.openai_responses(shape, deltas_of(shapes, "a", "b"), False, False))
    assert Completion.model_validate(whole).choices[0].text == "ab"
    events = collect_all(shapes.openai_responses(shape, deltas_of(shapes, "a", "b"), True, False))
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert [b["choices"][0]["text"] for b in bodies] == ["a", "b", ""]
    assert bodies[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in bodies[0]


def test_logprobs_floor_is_the_smallest_json_the_guaranteed_tokens_take(shapes: ModuleType) -> None:
    params = shapes.SamplingParams(max_tokens=50, ignore_eos=True, logprobs=3, n=2)
    assert shapes.guaranteed_tokens(params) == 50
    assert shapes.guaranteed_tokens(shapes.SamplingParams(max_tokens=50, min_tokens=7)) == 7
    stop = shapes.SamplingParams(max_tokens=50, ignore_eos=True, min_tokens=7, stop=("x",))
    assert shapes.guaranteed_tokens(stop) == 0  # a stop string can end it at any token
    assert shapes.logprobs_floor_bytes(shapes.SamplingParams(max_tokens=50, ignore_eos=True), True) == 0
    # Real tokens and log-probabilities only take more room than the floor counts.
    real = shapes.TokenLogprob("Hello", -0.6931, (("Hello", -0.6931), ("Hi", -1.2), ("Hey", -2.5)))
    for chat, shape in ((True, shapes.chat_logprobs), (False, shapes.completion_logprobs)):
        floor = shapes.logprobs_floor_bytes(params, chat)
        real_size = len(json.dumps(shape([real] * 51))) - len(json.dumps(shape([real])))
        assert 0 < floor <= 2 * real_size
        assert floor > 2 * 50 * 20  # each entry is at least the dozens of bytes of its keys
