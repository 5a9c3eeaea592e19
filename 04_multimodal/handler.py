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
come as one chunk. The file reads top to bottom: configuration, model load, request, inference,
response, the handler. What each step leans on lives beside it, one job per file: schema.py (the
request models), planning.py (what a generation request asks of the engine), engines.py (the
engine), contrastive_tasks.py (CLIP's and SigLIP's tasks), contrastive.py, clip_batcher.py,
families.py, image_fetcher.py, and the files shared with other examples (hub_cache.py, device.py,
cold_start.py, errors.py, images.py, textstream.py, structured_output.py, response_shapes.py,
coalesce.py, local_run.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hub_cache  # first, before every library: settles the Hugging Face cache (hub_cache.py)

import device  # then the CUDA contract: DEVICE, or the worker stops here (device.py)

import runpod
import torch
from PIL import Image
from pydantic import BaseModel
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

import planning
import schema
from clip_batcher import EncodeBatcher, jobs_to_fill
from coalesce import ResultTooLarge, coalesced, merge_text, within_result_budget
from cold_start import COLD_START
from contrastive import CONTRASTIVE_FAMILIES, ContrastiveModel
from contrastive_tasks import ContrastiveTasks
from engines import Prepared, TransformersVisionEngine
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
from families import VLM_FAMILIES, auto_dtype, image_token_bounds, load_processor, quantization_config
from image_fetcher import ImageFetcher
from images import ImageInputError, ImageLimits
from local_run import for_local_run
from planning import generation_prompt, sampling_of
from response_shapes import OpenAIShape, closing_chunks, native_responses, openai_responses
from schema import EMBEDDINGS_ROUTE, MODELS_ROUTE, OpenAIChatRequest, RequestLimits
from settings import env_float, env_int, env_str
from textstream import ContextLengthError, Delta, GenerationTimeout, Usage, recommended_sampling, resolve_sampling

# Re-exported (an `as` alias says so): tests and benchmarks reach these as this module's attributes.
from schema import ClassifyRequest as ClassifyRequest  # isort: skip

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
# settings.py reads each variable (env_int, env_str, ...): unset or empty, it is the default.

# CLIP ViT-B/32: the reference zero-shot classifier and image/text embedder; 150M parameters, so
# it serves from any GPU (or CPU). Set MODEL_NAME to a LLaVA or BLIP-2 model to answer questions.
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
MODEL_NAME = env_str("MODEL_NAME", DEFAULT_MODEL)  # a Hub id or a local folder
MODEL_REVISION = env_str("MODEL_REVISION", None)  # a commit hash makes deployments reproducible
SERVED_MODEL_NAME = env_str("SERVED_MODEL_NAME", MODEL_NAME)  # the id /v1/models lists
DTYPE = env_str("DTYPE", "auto")  # auto: fp16 on GPU (Gemma 3: bf16), fp32 on CPU | bfloat16 | float16 | float32
QUANTIZATION = env_str("QUANTIZATION", None)  # bnb-8bit | bnb-4bit, for LLaVA and BLIP-2: LLaVA-7B in ~5 GB
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 256)  # a full answer about an image, not an essay
# Seconds one generation may run. Runpod fails a job that passes the endpoint's execution timeout
# (600 s by default) and stops its worker; this ends the answer 30 s before, with what was
# generated and finish_reason "length", leaving time to deliver it. Raise both together
# (this = execution timeout - 30). 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 570.0)

# Request limits the endpoint sets; the fixed ones (MAX_TEXT_CHARS, MAX_MESSAGES, MAX_SEED, ...) are
# in schema.py, beside the fields they bound.
MAX_LABELS = env_int("MAX_LABELS", 100)  # zero-shot classes per request: each is one text to encode
MAX_EMBED_ITEMS = env_int("MAX_EMBED_ITEMS", 64)  # images plus texts per embed request; images per /v1/embeddings one
# Inputs per /v1/embeddings request: OpenAI's own cap, as 03's, so LangChain's default batches (1,000)
# pass. The batcher encodes them BATCH_MAX_ITEMS at a time, so the count bounds no GPU memory.
MAX_INPUTS = env_int("MAX_INPUTS", 2048)
# Qwen2-VL's dynamic resolution: each image becomes between MIN_IMAGE_TOKENS and MAX_IMAGE_TOKENS
# vision tokens (28x28 px each), whatever its size. 1280 (~1 MP) is Qwen's own suggestion; the
# checkpoints allow 16,384, which one 12 MP photo would fill.
MIN_IMAGE_TOKENS = env_int("MIN_IMAGE_TOKENS", 4)
MAX_IMAGE_TOKENS = env_int("MAX_IMAGE_TOKENS", 1280)
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
# images or distinct texts (each kind is its own forward pass), so one big job cannot hold the others back.
DYNAMIC_BATCHING = (env_str("DYNAMIC_BATCHING", "true") or "").lower() in ("1", "true", "yes")
BATCH_WAIT_MS = env_float("BATCH_WAIT_MS", 5.0)
BATCH_MAX_ITEMS = env_int("BATCH_MAX_ITEMS", 64)

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


DEVICE = device.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see device.py
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
if DTYPE not in ("auto", *DTYPES):
    raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {DTYPE!r}")

COLD_START.done("imports")  # the download is timed apart from the load
hub_cache.prefetch(MODEL_NAME, revision=MODEL_REVISION)
COLD_START.done("download")
_load_started = time.perf_counter()
_common = {"revision": MODEL_REVISION, "cache_dir": cached_hub_folder(MODEL_NAME)}
CONFIG = AutoConfig.from_pretrained(MODEL_NAME, **_common)
FAMILY = family_of(CONFIG.model_type)
# DTYPE=auto by the family (families.auto_dtype): bf16 for Gemma 3, which overflows in fp16.
_BF16_NATIVE = DEVICE == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
TORCH_DTYPE = DTYPES[DTYPE if DTYPE != "auto" else auto_dtype(CONFIG.model_type, DEVICE, _BF16_NATIVE)]
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
GENERATING_CONCURRENCY = 4  # a chat VLM or BLIP-2 job generates on a thread of its own, with its own KV cache


def default_concurrency(family: str, batch_max_items: int) -> int:
    """Jobs one worker runs at once unless MAX_CONCURRENCY says: a CLIP or SigLIP job waits in the batcher
    for a shared forward pass, so enough one-image jobs to fill the batch on the model and the next one
    (clip_batcher.jobs_to_fill: 128 at BATCH_MAX_ITEMS 64); a generating job, a few."""
    return jobs_to_fill(batch_max_items) if family in EMBEDDING_FAMILIES else GENERATING_CONCURRENCY


MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", default_concurrency(FAMILY, BATCH_MAX_ITEMS))
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
COLD_START.report(f"load to {DEVICE}")


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a turn: the generation config's (often several) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


# Images are fetched for every task, on download threads shared by all jobs (image_fetcher.py).
FETCHER = ImageFetcher(INPUT_LIMITS, MAX_PARALLEL_DOWNLOADS, MAX_REQUEST_SECONDS, MAX_REQUEST_PIXELS)
# Two workers in one file, chosen by the family: CLIP and SigLIP answer their tasks in one chunk
# (contrastive_tasks.py), their encodes batched across jobs on one thread that owns the model;
# LLaVA, BLIP-2 and the chat VLMs stream from generation threads (engines.py, textstream.py).
if FAMILY in EMBEDDING_FAMILIES:
    GENERATOR, SAMPLING_DEFAULTS = None, {}
    EMBEDDER = ContrastiveModel(MODEL, PROCESSOR, FAMILY)
    MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
    BATCHER = EncodeBatcher(EMBEDDER, MODEL_THREAD, BATCH_MAX_ITEMS, BATCH_WAIT_MS / 1000, DYNAMIC_BATCHING)
    CONTRASTIVE = ContrastiveTasks(EMBEDDER, BATCHER, FETCHER, SERVED_MODEL_NAME, MAX_RESULT_BYTES)
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


# ---------------------------------------------------------------------------------------------
# 3. Request: schema.py holds the pydantic models, the single source of truth for names, defaults
#    and limits; the limits of this endpoint and its model reach them as the validation context.
# ---------------------------------------------------------------------------------------------
# The native tasks (ClassifyRequest, EmbedRequest, CaptionRequest, AnswerRequest, ChatRequest) are
# strict and forbid unknown fields; OpenAI's chat and embeddings requests ignore unknown fields but
# refuse what this worker cannot honour. A task the family cannot do is refused here too.
VOCAB_SIZE = CONFIG.get_text_config().vocab_size
LIMITS = RequestLimits(
    context_len=CONTEXT_LEN,
    vocab_size=VOCAB_SIZE,
    max_labels=MAX_LABELS,
    max_embed_items=MAX_EMBED_ITEMS,
    max_inputs=MAX_INPUTS,
)


def parse_request(job_input: Any, family: str) -> tuple[str, BaseModel | None]:
    """A job's input → (task or route, validated request), for a `family` model. Pure: no model, no I/O."""
    return schema.parse_request(job_input, family, TASKS[family], LIMITS)


# ---------------------------------------------------------------------------------------------
# 4. Inference: images fetched and the prompt, grammar and sampling settled before the first
#    chunk (planning.py), then generation streams through the engine; CLIP and SigLIP answer
#    their tasks in one chunk (contrastive_tasks.py).
# ---------------------------------------------------------------------------------------------
def image_sources(request: BaseModel) -> list[tuple[str, str]]:
    """(field, source) of every image a generation request carries, in prompt order."""
    return planning.image_sources(request, MAX_IMAGES_PER_REQUEST)


def prepare_generation(task: str, request: BaseModel, images: list[Image.Image]) -> Prepared:
    """The engine's inputs for the request and its fetched images. Blocking: runs off the event loop."""
    return ENGINE.prepare(generation_prompt(task, request, FAMILY, MAX_IMAGES_PER_REQUEST), images)


def requested_grammar(request: BaseModel) -> str | None:
    """The grammar the request's response_format or json_schema asks for, checked against this
    model's tokenizer (compiling takes milliseconds: off the event loop); None for free text."""
    return planning.requested_grammar(request, TOKENIZER, VOCAB_SIZE, ENGINE.eos_token_ids)


# ---------------------------------------------------------------------------------------------
# 5. Response: response_shapes.py shapes generation deltas into native chunks or OpenAI objects.
# ---------------------------------------------------------------------------------------------
def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. Start: the handler validates and fetches before the first yield, then answers or streams;
#    the SDK runs it.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    job_id = job.get("id")
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    usage: Usage | None = None
    shape: OpenAIShape | None = None  # an OpenAI chat's (None: a native answer)
    finished = False  # whether the answer ended by itself
    sent = False  # whether a chunk reached the caller: then a limit ends the answer, not the job
    shaped = error_shape(job.get("input"))  # OpenAI routes fail in OpenAI's error shape (errors.py)
    try:
        task, request = parse_request(job.get("input"), FAMILY)
        if task == MODELS_ROUTE:
            yield models_response()
            return
        if task in ("classify", "embed", EMBEDDINGS_ROUTE):
            run = {
                "classify": CONTRASTIVE.classify,
                "embed": CONTRASTIVE.embed,
                EMBEDDINGS_ROUTE: CONTRASTIVE.openai_embeddings,
            }[task]
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
                nonlocal usage, finished
                async for delta in deltas:
                    usage = delta.usage or usage
                    finished = finished or delta.finish_reason is not None
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
                    sent = True
                    yield chunk
    except ResultTooLarge:
        log.warn("Stopped a result at MAX_RESULT_BYTES", job_id)
        if not sent:  # one whole answer that cannot be delivered
            yield shaped({"error": TOO_LARGE}, BAD_REQUEST)
            return
        # A stream keeps what it sent and ends as max_tokens would end it, naming the limit.
        for chunk in closing_chunks(shape, [] if finished else [0], "MAX_RESULT_BYTES"):
            yield chunk
        return
    except (RequestError, ImageInputError, ContextLengthError) as error:
        yield shaped(rejected(error, job_id), BAD_REQUEST)
        return
    except GenerationTimeout as error:
        log.warn(f"{error} (MAX_GENERATION_SECONDS)", job_id)
        message = f"{error} (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit on the endpoint"
        yield shaped({"error": message}, INTERNAL)
        return
    except torch.cuda.OutOfMemoryError:  # this job fails, the memory goes back, the next job runs
        # A CLIP batch that ran out was split and retried (clip_batcher.py): this job failed in one of its own.
        fix = "send fewer images or texts" if FAMILY in EMBEDDING_FAMILIES else "lower max_tokens or send fewer images"
        yield shaped(out_of_memory("Out of GPU memory", f"out of GPU memory for this request; {fix}", job_id), INTERNAL)
        return
    except torch.AcceleratorError:  # the GPU is lost: this worker retires once the error is delivered
        yield shaped(gpu_lost("the GPU failed on this request; retry it", job_id, WORKER_CONFIG), UNAVAILABLE)
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        message = "the model failed on this request inside the worker; see the worker logs"
        yield shaped(failed("Request", error, message, job_id), INTERNAL)
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
