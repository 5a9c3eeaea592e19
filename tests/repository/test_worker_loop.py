"""Every worker through Runpod's real worker protocol: `python handler.py` against an emulated job API.

The tests above this level call handlers in-process; here the runpod SDK itself takes the jobs
over HTTP, streams each chunk with a POST (held `post_delay_s` to stand in for the network),
cancels through the stop channel and posts the result, exactly as on a Runpod endpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.shared.harness import REPO
from tests.shared.runpod_api import Job, JobAPI, Worker, run_with_delay

NETWORK_S = 0.05  # a 50 ms round trip per POST, as between a worker and Runpod


def slow_network_s(token_s: float) -> float:
    """A POST as long as ten tokens (50 ms or more), however fast this machine generates today: the
    POST counts below then hold on a loaded machine too, even when the load changes between the
    measuring run and the slow one (tests run in parallel processes; with four tokens, a run beside
    two embedding test processes once made fewer than two tokens per POST). A longer POST costs
    the test little: the job is not held by the network, only its last POST is waited for."""
    return max(NETWORK_S, 10 * token_s)


@contextlib.contextmanager
def serving(example: str, env: dict[str, str]) -> Iterator[Worker]:
    """A worker of its own job API: two workers on one queue would take each other's jobs."""
    with JobAPI() as api, Worker(example, api, env) as worker:
        yield worker


def sse_events(chunks: list[str]) -> list[Any]:
    """The events of an SSE stream, whatever chunks it came in (each chunk holds whole events)."""
    text = "".join(chunks)
    assert text.endswith("\n\n"), "a chunk ended inside an event"
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


# ---------------------------------------------------------------------------------------------
# 01 text generation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_worker(tiny_model: Callable[[str], Path]) -> Iterator[Worker]:
    env = {"MODEL_NAME": str(tiny_model("llama")), "MAX_CONCURRENCY": "4"}
    with serving("01_text_generation", env) as worker:
        yield worker


LONG_STREAM = {
    "prompt": "Once upon a time",
    "sampling_params": {"max_tokens": 128, "temperature": 1.0, "seed": 7},
    "stream": True,
}


def test_text_stream_is_the_same_over_a_slow_network_in_fewer_posts(text_worker: Worker) -> None:
    api = text_worker.api
    fast = run_with_delay(api, LONG_STREAM, 0.0)
    completion_tokens = fast.chunks[-1]["usage"]["completion_tokens"]
    network_s = slow_network_s(fast.seconds / completion_tokens)
    slow = run_with_delay(api, LONG_STREAM, network_s)
    assert fast.status == slow.status == "COMPLETED", (fast.error, slow.error)

    def text_and_end(job: Job) -> tuple[str, dict]:
        # The end carries the last text when both were ready at once (coalesce.merge_answer).
        end = {key: value for key, value in job.chunks[-1].items() if key != "text"}
        return "".join(c.get("text", "") for c in job.chunks), end

    assert text_and_end(slow) == text_and_end(fast)
    assert slow.output == slow.chunks  # return_aggregate_stream: /runsync gets the same chunks
    assert completion_tokens > 32, "the tiny model stopped too early to measure streaming"
    # Tokens made while a POST was in flight went out together.
    assert len(slow.stream) < completion_tokens / 2
    # The job is not held by the network: far less than one round trip per token.
    assert slow.seconds < fast.seconds + completion_tokens * network_s / 2


def test_openai_stream_stays_valid_sse_over_a_slow_network(text_worker: Worker) -> None:
    api = text_worker.api
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    whole = api.run({"openai_route": "/v1/chat/completions", "openai_input": {**body, "stream": False}})
    streamed = run_with_delay(api, {"openai_route": "/v1/chat/completions", "openai_input": body}, NETWORK_S)
    assert whole.status == streamed.status == "COMPLETED", (whole.error, streamed.error)
    assert all(isinstance(chunk, str) for chunk in streamed.chunks)
    events = sse_events(streamed.chunks)
    assert events[-1] == "[DONE]"
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    message = whole.output[0]["choices"][0]
    assert content == message["message"]["content"]
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == message["finish_reason"]
    assert events[-2]["usage"] == whole.output[0]["usage"]


def test_bad_text_request_fails_clearly_and_the_worker_keeps_serving(text_worker: Worker) -> None:
    api = text_worker.api
    bad = api.run({"prompt": "hi", "sampling_params": {"temperature": 9}})
    assert bad.status == "FAILED"
    assert "sampling_params.temperature" in bad.error and "2" in bad.error
    assert "Traceback" not in bad.error
    good = api.run({"prompt": "hi", "sampling_params": {"max_tokens": 4}})
    assert good.status == "COMPLETED"
    assert good.output[0]["usage"]["completion_tokens"] >= 1


def test_concurrent_text_jobs_each_get_their_own_answer(text_worker: Worker) -> None:
    api = text_worker.api

    def job(seed: int) -> dict:
        return {"prompt": "The weather", "sampling_params": {"max_tokens": 24, "seed": seed}}

    solo = {seed: api.run(job(seed)).output for seed in range(6)}
    ids = {seed: api.submit(job(seed)) for seed in range(6)}
    together = {seed: api.wait(job_id).output for seed, job_id in ids.items()}
    assert together == solo
    assert api.max_batch_asked > 1  # the SDK took several jobs at once (job-take-batch)


def test_a_cancelled_stream_stops_and_the_next_job_is_served(text_worker: Worker) -> None:
    api = text_worker.api
    # Slow enough that the job is still streaming when it is cancelled: the tiny model is done within
    # the first POST, and the rest of its text and the end leave together in the second (coalesce.py).
    api.post_delay_s = 1.0
    try:
        job_id = api.submit(LONG_STREAM)
        deadline = time.monotonic() + 60
        while not api.jobs[job_id].stream and time.monotonic() < deadline:
            time.sleep(0.02)
        api.cancel(job_id)
        time.sleep(2)  # the stop poll answers within a second
    finally:
        api.post_delay_s = 0.0
    cancelled = api.jobs[job_id]
    assert cancelled.result is None  # a stopped job sends no result
    assert "Job stopped" in text_worker.output()
    after = api.run({"prompt": "hi", "sampling_params": {"max_tokens": 4}})
    assert after.status == "COMPLETED"


def test_a_stream_past_the_result_limit_keeps_its_text_and_the_worker_serves_on(
    tiny_model: Callable[[str], Path],
) -> None:
    """/run, /runsync and /stream all keep what was generated: the stream ends as max_tokens would
    end it, naming the limit, and the job completes."""
    env = {"MODEL_NAME": str(tiny_model("llama")), "MAX_RESULT_BYTES": "5120"}  # 1024 bytes for chunks
    # Seeded: 1,500 tokens of this tiny model's text always pass 1,024 bytes.
    sampling = {"max_tokens": 1500, "ignore_eos": True, "seed": 5}
    request = {"prompt": "Once upon a time", "sampling_params": sampling, "stream": True}
    with serving("01_text_generation", env) as worker:
        api = worker.api
        too_long = run_with_delay(api, request, NETWORK_S)
        assert too_long.status == "COMPLETED", too_long.error
        assert too_long.output[-1] == {"finish_reason": "length", "limit": "MAX_RESULT_BYTES"}
        assert too_long.chunks and too_long.chunks[0] == too_long.output[0], "/stream got the text as it came"
        assert len(too_long.output) > 1 and all("text" in chunk for chunk in too_long.output[:-1])
        assert len(json.dumps(too_long.output, ensure_ascii=False).encode()) <= 5120
        short = api.run({"prompt": "hi", "sampling_params": {"max_tokens": 4}})
        assert short.status == "COMPLETED" and short.output[-1]["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------------------------------
# 03 embeddings
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embeddings_worker(tiny_model: Callable[[str], Path]) -> Iterator[Worker]:
    with serving("03_embeddings", {"MODEL_NAME": str(tiny_model("sentence-transformer"))}) as worker:
        yield worker


def test_embeddings_through_the_job_loop(embeddings_worker: Worker) -> None:
    api = embeddings_worker.api
    texts = [f"sentence number {i}" for i in range(5)]
    solo = [api.run({"texts": [text]}).output["embeddings"][0] for text in texts]
    ids = [api.submit({"texts": [text]}) for text in texts]
    together = [api.wait(job_id).output["embeddings"][0] for job_id in ids]
    np.testing.assert_allclose(together, solo, atol=1e-5)  # batched with each other or not

    bad = api.run({"texts": []})
    assert bad.status == "FAILED" and "texts" in bad.error
    openai = api.run({"openai_route": "/v1/embeddings", "openai_input": {"input": texts[0], "model": "any"}})
    assert openai.status == "COMPLETED"
    np.testing.assert_allclose(openai.output["data"][0]["embedding"], solo[0], atol=1e-5)


def test_sparse_embeddings_through_the_job_loop(tiny_model: Callable[[str], Path]) -> None:
    """MODEL_KIND=sparse (SPLADE) in a real worker: concurrent jobs answer SparseEncoder's own terms."""
    import torch
    from sentence_transformers import SparseEncoder

    splade = tiny_model("splade")
    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "How do I reset my password?"]
    dense = SparseEncoder(str(splade), device="cpu").encode(texts, convert_to_sparse_tensor=False)
    expected = [{int(i): float(row[i]) for i in torch.nonzero(row).flatten()} for row in dense]
    with serving("03_embeddings", {"MODEL_NAME": str(splade), "MODEL_KIND": "sparse"}) as worker:
        api = worker.api
        ids = [api.submit({"texts": [text]}) for text in texts]
        for job_id, want in zip(ids, expected, strict=True):
            job = api.wait(job_id)
            assert job.status == "COMPLETED", job.error
            [terms] = job.output["embeddings"]
            assert terms["indices"] == sorted(want)  # ascending term ids, as Qdrant and pgvector take them
            np.testing.assert_allclose(terms["values"], [want[i] for i in sorted(want)], atol=1e-5)
        refused = api.run({"openai_route": "/v1/embeddings", "openai_input": {"input": "x", "model": "any"}})
        assert refused.status == "FAILED" and "MODEL_KIND=sparse" in refused.error
        assert api.run({"texts": texts[:1]}).status == "COMPLETED"  # and it serves on


# ---------------------------------------------------------------------------------------------
# 04 multimodal
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_worker(tiny_model: Callable[[str], Path]) -> Iterator[Worker]:
    with serving("04_multimodal", {"MODEL_NAME": str(tiny_model("llava"))}) as worker:
        yield worker


def test_multimodal_answer_streams_the_same_over_a_slow_network(llava_worker: Worker) -> None:
    api = llava_worker.api
    image = json.loads((REPO / "04_multimodal" / "test_input.json").read_text())["input"]["image"]
    request = {
        "task": "answer",
        "image": image,
        "question": "What is in the picture?",
        "sampling_params": {"max_tokens": 96, "temperature": 1.0, "seed": 3},
        "stream": True,
    }
    fast = run_with_delay(api, request, 0.0)
    completion_tokens = fast.chunks[-1]["usage"]["completion_tokens"]
    slow = run_with_delay(api, request, slow_network_s(fast.seconds / completion_tokens))
    assert fast.status == slow.status == "COMPLETED", (fast.error, slow.error)
    assert "".join(c.get("text", "") for c in slow.chunks) == "".join(c.get("text", "") for c in fast.chunks)
    assert slow.chunks[-1] == fast.chunks[-1]  # finish reason and usage
    assert completion_tokens > 16, "the tiny model stopped too early to measure streaming"
    assert len(slow.stream) < completion_tokens / 2

    bad = api.run({**request, "image": "data:image/png;base64,AAAA"})
    assert bad.status == "FAILED" and "image" in bad.error and "Traceback" not in bad.error
    assert api.run({**request, "stream": False}).status == "COMPLETED"  # still serving


def test_a_clip_worker_takes_many_jobs_at_once_and_batches_them_together(tiny_model: Callable[[str], Path]) -> None:
    """A CLIP worker's default concurrency fills its batcher: twelve one-image embed jobs queued
    together are taken in one job-take (more than the generating families' 4) and encoded in one
    forward pass. The batch closes exactly at twelve images (BATCH_MAX_ITEMS), never on a timer."""
    jobs = 12
    image = json.loads((REPO / "04_multimodal" / "test_input.json").read_text())["input"]["image"]
    env = {
        "MODEL_NAME": str(tiny_model("clip")),
        "BATCH_MAX_ITEMS": str(jobs),  # default MAX_CONCURRENCY: 2 × 12 = 24
        "BATCH_WAIT_MS": "60000",  # never reached when the twelve jobs run together
        "RUNPOD_LOG_LEVEL": "INFO",  # the batcher logs each batch
    }
    with serving("04_multimodal", env) as worker:
        api = worker.api
        ids = api.submit_many([{"task": "embed", "images": [image]} for _ in range(jobs)])
        done = [api.wait(job_id) for job_id in ids]
        assert all(job.status == "COMPLETED" for job in done), [job.error for job in done]
        assert api.take_sizes == [jobs], "the SDK took every job in one job-take"
        assert api.max_batch_asked == 2 * jobs
        assert max(job.taken_at for job in done) < min(job.result.at for job in done), "all were in flight at once"
        assert f"Encoded a batch of {jobs} encodes: {jobs} images, 0 distinct texts" in worker.output()
        vectors = [job.output[0]["image_embeddings"][0] for job in done]
        np.testing.assert_allclose(vectors, [vectors[0]] * jobs, atol=1e-5)  # the same image, the same vector
