"""01_text_generation: the handler on tiny random-weight models of six real LLM families."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.harness import DevServer, json_lines, load_handler, run_job, run_job_async, run_local

EXAMPLE = "01_text_generation"
FAMILIES = ["llama", "mistral", "mixtral", "qwen3", "phi3", "gemma3"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per family, built lazily and shared by the module's tests."""
    loaded: dict[str, ModuleType] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> ModuleType:
            loaded[family] = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model(family))})
            self[family] = loaded[family]
            return loaded[family]

    return Lazy()


@pytest.fixture(scope="module")
def qwen(handlers) -> ModuleType:
    return handlers["qwen3"]


def ok(result: dict[str, Any]) -> list[Any]:
    assert "error" not in result, result
    return result["output"]


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
    assert last["finish_reason"] in ("stop", "length")
    prompt = module.render_prompt(module.GenerateRequest(messages=CHAT))
    assert last["usage"]["prompt_tokens"] == prompt.tokens
    assert 1 <= last["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    assert last["usage"]["total_tokens"] == prompt.tokens + last["usage"]["completion_tokens"]

    # The same greedy request unstreamed, and through transformers directly, say the same thing.
    [whole] = native(module, messages=CHAT, sampling_params=GREEDY)
    reference, reference_ids = raw_greedy(module, prompt.text, True, GREEDY["max_tokens"])
    assert whole["text"] == streamed_text(texts) == reference
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


def test_assistant_last_message_continues_that_turn(qwen) -> None:
    turns = [*CHAT, {"role": "assistant", "content": "The capital is"}]
    prompt = qwen.render_prompt(qwen.GenerateRequest(messages=turns))
    assert prompt.text.rstrip().endswith("The capital is")
    open_turn = qwen.render_prompt(qwen.GenerateRequest(messages=CHAT))
    assert open_turn.text.endswith("<|im_start|>assistant\n")


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


def test_content_parts_are_joined(qwen) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    prompt = qwen.render_prompt(qwen.GenerateRequest.model_validate({"messages": parts}))
    assert "Hello there" in prompt.text


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


def test_environment_maps_to_vllm_engine_arguments(qwen) -> None:
    settings = {
        "revision": "abc123",
        "tokenizer_name": None,
        "dtype": "bfloat16",
        "quantization": "awq",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.85,
        "tensor_parallel_size": 2,
        "max_num_seqs": 64,
        "enforce_eager": True,
        "trust_remote_code": False,
        "download_dir": None,
    }
    args = qwen.vllm_engine_args("org/model", **settings)
    assert args["model"] == "org/model" and args["quantization"] == "awq" and args["tensor_parallel_size"] == 2
    assert (args["max_model_len"], args["gpu_memory_utilization"], args["max_num_seqs"]) == (8192, 0.85, 64)
    assert qwen.vllm_engine_args("m", **{**settings, "quantization": "bnb-4bit"})["quantization"] == "bitsandbytes"
    with pytest.raises(ValueError, match="QUANTIZATION=bnb-8bit is not available on the vLLM engine"):
        qwen.vllm_engine_args("m", **{**settings, "quantization": "bnb-8bit"})
    with pytest.raises(ValueError, match="DTYPE must be auto"):
        qwen.vllm_engine_args("m", **{**settings, "dtype": "fp16"})


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


def openai_chat(body: dict[str, Any]) -> dict[str, Any]:
    return {"openai_route": "/v1/chat/completions", "openai_input": body}


def openai_text(body: dict[str, Any]) -> dict[str, Any]:
    return {"openai_route": "/v1/completions", "openai_input": body}


def parse_sse(events: list[str]) -> list[ChatCompletionChunk]:
    """Check the framing of every event and parse the chat chunks with openai's types."""
    assert events[-1] == "data: [DONE]\n\n"
    chunks = []
    for event in events[:-1]:
        assert isinstance(event, str) and event.startswith("data: ") and event.endswith("\n\n")
        assert event.count("\n\n") == 1, "one whole event per chunk"
        chunks.append(ChatCompletionChunk.model_validate(json.loads(event[len("data: ") :])))
    return chunks


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


def test_unknown_openai_fields_are_ignored(qwen) -> None:
    body = {"messages": CHAT, **GREEDY, "user": "u1", "metadata": {"a": 1}, "parallel_tool_calls": False, "n": 1}
    [response] = ok(run_job(qwen.handler, openai_chat(body)))
    assert ChatCompletion.model_validate(response).choices[0].message.role == "assistant"


def runpod_gateway(handler: Any) -> httpx.MockTransport:
    """Stand-in for Runpod's OpenAI gateway: requests to .../openai/v1/<route> become jobs; a
    streamed job's SSE chunks are written out in order as the response body."""

    def respond(request: httpx.Request) -> httpx.Response:
        job: dict[str, Any] = {"openai_route": "/v1/" + request.url.path.split("/v1/", 1)[1]}
        if request.method == "POST":
            job["openai_input"] = json.loads(request.content)
        result = run_job(handler, job)
        if "error" in result:
            return httpx.Response(400, json={"error": {"message": result["error"]}})
        output = result["output"]
        if output and isinstance(output[0], str):
            return httpx.Response(200, content="".join(output).encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=output[0])

    return httpx.MockTransport(respond)


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
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.chat.completions.create(model="m", messages=CHAT, n=2)
    assert [m.id for m in client.models.list()] == [qwen.SERVED_MODEL_NAME]


# ---- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    ("a string", "input must be a JSON object"),
    ({}, "send exactly one of prompt or messages"),
    ({"prompt": "a", "messages": CHAT}, "send exactly one of prompt or messages"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        "messages.0.role: Input should be 'system', 'developer', 'user' or",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
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
    (openai_chat({"messages": CHAT, "n": 2}), "openai_input.n: n=2 is not supported by this worker"),
    (openai_chat({"messages": CHAT, "logprobs": True}), "logprobs is not supported by this worker"),
    (openai_chat({"messages": CHAT, "tools": [{"type": "function"}]}), "tool calling (tools, tool_choice) is not"),
    (openai_chat({"messages": CHAT, "presence_penalty": 0.5}), "presence_penalty other than 0 is not supported"),
    (openai_chat({"messages": CHAT, "response_format": {"type": "json_object"}}), "response_format other than text"),
    (openai_chat({"messages": CHAT, "max_tokens": 0}), "openai_input.max_tokens: Input should be greater than"),
    (openai_chat({"model": "m"}), "openai_input.messages: Field required"),
    (openai_text({"prompt": [1, 2, 3]}), "a prompt of token ids is not supported"),
    (openai_text({"prompt": ["a", "b"]}), "a batch of prompts is not supported"),
    (openai_text({"prompt": "a", "echo": True}), "echo is not supported by this worker"),
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


def test_a_generation_past_its_time_limit_is_stopped_with_a_clear_error(tiny_model, monkeypatch) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3")), "MAX_GENERATION_SECONDS": "0.5"})
    never_ending(module, monkeypatch)
    calls, hook = count_forward_calls(module)
    request = {"prompt": "Once", "sampling_params": {"temperature": 1.0, "max_tokens": 2000}, "stream": True}
    try:
        result = run_job(module.handler, request)
    finally:
        hook.remove()
    assert result["error"] == (
        "generation stopped at its 0.5-second limit (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit"
        " on the endpoint"
    )
    assert len(calls) < 2000, "the generation was stopped, not finished"

    async def idle() -> None:
        await wait_until_idle(module)

    asyncio.run(idle())
    assert module.ENGINE.active == 0
    assert native(module, prompt="short", sampling_params={"max_tokens": 3})[-1]["usage"]["completion_tokens"] >= 1


def test_a_model_failure_mid_generation_is_an_error_and_the_next_job_is_served(qwen) -> None:
    calls: list[int] = []

    def explode_on_fifth_step(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("kernel exploded at /secret/path")

    hook = qwen.ENGINE.model.register_forward_hook(explode_on_fifth_step)
    try:
        result = run_job(qwen.handler, {"prompt": "Once", "sampling_params": {"max_tokens": 50}, "stream": True})
    finally:
        hook.remove()
    assert result["error"] == "generation failed inside the worker; see the worker logs"
    assert native(qwen, prompt="again", sampling_params={"max_tokens": 3})[-1]["usage"]["completion_tokens"] >= 1


def test_cuda_out_of_memory_answers_the_job_and_keeps_the_worker(qwen, monkeypatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(qwen.ENGINE.model, "generate", oom)
    result = run_job(qwen.handler, {"prompt": "Once", "sampling_params": {"max_tokens": 5}})
    assert result["error"].startswith("out of GPU memory for this request")
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
    test_input = json.loads((Path(__file__).parents[1] / EXAMPLE / "test_input.json").read_text())["input"]
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
