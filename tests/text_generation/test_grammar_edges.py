"""01_text_generation on the transformers engine: where a grammar meets the rest of generation.

* A forced tool call (tool_choice "required" or a named function) is always one whole, valid call,
  also on a model whose <tool_call> tag is an added token (Qwen3's tokenizers), whatever it samples.
* min_tokens never leaves a grammar without a token: once the grammar can only end, it ends (vLLM).
* A grammar compiles off the event loop: other streams keep streaming while a large one compiles.
"""

from __future__ import annotations

import asyncio
import json
import threading
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from openai.types.chat import ChatCompletion

from tests.shared.chat_tools import CLOCK
from tests.shared.harness import load_handler, ok, openai_chat, run_job

EXAMPLE = "01_text_generation"
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 200}
SEEDS = range(20)  # seeded, so each run samples the same 20 answers
# The longest a test waits for the other side of a handshake: only a broken build ever waits it out.
HANDSHAKE_TIMEOUT_S = 60

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {tool["function"]["name"]: tool for tool in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def added_tags(tiny_model) -> ModuleType:
    """A tiny Qwen3 whose <think>, </think>, <tool_call> and </tool_call> are added tokens of one id
    each, as in the real tokenizers (llguidance keeps such tokens apart from text)."""
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3-vllm"))})


@pytest.fixture(scope="module")
def qwen(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3"))})


def assert_whole_calls(response: dict[str, Any], names: set[str], parallel: bool = False) -> list[Any]:
    """One whole, valid call (with `parallel`, one or more; a random model may go on calling until
    max_tokens, which then ends the answer, as in vLLM, with its whole calls parsed)."""
    choice = ChatCompletion.model_validate(response).choices[0]
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1), response
    assert choice.finish_reason == "tool_calls" or (parallel and choice.finish_reason == "length"), response
    for call in calls:
        assert call.function.name in names, response
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])
    return calls


def sse_payloads(chunks: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a streamed OpenAI job's events, [DONE] left out."""
    events = [event for chunk in chunks for event in chunk.split("\n\n") if event]
    assert events[-1] == "data: [DONE]", events[-1]
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


# ---- forced tool calls ------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_choice_always_gives_whole_calls(added_tags, parallel: bool) -> None:
    body = {"messages": CHAT, "tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": parallel}
    for seed in SEEDS:
        [response] = ok(
            run_job(added_tags.handler, openai_chat({**body, "temperature": 1.0, "seed": seed, "max_tokens": 200}))
        )
        assert_whole_calls(response, set(TOOLS), parallel)


def test_a_named_tool_choice_always_gives_that_call(added_tags) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": CHAT, "tools": [WEATHER, CLOCK], "tool_choice": named, "temperature": 1.0, "max_tokens": 200}
    for seed in SEEDS:
        [response] = ok(run_job(added_tags.handler, openai_chat({**body, "seed": seed})))
        assert_whole_calls(response, {"get_weather"})


def test_a_forced_call_cannot_end_before_it_is_whole(added_tags) -> None:
    """The end-of-turn token favoured over everything else still waits for the closing tag."""
    end = added_tags.ENGINE.tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = {"messages": CHAT, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    [response] = ok(
        run_job(
            added_tags.handler,
            openai_chat({**body, "temperature": 0, "max_tokens": 200, "logit_bias": {str(end): 100}}),
        )
    )
    assert_whole_calls(response, {"get_weather"})


def test_the_tag_is_the_added_token_where_the_tokenizer_has_one(added_tags, qwen) -> None:
    """Where <tool_call> is one added token the grammar asks for that token, else for the text."""
    body = {"messages": CHAT, "tools": [CLOCK], "tool_choice": "required", "parallel_tool_calls": False}
    for module, tag_is_a_token in ((added_tags, True), (qwen, False)):
        [response] = ok(run_job(module.handler, openai_chat({**body, **GREEDY, "logprobs": True})))
        assert_whole_calls(response, {"get_time"})
        first = response["choices"][0]["logprobs"]["content"][0]["token"]
        assert (first == "<tool_call>") is tag_is_a_token, first


# ---- min_tokens with a grammar ----------------------------------------------------------------

SHORT = {
    "type": "object",
    "properties": {"ok": {"const": True}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_ends_where_the_grammar_ends(qwen, stream: bool) -> None:
    """vLLM's rule: min_tokens holds the end back unless the grammar allows nothing else."""
    response_format = {"type": "json_schema", "json_schema": {"name": "short", "schema": SHORT}}
    body = {"messages": CHAT, "response_format": response_format, "temperature": 1.0, "seed": 0}
    output = ok(
        run_job(
            qwen.handler,
            openai_chat({**body, "min_tokens": 100, "max_tokens": 200, "stream": stream}),
        )
    )
    if stream:
        events = sse_payloads(output)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        text, finish = output[0]["choices"][0]["message"]["content"], output[0]["choices"][0]["finish_reason"]
    assert json.loads(text) == {"ok": True} and finish == "stop"


def test_min_tokens_still_holds_while_the_grammar_allows_more(qwen) -> None:
    end = qwen.ENGINE.tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = {"messages": CHAT, "structured_outputs": {"regex": "[a-z]+"}, "temperature": 0, "max_tokens": 50}
    [response] = ok(run_job(qwen.handler, openai_chat({**body, "logit_bias": {str(end): 100}, "min_tokens": 7})))
    assert response["usage"]["completion_tokens"] == 8 and response["choices"][0]["finish_reason"] == "stop"
    assert response["choices"][0]["message"]["content"].isalpha()


# ---- compiling off the event loop -------------------------------------------------------------


def test_other_streams_go_on_while_a_grammar_compiles(qwen, monkeypatch) -> None:
    """A compile held inside the engine (a stand-in for a slow, large schema) while a second job
    streams: the second job streams to its end before the compile is let go."""
    generator_globals = type(qwen.ENGINE.generator).generate.__globals__  # textstream.py, as loaded
    compile_grammar = generator_globals["grammar_constraint"]
    entered, release = threading.Event(), threading.Event()
    state = {"compiling": False, "held_out": False}

    def held_compile(*args: Any, **kwargs: Any) -> Any:
        state["compiling"] = True
        entered.set()
        state["held_out"] = not release.wait(HANDSHAKE_TIMEOUT_S)  # only on the event loop: nothing sets it
        state["compiling"] = False
        return compile_grammar(*args, **kwargs)

    monkeypatch.setitem(generator_globals, "grammar_constraint", held_compile)
    schema_job = {"messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 20, "temperature": 0}
    plain_job = {"messages": CHAT, "temperature": 0, "max_tokens": 12, "ignore_eos": True, "stream": True}
    plain_job["stream_options"] = {"include_usage": True}

    async def run(job_input: dict[str, Any], during: list[bool]) -> list[Any]:
        chunks = []
        async for chunk in qwen.handler({"id": "job", "input": job_input}):
            during.append(state["compiling"])
            chunks.append(chunk)
        return chunks

    async def both() -> tuple[list[Any], list[bool], list[Any]]:
        schema_task = asyncio.create_task(run(openai_chat(schema_job), []))
        assert await asyncio.to_thread(entered.wait, HANDSHAKE_TIMEOUT_S), "the grammar was never compiled"
        during: list[bool] = []
        plain = await run(openai_chat(plain_job), during)
        release.set()
        return plain, during, await schema_task

    plain, during, [schema_answer] = asyncio.run(both())
    events = sse_payloads(plain)
    assert not state["held_out"], "the compile held the event loop: nothing else could run"
    assert during and all(during), "every chunk of the other job came while the grammar compiled"
    # ... and they held its whole answer: all 12 tokens, then the end.
    assert events[-1]["usage"]["completion_tokens"] == 12, events[-1]
    assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]
    assert schema_answer["choices"][0]["message"]["content"].startswith("{")
