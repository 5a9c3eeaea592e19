"""Text embeddings on Runpod Serverless with sentence-transformers.

One worker serves one embedding model two ways:
  * a native request:  {"input": {"texts": ["...", "..."], "dimensions": 256, "input_type": "query"}}
  * OpenAI's API:      {"input": {"openai_route": "/v1/embeddings", "openai_input": {"input": [...]}}}
    (Runpod sends this shape for https://api.runpod.ai/v2/<endpoint>/openai/v1/embeddings)
With MODEL_KIND=sparse it serves a SPLADE model instead: {"indices", "values"} per text (sparse.py).

The file reads top to bottom: configuration, model load, request, inference, response, start.
What each step leans on lives in a file of its own beside it, one job per file (README.md lists them).
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hub_cache  # first, before every library: settles the Hugging Face cache (hub_cache.py)

import device  # then the CUDA contract: DEVICE, or the worker stops here (device.py)

import numpy as np
import runpod
import torch
from pydantic import BaseModel
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

import schema
from batcher import TokenBudgetBatcher
from cold_start import COLD_START
from dense import encode_vector, quantize, shape_embeddings
from encoder import CUT_RIGHT, Cut, Encoder, ToEncode, Tokenized, tokenize_within
from errors import (
    BAD_REQUEST,
    INTERNAL,
    UNAVAILABLE,
    RequestError,
    error_shape,
    failed,
    gpu_lost,
    out_of_memory,
    rejected,
)
from loading import cached_hub_folder, model_options, model_source, openvino_precision
from local_run import for_local_run
from rerank import Reranker, check_rerank_budget, rerank, rerank_response
from result_size import (
    MAX_JSON_BYTES_PER_FLOAT,
    RESULT_OVERHEAD_BYTES,
    check_result_budget,
    dense_result_bytes,
    measured,
)
from schema import (
    OPENAI_MODELS_ROUTE,
    EmbedRequest,
    OpenAIEmbeddingRequest,
    RequestLimits,
    SparseEmbedRequest,
)
from settings import env_flag, env_int
from sparse import SparseVector, sparse_json, sparse_result_ceiling, top_terms
from token_ids import decode_token_ids

# Re-exported (an `as` alias says so): tests reach it as this module's attribute.
from schema import rerank_shape as rerank_shape  # isort: skip

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
# settings.py reads each variable (env_int, env_str, ...): unset or empty, it is the default.

# all-MiniLM-L6-v2: the most used sentence-transformers model; 22M parameters and 384 dimensions,
# so it answers in milliseconds on any GPU (and on CPU), a sound default to deploy as is.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_NAME = os.environ.get("MODEL_NAME") or DEFAULT_MODEL  # a Hub id or a local folder
MODEL_REVISION = os.environ.get("MODEL_REVISION") or None  # a commit hash makes deployments reproducible
SERVED_MODEL_NAME = os.environ.get("SERVED_MODEL_NAME") or MODEL_NAME  # the id /v1/models lists
# Some models (Nomic, Jina, GTE-multilingual) ship their own modelling code; run it only when asked.
TRUST_REMOTE_CODE = env_flag("TRUST_REMOTE_CODE", False)
# dense: a SentenceTransformer, one vector per text (the default, what OpenAI's API carries).
# sparse: a SparseEncoder (SPLADE: naver/splade-v3, opensearch-neural-sparse...), one weight per
# vocabulary term, nearly all zero: lexical search that knows synonyms, and hybrid search beside a dense model.
MODEL_KINDS = ("dense", "sparse")
MODEL_KIND = os.environ.get("MODEL_KIND") or "dense"
if MODEL_KIND not in MODEL_KINDS:
    raise SystemExit(f"MODEL_KIND must be one of {', '.join(MODEL_KINDS)}, got {MODEL_KIND!r}")
SPARSE = MODEL_KIND == "sparse"
# The runtime behind sentence-transformers (its `backend`). torch: GPUs, and the reference.
# openvino: Intel's CPU runtime (optimum-intel), for CPU endpoints: Dockerfile.openvino's image,
# whose own package set it needs (optimum-intel 2.2 requires transformers < 5.6); how it compares
# with torch on a CPU is in benchmarks/README.md. onnx: sentence-transformers' ONNX Runtime backend,
# which no image here can ship yet: optimum-onnx 0.1.0, the latest, requires transformers < 4.58.
BACKENDS = ("torch", "openvino", "onnx")
BACKEND = (os.environ.get("BACKEND") or "torch").lower()
if BACKEND not in BACKENDS:
    raise SystemExit(f"BACKEND must be one of {', '.join(BACKENDS)}, got {BACKEND!r}")
# The export to load, e.g. openvino/openvino_model_qint8_quantized.xml (an int8 variant many repos
# ship). Unset: the repo's plain export (openvino/openvino_model.xml); a model with none is exported
# from its PyTorch weights at every start (seconds for MiniLM: save_pretrained the export to skip that).
BACKEND_FILE = os.environ.get("BACKEND_FILE") or None
# The precision OpenVINO computes in (its INFERENCE_PRECISION_HINT). f32, the default: the vectors
# equal torch's. bf16: faster on CPUs with AMX or AVX512-BF16 (Xeon since Sapphire Rapids, EPYC since
# Genoa), the vectors a little off (measured in README: CPU endpoints). Unasked, OpenVINO picks bf16
# on such CPUs and f32 on others: one image would answer differently on different hosts. Asked for
# bf16, a CPU without AVX-512 runs f32 (one without AVX512-BF16 emulates bf16, slowly): the start
# log says which precision runs.
OPENVINO_PRECISIONS = ("f32", "bf16")
OPENVINO_PRECISION = (os.environ.get("OPENVINO_PRECISION") or "f32").lower()
if OPENVINO_PRECISION not in OPENVINO_PRECISIONS:
    raise SystemExit(f"OPENVINO_PRECISION must be one of {', '.join(OPENVINO_PRECISIONS)}, got {OPENVINO_PRECISION!r}")
if BACKEND != "torch" and device.DEVICE == "cuda":
    raise SystemExit(f"BACKEND={BACKEND} runs on the CPU here: set DEVICE=cpu, or BACKEND=torch on a GPU")

# Jobs one worker takes at once. They wait for the single model thread as texts in one queue, so
# more concurrency costs no GPU memory; it is what lets batches fill: the SDK never holds more than
# MAX_CONCURRENCY jobs, so a batch of one-text queries can never hold more texts than this.
# worker-infinity-embedding's default, 300, keeps a GPU busy with one-line queries.
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 300)
MAX_INPUTS = env_int("MAX_INPUTS", 2048)  # texts per request: OpenAI's own cap
# Characters per text: about 12k tokens, far beyond any model's window (longer inputs are
# truncated anyway); the cap only bounds the memory a single request can make us tokenise.
MAX_INPUT_CHARS = env_int("MAX_INPUT_CHARS", 50_000)
MIN_DIMENSIONS = env_int("MIN_DIMENSIONS", 1)  # OpenAI accepts any positive size; the maximum is the model's own
# Pairs per cross-encoder pass in a rerank batch (cut by MAX_BATCH_TOKENS/TEXTS), texts per calibration pass.
BATCH_SIZE = env_int("BATCH_SIZE", 64)
# Dynamic batching (batcher.py): the texts of all waiting jobs share forward passes, as TEI and
# Infinity do. A batch holds texts of similar length, at most MAX_BATCH_TOKENS once padded
# (texts × the longest): on a GPU TEI's default, 16,384, which fits a 16 GB GPU with a
# 600M-parameter model at 8,192-token inputs (memory grows with it: lower it for long inputs on
# small GPUs). MAX_BATCH_TEXTS caps the count when texts are short (one-line queries): past a
# few hundred a bigger batch no longer speeds a GPU up, it only delays the jobs in it. A CPU is
# the opposite: it is fastest on small batches (measured with all-MiniLM-L6-v2 on 2 cores: 32
# one-line texts or ~2k padded tokens per pass; 256 texts per pass took twice as long).
# A SPLADE model holds a score per vocabulary term for every token (16,384 × 30,522 in fp16 is
# 1 GB): the same budget fits a 16 GB GPU.
ON_GPU = device.DEVICE == "cuda"
DYNAMIC_BATCHING = env_flag("DYNAMIC_BATCHING", True)
MAX_BATCH_TOKENS = env_int("MAX_BATCH_TOKENS", 16_384 if ON_GPU else 2_048)
MAX_BATCH_TEXTS = env_int("MAX_BATCH_TEXTS", 256 if ON_GPU else 32)
# Runpod refuses results over 20 MB on /runsync (and /run's /status): a request whose answer would
# certainly be larger is refused before any work, with the ways out named.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
# Optional second model: a cross-encoder that reranks documents for a query (e.g. BAAI/bge-reranker-base).
RERANK_MODEL_NAME = os.environ.get("RERANK_MODEL_NAME") or None
MAX_RERANK_DOCUMENTS = env_int("MAX_RERANK_DOCUMENTS", 1000)  # a cross-encoder reads every pair: cost grows with each


# ---------------------------------------------------------------------------------------------
# 2. Model load: once per worker, at import, before the first job is taken (loading.py says
#    where from, and with which runtime's options).
# ---------------------------------------------------------------------------------------------
DEVICE = device.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see device.py
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32  # fp16 halves memory, same rankings

COLD_START.done("imports")  # the download is timed apart from the load
hub_cache.prefetch(
    MODEL_NAME,
    RERANK_MODEL_NAME,
    revision=MODEL_REVISION,
    remote_code=TRUST_REMOTE_CODE,
    runtime_file=hub_cache.backend_file(os.environ),
)
COLD_START.done("download")
_load_started = time.perf_counter()
_source = model_source(MODEL_NAME, MODEL_REVISION, BACKEND)
MODEL = (SparseEncoder if SPARSE else SentenceTransformer)(
    _source,
    revision=MODEL_REVISION,
    device=DEVICE,
    cache_folder=cached_hub_folder(MODEL_NAME),
    trust_remote_code=TRUST_REMOTE_CODE,
    backend=BACKEND,
    model_kwargs=model_options(BACKEND, _source, BACKEND_FILE, DTYPE, OPENVINO_PRECISION),
)
MODEL.eval()
EMBEDDING_DIM: int = MODEL.get_embedding_dimension()  # sparse: the vocabulary size
# sparse: the most active terms a vector keeps when the request does not say (the model's own setting, often none).
DEFAULT_MAX_ACTIVE_DIMS: int | None = getattr(MODEL, "max_active_dims", None)
MAX_SEQ_LENGTH: int = MODEL.get_max_seq_length() or MODEL.tokenizer.model_max_length
PROMPTS: dict[str, str] = dict(MODEL.prompts)  # e.g. {"query": "query: "} for E5-style models
DEFAULT_PROMPT = PROMPTS.get(MODEL.default_prompt_name or "", "")  # what the model applies when asked for none
# How a batch runs through the model (encoder.py): its modules but a final Normalize, which the
# response step applies per request, so `normalize: false` gets the model's raw vectors.
ENCODER = Encoder(MODEL, sparse=SPARSE)
RERANKER = (
    CrossEncoder(
        _rerank_source := model_source(RERANK_MODEL_NAME, None, BACKEND),
        device=DEVICE,
        cache_folder=cached_hub_folder(RERANK_MODEL_NAME),
        trust_remote_code=TRUST_REMOTE_CODE,
        backend=BACKEND,  # BACKEND_FILE names the embedding model's export; the reranker's is looked for or made
        model_kwargs=model_options(BACKEND, _rerank_source, None, DTYPE, OPENVINO_PRECISION),
    )
    if RERANK_MODEL_NAME
    else None
)
RERANKING = Reranker(RERANKER, BATCH_SIZE) if RERANKER is not None else None  # its pairs join the batcher
LOADED_AT = int(time.time())
RUNS_IN = str(DTYPE) if BACKEND == "torch" else BACKEND  # what the model computes in, for the log
if BACKEND == "openvino":  # OPENVINO_PRECISION, unless the CPU cannot run it
    RUNS_IN = f"openvino {openvino_precision(MODEL, OPENVINO_PRECISION)}"
log.info(
    f"Loaded {MODEL_KIND} {MODEL_NAME} on {DEVICE} ({RUNS_IN}) "
    f"in {time.perf_counter() - _load_started:.1f}s: "
    f"{EMBEDDING_DIM} dimensions, at most {MAX_SEQ_LENGTH} tokens per input, "
    f"prompts: {sorted(name for name, text in PROMPTS.items() if text) or 'none'}, "
    f"reranker: {RERANK_MODEL_NAME or 'none'}, dynamic batching: {'on' if DYNAMIC_BATCHING else 'off'} "
    f"({MAX_BATCH_TOKENS} padded tokens, {MAX_BATCH_TEXTS} texts per batch)"
)

# One thread owns the models: batches queue for it in order, and the event loop stays free to take
# and validate the next jobs while a batch is encoded. Tokenising has a thread of its own, so a
# request's texts are tokenised while the model encodes someone else's.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
TOKENIZE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
# ... with a tokenizer of its own: a fast tokenizer keeps its padding and truncation settings in
# state each call rewrites, so counting here while sentence-transformers' preprocessing pads and
# truncates on the model thread left that batch unpadded, and its jobs failed.
TOKENIZER = copy.deepcopy(MODEL.tokenizer)
# A job with at most this many characters is tokenized on the event loop (~0.1 ms for a one-line
# query, measured) instead of on TOKENIZE_THREAD: the hop there and back costs more than that, and
# under a burst of one-line queries the two threads' GIL hand-offs stall the loop. Beyond it, a
# big job's tokenization (milliseconds to seconds) must not block the loop. The loop has its own
# tokenizer too, for the same reason as above: the tokenize thread may be cutting a big job.
INLINE_TOKENIZE_CHARS = 2_000
LOOP_TOKENIZER = copy.deepcopy(MODEL.tokenizer)


# ---------------------------------------------------------------------------------------------
# 3. Request: schema.py holds the pydantic models, the single source of truth for names, defaults
#    and limits; this endpoint's settings and its model's bounds reach them as the validation context.
# ---------------------------------------------------------------------------------------------
# EmbedRequest (native), SparseEmbedRequest (MODEL_KIND=sparse), OpenAIEmbeddingRequest and
# RerankRequest are strict: "dimensions": "8" is an error, not coerced. A native request refuses
# unknown fields (a misspelt `normalise`); OpenAI's ignores them, as OpenAI-compatible servers do.
REQUEST_LIMITS = RequestLimits(
    max_inputs=MAX_INPUTS,
    max_input_chars=MAX_INPUT_CHARS,
    min_dimensions=MIN_DIMENSIONS,
    max_rerank_documents=MAX_RERANK_DOCUMENTS,
    dimensions=EMBEDDING_DIM,
    prompts=PROMPTS,
    default_prompt=DEFAULT_PROMPT,
    raw_vectors=ENCODER.raw_vectors,
    default_max_active_dims=DEFAULT_MAX_ACTIVE_DIMS,
    sparse=SPARSE,
)


def parse_request(job_input: Any) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request) within this endpoint's limits. No I/O.
    route is "native", "rerank", or an OpenAI route; "/v1/models" has no request body."""
    return schema.parse_request(job_input, REQUEST_LIMITS)


# ---------------------------------------------------------------------------------------------
# 4. Inference: on the model thread, with the texts of concurrent jobs merged into batches.
# ---------------------------------------------------------------------------------------------
def tokenize(texts: list[str], prompt: str, tokenizer: Any = TOKENIZER, cut: Cut = CUT_RIGHT) -> Tokenized:
    """`prompt + text` through the calling thread's own tokenizer: the token counts, and the token
    ids the model reads, cut at MAX_SEQ_LENGTH as `cut` says (encoder.tokenize_within)."""
    return tokenize_within(texts, prompt, tokenizer, MAX_SEQ_LENGTH, cut)


# Dynamic batching (batcher.py): every text of every job queues for the model thread as an item of
# its own; a batch that fails is split and retried, after the GPU memory is given back (encoder.py).
BATCHER = ENCODER.batcher(MODEL_THREAD, MAX_BATCH_TOKENS, MAX_BATCH_TEXTS)
Embedded = tuple[list[np.ndarray] | list[SparseVector], list[int]]


async def embed_texts(texts: list[str], prompt: str, task: str | None, cut: Cut = CUT_RIGHT) -> Embedded:
    """Tokenise once (on the event loop if small, else on the tokenize thread), then encode
    through the batcher: per text, the full-size float32 vector as the model gives it (before any
    final Normalize) or its sparse active terms, and the untruncated token counts."""
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        tokens = tokenize(texts, prompt, LOOP_TOKENIZER, cut)  # cheaper than the thread hop
    else:
        tokens = await asyncio.get_running_loop().run_in_executor(
            TOKENIZE_THREAD, tokenize, texts, prompt, TOKENIZER, cut
        )
    items = [ToEncode(encoding, text, prompt, task) for encoding, text in zip(tokens.encodings, texts, strict=True)]
    lengths = [min(count, MAX_SEQ_LENGTH) for count in tokens.counts]
    vectors = await job_batcher().submit(items, lengths, ENCODER.group(prompt, task))
    return vectors, tokens.counts


def job_batcher() -> TokenBudgetBatcher:
    """BATCHER; without dynamic batching, one of the job's own (same budgets and thread, never shared)."""
    return BATCHER if DYNAMIC_BATCHING else ENCODER.batcher(MODEL_THREAD, MAX_BATCH_TOKENS, MAX_BATCH_TEXTS)


def embed_now(texts: list[str], prompt: str = "", task: str | None = None) -> list[np.ndarray] | list[SparseVector]:
    """The same path, synchronously, for use at load time (before any event loop runs)."""
    tokens = tokenize(texts, prompt)
    items = [ToEncode(encoding, text, prompt, task) for encoding, text in zip(tokens.encodings, texts, strict=True)]
    batches = [items[start : start + BATCH_SIZE] for start in range(0, len(items), BATCH_SIZE)]
    return [vector for batch in batches for vector in ENCODER.encode(batch)]


# int8/uint8 embeddings need one fixed value range per dimension, or vectors from different
# requests could not be compared: it comes from the model's own embeddings of calibration.txt
# (raw, like every request's, so each request shapes them exactly as its own vectors). A sparse
# model has no quantized precisions: the same texts only warm it up.
COLD_START.done(f"load to {DEVICE}")
CALIBRATION_TEXTS = [line for line in (Path(__file__).parent / "calibration.txt").read_text().splitlines() if line]
WARM_UP = embed_now(CALIBRATION_TEXTS)
CALIBRATION = None if SPARSE else np.stack(WARM_UP)
COLD_START.report("warm-up")  # the calibration texts were the first forward passes


# ---------------------------------------------------------------------------------------------
# 5. Response: pure functions, plain JSON only (the SDK silently drops anything json can't encode).
#    dense.py and sparse.py turn vectors into JSON values, result_size.py sizes the result, and
#    rerank.py shapes a ranking.
# ---------------------------------------------------------------------------------------------
def usage(counts: list[int]) -> dict[str, int]:
    """Tokens the model actually read: inputs past MAX_SEQ_LENGTH count only up to it."""
    tokens = sum(min(count, MAX_SEQ_LENGTH) for count in counts)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def truncated_indices(counts: list[int]) -> list[int]:
    return [index for index, count in enumerate(counts) if count > MAX_SEQ_LENGTH]


def native_response(vectors: np.ndarray, counts: list[int], request: EmbedRequest) -> dict[str, Any]:
    dimensions = int(vectors.shape[1])
    vectors = quantize(vectors, request.precision, CALIBRATION, request.dimensions, request.normalize)
    return {
        "model": SERVED_MODEL_NAME,
        "embeddings": [encode_vector(vector, request.encoding_format) for vector in vectors],
        "dimensions": dimensions,  # of the embedding; binary precisions pack 8 of them per value
        "precision": request.precision,
        "encoding_format": request.encoding_format,
        "usage": usage(counts),
        "truncated": truncated_indices(counts),  # inputs cut at MAX_SEQ_LENGTH tokens
    }


def openai_response(vectors: np.ndarray, counts: list[int], request: OpenAIEmbeddingRequest) -> dict[str, Any]:
    response: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, request.encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": SERVED_MODEL_NAME,
        "usage": usage(counts),
    }
    # OpenAI's shape has no field for this; add one only when it has something to say.
    if truncated := truncated_indices(counts):
        response["truncated"] = truncated
    return response


def sparse_response(vectors: list[SparseVector], counts: list[int], request: SparseEmbedRequest) -> dict[str, Any]:
    """The native answer of a sparse model: each text's active terms (at most max_active_dims of them)."""
    vectors = [top_terms(vector, request.max_active_dims) for vector in vectors]
    output = {
        "model": SERVED_MODEL_NAME,
        "embeddings": [sparse_json(vector) for vector in vectors],  # {"indices", "values"} per text
        "dimensions": EMBEDDING_DIM,  # the vocabulary size: every index is below it
        "usage": usage(counts),
        "truncated": truncated_indices(counts),
    }
    return measured(output, sparse_result_ceiling(vectors, RESULT_OVERHEAD_BYTES), MAX_RESULT_BYTES)


def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate, embed off the event loop, shape; every failure is a clean error.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    job_id = job.get("id")
    started = time.perf_counter()
    texts: list[str] = []
    shaped = error_shape(job.get("input"))  # OpenAI routes fail in OpenAI's error shape (errors.py)
    try:
        route, request = parse_request(job.get("input"))
        if route == OPENAI_MODELS_ROUTE:
            return models_response()
        if route == "rerank":
            if RERANKING is None:
                raise RequestError("reranking needs a cross-encoder: set RERANK_MODEL_NAME on the endpoint")
            check_rerank_budget(request, MAX_RESULT_BYTES)  # before the work: with its documents it can be large
            ranked = await rerank(RERANKING, request, job_batcher(), TOKENIZE_THREAD)  # in the batcher's batches
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.info(f"Reranked {len(request.documents)} documents in {elapsed_ms:.0f} ms", job_id)
            return shaped(rerank_response(ranked, request, RERANK_MODEL_NAME, MAX_RESULT_BYTES), BAD_REQUEST)
        texts = request.input if isinstance(request, OpenAIEmbeddingRequest) else request.texts
        if not SPARSE:  # a sparse result's size is known only once its active terms are
            check_result_budget(len(texts), request, EMBEDDING_DIM, MAX_RESULT_BYTES)
        if isinstance(texts[0], list):  # OpenAI token-id arrays (LangChain's default): back to text
            texts = await asyncio.get_running_loop().run_in_executor(TOKENIZE_THREAD, decode_token_ids, texts)
        cut = Cut(request.truncation_direction, None if request.truncate else request.input_field)
        vectors, counts = await embed_texts(texts, request.resolved_prompt(REQUEST_LIMITS), request.input_type, cut)
    except RequestError as error:
        return shaped(rejected(error, job_id), BAD_REQUEST)
    except torch.cuda.OutOfMemoryError:  # the batcher already freed the cache and retried, down to one text
        oom = f"Out of GPU memory on a text of a request of {len(texts)} inputs"
        why = "out of GPU memory on a text of this request even in a batch of its own; send shorter texts, or lower"
        return shaped(out_of_memory(oom, why + " MAX_BATCH_TOKENS", job_id, free_cache=False), INTERNAL)
    except torch.AcceleratorError:  # the GPU is lost: refresh_worker in the result retires this worker
        return shaped(gpu_lost("the GPU failed while embedding; retry the request", job_id), UNAVAILABLE)
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        message = "embedding failed inside the worker; see the worker logs"
        return shaped(failed("Embedding", error, message, job_id), INTERNAL)

    log.info(
        f"Embedded {len(texts)} inputs ({usage(counts)['prompt_tokens']} tokens, "
        f"{len(truncated_indices(counts))} truncated) in {(time.perf_counter() - started) * 1000:.0f} ms",
        job_id,
    )
    if isinstance(request, SparseEmbedRequest):
        return sparse_response(vectors, counts, request)
    vectors = shape_embeddings(np.stack(vectors), request.dimensions, request.normalize)
    ceiling = dense_result_bytes(len(texts), request, EMBEDDING_DIM, MAX_JSON_BYTES_PER_FLOAT)
    if isinstance(request, EmbedRequest):
        return measured(native_response(vectors, counts, request), ceiling, MAX_RESULT_BYTES)
    return shaped(measured(openai_response(vectors, counts, request), ceiling, MAX_RESULT_BYTES), BAD_REQUEST)


WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
