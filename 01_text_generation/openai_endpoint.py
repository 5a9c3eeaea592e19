"""A local OpenAI endpoint: this worker's OpenAI routes over real HTTP, before it is deployed.

On Runpod, `POST https://api.runpod.ai/v2/<endpoint>/openai/v1/<route>` reaches the handler as the
job input `{"openai_route": "/v1/<route>", "openai_input": <the request body>}` (a GET, such as
/v1/models, has no openai_input), and the answer goes back as OpenAI's JSON or, streamed, as its
server-sent events. The SDK's local server (`python handler.py --rp_serve_api`) has only Runpod's
own routes (/run, /runsync, /status, /stream), so this command serves the OpenAI ones:

    python openai_endpoint.py --port 8000     # then base_url="http://127.0.0.1:8000/openai/v1"

It imports this folder's handler.py (the model loads as in a worker, under the same environment
variables) and runs each request as a job on the handler, in this process, mapped exactly as the
gateway maps it. A streamed answer goes out event by event as the handler yields it
(text/event-stream); any other answer is one JSON document.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, `code` being the
HTTP status (as vLLM's server answers):
* a failed job whose error is a string holding that JSON object answers with that status and body
  (400 for a request the handler refused, 404, 413, 422, 429, ...);
* any other error string answers 500, the string as the message (type "InternalServerError");
* an error after the first events of a stream is one more event, `data: {"error": {...}}`, and
  the stream ends (the status line went out with the first event);
* an unknown path answers 404, a wrong method 405, a body that is not a JSON object 400.

Why a command of its own, not routes added to `--rp_serve_api`: `runpod.serverless.start` builds
the SDK's FastAPI app and runs uvicorn on it in one call, with no hook to add routes; mounting them
would mean patching the SDK's private `rp_fastapi.WorkerAPI`, under its 404 and error shapes. This
module needs only what the SDK already installs (FastAPI, uvicorn) and the handler as imported.

This file is copied, identical, into 01, 03 and 04 (each example folder is its own Docker
context); tests/copied_modules/test_openai_endpoint.py checks every copy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

import runpod
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

log = runpod.RunPodLogger()

PREFIX = "/openai"  # the gateway's: .../openai/v1/<route> is the job's openai_route /v1/<route>
GET_ROUTES = ("/v1/models",)  # sent without a body; every other route is a POST with a JSON body
DEFAULT_PORT = 8000  # the SDK's own dev server's default, so a client's base URL carries over
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back
# OpenAI's (and vLLM's) error type for each status; any other status gets its HTTP phrase.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_END = object()  # the handler has no more chunks (None is a legal output)


class EndpointError(Exception):
    """A request this endpoint answers itself, with an OpenAI error: unknown path, bad body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, openai_error(status, message, param=param)


# ---------------------------------------------------------------------------------------------
# Pure: the request as a job, and a failed job's error as an HTTP answer.
# ---------------------------------------------------------------------------------------------
def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "APIError"
    words = phrase.replace("-", " ").split()
    return "".join(char for word in words for char in word.capitalize() if char.isalnum()) + "Error"


def openai_error(status: int, message: str, type_: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, `code` being the HTTP status (as vLLM's server sends it)."""
    return {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": status}}


def _contract_error(text: str) -> tuple[int, dict[str, Any]] | None:
    """(status, body) when `text` is OpenAI's error object as JSON, with an HTTP error status as its code."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    status, message = error.get("code"), error.get("message")
    type_, param = error.get("type"), error.get("param")
    if type(status) is not int or not 400 <= status <= 599 or not isinstance(message, str):
        return None
    if not isinstance(type_, str | None) or not isinstance(param, str | None):
        return None
    return status, openai_error(status, message, type_, param)


def error_answer(error: Any) -> tuple[int, dict[str, Any]]:
    """A failed job's error as (HTTP status, OpenAI error body). The SDK hands a job's error on as
    a string (a dict chunk's error is `str()`-ed), so a dict here is read as that string would be."""
    text = error if isinstance(error, str) else str(error)
    return _contract_error(text) or (500, openai_error(500, text, "InternalServerError"))


def served_routes(routes: Iterable[str]) -> tuple[str, ...]:
    """The routes the gateway's /openai/v1/... paths can reach, of those an example's schema declares."""
    return tuple(route for route in routes if route.startswith("/v1/"))


def job_input(method: str, path: str, body: bytes, routes: Iterable[str]) -> dict[str, Any]:
    """The job input Runpod's gateway makes of an HTTP request; EndpointError when it makes none."""
    routes = tuple(routes)
    route = path[len(PREFIX) :] if path.startswith(PREFIX + "/") else None
    if route not in routes:
        served = ", ".join(f"{'GET' if r in GET_ROUTES else 'POST'} {PREFIX}{r}" for r in routes)
        raise EndpointError(404, f"no route {method} {path}; this worker serves {served}")
    expected = "GET" if route in GET_ROUTES else "POST"
    if method != expected:
        raise EndpointError(405, f"{path} takes {expected}, not {method}")
    if expected == "GET":
        return {"openai_route": route}
    try:
        parsed = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError included
        raise EndpointError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise EndpointError(400, f"the request body must be a JSON object, got {type(parsed).__name__}")
    return {"openai_route": route, "openai_input": parsed}


def failure(chunk: Any) -> str | None:
    """The error a chunk fails its job with, as the SDK reads it: a dict with a truthy "error"."""
    if isinstance(chunk, dict) and chunk.get("error"):
        return str(chunk["error"])
    return None


def sse_event(value: Any) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# The handler, run as the SDK runs it: every chunk a generator yields, or the one value returned.
# ---------------------------------------------------------------------------------------------
async def chunks_of(handler: Callable[[dict], Any], job: dict[str, Any]) -> AsyncIterator[Any]:
    result = handler(job)
    if inspect.isawaitable(result):
        result = await result
    if inspect.isasyncgen(result):
        async with contextlib.aclosing(result):  # a client that leaves stops the generation
            async for chunk in result:
                yield chunk
    elif inspect.isgenerator(result):
        with contextlib.closing(result):
            for chunk in result:
                yield chunk
    else:
        yield result


def json_response(status: int, content: Any) -> Response:
    """`content` as production sends a result (json.dumps); what it cannot encode is a 500 here,
    as it would be a lost result on Runpod."""
    try:
        text = json.dumps(content, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        status, text = 500, json.dumps(openai_error(500, f"the handler's output is not JSON: {error}"))
    return Response(text, status_code=status, media_type="application/json")


def raised(error: Exception, job_id: str) -> tuple[int, dict[str, Any]]:
    """The handler raised: the SDK would fail the job with its own report; here a 500, the
    traceback in this server's log."""
    log.error(f"The handler raised {type(error).__name__}: {error}\n{traceback.format_exc()}", job_id)
    message = f"the handler raised {type(error).__name__}: {error}; the traceback is in this server's log"
    return 500, openai_error(500, message, "InternalServerError")


async def events(first: Any, chunks: AsyncIterator[Any], job_id: str) -> AsyncIterator[str]:
    """The SSE body: each chunk as it comes; an error ends the stream with an error event."""
    chunk = first
    try:
        while chunk is not _END:
            if (error := failure(chunk)) is not None:
                yield sse_event(error_answer(error)[1])
                return
            yield chunk if isinstance(chunk, str) else sse_event(chunk)
            try:
                chunk = await anext(chunks, _END)
            except Exception as error:  # noqa: BLE001 - the client gets an error event, the log the details
                yield sse_event(raised(error, job_id)[1])
                return
    finally:
        await chunks.aclose()  # a client that disconnected stops the handler here


async def answer(handler: Callable[[dict], Any], job: dict[str, Any]) -> Response:
    """Run one job: an SSE stream when its first chunk is text, else its one JSON answer."""
    chunks = chunks_of(handler, job)
    try:
        first = await anext(chunks, _END)
        if isinstance(first, str):  # OpenAI's server-sent events, as the handler yields them
            return StreamingResponse(
                events(first, chunks, job["id"]), media_type="text/event-stream", headers=SSE_HEADERS
            )
        outputs = []
        chunk = first
        while chunk is not _END:
            if (error := failure(chunk)) is not None:
                return json_response(*error_answer(error))
            outputs.append(chunk)
            chunk = await anext(chunks, _END)
    except Exception as error:  # noqa: BLE001 - the client gets a 500, the log the details
        await chunks.aclose()
        return json_response(*raised(error, job["id"]))
    await chunks.aclose()
    if not outputs:
        return json_response(500, openai_error(500, "the handler ended without an answer"))
    return json_response(200, outputs[0] if len(outputs) == 1 else outputs)


def openai_app(worker_config: Mapping[str, Any], routes: Iterable[str]) -> FastAPI:
    """An app serving `routes` (the example's OpenAI routes) under /openai, on the handler of the
    worker's config (the one `runpod.serverless.start` would run)."""
    handler, served = worker_config["handler"], served_routes(routes)
    app = FastAPI(title="Local OpenAI endpoint", docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def route(request: Request) -> Response:
        job_id = f"local-{uuid.uuid4()}"
        try:
            job = {"id": job_id, "input": job_input(request.method, request.url.path, await request.body(), served)}
        except EndpointError as error:
            return json_response(error.status, error.body)
        return await answer(handler, job)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="This worker's OpenAI routes on a local HTTP server.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a container (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    args = parser.parse_args(argv)
    # The folder's own handler.py and schema.py: the model loads now, as it does in a worker.
    worker, schema = importlib.import_module("handler"), importlib.import_module("schema")
    app = openai_app(worker.WORKER_CONFIG, schema.OPENAI_ROUTES)
    log.info(
        f"OpenAI routes on http://{args.host}:{args.port}{PREFIX}/v1: {', '.join(served_routes(schema.OPENAI_ROUTES))}"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
