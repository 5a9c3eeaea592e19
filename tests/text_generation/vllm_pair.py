"""Two servers side by side on one tiny model, for the vLLM engine tests (test_vllm_engine.py,
test_vllm_reasoning.py): the worker with ENGINE=vllm (its handler imported as a worker does, its
vLLM server configured from the environment) and a reference `vllm` OpenAI server started by hand
with the equivalent flags; and how their answers are compared, ids and timestamps aside."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from tests.shared.harness import base_env, load_handler, ok, run_job

VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "")
EXAMPLE = "01_text_generation"
SERVED = "tiny-qwen3"
LORA = "tiny-lora"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 16}
START_TIMEOUT_S = 600  # two vLLM servers starting at once on a 2-core machine
FROZEN_SETTLE_S = 2.0  # ample for a chunk already generated to be relayed, even on a loaded 2-core machine
FREEZE_ATTEMPTS = 8  # jobs tried until one is frozen before its last token (a fast engine can finish first)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "strict": True,  # vLLM then constrains the arguments to the parameters' schema
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Ada", "Alan", "Grace"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}


def vllm_cpu_env(tmp: Path) -> dict[str, str]:
    """What vLLM's CPU build needs to start small and quiet on a shared machine (both servers)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: otherwise the KV cache takes most of the machine
        "VLLM_HOST_IP": "127.0.0.1",  # keep its internal address on loopback
        "VLLM_RPC_BASE_PATH": str(tmp),  # its socket files, out of /tmp
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def worker_env(model: Path, lora: Path, tmp: Path, reasoning: bool = False) -> dict[str, str]:
    """The worker's settings, as an endpoint's environment variables."""
    return {
        "VLLM_PYTHON": VLLM_PYTHON,
        **({"REASONING_PARSER": "deepseek_r1"} if reasoning else {}),
        **vllm_cpu_env(tmp),
        "MODEL_NAME": str(model),
        "SERVED_MODEL_NAME": SERVED,
        "ENGINE": "vllm",
        "DTYPE": "float32",
        "MAX_MODEL_LEN": "512",
        "MAX_NUM_SEQS": "8",
        "ENFORCE_EAGER": "true",  # no torch.compile of the model: seconds to start instead of minutes
        "ENABLE_AUTO_TOOL_CHOICE": "true",
        "TOOL_CALL_PARSER": "hermes",
        "LORA_MODULES": f"{LORA}={lora}",
        # Random weights emit whitespace forever inside a JSON grammar that allows it.
        "STRUCTURED_OUTPUTS_CONFIG": '{"backend": "xgrammar", "disable_any_whitespace": true}',
    }


def reference_flags(model: Path, lora: Path, reasoning: bool = False) -> list[str]:
    """The same settings as `vllm serve` flags, as a user of vLLM would write them."""
    return (["--reasoning-parser", "deepseek_r1"] if reasoning else []) + [
        "--model", str(model), "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "512",
        "--max-num-seqs", "8", "--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--enable-lora", "--lora-modules", f"{LORA}={lora}",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the reference server exited with {process.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no /health from {url} in {timeout}s")


def start_pair(model: Path, lora: Path, rpc: Path, reasoning: bool) -> Iterator[tuple[ModuleType, str]]:
    """(the worker's handler module, the reference server's URL), started side by side."""
    port = 18000 + os.getpid() % 1000 + reasoning
    reference = subprocess.Popen(
        [
            VLLM_PYTHON,
            "-m",
            "vllm.entrypoints.launchers.api_server.entry",
            *reference_flags(model, lora, reasoning),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=base_env(**vllm_cpu_env(rpc)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    module = None
    try:
        module = load_handler(EXAMPLE, worker_env(model, lora, rpc, reasoning))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, reference, START_TIMEOUT_S)
        yield module, url
    finally:
        if module is not None and module.VLLM:
            module.VLLM.shutdown()
        reference.terminate()
        try:
            reference.wait(60)
        except subprocess.TimeoutExpired:
            reference.kill()


# ---- helpers --------------------------------------------------------------------------------
def events_of(chunks: list[str]) -> list[str]:
    """The server-sent events in a stream's chunks; every chunk must hold whole events."""
    events = []
    for chunk in chunks:
        assert isinstance(chunk, str) and chunk.endswith("\n\n"), f"a chunk that splits an event: {chunk!r}"
        events += [event + "\n\n" for event in chunk.split("\n\n")[:-1]]
    return events


def direct(url: str, route: str, body: dict[str, Any] | None) -> Any:
    """The reference server's answer: a JSON object, or the list of its events when streamed."""
    if body is None:
        return httpx.get(url + route, timeout=120).json()
    with httpx.stream("POST", url + route, json=body, timeout=120) as response:
        raw = response.read()
    if response.headers["content-type"].startswith("text/event-stream"):
        return events_of([raw.decode()])
    return json.loads(raw)


def via_worker(module: ModuleType, route: str, body: dict[str, Any] | None) -> Any:
    """The worker's answer to the same request, as a Runpod OpenAI job."""
    job = {"openai_route": route, **({"openai_input": body} if body is not None else {})}
    output = ok(run_job(module.handler, job))
    if body is not None and body.get("stream"):
        return events_of(output)
    [answer] = output
    return answer


VARYING = {"id", "created", "system_fingerprint"}  # differ from one request to the next on any server


def choice_index(event: Any) -> int:
    choices = event.get("choices") if isinstance(event, dict) else None
    return choices[0]["index"] if choices else -1


def stable(value: Any) -> Any:
    """A response without its ids and timestamps (tool-call ids included), events parsed. With
    n > 1 the engine interleaves the choices' events in no fixed order; each choice's own events
    keep theirs, so events are compared choice by choice (a stable sort by choice index)."""
    if isinstance(value, list):
        items = [stable(item) for item in value]
        if any(isinstance(item, str) and item.startswith("data: {") for item in value):
            return sorted(items, key=choice_index)
        return items
    if isinstance(value, str) and value.startswith("data: {"):
        return stable(json.loads(value[len("data: ") :]))
    if isinstance(value, dict):
        return {key: stable(item) for key, item in value.items() if key not in VARYING}
    return value


def replay(events: list[str]) -> dict[str, Any]:
    """What a client rebuilds from a stream: per choice, its text, reasoning, tool calls (by index,
    arguments joined), logprobs and finish reason; then the usage. How vLLM groups tokens into
    events depends on how fast its client reads (its output collector merges what waits), so two
    servers under different load send the same answer in different events."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        if event == "data: [DONE]\n\n":
            continue
        data = json.loads(event[len("data: ") :])
        usage = data.get("usage") or usage
        for choice in data.get("choices") or ():
            state = choices.setdefault(choice["index"], {"text": "", "reasoning": "", "tools": {}, "logprobs": {}})
            delta = choice.get("delta") or {}
            state["text"] += (delta.get("content") if "delta" in choice else choice.get("text")) or ""
            state["reasoning"] += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or ():
                tool = state["tools"].setdefault(call["index"], {"name": "", "arguments": ""})
                tool["name"] += call.get("function", {}).get("name") or ""
                tool["arguments"] += call.get("function", {}).get("arguments") or ""
            for key, values in (choice.get("logprobs") or {}).items():  # chat: content; completions: tokens, ...
                state["logprobs"].setdefault(key, []).extend(values or [])
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]
    return {"choices": choices, "usage": usage}


def parity(worker: ModuleType, reference: str, route: str, body: dict[str, Any]) -> Any:
    """Send `body` to both, streamed and not; assert identical answers; return the worker's."""
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    whole, events = via_worker(worker, route, body), via_worker(worker, route, streamed)
    assert stable(whole) == stable(direct(reference, route, body))
    assert replay(events) == replay(direct(reference, route, streamed))
    assert events[-1] == "data: [DONE]\n\n"
    return whole, events


# ---- parity with vLLM's own server ----------------------------------------------------------
