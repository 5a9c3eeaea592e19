"""03_embeddings with MODEL_KIND=sparse: a tiny SPLADE SparseEncoder behind the handler, and the
pure functions of sparse.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.shared.harness import REPO, load_copy, load_handler, openai_failure, run_job, run_job_async
from tests.shared.harness import ok as output_of

EXAMPLE = "03_embeddings"
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "How do I reset my password?"]


@pytest.fixture(scope="module")
def splade_path(tiny_model) -> Path:
    return tiny_model("splade")


@pytest.fixture(scope="module")
def sparse(splade_path: Path) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(splade_path), "MODEL_KIND": "sparse", "MAX_INPUTS": "16"})


@pytest.fixture(scope="module")
def vectors() -> ModuleType:
    return load_copy(REPO / EXAMPLE / "sparse.py")


def error_of(result: dict[str, Any]) -> str:
    assert "output" not in result, result
    return result["error"]


def reference(module: ModuleType, texts: list[str], **kwargs: Any) -> list[dict[int, float]]:
    """sentence-transformers' own SparseEncoder.encode of `texts`: {index: value} per text."""
    dense = module.MODEL.encode(texts, convert_to_sparse_tensor=False, **kwargs)
    return [{int(i): float(row[i]) for i in torch.nonzero(row).flatten()} for row in dense]


def as_dicts(output: dict[str, Any]) -> list[dict[int, float]]:
    return [dict(zip(item["indices"], item["values"], strict=True)) for item in output["embeddings"]]


def assert_same_terms(got: list[dict[int, float]], expected: list[dict[int, float]]) -> None:
    assert [sorted(terms) for terms in got] == [sorted(terms) for terms in expected]
    for terms, want in zip(got, expected, strict=True):
        np.testing.assert_allclose([terms[i] for i in sorted(terms)], [want[i] for i in sorted(want)], atol=1e-5)


def test_the_model_is_a_splade_sparse_encoder(sparse: ModuleType, splade_path: Path) -> None:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    assert isinstance(sparse.MODEL, SparseEncoder)
    assert type(sparse.MODEL[0].auto_model).__name__ == "BertForMaskedLM"
    assert isinstance(sparse.MODEL[1], SpladePooling)
    assert sparse.EMBEDDING_DIM == len(sparse.MODEL.tokenizer)  # one dimension per vocabulary term
    assert sparse.ENCODER.token_ids_path  # tokenised once, off the model thread, like a dense model


def test_native_output_is_indices_and_values_equal_to_sparse_encoder(sparse: ModuleType) -> None:
    result = run_job(sparse.handler, {"texts": TEXTS})  # run_job checks the result is plain JSON
    out = output_of(result)
    assert out["dimensions"] == sparse.EMBEDDING_DIM and out["model"] == sparse.MODEL_NAME
    for item in out["embeddings"]:
        assert set(item) == {"indices", "values"}
        assert item["indices"] == sorted(item["indices"]) and all(value != 0 for value in item["values"])
        assert all(isinstance(i, int) for i in item["indices"]) and all(isinstance(v, float) for v in item["values"])
    assert_same_terms(as_dicts(out), reference(sparse, TEXTS))
    expected_tokens = sum(len(ids) for ids in sparse.MODEL.tokenizer(TEXTS)["input_ids"])
    assert out["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    assert out["truncated"] == []


def test_the_tiny_splade_is_lexical(sparse: ModuleType) -> None:
    # What makes the hybrid-search test meaningful: a text's terms are its own tokens.
    out = output_of(run_job(sparse.handler, {"texts": TEXTS}))
    for text, item in zip(TEXTS, out["embeddings"], strict=True):
        assert set(item["indices"]) == set(sparse.MODEL.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_prompts_match_encode_with_the_same_prompt(sparse: ModuleType) -> None:
    out = output_of(run_job(sparse.handler, {"texts": TEXTS, "prompt": "search query: "}))
    assert_same_terms(as_dicts(out), reference(sparse, TEXTS, prompt="search query: "))
    assert as_dicts(out) != as_dicts(output_of(run_job(sparse.handler, {"texts": TEXTS})))


def test_max_active_dims_keeps_the_largest_terms(sparse: ModuleType) -> None:
    out = output_of(run_job(sparse.handler, {"texts": TEXTS, "max_active_dims": 3}))
    assert [len(item["indices"]) for item in out["embeddings"]] == [3, 3, 3]
    assert_same_terms(as_dicts(out), reference(sparse, TEXTS, max_active_dims=3))


def test_long_texts_are_truncated_and_reported(sparse: ModuleType) -> None:
    long_text = " ".join(["the cat sat on the mat"] * 20)
    out = output_of(run_job(sparse.handler, {"texts": ["short", long_text]}))
    assert out["truncated"] == [1]
    assert_same_terms(as_dicts(out), reference(sparse, ["short", long_text]))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"dimensions": 8}, "dimensions"),
        ({"precision": "int8"}, "precision"),
        ({"encoding_format": "base64"}, "encoding_format"),
        ({"normalize": False}, "normalize"),
    ],
)
def test_dense_only_options_are_refused_by_name(sparse: ModuleType, extra: dict[str, Any], field: str) -> None:
    assert error_of(run_job(sparse.handler, {"texts": TEXTS, **extra})) == f"{field}: Extra inputs are not permitted"


def test_bad_max_active_dims_names_the_limit(sparse: ModuleType) -> None:
    assert "max_active_dims: Input should be greater than or equal to 1" in error_of(
        run_job(sparse.handler, {"texts": TEXTS, "max_active_dims": 0})
    )
    too_many = sparse.EMBEDDING_DIM + 1
    assert f"less than or equal to {sparse.EMBEDDING_DIM}" in error_of(
        run_job(sparse.handler, {"texts": TEXTS, "max_active_dims": too_many})
    )


def test_openai_route_is_refused_with_the_native_way(sparse: ModuleType) -> None:
    job = {"openai_route": "/v1/embeddings", "openai_input": {"model": "x", "input": TEXTS}}
    message, status, _ = openai_failure(run_job(sparse.handler, job))
    assert "sparse model (MODEL_KIND=sparse)" in message and '{"texts": [...]}' in message and status == 400
    models = output_of(run_job(sparse.handler, {"openai_route": "/v1/models"}))
    assert models["data"][0]["id"] == sparse.MODEL_NAME  # listing the model still works


def test_concurrent_sparse_jobs_share_batches_and_equal_their_solo_answers(sparse: ModuleType) -> None:
    jobs = [{"texts": TEXTS[i % 3 :] + TEXTS[: i % 3]} for i in range(6)]
    solo = [as_dicts(output_of(run_job(sparse.handler, job))) for job in jobs]

    async def all_at_once() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(run_job_async(sparse.handler, {"id": f"j{i}", "input": job}) for i, job in enumerate(jobs))
        )

    before = sparse.BATCHER.batches
    together = asyncio.run(all_at_once())
    assert sparse.BATCHER.batches - before < len(jobs)  # merged into fewer model calls than jobs
    for result, expected in zip(together, solo, strict=True):
        assert_same_terms(as_dicts(output_of(result)), expected)


def test_a_result_over_the_budget_is_a_clear_error(splade_path: Path) -> None:
    small = load_handler(EXAMPLE, {"MODEL_NAME": str(splade_path), "MODEL_KIND": "sparse", "MAX_RESULT_BYTES": "1500"})
    fits = output_of(run_job(small.handler, {"texts": ["cat"]}))
    assert len(fits["embeddings"]) == 1
    message = error_of(run_job(small.handler, {"texts": TEXTS * 4}))
    assert "over MAX_RESULT_BYTES (1,500" in message


def test_an_unknown_model_kind_stops_the_worker(splade_path: Path) -> None:
    with pytest.raises(SystemExit, match="MODEL_KIND must be one of dense, sparse, got 'colbert'"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(splade_path), "MODEL_KIND": "colbert"})


# ---- sparse.py, pure ------------------------------------------------------------------------


def test_active_terms_are_the_nonzero_entries_in_index_order(vectors: ModuleType) -> None:
    batch = torch.tensor([[0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.0]])
    got = vectors.active_terms(batch)
    assert [v.indices.tolist() for v in got] == [[1, 3], [], [0, 2]]
    assert [v.values.tolist() for v in got] == [[2.0, 0.5], [], [1.0, 3.0]]


def test_top_terms_keeps_the_largest_in_index_order(vectors: ModuleType) -> None:
    vector = vectors.SparseVector(np.array([2, 5, 7, 9]), np.array([0.3, 1.5, 0.1, 0.9], dtype=np.float32))
    top = vectors.top_terms(vector, 2)
    assert top.indices.tolist() == [5, 9] and top.values.tolist() == pytest.approx([1.5, 0.9])
    assert vectors.top_terms(vector, None) is vector and vectors.top_terms(vector, 10) is vector


def test_the_result_ceiling_bounds_the_real_json(vectors: ModuleType) -> None:
    rng = np.random.default_rng(0)
    made = [
        vectors.SparseVector(np.sort(rng.choice(30_522, size=n, replace=False)), rng.random(n, dtype=np.float32))
        for n in (0, 1, 150, 400)
    ]
    real = len(json.dumps({"embeddings": [vectors.sparse_json(v) for v in made]}))
    assert real <= vectors.sparse_result_ceiling(made, overhead=0) < 2 * real
