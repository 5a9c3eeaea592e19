"""03_embeddings under hostile and heavy traffic, on a tiny BERT embedder and a tiny cross-encoder.

Fuzzed requests (native, rerank and OpenAI), 200 concurrent jobs, a 500-job soak, secrets and
texts kept out of the logs of `python handler.py`, and a burst through the real dev server.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.shared.harness import DevServer, json_lines, load_handler, run_job, run_local
from tests.shared.reliability import (
    FUZZ,
    ConcurrencyCounter,
    answer,
    assert_clean,
    assert_close,
    assert_no_leaks,
    burst,
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

EXAMPLE = "03_embeddings"
MAX_CONCURRENCY = 8
MAX_INPUTS = 4
ENV = {
    "MAX_INPUTS": str(MAX_INPUTS),
    "MAX_INPUT_CHARS": "2000",
    "MAX_RERANK_DOCUMENTS": "4",
    "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
}
SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Café 東京 😀 works too."]


@pytest.fixture(scope="module")
def env(tiny_model) -> dict[str, str]:
    return {
        "MODEL_NAME": str(tiny_model("sentence-transformer")),
        "RERANK_MODEL_NAME": str(tiny_model("cross-encoder")),
        **ENV,
    }


@pytest.fixture(scope="module")
def worker(env: dict[str, str]) -> ModuleType:
    return load_handler(EXAMPLE, env)


@pytest.fixture(scope="module")
def canary(worker: ModuleType) -> Any:
    """A fixed job and its embeddings on the fresh worker; calling it proves the worker still gives
    exactly those numbers."""
    job = {"texts": SENTENCES, "dimensions": 16}
    expected = answer(run_job(worker.handler, job))
    assert "output" in expected, expected

    def check() -> None:
        assert answer(run_job(worker.handler, job)) == expected, "the worker no longer serves a valid job correctly"

    return check


# ---- fuzzing ----------------------------------------------------------------------------------

TEXT = st.text(min_size=1, max_size=60)
TEXTS = weighted(
    (3, TEXT),
    (3, st.lists(TEXT, min_size=1, max_size=MAX_INPUTS)),
    (1, st.sampled_from(["x" * 2000, ["word " * 400] * MAX_INPUTS])),  # the longest accepted: truncated
)
OPTIONS = {
    "dimensions": st.integers(1, 32),
    "encoding_format": st.sampled_from(["float", "base64"]),
    "input_type": st.sampled_from([None, "query", "document"]),
    "normalize": st.booleans(),
}
NATIVE = mutated({"texts": TEXTS}, {**OPTIONS, "precision": st.sampled_from(["float32", "int8", "uint8", "binary"])})
RERANK = mutated(
    {"query": TEXT, "documents": st.lists(TEXT, min_size=1, max_size=4)},
    {"top_n": st.integers(1, 6), "return_documents": st.booleans(), "model": TEXT},
)
OPENAI_EMBEDDINGS = mutated({"input": TEXTS}, {**OPTIONS, "model": TEXT, "user": TEXT})
REQUESTS = job_inputs(
    weighted(
        (3, NATIVE),
        (2, RERANK),
        (3, mutated({"openai_route": st.just("/v1/embeddings"), "openai_input": OPENAI_EMBEDDINGS})),
        (1, mutated({"openai_route": st.just("/v1/rerank"), "openai_input": RERANK})),
        (1, mutated({"openai_route": st.just("/v1/models")})),
    )
)


def texts_of(job_input: dict[str, Any]) -> list[str]:
    texts = job_input.get("texts", job_input.get("openai_input", {}).get("input"))
    return [texts] if isinstance(texts, str) else texts


def check_output(job_input: dict[str, Any], output: dict[str, Any]) -> None:
    """A served request's output has its route's shape: one embedding per text, ranked documents."""
    route = job_input.get("openai_route")
    if route == "/v1/models":
        assert output["object"] == "list"
    elif "results" in output:
        body = job_input.get("openai_input", job_input)
        scores = [result["relevance_score"] for result in output["results"]]
        assert scores == sorted(scores, reverse=True)
        assert len(scores) == min(body.get("top_n") or len(body["documents"]), len(body["documents"]))
    elif route is None:
        assert len(output["embeddings"]) == len(texts_of(job_input))
    else:
        assert [item["index"] for item in output["data"]] == list(range(len(texts_of(job_input))))


def test_fuzzed_requests_get_a_result_or_a_clear_error(worker: ModuleType, canary: Any) -> None:
    """Any JSON in any field (embed, rerank, OpenAI embeddings, rerank and models), fields missing or
    unknown, huge and empty values, wrong nesting: every job ends with a result or a clear error (no
    escaped exception, no traceback), and the worker serves on."""
    served = refused = 0

    @FUZZ
    @given(job_input=REQUESTS)
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
    print(f"\n[fuzz] {EXAMPLE}: {served} requests served, {refused} refused")
    assert served and refused, "the fuzz should both serve and refuse requests"


# ---- load ---------------------------------------------------------------------------------------

VALID = [
    {"texts": SENTENCES},
    {"texts": "one query", "dimensions": 16, "input_type": "query"},
    {"texts": ["a document", "another one"], "encoding_format": "base64", "input_type": "document"},
    {"openai_route": "/v1/embeddings", "openai_input": {"input": ["x", "y"], "dimensions": 8, "model": "m"}},
    {"query": "cats", "documents": SENTENCES, "top_n": 2, "return_documents": True},
    {"openai_route": "/v1/rerank", "openai_input": {"query": "France", "documents": SENTENCES}},
    {"openai_route": "/v1/models"},
]
INVALID = [
    {"texts": []},
    {"texts": "x", "dimensions": 1000},
    {"texts": ["a"] * (MAX_INPUTS + 1)},
    {"openai_route": "/v1/embeddings"},
    {"query": "q", "documents": []},
    "just a string",
]
# The embedding jobs (reranks go through the dynamic batcher too, in batches of their own).
BATCHED = 4


def test_200_concurrent_mixed_jobs_match_their_solo_runs(worker: ModuleType, monkeypatch) -> None:
    """200 jobs at once, valid and invalid interleaved: every one answered as when run alone (up to
    float rounding, as the batcher merges their texts), each error the same; the model runs on one
    thread, never two batches at once, and concurrent jobs really share batches."""
    assert worker.WORKER_CONFIG["concurrency_modifier"](1) == worker.MAX_CONCURRENCY == MAX_CONCURRENCY
    specs = VALID + INVALID
    with quiet_logs():
        alone = [answer(run_job(worker.handler, spec)) for spec in specs]
        assert all("output" in a for a in alone[: len(VALID)]) and all("error" in a for a in alone[len(VALID) :])
        counter = ConcurrencyCounter()
        monkeypatch.setattr(worker.BATCHER, "run", counter.wrap(worker.BATCHER.run))
        monkeypatch.setattr(worker.RERANKER, "predict", counter.wrap(worker.RERANKER.predict))
        batches = worker.BATCHER.batches
        inputs = load_mix(specs, 200)
        run = run_load(worker.handler, inputs)
    for index, result in enumerate(run.results):
        assert_clean(result)
        assert_close(answer(result), alone[index % len(specs)], where=f"job {index}")
    valid = sum(1 for index in range(200) if index % len(specs) < len(VALID))
    embedding_jobs = sum(1 for index in range(200) if index % len(specs) < BATCHED)
    report_load(EXAMPLE, run, valid, 1, counter.peak)
    print(f"[load] {EXAMPLE}: {embedding_jobs} embedding jobs in {worker.BATCHER.batches - batches} model batches")
    assert counter.peak == 1, "two model calls ran at once"
    assert worker.BATCHER.batches - batches < embedding_jobs, "concurrent jobs never shared a batch"


# ---- soak ---------------------------------------------------------------------------------------


def test_500_sequential_jobs_leak_no_memory_threads_or_files(worker: ModuleType) -> None:
    """After a warm-up, 500 jobs one after another: every answer the same as the first time, resident
    memory grows under 10%, and threads and open files come back to their count."""
    specs = VALID + INVALID[:3]
    with quiet_logs():
        expected = [answer(run_job(worker.handler, spec)) for spec in specs]

        def check(index: int, result: dict[str, Any]) -> None:  # the warm-up burst shares batches: rounding
            assert_close(answer(result), expected[index % len(specs)], where=f"job {index}")

        run = soak(worker.handler, specs, check)
    run.report(EXAMPLE)
    run.assert_steady()


# ---- secrets and texts in logs --------------------------------------------------------------------


def test_python_handler_py_keeps_secrets_and_texts_out_of_the_logs(env: dict[str, str]) -> None:
    """`python handler.py` at INFO with HF_TOKEN, RUNPOD_API_KEY and a bucket secret set: no secret in
    its output, and the texts embedded in no log line."""
    run_env = {**env, **secret_env()}
    texts = [distinctive_prompt(), distinctive_prompt()]
    run = run_local(EXAMPLE, run_env, "--test_input", json.dumps({"input": {"texts": texts}}))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(json_lines(run.stdout)[-1]["embeddings"]) == 2
    assert_no_leaks(run.stdout + run.stderr, secret_values(run_env), texts)


# ---- the real dev server ------------------------------------------------------------------------


def test_dev_server_answers_a_concurrent_burst_without_a_500(worker: ModuleType, env: dict[str, str]) -> None:
    """20 concurrent /runsync requests, valid and invalid, through `python handler.py --rp_serve_api`:
    no HTTP 500; valid ones COMPLETED with the same output as in-process, invalid ones FAILED with
    their error."""
    bodies = load_mix(VALID + INVALID[:4], 20)
    with quiet_logs():
        expected = [answer(run_job(worker.handler, body)) for body in bodies]
    server_env = {**env, **secret_env()}
    with DevServer(EXAMPLE, server_env) as server:
        responses = burst(server, [{"input": body} for body in bodies])
        logs = server.stop()
    assert [response.status_code for response in responses] == [200] * len(bodies), logs[-3000:]
    for body, response, want in zip(bodies, responses, expected, strict=True):
        got = response.json()
        if "error" in want:
            assert got["status"] == "FAILED" and got["error"] == want["error"], got
        else:
            assert got["status"] == "COMPLETED", got
            assert_close(answer({"output": got["output"]}), want, where=str(body)[:80])
    assert_no_leaks(logs, secret_values(server_env), [])
