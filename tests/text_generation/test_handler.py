"""01_text_generation: the handler on tiny random-weight models of six real LLM families."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.shared.chat_tools import CLOCK
from tests.shared.harness import (
    REPO,
    DevServer,
    json_lines,
    lazy_handlers,
    load_copy,
    load_copy_beside,
    load_handler,
    ok,
    openai_chat,
    openai_failure,
    run_job,
    run_job_async,
    run_local,
)
from tests.shared.openai_gateway import runpod_gateway

EXAMPLE = "01_text_generation"
FAMILIES = ["llama", "mistral", "mixtral", "qwen3", "phi3", "gemma3"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per tiny model, built on first use and shared by the module's tests."""
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


@pytest.fixture(scope="module")
def qwen(handlers) -> ModuleType:
    return handlers["qwen3"]


def native(handler_module: ModuleType, **request: Any) -> list[Any]:
    return ok(run_job(handler_module.handler, request))


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk.get("text", "") for chunk in chunks)


def raw_greedy(module: ModuleType, prompt_text: str, is_chat: bool, max_new_tokens: int) -> tuple[str, list[int]]:
    """What transformers' own greedy generate gives for the same prompt: the reference output."""
    engine = module.ENGINE
    ids = engine.tokenizer(prompt_text, add_special_tokens=not is_chat, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(engine.eos_token_ids),
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return engine.tokenizer.decode(new, skip_special_tokens=True), new


# ---- every family, every route ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_streams_native_and_openai(handlers, family: str) -> None:
    module = handlers[family]
    assert type(module.ENGINE.model).__name__.lower().startswith(family.rstrip("0123456789"))

    chunks = native(module, messages=CHAT, sampling_params=GREEDY, stream=True)
    *texts, last = chunks
    assert all(set(c) == {"text"} and c["text"] for c in texts), "text chunks are never empty"
    # The last chunk carries the text that was ready with the end (coalesce.merge_answer), if any.
    assert set(last) - {"text"} == {"finish_reason", "usage"} and last.get("text") != ""
    assert last["finish_reason"] in ("stop", "length")
    prompt = module.render_prompt(module.GenerateRequest(messages=CHAT))
    assert last["usage"]["prompt_tokens"] == prompt.tokens
    assert 1 <= last["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    assert last["usage"]["total_tokens"] == prompt.tokens + last["usage"]["completion_tokens"]

    # The same greedy request unstreamed, and through transformers directly, say the same thing.
    [whole] = native(module, messages=CHAT, sampling_params=GREEDY)
    reference, reference_ids = raw_greedy(module, prompt.text, True, GREEDY["max_tokens"])
    assert whole["text"] == streamed_text(chunks) == reference
    assert whole["usage"] == last["usage"] and last["usage"]["completion_tokens"] == len(reference_ids)

    [completion] = ok(run_job(module.handler, openai_chat({"messages": CHAT, **GREEDY})))
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.choices[0].message.content == reference
    assert parsed.choices[0].finish_reason == last["finish_reason"]

    events = ok(run_job(module.handler, openai_chat({"messages": CHAT, **GREEDY, "stream": True})))
    assert "".join(c.choices[0].delta.content or "" for c in parse_sse(events) if c.choices) == reference


def test_raw_prompt_is_a_completion_of_that_text(qwen) -> None:
    [whole] = native(qwen, prompt="The weather today is", sampling_params=GREEDY)
    reference, _ = raw_greedy(qwen, "The weather today is", False, GREEDY["max_tokens"])
    assert whole["text"] == reference


def test_a_trailing_assistant_turn_starts_a_new_turn_unless_continue_final_message(qwen) -> None:
    turns = [*CHAT, {"role": "assistant", "content": "The capital is"}]
    new_turn = qwen.render_prompt(qwen.GenerateRequest(messages=turns))
    assert new_turn.text.endswith("The capital is<|im_end|>\n<|im_start|>assistant\n"), "vLLM's default"
    continued = qwen.render_prompt(
        qwen.GenerateRequest(messages=turns, continue_final_message=True, add_generation_prompt=False)
    )
    assert continued.text.endswith("The capital is")
    bare = qwen.render_prompt(qwen.GenerateRequest(messages=CHAT, add_generation_prompt=False))
    assert bare.text.endswith("<|im_end|>\n") and not bare.text.endswith("assistant\n")
    body = {"messages": turns, "continue_final_message": True, "add_generation_prompt": False, **GREEDY}
    [continuation] = ok(run_job(qwen.handler, openai_chat(body)))
    reference, _ = raw_greedy(qwen, continued.text, True, GREEDY["max_tokens"])
    assert ChatCompletion.model_validate(continuation).choices[0].message.content == reference
    both = run_job(qwen.handler, openai_chat({"messages": turns, "continue_final_message": True}))
    assert "set add_generation_prompt to false to continue the last message" in both["error"]


def test_developer_role_is_the_system_role(qwen) -> None:
    as_developer = [{"role": "developer", "content": "You are terse."}, CHAT[1]]
    assert (
        qwen.render_prompt(qwen.GenerateRequest(messages=as_developer)).text
        == qwen.render_prompt(qwen.GenerateRequest(messages=CHAT)).text
    )


def test_a_chat_template_refusal_is_a_clear_error(handlers) -> None:
    two_systems = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, CHAT[1]]
    result = run_job(handlers["mistral"].handler, {"messages": two_systems})
    assert result["error"].startswith("messages: the model's chat template refused them:")
    assert "Traceback" not in result["error"]


def test_content_parts_are_joined_by_newlines_as_vllm_joins_them(qwen) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    prompt = qwen.render_prompt(qwen.GenerateRequest.model_validate({"messages": parts}))
    assert "Hello\nthere" in prompt.text


# ---- sampling --------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output(qwen) -> None:
    def sample(seed: int) -> str:
        params = {"temperature": 1.0, "max_tokens": 32, "seed": seed}
        return native(qwen, messages=CHAT, sampling_params=params)[0]["text"]

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_top_k_1_is_greedy(qwen) -> None:
    greedy = native(qwen, messages=CHAT, sampling_params=GREEDY)[0]["text"]
    top1 = native(qwen, messages=CHAT, sampling_params={"temperature": 1.5, "top_k": 1, "max_tokens": 24, "seed": 3})
    assert top1[0]["text"] == greedy


def test_stop_string_cuts_the_text_and_finishes_with_stop(qwen) -> None:
    greedy = native(qwen, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 40})[0]["text"]
    stop = greedy[10:14]
    assert stop.strip(), "pick a stop string inside the greedy text"
    expected = greedy[: greedy.index(stop)]
    for stream in (False, True):
        chunks = native(
            qwen, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 40, "stop": stop}, stream=stream
        )
        assert streamed_text(chunks) == expected
        assert chunks[-1]["finish_reason"] == "stop"
        assert all(stop not in c.get("text", "") for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] < 40


def test_max_tokens_finishes_with_length(qwen) -> None:
    [whole] = native(qwen, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 3})
    if whole["finish_reason"] == "length":
        assert whole["usage"]["completion_tokens"] == 3
    else:  # the model ended its turn first
        assert whole["usage"]["completion_tokens"] < 3


def test_resolve_sampling_prefers_request_then_model_then_usual(qwen) -> None:
    sampling = qwen.Sampling(top_p=0.5)
    params = qwen.resolve_sampling(sampling, 10, {"temperature": 0.6, "top_p": 0.9}, 100, 512)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.5, 0, 1.0)
    assert params.max_tokens == 90  # the default 512 shrinks to the room the context leaves
    assert qwen.resolve_sampling(qwen.Sampling(top_k=-1), 10, {}, 100, 50).top_k == 0


def test_engine_choice(qwen) -> None:
    assert qwen.choose_engine("auto", vllm_installed=True, gpu=True) == "vllm"
    assert qwen.choose_engine("auto", vllm_installed=True, gpu=False) == "transformers"
    assert qwen.choose_engine("auto", vllm_installed=False, gpu=True) == "transformers"
    assert qwen.choose_engine("vllm", vllm_installed=True, gpu=False) == "vllm"  # vLLM's CPU build, as tested


def relay_module() -> ModuleType:
    """vllm_server.py (the relay), imported beside its sibling modules (coalesce, errors, vllm_launch)."""
    return load_copy_beside(REPO / EXAMPLE / "vllm_server.py")


def test_vllm_is_found_in_the_interpreter_that_runs_its_server(tmp_path: Path) -> None:
    """Dockerfile.vllm keeps vLLM in /opt/vllm, not in the worker's Python: the worker asks the
    interpreter VLLM_PYTHON names (the image stopped at start when it asked its own)."""
    launch = load_copy(REPO / EXAMPLE / "vllm_launch.py")
    assert not launch.vllm_installed(sys.executable)  # the main test environment has no vLLM
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    python = tmp_path / "python-with-vllm"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert launch.vllm_installed(str(python))
    assert not launch.vllm_installed(str(tmp_path / "no-such-python"))


def test_vllms_server_gets_the_resolved_model_and_runpods_cache() -> None:
    server = relay_module()
    launch = load_copy(REPO / EXAMPLE / "vllm_launch.py")
    flags = {"MODEL": launch.Flag("--model", "value")}
    # An empty MODEL_NAME (an endpoint template's blank field) is the handler's default, as on transformers.
    environment = server.server_environment({"MODEL_NAME": "", "PATH": "/bin"}, "Qwen/Qwen2.5-0.5B-Instruct", None)
    assert launch.server_argv(environment, flags)[0] == ["--model", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert "HF_HUB_CACHE" not in environment and environment["PATH"] == "/bin"
    cached = server.server_environment({}, "org/model", "/runpod-volume/huggingface-cache/hub")
    assert cached["HF_HUB_CACHE"] == "/runpod-volume/huggingface-cache/hub"


def test_a_failed_vllm_start_is_reported_with_vllms_own_reason() -> None:
    server = relay_module()
    log = [
        "Traceback (most recent call last):",
        '  File "/opt/vllm/lib/python3.11/site-packages/vllm/config/device.py", line 55, in __post_init__',
        "    raise RuntimeError(",
        "RuntimeError: Failed to infer device type, please set the environment variable `VLLM_LOGGING_LEVEL=DEBUG`",
        "(EngineCore pid=12) shutting down",
    ]
    assert server.startup_failure(log) == log[3]
    assert server.startup_failure(["INFO loading", "Killed"]) == "Killed"
    assert server.startup_failure([]) == "it printed nothing"


def test_recommended_sampling_reads_only_what_the_model_sets(qwen) -> None:
    from transformers import GenerationConfig

    recommended = engines_module(qwen).recommended_sampling  # engines.py imports it from textstream.py
    assert recommended(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)) == {
        "temperature": 0.6,
        "top_p": 0.9,
    }
    assert recommended(GenerationConfig(temperature=0.6)) == {}


def engines_module(module: ModuleType) -> ModuleType:
    """The namespace of the engines.py the handler imported (the harness forgets sibling module names)."""
    return SimpleNamespace(**type(module.ENGINE).__post_init__.__globals__)


# ---- OpenAI compatibility --------------------------------------------------------------------


def openai_text(body: dict[str, Any]) -> dict[str, Any]:
    return {"openai_route": "/v1/completions", "openai_input": body}


def sse_events(chunks: list[str]) -> list[str]:
    """Every event of a streamed job. A chunk holds one or more whole events (events that pile up
    while the SDK POSTs one chunk go out together in the next), never a part of one."""
    events = []
    for chunk in chunks:
        assert isinstance(chunk, str) and chunk.startswith("data: ") and chunk.endswith("\n\n")
        events += [event + "\n\n" for event in chunk.split("\n\n")[:-1]]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]\n\n"
    return events


def parse_sse(chunks: list[str]) -> list[ChatCompletionChunk]:
    """Check the framing of every event and parse the chat chunks with openai's types."""
    return [ChatCompletionChunk.model_validate(json.loads(e[len("data: ") :])) for e in sse_events(chunks)[:-1]]


def test_chat_stream_has_vllms_shape(qwen) -> None:
    chunks = parse_sse(ok(run_job(qwen.handler, openai_chat({"messages": CHAT, **GREEDY, "stream": True}))))
    first, *middle, final = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in middle)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].delta.content is None
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.usage is None for c in chunks)


def test_chat_stream_usage_chunk_only_when_asked(qwen) -> None:
    body = {"messages": CHAT, **GREEDY, "stream": True, "stream_options": {"include_usage": True}}
    chunks = parse_sse(ok(run_job(qwen.handler, openai_chat(body))))
    *content, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in content)
    [whole] = ok(run_job(qwen.handler, openai_chat({"messages": CHAT, **GREEDY})))
    assert usage.usage.model_dump(exclude_none=True) == whole["usage"]


def test_completions_route(qwen) -> None:
    [response] = ok(run_job(qwen.handler, openai_text({"prompt": "The weather today is", **GREEDY})))
    parsed = Completion.model_validate(response)
    reference, _ = raw_greedy(qwen, "The weather today is", False, GREEDY["max_tokens"])
    assert parsed.object == "text_completion" and parsed.choices[0].text == reference
    default_length = ok(run_job(qwen.handler, openai_text({"prompt": ["Hello"], "temperature": 0})))[0]
    assert default_length["usage"]["completion_tokens"] > 16 or default_length["choices"][0]["finish_reason"] == "stop"


def test_models_route(qwen) -> None:
    [response] = ok(run_job(qwen.handler, {"openai_route": "/v1/models"}))
    assert [Model.model_validate(m).id for m in response["data"]] == [qwen.SERVED_MODEL_NAME]


def test_openai_nulls_mean_defaults(qwen) -> None:
    nulls = dict.fromkeys(
        ["stop", "n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "seed", "logprobs", "top_p"]
    )
    [response] = ok(run_job(qwen.handler, openai_chat({"messages": CHAT, **GREEDY, **nulls})))
    assert ChatCompletion.model_validate(response).choices[0].finish_reason in ("stop", "length")


def test_harmless_openai_fields_are_accepted_and_unknown_ones_refused(qwen) -> None:
    body = {"messages": CHAT, **GREEDY, "user": "u1", "metadata": {"a": 1}, "store": False, "n": 1}
    [response] = ok(run_job(qwen.handler, openai_chat(body)))
    assert ChatCompletion.model_validate(response).choices[0].message.role == "assistant"
    unknown = run_job(qwen.handler, openai_chat({"messages": CHAT, "frobnicate": 1}))
    assert openai_failure(unknown) == (
        "openai_input.frobnicate: Extra inputs are not permitted",
        400,
        "BadRequestError",
    )


def test_the_official_openai_client_end_to_end(qwen) -> None:
    client = openai.OpenAI(
        api_key="test",
        base_url="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=runpod_gateway(qwen.handler)),
    )
    reference = native(qwen, messages=CHAT, sampling_params=GREEDY)[0]["text"]
    chat = client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=24)
    assert chat.choices[0].message.content == reference
    stream = client.chat.completions.create(
        model="m", messages=CHAT, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == reference and usage.completion_tokens == chat.usage.completion_tokens
    text_stream = client.completions.create(model="m", prompt="The weather", temperature=0, max_tokens=8, stream=True)
    assert (
        "".join(c.choices[0].text for c in text_stream)
        == native(qwen, prompt="The weather", sampling_params={"temperature": 0, "max_tokens": 8})[0]["text"]
    )
    with pytest.raises(openai.BadRequestError, match="use_beam_search is not supported"):
        client.chat.completions.create(model="m", messages=CHAT, extra_body={"use_beam_search": True})
    assert [m.id for m in client.models.list()] == [qwen.SERVED_MODEL_NAME]


# ---- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    ("a string", "input must be a JSON object"),
    ({}, "send exactly one of prompt or messages"),
    ({"prompt": "a", "messages": CHAT}, "send exactly one of prompt or messages"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    (
        {"messages": [{"role": "robot", "content": "x"}]},
        "messages.0.role: Input should be 'system', 'developer', 'user', 'assistant' or 'tool'",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0: content is required (null only on an assistant turn with tool"),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "messages.0: only an assistant turn has tool_calls",
    ),
    ({"prompt": "hi", "sampling_params": {"n": 2}}, "sampling_params.n: n=2 on the native route is not supported"),
    ({"prompt": "hi", "sampling_params": {"use_beam_search": True}}, "use_beam_search is not supported by this"),
    ({"prompt": "hi", "sampling_params": {"logit_bias": {"x": 1}}}, "sampling_params.logit_bias: 'x' is not a token"),
    ({"prompt": "hi", "sampling_params": {"stop_token_ids": [10**9]}}, "sampling_params.stop_token_ids.0: Input"),
    ({"prompt": "hi", "sampling_params": {"min_p": 1.5}}, "sampling_params.min_p: Input should be less than or"),
    ({"prompt": "hi", "sampling_params": {"presence_penalty": 3}}, "sampling_params.presence_penalty: Input should"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]},
        "non-text content is not supported by this worker",
    ),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "hi", "sampling_params": {"temperature": 2.5}}, "sampling_params.temperature: Input should be less"),
    ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "sampling_params.temperature: Input should be greater"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "sampling_params.top_p: Input should be greater than 0"),
    ({"prompt": "hi", "sampling_params": {"top_k": -2}}, "sampling_params.top_k: Input should be greater than or"),
    ({"prompt": "hi", "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens: Input should be greater"),
    ({"prompt": "hi", "sampling_params": {"max_tokens": "9"}}, "sampling_params.max_tokens: Input should be a valid"),
    ({"prompt": "hi", "sampling_params": {"repetition_penalty": 3}}, "sampling_params.repetition_penalty: Input"),
    ({"prompt": "hi", "sampling_params": {"seed": -1}}, "sampling_params.seed: Input should be greater than or equal"),
    ({"prompt": "hi", "sampling_params": {"stop": ["a"] * 5}}, "sampling_params.stop: List should have at most 4"),
    ({"prompt": "hi", "sampling_params": {"stop": [""]}}, "sampling_params.stop.0: String should have at least 1"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": 5}}, "sampling_params.max_new_tokens: Extra inputs"),
    ({"prompt": "hi", "stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"openai_route": "/v1/embeddings", "openai_input": {}}, "openai_route must be one of /v1/chat/completions"),
    ({"openai_route": "/v1/chat/completions"}, "openai_input must be a JSON object"),
    (openai_chat({"messages": CHAT, "n": 9}), "openai_input.n: Input should be less than or equal to 8"),
    (openai_chat({"messages": CHAT, "top_logprobs": 2}), "openai_input: top_logprobs needs logprobs: true"),
    (openai_chat({"messages": CHAT, "logprobs": True, "top_logprobs": 21}), "openai_input.top_logprobs: Input"),
    (openai_chat({"messages": CHAT, "tools": [{"type": "function"}]}), "openai_input.tools.0.function: Field"),
    (openai_chat({"messages": CHAT, "tool_choice": "required"}), "tool_choice other than none or auto needs tools"),
    (openai_chat({"messages": CHAT, "guided_json": {}}), "guided_json is not supported by this worker; use struc"),
    (openai_chat({"messages": CHAT, "chat_template": "{{ 1 }}"}), "chat_template is not supported by this worker"),
    (
        openai_chat({"messages": CHAT, "chat_template_kwargs": {"tools": []}}),
        "chat_template_kwargs: tools is a field of its own",
    ),
    (
        openai_chat({"messages": CHAT, "response_format": {"type": "json_schema"}}),
        "response_format.json_schema is required with type json_schema",
    ),
    (
        openai_chat({"messages": CHAT, "structured_outputs": {"regex": "a", "choice": ["b"]}}),
        "set exactly one of json, json_object, regex, choice, grammar",
    ),
    (
        openai_chat(
            {
                "messages": CHAT,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
            }
        ),
        "structured output: the grammar engine refused it:",
    ),
    (
        openai_chat(
            {
                "messages": [
                    *CHAT,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                    },
                ]
            }
        ),
        "messages.2.tool_calls.0.function.arguments: not valid JSON",
    ),
    (openai_chat({"messages": CHAT, "max_tokens": 0}), "openai_input.max_tokens: Input should be greater than"),
    (openai_chat({"model": "m"}), "openai_input.messages: Field required"),
    (openai_text({"prompt": [1, 2, 3]}), "a prompt of token ids is not supported"),
    (openai_text({"prompt": ["a", "b"]}), "a batch of prompts is not supported"),
    (openai_text({"prompt": "a", "echo": True}), "echo is not supported by this worker"),
    (openai_text({"prompt": "a", "best_of": 2}), "best_of is not supported by this worker"),
    (openai_text({"prompt": "a", "logprobs": 21}), "openai_input.logprobs: Input should be less than or equal to 20"),
]


@pytest.mark.parametrize(("job_input", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_the_worker_serves_on(qwen, job_input: Any, message: str) -> None:
    result = run_job(qwen.handler, job_input)
    assert message in result.get("error", ""), result
    assert "Traceback" not in result["error"]
    assert result["stream"] == [], "the error is the first and only chunk"
    assert native(qwen, prompt="still serving", sampling_params={"max_tokens": 2})[-1]["finish_reason"]


@pytest.fixture(scope="module")
def short_context(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3")), "MAX_MODEL_LEN": "64"})


def test_prompt_and_max_tokens_must_fit_max_model_len(short_context) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    result = run_job(short_context.handler, {"prompt": long_prompt})
    assert "leaves no room in the 64-token context (MAX_MODEL_LEN)" in result["error"]
    tokens = short_context.ENGINE.count_prompt_tokens("The weather", is_chat=False)
    result = run_job(short_context.handler, {"prompt": "The weather", "sampling_params": {"max_tokens": 64}})
    assert f"max_tokens can be at most {64 - tokens}" in result["error"]
    [whole] = ok(run_job(short_context.handler, {"prompt": "The weather", "sampling_params": {"temperature": 0}}))
    assert whole["usage"]["total_tokens"] <= 64  # the default max_tokens shrank to fit
    huge = run_job(short_context.handler, {"prompt": "x" * (64 * 32 + 1)})
    assert "prompt: String should have at most 2048 characters" in huge["error"]
    long_chat = run_job(short_context.handler, {"messages": [{"role": "user", "content": "x" * 3000}]})
    assert long_chat["error"] == "messages: 3000 characters cannot fit the 64-token context (MAX_MODEL_LEN)"


def test_unsupported_settings_stop_the_worker_at_startup(tiny_model) -> None:
    model = str(tiny_model("qwen3"))
    with pytest.raises(ValueError, match="QUANTIZATION=awq needs the vLLM engine"):
        load_handler(EXAMPLE, {"MODEL_NAME": model, "QUANTIZATION": "awq"})
    with pytest.raises(ValueError, match="QUANTIZATION must be one of"):
        load_handler(EXAMPLE, {"MODEL_NAME": model, "QUANTIZATION": "int3"})
    with pytest.raises(ValueError, match="ENGINE must be auto, transformers or vllm, got 'tgi'"):
        load_handler(EXAMPLE, {"MODEL_NAME": model, "ENGINE": "tgi"})
    with pytest.raises(ValueError, match="ENGINE=vllm, but vLLM is not installed in this image"):
        load_handler(EXAMPLE, {"MODEL_NAME": model, "ENGINE": "vllm"})
    with pytest.raises(ValueError, match="MAX_MODEL_LEN=100000 exceeds the model's context of 2048"):
        load_handler(EXAMPLE, {"MODEL_NAME": model, "MAX_MODEL_LEN": "100000"})


def test_messages_need_a_chat_template(tiny_model, tmp_path) -> None:
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model("llama"), bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(bare)})
    assert (
        "has no chat template: send a raw prompt instead of messages"
        in run_job(module.handler, {"messages": CHAT})["error"]
    )
    assert ok(run_job(module.handler, {"prompt": "Hello", "sampling_params": {"max_tokens": 2}}))


# ---- only the request's fields reach generation ----------------------------------------------


def test_generation_config_contributes_only_sampling_defaults(tiny_model, qwen) -> None:
    """A checkpoint whose generation_config.json asks for beam search and bans repeated bigrams:
    both would reach every request (and beams break streaming) if transformers filled unset fields."""
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3-generation-defaults"))})
    assert module.SAMPLING_DEFAULTS == {"temperature": 0.6, "top_p": 0.9}
    written = module.ENGINE.model.generation_config.to_diff_dict()
    assert "num_beams" not in written and "no_repeat_ngram_size" not in written
    body = {"messages": CHAT, "sampling_params": {"temperature": 0, "max_tokens": 40}}
    streamed = native(module, **body, stream=True)
    # The same weights (the factory seeds them) without those settings: the plain tiny Qwen3.
    assert streamed_text(streamed) == native(qwen, **body)[0]["text"]
    # And the bigram ban would have changed the text: the comparison above can fail.
    prompt = module.render_prompt(module.GenerateRequest(messages=CHAT))
    ids = torch.tensor([prompt.ids])
    with torch.inference_mode():
        banned = module.ENGINE.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=40,
            do_sample=False,
            no_repeat_ngram_size=2,
            eos_token_id=sorted(module.ENGINE.eos_token_ids),
        )
    assert module.ENGINE.tokenizer.decode(banned[0, ids.shape[1] :], skip_special_tokens=True) != streamed_text(
        streamed
    )


# ---- chat templates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(tiny_model) -> ModuleType:
    """Qwen3-style: hermes tools, a generation prompt that opens <think>, REASONING_PARSER=qwen3."""
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3-thinking")), "REASONING_PARSER": "qwen3"})


def test_chat_template_kwargs_reach_the_template(thinking) -> None:
    on = thinking.render_prompt(thinking.ChatCompletionRequest(messages=CHAT))
    off = thinking.render_prompt(
        thinking.ChatCompletionRequest(messages=CHAT, chat_template_kwargs={"enable_thinking": False})
    )
    assert on.text.endswith("<|im_start|>assistant\n<think>\n")
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_template_that_rewrites_the_last_turn_is_a_clear_error_without_the_prompt(thinking, capsys) -> None:
    """Qwen3's template drops an earlier answer's thoughts, so the last turn cannot be continued
    (transformers raises a ValueError quoting the prompt): a clear error, the prompt nowhere."""
    secret = "Zanzibar-7781"
    turns = [
        {"role": "user", "content": f"Where is {secret}?"},
        {"role": "assistant", "content": "<think>hm</think>It"},
    ]
    body = {"messages": turns, "continue_final_message": True, "add_generation_prompt": False}
    result = run_job(thinking.handler, openai_chat(body))
    assert openai_failure(result)[:2] == (
        "messages: the model's chat template could not render them (ValueError); to continue the last message it"
        " must be an assistant turn",
        400,
    )
    logs = capsys.readouterr()
    assert secret not in logs.out + logs.err and "Traceback" not in logs.out + logs.err
    # The default starts a new turn, which the same template renders.
    [answer] = ok(run_job(thinking.handler, openai_chat({"messages": turns, **GREEDY})))
    ChatCompletion.model_validate(answer)


def test_prompts_are_rendered_off_the_event_loop_and_tokenized_once(qwen, monkeypatch) -> None:
    import threading

    threads, tokenized = [], []
    render, tokenize = qwen.ENGINE.render_chat, qwen.ENGINE.tokenize
    monkeypatch.setattr(
        qwen.ENGINE, "render_chat", lambda *a, **k: threads.append(threading.current_thread()) or render(*a, **k)
    )
    monkeypatch.setattr(qwen.ENGINE, "tokenize", lambda *a, **k: tokenized.append(1) or tokenize(*a, **k))
    ok(run_job(qwen.handler, {"messages": CHAT, "sampling_params": GREEDY}))
    assert threads and threads[0] is not threading.main_thread()
    assert len(tokenized) == 1


# ---- structured output ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_output_matches_the_schema(qwen, stream: bool) -> None:
    import jsonschema

    for seed in range(3):
        body = {"messages": CHAT, "response_format": json_schema_format(PERSON), "max_tokens": 200, "seed": seed}
        output = ok(run_job(qwen.handler, openai_chat({**body, "temperature": 1.0, "stream": stream})))
        if stream:
            chunks = parse_sse(output)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            parsed = ChatCompletion.model_validate(output[0])
            text = parsed.choices[0].message.content
            assert parsed.choices[0].finish_reason == "stop", "the grammar ends the object, then the turn"
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_vllm_structured_outputs(qwen) -> None:
    [whole] = ok(
        run_job(
            qwen.handler,
            openai_chat(
                {"messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 300, "temperature": 0}
            ),
        )
    )
    content = ChatCompletion.model_validate(whole).choices[0].message.content
    finish = whole["choices"][0]["finish_reason"]
    assert finish == "length" or isinstance(json.loads(content), dict)
    assert content.startswith("{")
    for constraint, check in [
        ({"choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda text: len(text) == 6 and text[3] == "-" and text[:3].isdigit()),
        ({"json": PERSON}, lambda text: set(json.loads(text)) == set(PERSON["properties"])),
    ]:
        [response] = ok(
            run_job(
                qwen.handler,
                openai_chat({"messages": CHAT, "structured_outputs": constraint, "max_tokens": 200, "temperature": 0}),
            )
        )
        assert check(response["choices"][0]["message"]["content"]), (constraint, response)
    [text] = ok(
        run_job(
            qwen.handler,
            openai_text({"prompt": "Answer:", "structured_outputs": {"choice": ["up", "down"]}, "max_tokens": 10}),
        )
    )
    assert Completion.model_validate(text).choices[0].text in ("up", "down")


# ---- tool calling -----------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {tool["function"]["name"]: tool for tool in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def agent(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3-tools"))})


def assert_valid_calls(calls: list[Any], names: set[str]) -> None:
    import jsonschema

    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])


def streamed_tool_calls(chunks: list[ChatCompletionChunk]) -> list[Any]:
    return [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]


def test_tools_are_rendered_by_the_chat_template(agent) -> None:
    prompt = agent.render_prompt(agent.ChatCompletionRequest(messages=CHAT, tools=[WEATHER, CLOCK]))
    assert '"name": "get_weather"' in prompt.text and "<tools>" in prompt.text


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_gives_valid_calls(agent, stream: bool) -> None:
    for seed in range(2):
        body = {"messages": CHAT, "tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False}
        output = ok(
            run_job(
                agent.handler,
                openai_chat({**body, "temperature": 1.0, "seed": seed, "max_tokens": 120, "stream": stream}),
            )
        )
        if stream:
            chunks = parse_sse(output)
            calls = streamed_tool_calls(chunks)
            assert [call.index for call in calls] == [0]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            choice = ChatCompletion.model_validate(output[0]).choices[0]
            calls = choice.message.tool_calls
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(calls) == 1
        assert_valid_calls(calls, {"get_weather", "get_time"})


def test_a_named_tool_choice_calls_that_tool(agent) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    body = {"messages": CHAT, "tools": [WEATHER, CLOCK], "tool_choice": named, "temperature": 0, "max_tokens": 120}
    [response] = ok(run_job(agent.handler, openai_chat(body)))
    calls = ChatCompletion.model_validate(response).choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert_valid_calls(calls, {"get_time"})
    chunks = parse_sse(ok(run_job(agent.handler, openai_chat({**body, "stream": True}))))
    [streamed] = streamed_tool_calls(chunks)
    assert (streamed.function.name, streamed.function.arguments) == (
        calls[0].function.name,
        calls[0].function.arguments,
    )


def test_tool_choice_auto_parses_the_models_hermes_output(agent) -> None:
    """A random model never writes a call by itself; a regex makes it write exactly this text, and
    the auto parser must turn it into content and tool_calls, streamed or not."""
    call_json = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'
    said = f"Let me check.\n<tool_call>\n{call_json}\n</tool_call>"
    forced = {"regex": re.escape(said)}
    body = {"messages": CHAT, "tools": [WEATHER], "structured_outputs": forced, "temperature": 0, "max_tokens": 100}
    [response] = ok(run_job(agent.handler, openai_chat(body)))
    choice = ChatCompletion.model_validate(response).choices[0]
    assert choice.message.content == "Let me check.\n" and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Rome", "unit": "celsius"},
    )
    chunks = parse_sse(ok(run_job(agent.handler, openai_chat({**body, "stream": True}))))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check.\n"
    [streamed] = streamed_tool_calls(chunks)
    assert streamed.function.arguments == call.function.arguments and streamed.index == 0
    # tool_choice none: the same text stays text.
    [plain] = ok(run_job(agent.handler, openai_chat({**body, "tool_choice": "none"})))
    assert plain["choices"][0]["message"]["content"] == said and "tool_calls" not in plain["choices"][0]["message"]


def test_an_agents_history_with_tool_calls_and_results_is_accepted(agent) -> None:
    history = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    prompt = agent.render_prompt(agent.ChatCompletionRequest(messages=history, tools=[WEATHER]))
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt.text
    assert "<tool_response>\n21 degrees\n</tool_response>" in prompt.text
    [response] = ok(run_job(agent.handler, openai_chat({"messages": history, "tools": [WEATHER], **GREEDY})))
    assert ChatCompletion.model_validate(response).choices[0].message.role == "assistant"


def test_tool_calls_through_the_official_openai_client(agent) -> None:
    client = openai.OpenAI(
        api_key="test",
        base_url="https://api.runpod.ai/v2/e/openai/v1",
        http_client=httpx.Client(transport=runpod_gateway(agent.handler)),
    )
    chat = client.chat.completions.create(
        model="m",
        messages=CHAT,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    assert_valid_calls(chat.choices[0].message.tool_calls, {"get_weather"})
    stream = client.chat.completions.create(
        model="m",
        messages=CHAT,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    calls = [call for chunk in stream if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.arguments for c in calls] == [chat.choices[0].message.tool_calls[0].function.arguments]


# ---- reasoning --------------------------------------------------------------------------------


def test_thoughts_go_to_the_reasoning_field(thinking) -> None:
    # The prompt opened <think>; a regex makes the random model think, close and answer.
    forced = {"regex": re.escape("Paris is in France.</think>\n\nParis.")}
    body = {"messages": CHAT, "structured_outputs": forced, "temperature": 0, "max_tokens": 60}
    [response] = ok(run_job(thinking.handler, openai_chat(body)))
    message = ChatCompletion.model_validate(response).choices[0].message
    assert (message.content, response["choices"][0]["message"]["reasoning"]) == ("\n\nParis.", "Paris is in France.")
    chunks = parse_sse(ok(run_job(thinking.handler, openai_chat({**body, "stream": True}))))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "Paris is in France."
    assert "".join(d.content or "" for d in deltas) == "\n\nParis."
    hidden = ok(run_job(thinking.handler, openai_chat({**body, "include_reasoning": False})))[0]
    assert "reasoning" not in hidden["choices"][0]["message"]
    # With thinking off, the template closes the thoughts in the prompt: everything is content.
    off = {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}, **GREEDY}
    [plain] = ok(run_job(thinking.handler, openai_chat(off)))
    assert "reasoning" not in plain["choices"][0]["message"] and plain["choices"][0]["message"]["content"]


def test_a_reasoning_model_gets_the_rest_of_the_context_by_default(thinking) -> None:
    assert thinking.DEFAULT_MAX_TOKENS is None
    planned = thinking.plan(thinking.CHAT_ROUTE, thinking.ChatCompletionRequest(messages=CHAT))
    assert planned.params.max_tokens == thinking.CONTEXT_LEN - planned.prompt.tokens


def test_reasoning_and_tool_parsers_on_streamed_text(agent) -> None:
    parsers = agent.parse_choices.__globals__
    reasoning = parsers["ReasoningParser"](thinking=False)
    pieces = [reasoning.push(p) for p in [" <th", "ink>step one", " </thi", "nk>answer"]] + [reasoning.flush()]
    assert "".join(r for r, _ in pieces) == "step one " and "".join(c for _, c in pieces) == "answer"
    content_only = parsers["ReasoningParser"](thinking=False)
    assert content_only.push("no thoughts") == ("", "no thoughts")
    calls = parsers["ToolCallParser"]()
    out = [
        calls.push(p)
        for p in [
            "Sure <tool",
            '_call>\n{"name": "f", "argu',
            'ments": {}}\n</tool_call>\n',
            "<tool_call>not json</tool_call>",
        ]
    ]
    out.append(calls.flush())
    assert "".join(c for c, _ in out) == "Sure <tool_call>not json</tool_call>"
    assert [call["function"]["name"] for _, found in out for call in found] == ["f"]


# ---- sampling fields --------------------------------------------------------------------------


def token_of(module: ModuleType, text: str) -> int:
    [token] = module.ENGINE.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def test_logit_bias_and_presence_and_frequency_penalties(qwen) -> None:
    the = token_of(qwen, " the")
    favoured = {"prompt": "Once", "temperature": 0, "max_tokens": 6, "logit_bias": {str(the): 5}}
    [always] = ok(run_job(qwen.handler, openai_text(favoured)))
    assert always["choices"][0]["text"] == " the" * 6
    [penalized] = ok(run_job(qwen.handler, openai_text({**favoured, "frequency_penalty": 2})))
    assert 1 <= penalized["choices"][0]["text"].count(" the") <= 3, "each use costs 2: the bias of 5 runs out"
    [once] = ok(run_job(qwen.handler, openai_text({**favoured, "logit_bias": {str(the): 1.5}, "presence_penalty": 2})))
    assert once["choices"][0]["text"].count(" the") == 1


def test_end_tokens_min_tokens_ignore_eos_and_stop_token_ids(qwen) -> None:
    eos = qwen.ENGINE.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends_now = {"messages": CHAT, "temperature": 0, "max_tokens": 10, "logit_bias": {str(eos): 100}}
    [now] = ok(run_job(qwen.handler, openai_chat(ends_now)))
    assert now["usage"]["completion_tokens"] == 1 and now["choices"][0]["finish_reason"] == "stop"
    [later] = ok(run_job(qwen.handler, openai_chat({**ends_now, "min_tokens": 5})))
    assert later["usage"]["completion_tokens"] == 6 and later["choices"][0]["finish_reason"] == "stop"
    [never] = ok(run_job(qwen.handler, openai_chat({**ends_now, "ignore_eos": True})))
    assert never["usage"]["completion_tokens"] == 10 and never["choices"][0]["finish_reason"] == "length"
    the = token_of(qwen, " the")
    stop_on_the = {
        "prompt": "Once",
        "temperature": 0,
        "max_tokens": 10,
        "logit_bias": {str(the): 5},
        "stop_token_ids": [the],
    }
    [stopped] = ok(run_job(qwen.handler, openai_text(stop_on_the)))
    assert stopped["choices"][0] | {"logprobs": None} == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
    }
    [kept] = ok(run_job(qwen.handler, openai_text({**stop_on_the, "include_stop_str_in_output": True})))
    assert kept["choices"][0]["text"] == " the" and kept["usage"]["completion_tokens"] == 1
    start = qwen.ENGINE.tokenizer.convert_tokens_to_ids("<|im_start|>")
    special = {"prompt": "Once", "temperature": 0, "max_tokens": 2, "logit_bias": {str(start): 100}}
    assert ok(run_job(qwen.handler, openai_text(special)))[0]["choices"][0]["text"] == ""
    shown = ok(run_job(qwen.handler, openai_text({**special, "skip_special_tokens": False})))[0]
    assert shown["choices"][0]["text"] == "<|im_start|><|im_start|>"


def test_stop_strings_kept_with_include_stop_str_in_output(qwen) -> None:
    greedy = native(qwen, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 40})[0]["text"]
    stop = greedy[10:14]
    params = {"temperature": 0, "max_tokens": 40, "stop": stop, "include_stop_str_in_output": True}
    assert native(qwen, messages=CHAT, sampling_params=params)[0]["text"] == greedy[: greedy.index(stop) + len(stop)]


def test_min_p_1_is_greedy_and_native_takes_worker_vllm_sampling_params(qwen) -> None:
    greedy = native(qwen, messages=CHAT, sampling_params=GREEDY)[0]["text"]
    worker_vllm = {
        "temperature": 1.0,
        "min_p": 1.0,
        "seed": 4,
        "max_tokens": 24,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "ignore_eos": False,
        "stop_token_ids": [],
        "n": 1,
        "skip_special_tokens": True,
    }
    assert native(qwen, messages=CHAT, sampling_params=worker_vllm)[0]["text"] == greedy


def test_chat_logprobs_are_the_models_and_parse(qwen) -> None:
    body = {"messages": CHAT, **GREEDY, "logprobs": True, "top_logprobs": 3}
    [response] = ok(run_job(qwen.handler, openai_chat(body)))
    choice = ChatCompletion.model_validate(response).choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response["usage"]["completion_tokens"]
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob), "greedy picks the most likely token"
    assert "".join(e.token for e in entries).startswith(choice.message.content)
    # The reference: the model's own log-softmax for the first generated token.
    prompt = qwen.render_prompt(qwen.ChatCompletionRequest(messages=CHAT))
    with torch.inference_mode():
        logits = qwen.ENGINE.model(torch.tensor([prompt.ids])).logits[0, -1]
    assert entries[0].logprob == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-4)
    events = parse_sse(ok(run_job(qwen.handler, openai_chat({**body, "stream": True}))))
    streamed = [e for c in events if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_completion_logprobs(qwen) -> None:
    [response] = ok(
        run_job(qwen.handler, openai_text({"prompt": "The weather", "temperature": 0, "max_tokens": 5, "logprobs": 2}))
    )
    logprobs = Completion.model_validate(response).choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0


def test_n_choices_streamed_with_their_indexes(qwen) -> None:
    body = {"messages": CHAT, "temperature": 1.0, "seed": 3, "max_tokens": 12, "n": 3}
    [whole] = ok(run_job(qwen.handler, openai_chat(body)))
    parsed = ChatCompletion.model_validate(whole)
    assert [c.index for c in parsed.choices] == [0, 1, 2]
    texts = [c.message.content for c in parsed.choices]
    assert len(set(texts)) > 1, "each choice samples on its own"
    chunks = parse_sse(
        ok(run_job(qwen.handler, openai_chat({**body, "stream": True, "stream_options": {"include_usage": True}})))
    )
    streamed = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    }
    assert [streamed[i] for i in range(3)] == texts, "the same seed gives the same choices"
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]
    assert 3 <= whole["usage"]["completion_tokens"] <= 3 * 12, "the usage counts every choice's tokens"


# ---- concurrency, cancellation and faults ----------------------------------------------------


def test_concurrent_jobs_give_the_same_texts_as_alone(qwen) -> None:
    requests = [
        {"messages": CHAT, "sampling_params": {"temperature": 0, "max_tokens": 20}},
        {"prompt": "Paris is", "sampling_params": {"temperature": 1.0, "seed": 11, "max_tokens": 20}},
        {"messages": CHAT, "sampling_params": {"temperature": 0.8, "seed": 5, "max_tokens": 20}, "stream": True},
    ]
    alone = [streamed_text(native(qwen, **request)) for request in requests]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(qwen.handler, {"input": r}) for r in requests))

    assert [streamed_text(ok(result)) for result in asyncio.run(together())] == alone


def never_ending(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random model may sample its end-of-turn token at any step; take that ending away, so only
    max_tokens, a time limit or a stop can end the generation."""
    monkeypatch.setattr(module.ENGINE.generator, "eos_token_ids", set())
    monkeypatch.setattr(module.ENGINE.model.generation_config, "eos_token_id", None)


def count_forward_calls(module: ModuleType) -> tuple[list[int], Any]:
    calls: list[int] = []
    hook = module.ENGINE.model.register_forward_hook(lambda *args: calls.append(1))
    return calls, hook


async def wait_until_idle(module: ModuleType, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while module.ENGINE.active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def test_an_abandoned_stream_stops_generating(qwen, monkeypatch) -> None:
    never_ending(qwen, monkeypatch)
    calls, hook = count_forward_calls(qwen)
    request = {"prompt": "Once", "sampling_params": {"temperature": 1.0, "max_tokens": 1500}, "stream": True}

    async def read_two_then_leave() -> None:
        stream = qwen.handler({"id": "abandoned", "input": request})
        await anext(stream)
        await anext(stream)
        await stream.aclose()
        await wait_until_idle(qwen)

    try:
        asyncio.run(read_two_then_leave())
    finally:
        hook.remove()
    assert qwen.ENGINE.active == 0
    assert len(calls) < 100, f"generation ran on for {len(calls)} steps after the consumer left"


def test_a_cancelled_job_stops_generating(qwen, monkeypatch) -> None:
    never_ending(qwen, monkeypatch)
    calls, hook = count_forward_calls(qwen)
    request = {"prompt": "Once", "sampling_params": {"temperature": 1.0, "max_tokens": 1500}, "stream": True}

    async def cancel_after_first_chunk() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in qwen.handler({"id": "cancelled", "input": request}):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_until_idle(qwen)

    try:
        asyncio.run(cancel_after_first_chunk())
    finally:
        hook.remove()
    assert qwen.ENGINE.active == 0
    assert len(calls) < 100


def stall_at(module: ModuleType, forward_call: int, seconds_after_first: float) -> Any:
    """A forward hook that holds the `forward_call`-th forward pass (1: the prompt's) until
    `seconds_after_first` have passed since the first: past a time limit of fewer seconds, the
    tokens made before it are all queued and none comes after, whatever the machine's speed."""
    calls: list[float] = []

    def hook(*args: Any) -> None:
        calls.append(time.monotonic())
        if len(calls) == forward_call:
            time.sleep(max(0.0, calls[0] + seconds_after_first - time.monotonic()))

    return module.ENGINE.model.register_forward_hook(hook)


@pytest.fixture(scope="module")
def short_lived(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3")), "MAX_GENERATION_SECONDS": "0.5"})


@pytest.mark.parametrize("stream", [True, False])
def test_a_time_limit_mid_answer_keeps_what_was_generated(short_lived, monkeypatch, stream: bool) -> None:
    """MAX_GENERATION_SECONDS reached after 3 tokens: the answer ends there, as max_tokens would
    end it, with finish_reason "length" and the limit named; /runsync keeps the text."""
    never_ending(short_lived, monkeypatch)
    hook = stall_at(short_lived, forward_call=4, seconds_after_first=0.8)
    request = {"prompt": "Once", "sampling_params": {"temperature": 0, "max_tokens": 2000}, "stream": stream}
    try:
        result = run_job(short_lived.handler, request)
    finally:
        hook.remove()
    assert "error" not in result, result
    last = result["output"][-1]
    assert last["finish_reason"] == "length" and last["limit"] == "MAX_GENERATION_SECONDS"
    assert last["usage"]["completion_tokens"] == 3
    text = streamed_text(result["output"])
    assert text and raw_greedy(short_lived, "Once", False, 3)[0] == text


def test_the_openai_routes_name_the_time_limit_on_the_choice(short_lived, monkeypatch) -> None:
    never_ending(short_lived, monkeypatch)
    hook = stall_at(short_lived, forward_call=4, seconds_after_first=0.8)
    body = {"messages": CHAT, "temperature": 0, "max_tokens": 2000}
    try:
        [answer] = ok(run_job(short_lived.handler, openai_chat(body)))
    finally:
        hook.remove()
    completion = ChatCompletion.model_validate(answer)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3
    assert answer["choices"][0]["limit"] == "MAX_GENERATION_SECONDS"


def test_a_time_limit_before_the_first_token_fails_the_job_clearly(short_lived, monkeypatch) -> None:
    never_ending(short_lived, monkeypatch)
    hook = stall_at(short_lived, forward_call=1, seconds_after_first=0.8)  # the prompt's pass
    request = {"prompt": "Once", "sampling_params": {"temperature": 1.0, "max_tokens": 2000}, "stream": True}
    try:
        result = run_job(short_lived.handler, request)
    finally:
        hook.remove()
    assert result["error"] == (
        "generation stopped at its 0.5-second limit (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit"
        " on the endpoint"
    )
    module = short_lived

    async def idle() -> None:
        await wait_until_idle(module)

    asyncio.run(idle())
    assert module.ENGINE.active == 0
    assert native(module, prompt="short", sampling_params={"max_tokens": 3})[-1]["usage"]["completion_tokens"] >= 1


def test_a_model_failure_mid_generation_is_an_error_and_the_next_job_is_served(qwen, monkeypatch) -> None:
    never_ending(qwen, monkeypatch)  # the fifth forward pass always comes: no end-of-turn token before it
    calls: list[int] = []

    def explode_on_fifth_step(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("kernel exploded at /secret/path")

    hook = qwen.ENGINE.model.register_forward_hook(explode_on_fifth_step)
    try:
        result = run_job(
            qwen.handler, {"prompt": "Once", "sampling_params": {"max_tokens": 50, "seed": 1}, "stream": True}
        )
    finally:
        hook.remove()
    assert result["error"] == "generation failed inside the worker; see the worker logs"
    assert native(qwen, prompt="again", sampling_params={"max_tokens": 3})[-1]["usage"]["completion_tokens"] >= 1


def test_cuda_out_of_memory_answers_the_job_and_keeps_the_worker(qwen, monkeypatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    freed: list[bool] = []
    monkeypatch.setattr(qwen.ENGINE.model, "generate", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    result = run_job(qwen.handler, {"prompt": "Once", "sampling_params": {"max_tokens": 5}})
    assert result["error"].startswith("out of GPU memory for this request")
    assert freed == [True], "the cached GPU memory was not given back for the next job"
    assert "refresh_worker" not in qwen.WORKER_CONFIG
    monkeypatch.undo()
    assert native(qwen, prompt="again", sampling_params={"max_tokens": 2})


def test_an_unrecoverable_gpu_error_retires_the_worker(tiny_model, monkeypatch) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3"))})

    def device_lost(*args: Any, **kwargs: Any) -> Any:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(module.ENGINE.model, "generate", device_lost)
    result = run_job(module.handler, {"prompt": "Once", "sampling_params": {"max_tokens": 5}})
    assert result["error"] == "the GPU failed during generation; retry the request"
    assert module.WORKER_CONFIG["refresh_worker"] is True  # the SDK then stops this worker after the job


# ---- quantization ----------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "layer"), [("bnb-8bit", "Linear8bitLt"), ("bnb-4bit", "Linear4bit")])
def test_bitsandbytes_quantization_loads_and_generates(tiny_model, setting: str, layer: str) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("llama")), "QUANTIZATION": setting})
    layers = {type(m).__name__ for m in module.ENGINE.model.modules()}
    assert layer in layers
    chunks = native(module, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 8}, stream=True)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert (
        streamed_text(chunks)
        == native(module, messages=CHAT, sampling_params={"temperature": 0, "max_tokens": 8})[0]["text"]
    )


# ---- as a user runs it ----------------------------------------------------------------------


def test_python_handler_py_prints_each_chunk(tiny_model) -> None:
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3")), "RUNPOD_LOG_LEVEL": "INFO"})
    assert run.returncode == 0, run.stdout + run.stderr
    chunks = json_lines(run.stdout)
    test_input = json.loads((REPO / EXAMPLE / "test_input.json").read_text())["input"]
    assert test_input["stream"] is True
    assert len(chunks) >= 2 and all(c["text"] for c in chunks[:-1])
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    assert "context 2048 tokens, chat template: yes" in run.stdout
    for message in test_input["messages"]:
        assert message["content"] not in run.stdout + run.stderr, "prompts never reach the logs"


def test_python_handler_py_fails_on_a_bad_job(tiny_model) -> None:
    bad = json.dumps({"input": {"prompt": "hi", "sampling_params": {"top_p": 5}}})
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3"))}, "--test_input", bad)
    assert run.returncode == 1
    assert "sampling_params.top_p: Input should be less than or equal to 1" in run.stdout


def test_dev_server_runsync_and_stream(tiny_model) -> None:
    with DevServer(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3"))}) as server:
        sync = server.post(
            "/runsync", {"input": {"prompt": "Hi", "sampling_params": {"max_tokens": 5}, "stream": True}}
        )
        job = server.post("/run", {"input": openai_chat({"messages": CHAT, "max_tokens": 4, "stream": True})})
        stream = server.post(f"/stream/{job.json()['id']}", {})
        bad = server.post("/runsync", {"input": {"prompt": "Hi", "sampling_params": {"seed": -5}}})
    assert sync.status_code == 200 and sync.json()["status"] == "COMPLETED"
    assert sync.json()["output"][-1]["usage"]["completion_tokens"] >= 1
    events = [part["output"] for part in stream.json()["stream"]]
    parse_sse(events)
    # The dev server reports a yielded error as output (production marks the job FAILED), not a 500.
    assert bad.status_code == 200
    assert "sampling_params.seed" in json.dumps(bad.json())


# ---------------------------------------------------------------------------------------------
# MAX_RESULT_BYTES: a result that cannot arrive is refused or stopped, never lost.
# ---------------------------------------------------------------------------------------------
RESULT_LIMIT = 8192  # leaves 4096 bytes for chunks beside the 4096-byte envelope


@pytest.fixture(scope="module")
def small_results(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3")), "MAX_RESULT_BYTES": str(RESULT_LIMIT)})


def aggregated_bytes(chunks: list[Any]) -> int:
    return len(json.dumps(chunks, ensure_ascii=False).encode())


def test_logprobs_certain_to_pass_the_result_limit_are_refused_before_any_work(small_results, monkeypatch) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the engine ran a request that was certain to be refused")

    body = {
        "messages": CHAT,
        "max_tokens": 64,
        "logprobs": True,
        "top_logprobs": 20,
        "n": 2,
        "ignore_eos": True,
        "stream": True,
    }
    with monkeypatch.context() as patched:
        patched.setattr(small_results.ENGINE, "generate", never)
        result = run_job(small_results.handler, {"openai_route": "/v1/chat/completions", "openai_input": body})
    message, status, _ = openai_failure(result)
    assert message.startswith("the result would pass MAX_RESULT_BYTES (8,192 bytes") and status == 400
    assert "lower max_tokens, n or top_logprobs" in message
    assert "its logprobs alone take at least" in message
    # Without ignore_eos the model may stop early, so the request runs: whether it ends by itself or
    # at the limit, the stream keeps what it sent and every choice ends with a finish_reason.
    body.update(ignore_eos=False, min_tokens=0, seed=3)
    result = run_job(small_results.handler, {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert "error" not in result, result
    raw = "".join(result["output"]).split("\n\n")
    events = [json.loads(e[len("data: ") :]) for e in raw if e and e != "data: [DONE]"]
    assert "".join(result["output"]).endswith("data: [DONE]\n\n")
    ends = {c["index"]: c for e in events for c in e["choices"] if c["finish_reason"]}
    assert set(ends) == {0, 1}
    assert all(c["finish_reason"] != "length" or c.get("limit") == "MAX_RESULT_BYTES" for c in ends.values())
    assert aggregated_bytes(result["output"]) <= RESULT_LIMIT


def test_an_end_held_back_by_the_result_limit_is_still_sent(small_results, monkeypatch) -> None:
    """The generation ends while the SDK is sending a chunk, so its last text and its end are merged
    into one chunk, and that chunk passes the limit: the stream still ends naming the limit. Before,
    the worker took the choice for ended (the engine had said so) and the stream stopped without
    any end (seen once through the job loop, test_worker_loop)."""

    async def generate(ids: Any, params: Any) -> Any:
        delta, usage = small_results.Delta, small_results.Usage
        yield delta(text="Once")
        for _ in range(20):  # the consumer takes the first chunk and the SDK "sends" it
            await asyncio.sleep(0)
        for _ in range(2000):  # then everything else at once: it piles up in one chunk
            yield delta(text=" upon")
        yield delta(finish_reason="length", usage=usage(prompt_tokens=4, completion_tokens=2001))

    monkeypatch.setattr(small_results.ENGINE, "generate", generate)
    request = {"prompt": "Once upon a time", "sampling_params": {"max_tokens": 2001}, "stream": True}
    output = ok(run_job(small_results.handler, request))
    assert output == [{"text": "Once"}, {"finish_reason": "length", "limit": "MAX_RESULT_BYTES"}]


def test_a_stream_that_reaches_the_result_limit_keeps_what_it_sent(small_results, qwen) -> None:
    request = {"prompt": "Once upon a time", "sampling_params": {"max_tokens": 400, "ignore_eos": True, "seed": 5}}
    result = run_job(small_results.handler, {**request, "stream": True})
    assert "error" not in result, result
    *sent, last = result["output"]
    assert last == {"finish_reason": "length", "limit": "MAX_RESULT_BYTES"}
    assert sent and all("text" in chunk for chunk in sent)
    assert aggregated_bytes(result["output"]) <= RESULT_LIMIT
    # What was sent is the start of the same generation with no limit: nothing garbled or lost.
    whole = native(qwen, **request, stream=True)
    assert streamed_text(whole).startswith(streamed_text(sent))
    assert aggregated_bytes(whole) > RESULT_LIMIT - 4096
    # The OpenAI stream ends the same way: the choice names the limit, then [DONE].
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "seed": 5, "stream": True}
    events = "".join(ok(run_job(small_results.handler, {"openai_route": "/v1/completions", "openai_input": body})))
    *_, closing, done = events.split("\n\n")[:-1]
    assert done == "data: [DONE]"
    [choice] = json.loads(closing[len("data: ") :])["choices"]
    assert (choice["finish_reason"], choice["limit"]) == ("length", "MAX_RESULT_BYTES")
    # A non-streamed answer over the limit is the same error, and the worker keeps serving.
    long = {**request, "sampling_params": {**request["sampling_params"], "max_tokens": 1500}}
    assert run_job(small_results.handler, long)["error"].startswith("the result would pass MAX_RESULT_BYTES")
    [short] = native(small_results, prompt="hi", sampling_params={"max_tokens": 4})
    assert short["usage"]["completion_tokens"] >= 1


# ---- a drop-in for worker-vllm, on the transformers engine ----------------------------------------
HUB_TESTS = json.loads((REPO / "tests" / "shared" / "worker_vllm_hub_tests.json").read_text())["tests"]


def test_worker_vllms_hub_tests_pass_unchanged(qwen) -> None:
    """worker-vllm's Runpod Hub test inputs, as they are (tests/text_generation/test_vllm_engine.py
    runs them on vLLM): the bare prompt gets DEFAULT_MAX_TOKENS, not 16 tokens."""
    basic, messages = (test["input"] for test in HUB_TESTS)
    [poem] = ok(run_job(qwen.handler, basic))
    assert poem["finish_reason"] == "stop" or poem["usage"]["completion_tokens"] > 16, poem
    [answer] = ok(run_job(qwen.handler, messages))
    completion = ChatCompletion.model_validate(answer)
    assert completion.model == qwen.SERVED_MODEL_NAME and 0 < completion.usage.completion_tokens <= 200


def test_default_max_tokens_on_a_bare_prompt(qwen, monkeypatch) -> None:
    never_ending(qwen, monkeypatch)
    [whole] = ok(run_job(qwen.handler, {"prompt": "Once", "sampling_params": {"temperature": 0}}))
    assert whole["usage"]["completion_tokens"] == qwen.DEFAULT_MAX_TOKENS == 512


def test_worker_vllms_generic_route_shape(qwen) -> None:
    assert ok(run_job(qwen.handler, {"route": "/v1/models"})) == ok(
        run_job(qwen.handler, {"openai_route": "/v1/models"})
    )
    body = {"messages": CHAT, **GREEDY}
    [generic] = ok(run_job(qwen.handler, {"route": "/v1/chat/completions", "body": body, "method": "POST"}))
    [openai] = ok(run_job(qwen.handler, openai_chat(body)))
    assert {k: v for k, v in generic.items() if k not in ("id", "created")} == {
        k: v for k, v in openai.items() if k not in ("id", "created")
    }
    refusals = {
        "route must be one of": {"route": "/tokenize", "body": {"prompt": "x"}},
        "/v1/completions takes POST, got 'GET'": {"route": "/v1/completions", "method": "GET"},
        "/v1/models takes GET": {"route": "/v1/models", "body": {}},
        "unknown field(s) prompt beside route": {"route": "/v1/completions", "prompt": "x"},
    }
    for expected, job_input in refusals.items():
        message, status, _ = openai_failure(run_job(qwen.handler, job_input))
        assert expected in message and status == 400, (expected, message)


def test_openai_routes_fail_in_openais_error_shape_native_ones_as_text(qwen, monkeypatch) -> None:
    """The status vLLM's server would give: 400 for the caller's mistakes, 500 for a failure
    inside the worker; a native request keeps the plain message."""
    message, status, kind = openai_failure(run_job(qwen.handler, openai_chat({"messages": CHAT, "n": 0})))
    assert (status, kind) == (400, "BadRequestError") and message.startswith("openai_input.n")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a secret detail of the failure")

    monkeypatch.setattr(qwen.ENGINE.model, "generate", broken)
    failed = openai_failure(run_job(qwen.handler, openai_chat({"messages": CHAT, **GREEDY})))
    assert failed == ("generation failed inside the worker; see the worker logs", 500, "InternalServerError")
    native_failure = run_job(qwen.handler, {"prompt": "x", "sampling_params": {"max_tokens": 2}})
    assert native_failure["error"] == "generation failed inside the worker; see the worker logs"


def test_worker_vllms_served_name_and_custom_chat_template(tiny_model, tmp_path) -> None:
    """OPENAI_SERVED_MODEL_NAME_OVERRIDE names the model; CUSTOM_CHAT_TEMPLATE (a file, or the Jinja
    itself, as vLLM's --chat-template takes it) replaces the model's template."""
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}<<assistant>>"
    (tmp_path / "chat.jinja").write_text(template)
    env = {"MODEL_NAME": str(tiny_model("qwen3")), "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model"}
    for source in (str(tmp_path / "chat.jinja"), template):
        module = load_handler(EXAMPLE, {**env, "CUSTOM_CHAT_TEMPLATE": source})
        assert ok(run_job(module.handler, {"openai_route": "/v1/models"}))[0]["data"][0]["id"] == "my-model"
        prompt = module.render_prompt(module.parse_request(openai_chat({"messages": CHAT}))[1]).text
        assert prompt == "<<system>>You are terse.\n<<user>>What is the capital of France?\n<<assistant>>"
    with pytest.raises(ValueError, match="neither a file nor a Jinja chat template"):
        load_handler(EXAMPLE, {**env, "CUSTOM_CHAT_TEMPLATE": "/no/such/template.jinja"})
    with pytest.raises(ValueError, match="both set the served name"):
        load_handler(EXAMPLE, {**env, "SERVED_MODEL_NAME": "other"})
