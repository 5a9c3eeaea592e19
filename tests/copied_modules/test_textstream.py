"""textstream.py: streamed generation and its response shapes. One identical copy per text example."""

from __future__ import annotations

import asyncio
import json
from types import ModuleType

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.shared.harness import load_copy, shared_copies

COPIES = shared_copies("textstream.py")


def test_every_copy_is_identical() -> None:
    assert COPIES
    assert len({path.read_text() for path in COPIES}) == 1, "textstream.py copies differ between examples"


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def textstream(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(request.param)


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


def test_native_chunks(textstream: ModuleType) -> None:
    usage = textstream.Usage(5, 3)
    assert textstream.native_chunk(textstream.Delta(text="hi")) == {"text": "hi"}
    last = textstream.native_chunk(textstream.Delta(finish_reason="stop", usage=usage))
    assert last == {"finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


async def deltas_of(textstream: ModuleType, *texts: str):
    for text in texts:
        yield textstream.Delta(text=text)
    yield textstream.Delta(finish_reason="length", usage=textstream.Usage(4, len(texts)))


def collect_all(stream) -> list:
    async def run() -> list:
        return [item async for item in stream]

    return asyncio.run(run())


def test_openai_chat_objects_parse_with_the_openai_types(textstream: ModuleType) -> None:
    shape = textstream.OpenAIShape.new(chat=True, model="m")
    [whole] = collect_all(textstream.openai_responses(shape, deltas_of(textstream, "Hé", "llo"), False, False))
    parsed = ChatCompletion.model_validate(whole)
    assert parsed.choices[0].message.content == "Héllo" and parsed.usage.total_tokens == 6
    events = collect_all(textstream.openai_responses(shape, deltas_of(textstream, "Hé", "llo"), True, True))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[len("data: ") :])) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Hé", "llo"]
    assert chunks[3].choices[0].finish_reason == "length" and chunks[4].choices == []
    assert chunks[4].usage.completion_tokens == 2 and all(c.usage is None for c in chunks[:4])
    assert all(e.startswith("data: ") and e.endswith("\n\n") and e.count("\n\n") == 1 for e in events)


def test_openai_text_completion_objects(textstream: ModuleType) -> None:
    shape = textstream.OpenAIShape.new(chat=False, model="m")
    [whole] = collect_all(textstream.openai_responses(shape, deltas_of(textstream, "a", "b"), False, False))
    assert Completion.model_validate(whole).choices[0].text == "ab"
    events = collect_all(textstream.openai_responses(shape, deltas_of(textstream, "a", "b"), True, False))
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert [b["choices"][0]["text"] for b in bodies] == ["a", "b", ""]
    assert bodies[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in bodies[0]


def test_a_generation_that_finished_in_time_never_reports_the_time_limit(textstream: ModuleType, tiny_model) -> None:
    """The reader falls behind: generation ends within milliseconds, but the rest of its tokens are
    read after the deadline. They were made in time, so they are delivered (on Python 3.11,
    asyncio.wait_for(queue.get(), 0) raises TimeoutError even with items queued)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen3")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    generator = textstream.StreamingGenerator(model, tokenizer, set(), max_concurrency=1, time_limit_s=0.5)
    params = textstream.SamplingParams(max_tokens=8, temperature=0)

    async def slow_reader() -> list:
        deltas = generator.generate(dict(tokenizer("Once upon a time", return_tensors="pt")), params)
        first = await anext(deltas)
        await asyncio.sleep(1.0)  # past the deadline; the generation itself finished long before
        return [first, *[delta async for delta in deltas]]

    *texts, last = asyncio.run(slow_reader())
    assert last.finish_reason == "length" and last.usage.completion_tokens == 8
    assert all(delta.text for delta in texts)


def test_grammar_constraint_makes_any_model_write_the_schema(textstream: ModuleType, tiny_model) -> None:
    """The structured-output entry point other examples reuse: a JSON schema through `generate`."""
    import jsonschema
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen3")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    grammar = textstream.json_schema_grammar(schema)
    eos = [tokenizer.eos_token_id]
    assert (
        textstream.grammar_error(grammar, textstream.grammar_tokenizer(tokenizer, model.config.vocab_size, eos)) == ""
    )
    inputs = tokenizer("Answer:", return_tensors="pt")
    processor = textstream.grammar_constraint(
        tokenizer, model.config.vocab_size, eos, grammar, 1, inputs["input_ids"].shape[1]
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, logits_processor=[processor], eos_token_id=eos)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), schema)
    assert textstream.grammar_error(textstream.json_schema_grammar({"type": "nope"}), None), "a bad schema is named"


def test_logprobs_floor_is_the_smallest_json_the_guaranteed_tokens_take(textstream: ModuleType) -> None:
    params = textstream.SamplingParams(max_tokens=50, ignore_eos=True, logprobs=3, n=2)
    assert textstream.guaranteed_tokens(params) == 50
    assert textstream.guaranteed_tokens(textstream.SamplingParams(max_tokens=50, min_tokens=7)) == 7
    stop = textstream.SamplingParams(max_tokens=50, ignore_eos=True, min_tokens=7, stop=("x",))
    assert textstream.guaranteed_tokens(stop) == 0  # a stop string can end it at any token
    assert textstream.logprobs_floor_bytes(textstream.SamplingParams(max_tokens=50, ignore_eos=True), True) == 0
    # Real tokens and log-probabilities only take more room than the floor counts.
    real = textstream.TokenLogprob("Hello", -0.6931, (("Hello", -0.6931), ("Hi", -1.2), ("Hey", -2.5)))
    for chat, shape in ((True, textstream.chat_logprobs), (False, textstream.completion_logprobs)):
        floor = textstream.logprobs_floor_bytes(params, chat)
        real_size = len(json.dumps(shape([real] * 51))) - len(json.dumps(shape([real])))
        assert 0 < floor <= 2 * real_size
        assert floor > 2 * 50 * 20  # each entry is at least the dozens of bytes of its keys
