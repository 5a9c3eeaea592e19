"""Vision-language models on Runpod Serverless: CLIP, SigLIP, BLIP-2 and the chat VLMs.

One worker serves the model in `MODEL_NAME`; its family, read from the model's own config,
decides which tasks it can do:

  CLIP     classify (zero-shot: an image and candidate labels) and embed (images and texts)
  LLaVA    caption, answer (a question about an image) and chat (messages with images,
           also through OpenAI's /v1/chat/completions with image_url parts); the same for
           LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Gemma 3 and Idefics3 / SmolVLM (families.py)
  BLIP-2   caption and answer

  {"input": {"task": "answer", "image": "https://.../cat.jpg", "question": "What is the cat doing?"}}

The handler is an async generator: LLaVA and BLIP-2 answers stream as text deltas, CLIP results
come as one chunk. The file reads top to bottom: configuration, model load, request schema,
inputs, inference, response, the handler.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import startup  # before every library: settles the device and the Hugging Face cache (startup.py)

import runpod
import torch
from clip_batcher import EncodeBatcher
from coalesce import ResultTooLarge, coalesced, merge_text, within_result_budget
from contrastive import CONTRASTIVE_FAMILIES, ContrastiveModel
from families import VLM_FAMILIES, image_token_bounds, load_processor
from image_fetcher import ImageFetcher
from images import ImageInputError, ImageLimits
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from textstream import (
    ContextLengthError,
    Delta,
    GenerationTimeout,
    OpenAIShape,
    Usage,
    grammar_error,
    grammar_tokenizer,
    json_schema_grammar,
    native_responses,
    openai_responses,
    recommended_sampling,
    resolve_sampling,
)
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from engines import Prepared, TransformersVisionEngine
from local_run import for_local_run

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


# CLIP ViT-B/32: the reference zero-shot classifier and image/text embedder; 150M parameters, so
# it serves from any GPU (or CPU). Set MODEL_NAME to a LLaVA or BLIP-2 model to answer questions.
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
MODEL_NAME = env_str("MODEL_NAME", DEFAULT_MODEL)  # a Hub id or a local folder
MODEL_REVISION = env_str("MODEL_REVISION", None)  # a commit hash makes deployments reproducible
SERVED_MODEL_NAME = env_str("SERVED_MODEL_NAME", MODEL_NAME)  # the id /v1/models lists
DTYPE = env_str("DTYPE", "auto")  # auto: fp16 on GPU, fp32 on CPU | bfloat16 | float16 | float32
QUANTIZATION = env_str("QUANTIZATION", None)  # bnb-8bit | bnb-4bit, for LLaVA and BLIP-2: LLaVA-7B in ~5 GB
# Jobs one worker runs at once; LLaVA and BLIP-2 generate on a thread each, CLIP queues for one.
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 4)
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 256)  # a full answer about an image, not an essay
# Seconds one generation may run: well under Runpod's default execution timeout (600 s), so a
# runaway request ends with an answer instead of a killed job. 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 300.0)

# Request limits.
MAX_LABELS = env_int("MAX_LABELS", 100)  # zero-shot classes per request: each is one text to encode
MAX_LABEL_CHARS = 200  # CLIP reads 77 tokens of a label's caption; longer is a mistake
MAX_EMBED_ITEMS = env_int("MAX_EMBED_ITEMS", 64)  # images plus texts per embed request
# Qwen2-VL's dynamic resolution: each image becomes between MIN_IMAGE_TOKENS and MAX_IMAGE_TOKENS
# vision tokens (28x28 px each), whatever its size. 1280 (~1 MP) is Qwen's own suggestion; the
# checkpoints allow 16,384, which one 12 MP photo would fill.
MIN_IMAGE_TOKENS = env_int("MIN_IMAGE_TOKENS", 4)
MAX_IMAGE_TOKENS = env_int("MAX_IMAGE_TOKENS", 1280)
MAX_TEXT_CHARS = 4000  # one label, question or message: far beyond any model's window
MAX_MESSAGES = 64  # turns in a chat
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 2.0  # above 2 output degrades into noise
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty is [-2, 2]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit on entries
INPUT_LIMITS = ImageLimits(
    max_bytes=env_int("MAX_INPUT_IMAGE_BYTES", 20 * 1024 * 1024),  # a 20 MB photo; every model resizes to < 1 MP
    max_pixels=env_int("MAX_INPUT_IMAGE_PIXELS", 4096 * 4096),  # refused from the header, before decoding
    timeout_s=env_float("DOWNLOAD_TIMEOUT_S", 15.0),  # a whole download, not each read
)
# A request's images download in parallel, all within MAX_REQUEST_SECONDS: far inside Runpod's
# default execution timeout (600 s), even for 64 images from a slow host.
MAX_REQUEST_SECONDS = env_float("MAX_REQUEST_SECONDS", 60.0)
# Decoded pixels per request, all images together, checked from their headers before decoding:
# four images at the per-image cap, ~200 MB of RGB; 64 photos of 1 MP fit.
MAX_REQUEST_PIXELS = env_int("MAX_REQUEST_PIXELS", 4 * 4096 * 4096)
# Downloads in flight for all jobs together: enough to fill a link, few enough for one worker's memory.
MAX_PARALLEL_DOWNLOADS = env_int("MAX_PARALLEL_DOWNLOADS", 16)
# Runpod's limit on a job's result (20 MB on /runsync), every streamed chunk included: an embed
# result that would certainly exceed it is refused before the work; a result or stream that still
# reaches it ends with an error, never lost.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
# Room in a streamed result for what surrounds the chunks: the job's id and status, the final error.
RESULT_ENVELOPE_BYTES = 4096
TOO_LARGE = (
    f"the result would pass MAX_RESULT_BYTES ({MAX_RESULT_BYTES:,} bytes, Runpod's limit for a job's result):"
    " lower max_tokens or top_logprobs"
)
# CLIP / SigLIP dynamic batching: the encodes of concurrent jobs share forward passes. A batch
# waits BATCH_WAIT_MS for company (far below a network round trip) and closes at BATCH_MAX_ITEMS
# images or texts, so one big job cannot hold the others back.
DYNAMIC_BATCHING = (env_str("DYNAMIC_BATCHING", "true") or "").lower() in ("1", "true", "yes")
BATCH_WAIT_MS = env_float("BATCH_WAIT_MS", 5.0)
BATCH_MAX_ITEMS = env_int("BATCH_MAX_ITEMS", 64)
# A float32 of a unit vector prints as about 20 characters in JSON ("-0.012706473283469677, ");
# 10 is a floor no real embedding goes under, so a result estimated with it is certainly too big.
MIN_JSON_FLOAT_BYTES = 10

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"


# ---------------------------------------------------------------------------------------------
# 2. Model load: the family from the config, then the model; once per worker, at import.
# ---------------------------------------------------------------------------------------------
def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache)."""
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


# model_type → family. The chat VLMs' differences (processor, image limits) are in families.py.
FAMILIES = {**CONTRASTIVE_FAMILIES, "blip-2": "blip2"} | {kind: vlm.name for kind, vlm in VLM_FAMILIES.items()}
EMBEDDING_FAMILIES = ("clip", "siglip")
CHAT_TASKS = ("caption", "answer", "chat")
TASKS = {"clip": ("classify", "embed"), "siglip": ("classify", "embed"), "blip2": ("caption", "answer")} | {
    vlm.name: CHAT_TASKS for vlm in VLM_FAMILIES.values()
}
SERVED = "CLIP, SigLIP, BLIP-2, LLaVA (1.5, NeXT, OneVision), Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM and Gemma 3"


def family_of(model_type: str) -> str:
    if model_type not in FAMILIES:
        raise ValueError(f"MODEL_NAME is a {model_type!r} model; this worker serves {SERVED}")
    return FAMILIES[model_type]


# Module paths (from the model's root) that stay in full precision when QUANTIZATION is set.
KEEP_UNQUANTIZED = {"blip2": ("vision_model", "qformer", "language_projection", "language_model.lm_head")} | {
    vlm.name: vlm.keep_unquantized for vlm in VLM_FAMILIES.values()
}


def quantization_config(name: str | None, family: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if not name:
        return None
    if family in EMBEDDING_FAMILIES:
        raise ValueError(
            "QUANTIZATION applies to LLaVA and BLIP-2; CLIP and SigLIP are small enough to serve unquantized"
        )
    # Only the language model is quantized: it holds ~95% of the weights, while the vision encoder
    # and the projector are small and lose the most accuracy at low precision.
    keep = list(KEEP_UNQUANTIZED[family])
    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if name == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=keep,
        )
    raise ValueError(f"QUANTIZATION must be bnb-8bit or bnb-4bit, got {name!r}")


DEVICE = startup.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see startup.py
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
if DTYPE not in ("auto", *DTYPES):
    raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {DTYPE!r}")
TORCH_DTYPE = DTYPES[DTYPE] if DTYPE != "auto" else torch.float16 if DEVICE == "cuda" else torch.float32

startup.COLD_START.done("imports")  # the download is timed apart from the load
startup.prefetch(MODEL_NAME, revision=MODEL_REVISION)
_load_started = time.perf_counter()
_common = {"revision": MODEL_REVISION, "cache_dir": cached_hub_folder(MODEL_NAME)}
CONFIG = AutoConfig.from_pretrained(MODEL_NAME, **_common)
FAMILY = family_of(CONFIG.model_type)
if CONFIG.get_text_config().is_encoder_decoder:
    # textstream streams decoder-only generation; BLIP-2's FLAN-T5 checkpoints are encoder-decoder.
    raise ValueError("MODEL_NAME pairs its vision encoder with an encoder-decoder (T5) language model; use an OPT one")
QUANTIZATION_CONFIG = quantization_config(QUANTIZATION, FAMILY, TORCH_DTYPE)  # refused before any weights load
VLM_FAMILY = VLM_FAMILIES.get(CONFIG.model_type)  # None for CLIP, SigLIP and BLIP-2
PROCESSOR = (
    load_processor(VLM_FAMILY, MODEL_NAME, **_common)
    if VLM_FAMILY
    else AutoProcessor.from_pretrained(MODEL_NAME, **_common)
)
if VLM_FAMILY and VLM_FAMILY.dynamic_resolution:
    image_token_bounds(PROCESSOR, MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS)
# Images per generation request, all turns together; each family's default keeps several images
# and an answer inside its context (families.py has the table). BLIP-2 answers about one image.
MAX_IMAGES_PER_REQUEST = env_int("MAX_IMAGES_PER_REQUEST", VLM_FAMILY.max_images if VLM_FAMILY else 1)
if FAMILY in EMBEDDING_FAMILIES:
    MODEL = AutoModel.from_pretrained(MODEL_NAME, dtype=TORCH_DTYPE, **_common).to(DEVICE)
else:
    MODEL = AutoModelForImageTextToText.from_pretrained(
        MODEL_NAME,
        dtype=TORCH_DTYPE,
        device_map="auto" if DEVICE == "cuda" else None,  # several GPUs for a big LLaVA
        quantization_config=QUANTIZATION_CONFIG,
        **_common,
    )
MODEL.eval()
TOKENIZER = PROCESSOR.tokenizer
CONTEXT_LEN = CONFIG.get_text_config().max_position_embeddings
LOADED_AT = int(time.time())
log.info(
    f"Loaded {MODEL_NAME} ({FAMILY}, {type(MODEL).__name__}) on {DEVICE} ({QUANTIZATION or TORCH_DTYPE}) in "
    f"{time.perf_counter() - _load_started:.1f}s; tasks: {', '.join(TASKS[FAMILY])}"
)
startup.COLD_START.report(f"load to {DEVICE}")


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a turn: the generation config's (often several) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


# LLaVA and BLIP-2 stream from generation threads. CLIP and SigLIP encodes, batched across jobs,
# run on one thread that owns the model.
if FAMILY in EMBEDDING_FAMILIES:
    GENERATOR, SAMPLING_DEFAULTS = None, {}
    EMBEDDER = ContrastiveModel(MODEL, PROCESSOR, FAMILY)
    MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
    BATCHER = EncodeBatcher(EMBEDDER, MODEL_THREAD, BATCH_MAX_ITEMS, BATCH_WAIT_MS / 1000, DYNAMIC_BATCHING)
else:
    # Generation goes through an engine (engines.py), so another library could serve it later.
    ENGINE = TransformersVisionEngine(
        MODEL,
        PROCESSOR,
        CONTEXT_LEN,
        MAX_CONCURRENCY,
        eos_token_ids(MODEL, TOKENIZER),
        recommended_sampling(MODEL.generation_config),
        MAX_GENERATION_SECONDS or None,
    )
    GENERATOR, SAMPLING_DEFAULTS = ENGINE.generator, ENGINE.sampling_defaults
FETCHER = ImageFetcher(INPUT_LIMITS, MAX_PARALLEL_DOWNLOADS, MAX_REQUEST_SECONDS, MAX_REQUEST_PIXELS)


# ---------------------------------------------------------------------------------------------
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


def unsupported(feature: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{feature} is not supported by this worker{hint}")


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
ImageSource = Annotated[str, Field(min_length=1)]  # URL, data URI or base64; checked when fetched


Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class Sampling(BaseModel):
    """Sampling for the generating families (the text worker's names and ranges); None means the
    model's default (or the usual one)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_tokens: Annotated[int, Field(ge=1, le=CONTEXT_LEN)] | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 and 0 both mean "no top-k"
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=MAX_REPETITION_PENALTY)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt field is an error, not ignored


class ClassifyRequest(Strict):
    task: Literal["classify"]
    image: ImageSource
    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]],
        Field(min_length=2, max_length=MAX_LABELS),
    ]
    # CLIP was trained on captions, so "a photo of a dog." scores better than the bare label "dog".
    hypothesis_template: Annotated[str, Field(max_length=MAX_LABEL_CHARS)] = "a photo of a {}."

    @field_validator("hypothesis_template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        try:
            fits = value.count("{}") == 1 and value.format("label") is not None
        except (IndexError, KeyError, ValueError):
            fits = False
        if not fits:
            raise PydanticCustomError(
                "template", "must contain exactly one {} where the label goes (write other braces as {{ and }})"
            )
        return value


class EmbedRequest(Strict):
    task: Literal["embed"]
    images: Annotated[list[ImageSource], Field(max_length=MAX_EMBED_ITEMS)] = []
    texts: Annotated[list[Text], Field(max_length=MAX_EMBED_ITEMS)] = []

    @model_validator(mode="after")
    def _something_to_embed(self) -> EmbedRequest:
        if not self.images and not self.texts:
            raise PydanticCustomError("empty", "send images, texts or both")
        if len(self.images) + len(self.texts) > MAX_EMBED_ITEMS:
            raise PydanticCustomError("too_many", f"images and texts together must be at most {MAX_EMBED_ITEMS}")
        return self


class Generating(Strict):
    sampling_params: Sampling = Sampling()
    stream: bool = False


class CaptionRequest(Generating):
    task: Literal["caption"]
    image: ImageSource


class AnswerRequest(Generating):
    task: Literal["answer"]
    image: ImageSource
    question: Text
    # A JSON schema the answer must match (document extraction, tagging), enforced while generating.
    json_schema: dict[str, Any] | None = None


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's "detail" is accepted and has no effect here
    url: ImageSource


class Part(BaseModel):
    """OpenAI content parts: {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "image_url"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload(self) -> Part:
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("part", "a text part needs text")
        if self.type == "image_url" and self.image_url is None:
            raise PydanticCustomError("part", "an image_url part needs image_url.url")
        return self


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[Part]


Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatRequest(Generating):
    task: Literal["chat"]
    messages: Messages


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)  # "strict": always enforced
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "response_format.json_schema is required with type json_schema")
        return self


class OpenAIChatRequest(Sampling):
    """OpenAI's chat request with image_url parts and the text worker's sampling fields. Unknown
    fields are ignored; features this worker lacks are refused, never silently dropped."""

    model_config = ConfigDict(strict=True, extra="ignore")
    messages: Messages
    model: str | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=CONTEXT_LEN)] | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
            Field(max_length=MAX_LOGIT_BIAS_TOKENS),
        ]
        | None
    ) = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> OpenAIChatRequest:
        if self.n not in (None, 1):
            raise unsupported(f"n={self.n}", "; send one request per choice (n must be 1)")
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs needs logprobs: true")
        if self.tools or self.tool_choice not in (None, "none"):
            raise unsupported("tool calling (tools, tool_choice)", "; the text worker serves tools")
        for token in self.logit_bias or {}:
            if not token.isdigit() or int(token) >= CONFIG.get_text_config().vocab_size:
                raise PydanticCustomError("logit_bias", f"logit_bias: {token!r} is not a token id of this model")
        return self


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, for CLIP and SigLIP, with images too (Infinity's convention):
    `modality: "image"` makes every input an image (URL, data URI or base64); without it a
    `data:image/...` URI is an image and anything else a text. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBED_ITEMS)]
    model: str | None = None  # this endpoint serves one model whatever the name says
    modality: Literal["text", "image"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None  # the first N dimensions, re-normalised
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts_as_list(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
            raise ValueError("token id arrays are not supported (they belong to OpenAI's tokenizer); send text")
        return [value] if isinstance(value, str) else value

    def is_image(self, item: str) -> bool:
        return self.modality == "image" or (self.modality is None and item.startswith("data:image/"))

    @model_validator(mode="after")
    def _text_lengths(self) -> OpenAIEmbeddingRequest:
        for index, item in enumerate(self.input):
            if not self.is_image(item) and len(item) > MAX_TEXT_CHARS:
                raise PydanticCustomError("too_long", f"input.{index}: a text has at most {MAX_TEXT_CHARS} characters")
        return self


NATIVE_REQUESTS = {
    "classify": ClassifyRequest,
    "embed": EmbedRequest,
    "caption": CaptionRequest,
    "answer": AnswerRequest,
    "chat": ChatRequest,
}
CHAT_ROUTE = "/v1/chat/completions"
EMBEDDINGS_ROUTE = "/v1/embeddings"
MODELS_ROUTE = "/v1/models"
OPENAI_ROUTES = (CHAT_ROUTE, EMBEDDINGS_ROUTE, MODELS_ROUTE)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: "labels: List should have at least 2 items"."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        location = f"{prefix}.{field}" if prefix and field else prefix or field or "input"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def parse_request(job_input: Any, family: str) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (task or route, validated request). Pure: no model, no I/O."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    tasks = TASKS[family]
    if "openai_route" in job_input:
        route = job_input["openai_route"]
        if route not in OPENAI_ROUTES:
            raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
        if route == MODELS_ROUTE:
            return route, None
        if route == CHAT_ROUTE and "chat" not in tasks:
            raise RequestError(f"this is a {family} model, which cannot chat; it can do: {', '.join(tasks)}")
        if route == EMBEDDINGS_ROUTE and "embed" not in tasks:
            raise RequestError(f"this is a {family} model, which cannot embed; it can do: {', '.join(tasks)}")
        body = job_input.get("openai_input")
        if not isinstance(body, dict):
            raise RequestError(f"openai_input must be a JSON object with the {route} request body")
        schema = OpenAIChatRequest if route == CHAT_ROUTE else OpenAIEmbeddingRequest
        try:
            return route, schema.model_validate(body)
        except ValidationError as error:
            raise RequestError(describe_validation_error(error, prefix="openai_input")) from None

    task = job_input.get("task")
    if not isinstance(task, str) or task not in NATIVE_REQUESTS:
        raise RequestError(f"task must be one of {', '.join(tasks)} (what this {family} model can do), got {task!r}")
    if task not in tasks:
        raise RequestError(f"task: a {family} model cannot {task}; it can do: {', '.join(tasks)}")
    try:
        return task, NATIVE_REQUESTS[task].model_validate(job_input)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error)) from None


# ---------------------------------------------------------------------------------------------
# 4. Inputs: images fetched and prompts built, all before the first chunk is yielded.
# ---------------------------------------------------------------------------------------------
BLIP2_QUESTION = "Question: {} Answer:"  # the prompt format BLIP-2 was fine-tuned on for VQA
CAPTION_INSTRUCTION = "Describe this image in one sentence."  # caption, for the families that chat


def chat_turns(messages: list[Message]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI-style messages → the processor's chat format, plus the image sources in order."""
    turns, sources = [], []
    for message in messages:
        parts = [Part(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for part in parts:
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image"})
                sources.append(part.image_url.url)
        turns.append({"role": message.role, "content": content})
    if len(sources) > MAX_IMAGES_PER_REQUEST:
        raise RequestError(
            f"messages: {len(sources)} images, more than the limit of {MAX_IMAGES_PER_REQUEST} (MAX_IMAGES_PER_REQUEST)"
        )
    if not sources:
        raise RequestError("messages: send at least one image (an image_url part); this worker answers about images")
    return turns, sources


def image_sources(request: BaseModel) -> list[tuple[str, str]]:
    """(field, source) of every image a generation request carries, in prompt order."""
    if isinstance(request, (ChatRequest, OpenAIChatRequest)):
        return [(f"image {index}", source) for index, source in enumerate(chat_turns(request.messages)[1])]
    return [("image", request.image)]


def prepare_generation(task: str, request: BaseModel, images: list[Image.Image]) -> Prepared:
    """The engine's inputs for the request and its fetched images. Blocking: runs off the event loop."""
    if task == "chat" or isinstance(request, OpenAIChatRequest):
        return ENGINE.prepare(chat_turns(request.messages)[0], images)
    if FAMILY == "blip2":  # no chat template: BLIP-2's own prompt, or none to caption
        return ENGINE.prepare(BLIP2_QUESTION.format(request.question) if task == "answer" else "", images)
    question = request.question if task == "answer" else CAPTION_INSTRUCTION
    return ENGINE.prepare(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], images
    )


def requested_grammar(request: BaseModel) -> str | None:
    """The llguidance grammar (textstream.py, as the text worker's) that the request's response_format
    or json_schema asks for, checked against this model's tokenizer; None for free text."""
    if isinstance(request, OpenAIChatRequest) and request.response_format and request.response_format.type != "text":
        fmt = request.response_format
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    elif isinstance(request, AnswerRequest) and request.json_schema is not None:
        schema = request.json_schema
    else:
        return None
    try:
        grammar = json_schema_grammar(schema)
    except ValueError as error:
        raise RequestError(f"structured output: {error}") from None
    vocab_size = CONFIG.get_text_config().vocab_size
    if problem := grammar_error(grammar, grammar_tokenizer(TOKENIZER, vocab_size, sorted(ENGINE.eos_token_ids))):
        raise RequestError(f"structured output: the grammar engine refused the schema: {problem}")
    return grammar


def sampling_of(request: BaseModel) -> Sampling:
    if isinstance(request, OpenAIChatRequest):
        if request.max_completion_tokens is not None:
            return request.model_copy(update={"max_tokens": request.max_completion_tokens})
        return request
    sampling = request.sampling_params
    if isinstance(request, (CaptionRequest, AnswerRequest)) and sampling.temperature is None:
        # A caption or an answer is expected to be repeatable: greedy, whatever the model's
        # generation_config recommends for chat, unless the request asks for a temperature.
        return sampling.model_copy(update={"temperature": 0.0})
    return sampling


# ---------------------------------------------------------------------------------------------
# 5. Inference and response for CLIP (one chunk); generation streams through textstream.py.
# ---------------------------------------------------------------------------------------------
def truncated_indices(counts: list[int]) -> list[int]:
    """Inputs longer than the text tower reads (77 tokens for CLIP, 64 for SigLIP): cut, as 03 reports."""
    return [index for index, count in enumerate(counts) if count > EMBEDDER.max_text_tokens]


async def encode_images(images: list[Image.Image]) -> torch.Tensor:
    """Unit image embeddings, preprocessed on this job's own thread, encoded in a shared batch."""
    if not images:
        return torch.empty(0, EMBEDDER.dimensions)
    pixels = await asyncio.get_running_loop().run_in_executor(None, EMBEDDER.preprocess_images, images)
    return await BATCHER.images(pixels)


async def encode_texts(texts: list[str]) -> torch.Tensor:
    return await BATCHER.texts(texts) if texts else torch.empty(0, EMBEDDER.dimensions)


async def classify(request: ClassifyRequest) -> dict[str, Any]:
    """Zero-shot classification: the image against each label's caption, as one batch entry each.
    CLIP: a softmax over the labels (they sum to 1); SigLIP: each label's own sigmoid."""
    images = await FETCHER.fetch([("image", request.image)])
    captions = [request.hypothesis_template.format(label) for label in request.labels]
    image_rows, caption_rows = await asyncio.gather(encode_images(images), encode_texts(captions))
    probabilities = EMBEDDER.probabilities(image_rows[0], caption_rows)
    ranked = sorted(zip(request.labels, probabilities, strict=True), key=lambda pair: pair[1], reverse=True)
    return {
        "model": SERVED_MODEL_NAME,
        "labels": [{"label": label, "score": score} for label, score in ranked],
        "truncated": truncated_indices(EMBEDDER.token_counts(captions)),  # indices into labels as sent
    }


def result_bytes_at_least(vectors: int, dimensions: int, encoding_format: str) -> int:
    """A floor on the JSON size of `vectors` embeddings: base64 exactly, floats at MIN_JSON_FLOAT_BYTES each."""
    if encoding_format == "base64":
        return vectors * (4 * -(-4 * dimensions // 3) + 2)
    return vectors * dimensions * MIN_JSON_FLOAT_BYTES


def check_result_budget(vectors: int, dimensions: int, encoding_format: str) -> None:
    """Refuse, before any work, an embed result that would certainly exceed MAX_RESULT_BYTES."""
    floor = result_bytes_at_least(vectors, dimensions, encoding_format)
    if floor > MAX_RESULT_BYTES:
        raise RequestError(
            f"the result would be at least {floor} bytes ({vectors} embeddings of {dimensions} dimensions), over "
            f"MAX_RESULT_BYTES ({MAX_RESULT_BYTES}), Runpod's limit for a job's result: send fewer inputs per job"
            + (", fewer dimensions or encoding_format base64" if encoding_format == "float" else " or fewer dimensions")
        )


def fits_result_budget(result: dict[str, Any]) -> dict[str, Any]:
    """The result itself, measured as Runpod will send it: too large is a clear error, never a lost result."""
    size = len(json.dumps(result, ensure_ascii=False))
    if size > MAX_RESULT_BYTES:
        raise RequestError(
            f"the result is {size} bytes, over MAX_RESULT_BYTES ({MAX_RESULT_BYTES}), Runpod's limit for a job's "
            "result: send fewer inputs per job"
        )
    return result


async def embed(request: EmbedRequest) -> dict[str, Any]:
    """Image and text embeddings in the model's shared space, unit length: cosine similarity is a dot product."""
    check_result_budget(len(request.images) + len(request.texts), EMBEDDER.dimensions, "float")
    images = await FETCHER.fetch([(f"images.{index}", source) for index, source in enumerate(request.images)])
    image_rows, text_rows = await asyncio.gather(encode_images(images), encode_texts(request.texts))
    response: dict[str, Any] = {"model": SERVED_MODEL_NAME, "dimensions": EMBEDDER.dimensions}
    if request.images:
        response["image_embeddings"] = image_rows.tolist()
    if request.texts:
        response["text_embeddings"] = text_rows.tolist()
        response["truncated"] = truncated_indices(EMBEDDER.token_counts(request.texts))  # indices into texts
    return fits_result_budget(response)


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A JSON value for one embedding: numbers, or base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def openai_embeddings(request: OpenAIEmbeddingRequest) -> dict[str, Any]:
    """OpenAI's embeddings object for a mix of texts and images, in input order."""
    dimensions = request.dimensions or EMBEDDER.dimensions
    if dimensions > EMBEDDER.dimensions:
        raise RequestError(f"openai_input.dimensions: this model's embeddings have {EMBEDDER.dimensions} dimensions")
    check_result_budget(len(request.input), dimensions, request.encoding_format)
    image_at = [index for index, item in enumerate(request.input) if request.is_image(item)]
    text_at = [index for index, item in enumerate(request.input) if not request.is_image(item)]
    texts = [request.input[index] for index in text_at]
    images = await FETCHER.fetch([(f"openai_input.input.{index}", request.input[index]) for index in image_at])
    image_rows, text_rows = await asyncio.gather(encode_images(images), encode_texts(texts))
    rows = torch.empty(len(request.input), EMBEDDER.dimensions)
    rows[torch.tensor(image_at, dtype=torch.long)] = image_rows
    rows[torch.tensor(text_at, dtype=torch.long)] = text_rows
    # Matryoshka-style truncation as 03 offers it (CLIP was not trained for it: the first dimensions
    # keep less than a trained model's would), re-normalised to unit length.
    rows = torch.nn.functional.normalize(rows[:, :dimensions], dim=-1)
    counts = EMBEDDER.token_counts(texts)
    tokens = sum(min(count, EMBEDDER.max_text_tokens) for count in counts)
    response: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(row, request.encoding_format)}
            for index, row in enumerate(rows)
        ],
        "model": SERVED_MODEL_NAME,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},  # the text tokens read
    }
    # OpenAI's shape has no field for this; as 03, one is added only when it has something to say.
    if truncated := [text_at[position] for position in truncated_indices(counts)]:
        response["truncated"] = truncated
    return fits_result_budget(response)


def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate and fetch before the first yield, then answer or stream.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    job_id = job.get("id")
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    usage: Usage | None = None
    try:
        task, request = parse_request(job.get("input"), FAMILY)
        if task == MODELS_ROUTE:
            yield models_response()
            return
        if task in ("classify", "embed", EMBEDDINGS_ROUTE):
            run = {"classify": classify, "embed": embed, EMBEDDINGS_ROUTE: openai_embeddings}[task]
            result = await run(request)
            log.info(f"{task} in {(time.perf_counter() - started) * 1000:.0f} ms", job_id)
            yield result
            return

        # Everything that can refuse the request happens before the first chunk.
        images = await FETCHER.fetch(image_sources(request))
        prepared = await loop.run_in_executor(None, prepare_generation, task, request, images)
        grammar = await loop.run_in_executor(None, requested_grammar, request)  # compiling takes milliseconds
        logprobs = None
        if isinstance(request, OpenAIChatRequest) and request.logprobs:
            logprobs = request.top_logprobs or 0
        params = resolve_sampling(
            sampling_of(request),
            prepared.prompt_tokens,
            ENGINE.sampling_defaults,
            CONTEXT_LEN,
            DEFAULT_MAX_TOKENS,
            grammar=grammar,
            logprobs=logprobs,
        )
        # aclosing: if the job is cancelled or its consumer leaves, generation stops at once.
        async with contextlib.aclosing(ENGINE.generate(prepared, params)) as deltas:

            async def observed() -> AsyncIterator[Delta]:
                nonlocal usage
                async for delta in deltas:
                    usage = delta.usage or usage
                    yield delta

            if isinstance(request, OpenAIChatRequest):
                include_usage = bool((request.stream_options or {}).get("include_usage"))
                shape = OpenAIShape.new(chat=True, model=SERVED_MODEL_NAME, logprobs=params.logprobs is not None)
                chunks = openai_responses(shape, observed(), bool(request.stream), include_usage)
            else:
                chunks = native_responses(observed(), request.stream)
            # coalesced: the tokens made while the SDK POSTs one chunk go out together in the next.
            # Closed first (aclosing) when the job ends early: its task stops reading `deltas`,
            # which can then be closed too (a generator still being read cannot).
            async with contextlib.aclosing(coalesced(chunks, merge_text)) as out:
                async for chunk in within_result_budget(out, MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES):
                    yield chunk
    except ResultTooLarge:
        log.warn("Stopped a result at MAX_RESULT_BYTES", job_id)
        yield {"error": TOO_LARGE}
        return
    except (RequestError, ImageInputError, ContextLengthError) as error:
        log.warn(f"Rejected request: {error}", job_id)
        yield {"error": str(error)}
        return
    except GenerationTimeout as error:
        log.warn(f"{error} (MAX_GENERATION_SECONDS)", job_id)
        yield {"error": f"{error} (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit on the endpoint"}
        return
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the memory back so the next job can run
        log.error("Out of GPU memory", job_id)
        yield {"error": "out of GPU memory for this request; lower max_tokens or send fewer images"}
        return
    except torch.AcceleratorError:
        # The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers.
        WORKER_CONFIG["refresh_worker"] = True
        log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
        yield {"error": "the GPU failed on this request; retry it"}
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        log.error(f"Request failed: {type(error).__name__}: {error}", job_id)
        yield {"error": "the model failed on this request inside the worker; see the worker logs"}
        return

    if usage is not None:
        log.info(
            f"{task}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens in "
            f"{time.perf_counter() - started:.2f}s",
            job_id,
        )


WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    "return_aggregate_stream": True,  # /runsync and /status get every chunk, not []
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
