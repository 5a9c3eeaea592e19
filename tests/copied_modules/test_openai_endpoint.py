"""openai_endpoint.py: the local OpenAI endpoint (`python openai_endpoint.py`), on every copy.

Its pure edges (a request as the gateway's job, a failed job's error as an HTTP answer) are tested
as functions; the server over real HTTP with stub handlers and the official openai client, so
each error contract case is checked whatever the examples' handlers send today. The examples'
own tests (tests/<example>/test_openai_endpoint.py) run it on their handlers and tiny models."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest

from tests.shared.harness import shared_copies
from tests.shared.local_openai import client, endpoint_module, serving

COPIES = shared_copies("openai_endpoint.py")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/rerank")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def contract(status: int, message: str, type_: str | None = None, param: str | None = None) -> str:
    """An error string as the handlers' contract makes it: OpenAI's error object, as JSON."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}})


def completion(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}


def chunk_event(text: str) -> str:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def endpoint(request: pytest.FixtureRequest) -> ModuleType:
    return endpoint_module(request.param.parent.name)


# ---- pure: the job input, and the error answer ----------------------------------------------


def test_a_request_becomes_the_job_input_runpods_gateway_makes(endpoint: ModuleType) -> None:
    body = json.dumps(CHAT).encode()
    assert endpoint.job_input("POST", "/openai/v1/chat/completions", body, ROUTES) == {
        "openai_route": "/v1/chat/completions",
        "openai_input": CHAT,
    }
    assert endpoint.job_input("GET", "/openai/v1/models", b"", ROUTES) == {"openai_route": "/v1/models"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/openai/v1/nope", b"{}", 404, "no route POST /openai/v1/nope"),
        ("POST", "/v1/chat/completions", b"{}", 404, "no route POST /v1/chat/completions"),
        ("POST", "/openai/rerank", b"{}", 404, "no route"),
        ("GET", "/openai/v1/chat/completions", b"", 405, "takes POST, not GET"),
        ("POST", "/openai/v1/models", b"{}", 405, "takes GET, not POST"),
        ("POST", "/openai/v1/chat/completions", b"{not json", 400, "the request body is not valid JSON"),
        ("POST", "/openai/v1/chat/completions", b"\xff\xfe", 400, "the request body is not valid JSON"),
        ("POST", "/openai/v1/chat/completions", b"[1]", 400, "must be a JSON object, got list"),
    ],
)
def test_a_request_the_gateway_makes_no_job_of_gets_an_openai_error(
    endpoint: ModuleType, method: str, path: str, body: bytes, status: int, message: str
) -> None:
    with pytest.raises(endpoint.EndpointError) as raised:
        endpoint.job_input(method, path, body, endpoint.served_routes(ROUTES))
    assert raised.value.status == status
    error = raised.value.body["error"]
    assert message in error["message"] and error["code"] == status and error["param"] is None
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}[status]


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "BadRequestError"),
        (404, "NotFoundError"),
        (413, "RequestEntityTooLargeError"),
        (422, "UnprocessableEntityError"),
        (429, "RateLimitError"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailableError"),
        (418, "ImATeapotError"),
        (599, "APIError"),
    ],
)
def test_a_contract_error_answers_with_its_code_as_the_status(endpoint: ModuleType, status: int, type_: str) -> None:
    assert endpoint.error_type(status) == type_
    given = contract(status, "max_tokens: too many", "SomeType", "max_tokens")
    assert endpoint.error_answer(given) == (
        status,
        {"error": {"message": "max_tokens: too many", "type": "SomeType", "param": "max_tokens", "code": status}},
    )
    # type and param may be null or absent: the status's type, no param.
    bare = json.dumps({"error": {"message": "m", "code": status}})
    assert endpoint.error_answer(bare) == (status, endpoint.openai_error(status, "m"))


@pytest.mark.parametrize(
    "error",
    [
        "openai_input.max_tokens: Input should be a valid integer",  # a plain message, today's errors
        "",
        "null",
        '{"error": "a string, not an object"}',
        '{"error": {"message": "m", "code": 200}}',  # not an error status
        '{"error": {"message": "m", "code": 1000}}',
        '{"error": {"message": "m", "code": "400"}}',
        '{"error": {"message": "m", "code": true}}',
        '{"error": {"message": 4, "code": 400}}',
        '{"error": {"message": "m", "code": 400, "type": 7}}',
        '{"error": {"message": "m", "code": 400, "param": ["x"]}}',
        '{"error_type": "<class \'ValueError\'>", "error_message": "boom"}',  # the SDK's report of a raise
    ],
)
def test_any_other_error_string_is_a_500_with_the_string_as_its_message(endpoint: ModuleType, error: str) -> None:
    assert endpoint.error_answer(error) == (
        500,
        {"error": {"message": error, "type": "InternalServerError", "param": None, "code": 500}},
    )


def test_a_dict_error_is_read_as_the_sdk_passes_it_on(endpoint: ModuleType) -> None:
    """The SDK fails a streamed job with str() of a dict chunk's error: a Python repr, not JSON."""
    error = {"error": {"message": "m", "code": 400}}
    assert endpoint.error_answer(error) == (500, endpoint.openai_error(500, str(error), "InternalServerError"))
    assert endpoint.failure({"error": "x"}) == "x" and endpoint.failure({"error": ""}) is None
    assert endpoint.failure("data: {}\n\n") is None and endpoint.failure({"object": "list"}) is None


def test_only_the_v1_routes_are_reachable_under_openai(endpoint: ModuleType) -> None:
    assert endpoint.served_routes(["/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank"]) == (
        "/v1/embeddings",
        "/v1/rerank",
    )


# ---- over HTTP, with stub handlers and the official client ----------------------------------


class Stub:
    """A worker config whose async generator handler records each job and yields `chunks`."""

    def __init__(self, *chunks: Any, raises: Exception | None = None) -> None:
        self.chunks, self.raises, self.jobs = chunks, raises, []
        self.config = {"handler": self.handler, "return_aggregate_stream": True}

    async def handler(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        self.jobs.append(job)
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk
        if self.raises:
            raise self.raises


def test_chat_completions_and_models_reach_the_handler_as_gateway_jobs(endpoint: ModuleType) -> None:
    stub = Stub(completion("Paris"))
    with serving(endpoint, stub.config, ROUTES) as url:
        answer = client(url).chat.completions.create(**CHAT, temperature=0)
        models = Stub({"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "me"}]})
    assert answer.choices[0].message.content == "Paris"
    [job] = stub.jobs
    assert job["input"] == {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "temperature": 0}}
    assert job["id"].startswith("local-")
    with serving(endpoint, models.config, ROUTES) as url:
        assert [model.id for model in client(url).models.list()] == ["m"]
    assert models.jobs[0]["input"] == {"openai_route": "/v1/models"}


def test_a_stream_goes_out_as_server_sent_events_as_the_handler_yields_them(endpoint: ModuleType) -> None:
    # A chunk may hold several whole events (coalesced while the SDK was posting).
    stub = Stub(chunk_event("Pa"), chunk_event("r") + chunk_event("is"), "data: [DONE]\n\n")
    with serving(endpoint, stub.config, ROUTES) as url:
        with httpx.stream("POST", f"{url}/openai/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.read().decode() == "".join(stub.chunks)
        stream = client(url).chat.completions.create(**CHAT, stream=True)
        assert "".join(chunk.choices[0].delta.content for chunk in stream) == "Paris"


def test_a_plain_async_handler_returning_a_dict_is_answered_too(endpoint: ModuleType) -> None:
    """03's handler is `async def` returning its answer (the SDK runs it with run_job)."""
    jobs = []

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        jobs.append(job)
        if job["input"]["openai_input"]["input"] == "refuse":
            return {"error": contract(413, "too large")}
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]}]}

    with serving(endpoint, {"handler": handler}, ROUTES) as url:
        vectors = client(url).embeddings.create(model="m", input="hi", encoding_format="float")
        assert vectors.data[0].embedding == [0.5, 1.0]
        with pytest.raises(openai.APIStatusError) as raised:
            client(url).embeddings.create(model="m", input="refuse")
    assert raised.value.status_code == 413 and raised.value.body["message"] == "too large"


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
def test_a_contract_error_reaches_the_client_as_its_exception(
    endpoint: ModuleType, status: int, exception: type[openai.APIStatusError]
) -> None:
    stub = Stub({"error": contract(status, "messages: Field required", param="messages")})
    with serving(endpoint, stub.config, ROUTES) as url, pytest.raises(exception) as raised:
        client(url).chat.completions.create(**CHAT)
    assert raised.value.status_code == status
    assert raised.value.body == {
        "message": "messages: Field required",
        "type": endpoint.error_type(status),
        "param": "messages",
        "code": status,
    }


def test_a_plain_error_string_is_a_500_with_that_message(endpoint: ModuleType) -> None:
    stub = Stub({"error": "openai_input.max_tokens: Input should be greater than 0"})
    with serving(endpoint, stub.config, ROUTES) as url, pytest.raises(openai.InternalServerError) as raised:
        client(url).chat.completions.create(**CHAT)
    assert raised.value.status_code == 500
    assert raised.value.body == {
        "message": "openai_input.max_tokens: Input should be greater than 0",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


@pytest.mark.parametrize("error", [contract(400, "a stop string was refused"), "a plain failure"])
def test_an_error_after_the_first_events_is_an_error_event_then_the_end(endpoint: ModuleType, error: str) -> None:
    stub = Stub(chunk_event("Pa"), {"error": error}, chunk_event("never sent"))
    with serving(endpoint, stub.config, ROUTES) as url:
        with httpx.stream("POST", f"{url}/openai/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status_code == 200  # sent with the first event
            body = response.read().decode()
        stream = client(url).chat.completions.create(**CHAT, stream=True)
        received = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    expected = endpoint.error_answer(error)[1]
    assert body == chunk_event("Pa") + f"data: {json.dumps(expected)}\n\n"
    assert received == ["Pa"] and raised.value.body == expected["error"]


def test_a_handler_that_raises_is_a_500_before_the_stream_and_an_error_event_after(endpoint: ModuleType) -> None:
    with serving(endpoint, Stub(raises=RuntimeError("boom")).config, ROUTES) as url:
        with pytest.raises(openai.InternalServerError, match="the handler raised RuntimeError: boom"):
            client(url).chat.completions.create(**CHAT)
    with serving(endpoint, Stub(chunk_event("a"), raises=RuntimeError("boom")).config, ROUTES) as url:
        body = httpx.post(f"{url}/openai/v1/chat/completions", json={**CHAT, "stream": True}).text
    error = json.loads(body.split("\n\n")[1][len("data: ") :])["error"]
    assert error["code"] == 500 and "RuntimeError: boom" in error["message"]


def test_unknown_paths_bad_bodies_and_unjsonable_outputs_get_openai_errors(endpoint: ModuleType) -> None:
    stub = Stub({"vector": b"bytes production cannot send"})
    with serving(endpoint, stub.config, ROUTES) as url:
        for method, path, content, status in [
            ("GET", "/", None, 404),
            ("GET", "/docs", None, 404),
            ("POST", "/runsync", b"{}", 404),
            ("POST", "/openai/v1/responses", b"{}", 404),
            ("DELETE", "/openai/v1/models", None, 405),
            ("POST", "/openai/v1/chat/completions", b"{", 400),
            ("POST", "/openai/v1/embeddings", b"{}", 500),
        ]:
            response = httpx.request(method, url + path, content=content)
            assert response.status_code == status, (path, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
        with pytest.raises(openai.NotFoundError):
            client(url).post("/nope", cast_to=object, body={})
    assert error["message"].startswith("the handler's output is not JSON")
    assert len(stub.jobs) == 1  # only the one request the gateway makes a job of


def test_a_client_that_leaves_a_stream_stops_the_handler(endpoint: ModuleType) -> None:
    closed = threading.Event()

    async def handler(job: dict[str, Any]) -> AsyncIterator[str]:
        try:
            while True:
                yield chunk_event("x")
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    with serving(endpoint, {"handler": handler}, ROUTES) as url:
        with httpx.stream("POST", f"{url}/openai/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            next(response.iter_text())
        assert closed.wait(10), "the handler's generator was not closed when its client left"
