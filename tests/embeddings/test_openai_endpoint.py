"""03's local OpenAI endpoint over real HTTP, on a tiny BERT sentence-transformer: in this process,
and as the command a user runs (`python openai_endpoint.py --port N`), with the official openai
client (and LangChain's, when installed) pointed at http://127.0.0.1:PORT/openai/v1."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import openai
import pytest

from tests.shared.harness import load_handler, ok, run_job
from tests.shared.local_openai import EndpointCommand, client, endpoint_module, serving_handler

EXAMPLE = "03_embeddings"
SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Café 東京 😀 works too."]


@pytest.fixture(scope="module")
def tiny_path(tiny_model) -> Path:
    return tiny_model("sentence-transformer")


@pytest.fixture(scope="module")
def embedder(tiny_path: Path) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path)})


@pytest.fixture(scope="module")
def url(embedder: ModuleType) -> str:
    with serving_handler(EXAMPLE, embedder) as base:
        yield base


def handlers_own(embedder: ModuleType, body: dict[str, Any]) -> np.ndarray:
    """The vectors the handler itself answers this /v1/embeddings body with (floats)."""
    output = ok(run_job(embedder.handler, {"openai_route": "/v1/embeddings", "openai_input": body}))
    return np.array([item["embedding"] for item in output["data"]])


def test_embeddings_are_the_handlers_own(embedder: ModuleType, url: str) -> None:
    # The client asks for base64 by default (numpy installed) and decodes it itself.
    response = client(url).embeddings.create(model="m", input=SENTENCES, dimensions=12)
    assert [item.index for item in response.data] == [0, 1, 2] and response.usage.prompt_tokens > 0
    expected = handlers_own(embedder, {"input": SENTENCES, "dimensions": 12})
    np.testing.assert_allclose([item.embedding for item in response.data], expected, atol=1e-6)
    floats = client(url).embeddings.create(model="m", input="hello", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, handlers_own(embedder, {"input": "hello"})[0], atol=1e-6)
    assert response.model == embedder.SERVED_MODEL_NAME


def test_models_lists_the_served_model(embedder: ModuleType, url: str) -> None:
    assert [model.id for model in client(url).models.list()] == [embedder.SERVED_MODEL_NAME]


def test_a_refused_request_answers_as_the_error_contract_maps_the_jobs_error(embedder: ModuleType, url: str) -> None:
    body = {"model": "m", "input": "hi", "dimensions": 1000}
    error = run_job(embedder.handler, {"openai_route": "/v1/embeddings", "openai_input": body})["error"]
    status, expected = endpoint_module(EXAMPLE).error_answer(error)
    with pytest.raises(openai.APIStatusError) as raised:
        client(url).embeddings.create(**body)
    assert raised.value.status_code == status and raised.value.body == expected["error"]
    assert "dimensions: Input should be less than or equal to 32" in raised.value.body["message"]
    if status == 400:
        assert isinstance(raised.value, openai.BadRequestError)
    with pytest.raises(openai.NotFoundError):  # an embeddings worker has no chat route
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_langchain_embeddings(embedder: ModuleType, url: str) -> None:
    if importlib.util.find_spec("langchain_openai") is None:
        pytest.skip("langchain_openai is not installed")
    from langchain_openai import OpenAIEmbeddings

    # Strings, not the token ids LangChain sends by default (those need tiktoken's file on the client).
    embeddings = OpenAIEmbeddings(
        base_url=f"{url}/openai/v1", api_key="local", model="m", check_embedding_ctx_length=False
    )
    np.testing.assert_allclose(
        embeddings.embed_documents(SENTENCES), handlers_own(embedder, {"input": SENTENCES}), atol=1e-6
    )


def test_the_command_a_user_runs(embedder: ModuleType, tiny_path: Path) -> None:
    with EndpointCommand(EXAMPLE, {"MODEL_NAME": str(tiny_path)}) as command:
        response = client(command.url).embeddings.create(model="m", input=SENTENCES, encoding_format="float")
        models = client(command.url).models.list()
        output = command.stop()
    np.testing.assert_allclose(
        [item.embedding for item in response.data], handlers_own(embedder, {"input": SENTENCES}), atol=1e-6
    )
    assert [model.id for model in models] == [str(tiny_path)]
    assert "OpenAI routes on http://127.0.0.1:" in output and "/v1/embeddings" in output
    # SIGTERM: uvicorn shuts down cleanly, then exits by the signal it caught.
    assert "Finished server process" in output and command.process.returncode in (0, -15), output
