"""04_multimodal under hostile and heavy traffic, on a tiny CLIP and a tiny LLaVA 1.5.

Fuzzed requests (every task, and OpenAI chat), 200 concurrent jobs, a 500-job soak, secrets,
questions and images kept out of the logs of `python handler.py`, and a burst through the real
dev server.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion

from tests.shared.harness import DevServer, json_lines, load_handler, run_job, run_local
from tests.shared.images import png_data_uri
from tests.shared.reliability import (
    FUZZ,
    JUNK,
    ConcurrencyCounter,
    answer,
    assert_clean,
    assert_close,
    assert_no_leaks,
    burst,
    dev_server_error,
    distinctive_prompt,
    job_inputs,
    load_mix,
    mutated,
    not_costly_int,
    payload_fingerprint,
    quiet_logs,
    report_load,
    run_load,
    secret_env,
    secret_values,
    soak,
    weighted,
)

EXAMPLE = "04_multimodal"
MAX_CONCURRENCY = 3
MAX_TOKENS = 4
# Every answer the fuzz can get generated is at most 4 tokens (the default, and the valid maximum it sends).
ENV = {
    "DEFAULT_MAX_TOKENS": str(MAX_TOKENS),
    "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "MAX_LABELS": "8",
    "MAX_EMBED_ITEMS": "4",
    "DOWNLOAD_TIMEOUT_S": "2",
    "MAX_GENERATION_SECONDS": "30",
}
CHAT_ROUTE = "/v1/chat/completions"
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
RARELY = (0, 0, 0, 0, 0, 1)  # mutations deep inside a conversation: each one alone breaks the whole request
# Small images keep a failing example readable; every model here resizes them anyway.
IMAGE = png_data_uri(24, 16, seed=1)
OTHER_IMAGE = png_data_uri(12, 12, seed=2)
JPEG = png_data_uri(16, 24, seed=3, image_format="JPEG")
PRIVATE_URL = "http://127.0.0.1:9/x.png"


@pytest.fixture(scope="module")
def paths(tiny_model) -> dict[str, Path]:
    return {"clip": tiny_model("clip"), "llava": tiny_model("llava")}


@pytest.fixture(scope="module")
def clip(paths: dict[str, Path]) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(paths["clip"]), **ENV})


@pytest.fixture(scope="module")
def llava(paths: dict[str, Path]) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(paths["llava"]), **ENV})


def make_canary(worker: ModuleType, job: dict[str, Any]) -> Any:
    """A fixed job and its answer on the fresh worker; calling the result proves the worker still
    gives exactly that answer."""
    expected = answer(run_job(worker.handler, job))
    assert "output" in expected, expected

    def check() -> None:
        assert answer(run_job(worker.handler, job)) == expected, "the worker no longer serves a valid job correctly"

    return check


@pytest.fixture(scope="module")
def clip_canary(clip: ModuleType) -> Any:
    return make_canary(clip, {"task": "classify", "image": IMAGE, "labels": ["a cat", "a dog", "a city"]})


@pytest.fixture(scope="module")
def llava_canary(llava: ModuleType) -> Any:
    return make_canary(llava, {"task": "answer", "image": IMAGE, "question": "What is it?", "sampling_params": GREEDY})


# ---- fuzzing ----------------------------------------------------------------------------------

TEXT = st.text(min_size=1, max_size=40)
SOURCES = weighted(
    (4, st.sampled_from([IMAGE, OTHER_IMAGE, JPEG, IMAGE.split(",", 1)[1]])),  # data URIs and bare base64
    (
        1,
        st.sampled_from(
            [
                PRIVATE_URL,  # refused before any connection: only public addresses are fetched
                "http://169.254.169.254/latest/meta-data",
                "ftp://example.com/x.png",
                "data:text/plain;base64,aGk=",
                "data:image/png;base64,",
                "aGVsbG8gd29ybGQ=",
            ]
        ),
    ),
    (1, st.text(max_size=30)),
)
# Junk never holds an int a worker would accept and spend on (max_tokens up to the 2048 context).
CHEAP_JUNK = JUNK.filter(not_costly_int(MAX_TOKENS))
TEMPLATES = weighted((3, st.sampled_from(["a photo of a {}.", "{}", "{} {{in braces}}"])), (1, st.text(max_size=30)))
CLIP_REQUESTS = job_inputs(
    weighted(
        (
            3,
            mutated(
                {"task": st.just("classify"), "image": SOURCES, "labels": st.lists(TEXT, min_size=2, max_size=4)},
                {"hypothesis_template": TEMPLATES},
            ),
        ),
        (
            3,
            mutated(
                {"task": st.just("embed")},
                {"images": st.lists(SOURCES, max_size=2), "texts": st.lists(TEXT, max_size=2)},
            ),
        ),
        (1, mutated({"task": st.sampled_from(["caption", "answer", "chat"]), "image": SOURCES})),
        (1, mutated({"openai_route": st.sampled_from(["/v1/models", CHAT_ROUTE])})),
    )
)

SAMPLING = {
    "max_tokens": st.integers(1, MAX_TOKENS),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 64),
    "repetition_penalty": st.floats(0, 2, exclude_min=True),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "seed": st.integers(0, 2**63 - 1),
}
GENERATING = {
    "sampling_params": mutated({}, SAMPLING, junk=CHEAP_JUNK, mutations=(0, 0, 1)),
    "stream": st.booleans(),
}
TEXT_PART = mutated({"type": st.just("text"), "text": st.text(max_size=30)}, mutations=RARELY)
IMAGE_URL = mutated({"url": SOURCES}, {"detail": st.just("low")}, mutations=RARELY)
IMAGE_PART = mutated({"type": st.just("image_url"), "image_url": IMAGE_URL}, mutations=RARELY)
MESSAGE = mutated(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.text(max_size=40) | st.lists(TEXT_PART | IMAGE_PART, min_size=1, max_size=3),
    },
    mutations=RARELY,
)
# A conversation that opens with a question about an image, then maybe more turns.
FIRST = mutated({"role": st.just("user"), "content": st.tuples(IMAGE_PART, TEXT_PART).map(list)}, mutations=RARELY)
MESSAGES = st.tuples(FIRST, st.lists(MESSAGE, max_size=2)).map(lambda pair: [pair[0], *pair[1]])
OPENAI_BODY = mutated(
    {"messages": MESSAGES},
    {
        **SAMPLING,
        "max_completion_tokens": st.integers(1, MAX_TOKENS),
        "model": TEXT,
        "stream": st.sampled_from([None, False, True]),
        "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "n": st.sampled_from([None, 1]),
        "logprobs": st.sampled_from([None, False]),
        "tools": st.sampled_from([None, []]),
        "user": TEXT,
    },
    junk=CHEAP_JUNK,
)
LLAVA_REQUESTS = job_inputs(
    weighted(
        (2, mutated({"task": st.just("caption"), "image": SOURCES}, GENERATING, junk=CHEAP_JUNK)),
        (2, mutated({"task": st.just("answer"), "image": SOURCES, "question": TEXT}, GENERATING, junk=CHEAP_JUNK)),
        (2, mutated({"task": st.just("chat"), "messages": MESSAGES}, GENERATING, junk=CHEAP_JUNK)),
        (3, mutated({"openai_route": st.just(CHAT_ROUTE), "openai_input": OPENAI_BODY}, junk=CHEAP_JUNK)),
        (1, mutated({"task": st.sampled_from(["classify", "embed"]), "image": SOURCES})),
    ),
    junk=CHEAP_JUNK,
)


def check_output(job_input: dict[str, Any], output: list[Any]) -> None:
    """A served request's output has its task's shape; answers stay within their token budget."""
    assert output, "a served job streamed nothing"
    task, route = job_input.get("task"), job_input.get("openai_route")
    if route == "/v1/models":
        assert output[0]["object"] == "list"
    elif task == "classify":
        [result] = output
        assert sorted(entry["label"] for entry in result["labels"]) == sorted(job_input["labels"])
        assert abs(sum(entry["score"] for entry in result["labels"]) - 1) < 1e-4
    elif task == "embed":
        [result] = output
        assert len(result.get("image_embeddings", [])) == len(job_input.get("images", []))
        assert len(result.get("text_embeddings", [])) == len(job_input.get("texts", []))
    elif route == CHAT_ROUTE and isinstance(output[0], str):  # streamed: server-sent events ending with [DONE]
        assert all(event.startswith("data: ") for event in output) and "".join(output).endswith("data: [DONE]\n\n")
    elif route == CHAT_ROUTE:
        [whole] = output
        assert ChatCompletion.model_validate(whole).usage.completion_tokens <= MAX_TOKENS
    else:
        last = output[-1]
        assert last["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"] <= MAX_TOKENS


def fuzz(worker: ModuleType, canary: Any, requests: Any, name: str, examples: int) -> None:
    served = refused = 0

    @settings(FUZZ, max_examples=examples)
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


def test_fuzzed_clip_requests_get_a_result_or_a_clear_error(clip: ModuleType, clip_canary: Any) -> None:
    """CLIP: any JSON in any field of classify and embed (and tasks it cannot do), fields missing or
    unknown, junk and private-URL images, wrong nesting: every job ends with a result or a clear error
    (no escaped exception, no traceback), and the worker serves on."""
    fuzz(clip, clip_canary, CLIP_REQUESTS, "clip", examples=60)


def test_fuzzed_llava_requests_get_a_result_or_a_clear_error(llava: ModuleType, llava_canary: Any) -> None:
    """LLaVA: the same for caption, answer, chat and OpenAI chat with image parts."""
    fuzz(llava, llava_canary, LLAVA_REQUESTS, "llava", examples=80)  # conversations break easily


# ---- bugs the fuzzing found (precise reproducers) ---------------------------------------------


@pytest.mark.parametrize("task", [["caption"], {"name": "caption"}])
def test_a_task_that_is_not_a_string_is_refused(llava: ModuleType, task: Any) -> None:
    """task as a list or an object is a bad request, refused with a message naming the field."""
    result = run_job(llava.handler, {"task": task, "image": IMAGE})
    assert "task" in (assert_clean(result, task) or "")


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-300},
        {"temperature": 5e-324, "seed": 1},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
    ],
)
def test_extreme_but_valid_sampling_values_never_fail_inside_the_worker(llava: ModuleType, sampling: dict) -> None:
    """Every temperature and repetition_penalty the schema accepts generates (a tiny temperature is
    greedy), or is refused by validation."""
    job_input = {"task": "caption", "image": IMAGE, "sampling_params": {"max_tokens": 2, **sampling}}
    assert_clean(run_job(llava.handler, job_input), sampling)


# ---- load ---------------------------------------------------------------------------------------

IMAGE_QUESTION = [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What?"}]}
]
LLAVA_VALID = [
    {"task": "caption", "image": IMAGE, "sampling_params": GREEDY},
    {"task": "answer", "image": OTHER_IMAGE, "question": "What colour?", "sampling_params": GREEDY, "stream": True},
    {"task": "chat", "messages": IMAGE_QUESTION, "sampling_params": {"temperature": 0}},  # DEFAULT_MAX_TOKENS
    {"task": "caption", "image": JPEG, "sampling_params": {"temperature": 0.8, "seed": 5, "max_tokens": 3}},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": IMAGE_QUESTION, **GREEDY}},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": IMAGE_QUESTION, **GREEDY, "stream": True}},
]
LLAVA_INVALID = [
    {"task": "caption", "image": PRIVATE_URL},
    {"task": "caption", "image": "%%% not base64 %%%"},
    {"task": "chat", "messages": [{"role": "user", "content": "no image"}]},
    {"openai_route": CHAT_ROUTE, "openai_input": {"messages": IMAGE_QUESTION, "n": 3}},
    {"task": "classify", "image": IMAGE, "labels": ["a", "b"]},
    "just a string",
]
CLIP_VALID = [
    {"task": "classify", "image": IMAGE, "labels": ["a cat", "a dog"]},
    {"task": "classify", "image": JPEG, "labels": ["sun", "sea", "city"], "hypothesis_template": "{}"},
    {"task": "embed", "images": [IMAGE, OTHER_IMAGE], "texts": ["a cat"]},
    {"task": "embed", "texts": ["only text", "and more"]},
    {"openai_route": "/v1/models"},
]
CLIP_INVALID = [
    {"task": "classify", "image": IMAGE, "labels": ["only one"]},
    {"task": "classify", "image": PRIVATE_URL, "labels": ["a", "b"]},
    {"task": "embed"},
    {"task": "caption", "image": IMAGE},
    "just a string",
]


def test_200_concurrent_mixed_llava_jobs_match_their_solo_runs(llava: ModuleType) -> None:
    """200 LLaVA jobs at once, valid and invalid interleaved: every one answered exactly as when run
    alone (greedy and seeded answers, each error), with at most MAX_CONCURRENCY generations at a time."""
    assert llava.WORKER_CONFIG["concurrency_modifier"](1) == llava.MAX_CONCURRENCY == MAX_CONCURRENCY
    specs = LLAVA_VALID + LLAVA_INVALID
    with quiet_logs():
        alone = [answer(run_job(llava.handler, spec)) for spec in specs]
        assert all("output" in a for a in alone[: len(LLAVA_VALID)])
        assert all("error" in a for a in alone[len(LLAVA_VALID) :])
        inputs = load_mix(specs, 200)
        run = run_load(llava.handler, inputs, probe=lambda: llava.GENERATOR.active)
    for index, result in enumerate(run.results):
        assert_clean(result)
        assert answer(result) == alone[index % len(specs)], f"job {index}: {str(inputs[index])[:200]}"
    valid = sum(1 for index in range(200) if index % len(specs) < len(LLAVA_VALID))
    report_load(f"{EXAMPLE} (llava)", run, valid, MAX_CONCURRENCY, run.peak)
    assert 1 < run.peak <= MAX_CONCURRENCY, f"peak of {run.peak} concurrent generations"
    assert llava.GENERATOR.active == 0


def test_200_concurrent_mixed_clip_jobs_match_their_solo_runs(clip: ModuleType, monkeypatch) -> None:
    """200 CLIP jobs at once, valid and invalid interleaved: every one answered as when run alone,
    each error the same, and the model runs on its one thread, one batched forward pass at a time."""
    assert clip.WORKER_CONFIG["concurrency_modifier"](1) == clip.MAX_CONCURRENCY == MAX_CONCURRENCY
    specs = CLIP_VALID + CLIP_INVALID
    with quiet_logs():
        alone = [answer(run_job(clip.handler, spec)) for spec in specs]
        assert all("output" in a for a in alone[: len(CLIP_VALID)])
        assert all("error" in a for a in alone[len(CLIP_VALID) :])
        counter = ConcurrencyCounter()
        monkeypatch.setattr(clip.EMBEDDER, "encode_images", counter.wrap(clip.EMBEDDER.encode_images))
        monkeypatch.setattr(clip.EMBEDDER, "encode_texts", counter.wrap(clip.EMBEDDER.encode_texts))
        inputs = load_mix(specs, 200)
        batches_before = clip.BATCHER.batches
        run = run_load(clip.handler, inputs)
    for index, result in enumerate(run.results):
        assert_clean(result)
        assert_close(answer(result), alone[index % len(specs)], where=f"job {index}")
    valid = sum(1 for index in range(200) if index % len(specs) < len(CLIP_VALID))
    report_load(f"{EXAMPLE} (clip)", run, valid, 1, counter.peak)
    assert counter.peak == 1, "two CLIP forward passes ran at once"
    assert clip.BATCHER.batches - batches_before < counter.calls, "concurrent jobs shared forward passes"


# ---- soak ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_500_sequential_jobs_leak_no_memory_threads_or_files(request: pytest.FixtureRequest, kind: str) -> None:
    """After a warm-up, 500 jobs one after another: every answer the same as the first time, resident
    memory grows under 10%, and threads and open files come back to their count."""
    worker = request.getfixturevalue(kind)
    specs = LLAVA_VALID + LLAVA_INVALID[:3] if kind == "llava" else CLIP_VALID + CLIP_INVALID[:3]
    with quiet_logs():
        expected = [answer(run_job(worker.handler, spec)) for spec in specs]

        def check(index: int, result: dict[str, Any]) -> None:
            # CLIP may batch a job's texts or images with padding of another length: float rounding.
            assert_close(answer(result), expected[index % len(specs)], where=f"job {index}")

        run = soak(worker.handler, specs, check)
    run.report(f"{EXAMPLE} ({kind})")
    run.assert_steady()


# ---- secrets, questions and images in logs --------------------------------------------------------


def test_python_handler_py_keeps_secrets_questions_and_images_out_of_the_logs(paths: dict[str, Path]) -> None:
    """`python handler.py` at INFO with HF_TOKEN, RUNPOD_API_KEY and a bucket secret set: no secret in
    its output, and neither the question nor the image's base64 in any log line."""
    run_env = {"MODEL_NAME": str(paths["llava"]), **ENV, **secret_env()}
    question, image = distinctive_prompt(), png_data_uri(40, 40, seed=7)
    job = {"input": {"task": "answer", "image": image, "question": question, "sampling_params": GREEDY}}
    run = run_local(EXAMPLE, run_env, "--test_input", json.dumps(job))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json_lines(run.stdout)[-1]["usage"]["completion_tokens"] >= 1
    assert_no_leaks(run.stdout + run.stderr, secret_values(run_env), [question, payload_fingerprint(image)])


# ---- the real dev server ------------------------------------------------------------------------


def test_dev_server_answers_a_concurrent_burst_without_a_500(llava: ModuleType, paths: dict[str, Path]) -> None:
    """18 concurrent /runsync requests to LLaVA, valid and invalid, through `python handler.py
    --rp_serve_api`: no HTTP 500; valid ones COMPLETED with the same answers as in-process, invalid
    ones with their error."""
    bodies = load_mix(LLAVA_VALID + LLAVA_INVALID[:3], 18)
    with quiet_logs():
        expected = [answer(run_job(llava.handler, body)) for body in bodies]
    server_env = {"MODEL_NAME": str(paths["llava"]), **ENV, **secret_env()}
    with DevServer(EXAMPLE, server_env) as server:
        responses = burst(server, [{"input": body} for body in bodies])
        logs = server.stop()
    assert [response.status_code for response in responses] == [200] * len(bodies), logs[-3000:]
    for body, response, want in zip(bodies, responses, expected, strict=True):
        got = response.json()
        if "error" in want:
            assert dev_server_error(got) == want["error"], got
        else:
            assert got["status"] == "COMPLETED" and dev_server_error(got) is None, str(got)[:500]
            assert answer({"output": got["output"]}) == want, str(body)[:200]
    assert_no_leaks(logs, secret_values(server_env), [])
