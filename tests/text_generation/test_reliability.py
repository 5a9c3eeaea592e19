"""01_text_generation under hostile and heavy traffic, on a tiny Qwen3.

Fuzzed requests (native and OpenAI), 200 concurrent jobs, a 500-job soak, secrets and prompts
kept out of the logs of `python handler.py`, and a burst through the real dev server.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.shared.harness import DevServer, json_lines, load_handler, run_job, run_local
from tests.shared.reliability import (
    FUZZ,
    assert_clean,
    assert_no_leaks,
    burst,
    dev_server_error,
    distinctive_prompt,
    job_inputs,
    load_mix,
    mutated,
    quiet_logs,
    report_load,
    run_load,
    secret_env,
    secret_values,
    soak,
    weighted,
)
from tests.shared.reliability import answer as stream_answer

EXAMPLE = "01_text_generation"
MAX_CONCURRENCY = 3
CONTEXT = 128
# Every request the fuzz can make valid is cheap: at most 128 tokens of context, 4 by default.
ENV = {
    "MAX_MODEL_LEN": str(CONTEXT),
    "DEFAULT_MAX_TOKENS": "4",
    "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "MAX_GENERATION_SECONDS": "30",
}
CHAT_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE = "/v1/chat/completions", "/v1/completions", "/v1/models"
GREEDY = {"temperature": 0, "max_tokens": 4}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_path(tiny_model) -> Path:
    return tiny_model("qwen3")


@pytest.fixture(scope="module")
def worker(model_path: Path) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(model_path), **ENV})


@pytest.fixture(scope="module")
def canary(worker: ModuleType) -> Any:
    """A fixed greedy job and its answer on the fresh worker; calling it proves the worker still
    gives exactly that answer."""
    job = {"messages": QUESTION, "sampling_params": GREEDY}
    expected = answer(run_job(worker.handler, job))
    assert "output" in expected, expected

    def check() -> None:
        assert answer(run_job(worker.handler, job)) == expected, "the worker no longer serves a valid job correctly"

    return check


def uncoalesced(output: list[Any]) -> list[Any]:
    """The stream as a client reads it. Chunks that pile up while the SDK POSTs one go out merged
    (coalesce.py), as timing allows: one chunk may hold several whole SSE events, or native text
    deltas joined. Split the events, join consecutive text deltas, so two runs compare equal."""
    items: list[Any] = []
    for chunk in output:
        if isinstance(chunk, str) and chunk.startswith("data: "):
            items += [event + "\n\n" for event in chunk.split("\n\n")[:-1]]
        elif isinstance(chunk, dict) and set(chunk) == {"text"} and items and set(items[-1]) == {"text"}:
            items[-1] = {"text": items[-1]["text"] + chunk["text"]}
        else:
            items.append(chunk)
    return items


def answer(result: dict[str, Any]) -> Any:
    """What a caller compares (tests.shared.reliability.answer), with the stream uncoalesced."""
    return stream_answer({**result, "output": uncoalesced(result["output"])} if "output" in result else result)


# ---- fuzzing ----------------------------------------------------------------------------------

TEXT = st.text(min_size=1, max_size=40)
PROMPT = weighted((4, TEXT), (1, st.sampled_from(["word " * 800, "x" * 4096, "Hello"])))  # long ones overflow
PART = mutated({"type": st.just("text"), "text": st.text(max_size=20)}, mutations=(0, 0, 0, 1))
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
CALL = {"id": st.just("call_1"), "type": st.just("function"), "function": st.just({"name": "f", "arguments": "{}"})}
MESSAGE = mutated(
    {"role": ROLES, "content": TEXT | st.lists(PART, max_size=2) | st.none()},
    {"name": TEXT, "tool_call_id": TEXT, "tool_calls": st.lists(st.fixed_dictionaries(CALL), max_size=1)},
    mutations=(0, 0, 0, 1),
)
MESSAGES = st.lists(MESSAGE, min_size=1, max_size=3)
SAMPLING = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 64),
    "repetition_penalty": st.floats(0, 2, exclude_min=True),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "seed": st.integers(0, 2**63 - 1),
    # vLLM's sampling fields (worker-vllm's native sampling_params take the same names).
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "min_tokens": st.integers(0, 4),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 999), max_size=3),
    "logit_bias": st.dictionaries(st.integers(0, 999).map(str), st.floats(-100, 100), max_size=3),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "n": st.just(1),
    # Refused unless left at their no-op value: each names itself in its error.
    "use_beam_search": st.booleans(),
    "best_of": st.sampled_from([None, 1, 2]),
}
TEMPLATE_OPTIONS = {
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.none() | st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
}
NATIVE_OPTIONS = {
    "sampling_params": mutated({}, SAMPLING, mutations=(0, 0, 1)),
    "stream": st.booleans(),
    **TEMPLATE_OPTIONS,
}
NATIVE = job_inputs(mutated({"prompt": PROMPT}, NATIVE_OPTIONS) | mutated({"messages": MESSAGES}, NATIVE_OPTIONS))

OPENAI_COMMON = {
    **SAMPLING,
    "model": TEXT,
    "stream": st.sampled_from([None, False, True]),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "n": st.sampled_from([None, 1, 2]),
    "user": TEXT,
    "structured_outputs": st.sampled_from(
        [None, {"choice": ["yes", "no"]}, {"regex": "[a-z]{2}"}, {"json_object": True}, {"json": {"type": "object"}}]
    ),
    "guided_json": st.sampled_from([None, {"type": "object"}]),
}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CHAT_BODY = mutated(
    {"messages": MESSAGES},
    {
        **OPENAI_COMMON,
        "max_completion_tokens": st.integers(1, 4),
        "logprobs": st.sampled_from([None, False, True]),
        "top_logprobs": st.integers(0, 3),
        "tools": st.sampled_from([None, [], [TOOL]]),
        "tool_choice": st.sampled_from(
            [None, "none", "auto", "required", {"type": "function", "function": {"name": "f"}}]
        ),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
        "include_reasoning": st.booleans(),
        "reasoning_effort": st.sampled_from([None, "low", "high"]),
        **TEMPLATE_OPTIONS,
    },
)
COMPLETION_BODY = mutated(
    {"prompt": PROMPT | st.lists(PROMPT, min_size=1, max_size=1)},
    {
        **OPENAI_COMMON,
        "echo": st.sampled_from([None, False]),
        "suffix": st.sampled_from([None, ""]),
        "logprobs": st.none() | st.integers(0, 3),
    },
)
OPENAI = job_inputs(
    weighted(
        (3, mutated({"openai_route": st.just(CHAT_ROUTE), "openai_input": CHAT_BODY})),
        (3, mutated({"openai_route": st.just(COMPLETIONS_ROUTE), "openai_input": COMPLETION_BODY})),
        (1, mutated({"openai_route": st.just(MODELS_ROUTE)}, {"openai_input": st.just({})})),
    )
)


def check_output(job_input: dict[str, Any], output: list[Any]) -> None:
    """A served request's output has its route's shape, and stayed inside the context."""
    assert output, "a served job streamed nothing"
    route = job_input.get("openai_route")
    if route == MODELS_ROUTE:
        assert output[0]["object"] == "list"
        return
    if route is None:
        last = output[-1]
        assert last["finish_reason"] in ("stop", "length") and last["usage"]["total_tokens"] <= CONTEXT
        return
    if isinstance(output[0], str):  # streamed: server-sent events ending with [DONE]
        # Several whole events may share a chunk (coalesced while the SDK POSTs the one before).
        assert all(event.startswith("data: ") for event in output) and output[-1].endswith("data: [DONE]\n\n")
        return
    [whole] = output
    parsed = (ChatCompletion if route == CHAT_ROUTE else Completion).model_validate(whole)
    assert parsed.usage.total_tokens <= CONTEXT


def fuzz(worker: ModuleType, canary: Any, requests: Any, name: str) -> None:
    served = refused = 0

    @FUZZ
    @given(job_input=requests)
    def one_request(job_input: Any) -> None:
        nonlocal served, refused
        result = run_job(worker.handler, job_input)
        if assert_clean(result, job_input) is None:
            served += 1
            check_output(job_input, result["output"])
        else:
            refused += 1
        canary()

    with quiet_logs():
        one_request()
    print(f"\n[fuzz] {EXAMPLE} ({name}): {served} requests served, {refused} refused")
    assert served and refused, "the fuzz should both serve and refuse requests"


def test_fuzzed_native_requests_get_a_result_or_a_clear_error(worker: ModuleType, canary: Any) -> None:
    """Any JSON in any native field, fields missing or unknown, wrong nesting: every job ends with a
    result or a clear error (no escaped exception, no traceback), and the worker serves on."""
    fuzz(worker, canary, NATIVE, "native")


def test_fuzzed_openai_requests_get_a_result_or_a_clear_error(worker: ModuleType, canary: Any) -> None:
    """The same for the OpenAI routes (chat, completions, models) and their bodies."""
    fuzz(worker, canary, OPENAI, "openai")


# ---- bugs the fuzzing found (precise reproducers) ---------------------------------------------


@pytest.mark.parametrize("route", [["/v1/chat/completions"], {"path": "/v1/models"}])
def test_an_openai_route_that_is_not_a_string_is_refused(worker: ModuleType, route: Any) -> None:
    """openai_route as a list or an object is a bad request, refused with a message naming the field."""
    result = run_job(worker.handler, {"openai_route": route, "openai_input": {"prompt": "hi"}})
    assert "openai_route" in (assert_clean(result, route) or "")


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-300},
        {"temperature": 5e-324, "seed": 1},
        {"temperature": 1.0, "repetition_penalty": 0.01},  # the smallest the schema accepts
    ],
)
def test_extreme_but_valid_sampling_values_never_fail_inside_the_worker(worker: ModuleType, sampling: dict) -> None:
    """The schema accepts any temperature in [0, 2] and repetition_penalty in [0.01, 2]: each value it
    accepts must generate (a tiny temperature is greedy), never fail on the way."""
    result = run_job(worker.handler, {"prompt": "Hello", "sampling_params": {"max_tokens": 2, **sampling}})
    assert assert_clean(result, sampling) is None, result
    assert result["output"][-1]["usage"]["completion_tokens"] >= 1


def test_a_repetition_penalty_below_its_floor_is_refused_naming_it(worker: ModuleType) -> None:
    """Dividing logits by a near-zero penalty overflows them: refused before the model runs."""
    sampling = {"max_tokens": 2, "repetition_penalty": 1e-300}
    error = assert_clean(run_job(worker.handler, {"prompt": "Hello", "sampling_params": sampling}), sampling)
    assert error is not None and "sampling_params.repetition_penalty" in error and "0.01" in error


# ---- load ---------------------------------------------------------------------------------------

VALID = [
    {"prompt": "The weather today is", "sampling_params": GREEDY},
    {"messages": QUESTION, "sampling_params": {"temperature": 0}, "stream": True},  # DEFAULT_MAX_TOKENS
    {"prompt": "Paris is", "sampling_params": {"temperature": 0.9, "seed": 7, "max_tokens": 4}},  # seeded
    {"prompt": "A cat and a dog", "sampling_params": {**GREEDY, "stop": ["e"], "repetition_penalty": 1.3}},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": QUESTION, **GREEDY}},
    {
        "openai_route": CHAT_ROUTE,
        "openai_input": {"messages": QUESTION, **GREEDY, "stream": True, "stream_options": {"include_usage": True}},
    },
    {"openai_route": COMPLETIONS_ROUTE, "openai_input": {"prompt": "Tokyo is", "temperature": 0, "max_tokens": 3}},
    {"openai_route": MODELS_ROUTE},
]
INVALID = [
    {"prompt": ""},
    {"prompt": "x", "messages": QUESTION},
    {"prompt": "x", "sampling_params": {"max_tokens": CONTEXT + 1}},
    {"prompt": "x", "sampling_params": {"temperature": 3}},
    {"prompt": "word " * 600},
    {"openai_route": "/v1/nope"},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": QUESTION, "n": 9}},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": QUESTION, "use_beam_search": True}},
    "just a string",
]


def test_200_concurrent_mixed_jobs_match_their_solo_runs(worker: ModuleType) -> None:
    """200 jobs at once, valid and invalid interleaved: every one answered exactly as when run alone
    (greedy and seeded outputs, and each error), with at most MAX_CONCURRENCY generations at a time."""
    assert worker.WORKER_CONFIG["concurrency_modifier"](1) == worker.MAX_CONCURRENCY == MAX_CONCURRENCY
    specs = VALID + INVALID
    with quiet_logs():
        alone = [answer(run_job(worker.handler, spec)) for spec in specs]
        assert all("output" in a for a in alone[: len(VALID)]) and all("error" in a for a in alone[len(VALID) :])
        inputs = load_mix(specs, 200)
        run = run_load(worker.handler, inputs, probe=lambda: worker.ENGINE.active)
    for index, result in enumerate(run.results):
        assert_clean(result)
        assert answer(result) == alone[index % len(specs)], f"job {index}: {inputs[index]}"
    valid = sum(1 for index in range(200) if index % len(specs) < len(VALID))
    report_load(EXAMPLE, run, valid, MAX_CONCURRENCY, run.peak)
    assert 1 < run.peak <= MAX_CONCURRENCY, f"peak of {run.peak} concurrent generations"
    assert worker.ENGINE.active == 0


# ---- soak ---------------------------------------------------------------------------------------


def test_500_sequential_jobs_leak_no_memory_threads_or_files(worker: ModuleType) -> None:
    """After a warm-up, 500 jobs one after another: every answer the same as the first time, resident
    memory grows under 10%, and threads and open files come back to their count."""
    specs = VALID + INVALID[:3]
    with quiet_logs():
        expected = [answer(run_job(worker.handler, spec)) for spec in specs]

        def check(index: int, result: dict[str, Any]) -> None:
            assert answer(result) == expected[index % len(specs)], index

        run = soak(worker.handler, specs, check)
    run.report(EXAMPLE)
    run.assert_steady()


# ---- secrets and prompts in logs ------------------------------------------------------------------


def test_python_handler_py_keeps_secrets_and_prompts_out_of_the_logs(model_path: Path) -> None:
    """`python handler.py` at INFO with HF_TOKEN, RUNPOD_API_KEY and a bucket secret set: no secret in
    its output, and the prompt in no log line (only in the request, never echoed)."""
    env = {"MODEL_NAME": str(model_path), **ENV, **secret_env()}
    prompt = distinctive_prompt()
    job = {"input": {"messages": [{"role": "user", "content": prompt}], "sampling_params": GREEDY, "stream": True}}
    run = run_local(EXAMPLE, env, "--test_input", json.dumps(job))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json_lines(run.stdout)[-1]["finish_reason"] in ("stop", "length")
    assert_no_leaks(run.stdout + run.stderr, secret_values(env), [prompt])


# ---- the real dev server ------------------------------------------------------------------------


def test_dev_server_answers_a_concurrent_burst_without_a_500(worker: ModuleType, model_path: Path) -> None:
    """18 concurrent /runsync requests, valid and invalid, through `python handler.py --rp_serve_api`:
    no HTTP 500; valid ones COMPLETED with the same output as in-process, invalid ones with their error."""
    bodies = load_mix(VALID[:6] + INVALID[:3], 18)
    with quiet_logs():
        expected = [answer(run_job(worker.handler, body)) for body in bodies]
    env = {"MODEL_NAME": str(model_path), **ENV, **secret_env()}
    with DevServer(EXAMPLE, env) as server:
        responses = burst(server, [{"input": body} for body in bodies])
        logs = server.stop()
    assert [response.status_code for response in responses] == [200] * len(bodies), logs[-3000:]
    for body, response, want in zip(bodies, responses, expected, strict=True):
        got = response.json()
        if "error" in want:
            assert dev_server_error(got) == want["error"], got
        else:
            assert got["status"] == "COMPLETED" and dev_server_error(got) is None, got
            assert answer({"output": got["output"]}) == want, body
    assert_no_leaks(logs, secret_values(env), [])
