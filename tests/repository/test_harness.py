"""The harness runs jobs exactly as the runpod SDK does; check it on toy handlers of every kind."""

from __future__ import annotations

from typing import Any

import pytest

from tests.shared.harness import json_lines, run_job


def sync_handler(job: dict[str, Any]) -> dict[str, Any]:
    return {"echo": job["input"]}


async def async_handler(job: dict[str, Any]) -> dict[str, Any]:
    return {"echo": job["input"]}


def sync_generator(job: dict[str, Any]) -> Any:
    yield {"n": 1}
    yield {"n": 2}


async def async_generator(job: dict[str, Any]) -> Any:
    yield {"n": 1}
    yield {"n": 2}


@pytest.mark.parametrize("handler", [sync_handler, async_handler])
def test_plain_handlers_give_output(handler: Any) -> None:
    assert run_job(handler, {"a": 1}) == {"output": {"echo": {"a": 1}}}


@pytest.mark.parametrize("handler", [sync_generator, async_generator])
def test_generators_stream_and_aggregate(handler: Any) -> None:
    assert run_job(handler, {}) == {"output": [{"n": 1}, {"n": 2}], "stream": [{"n": 1}, {"n": 2}]}
    # Without return_aggregate_stream, production's final result is an empty list.
    assert run_job(handler, {}, return_aggregate_stream=False)["output"] == []


def test_an_error_chunk_fails_the_job_like_the_sdk() -> None:
    async def handler(job: dict[str, Any]) -> Any:
        yield {"text": "a"}
        yield {"error": "bad"}
        yield {"text": "never"}

    assert run_job(handler, {}) == {"error": "bad", "stream": [{"text": "a"}]}


def test_a_returned_error_is_the_jobs_error() -> None:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"error": "field x: too big"}

    assert run_job(handler, {}) == {"error": "field x: too big"}


def test_output_production_cannot_send_fails_the_test() -> None:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"image": b"\x89PNG"}

    with pytest.raises(AssertionError, match="not plain JSON"):
        run_job(handler, {})

    async def streaming(job: dict[str, Any]) -> Any:
        yield {"value": {1, 2}}

    with pytest.raises(AssertionError, match="not plain JSON"):
        run_job(streaming, {})


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinity_in_an_output_fails_the_test(number: float) -> None:
    """json.dumps would write them as NaN/Infinity, which no strict JSON parser reads."""

    def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"embedding": [0.5, number]}

    with pytest.raises(AssertionError, match="not plain JSON: Out of range float values"):
        run_job(handler, {})

    def streaming(job: dict[str, Any]) -> Any:
        yield {"score": 1.0}
        yield {"score": number}

    with pytest.raises(AssertionError, match="not plain JSON"):
        run_job(streaming, {})


def test_json_lines_keeps_only_json_documents() -> None:
    text = 'INFO   | Started.\n{"text": "a"}\n--- Starting Serverless Worker ---\n[1, 2]\n{broken\n'
    assert json_lines(text) == [{"text": "a"}, [1, 2]]
