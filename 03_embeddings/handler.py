"""Text embeddings on Runpod Serverless with sentence-transformers.

One worker serves one embedding model two ways:
  * a native request:  {"input": {"texts": ["...", "..."], "dimensions": 256, "input_type": "query"}}
  * OpenAI's API:      {"input": {"openai_route": "/v1/embeddings", "openai_input": {"input": [...]}}}
    (Runpod sends this shape for https://api.runpod.ai/v2/<endpoint>/openai/v1/embeddings)

The file reads top to bottom: configuration, model load, request schema, inference, response, start.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import runpod
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from sentence_transformers import CrossEncoder, SentenceTransformer, quantize_embeddings

from local_run import for_local_run

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_flag(name: str, default: bool) -> bool:
    return (os.environ.get(name) or str(default)).lower() in ("1", "true", "yes")


# all-MiniLM-L6-v2: the most used sentence-transformers model; 22M parameters and 384 dimensions,
# so it answers in milliseconds on any GPU (and on CPU), a sound default to deploy as is.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_NAME = os.environ.get("MODEL_NAME") or DEFAULT_MODEL  # a Hub id or a local folder
MODEL_REVISION = os.environ.get("MODEL_REVISION") or None  # a commit hash makes deployments reproducible
SERVED_MODEL_NAME = os.environ.get("SERVED_MODEL_NAME") or MODEL_NAME  # the id /v1/models lists
# Some models (Nomic, Jina, GTE-multilingual) ship their own modelling code; run it only when asked.
TRUST_REMOTE_CODE = env_flag("TRUST_REMOTE_CODE", False)

# Jobs one worker takes at once. They queue for the single model thread, so more concurrency
# costs no GPU memory; it keeps validation, tokenisation and network I/O off the critical path.
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 16)
MAX_INPUTS = env_int("MAX_INPUTS", 2048)  # texts per request: OpenAI's own cap
# Characters per text: about 12k tokens, far beyond any model's window (longer inputs are
# truncated anyway); the cap only bounds the memory a single request can make us tokenise.
MAX_INPUT_CHARS = env_int("MAX_INPUT_CHARS", 50_000)
MIN_DIMENSIONS = env_int("MIN_DIMENSIONS", 1)  # OpenAI accepts any positive size; the maximum is the model's own
BATCH_SIZE = env_int("BATCH_SIZE", 64)  # texts per forward pass: short texts fill a 16 GB GPU far beyond this
# Dynamic batching: the texts of jobs that arrive together share forward passes, as Infinity and
# TEI do. The first job of a batch waits BATCH_WAIT_MS for company (far below a network round
# trip); a batch closes early at BATCH_MAX_TEXTS texts, so one huge job cannot hold others back.
DYNAMIC_BATCHING = env_flag("DYNAMIC_BATCHING", True)
BATCH_WAIT_MS = env_float("BATCH_WAIT_MS", 5.0)
BATCH_MAX_TEXTS = env_int("BATCH_MAX_TEXTS", 256)
# Optional second model: a cross-encoder that reranks documents for a query (e.g. BAAI/bge-reranker-base).
RERANK_MODEL_NAME = os.environ.get("RERANK_MODEL_NAME") or None
MAX_RERANK_DOCUMENTS = env_int("MAX_RERANK_DOCUMENTS", 1000)  # a cross-encoder reads every pair: cost grows with each

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"


# ---------------------------------------------------------------------------------------------
# 2. Model load: once per worker, at import, before the first job is taken.
# ---------------------------------------------------------------------------------------------
def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache).

    Only a cache that already has the model is used: a job never downloads into the shared volume.
    """
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32  # fp16 halves memory, same rankings

_load_started = time.perf_counter()
MODEL = SentenceTransformer(
    MODEL_NAME,
    revision=MODEL_REVISION,
    device=DEVICE,
    cache_folder=cached_hub_folder(MODEL_NAME),
    trust_remote_code=TRUST_REMOTE_CODE,
    model_kwargs={"dtype": DTYPE},
)
MODEL.eval()
EMBEDDING_DIM: int = MODEL.get_embedding_dimension()
MAX_SEQ_LENGTH: int = MODEL.get_max_seq_length() or MODEL.tokenizer.model_max_length
PROMPTS: dict[str, str] = dict(MODEL.prompts)  # e.g. {"query": "query: "} for E5-style models
RERANKER = (
    CrossEncoder(
        RERANK_MODEL_NAME,
        device=DEVICE,
        cache_folder=cached_hub_folder(RERANK_MODEL_NAME),
        trust_remote_code=TRUST_REMOTE_CODE,
        model_kwargs={"dtype": DTYPE},
    )
    if RERANK_MODEL_NAME
    else None
)
# int8/uint8 embeddings need one fixed value range per dimension, or vectors from different
# requests could not be compared: it comes from the model's own embeddings of calibration.txt.
CALIBRATION_TEXTS = [line for line in (Path(__file__).parent / "calibration.txt").read_text().splitlines() if line]
with torch.inference_mode():
    CALIBRATION = np.asarray(MODEL.encode(CALIBRATION_TEXTS, batch_size=BATCH_SIZE, show_progress_bar=False))
LOADED_AT = int(time.time())
log.info(
    f"Loaded {MODEL_NAME} on {DEVICE} ({DTYPE}) in {time.perf_counter() - _load_started:.1f}s: "
    f"{EMBEDDING_DIM} dimensions, at most {MAX_SEQ_LENGTH} tokens per input, "
    f"prompts: {sorted(name for name, text in PROMPTS.items() if text) or 'none'}, "
    f"reranker: {RERANK_MODEL_NAME or 'none'}, dynamic batching: {'on' if DYNAMIC_BATCHING else 'off'}"
)

# One thread owns the models: batches queue for it in order, and the event loop stays free to take
# and validate the next jobs while a batch is encoded.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")


# ---------------------------------------------------------------------------------------------
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


Text = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
Dimensions = Annotated[int, Field(ge=MIN_DIMENSIONS, le=EMBEDDING_DIM)]
EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]
# sentence-transformers' quantization: int8/uint8 keep ~99% of retrieval quality in 1/4 of the
# space; binary/ubinary pack 8 dimensions into a byte (1/32 of the space, ~90-95% quality).
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]


def _one_text_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class EmbeddingOptions(BaseModel):
    """Options shared by the native and the OpenAI request."""

    model_config = ConfigDict(strict=True)

    dimensions: Dimensions | None = None  # Matryoshka truncation, then re-normalised
    encoding_format: EncodingFormat = "float"  # base64: little-endian float32 bytes, as OpenAI sends
    input_type: InputType | None = None  # selects the model's "query"/"document" prompt, if it has one
    normalize: bool = True  # unit length, so cosine similarity is a dot product


class EmbedRequest(EmbeddingOptions):
    """The native request: {"texts": "one text" | ["text", ...], ...options}."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt option is an error, not ignored

    texts: Texts
    precision: Precision = "float32"

    @model_validator(mode="after")
    def _whole_bytes(self) -> EmbedRequest:
        size = self.dimensions or EMBEDDING_DIM
        if self.precision in ("binary", "ubinary") and size % 8:
            raise PydanticCustomError(
                "bits", f"{self.precision} packs 8 dimensions per byte; {size} is not a multiple of 8"
            )
        return self

    _wrap = field_validator("texts", mode="before")(_one_text_as_list)


class OpenAIEmbeddingRequest(EmbeddingOptions):
    """OpenAI's embeddings request. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")

    input: Texts
    model: str | None = None  # this endpoint serves one model whatever the name says
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _refuse_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
            raise ValueError("token id arrays are not supported (they belong to OpenAI's tokenizer); send text")
        return _one_text_as_list(value)


class RerankRequest(BaseModel):
    """{"query": ..., "documents": [...], "top_n": k}: the shape Cohere, Jina and TEI rerank with."""

    model_config = ConfigDict(strict=True, extra="ignore")  # "model" and other client fields are harmless

    query: Text
    documents: Annotated[list[Text], Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)]
    top_n: Annotated[int, Field(ge=1)] | None = None  # all documents, best first, when unset
    return_documents: bool = False


OPENAI_EMBEDDINGS_ROUTE = "/v1/embeddings"
OPENAI_MODELS_ROUTE = "/v1/models"
RERANK_ROUTE = "/v1/rerank"
OPENAI_ROUTES = (OPENAI_EMBEDDINGS_ROUTE, OPENAI_MODELS_ROUTE, RERANK_ROUTE)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: "texts.2: String should have at most 50000 characters"."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        location = f"{prefix}.{field}" if prefix and field else prefix or field or "input"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def validated(schema: type[BaseModel], body: dict[str, Any], prefix: str = "") -> BaseModel:
    try:
        return schema.model_validate(body)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error, prefix=prefix)) from None


def parse_request(job_input: Any) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request). Pure: no model, no I/O.

    route is "native", "rerank" (native, with "documents"), or an OpenAI-style route; "/v1/models"
    has no request body.
    """
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" not in job_input:
        if "documents" in job_input:
            return "rerank", validated(RerankRequest, job_input)
        return "native", validated(EmbedRequest, job_input)

    route = job_input["openai_route"]
    if route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    if route == OPENAI_MODELS_ROUTE:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    if route == RERANK_ROUTE:
        return "rerank", validated(RerankRequest, body, prefix="openai_input")
    return route, validated(OpenAIEmbeddingRequest, body, prefix="openai_input")


# ---------------------------------------------------------------------------------------------
# 4. Inference: on the model thread, with the texts of concurrent jobs merged into batches.
# ---------------------------------------------------------------------------------------------
def token_counts(texts: list[str], prompt: str) -> list[int]:
    """Tokens per text as the model's tokenizer counts them, prompt and special tokens included."""
    encoded = MODEL.tokenizer([prompt + text for text in texts], add_special_tokens=True, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def embed(texts: list[str], input_type: str | None) -> tuple[np.ndarray, list[int]]:
    """Full-size embeddings (float32, as the model gives them) and the untruncated token counts."""
    counts = token_counts(texts, PROMPTS.get(input_type or "", ""))
    encode = {"query": MODEL.encode_query, "document": MODEL.encode_document}.get(input_type or "", MODEL.encode)
    with torch.inference_mode():
        vectors = encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32), counts


Embedded = tuple[np.ndarray, list[int]]


def embed_many(jobs: list[tuple[list[str], str | None]]) -> list[Embedded]:
    """Several jobs' texts in as few model calls as there are input types, split back per job."""
    results: list[Embedded | None] = [None] * len(jobs)
    for input_type in {kind for _, kind in jobs}:
        members = [index for index, (_, kind) in enumerate(jobs) if kind == input_type]
        vectors, counts = embed([text for index in members for text in jobs[index][0]], input_type)
        start = 0
        for index in members:
            end = start + len(jobs[index][0])
            results[index] = (vectors[start:end], counts[start:end])
            start = end
    return results


@dataclass
class Waiting:
    texts: list[str]
    input_type: str | None
    result: asyncio.Future[Embedded]


class DynamicBatcher:
    """Collects the texts of concurrent jobs and encodes them together.

    A batch starts with the first waiting job and closes after `wait_s` or at `max_texts` texts;
    jobs that arrive while a batch is encoding form the next one. Results are split back per job,
    and a batch that fails fails each of its jobs.
    """

    def __init__(self, max_texts: int, wait_s: float) -> None:
        self.max_texts, self.wait_s = max_texts, wait_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[Waiting] | None = None
        self.collector: asyncio.Task[None] | None = None
        self.batches = 0  # model calls made, for the logs and the tests

    async def embed(self, texts: list[str], input_type: str | None) -> Embedded:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # one collector per event loop (Runpod runs one for the worker's life)
            self.loop, self.queue = loop, asyncio.Queue()
            self.collector = loop.create_task(self._collect(self.queue))  # held: a loop keeps only weak refs
        waiting = Waiting(texts, input_type, loop.create_future())
        self.queue.put_nowait(waiting)
        return await waiting.result

    async def _collect(self, queue: asyncio.Queue[Waiting]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            size, deadline = len(batch[0].texts), loop.time() + self.wait_s
            while size < self.max_texts:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
                size += len(batch[-1].texts)
            jobs = [(waiting.texts, waiting.input_type) for waiting in batch]
            self.batches += 1
            try:
                results = await loop.run_in_executor(MODEL_THREAD, embed_many, jobs)
            except Exception as error:  # noqa: BLE001 - every job of the batch gets the failure
                for waiting in batch:
                    if not waiting.result.done():
                        waiting.result.set_exception(error)
                continue
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.result.done():  # a cancelled job no longer waits
                    waiting.result.set_result(result)


BATCHER = DynamicBatcher(BATCH_MAX_TEXTS, BATCH_WAIT_MS / 1000)


async def embed_texts(texts: list[str], input_type: str | None) -> Embedded:
    if DYNAMIC_BATCHING:
        return await BATCHER.embed(texts, input_type)
    return await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, embed, texts, input_type)


def rerank(request: RerankRequest) -> list[dict[str, Any]]:
    """Every (query, document) pair through the cross-encoder, best first."""
    with torch.inference_mode():
        ranked = RERANKER.rank(
            request.query,
            request.documents,
            top_k=request.top_n,
            return_documents=request.return_documents,
            batch_size=BATCH_SIZE,
            show_progress_bar=False,
        )
    results = []
    for item in ranked:
        result = {"index": int(item["corpus_id"]), "relevance_score": float(item["score"])}
        if request.return_documents:
            result["document"] = item["text"]
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# 5. Response: pure functions, plain JSON only (the SDK silently drops anything json can't encode).
# ---------------------------------------------------------------------------------------------
def shape_embeddings(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka-truncate to `dimensions`, then scale each row to unit length if asked."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return vectors.astype(np.float32, copy=False)


def quantize(vectors: np.ndarray, precision: str, dimensions: int | None, normalize: bool) -> np.ndarray:
    """sentence-transformers' quantization, with int8/uint8 ranges from the calibration embeddings
    shaped exactly like the request's, so every request of the same shape shares one scale."""
    if precision == "float32":
        return vectors
    calibration = shape_embeddings(CALIBRATION, dimensions, normalize)
    return quantize_embeddings(vectors, precision=precision, calibration_embeddings=calibration)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    """A JSON value for one embedding: a list of numbers, or base64 of its bytes (little-endian
    float32 for floats, one byte per value for the quantized precisions)."""
    if encoding_format == "base64":
        raw = vector.astype("<f4") if vector.dtype.kind == "f" else vector
        return base64.b64encode(raw.tobytes()).decode("ascii")
    return vector.tolist()  # plain Python numbers: json.dumps cannot encode numpy values


def usage(counts: list[int]) -> dict[str, int]:
    """Tokens the model actually read: inputs past MAX_SEQ_LENGTH count only up to it."""
    tokens = sum(min(count, MAX_SEQ_LENGTH) for count in counts)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def truncated_indices(counts: list[int]) -> list[int]:
    return [index for index, count in enumerate(counts) if count > MAX_SEQ_LENGTH]


def native_response(vectors: np.ndarray, counts: list[int], request: EmbedRequest) -> dict[str, Any]:
    dimensions = int(vectors.shape[1])
    vectors = quantize(vectors, request.precision, request.dimensions, request.normalize)
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


def rerank_response(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": RERANK_MODEL_NAME, "results": results}


def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate, embed off the event loop, shape; every failure is a clean error.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> dict[str, Any]:
    job_id = job.get("id")
    started = time.perf_counter()
    texts: list[str] = []
    try:
        route, request = parse_request(job.get("input"))
        if route == OPENAI_MODELS_ROUTE:
            return models_response()
        if route == "rerank":
            if RERANKER is None:
                raise RequestError("reranking needs a cross-encoder: set RERANK_MODEL_NAME on the endpoint")
            results = await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, rerank, request)
            log.info(
                f"Reranked {len(request.documents)} documents in {(time.perf_counter() - started) * 1000:.0f} ms",
                job_id,
            )
            return rerank_response(results)
        texts = request.texts if isinstance(request, EmbedRequest) else request.input
        vectors, counts = await embed_texts(texts, request.input_type)
    except RequestError as error:
        log.warn(f"Rejected request: {error}", job_id)
        return {"error": str(error)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the memory back so the next job can run
        log.error(f"Out of GPU memory on {len(texts)} inputs", job_id)
        return {"error": "out of GPU memory for this batch; send fewer or shorter texts, or lower BATCH_MAX_TEXTS"}
    except torch.AcceleratorError:
        # The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers.
        log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
        return {"error": "the GPU failed while embedding; retry the request", "refresh_worker": True}
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        log.error(f"Embedding failed: {type(error).__name__}: {error}", job_id)
        return {"error": "embedding failed inside the worker; see the worker logs"}

    vectors = shape_embeddings(vectors, request.dimensions, request.normalize)
    log.info(
        f"Embedded {len(texts)} inputs ({usage(counts)['prompt_tokens']} tokens, "
        f"{len(truncated_indices(counts))} truncated) in {(time.perf_counter() - started) * 1000:.0f} ms",
        job_id,
    )
    if isinstance(request, EmbedRequest):
        return native_response(vectors, counts, request)
    return openai_response(vectors, counts, request)


WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
