"""01's local OpenAI endpoint (`python openai_endpoint.py`) over real HTTP, on a tiny Qwen3, with
the official openai client (and LangChain's, when installed) pointed at http://127.0.0.1:PORT/openai/v1."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import openai
import pytest

from tests.shared.harness import load_handler, ok, openai_chat, run_job
from tests.shared.local_openai import client, endpoint_module, serving_handler

EXAMPLE = "01_text_generation"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def qwen(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("qwen3"))})


@pytest.fixture(scope="module")
def url(qwen: ModuleType) -> str:
    with serving_handler(EXAMPLE, qwen) as base:
        yield base


def in_process(qwen: ModuleType, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The job's result run on the handler directly, as the SDK runs it."""
    return run_job(qwen.handler, {"openai_route": route, "openai_input": body})


def test_chat_streamed_and_not_give_the_handlers_greedy_answer(qwen: ModuleType, url: str) -> None:
    [reference] = ok(run_job(qwen.handler, openai_chat({"messages": CHAT, **GREEDY})))
    answer = client(url).chat.completions.create(model="m", messages=CHAT, **GREEDY)
    assert answer.model_dump(exclude={"id", "created"}, exclude_unset=True) == {
        key: value for key, value in reference.items() if key not in ("id", "created")
    }
    stream = client(url).chat.completions.create(
        model="m", messages=CHAT, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == answer.choices[0].message.content and answer.choices[0].message.content
    assert finish == answer.choices[0].finish_reason and usage == answer.usage


def test_completions_streamed_and_not(url: str) -> None:
    text = client(url).completions.create(model="m", prompt="The weather", **GREEDY)
    stream = client(url).completions.create(model="m", prompt="The weather", stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in stream) == text.choices[0].text
    assert text.object == "text_completion" and text.usage.completion_tokens >= 1


def test_models_lists_the_served_model(qwen: ModuleType, url: str) -> None:
    assert [model.id for model in client(url).models.list()] == [qwen.SERVED_MODEL_NAME]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": CHAT, "max_tokens": -1},  # the schema refuses it
        {"messages": CHAT, "use_beam_search": True},  # a vLLM feature this worker lacks
        {"messages": [{"role": "user"}]},
    ],
)
def test_a_refused_request_answers_as_the_error_contract_maps_the_jobs_error(
    qwen: ModuleType, url: str, body: dict[str, Any]
) -> None:
    """The handler's error is OpenAI's error object with status 400: the official client raises
    BadRequestError carrying the handler's own message, type and code."""
    error = in_process(qwen, "/v1/chat/completions", {"model": "m", **body})["error"]
    without_messages = {key: value for key, value in body.items() if key != "messages"}
    status, expected = endpoint_module(EXAMPLE).error_answer(error)
    assert status == 400 and expected["error"]["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError) as raised:
        client(url).chat.completions.create(model="m", messages=body["messages"], extra_body=without_messages)
    assert raised.value.status_code == 400 and raised.value.body == expected["error"]
    assert expected["error"]["message"]  # the handler's own message reaches the client


def test_langchain_chat_model(url: str) -> None:
    if importlib.util.find_spec("langchain_openai") is None:
        pytest.skip("langchain_openai is not installed")
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{url}/openai/v1", api_key="local", model="m", temperature=0, max_tokens=12)
    answer = chat.invoke([(message["role"], message["content"]) for message in CHAT])
    streamed = "".join(
        str(piece.content) for piece in chat.stream([(message["role"], message["content"]) for message in CHAT])
    )
    assert answer.content and streamed == answer.content
