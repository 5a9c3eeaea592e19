"""ENGINE=vllm: vLLM's own OpenAI server, started beside the handler, with every job relayed to it.

Why a server and not vLLM's engine in-process: Runpod users come from worker-vllm, which runs
vLLM's OpenAI server, and expect everything it accepts on `/v1/chat/completions`,
`/v1/completions`, `/v1/models` and `/v1/responses` (tools and their parsers, reasoning parsers,
structured output, logprobs, `n`, LoRA adapters chosen by `model`, every vLLM extension field),
with the same results. That serving layer is most of vLLM's entrypoint code and changes with
every release; re-implementing it on `AsyncLLM` would always lag behind. So the worker starts
the real server on a loopback port, waits for `/health`, and forwards each job's body to it:

  * `openai_route` + `openai_input`: POSTed as they are (GET for `/v1/models`); a JSON answer is
    yielded as one chunk, a streamed one as whole server-sent events (several per chunk when the
    network is slower than the model: see `coalesce.py`), byte for byte what vLLM sent.
  * the native shape (`prompt` or `messages`, `sampling_params`, `stream`): mapped onto
    `/v1/completions` or `/v1/chat/completions`, `sampling_params` taking vLLM's own
    `SamplingParams` names (those of worker-vllm's native API), and answered with this worker's
    native chunks (`{"text": ...}`, then `{"finish_reason", "usage"}`).

Configuration: every flag of vLLM's server is an environment variable, its upper-case name
(`--max-num-seqs` is `MAX_NUM_SEQS`, `--enable-auto-tool-choice` is `ENABLE_AUTO_TOOL_CHOICE`),
plus this worker's older names (`MODEL_NAME`, `CUSTOM_CHAT_TEMPLATE`, ...). The list of flags
comes from vLLM's own argument parser, and the settings are parsed and checked by it before the
model loads, so a mistake stops the worker with one clear line before it takes any job.

Failure: when vLLM's engine dies (its engine-core process killed, `EngineDeadError`), vLLM's
server shuts itself down. The jobs in flight fail with a clear error and the worker asks Runpod
for a fresh one (`refresh_worker`); a server that dies while the worker is idle ends the
worker process, so Runpod replaces it rather than sending it jobs it can only fail.

This module imports no vLLM: the handler process only relays. The server process is
vllm_launch.py, run by the interpreter that has vLLM (`VLLM_PYTHON`), which need not be the
worker's: Dockerfile.vllm keeps vLLM in an environment of its own.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import psutil
import runpod

from coalesce import ResultTooLarge, coalesced, merge_answer, within_result_budget
from errors import BAD_REQUEST, INTERNAL, UNAVAILABLE, RequestError, openai_error
from vllm_launch import SETTINGS_ERROR, SettingsError

log = runpod.RunPodLogger()

# ---------------------------------------------------------------------------------------------
# Limits and fixed settings
# ---------------------------------------------------------------------------------------------
HOST = "127.0.0.1"  # loopback only: callers reach the worker through Runpod, never this port
# A first start downloads the model (a 70B model in bf16 is ~140 GB) and may compile CUDA graphs.
START_TIMEOUT_S = 3600.0
HEALTH_POLL_S = 0.5  # how often start-up asks /health
HEALTH_TIMEOUT_S = 5.0  # a live server answers /health in milliseconds, even under load
SHUTDOWN_TIMEOUT_S = 30.0  # vLLM's own graceful stop, before what is left is killed
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOG_TAIL_LINES = 30  # the server's last log lines, quoted when it fails to start
# Jobs one worker holds at once, by default: as many as vLLM batches (MAX_NUM_SEQS), at most 64.
# A job held here is a job no other worker can take, so past what one engine batches usefully the
# queue is better left to Runpod's autoscaler; 64 covers the 50-100 streams users run per GPU.
MAX_CONCURRENCY_CAP = 64
SSE_END = b"\n\n"  # the blank line that closes every server-sent event

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
RESPONSES_ROUTE = "/v1/responses"
ROUTES = (CHAT_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE, RESPONSES_ROUTE)
GET_ROUTES = (MODELS_ROUTE,)
# worker-vllm's generic shape (`route` + `body` + `method`) also reaches vLLM's token utilities and
# version; never its admin routes (sleep, reset, RPC), which a caller has no business reaching.
GENERIC_ROUTES = (*ROUTES, "/tokenize", "/detokenize", "/version")
GENERIC_GET_ROUTES = (MODELS_ROUTE, "/version")
METHODS = ("GET", "POST")
# The routes whose requests get DEFAULT_MAX_TOKENS when they name no limit of their own.
GENERATION_ROUTES = (CHAT_ROUTE, COMPLETIONS_ROUTE)


def default_concurrency(environ: Mapping[str, str]) -> int:
    """MAX_CONCURRENCY, else as many jobs as vLLM batches (MAX_NUM_SEQS), capped: see MAX_CONCURRENCY_CAP."""
    if environ.get("MAX_CONCURRENCY"):
        return int(environ["MAX_CONCURRENCY"])
    seqs = environ.get("MAX_NUM_SEQS")
    return min(int(seqs), MAX_CONCURRENCY_CAP) if seqs and seqs.isdigit() else MAX_CONCURRENCY_CAP


# ---------------------------------------------------------------------------------------------
# The native request shape, on vLLM's OpenAI routes (pure)
# ---------------------------------------------------------------------------------------------
# vLLM's SamplingParams fields that its OpenAI requests also take, by the same names: what
# worker-vllm's native `sampling_params` accepts. (tests/text_generation/test_vllm_engine.py checks them against vLLM.)
NATIVE_SAMPLING_FIELDS = frozenset(
    {
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "bad_words",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "logit_bias",
        "allowed_token_ids",
        "structured_outputs",
        "thinking_token_budget",
    }
)
# How messages become the prompt (vLLM's chat fields), as the transformers engine takes them natively.
TEMPLATE_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message")
NATIVE_FIELDS = ("prompt", "messages", "sampling_params", "stream", *TEMPLATE_FIELDS)


def with_default_max_tokens(
    route: str, body: dict[str, Any], default_max_tokens: int | None, max_model_len: int | None
) -> dict[str, Any]:
    """`body` with this worker's completion length when it names none. Pure.

    vLLM's completions route would stop at 16 tokens (OpenAI's old default) and its chat route
    runs to the end of the context; this worker's DEFAULT_MAX_TOKENS applies on every route and
    engine instead. Without one (a reasoning model), completions get the whole context too:
    vLLM shortens a max_tokens of max_model_len to what the prompt leaves."""
    if route not in GENERATION_ROUTES or "max_tokens" in body or "max_completion_tokens" in body:
        return body
    limit = default_max_tokens
    if limit is None and route == COMPLETIONS_ROUTE:
        limit = max_model_len
    if limit is None:
        return body
    return {**body, "max_tokens": min(limit, max_model_len) if max_model_len else limit}


def native_request(job_input: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The OpenAI (route, body) for a native request. Pure.

    `messages` go to the chat route, `prompt` to the completions route. On chat, a native
    `logprobs: k` (vLLM's SamplingParams meaning: the top k) is OpenAI's `logprobs` + `top_logprobs`.
    A streamed request asks for the usage, which the native stream ends with.
    """
    unknown = sorted(set(job_input) - set(NATIVE_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; a native request has {', '.join(NATIVE_FIELDS)}")
    if ("prompt" in job_input) == ("messages" in job_input):
        raise RequestError("send exactly one of prompt or messages")
    sampling = job_input.get("sampling_params", {})
    if not isinstance(sampling, dict):
        raise RequestError("sampling_params must be a JSON object")
    unknown = sorted(set(sampling) - NATIVE_SAMPLING_FIELDS)
    if unknown:
        raise RequestError(
            f"sampling_params: unknown field(s) {', '.join(unknown)}; "
            f"vLLM's are {', '.join(sorted(NATIVE_SAMPLING_FIELDS))}"
        )
    stream = job_input.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false")
    body: dict[str, Any] = dict(sampling)
    if "messages" in job_input:
        route = CHAT_ROUTE
        body["messages"] = job_input["messages"]
        body.update({name: job_input[name] for name in TEMPLATE_FIELDS if name in job_input})
        if isinstance(body.get("logprobs"), int) and not isinstance(body["logprobs"], bool):
            body["top_logprobs"] = body["logprobs"]
            body["logprobs"] = True
    else:
        route = COMPLETIONS_ROUTE
        body["prompt"] = job_input["prompt"]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return route, body


def generic_request(job_input: Mapping[str, Any]) -> tuple[str, str, dict[str, Any] | None, bool]:
    """worker-vllm's generic shape, `{"route", "body", "method"}`, as (route, method, body, native?).
    Pure. The method defaults to POST with a body and GET without one, as in worker-vllm."""
    unknown = sorted(set(job_input) - {"route", "body", "method"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} beside route; send route, body and method")
    route, body = job_input["route"], job_input.get("body")
    if route not in GENERIC_ROUTES:
        raise RequestError(f"route must be one of {', '.join(GENERIC_ROUTES)}, got {route!r}")
    if body is not None and not isinstance(body, dict):
        raise RequestError(f"body must be a JSON object with the {route} request body")
    method = job_input.get("method") or ("POST" if body is not None else "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise RequestError(f"method must be GET or POST, got {method!r}")
    method = method.upper()
    if method == "GET" and (body is not None or route not in GENERIC_GET_ROUTES):
        raise RequestError(f"GET takes no body and reaches only {', '.join(GENERIC_GET_ROUTES)}; {route} takes POST")
    if method == "POST" and route in GENERIC_GET_ROUTES:
        raise RequestError(f"{route} takes GET, without a body")
    return route, method, body if method == "POST" else None, False


def native_chunks(route: str, response: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole OpenAI answer as native chunks, one per choice: text (and, from a reasoning or tool
    parser, `reasoning` and `tool_calls`), finish reason; the usage on the last. Pure."""
    chunks = []
    many = len(response["choices"]) > 1
    for choice in response["choices"]:
        message = choice.get("message") or {}
        chunk: dict[str, Any] = {"index": choice["index"]} if many else {}
        chunk["text"] = (message.get("content") if route == CHAT_ROUTE else choice.get("text")) or ""
        for key in ("reasoning", "tool_calls"):
            if message.get(key):
                chunk[key] = message[key]
        if choice.get("logprobs"):
            chunk["logprobs"] = choice["logprobs"]
        chunk["finish_reason"] = choice.get("finish_reason")
        chunks.append(chunk)
    chunks[-1]["usage"] = response.get("usage")
    return chunks


class NativeStream:
    """Streamed OpenAI chunks as native chunks: text deltas (and `reasoning`, `tool_calls` and
    `logprobs` deltas when present), then `{"finish_reason", "usage"}`, as the transformers
    engine streams. With `n` > 1 every chunk names its choice's `index`, and each choice's finish
    reason comes when it finishes; the usage comes last. Pure: no I/O."""

    def __init__(self, route: str, many: bool) -> None:
        self.route = route
        self.many = many
        self.finish_reason: str | None = None

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            prefix = {"index": choice["index"]} if self.many else {}
            text = delta.get("content") if self.route == CHAT_ROUTE else choice.get("text")
            if text:
                out.append({**prefix, "text": text})
            for key in ("reasoning", "tool_calls"):
                if delta.get(key):
                    out.append({**prefix, key: delta[key]})
            if choice.get("logprobs"):
                out.append({**prefix, "logprobs": choice["logprobs"]})
            if choice.get("finish_reason"):
                if self.many:
                    out.append({**prefix, "finish_reason": choice["finish_reason"]})
                else:
                    self.finish_reason = choice["finish_reason"]
        if event.get("usage") and not event.get("choices"):
            last = (
                {"usage": event["usage"]}
                if self.many
                else {"finish_reason": self.finish_reason, "usage": event["usage"]}
            )
            out.append(last)
        return out


def vllm_error_message(status: int, body: bytes) -> str:
    """vLLM's own message from an error answer ({"error": {"message": ...}}), else its text."""
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    return f"vLLM refused the request (HTTP {status}): {message}"


def failure(message: str, status: int, body: str = "") -> dict[str, Any]:
    """A failed job's chunk, with the HTTP status and, from vLLM, its own error answer: `handle`
    turns it into the error the caller's route takes (`for_route`)."""
    return {"error": message, "status": status, "body": body}


def for_route(chunk: dict[str, Any], native: bool) -> dict[str, str]:
    """A failure as its caller reads it. Native: the message. OpenAI routes: OpenAI's error object
    as JSON text, vLLM's own (type and param kept) where vLLM answered, the HTTP status as `code`."""
    if native:
        return {"error": chunk["error"]}
    try:
        error = json.loads(chunk["body"])["error"]
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return {"error": json.dumps({"error": {**error, "code": chunk["status"]}}, ensure_ascii=False)}
    except (ValueError, KeyError, TypeError):
        pass
    return {"error": openai_error(chunk["error"], chunk["status"])}


class StreamEnd:
    """What a relayed answer has sent so far, to end it the way max_tokens would when a limit
    stops it: each unfinished choice gets finish_reason "length" and the limit's name. Pure."""

    def __init__(self, route: str, choices: int) -> None:
        self.route = route
        self.choices = choices
        self.streaming = False  # a stream has sent a chunk: there is an answer to keep
        self.finished: set[int] = set()
        self.envelope: dict[str, Any] | None = None  # the OpenAI stream's id, object, created, model

    def note(self, chunk: Any) -> None:
        """One chunk the caller got: native dicts, or SSE strings (whole events)."""
        if isinstance(chunk, str):
            self.streaming = True
            for event in chunk.split(SSE_END.decode()):
                if not event.startswith("data: {"):
                    continue
                data = json.loads(event[len("data: ") :])
                self.envelope = {key: data[key] for key in ("id", "object", "created", "model") if key in data}
                self.finished |= {c["index"] for c in data.get("choices") or () if c.get("finish_reason")}
        elif isinstance(chunk, dict) and "usage" not in chunk:  # a native stream's delta
            self.streaming = True
            if chunk.get("finish_reason"):
                self.finished.add(chunk.get("index", 0))
        elif isinstance(chunk, dict) and "finish_reason" in chunk:  # the last of a native stream
            self.streaming = False  # whole: nothing to close

    def closing(self, limit: str) -> list[Any]:
        unfinished = [index for index in range(self.choices) if index not in self.finished]
        if self.envelope is None:  # native
            many = self.choices > 1
            return [{**({"index": i} if many else {}), "finish_reason": "length", "limit": limit} for i in unfinished]
        chat = self.route == CHAT_ROUTE
        events = []
        for index in unfinished:
            choice = {"index": index, **({"delta": {}} if chat else {"text": ""}), "logprobs": None}
            choice.update(finish_reason="length", limit=limit)
            events.append("data: " + json.dumps({**self.envelope, "choices": [choice]}) + "\n\n")
        return ["".join(events) + "data: [DONE]\n\n"]


def split_events(buffer: bytes) -> tuple[list[str], bytes]:
    """(the whole server-sent events in `buffer`, the incomplete rest). Pure."""
    *events, rest = buffer.split(SSE_END)
    return [event.decode() + "\n\n" for event in events], rest


def ends_an_answer(event: str) -> bool:
    """Whether one of vLLM's server-sent events belongs to the end of an answer: it carries a
    choice's finish_reason, or the usage that follows the last one. Pure."""
    if not event.startswith("data: {"):
        return False
    data = json.loads(event[len("data: ") :])
    choices = data.get("choices") or ()
    return any(choice.get("finish_reason") for choice in choices) or (not choices and bool(data.get("usage")))


def relayed(events: list[str], reshape: NativeStream | None) -> list[Any]:
    """What the caller gets for some of vLLM's events: the events, or their native chunks."""
    if reshape is None:
        return events
    data = [json.loads(event[len("data: ") :]) for event in events if event.startswith("data: {")]
    return [chunk for event in data for chunk in reshape.feed(event)]


# ---------------------------------------------------------------------------------------------
# The server process and the relay
# ---------------------------------------------------------------------------------------------
class EngineStopped(RuntimeError):
    """vLLM's server or engine is gone: only a fresh worker recovers."""


def startup_failure(log_lines: list[str]) -> str:
    """The last exception a failed server printed (`SomeError: why`), else its last log line. Pure."""
    for line in reversed(log_lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): ", line.strip()):
            return line.strip()
    return log_lines[-1].strip() if log_lines else "it printed nothing"


def die_with_parent() -> None:
    """In the server process, before it runs: the kernel sends it SIGTERM when the worker
    process dies, however it dies, so no vLLM server outlives its worker and holds the GPU."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI server as a child process, and the relay of jobs to it."""

    def __init__(
        self, environ: Mapping[str, str], time_limit_s: float | None, python: str, default_max_tokens: int | None
    ) -> None:
        self.port = free_port()
        self.default_max_tokens = default_max_tokens
        self.max_model_len: int | None = None  # read from /v1/models once the server is up
        self.url = f"http://{HOST}:{self.port}"
        self.time_limit_s = time_limit_s
        self.max_concurrency = default_concurrency(environ)
        self.active = 0  # jobs being relayed now
        self.dead = False
        self.healthy_once = False  # the server answered /health at least once
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.process = subprocess.Popen(
            [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_launch.py"), HOST, str(self.port)],
            env=dict(environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        threading.Thread(target=self._forward_logs, name="vllm-logs", daemon=True).start()

    # -- start-up --------------------------------------------------------------------------------
    def _forward_logs(self) -> None:
        """vLLM's logs go to the worker's stderr (stdout carries a local run's chunks), and the
        last lines are kept to explain a failed start."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self._tail.append(line.rstrip())
            sys.stderr.write(line)
        self.process.wait()
        if not self._stopping:
            self._on_exit()

    def _on_exit(self) -> None:
        """The server stopped by itself. Jobs in flight report it and retire the worker; with none
        in flight, nothing would, so the worker process ends and Runpod starts a fresh one."""
        log.error(f"vLLM's server stopped (exit code {self.process.returncode})")
        idle = self.active == 0 and not self.dead
        self.dead = True
        if idle and self.healthy_once:
            os._exit(1)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the log thread read the last lines
                settings = [line for line in self._tail if line.startswith(SETTINGS_ERROR)]
                if settings:
                    raise SettingsError(settings[-1].removeprefix(SETTINGS_ERROR))
                # Its logs went to stderr as they came; the reason is the last exception it printed
                # (e.g. "RuntimeError: Failed to infer device type" where vLLM's CUDA build finds no GPU).
                raise RuntimeError(
                    f"vLLM's server exited during start-up (code {self.process.returncode}): "
                    f"{startup_failure(list(self._tail))}"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=HEALTH_TIMEOUT_S) as answer:
                    if answer.status == 200:
                        self.healthy_once = True
                        self.max_model_len = self._served_max_model_len()
                        return
            time.sleep(HEALTH_POLL_S)
        self.shutdown()
        raise RuntimeError(f"vLLM's server was not ready after {timeout_s:g}s")

    def _served_max_model_len(self) -> int | None:
        """The context length vLLM serves the model with (its /v1/models lists it)."""
        import urllib.request

        with urllib.request.urlopen(self.url + MODELS_ROUTE, timeout=HEALTH_TIMEOUT_S) as answer:
            models = json.loads(answer.read())["data"]
        return next((model["max_model_len"] for model in models if model.get("max_model_len")), None)

    def shutdown(self) -> None:
        """Stop the server and its engine process (tests, and the worker's exit). SIGTERM lets vLLM
        stop its engine core itself; whatever is left after SHUTDOWN_TIMEOUT_S is killed."""
        self._stopping = True
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.process.pid).children(recursive=True)
            self.process.terminate()
            _, alive = psutil.wait_procs([psutil.Process(self.process.pid), *children], timeout=SHUTDOWN_TIMEOUT_S)
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        self.process.wait()

    # -- health ------------------------------------------------------------------------------------
    async def alive(self, session: aiohttp.ClientSession) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def retire(self, worker_config: dict[str, Any]) -> None:
        self.dead = True
        worker_config["refresh_worker"] = True  # the SDK stops this worker after the job
        log.error("vLLM's engine is gone; this worker asks Runpod for a fresh one")

    # -- the relay ---------------------------------------------------------------------------------
    async def handle(
        self, job: dict[str, Any], worker_config: dict[str, Any], max_result_bytes: int, too_large: str
    ) -> AsyncIterator[Any]:
        """A job's chunks: vLLM's answer relayed (OpenAI routes) or reshaped (native), within
        `max_result_bytes` (past them, `too_large` is the error of an answer with nothing sent)."""
        job_input = job.get("input")
        try:
            route, method, body, native = self.parse(job_input)
        except RequestError as error:
            log.warn(f"Rejected request: {error}", job.get("id"))
            native_shape = not (isinstance(job_input, dict) and {"openai_route", "route"} & set(job_input))
            yield for_route(failure(str(error), BAD_REQUEST), native_shape)
            return
        if self.dead:
            worker_config["refresh_worker"] = True
            yield for_route(failure("vLLM's engine has stopped on this worker; retry the request", UNAVAILABLE), native)
            return
        if body is not None:
            body = with_default_max_tokens(route, body, self.default_max_tokens, self.max_model_len)
        chunks = self.relay(route, method, body, native, worker_config, job.get("id"))
        sent = StreamEnd(route, (body or {}).get("n") or 1)
        try:
            # Whatever piled up while the SDK was POSTing the last chunk goes out together.
            async with contextlib.aclosing(coalesced(chunks, merge_answer)) as merged:
                async for chunk in within_result_budget(merged, max_result_bytes):
                    if isinstance(chunk, dict) and "error" in chunk:
                        yield for_route(chunk, native)
                        return
                    sent.note(chunk)
                    yield chunk
            return
        except ResultTooLarge:
            limit, error = "MAX_RESULT_BYTES", failure(too_large, BAD_REQUEST)
        except TimeoutError:
            limit = "MAX_GENERATION_SECONDS"
            message = f"generation stopped at its {self.time_limit_s:g}-second limit ({limit}): lower max_tokens"
            error = failure(message, INTERNAL)
        log.warn(f"Stopped an answer at {limit}", job.get("id"))
        # A stream keeps what it sent and ends as max_tokens would end it, naming the limit; an
        # answer with nothing sent yet fails.
        for chunk in sent.closing(limit) if sent.streaming else [for_route(error, native)]:
            yield chunk

    @staticmethod
    def parse(job_input: Any) -> tuple[str, str, dict[str, Any] | None, bool]:
        """(route, method, body, native?) for a job's input."""
        if not isinstance(job_input, dict):
            raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
        if "route" in job_input:
            return generic_request(job_input)
        if "openai_route" not in job_input:
            route, body = native_request(job_input)
            return route, "POST", body, True
        route = job_input["openai_route"]
        if route not in ROUTES:
            raise RequestError(f"openai_route must be one of {', '.join(ROUTES)}, got {route!r}")
        if route in GET_ROUTES:
            return route, "GET", None, False
        body = job_input.get("openai_input")
        if not isinstance(body, dict):
            raise RequestError(f"openai_input must be a JSON object with the {route} request body")
        return route, "POST", body, False

    async def relay(
        self,
        route: str,
        method: str,
        body: dict[str, Any] | None,
        native: bool,
        worker_config: dict[str, Any],
        job_id: Any,
    ) -> AsyncIterator[Any]:
        self.active += 1
        timeout = aiohttp.ClientTimeout(total=self.time_limit_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                try:
                    async with session.request(method, self.url + route, json=body) as response:
                        if response.status >= 400:
                            text = await response.read()
                            if response.status >= 500 and not await self.alive(session):
                                raise EngineStopped(vllm_error_message(response.status, text))
                            log.warn(vllm_error_message(response.status, text), job_id)
                            yield failure(
                                vllm_error_message(response.status, text),
                                response.status,
                                text.decode("utf-8", "replace"),
                            )
                            return
                        if response.content_type != "text/event-stream":
                            answer = await response.json()
                            if native:
                                for chunk in native_chunks(route, answer):
                                    yield chunk
                            else:
                                yield answer
                            return
                        async for chunk in self._events(route, body or {}, response, native, session):
                            yield chunk
                except TimeoutError:  # MAX_GENERATION_SECONDS, for handle() (aiohttp's are ClientErrors too)
                    raise
                except (aiohttp.ClientError, EngineStopped) as error:
                    if isinstance(error, EngineStopped) or not await self.alive(session):
                        self.retire(worker_config)
                        message = "vLLM's engine stopped during this request; the worker is being replaced, retry"
                        yield failure(message, UNAVAILABLE)
                    else:
                        log.error(f"Relay to vLLM failed: {type(error).__name__}: {error}", job_id)
                        yield failure("the connection to vLLM failed inside the worker; see the worker logs", INTERNAL)
        finally:
            self.active -= 1

    async def _events(
        self, route: str, body: dict[str, Any], response: aiohttp.ClientResponse, native: bool, session: Any
    ) -> AsyncIterator[Any]:
        """vLLM's stream as whole events (never part of one), or as native chunks."""
        reshape = NativeStream(route, many=(body.get("n") or 1) > 1) if native else None
        # An event that ends a choice, and the usage after it, wait for the next event, which vLLM
        # sends right after them ([DONE], another choice's token): yielded together, the last text
        # and the end share one POST (coalesce.merge_answer) instead of a round trip each.
        held: list[str] = []
        buffer = b""
        async for data in response.content.iter_any():
            events, buffer = split_events(buffer + data)
            for event in events:
                if event.startswith('data: {"error"'):  # vLLM reports a failure mid-stream this way
                    message = json.loads(event[len("data: ") :])["error"].get("message", "")
                    if not await self.alive(session):
                        raise EngineStopped(message)
                    yield failure(f"vLLM failed during generation: {message}", INTERNAL, event[len("data: ") :])
                    return
                held.append(event)
                if not ends_an_answer(event):
                    for chunk in relayed(held, reshape):
                        yield chunk
                    held = []
        for chunk in relayed(held, reshape):  # a stream that ended right after a choice did
            yield chunk
        if buffer.strip():
            raise aiohttp.ClientPayloadError("vLLM's stream ended inside an event")
        if not await self.alive(session):
            raise EngineStopped("vLLM's server went away at the end of a stream")


def server_environment(environ: Mapping[str, str], model_name: str, hub_cache: str | None) -> dict[str, str]:
    """The server process's environment: the model this worker resolved (an empty MODEL_NAME means
    the handler's default, on both engines) and, when the model is in Runpod's cache, that cache as
    the Hugging Face hub folder vLLM loads from (it would look in HF_HOME's and find nothing)."""
    environment = {**environ, "MODEL_NAME": model_name}
    if hub_cache:
        environment["HF_HUB_CACHE"] = hub_cache
    return environment


def start_vllm_server(
    time_limit_s: float | None, python: str, environ: Mapping[str, str], default_max_tokens: int | None
) -> VLLMServer:
    """Start vLLM's server on `python` with the settings in `environ` and wait until it serves."""
    started = time.perf_counter()
    server = VLLMServer(environ, time_limit_s, python, default_max_tokens)
    try:
        server.wait_healthy()
    except BaseException:
        server.shutdown()
        raise
    import atexit

    atexit.register(server.shutdown)
    log.info(
        f"Loaded {environ.get('MODEL_NAME', '?')} with vllm (its OpenAI server on {server.url}) in "
        f"{time.perf_counter() - started:.1f}s; up to {server.max_concurrency} jobs at once"
    )
    return server
