"""Semantic search with this worker and Qdrant (or PostgreSQL with pgvector): embed a corpus through
the endpoint, store the vectors, and answer queries.

The script talks to the worker over HTTP, exactly as any client would, either
  * a Runpod endpoint: set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY, or
  * the local dev server (`python handler.py --rp_serve_api`): pass --endpoint-url http://localhost:8000.

Hybrid search: give it a second endpoint serving a SPLADE model (MODEL_KIND=sparse), with
RUNPOD_SPARSE_ENDPOINT_ID or --sparse-endpoint-url, and every document gets a dense and a sparse
vector; a query searches both and Qdrant fuses the two rankings (reciprocal rank fusion).

Where the vectors go:
  * Qdrant embedded (the default): qdrant-client's local mode keeps the collection in a folder
    (--qdrant-path, ./qdrant-data), with nothing to install or start; meant for up to ~20k points.
  * A Qdrant server or cluster (Qdrant Cloud): set QDRANT_URL (and QDRANT_API_KEY).
  * PostgreSQL with the pgvector extension: set DATABASE_URL (dense vectors only).

Usage (pip install qdrant-client httpx numpy; for DATABASE_URL also psycopg[binary] pgvector):
    python qdrant_search.py --endpoint-url http://localhost:8000 demo
    python qdrant_search.py index corpus.txt              # one document per line
    python qdrant_search.py search "how do plants make food?" --limit 3

It imports nothing from handler.py: copy it anywhere.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import httpx
import numpy as np
from qdrant_client import QdrantClient
from qdrant_client.models import (
    Distance,
    Fusion,
    FusionQuery,
    PointStruct,
    Prefetch,
    SparseVector,
    SparseVectorParams,
    VectorParams,
)

# Texts per request. 64 is the worker's default BATCH_SIZE (one forward pass per request), and
# keeps a request of long documents (64 × 50,000 characters at most) far below /runsync's 20 MB
# payload limit. One request per document would pay the HTTP and queue overhead n times.
BATCH = 64
# Requests in flight at once while indexing: one worker merges their texts into shared batches
# (dynamic batching), and an endpoint with several workers spreads them; the bound keeps the
# client's memory flat and the endpoint's queue short. Raise it with the endpoint's max workers.
CONCURRENT_REQUESTS = 4

# /runsync holds the connection up to 90 s by default; allow a little more before giving up.
HTTP_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
# A job still queued or running after /runsync's wait (a cold start) is polled up to this long.
JOB_TIMEOUT_S = 600.0
# Transient answers worth one more try: rate limited, or the gateway briefly unavailable.
RETRY_STATUS = {429, 502, 503, 504}
RETRIES = 3

RUNPOD_API = "https://api.runpod.ai/v2"
InputType = Literal["query", "document"]
Sparse = tuple[list[int], list[float]]  # a sparse vector's (indices, values), as the worker sends them
T = TypeVar("T")
R = TypeVar("R")


class EmbeddingError(RuntimeError):
    """The endpoint failed the job (a bad input, a worker error) or never finished it."""


def decode_embedding(value: str | list[float]) -> np.ndarray:
    """One embedding from the response: base64 of little-endian float32, or a list of floats."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


class EmbeddingClient:
    """A minimal client for the worker's native request, over Runpod's /runsync route."""

    def __init__(self, base_url: str, api_key: str | None = None, http: httpx.Client | None = None) -> None:
        # base_url: https://api.runpod.ai/v2/<endpoint id>, or the dev server's http://localhost:8000.
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(timeout=HTTP_TIMEOUT)
        self.http.headers.update(headers)

    @classmethod
    def for_endpoint(cls, endpoint_id: str, api_key: str, http: httpx.Client | None = None) -> EmbeddingClient:
        return cls(f"{RUNPOD_API}/{endpoint_id}", api_key, http)

    def close(self) -> None:
        self.http.close()

    def embed(self, texts: Sequence[str], input_type: InputType) -> tuple[np.ndarray, list[int]]:
        """Embed `texts` in one request: (n × d float32 unit vectors, indices of truncated texts).

        input_type selects the model's query or document prompt (E5, BGE, Nomic...); models
        without prompts ignore it, so sending it is always right.
        """
        output = self._run({"texts": list(texts), "input_type": input_type, "encoding_format": "base64"})
        # base64 float32 is about a quarter of the JSON size of the same floats written out as text.
        vectors = np.stack([decode_embedding(value) for value in output["embeddings"]])
        return vectors, list(output.get("truncated", []))

    def embed_sparse(self, texts: Sequence[str], input_type: InputType) -> tuple[list[Sparse], list[int]]:
        """Embed `texts` in one request to a sparse endpoint (MODEL_KIND=sparse): ((indices, values)
        per text, indices of truncated texts). input_type picks a SPLADE model's query or document side."""
        output = self._run({"texts": list(texts), "input_type": input_type})
        vectors = [(item["indices"], item["values"]) for item in output["embeddings"]]
        return vectors, list(output.get("truncated", []))

    def _run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """POST one job to /runsync and return its output; poll /status if it outlives the wait."""
        job = self._request("POST", "/runsync", json={"input": job_input})
        deadline = time.monotonic() + JOB_TIMEOUT_S
        # On Runpod, /runsync answers IN_QUEUE or IN_PROGRESS when a cold start or a long queue
        # outlasts its wait; the job keeps running and /status/<id> gives its result.
        while job.get("status") in ("IN_QUEUE", "IN_PROGRESS"):
            if time.monotonic() > deadline:
                raise EmbeddingError(f"job {job.get('id')} still {job['status']} after {JOB_TIMEOUT_S:.0f}s")
            time.sleep(1.0)
            job = self._request("GET", f"/status/{job['id']}")
        if job.get("status") != "COMPLETED":
            # FAILED carries the worker's message, e.g. "texts.0: String should have at least 1 character".
            raise EmbeddingError(f"embedding job {job.get('status')}: {job.get('error', 'no error message')}")
        return job["output"]

    def _request(self, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
        for attempt in range(RETRIES):
            response = self.http.request(method, self.base_url + route, **kwargs)
            if response.status_code not in RETRY_STATUS or attempt == RETRIES - 1:
                break
            time.sleep(2**attempt)  # embeddings are idempotent, so a retried job does no harm
        if response.status_code == 401:
            raise EmbeddingError("401 Unauthorized: check RUNPOD_API_KEY")
        response.raise_for_status()
        return response.json()


def bounded_map(function: Callable[[T], R], items: Sequence[T], concurrency: int) -> Iterator[R]:
    """function(item) for every item, at most `concurrency` calls in flight, results in order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Where the vectors go: a Qdrant collection, or a PostgreSQL table with pgvector.
# ---------------------------------------------------------------------------------------------
class Store(Protocol):
    hybrid: bool  # holds sparse vectors too

    def exists(self) -> bool: ...
    def add(self, texts: Sequence[str], dense: np.ndarray, sparse: list[Sparse] | None) -> None: ...
    def search(self, dense: np.ndarray, sparse: Sparse | None, limit: int) -> list[tuple[float, str]]: ...


def point_id(text: str) -> str:
    # The id derives from the text, so indexing the same document again updates its point
    # instead of adding a duplicate: re-running `index` on a grown file is safe.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, text))


def open_qdrant(path: str | Path) -> QdrantClient:
    """A Qdrant server when QDRANT_URL is set, else an embedded Qdrant in the folder `path`."""
    if url := os.environ.get("QDRANT_URL"):
        return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)
    # Local mode: the same API, stored on disk, for one process at a time (it locks the folder).
    return QdrantClient(path=str(path))


# A hybrid collection's named vectors. A dense-only collection has one unnamed vector, as before.
DENSE, SPARSE = "dense", "sparse"
# Candidates each side of a hybrid search brings to the fusion: enough that a document ranked
# well by one side only still competes.
HYBRID_PREFETCH = 50


class QdrantStore:
    """One Qdrant collection: a point per document, the text itself as the payload."""

    def __init__(self, qdrant: QdrantClient, collection: str) -> None:
        self.qdrant, self.collection = qdrant, collection

    def exists(self) -> bool:
        return self.qdrant.collection_exists(self.collection)

    @property
    def hybrid(self) -> bool:
        return bool(self.qdrant.get_collection(self.collection).config.params.sparse_vectors)

    def add(self, texts: Sequence[str], dense: np.ndarray, sparse: list[Sparse] | None) -> None:
        if not self.exists():
            # Created on the first batch, sized to the vectors the worker returns, so the script
            # works with whichever model the endpoint serves. Cosine: the worker returns unit
            # vectors, for which cosine and dot product agree. A SPLADE score is a dot product.
            params = VectorParams(size=dense.shape[1], distance=Distance.COSINE)
            if sparse is None:
                self.qdrant.create_collection(self.collection, vectors_config=params)
            else:
                self.qdrant.create_collection(
                    self.collection,
                    vectors_config={DENSE: params},
                    sparse_vectors_config={SPARSE: SparseVectorParams()},
                )
        elif (sparse is not None) != self.hybrid:
            raise EmbeddingError(self._layout_error(sparse is not None))
        if sparse is None:
            vectors: list[Any] = [vector.tolist() for vector in dense]
        else:
            vectors = [
                {DENSE: vector.tolist(), SPARSE: SparseVector(indices=indices, values=values)}
                for vector, (indices, values) in zip(dense, sparse, strict=True)
            ]
        points = [
            PointStruct(id=point_id(text), vector=vector, payload={"text": text})
            for text, vector in zip(texts, vectors, strict=True)
        ]
        self.qdrant.upsert(self.collection, points=points)

    def search(self, dense: np.ndarray, sparse: Sparse | None, limit: int) -> list[tuple[float, str]]:
        if (sparse is not None) != self.hybrid:
            raise EmbeddingError(self._layout_error(sparse is not None))
        if sparse is None:
            hits = self.qdrant.query_points(self.collection, query=dense.tolist(), limit=limit, with_payload=True)
        else:
            # Each side ranks its candidates; Qdrant fuses the two rankings by reciprocal rank
            # (a document's score: the sum of 1 / (k + its rank) on each side), so neither side's
            # scale matters: cosine similarities and SPLADE dot products are not comparable.
            prefetch = max(limit, HYBRID_PREFETCH)
            hits = self.qdrant.query_points(
                self.collection,
                prefetch=[
                    Prefetch(query=dense.tolist(), using=DENSE, limit=prefetch),
                    Prefetch(query=SparseVector(indices=sparse[0], values=sparse[1]), using=SPARSE, limit=prefetch),
                ],
                query=FusionQuery(fusion=Fusion.RRF),
                limit=limit,
                with_payload=True,
            )
        return [(hit.score, hit.payload["text"]) for hit in hits.points]

    def _layout_error(self, asked_hybrid: bool) -> str:
        if asked_hybrid:
            return (
                f"collection {self.collection!r} holds dense vectors only: index into a new collection "
                "for hybrid search, or leave the sparse endpoint out"
            )
        return f"collection {self.collection!r} is hybrid (dense + sparse): give the sparse endpoint too"


# pgvector's HNSW index holds vectors of at most 2,000 dimensions (`vector`); half precision
# (`halfvec`, pgvector 0.7+) holds up to 4,000. Larger vectors have no pgvector index at all.
HNSW_MAX_DIMENSIONS = 2_000
HALFVEC_MAX_DIMENSIONS = 4_000
# An HNSW scan returns at most hnsw.ef_search rows (40 by default), so a search for more would
# silently get 40: each search raises it to its limit. 1,000 is the largest ef_search pgvector
# accepts, hence the largest `limit` a search may ask for.
DEFAULT_EF_SEARCH = 40
MAX_SEARCH_LIMIT = 1_000
Layout = Literal["vector", "halfvec", "exact"]  # how a table's vectors are indexed and searched


class StoreError(RuntimeError):
    """The vector store refused an operation (a database error, a model it cannot hold)."""


def pgvector_layout(dimensions: int, halfvec: bool) -> Layout:
    """How vectors of `dimensions` are indexed: HNSW on `vector` up to 2,000 dimensions, HNSW on a
    `halfvec` cast up to 4,000 where pgvector has it (0.7+; scores stay full precision), else no
    index: an exact search, slower on big tables but always right. Above 4,000: refused."""
    if dimensions > HALFVEC_MAX_DIMENSIONS:
        raise StoreError(
            f"the model's vectors have {dimensions} dimensions; pgvector indexes at most {HALFVEC_MAX_DIMENSIONS:,} "
            "(halfvec): use Qdrant, or a model (or Matryoshka `dimensions`) of at most 4,000"
        )
    if dimensions <= HNSW_MAX_DIMENSIONS:
        return "vector"
    return "halfvec" if halfvec else "exact"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class PgvectorStore:
    """One PostgreSQL table with the pgvector extension: a row per document, dense vectors only
    (sparse vectors need pgvector 0.7's sparsevec; hybrid search is Qdrant's here). Every database
    error comes out as a StoreError of one line."""

    hybrid = False

    def __init__(self, database_url: str, table: str) -> None:
        import psycopg
        from pgvector.psycopg import register_vector
        from psycopg import sql

        self.database_errors = psycopg.Error
        self.sql, self.table, self.name = sql, sql.Identifier(table), table
        with self._database("connecting"):
            self.connection = psycopg.connect(database_url, autocommit=True)
            self.connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(self.connection)  # numpy arrays in and out as the `vector` type
            row = self.connection.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        self.pgvector = version_tuple(row[0])
        self.halfvec = self.pgvector >= (0, 7)  # halfvec and its HNSW operators came in 0.7

    def close(self) -> None:
        self.connection.close()

    @contextlib.contextmanager
    def _database(self, doing: str) -> Iterator[None]:
        """psycopg's errors as one StoreError line (PostgreSQL's own message), never a traceback."""
        try:
            yield
        except self.database_errors as error:
            diag = getattr(error, "diag", None)
            reason = (diag and diag.message_primary) or str(error).strip().splitlines()[0]
            raise StoreError(f"PostgreSQL, {doing} table {self.name!r}: {reason}") from None

    def exists(self) -> bool:
        # to_regclass reads its argument as SQL would: quoted, so a mixed-case name is not folded.
        with self._database("looking up"):
            quoted = self.table.as_string(self.connection)
            row = self.connection.execute("SELECT to_regclass(%s)", (quoted,)).fetchone()
        return row[0] is not None

    def add(self, texts: Sequence[str], dense: np.ndarray, sparse: list[Sparse] | None) -> None:
        if sparse is not None:
            raise EmbeddingError("PostgreSQL here stores dense vectors only; hybrid search needs Qdrant")
        query, dimensions = self.sql.SQL, dense.shape[1]
        layout = pgvector_layout(dimensions, self.halfvec)
        with self._database("writing to"):
            # Sized to the worker's vectors on the first batch; HNSW with cosine distance, as in Qdrant.
            if not self.exists():
                self.connection.execute(
                    query(
                        "CREATE TABLE IF NOT EXISTS {} "
                        "(id uuid PRIMARY KEY, text text NOT NULL, embedding vector({}) NOT NULL)"
                    ).format(self.table, self.sql.Literal(dimensions))
                )
                print(f"table {self.name!r}: {dimensions} dimensions, {self._layout_note(layout)}", file=sys.stderr)
            if layout != "exact":
                self.connection.execute(
                    query("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (({}) {})").format(
                        self.sql.Identifier(f"{self.name}_embedding_hnsw"),
                        self.table,
                        self._indexed(layout, dimensions, self.sql.Identifier("embedding")),
                        self.sql.SQL(f"{layout}_cosine_ops"),
                    )
                )
            with self.connection.cursor() as cursor:
                cursor.executemany(
                    query(
                        "INSERT INTO {} (id, text, embedding) VALUES (%s, %s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding"
                    ).format(self.table),
                    [(point_id(text), text, vector) for text, vector in zip(texts, dense, strict=True)],
                )

    def search(self, dense: np.ndarray, sparse: Sparse | None, limit: int) -> list[tuple[float, str]]:
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise StoreError(f"limit must be between 1 and {MAX_SEARCH_LIMIT} with PostgreSQL, got {limit}")
        layout = pgvector_layout(len(dense), self.halfvec)
        ordered_by = self._indexed(layout, len(dense), self.sql.Identifier("embedding"))
        probe = self._indexed(layout, len(dense), self.sql.Placeholder())
        # <=> is pgvector's cosine distance; 1 - distance (in full precision) is the cosine similarity
        # Qdrant reports. The order uses the indexed expression, so the HNSW index serves it.
        statement = self.sql.SQL("SELECT 1 - (embedding <=> %s) AS score, text FROM {} ORDER BY {} <=> {} LIMIT %s")
        with self._database("searching"), self.connection.transaction():
            # SET LOCAL: for this transaction only, so the connection's other searches keep theirs.
            ef_search = self.sql.Literal(max(limit, DEFAULT_EF_SEARCH))
            self.connection.execute(self.sql.SQL("SET LOCAL hnsw.ef_search = {}").format(ef_search))
            rows = self.connection.execute(
                statement.format(self.table, ordered_by, probe), (dense, dense, limit)
            ).fetchall()
        return [(float(score), text) for score, text in rows]

    def _indexed(self, layout: Layout, dimensions: int, value: Any) -> Any:
        """`value` as the index holds it: itself, or cast to halfvec(dimensions)."""
        if layout != "halfvec":
            return value
        return self.sql.SQL("{}::halfvec({})").format(value, self.sql.Literal(dimensions))

    def _layout_note(self, layout: Layout) -> str:
        if layout == "vector":
            return "indexed with HNSW"
        if layout == "halfvec":
            return "indexed with HNSW as halfvec (past vector's 2,000-dimension limit)"
        version = ".".join(map(str, self.pgvector))
        return (
            f"searched exactly, without an index: pgvector {version} indexes at most 2,000 dimensions "
            "(0.7 and later index up to 4,000 as halfvec)"
        )


def as_store(store: Store | QdrantClient, collection: str) -> Store:
    return QdrantStore(store, collection) if isinstance(store, QdrantClient) else store


def index(
    client: EmbeddingClient,
    store: Store | QdrantClient,
    collection: str,
    documents: Sequence[str],
    batch_size: int = BATCH,
    sparse_client: EmbeddingClient | None = None,
    concurrency: int = CONCURRENT_REQUESTS,
) -> int:
    """Embed `documents` through the endpoint (and the sparse one, if given) and upsert them into
    `collection`; returns the count. Up to `concurrency` requests are in flight at once; each
    batch is stored as it arrives, in order, so memory stays flat however large the corpus is."""
    store = as_store(store, collection)
    starts = range(0, len(documents), batch_size)

    def embed(start: int) -> tuple[int, np.ndarray, list[Sparse] | None]:
        batch = documents[start : start + batch_size]
        vectors, truncated = client.embed(batch, "document")
        sparse = sparse_client.embed_sparse(batch, "document")[0] if sparse_client else None
        if truncated:
            # The model read only its first max_seq_length tokens of these: split long documents.
            numbers = ", ".join(str(start + index + 1) for index in truncated)
            print(f"warning: documents {numbers} (counting from 1) were truncated by the model", file=sys.stderr)
        return start, vectors, sparse

    for start, vectors, sparse in bounded_map(embed, starts, concurrency):
        store.add(documents[start : start + len(vectors)], vectors, sparse)
    return len(documents)


def search(
    client: EmbeddingClient,
    store: Store | QdrantClient,
    collection: str,
    query: str,
    limit: int = 5,
    sparse_client: EmbeddingClient | None = None,
) -> list[tuple[float, str]]:
    """The `limit` documents closest to `query`, best first, as (score, text): the cosine
    similarity, or with a sparse endpoint the fused score of the dense and sparse rankings."""
    vectors, _ = client.embed([query], "query")
    sparse = sparse_client.embed_sparse([query], "query")[0][0] if sparse_client else None
    return as_store(store, collection).search(vectors[0], sparse, limit)


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------
DEMO_CORPUS = [
    "The Eiffel Tower was completed in 1889 and stands on the Champ de Mars in Paris.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "A sourdough starter is a fermented mix of flour and water that makes bread rise.",
    "The Great Barrier Reef, off the coast of Queensland, is the largest coral reef system on Earth.",
    "Python's asyncio runs many network requests concurrently on a single thread.",
    "Regular aerobic exercise strengthens the heart and lowers blood pressure.",
    "Jupiter is the largest planet in the solar system, a gas giant with dozens of moons.",
    "Central banks raise interest rates to slow inflation, which makes mortgages more expensive.",
    "The violin has four strings tuned in fifths and is played with a bow.",
    "Glaciers carve U-shaped valleys as they slowly flow downhill under their own weight.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "A player is offside when nearer the opponents' goal line than both the ball and the second-last defender.",
]
DEMO_QUERIES = [
    "How do plants make food from light?",
    "What is the biggest planet orbiting the sun?",
    "Which landmark in France was built in the nineteenth century?",
    "Why are cardio workouts good for you?",
]


def print_results(query: str, results: list[tuple[float, str]]) -> None:
    print(f"Query: {query}")
    for rank, (score, text) in enumerate(results, start=1):
        print(f"  {rank}. {score:.3f}  {text}")


def embedding_client(args: argparse.Namespace) -> EmbeddingClient:
    if args.endpoint_url:
        return EmbeddingClient(args.endpoint_url, os.environ.get("RUNPOD_API_KEY"))
    endpoint_id, api_key = os.environ.get("RUNPOD_ENDPOINT_ID"), os.environ.get("RUNPOD_API_KEY")
    if not (endpoint_id and api_key):
        sys.exit("Set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY, or pass --endpoint-url http://localhost:8000")
    return EmbeddingClient.for_endpoint(endpoint_id, api_key)


def sparse_embedding_client(args: argparse.Namespace) -> EmbeddingClient | None:
    """The sparse endpoint (MODEL_KIND=sparse) for hybrid search, when one is given."""
    if args.sparse_endpoint_url:
        return EmbeddingClient(args.sparse_endpoint_url, os.environ.get("RUNPOD_API_KEY"))
    if endpoint_id := os.environ.get("RUNPOD_SPARSE_ENDPOINT_ID"):
        return EmbeddingClient.for_endpoint(endpoint_id, os.environ.get("RUNPOD_API_KEY") or "")
    return None


def open_store(args: argparse.Namespace, collection: str) -> QdrantStore | PgvectorStore:
    """PostgreSQL with pgvector when DATABASE_URL is set, else Qdrant (a server with QDRANT_URL)."""
    if database_url := os.environ.get("DATABASE_URL"):
        return PgvectorStore(database_url, collection)
    return QdrantStore(open_qdrant(args.qdrant_path), collection)


def close_store(store: QdrantStore | PgvectorStore) -> None:
    if isinstance(store, PgvectorStore):
        store.close()
    else:
        store.qdrant.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--endpoint-url", help="a worker's base URL, e.g. the dev server's http://localhost:8000")
    parser.add_argument("--sparse-endpoint-url", help="a sparse worker's base URL (MODEL_KIND=sparse): hybrid search")
    parser.add_argument("--qdrant-path", default="./qdrant-data", help="embedded Qdrant's folder (without QDRANT_URL)")
    parser.add_argument("--collection", help="Qdrant collection or PostgreSQL table (default: documents; demo: demo)")
    commands = parser.add_subparsers(dest="command", required=True)
    index_command = commands.add_parser("index", help="embed and store a file, one document per line")
    index_command.add_argument("file", type=Path)
    search_command = commands.add_parser("search", help="print the documents closest to a query")
    search_command.add_argument("query")
    search_command.add_argument("--limit", type=int, default=5)
    commands.add_parser("demo", help="index a small built-in corpus and run a few queries")
    args = parser.parse_args(argv)
    # The demo gets its own collection, so trying it never mixes its sentences into your data.
    collection = args.collection or ("demo" if args.command == "demo" else "documents")

    client, sparse_client = embedding_client(args), sparse_embedding_client(args)
    store = None
    try:
        store = open_store(args, collection)
        if args.command == "index":
            # Blank lines are skipped: the worker rejects empty texts.
            lines = args.file.read_text(encoding="utf-8").splitlines()
            documents = [line.strip() for line in lines if line.strip()]
            count = index(client, store, collection, documents, sparse_client=sparse_client)
            print(f"Indexed {count} documents into {collection!r}")
        elif args.command == "search":
            if not store.exists():
                sys.exit(f"error: no collection {collection!r} here yet; run `index FILE` first")
            results = search(client, store, collection, args.query, args.limit, sparse_client=sparse_client)
            print_results(args.query, results)
        else:
            index(client, store, collection, DEMO_CORPUS, sparse_client=sparse_client)
            for query in DEMO_QUERIES:
                print_results(query, search(client, store, collection, query, limit=3, sparse_client=sparse_client))
    except (EmbeddingError, StoreError, httpx.HTTPError) as error:
        sys.exit(f"error: {error}")
    finally:
        client.close()
        if sparse_client:
            sparse_client.close()
        if store is not None:
            close_store(store)


if __name__ == "__main__":
    main()
