"""Image generation on Runpod Serverless with diffusers: SD 1.5, SD 2.1, SDXL, Turbo, FLUX.1 and SD 3.5.

One worker serves the model in `MODEL_NAME` (a diffusers folder or repo, or a single-file
checkpoint) for text-to-image, image-to-image, inpainting and (with `CONTROLNET_MODEL`)
ControlNet, all sharing one copy of the weights:

  {"input": {"prompt": "a lighthouse at dawn", "num_images": 2, "seed": 42}}

The handler is an async generator: while the model denoises it streams progress chunks
({"status": "progress", "step": 3, "total": 30}), then one chunk with the images and the seed of
each one. The file reads top to bottom: configuration, model load, request, inference, response,
the handler. What each step leans on lives beside it, one job per file: settings.py (reading the
environment), pipelines.py (loading the pipelines, a request's own copy), schema.py (the request
model), planning.py (what a request becomes: the Job), progress.py (denoising on a thread, progress
chunks), delivery.py (data URIs, S3, the result's size), families.py, checkpoints.py, loras.py, and
the files shared with other examples (hub_cache.py, device.py, cold_start.py, images.py,
coalesce.py, local_run.py, errors.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Requests name LoRAs on the Hub at run time, so this worker keeps the Hub on even when every model
# its settings name is baked into the image or in Runpod's cache (hub_cache.py would turn it off):
# those it loads from their snapshot folders (hub_cache.local_model). HF_HUB_OFFLINE=1 still wins.
os.environ["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE") or "0"

import hub_cache  # first, before every library: settles the Hugging Face cache (hub_cache.py)

import device  # then the CUDA contract: DEVICE, or the worker stops here (device.py)

import diffusers
import runpod
import torch
from PIL import Image

from checkpoints import is_single_file
from coalesce import coalesced, keep_latest
from cold_start import COLD_START
from delivery import STREAM_CHUNK_BYTES, Bucket, DeliveryError, deliver, refuse_what_cannot_fit, within_stream_chunks
from errors import RequestError, failed, gpu_lost, out_of_memory, rejected, validated
from families import FAMILIES, Family, detect_family, unsupported, with_overrides
from images import ImageInputError, ImageLimits
from local_run import for_local_run
from loras import LoraCache, LoraError, LoraLimits, load_endpoint_loras, resolve_requested, seconds_left
from pipelines import (
    DTYPES,
    SCHEDULERS,
    ModelSpec,
    auto_dtype,
    call_arguments,
    global_seed,
    load_pipelines,
    own_copy,
    quantization_config,
    step_reporter,
)
from planning import DEFAULT_STRENGTH, Generated, Job, canny_edges, default_steps, image_seeds, load_inputs, output_size
from progress import ThreadRun, TimeLimitExceeded, is_progress, progress_chunk
from schema import ImageRequest, RequestLimits
from settings import env_flag, env_float, env_int, env_str

# Re-exported (an `as` alias says so): tests and benchmarks reach these as this module's attributes.
from images import data_uri as data_uri, encode_image as encode_image  # isort: skip
from planning import fit_size as fit_size  # isort: skip
from schema import MAX_STEPS as MAX_STEPS  # isort: skip

log = runpod.RunPodLogger()
# diffusers warns with the cut-off part of any prompt over CLIP's 77 tokens: prompts stay out of logs.
diffusers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment (settings.py), each default with its reason.
# ---------------------------------------------------------------------------------------------
# SDXL base 1.0: the most used open text-to-image model; 1024² images, fits a 24 GB GPU in fp16.
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
MODEL_NAME = env_str("MODEL_NAME", DEFAULT_MODEL)  # a Hub id, a local folder, or a .safetensors/.ckpt file
MODEL_REVISION = env_str("MODEL_REVISION", None)  # a commit hash makes deployments reproducible
CONTROLNET_MODEL = env_str("CONTROLNET_MODEL", None)  # e.g. diffusers/controlnet-canny-sdxl-1.0
# A replacement VAE (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix: decodes SDXL in fp16
# without the fp32 upcast (faster, less memory at the decode).
VAE_NAME = env_str("VAE_NAME", None)
# The family when its configs cannot tell it (families.py), and what a single-file checkpoint is
# when its keys cannot (checkpoints.py): sd1, sd2, sd2-v, sd-turbo, sdxl, sdxl-turbo, flux-schnell, ...
MODEL_FAMILY = env_str("MODEL_FAMILY", None)
# A single file's configs and tokenizers: a diffusers folder or Hub repo of its family (default:
# the family's reference repo, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).
MODEL_CONFIG = env_str("MODEL_CONFIG", None)
# fp16 halves memory and doubles speed on GPUs; the published "fp16" weight variant is used when
# the repo has one (SDXL's VAE overflows in fp16: use madebyollin/sdxl-vae-fp16-fix or bf16).
# auto: on a GPU bf16 for FLUX.1 and SD 3.5 (trained in it), fp16 for the others; fp32 on CPU.
DTYPE = env_str("DTYPE", "auto")  # auto | float16 | bfloat16 | float32
# bnb-4bit | bnb-8bit: FLUX.1 and SD 3.5's transformer and T5 quantized as they load (pipelines.py),
# FLUX.1 [dev] in ~11 GB of weights instead of ~33 GB: a 24 GB GPU without CPU offload.
QUANTIZATION = env_str("QUANTIZATION", None)
# Images generated at once. 1: diffusion saturates a GPU on its own, and a second job would only
# split it and double the activation memory.
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 1)
ENABLE_CPU_OFFLOAD = env_flag("ENABLE_CPU_OFFLOAD", False)  # SDXL in ~6 GB of VRAM, ~2x slower
ENABLE_VAE_TILING = env_flag("ENABLE_VAE_TILING", False)  # decode big images in tiles: bounded memory
TORCH_COMPILE = env_flag("TORCH_COMPILE", False)  # ~20-40% faster UNet, minutes of compile at start
# max-autotune: the fastest kernels (and CUDA graphs), chosen by timing candidates, the slowest to
# compile; "default" compiles in a fraction of the time for a smaller speed-up.
TORCH_COMPILE_MODE = env_str("TORCH_COMPILE_MODE", "max-autotune")
# The compiled kernels, on the network volume when one is attached: later workers load them
# instead of compiling again (inductor's own setting; unset it to keep the cache in /tmp).
if TORCH_COMPILE and os.path.isdir("/runpod-volume"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/runpod-volume/torchinductor-cache")
WARMUP_STEPS = 2  # enough for the compiled UNet to meet every shape a job at the default size gives it
# num_images > 1 as one batch: faster per image on a GPU, but batched arithmetic differs from a
# lone image's, so a batched image matches its seed's solo run closely, not bit for bit.
BATCH_IMAGES = env_flag("BATCH_IMAGES", False)
# The family's defaults (families.py) fit the models it recognises; these override them, for the
# models no rule tells apart (SDXL-Lightning: DEFAULT_STEPS=4, DEFAULT_SCHEDULER=euler-trailing).
DEFAULT_STEPS = env_int("DEFAULT_STEPS", 0) or None
DEFAULT_GUIDANCE = float(os.environ["DEFAULT_GUIDANCE"]) if os.environ.get("DEFAULT_GUIDANCE") else None
DEFAULT_WIDTH = env_int("DEFAULT_WIDTH", 0) or None
DEFAULT_HEIGHT = env_int("DEFAULT_HEIGHT", 0) or None
DEFAULT_SCHEDULER = env_str("DEFAULT_SCHEDULER", None)
# Seconds one request may take (LoRA downloads, then denoising): well under Runpod's default
# execution timeout (600 s), so a runaway request ends with an answer instead of a killed job. 0: no limit.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 300.0)

# Request limits the endpoint sets; the fixed ones (MAX_SIDE, MAX_STEPS, MAX_SEED, ...) are in
# schema.py, beside the fields they bound.
MAX_PIXELS = env_int("MAX_PIXELS", 1536 * 1536)  # output width × height: 2.25 MP stays inside 24 GB for SDXL
MAX_IMAGES = env_int("MAX_IMAGES", 4)  # per request; each one costs a full denoising run
INPUT_LIMITS = ImageLimits(
    max_bytes=env_int("MAX_INPUT_IMAGE_BYTES", 20 * 1024 * 1024),  # a 20 MB photo is plenty, masks too
    max_pixels=env_int("MAX_INPUT_IMAGE_PIXELS", 4096 * 4096),  # bigger is resized anyway; refused before decoding
    timeout_s=env_float("DOWNLOAD_TIMEOUT_S", 15.0),  # a whole download, not each read
)

# LoRA adapters (loras.py). LORAS: the endpoint's own, loaded at start, a JSON list; requests name them in `loras`.
LORAS = env_str("LORAS", None)
LORA_LIMITS = LoraLimits(
    max_bytes=env_int("MAX_LORA_BYTES", 1024**3),  # the largest SDXL LoRAs (rank 128-256) are ~0.5-1 GB
    timeout_s=env_float("LORA_DOWNLOAD_TIMEOUT_S", 300.0),  # 1 GB at ~30 Mbit/s; and within the job's time limit
    max_loaded=env_int("MAX_LORAS_LOADED", 8),  # a LoRA is 10-200 MB of GPU memory; the LRU one goes
    slots=env_int("LORA_SLOTS", 1),  # TORCH_COMPILE: adapters at once, each a compiled slot computed every step
    max_rank=env_int("LORA_MAX_RANK", 64),  # TORCH_COMPILE: most published SD, SDXL and FLUX LoRAs are rank 4-64
)
# Downloaded LoRAs (on the network volume if any): past 10 GiB, ~10 of the largest SDXL LoRAs, the LRU ones go.
LORA_CACHE = LoraCache(env_int("LORA_CACHE_BYTES", 10 * 1024**3))

# Largest result a job may return: Runpod's /runsync limit (its /run limit is 10 MB: set 10000000
# for clients that use /run). It counts the whole aggregated result, progress chunks included.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
# Room for what surrounds the images in the result: parameters, timings, the job's id and status.
RESULT_ENVELOPE_BYTES = 4096

# S3-compatible storage for outputs: all three set → images are uploaded and URLs returned.
BUCKET_ENDPOINT_URL = env_str("BUCKET_ENDPOINT_URL", None)
BUCKET_ACCESS_KEY_ID = env_str("BUCKET_ACCESS_KEY_ID", None)
BUCKET_SECRET_ACCESS_KEY = env_str("BUCKET_SECRET_ACCESS_KEY", None)
BUCKET_NAME = env_str("BUCKET_NAME", "runpod-images")  # the SDK's own default is the month ("11-26")
UPLOAD = bool(BUCKET_ENDPOINT_URL and BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY)
BUCKET = Bucket(BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME) if UPLOAD else None


# ---------------------------------------------------------------------------------------------
# 2. Model load: once per worker, at import, before the first job is taken (pipelines.py).
# ---------------------------------------------------------------------------------------------
DEVICE = device.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see device.py
if DTYPE not in ("auto", *DTYPES):
    raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {DTYPE!r}")
if MODEL_FAMILY is not None and MODEL_FAMILY not in FAMILIES:
    raise ValueError(f"MODEL_FAMILY must be one of {', '.join(FAMILIES)}, got {MODEL_FAMILY!r}")
SINGLE_FILE = is_single_file(MODEL_NAME)
# A model baked into the image or in Runpod's cached models loads from its snapshot folder, without
# the Hub (hub_cache.py); the Hub stays on for the rest: VAE_NAME, MODEL_CONFIG, LoRAs, other models.
MODEL_SOURCE = hub_cache.local_model(MODEL_NAME, MODEL_REVISION) or MODEL_NAME
MODEL = ModelSpec(
    MODEL_NAME, MODEL_REVISION, MODEL_SOURCE, SINGLE_FILE, MODEL_FAMILY, MODEL_CONFIG, VAE_NAME, CONTROLNET_MODEL
)
pipeline_class_name = MODEL.pipeline_class_name  # read from the model's files, before its weights load
TORCH_DTYPE = (
    DTYPES[DTYPE] if DTYPE != "auto" else auto_dtype(DEVICE, pipeline_class_name, torch.cuda.is_bf16_supported)
)
QUANTIZED = quantization_config(QUANTIZATION, pipeline_class_name(), SINGLE_FILE, TORCH_DTYPE)  # or refused now

COLD_START.done("imports")  # the download is timed apart from the load
FP16_VARIANT = "fp16" if TORCH_DTYPE == torch.float16 else None  # the half-size files, when loading fp16
# A single file downloads as it loads (hf_hub_download); prefetch knows repos and folders only.
hub_cache.prefetch(None if SINGLE_FILE else MODEL_NAME, CONTROLNET_MODEL, revision=MODEL_REVISION, variant=FP16_VARIANT)
COLD_START.done("download")
_load_started = time.perf_counter()
# Text-to-image, image-to-image, inpainting and ControlNet over one set of weights. A bad
# checkpoint stops here with CheckpointError, naming the setting to fix.
COMPILE_MODE = TORCH_COMPILE_MODE if TORCH_COMPILE else None  # None: nothing compiles
TEXT2IMAGE, IMAGE2IMAGE, INPAINTING, CONTROLNET = load_pipelines(
    MODEL, TORCH_DTYPE, DEVICE, ENABLE_CPU_OFFLOAD, ENABLE_VAE_TILING, COMPILE_MODE, QUANTIZED
)
_family = FAMILIES[MODEL_FAMILY] if MODEL_FAMILY else detect_family(TEXT2IMAGE)  # by what it is, not its name
FAMILY: Family = with_overrides(
    _family, DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_SCHEDULER
)
log.info(
    f"Loaded {MODEL_NAME} ({FAMILY.name}, {type(TEXT2IMAGE).__name__}) on {DEVICE} ({TORCH_DTYPE}"
    f"{', ' + QUANTIZATION if QUANTIZED else ''}) in "
    f"{time.perf_counter() - _load_started:.1f}s; ControlNet: {CONTROLNET_MODEL or 'none'}; "
    f"outputs: {'S3 bucket ' + BUCKET_NAME if UPLOAD else 'data URIs'}"
)
COLD_START.report(f"load to {DEVICE}")

# LoRA adapters load into the shared modules; the gate lets only jobs wanting the same ones run
# together. The endpoint's own (LORAS) load now, and are never evicted.
GATE, ENDPOINT_LORAS, ENDPOINT_LORA_WEIGHTS = load_endpoint_loras(LORAS, TEXT2IMAGE, LORA_CACHE, LORA_LIMITS)

# Denoising runs on these threads; the event loop stays free to stream progress and take jobs.
PIPELINE_THREADS = ThreadPoolExecutor(max_workers=MAX_CONCURRENCY, thread_name_prefix="denoise")


# ---------------------------------------------------------------------------------------------
# 3. Request: ImageRequest (schema.py) is the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
if FAMILY.scheduler not in ("default", *SCHEDULERS):
    raise ValueError(f"DEFAULT_SCHEDULER must be one of {', '.join(SCHEDULERS)}, got {FAMILY.scheduler!r}")
# The limits this endpoint sets, handed to every validation as pydantic's context.
REQUEST_LIMITS = RequestLimits(max_pixels=MAX_PIXELS, max_images=MAX_IMAGES)


def parse_request(job_input: Any) -> ImageRequest:
    """Validate a job's input. Pure: no model, no I/O (images are fetched later)."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    request = validated(ImageRequest, job_input, REQUEST_LIMITS)
    if request.control_image is not None and CONTROLNET is None:
        raise RequestError("control_image needs a ControlNet: set CONTROLNET_MODEL on the endpoint")
    if problem := unsupported(FAMILY, bool(request.negative_prompt), request.guidance_scale, request.scheduler):
        raise RequestError(problem)
    for field in ("width", "height"):
        if (side := getattr(request, field)) is not None and side % FAMILY.size_multiple:
            raise RequestError(f"{field}: {FAMILY.describe()} takes multiples of {FAMILY.size_multiple}, got {side}")
    return request


# ---------------------------------------------------------------------------------------------
# 4. Inference: a Job settled before the first chunk (planning.py), then denoising on a thread.
# ---------------------------------------------------------------------------------------------
def prepare(request: ImageRequest, deadline: float | None = None) -> Job:
    """Fetch and fit the inputs (LoRAs by `deadline`, the job's), settle every setting. Blocking: off the event loop."""
    source, control, mask = load_inputs(request, INPUT_LIMITS)
    width, height = output_size(request, source or control, FAMILY, MAX_PIXELS)
    if not UPLOAD:  # images that cannot fit the result inline are refused before any work
        refuse_what_cannot_fit(request, width, height, MAX_RESULT_BYTES, RESULT_ENVELOPE_BYTES)
    steps = default_steps(request, source is not None, FAMILY)
    strength = request.strength or DEFAULT_STRENGTH
    requested = [(lora.source, lora.weight) for lora in request.loras or []]  # fetched now if need be
    adapters, fields, weights = resolve_requested(
        requested, ENDPOINT_LORAS, ENDPOINT_LORA_WEIGHTS, LORA_CACHE, LORA_LIMITS, deadline
    )
    if source is not None and int(steps * strength) < 1:
        raise RequestError(
            f"strength × num_inference_steps must reach at least one step, got {strength} × {steps}: raise either one"
        )
    if control is not None and request.canny:
        control = canny_edges(control, request.canny_low_threshold, request.canny_high_threshold)
    return Job(
        request=request,
        width=width,
        height=height,
        steps=steps,
        guidance=request.guidance_scale if request.guidance_scale is not None else FAMILY.guidance,
        scheduler=request.scheduler if request.scheduler != "default" else FAMILY.scheduler,
        seeds=image_seeds(request.seed, request.num_images),
        source=source.resize((width, height), Image.Resampling.LANCZOS) if source else None,
        # NEAREST keeps a hard mask hard; the pipeline reads white as "repaint"
        mask=mask.convert("L").resize((width, height), Image.Resampling.NEAREST) if mask else None,
        batch=request.batch if request.batch is not None else BATCH_IMAGES,
        control=control.resize((width, height), Image.Resampling.LANCZOS) if control else None,
        adapters=adapters,
        adapter_fields=fields,
        lora_weights=weights,
    )


def pipeline_for(job: Job) -> Any:
    """A pipeline of this request's own over the shared weights: a fresh scheduler of the kind it
    asked for and tokenizers of its thread's own (pipelines.own_copy), so nothing it sets outlives it."""
    if job.control is not None:
        base = CONTROLNET
    elif job.mask is not None:
        base = INPAINTING
    else:
        base = IMAGE2IMAGE if job.source is not None else TEXT2IMAGE
    return own_copy(base, job.scheduler, tokenizers_from=TEXT2IMAGE)


def denoise(job: Job, on_step: Any, cancelled: threading.Event) -> list[Generated]:
    """One image at a time, each from its own generator: bit-for-bit what a one-image request
    with that seed gives. Batched (job.batch), one pipeline call makes them all, still one
    generator per image, so each starts from its seed's own noise; the batched arithmetic
    (other kernel shapes and reduction orders) makes it close to its solo run, not bit-equal."""
    pipeline = pipeline_for(job)
    kwargs = call_arguments(pipeline, job, FAMILY)  # prompt, steps, guidance, input images, size
    runs = [job.seeds] if job.batch else [[seed] for seed in job.seeds]

    def give_up_when_cancelled() -> None:
        if cancelled.is_set():
            raise TimeLimitExceeded  # or the job was cancelled: nobody waits for it any more

    images = []
    with GATE.using(job.adapters, list(job.adapter_fields), on_wait=give_up_when_cancelled):
        for index, seeds in enumerate(runs):
            if cancelled.is_set():
                break
            # Noise drawn on the CPU: a seed gives the same starting latents on every machine.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            # (SD 3.5's ControlNet draws from torch's global generator too: global_seed seeds it.)
            with global_seed(pipeline, seeds[0]), torch.inference_mode():
                result = pipeline(
                    generator=generators if job.batch else generators[0],
                    num_images_per_prompt=len(seeds),
                    # progress to on_step, and a stop between steps once the job is cancelled
                    callback_on_step_end=step_reporter(on_step, cancelled, index, len(runs)),
                    **kwargs,
                )
            # SD 1.x/2.x repos that ship a safety checker black out what it flags; say so, not silently.
            flags = getattr(result, "nsfw_content_detected", None)
            for i, image in enumerate(result.images):
                images.append(Generated(image, bool(flags[i]) if flags else None))
    return images


def warm_up() -> float:
    """One small job through the whole path at start, so a compiled model (TORCH_COMPILE) compiles
    before the first job instead of inside its time limit. Returns the seconds it took."""
    started = time.perf_counter()
    request = parse_request({"prompt": "warm-up", "seed": 0, "num_inference_steps": WARMUP_STEPS})
    denoise(prepare(request), lambda step, total: None, threading.Event())
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# 5. Response: progress chunks while denoising (progress.py), then the images (delivery.py: data
#    URIs or S3 URLs within the result's size), their seeds, the parameters used and timings.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate and fetch before the first yield, then stream progress and images.
# ---------------------------------------------------------------------------------------------
async def image_stream(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """One job's chunks: a clear error, or progress then the images."""
    job_id = str(job.get("id"))
    loop = asyncio.get_running_loop()
    # MAX_GENERATION_SECONDS runs from here: the LoRA downloads count against it, then denoising.
    deadline = time.monotonic() + MAX_GENERATION_SECONDS if MAX_GENERATION_SECONDS else None
    try:
        request = parse_request(job.get("input"))
        prepared = await loop.run_in_executor(None, prepare, request, deadline)
    except (RequestError, ImageInputError, LoraError) as error:
        yield rejected(error, job_id)
        return

    # Denoising on its own thread (progress.py): only the newest step waits to be streamed, a step
    # overtaken by a newer one is dropped, never queued, and once the images are ready no progress
    # is sent before them. Past MAX_GENERATION_SECONDS, next_step raises TimeLimitExceeded.
    started = time.perf_counter()
    run = ThreadRun(PIPELINE_THREADS, denoise, prepared, seconds=seconds_left(deadline))
    streamed_bytes = 0  # the progress chunks are part of the aggregated result too
    try:
        while (step := await run.next_step()) is not None:
            chunk = progress_chunk(*step)
            streamed_bytes += len(json.dumps(chunk)) + 2  # the chunk and its separator in the result list
            yield chunk
        images = run.result()
        inference_ms = (time.perf_counter() - started) * 1000
        budget = MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES - streamed_bytes
        results, timings = await loop.run_in_executor(
            None, deliver, job_id, prepared, images, BUCKET, budget, MAX_RESULT_BYTES
        )
    except LoraError as error:  # an adapter that does not fit this model: the worker stays healthy
        log.warn(f"Adapter refused: {error}", job_id)
        yield {"error": str(error)}
        return
    except DeliveryError as error:
        log.warn(f"Result not delivered: {error}", job_id)
        yield {"error": str(error)}
        return
    except TimeLimitExceeded:
        log.warn(f"Stopped at the {MAX_GENERATION_SECONDS:g}-second limit (MAX_GENERATION_SECONDS)", job_id)
        yield {
            "error": f"generation stopped at its {MAX_GENERATION_SECONDS:g}-second limit (MAX_GENERATION_SECONDS):"
            " lower num_inference_steps, num_images or the size, or raise the limit on the endpoint"
        }
        return
    except torch.cuda.OutOfMemoryError:  # this job fails, the memory goes back, the next job runs
        oom = f"Out of GPU memory at {prepared.width}x{prepared.height}"
        yield out_of_memory(oom, "out of GPU memory for this size: lower width and height or num_images", job_id)
        return
    except torch.AcceleratorError:  # the GPU is lost: this worker retires once the error is delivered
        yield gpu_lost("the GPU failed while generating; retry the request", job_id, WORKER_CONFIG)
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        yield failed("Generation", error, "image generation failed inside the worker; see the worker logs", job_id)
        return
    finally:
        # Reached when the job is cancelled or its consumer leaves too: stop at the next step.
        await run.stop()

    log.info(
        f"{len(results)} image(s) {prepared.width}x{prepared.height}, {prepared.steps} steps in {inference_ms:.0f} ms",
        job_id,
    )
    parameters = prepared.parameters(MODEL_NAME, FAMILY.name)
    final = {"images": results, "parameters": parameters, "timings": {"inference_ms": inference_ms, **timings}}
    for chunk in within_stream_chunks(final, STREAM_CHUNK_BYTES):  # Runpod's cap on one streamed chunk
        yield chunk


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    # The SDK POSTs each chunk and waits for that POST before asking for the next: coalesced keeps
    # the job running meanwhile, and of the progress that piled up during a POST sends the newest.
    async for chunk in coalesced(image_stream(job), keep_latest(is_progress)):
        yield chunk


if TORCH_COMPILE:
    # On the denoising thread, where jobs will run: CUDA graphs are recorded per thread.
    log.info(f"Warm-up image (TORCH_COMPILE) done in {PIPELINE_THREADS.submit(warm_up).result():.1f}s")
    COLD_START.report("compile warm-up")

WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    "return_aggregate_stream": True,  # /runsync and /status get every chunk, not []
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
