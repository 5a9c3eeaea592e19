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
from typing import Annotated, Any, Literal

import numpy as np
import runpod
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sentence_transformers import SentenceTransformer

from local_run import for_local_run

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


# all-MiniLM-L6-v2: the most used sentence-transformers model; 22M parameters and 384 dimensions,
# so it answers in milliseconds on any GPU (and on CPU), a sound default to deploy as is.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_NAME = os.environ.get("MODEL_NAME") or DEFAULT_MODEL  # a Hub id or a local folder
MODEL_REVISION = os.environ.get("MODEL_REVISION") or None  # a commit hash makes deployments reproducible
SERVED_MODEL_NAME = os.environ.get("SERVED_MODEL_NAME") or MODEL_NAME  # the id /v1/models lists
# Some models (Nomic, Jina, GTE-multilingual) ship their own modelling code; run it only when asked.
TRUST_REMOTE_CODE = os.environ.get("TRUST_REMOTE_CODE", "false").lower() in ("1", "true", "yes")

# Jobs one worker takes at once. They queue for the single model thread, so more concurrency
# costs no GPU memory; it keeps validation, tokenisation and network I/O off the critical path.
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 16)
MAX_INPUTS = env_int("MAX_INPUTS", 2048)  # texts per request: OpenAI's own cap
# Characters per text: about 12k tokens, far beyond any model's window (longer inputs are
# truncated anyway); the cap only bounds the memory a single request can make us tokenise.
MAX_INPUT_CHARS = env_int("MAX_INPUT_CHARS", 50_000)
MIN_DIMENSIONS = env_int("MIN_DIMENSIONS", 1)  # OpenAI accepts any positive size; the maximum is the model's own
BATCH_SIZE = env_int("BATCH_SIZE", 64)  # texts per forward pass: short texts fill a 16 GB GPU far beyond this

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
LOADED_AT = int(time.time())
log.info(
    f"Loaded {MODEL_NAME} on {DEVICE} ({DTYPE}) in {time.perf_counter() - _load_started:.1f}s: "
    f"{EMBEDDING_DIM} dimensions, at most {MAX_SEQ_LENGTH} tokens per input, "
    f"prompts: {sorted(name for name, text in PROMPTS.items() if text) or 'none'}"
)

# One thread owns the model: jobs queue for it in order, and the event loop stays free to take
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


OPENAI_EMBEDDINGS_ROUTE = "/v1/embeddings"
OPENAI_MODELS_ROUTE = "/v1/models"
OPENAI_ROUTES = (OPENAI_EMBEDDINGS_ROUTE, OPENAI_MODELS_ROUTE)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: "texts.2: String should have at most 50000 characters"."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        location = f"{prefix}.{field}" if prefix and field else prefix or field or "input"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def parse_request(job_input: Any) -> tuple[str, EmbeddingOptions | None]:
    """Turn a job's input into (route, validated request). Pure: no model, no I/O.

    route is "native", "/v1/embeddings" or "/v1/models" (which has no request body).
    """
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" not in job_input:
        try:
            return "native", EmbedRequest.model_validate(job_input)
        except ValidationError as error:
            raise RequestError(describe_validation_error(error)) from None

    route = job_input["openai_route"]
    if route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    if route == OPENAI_MODELS_ROUTE:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    try:
        return route, OpenAIEmbeddingRequest.model_validate(body)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error, prefix="openai_input")) from None


# ---------------------------------------------------------------------------------------------
# 4. Inference: runs on the model thread.
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


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A JSON value for one embedding: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def usage(counts: list[int]) -> dict[str, int]:
    """Tokens the model actually read: inputs past MAX_SEQ_LENGTH count only up to it."""
    tokens = sum(min(count, MAX_SEQ_LENGTH) for count in counts)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def truncated_indices(counts: list[int]) -> list[int]:
    return [index for index, count in enumerate(counts) if count > MAX_SEQ_LENGTH]


def native_response(vectors: np.ndarray, counts: list[int], request: EmbedRequest) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL_NAME,
        "embeddings": [encode_vector(vector, request.encoding_format) for vector in vectors],
        "dimensions": int(vectors.shape[1]),
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


def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate, embed off the event loop, shape; every failure is a clean error.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> dict[str, Any]:
    job_id = job.get("id")
    started = time.perf_counter()
    try:
        route, request = parse_request(job.get("input"))
        if route == OPENAI_MODELS_ROUTE:
            return models_response()
        texts = request.texts if isinstance(request, EmbedRequest) else request.input
        vectors, counts = await asyncio.get_running_loop().run_in_executor(
            MODEL_THREAD, embed, texts, request.input_type
        )
    except RequestError as error:
        log.warn(f"Rejected request: {error}", job_id)
        return {"error": str(error)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the memory back so the next job can run
        log.error(f"Out of GPU memory on {len(texts)} inputs", job_id)
        return {"error": f"out of GPU memory embedding {len(texts)} inputs; send fewer or shorter texts"}
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


if __name__ == "__main__":
    runpod.serverless.start(
        {
            "handler": for_local_run(handler),
            # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
            "concurrency_modifier": lambda current: MAX_CONCURRENCY,
        }
    )
