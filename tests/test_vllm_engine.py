"""01_text_generation on vLLM's real engine (the `vllm-cpu` build), with a tiny random-weight Llama.

vLLM cannot share the main test environment (its CPU build brings packages that break imports
there), so these tests run in their own virtual environment: `bash tests/vllm_cpu.sh`, which
`.ci/run` calls after the main suite. In the main environment they are skipped.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own environment: bash tests/vllm_cpu.sh")

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.harness import json_lines, load_handler, run_job, run_job_async, run_local

EXAMPLE = "01_text_generation"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 16}


def vllm_cpu_env(model: Path, tmp: Path) -> dict[str, str]:
    """What vLLM's CPU build needs to start small and quiet on a shared machine."""
    return {
        "MODEL_NAME": str(model),
        "ENGINE": "vllm",
        "DTYPE": "float32",
        "MAX_MODEL_LEN": "512",
        "MAX_NUM_SEQS": "8",
        "ENFORCE_EAGER": "true",  # no torch.compile of the model: seconds to start instead of minutes
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: otherwise the KV cache takes most of the machine
        "VLLM_HOST_IP": "127.0.0.1",  # keep its internal address on loopback
        "VLLM_RPC_BASE_PATH": str(tmp),  # its socket files, out of /tmp
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout carries the printed chunks
    }


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory) -> dict[str, str]:
    return vllm_cpu_env(tiny_model("llama"), tmp_path_factory.mktemp("vllm-rpc"))


@pytest.fixture(scope="module")
def vllm(env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_handler(EXAMPLE, env)
    assert type(module.ENGINE).__name__ == "VLLMEngine"
    yield module
    module.ENGINE.shutdown()  # its engine process, before pytest closes the streams it logs to
    sys.modules.pop(module.__name__, None)  # or AsyncLLM.__del__ runs again at interpreter exit


def ok(result: dict[str, Any]) -> list[Any]:
    assert "error" not in result, result
    return result["output"]


def native(module: ModuleType, **request: Any) -> list[Any]:
    return ok(run_job(module.handler, request))


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk.get("text", "") for chunk in chunks)


def test_streaming_order_finish_reason_and_usage(vllm: ModuleType) -> None:
    *deltas, last = native(vllm, messages=CHAT, sampling_params=GREEDY, stream=True)
    assert deltas and all(set(d) == {"text"} and d["text"] for d in deltas), "text deltas, never empty"
    assert last["finish_reason"] in ("stop", "length")
    prompt = vllm.render_prompt(vllm.GenerateRequest(messages=CHAT))
    assert last["usage"]["prompt_tokens"] == prompt.tokens
    assert 1 <= last["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    [whole] = native(vllm, messages=CHAT, sampling_params=GREEDY)
    assert whole["text"] == text_of(deltas) and whole["usage"] == last["usage"]


def test_length_finish(vllm: ModuleType) -> None:
    [whole] = native(vllm, prompt="Once upon a time", sampling_params={"temperature": 0, "max_tokens": 5})
    assert whole["finish_reason"] == "length" or whole["usage"]["completion_tokens"] < 5
    if whole["finish_reason"] == "length":
        assert whole["usage"]["completion_tokens"] == 5


def test_stop_sequences(vllm: ModuleType) -> None:
    greedy = native(vllm, prompt="The weather today", sampling_params={"temperature": 0, "max_tokens": 40})[0]["text"]
    stop = greedy[10:14]
    assert stop.strip()
    chunks = native(
        vllm, prompt="The weather today", sampling_params={"temperature": 0, "max_tokens": 40, "stop": stop}
    )
    assert chunks[0]["text"] == greedy[: greedy.index(stop)] and chunks[0]["finish_reason"] == "stop"


def test_seeded_sampling_reproduces(vllm: ModuleType) -> None:
    def sample(seed: int) -> str:
        return native(vllm, prompt="Once", sampling_params={"temperature": 1.0, "max_tokens": 24, "seed": seed})[0][
            "text"
        ]

    assert sample(3) == sample(3)
    assert len({sample(3), sample(4), sample(5)}) > 1


def test_openai_chat_completions_and_sse(vllm: ModuleType) -> None:
    body = {"messages": CHAT, **GREEDY}
    [response] = ok(run_job(vllm.handler, {"openai_route": "/v1/chat/completions", "openai_input": body}))
    reference = ChatCompletion.model_validate(response).choices[0].message.content
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    events = ok(run_job(vllm.handler, {"openai_route": "/v1/chat/completions", "openai_input": {**body, **streamed}}))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[len("data: ") :])) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == response["usage"]["completion_tokens"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    text = {"prompt": "The weather", "temperature": 0, "max_tokens": 8}
    [completion] = ok(run_job(vllm.handler, {"openai_route": "/v1/completions", "openai_input": text}))
    assert Completion.model_validate(completion).choices[0].finish_reason in ("stop", "length")
    [models] = ok(run_job(vllm.handler, {"openai_route": "/v1/models"}))
    assert models["data"][0]["id"] == vllm.SERVED_MODEL_NAME


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"prompt": "a", "messages": CHAT}, "send exactly one of prompt or messages"),
        ({"prompt": "hi", "sampling_params": {"max_tokens": 600}}, "sampling_params.max_tokens: Input should be less"),
        ({"prompt": "x " * 600}, "leaves no room in the 512-token context (MAX_MODEL_LEN)"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": CHAT, "n": 2}}, "n=2 is not supported"),
    ],
)
def test_bad_input_and_the_worker_serves_on(vllm: ModuleType, job_input: Any, message: str) -> None:
    assert message in run_job(vllm.handler, job_input)["error"]
    assert native(vllm, prompt="still serving", sampling_params={"max_tokens": 2})[-1]["usage"]


def test_four_concurrent_streams_match_their_solo_runs(vllm: ModuleType) -> None:
    requests = [
        {"prompt": prompt, "sampling_params": {"temperature": 0, "max_tokens": 24}, "stream": True}
        for prompt in ("Paris is", "The train", "Cats and dogs", "Numbers:")
    ]
    alone = [text_of(native(vllm, **request)) for request in requests]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(vllm.handler, {"input": r}) for r in requests))

    assert [text_of(ok(result)) for result in asyncio.run(together())] == alone


def test_an_abandoned_stream_is_aborted_in_the_engine(vllm: ModuleType) -> None:
    request = {"prompt": "Once", "sampling_params": {"temperature": 1.0, "max_tokens": 400}, "stream": True}

    async def read_two_then_leave() -> int:
        stream = vllm.handler({"id": "gone", "input": request})
        await anext(stream)
        await anext(stream)
        await stream.aclose()
        for _ in range(200):  # the abort reaches the engine's own loop asynchronously
            unfinished = vllm.ENGINE.engine.output_processor.get_num_unfinished_requests()
            if unfinished == 0:
                return 0
            await asyncio.sleep(0.05)
        return unfinished

    assert asyncio.run(read_two_then_leave()) == 0
    assert vllm.ENGINE.active == 0


def test_python_handler_py_with_the_vllm_engine(env: dict[str, str]) -> None:
    """The engine core starts in a spawned process that imports handler.py again: the guard keeps
    that import from building a second engine, and the local run prints real chunks."""
    run = run_local(EXAMPLE, {**env, "RUNPOD_LOG_LEVEL": "INFO"}, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    *deltas, last = json_lines(run.stdout)
    assert deltas and all(d["text"] for d in deltas) and last["finish_reason"] in ("stop", "length")
    assert run.stdout.count("Loaded ") == 1, "one engine, loaded once"
