"""ENGINE=vllm with a reasoning parser (REASONING_PARSER=deepseek_r1) against vLLM's own server.

A second worker and reference pair (see tests/text_generation/test_vllm_engine.py), on the tiny Qwen3 whose
generation prompt opens `<think>`: vLLM's parser puts the thoughts in `reasoning`, and a
structured answer starts only once they end, so these requests bound them with vLLM's
`thinking_token_budget`. Run by `bash tests/vllm_cpu.sh`; skipped in the main environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import jsonschema
import pytest

if not os.environ.get("VLLM_PYTHON"):
    pytest.skip("vLLM runs in its own environment: bash tests/vllm_cpu.sh", allow_module_level=True)

from tests.shared.harness import ok, run_job
from tests.text_generation.vllm_pair import CHAT, GREEDY, PERSON_SCHEMA, parity, start_pair


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory) -> Iterator[tuple[ModuleType, str]]:
    rpc = tmp_path_factory.mktemp("vllm-rpc")
    model: Path = tiny_model("qwen3-vllm")
    yield from start_pair(model, tiny_model("qwen3-vllm-lora"), rpc, reasoning=True)


CASES = {
    "thoughts only": {"messages": CHAT, **GREEDY},
    "thoughts bounded, then the answer": {"messages": CHAT, **GREEDY, "thinking_token_budget": 4},
    "thoughts bounded, then JSON": {
        "messages": CHAT,
        "temperature": 0,
        "max_tokens": 64,
        "thinking_token_budget": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
    },
}


@pytest.mark.parametrize("case", CASES)
def test_reasoning_same_as_vllms_own_server(servers: tuple[ModuleType, str], case: str) -> None:
    worker, reference = servers
    whole, events = parity(worker, reference, "/v1/chat/completions", CASES[case])
    message = whole["choices"][0]["message"]
    assert message["reasoning"], "the tiny model's text is read as thoughts"
    assert any('"reasoning"' in event for event in events)
    if "thinking_token_budget" in CASES[case]:
        assert message["content"], "the answer starts when the thinking budget is spent"
    if "response_format" in CASES[case]:
        jsonschema.validate(json.loads(message["content"]), PERSON_SCHEMA)


def test_native_streams_carry_the_reasoning(servers: tuple[ModuleType, str]) -> None:
    worker, _ = servers
    request = {"messages": CHAT, "sampling_params": {**GREEDY, "thinking_token_budget": 4}}
    [whole] = ok(run_job(worker.handler, request))
    streamed = ok(run_job(worker.handler, {**request, "stream": True}))
    assert whole["reasoning"] == "".join(chunk.get("reasoning", "") for chunk in streamed)
    assert whole["text"] == "".join(chunk.get("text", "") for chunk in streamed)  # the last may carry text
    assert streamed[-1]["finish_reason"] == whole["finish_reason"]
