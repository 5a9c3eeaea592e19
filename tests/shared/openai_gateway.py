"""Runpod's OpenAI gateway, in process: an httpx transport that turns each request to
.../openai/v1/<route> into a job, so the official openai client can talk to a loaded handler."""

from __future__ import annotations

import json
from typing import Any

import httpx
from runpod.serverless.modules.rp_handler import is_generator

from tests.shared.harness import run_job


def runpod_gateway(handler: Any, sent: list[Any] | None = None) -> httpx.MockTransport:
    """Stand-in for Runpod's OpenAI gateway: a request to .../openai/v1/<route> becomes a job (each
    request body is appended to `sent`). A plain handler's output is the response; a generator's
    is its one chunk, or, when it streamed SSE chunks, those chunks in order as the response body."""

    def respond(request: httpx.Request) -> httpx.Response:
        job: dict[str, Any] = {"openai_route": "/v1/" + request.url.path.split("/v1/", 1)[1]}
        if request.method == "POST":
            job["openai_input"] = json.loads(request.content)
            if sent is not None:
                sent.append(job["openai_input"])
        result = run_job(handler, job)
        if "error" in result:
            return httpx.Response(400, json={"error": {"message": result["error"]}})
        output = result["output"]
        if is_generator(handler):  # its output: the chunks it yielded
            if output and isinstance(output[0], str):
                body = "".join(output).encode()
                return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
            output = output[0]
        return httpx.Response(200, json=output)

    return httpx.MockTransport(respond)
