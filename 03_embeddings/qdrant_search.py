"""Semantic search with this worker and Qdrant: embed a corpus through the endpoint, store the
vectors in Qdrant, and answer queries.

The script talks to the worker over HTTP, exactly as any client would, either
  * a Runpod endpoint: set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY, or
  * the local dev server (`python handler.py --rp_serve_api`): pass --endpoint-url http://localhost:8000.

Qdrant runs embedded by default: qdrant-client's local mode keeps the collection in a folder
(--qdrant-path, ./qdrant-data), with nothing to install or start. When the data outgrows one
machine, set QDRANT_URL (and QDRANT_API_KEY) to use a Qdrant server or Qdrant Cloud instead; the
code is the same.

Usage (pip install qdrant-client httpx numpy):
    python qdrant_search.py --endpoint-url http://localhost:8000 demo
    python qdrant_search.py index corpus.txt              # one document per line
    python qdrant_search.py search "how do plants make food?" --limit 3

It imports nothing from handler.py: copy it anywhere.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from qdrant_client import QdrantClient
from qdrant_client.models import Distance, PointStruct, VectorParams

# Texts per request. 64 is the worker's default BATCH_SIZE (one forward pass per request), and
# keeps a request of long documents (64 × 50,000 characters at most) far below /runsync's 20 MB
# payload limit. One request per document would pay the HTTP and queue overhead n times.
BATCH = 64

# /runsync holds the connection up to 90 s by default; allow a little more before giving up.
HTTP_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
# A job still queued or running after /runsync's wait (a cold start) is polled up to this long.
JOB_TIMEOUT_S = 600.0
# Transient answers worth one more try: rate limited, or the gateway briefly unavailable.
RETRY_STATUS = {429, 502, 503, 504}
RETRIES = 3

RUNPOD_API = "https://api.runpod.ai/v2"
InputType = Literal["query", "document"]


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

    def embed_batches(
        self, texts: Sequence[str], input_type: InputType, batch_size: int = BATCH
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Embed `texts` batch_size at a time, yielding (offset of the batch, its vectors)."""
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            vectors, truncated = self.embed(batch, input_type)
            if truncated:
                # The model read only its first max_seq_length tokens of these: split long documents.
                numbers = ", ".join(str(start + index + 1) for index in truncated)
                print(f"warning: documents {numbers} (counting from 1) were truncated by the model", file=sys.stderr)
            yield start, vectors

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


# ---------------------------------------------------------------------------------------------
# Qdrant: one collection, one point per document, the text itself as the payload.
# ---------------------------------------------------------------------------------------------
def open_qdrant(path: str | Path) -> QdrantClient:
    """A Qdrant server when QDRANT_URL is set, else an embedded Qdrant in the folder `path`."""
    if url := os.environ.get("QDRANT_URL"):
        return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)
    # Local mode: the same API, stored on disk, for one process at a time (it locks the folder).
    return QdrantClient(path=str(path))


def point_id(text: str) -> str:
    # The id derives from the text, so indexing the same document again updates its point
    # instead of adding a duplicate: re-running `index` on a grown file is safe.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, text))


def index(
    client: EmbeddingClient,
    qdrant: QdrantClient,
    collection: str,
    documents: Sequence[str],
    batch_size: int = BATCH,
) -> int:
    """Embed `documents` through the endpoint and upsert them into `collection`; returns the count.

    The collection is created on the first batch, sized to the vectors the worker returns, so
    the script works with whichever model the endpoint serves.
    """
    for start, vectors in client.embed_batches(documents, "document", batch_size):
        if not qdrant.collection_exists(collection):
            # Cosine: the worker returns unit vectors, for which cosine and dot product agree.
            qdrant.create_collection(
                collection, vectors_config=VectorParams(size=vectors.shape[1], distance=Distance.COSINE)
            )
        texts = documents[start : start + len(vectors)]
        points = [
            PointStruct(id=point_id(text), vector=vector.tolist(), payload={"text": text})
            for text, vector in zip(texts, vectors, strict=True)
        ]
        # Upsert each batch as it arrives: memory stays flat however large the corpus is.
        qdrant.upsert(collection, points=points)
    return len(documents)


def search(
    client: EmbeddingClient, qdrant: QdrantClient, collection: str, query: str, limit: int = 5
) -> list[tuple[float, str]]:
    """The `limit` documents closest to `query`, best first, as (cosine similarity, text)."""
    vectors, _ = client.embed([query], "query")
    hits = qdrant.query_points(collection, query=vectors[0].tolist(), limit=limit, with_payload=True).points
    return [(hit.score, hit.payload["text"]) for hit in hits]


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--endpoint-url", help="a worker's base URL, e.g. the dev server's http://localhost:8000")
    parser.add_argument("--qdrant-path", default="./qdrant-data", help="embedded Qdrant's folder (without QDRANT_URL)")
    parser.add_argument("--collection", help="Qdrant collection (default: documents; demo: demo)")
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

    client, qdrant = embedding_client(args), open_qdrant(args.qdrant_path)
    try:
        if args.command == "index":
            # Blank lines are skipped: the worker rejects empty texts.
            lines = args.file.read_text(encoding="utf-8").splitlines()
            count = index(client, qdrant, collection, [line.strip() for line in lines if line.strip()])
            print(f"Indexed {count} documents into {collection!r}")
        elif args.command == "search":
            if not qdrant.collection_exists(collection):
                sys.exit(f"error: no collection {collection!r} here yet; run `index FILE` first")
            print_results(args.query, search(client, qdrant, collection, args.query, args.limit))
        else:
            index(client, qdrant, collection, DEMO_CORPUS)
            for query in DEMO_QUERIES:
                print_results(query, search(client, qdrant, collection, query, limit=3))
    except (EmbeddingError, httpx.HTTPError) as error:
        sys.exit(f"error: {error}")
    finally:
        client.close()
        qdrant.close()


if __name__ == "__main__":
    main()
