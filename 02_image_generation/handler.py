"""Image generation on Runpod Serverless with diffusers: SD 1.5, SD 2.1, SDXL, Turbo, FLUX.1 and SD 3.5.

One worker serves the model in `MODEL_NAME` (a diffusers folder or repo, or a single-file
checkpoint) for text-to-image, image-to-image, inpainting and (with `CONTROLNET_MODEL`)
ControlNet, all sharing one copy of the weights:

  {"input": {"prompt": "a lighthouse at dawn", "num_images": 2, "seed": 42}}

The handler is an async generator: while the model denoises it streams progress chunks
({"status": "progress", "step": 3, "total": 30}), then one chunk with the images and the seed of
each one. The file reads top to bottom: configuration, model load, request schema, inference,
response, the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

# Requests name LoRAs on the Hub at run time, so this worker keeps the Hub on even when every model
# its settings name is baked into the image or in Runpod's cache (startup.py would turn it off):
# those it loads from their snapshot folders (startup.local_model). HF_HUB_OFFLINE=1 still wins.
os.environ["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE") or "0"

import startup  # before every library: settles the device and the Hugging Face cache (startup.py)

import diffusers
import numpy as np
import runpod
import torch
from checkpoints import BASES, checkpoint_family, is_single_file, local_file
from coalesce import coalesced, keep_latest
from diffusers import (
    AutoencoderKL,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FluxControlNetModel,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SD3ControlNetModel,
    UniPCMultistepScheduler,
)
from families import FAMILIES, Family, detect_family, unsupported, with_overrides
from images import ImageInputError, ImageLimits, data_uri, encode_image, load_image
from loras import (
    Adapter,
    AdapterGate,
    AdapterSet,
    LoraError,
    adapter_set,
    default_cache_dir,
    parse_endpoint_loras,
    resolve,
)
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from runpod.serverless.utils import rp_upload

from local_run import for_local_run

log = runpod.RunPodLogger()
# diffusers warns with the cut-off part of any prompt over CLIP's 77 tokens: prompts stay out of logs.
diffusers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def env_flag(name: str, default: bool) -> bool:
    return (os.environ.get(name) or str(default)).lower() in ("1", "true", "yes")


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
# Seconds one request may denoise: well under Runpod's default execution timeout (600 s), so a
# runaway request ends with an answer instead of a killed job. 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 300.0)

# Request limits.
MAX_PIXELS = env_int("MAX_PIXELS", 1536 * 1536)  # output width × height: 2.25 MP stays inside 24 GB for SDXL
MAX_SIDE = 2048  # longest side, so the pixel budget cannot be spent on a 8x2048 sliver
MIN_SIDE = 64  # one 8x8 latent: anything smaller is not an image
MAX_STEPS = 150  # more steps than any scheduler benefits from
MAX_GUIDANCE = 30.0  # beyond this, classifier-free guidance only burns the image
MAX_IMAGES = env_int("MAX_IMAGES", 4)  # per request; each one costs a full denoising run
DEFAULT_STRENGTH = 0.8  # diffusers' own default: keeps the input's layout, repaints its details
MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; the cap only bounds nonsense
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
RANDOM_SEED_BOUND = 2**53  # drawn seeds stay exact in JavaScript's JSON numbers too
INPUT_LIMITS = ImageLimits(
    max_bytes=env_int("MAX_INPUT_IMAGE_BYTES", 20 * 1024 * 1024),  # a 20 MB photo is plenty, masks too
    max_pixels=env_int("MAX_INPUT_IMAGE_PIXELS", 4096 * 4096),  # bigger is resized anyway; refused before decoding
    timeout_s=env_float("DOWNLOAD_TIMEOUT_S", 15.0),  # a whole download, not each read
)

# LoRA adapters (loras.py). LORAS: the endpoint's own, loaded at start, as a JSON list of
# {"name", "source", "weight"}; a request names them (or any other source) in `loras`.
LORAS = env_str("LORAS", None)
MAX_LORAS_LOADED = env_int("MAX_LORAS_LOADED", 8)  # a LoRA is 10-200 MB of GPU memory; the LRU one goes
MAX_LORAS_PER_REQUEST = 4  # each one adds its layers' work to every UNet call
MAX_LORA_WEIGHT = 4.0  # weights past this only burn the image
LORA_LIMITS = ImageLimits(
    max_bytes=env_int("MAX_LORA_BYTES", 1024**3),  # the largest SDXL LoRAs (rank 128-256) are ~0.5-1 GB
    max_pixels=0,  # not an image
    timeout_s=env_float("LORA_DOWNLOAD_TIMEOUT_S", 300.0),  # 1 GB at ~30 Mbit/s; the whole download
)
LORA_CACHE = default_cache_dir()  # downloads, by URL: on the network volume when there is one

# Largest result a job may return: Runpod's /runsync limit (its /run limit is 10 MB: set 10000000
# for clients that use /run). It counts the whole aggregated result, progress chunks included.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
# Room for what surrounds the images in the result: parameters, timings, the job's id and status.
RESULT_ENVELOPE_BYTES = 4096
# A generated image's PNG takes at least about 1 byte per pixel (photographic SDXL output at 1024²
# is ~1.5-2 MB), and base64 adds a third: the floor used to refuse a request that cannot fit.
PNG_MIN_BYTES_PER_PIXEL = 1.0
BASE64_GROWTH = 4 / 3
WAYS_OUT = "configure S3 upload (BUCKET_ENDPOINT_URL and keys), ask for fewer images, or use output_format jpeg or webp"

# S3-compatible storage for outputs: all three set → images are uploaded and URLs returned.
BUCKET_ENDPOINT_URL = env_str("BUCKET_ENDPOINT_URL", None)
BUCKET_ACCESS_KEY_ID = env_str("BUCKET_ACCESS_KEY_ID", None)
BUCKET_SECRET_ACCESS_KEY = env_str("BUCKET_SECRET_ACCESS_KEY", None)
BUCKET_NAME = env_str("BUCKET_NAME", "runpod-images")  # the SDK's own default is the month ("11-26")
UPLOAD = bool(BUCKET_ENDPOINT_URL and BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY)
BUCKET_CREDENTIALS = {
    "endpointUrl": BUCKET_ENDPOINT_URL,
    "accessId": BUCKET_ACCESS_KEY_ID,
    "accessSecret": BUCKET_SECRET_ACCESS_KEY,
}

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"


# ---------------------------------------------------------------------------------------------
# 2. Model load: once per worker, at import, before the first job is taken.
# ---------------------------------------------------------------------------------------------
def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache)."""
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


DEVICE = startup.DEVICE  # "cuda"; "cpu" only when asked (DEVICE=cpu) or off Runpod: see startup.py
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
if DTYPE not in ("auto", *DTYPES):
    raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {DTYPE!r}")


def from_pretrained_fp16_first(loader: Any, name: str, **kwargs: Any) -> Any:
    """Most Hub repos publish an fp16 variant: half the download when we load in fp16 anyway."""
    if TORCH_DTYPE == torch.float16:
        try:
            return loader.from_pretrained(name, dtype=TORCH_DTYPE, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass  # no fp16 variant in this repo: load the full-precision files
    return loader.from_pretrained(name, dtype=TORCH_DTYPE, **kwargs)


def cast_vae_inputs_to_fp32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(arg.float() if torch.is_tensor(arg) else arg for arg in args)


def keep_vae_in_fp32(vae: Any) -> None:
    """SDXL's VAE overflows in fp16, so diffusers casts the *shared* VAE to fp32 around each decode
    (and each image-to-image encode) and back to fp16 afterwards. Two jobs at once then race: one
    job's cast lands in the middle of the other's decode ("Input type (c10::Half) and bias type
    (float) should be the same"). Instead the VAE is made fp32 once, here, and casts its inputs:
    the same fp32 arithmetic as diffusers' upcast, and nothing changes dtype while jobs run."""
    vae.to(torch.float32)
    vae.register_to_config(force_upcast=False)  # the pipelines' per-call upcast is now never taken
    for module in (vae.encoder, vae.quant_conv, vae.post_quant_conv, vae.decoder):
        if module is not None:
            module.register_forward_pre_hook(cast_vae_inputs_to_fp32)


if MODEL_FAMILY is not None and MODEL_FAMILY not in FAMILIES:
    raise ValueError(f"MODEL_FAMILY must be one of {', '.join(FAMILIES)}, got {MODEL_FAMILY!r}")
SINGLE_FILE = is_single_file(MODEL_NAME)
# A model baked into the image or in Runpod's cached models loads from its snapshot folder, without
# the Hub (startup.py); the Hub stays on for the rest: VAE_NAME, MODEL_CONFIG, LoRAs, other models.
MODEL_SOURCE = startup.local_model(MODEL_NAME, MODEL_REVISION) or MODEL_NAME
# Trained in bf16: in fp16 their activations overflow into black or noisy images.
BF16_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def pipeline_class_name() -> str:
    """The pipeline MODEL_NAME holds, told before any weights load: its family's for a single-file
    checkpoint, else the class its model_index.json names."""
    if SINGLE_FILE:
        repo = "/".join(MODEL_NAME.split("/")[:2])
        path = local_file(MODEL_NAME, MODEL_REVISION, cached_hub_folder(repo))
        return BASES[MODEL_FAMILY or checkpoint_family(path)].pipeline
    index = diffusers.DiffusionPipeline.load_config(
        MODEL_SOURCE, revision=MODEL_REVISION, cache_dir=cached_hub_folder(MODEL_NAME)
    )
    return index["_class_name"]


def auto_dtype(device: str, pipeline_class: Callable[[], str], bf16_supported: Callable[[], bool]) -> torch.dtype:
    """DTYPE=auto: fp32 on the CPU; on a GPU bf16 for FLUX.1 and SD 3.5 (where the GPU has it:
    Ampere and newer), fp16 for the UNet families (half the memory of fp32, the same images)."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if pipeline_class() in BF16_PIPELINES and bf16_supported() else torch.float16


TORCH_DTYPE = (
    DTYPES[DTYPE] if DTYPE != "auto" else auto_dtype(DEVICE, pipeline_class_name, torch.cuda.is_bf16_supported)
)


def load_single_file(components: dict[str, Any]) -> Any:
    """A single-file checkpoint (checkpoints.py): its family from MODEL_FAMILY or its keys, its
    configs and tokenizers from MODEL_CONFIG or the family's reference repo."""
    repo = "/".join(MODEL_NAME.split("/")[:2])
    path = local_file(MODEL_NAME, MODEL_REVISION, cached_hub_folder(repo))
    family = MODEL_FAMILY or checkpoint_family(path)
    base = BASES[family]
    config = MODEL_CONFIG or base.config
    pipeline_class = getattr(diffusers, base.pipeline)
    log.info(f"Single-file checkpoint: {family} ({base.pipeline}), configs from {config}")
    return pipeline_class.from_single_file(
        path,
        config=startup.local_model(config) or config,
        dtype=TORCH_DTYPE,
        cache_dir=cached_hub_folder(config),
        **components,
    )


def controlnet_class(pipeline: Any) -> type:
    """diffusers has one ControlNet class per kind of denoiser: UNet families (SD 1.x, 2.x, SDXL)
    share ControlNetModel; FLUX's and SD 3.5's transformers have their own."""
    name = type(pipeline).__name__
    if name.startswith("Flux"):
        return FluxControlNetModel
    if name.startswith("StableDiffusion3"):
        return SD3ControlNetModel
    return ControlNetModel


def load_pipelines() -> tuple[Any, Any, Any, Any | None]:
    """Text-to-image, image-to-image, inpainting and (optionally) ControlNet pipelines over one set of weights."""
    components: dict[str, Any] = {}
    if VAE_NAME:
        vae = startup.local_model(VAE_NAME) or VAE_NAME
        components["vae"] = from_pretrained_fp16_first(AutoencoderKL, vae, cache_dir=cached_hub_folder(VAE_NAME))
    if SINGLE_FILE:
        text2image = load_single_file(components)
    else:
        text2image = from_pretrained_fp16_first(
            AutoPipelineForText2Image,
            MODEL_SOURCE,
            revision=MODEL_REVISION,
            cache_dir=cached_hub_folder(MODEL_NAME),
            **components,
        )
    if text2image.vae.dtype == torch.float16 and text2image.vae.config.get("force_upcast"):
        keep_vae_in_fp32(text2image.vae)
    if ENABLE_CPU_OFFLOAD and DEVICE == "cuda":
        text2image.enable_model_cpu_offload()
    else:
        text2image.to(DEVICE)
    if ENABLE_VAE_TILING:
        text2image.vae.enable_tiling()
    text2image.set_progress_bar_config(disable=True)
    if TORCH_COMPILE:  # the denoiser: a UNet (SD, SDXL) or a transformer (FLUX, SD 3.5)
        name = "transformer" if getattr(text2image, "transformer", None) is not None else "unet"
        setattr(text2image, name, torch.compile(getattr(text2image, name), mode=TORCH_COMPILE_MODE, fullgraph=True))

    # from_pipe shares every component: no second copy of the weights in memory. Inpainting
    # with a text-to-image model's UNet repaints the masked area and keeps the rest's latents.
    image2image = AutoPipelineForImage2Image.from_pipe(text2image)
    inpainting = AutoPipelineForInpainting.from_pipe(text2image)
    controlnet = None
    if CONTROLNET_MODEL:
        source = startup.local_model(CONTROLNET_MODEL) or CONTROLNET_MODEL
        model = from_pretrained_fp16_first(
            controlnet_class(text2image), source, cache_dir=cached_hub_folder(CONTROLNET_MODEL)
        ).to(DEVICE)
        controlnet = AutoPipelineForText2Image.from_pipe(text2image, controlnet=model)
    for pipeline in (image2image, inpainting, controlnet):
        if pipeline is not None:
            pipeline.set_progress_bar_config(disable=True)
    return text2image, image2image, inpainting, controlnet


startup.COLD_START.done("imports")  # the download is timed apart from the load
FP16_VARIANT = "fp16" if TORCH_DTYPE == torch.float16 else None  # the half-size files, when loading fp16
# A single file downloads as it loads (hf_hub_download); prefetch knows repos and folders only.
startup.prefetch(None if SINGLE_FILE else MODEL_NAME, CONTROLNET_MODEL, revision=MODEL_REVISION, variant=FP16_VARIANT)
_load_started = time.perf_counter()
# A bad checkpoint stops here with CheckpointError, naming the setting to fix.
TEXT2IMAGE, IMAGE2IMAGE, INPAINTING, CONTROLNET = load_pipelines()
FAMILY: Family = with_overrides(
    FAMILIES[MODEL_FAMILY] if MODEL_FAMILY else detect_family(TEXT2IMAGE),
    DEFAULT_STEPS,
    DEFAULT_GUIDANCE,
    DEFAULT_WIDTH,
    DEFAULT_HEIGHT,
    DEFAULT_SCHEDULER,
)
log.info(
    f"Loaded {MODEL_NAME} ({FAMILY.name}, {type(TEXT2IMAGE).__name__}) on {DEVICE} ({TORCH_DTYPE}) in "
    f"{time.perf_counter() - _load_started:.1f}s; ControlNet: {CONTROLNET_MODEL or 'none'}; "
    f"outputs: {'S3 bucket ' + BUCKET_NAME if UPLOAD else 'data URIs'}"
)
startup.COLD_START.report(f"load to {DEVICE}")

# LoRA adapters load into the shared modules; the gate lets only jobs wanting the same ones run together.
GATE = AdapterGate(TEXT2IMAGE, MAX_LORAS_LOADED, pinned=set())
ENDPOINT_LORAS: dict[str, Adapter] = {}
ENDPOINT_LORA_WEIGHTS: dict[str, float] = {}
for _index, _entry in enumerate(parse_endpoint_loras(LORAS)):
    _adapter = resolve(f"LORAS[{_index}]", _entry["source"], {}, LORA_CACHE, LORA_LIMITS)
    ENDPOINT_LORAS[_entry["name"]] = _adapter
    ENDPOINT_LORA_WEIGHTS[_entry["name"]] = _entry["weight"]
    GATE.pinned.add(_adapter.name)
GATE.preload([(adapter, f"LORAS ({name})") for name, adapter in ENDPOINT_LORAS.items()])

# Denoising runs on these threads; the event loop stays free to stream progress and take jobs.
PIPELINE_THREADS = ThreadPoolExecutor(max_workers=MAX_CONCURRENCY, thread_name_prefix="denoise")


# ---------------------------------------------------------------------------------------------
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


# Each name → (scheduler class, settings). "default" keeps the model's own scheduler.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"clip_sample": False}),  # clipping is for pixel-space models, not latents
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    # few-step distilled SDXL (Lightning, Hyper-SD) is trained on the last timesteps
    "euler-trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SchedulerName = Literal[
    "default", "ddim", "pndm", "lms", "euler", "euler-a", "euler-trailing", "heun", "dpm++2m", "dpm++2m-karras", "unipc"
]
if FAMILY.scheduler not in ("default", *SCHEDULERS):
    raise ValueError(f"DEFAULT_SCHEDULER must be one of {', '.join(SCHEDULERS)}, got {FAMILY.scheduler!r}")
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class LoraSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # an endpoint LoRA's name, an absolute path, an http(s) URL, owner/repo or owner/repo/file.safetensors
    source: Annotated[str, Field(min_length=1, max_length=2048)]
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)] | None = None  # default: 1, or LORAS'


class ImageRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt field is an error, not ignored

    prompt: PromptText
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    width: Side | None = None  # default: the model family's (SDXL 1024, SD 1.5 512), or the input image's
    height: Side | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    guidance_scale: Annotated[float, Field(ge=0, le=MAX_GUIDANCE)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None  # image i gets seed + i
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    batch: bool | None = None  # num_images as one batch (default: BATCH_IMAGES); close to, not bit-equal to, solo runs
    scheduler: SchedulerName = "default"
    image: str | None = None  # image-to-image: URL, data URI or base64
    strength: Annotated[float, Field(gt=0, le=1)] | None = None  # how far from `image`: 1 ignores it
    mask: str | None = None  # inpainting, with `image`: white repaints, black keeps (URL, data URI or base64)
    control_image: str | None = None  # ControlNet conditioning (needs CONTROLNET_MODEL)
    controlnet_conditioning_scale: Annotated[float, Field(ge=0, le=2)] = 1.0
    canny: bool = False  # turn a plain photo into the edge map a Canny ControlNet expects
    canny_low_threshold: Annotated[int, Field(ge=0, le=255)] = 100
    canny_high_threshold: Annotated[int, Field(ge=0, le=255)] = 200
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: Annotated[int, Field(ge=1, le=100)] = 90  # jpeg and webp only
    loras: Annotated[list[LoraSpec], Field(max_length=MAX_LORAS_PER_REQUEST)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ImageRequest:
        if self.width and self.height and self.width * self.height > MAX_PIXELS:
            raise PydanticCustomError(
                "pixel_budget",
                f"width × height is {self.width}x{self.height} = {self.width * self.height} pixels,"
                f" over the budget of {MAX_PIXELS} (MAX_PIXELS)",
            )
        if self.image is not None and self.control_image is not None:
            raise PydanticCustomError(
                "exclusive", "send image (image-to-image) or control_image (ControlNet), not both"
            )
        if self.strength is not None and self.image is None:
            raise PydanticCustomError("strength", "strength is only used with image (image-to-image)")
        if self.mask is not None and self.image is None:
            raise PydanticCustomError("mask", "mask needs image: inpainting repaints the masked part of image")
        controlnet_only = {"canny", "controlnet_conditioning_scale", "canny_low_threshold", "canny_high_threshold"}
        if self.control_image is None and (given := sorted(controlnet_only & self.model_fields_set)):
            raise PydanticCustomError(
                "controlnet_only", f"{', '.join(given)} only apply with control_image (ControlNet), which is missing"
            )
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise PydanticCustomError("seed", f"seed + num_images - 1 must be at most {MAX_SEED}")
        return self


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field: "width: Input should be a multiple of 8"."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "input"
        problems.append(f"{field}: {item['msg']}")
    return "; ".join(problems)


def parse_request(job_input: Any) -> ImageRequest:
    """Validate a job's input. Pure: no model, no I/O (images are fetched later)."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    try:
        request = ImageRequest.model_validate(job_input)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error)) from None
    if request.control_image is not None and CONTROLNET is None:
        raise RequestError("control_image needs a ControlNet: set CONTROLNET_MODEL on the endpoint")
    if problem := unsupported(FAMILY, bool(request.negative_prompt), request.guidance_scale, request.scheduler):
        raise RequestError(problem)
    for field in ("width", "height"):
        if (side := getattr(request, field)) is not None and side % FAMILY.size_multiple:
            raise RequestError(f"{field}: {FAMILY.describe()} takes multiples of {FAMILY.size_multiple}, got {side}")
    return request


# ---------------------------------------------------------------------------------------------
# 4. Inference: sizes, seeds, a scheduler of the request's own, denoising on a thread.
# ---------------------------------------------------------------------------------------------
def fit_size(width: int, height: int, target_pixels: int, max_pixels: int, multiple: int = 8) -> tuple[int, int]:
    """An output size with the input's aspect ratio, about `target_pixels`, in multiples of `multiple`."""
    scale = (min(target_pixels, max_pixels) / (width * height)) ** 0.5
    fitted = [max(MIN_SIDE, min(MAX_SIDE, int(side * scale) // multiple * multiple)) for side in (width, height)]
    while fitted[0] * fitted[1] > max_pixels:  # rounding and MIN_SIDE can overshoot by a little
        fitted = [max(MIN_SIDE, side - multiple) for side in fitted]
    return fitted[0], fitted[1]


def output_size(request: ImageRequest, source: Image.Image | None) -> tuple[int, int]:
    """The requested size; a missing side follows the input image's aspect (or the family default)."""
    if request.width and request.height:
        return request.width, request.height
    if source is None:
        return request.width or FAMILY.width, request.height or FAMILY.height
    multiple = FAMILY.size_multiple
    if request.width:
        return request.width, max(MIN_SIDE, round(request.width * source.height / source.width / multiple) * multiple)
    if request.height:
        return max(MIN_SIDE, round(request.height * source.width / source.height / multiple) * multiple), request.height
    return fit_size(source.width, source.height, FAMILY.width * FAMILY.height, MAX_PIXELS, multiple)


def default_steps(request: ImageRequest, image_to_image: bool) -> int:
    """The family's steps; with an input image, at least enough for strength to run one step
    (SDXL Turbo's single step × strength 0.8 would run none)."""
    if request.num_inference_steps is not None:
        return request.num_inference_steps
    if image_to_image:
        if (request.strength or DEFAULT_STRENGTH) * MAX_STEPS < 1:
            raise RequestError(f"strength must be at least {1 / MAX_STEPS:g}: lower strengths run no step")
        return max(FAMILY.steps, math.ceil(1 / (request.strength or DEFAULT_STRENGTH)))
    return FAMILY.steps


def image_seeds(seed: int | None, count: int) -> list[int]:
    """Seed i reproduces image i alone: a request with that seed and one image gives it back."""
    first = seed if seed is not None else secrets.randbelow(RANDOM_SEED_BOUND - count)
    return [first + index for index in range(count)]


def canny_edges(image: Image.Image, low: int, high: int) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(edges).convert("RGB")


@dataclass
class Job:
    """Everything one denoising run needs, resolved before the first chunk is yielded."""

    request: ImageRequest
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str  # a key of SCHEDULERS, or "default": the model's own
    seeds: list[int]
    source: Image.Image | None = None  # image-to-image input, resized
    mask: Image.Image | None = None  # inpainting mask (L mode), resized like source
    batch: bool = False  # the images as one batch, not one after another
    control: Image.Image | None = None  # ControlNet conditioning, resized
    adapters: AdapterSet = ()  # LoRA adapters and their weights
    adapter_fields: tuple[str, ...] = ()  # the request field of each, for errors

    def parameters(self) -> dict[str, Any]:
        """What was actually used, so a caller can reproduce the output."""
        used: dict[str, Any] = {
            "model": MODEL_NAME,
            "family": FAMILY.name,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "scheduler": self.scheduler,
            "num_images": len(self.seeds),
            "output_format": self.request.output_format,
        }
        if self.source is not None:
            used["strength"] = self.strength
        if self.mask is not None:
            used["inpainting"] = True
        if len(self.seeds) > 1:
            used["batch"] = self.batch
        if self.control is not None:
            used["controlnet_conditioning_scale"] = self.request.controlnet_conditioning_scale
            used["canny"] = self.request.canny
        if self.request.loras:
            used["loras"] = [{"source": lora.source, "weight": weight_of(lora)} for lora in self.request.loras]
        return used

    @property
    def strength(self) -> float:
        return self.request.strength if self.request.strength is not None else DEFAULT_STRENGTH


def smallest_result_bytes(output_format: str, num_images: int, width: int, height: int) -> int:
    """A floor on the images' size as data URIs, to refuse before the work a result that cannot
    fit. PNG only: a JPEG or WebP can be small enough for any size."""
    if output_format != "png":
        return 0
    return int(num_images * width * height * PNG_MIN_BYTES_PER_PIXEL * BASE64_GROWTH)


def weight_of(lora: LoraSpec) -> float:
    if lora.weight is not None:
        return lora.weight
    return ENDPOINT_LORA_WEIGHTS.get(lora.source, 1.0)


def resolve_loras(request: ImageRequest) -> tuple[AdapterSet, tuple[str, ...]]:
    """Each requested adapter as a local file (downloaded or fetched from the Hub if need be)."""
    chosen: dict[str, tuple[Adapter, float, str]] = {}
    for index, lora in enumerate(request.loras or []):
        field = f"loras.{index}.source"
        adapter = resolve(field, lora.source, ENDPOINT_LORAS, LORA_CACHE, LORA_LIMITS)
        if adapter.name in chosen:
            raise RequestError(f"{field}: the same adapter twice; give it one weight")
        chosen[adapter.name] = (adapter, weight_of(lora), field)
    adapters = adapter_set([(adapter, weight) for adapter, weight, _ in chosen.values()])
    fields = {adapter.name: field for adapter, _, field in chosen.values()}
    return adapters, tuple(fields[adapter.name] for adapter, _ in adapters)


def prepare(request: ImageRequest) -> Job:
    """Fetch and fit the input images and settle every setting. Blocking: runs off the event loop."""
    source = load_image("image", request.image, INPUT_LIMITS) if request.image else None
    control = load_image("control_image", request.control_image, INPUT_LIMITS) if request.control_image else None
    mask = load_image("mask", request.mask, INPUT_LIMITS) if request.mask else None
    if mask is not None and source is not None and mask.size != source.size:
        raise RequestError(
            f"mask: {mask.width}x{mask.height} does not match image's {source.width}x{source.height}:"
            " send a mask of the image's size"
        )
    width, height = output_size(request, source or control)
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise RequestError(
            f"width × height is {width}x{height} = {width * height} pixels, over the budget of {MAX_PIXELS}"
            f" (MAX_PIXELS) or a side over {MAX_SIDE}"
        )
    floor = smallest_result_bytes(request.output_format, request.num_images, width, height)
    if not UPLOAD and floor > MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES:
        raise RequestError(
            f"{request.num_images} PNG image(s) of {width}x{height} come to at least {floor} bytes as data URIs,"
            f" over the result limit of {MAX_RESULT_BYTES} bytes (MAX_RESULT_BYTES): {WAYS_OUT}"
        )
    steps = default_steps(request, source is not None)
    strength = request.strength or DEFAULT_STRENGTH
    adapters, fields = resolve_loras(request)
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
    )


_THREAD_LOCAL = threading.local()


def thread_tokenizers() -> dict[str, Any]:
    """Tokenizers of this thread's own: a fast tokenizer keeps its padding settings on the object,
    so two threads sharing one get each other's padding."""
    if not hasattr(_THREAD_LOCAL, "tokenizers"):
        _THREAD_LOCAL.tokenizers = {
            name: copy.deepcopy(getattr(TEXT2IMAGE, name))
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(TEXT2IMAGE, name, None) is not None
        }
    return _THREAD_LOCAL.tokenizers


def pipeline_for(job: Job) -> Any:
    """A pipeline of this request's own over the shared weights.

    Schedulers keep state while they denoise (their timesteps, step index, past outputs), so
    every request gets a fresh one, of the requested kind, and nothing it sets outlives it.
    """
    if job.control is not None:
        base = CONTROLNET
    elif job.mask is not None:
        base = INPAINTING
    else:
        base = IMAGE2IMAGE if job.source is not None else TEXT2IMAGE
    if job.scheduler == "default":
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
    else:
        scheduler_class, settings = SCHEDULERS[job.scheduler]
        scheduler = scheduler_class.from_config(base.scheduler.config, **settings)
    # A shallow copy: the same modules, but attributes (scheduler, tokenizers, the per-call state
    # diffusers keeps on the pipeline object) of its own. Not from_pipe, which ends with
    # `.to(dtype)` on every shared module: a cast under the feet of a concurrent job.
    pipeline = copy.copy(base)
    for name, component in {"scheduler": scheduler, **thread_tokenizers()}.items():
        setattr(pipeline, name, component)
    return pipeline


@dataclass(frozen=True)
class Generated:
    image: Image.Image
    nsfw: bool | None  # None: the model has no safety checker


# diffusers' SD 3.5 ControlNet pipeline samples the control image's latents from torch's global
# generator instead of the job's, so the same seed gave another image each time. Such jobs seed the
# global generator themselves, one at a time (nothing else here draws from it).
GLOBAL_GENERATOR = threading.Lock()


def denoise(job: Job, on_step: Any, cancelled: threading.Event) -> list[Generated]:
    """One image at a time, each from its own generator: bit-for-bit what a one-image request
    with that seed gives. Batched (job.batch), one pipeline call makes them all, still one
    generator per image, so each starts from its seed's own noise; the batched arithmetic
    (other kernel shapes and reduction orders) makes it close to its solo run, not bit-equal."""
    pipeline = pipeline_for(job)
    runs = [job.seeds] if job.batch else [[seed] for seed in job.seeds]

    def step_end_for(run_index: int) -> Any:
        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # The scheduler's own step count: PNDM adds warm-up steps, image-to-image runs
            # only strength × num_inference_steps of them.
            per_run = pipe.num_timesteps
            on_step(run_index * per_run + step + 1, per_run * len(runs))
            if cancelled.is_set():
                pipe._interrupt = True  # diffusers' own way to stop a run between steps
            return tensors

        return step_end

    kwargs: dict[str, Any] = {
        "prompt": job.request.prompt,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
    }
    if FAMILY.negative_prompt:
        kwargs["negative_prompt"] = job.request.negative_prompt
    if FAMILY.max_sequence_length:
        kwargs["max_sequence_length"] = FAMILY.max_sequence_length
    if job.source is not None:
        kwargs.update(image=job.source, strength=job.strength)
    # Text-to-image, inpainting and FLUX's image-to-image take the size (else their model's default,
    # 1024² for FLUX, not the input's); SD's image-to-image pipelines have no such parameter.
    if "width" in inspect.signature(type(pipeline).__call__).parameters:
        kwargs.update(width=job.width, height=job.height)
    if job.mask is not None:
        kwargs["mask_image"] = job.mask
    if job.control is not None:
        # SD's ControlNet pipelines name the conditioning `image`; FLUX's and SD 3.5's `control_image`.
        name = "control_image" if "control_image" in inspect.signature(type(pipeline).__call__).parameters else "image"
        kwargs.update({name: job.control, "controlnet_conditioning_scale": job.request.controlnet_conditioning_scale})

    def give_up_when_cancelled() -> None:
        if cancelled.is_set():
            raise TimeLimitExceeded  # or the job was cancelled: nobody waits for it any more

    seeds_global = job.control is not None and isinstance(CONTROLNET.controlnet, SD3ControlNetModel)
    images = []
    with GATE.using(job.adapters, list(job.adapter_fields), on_wait=give_up_when_cancelled):
        for index, seeds in enumerate(runs):
            if cancelled.is_set():
                break
            # Noise drawn on the CPU: a seed gives the same starting latents on every machine.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            with GLOBAL_GENERATOR if seeds_global else contextlib.nullcontext(), torch.inference_mode():
                if seeds_global:
                    torch.manual_seed(seeds[0])
                result = pipeline(
                    generator=generators if job.batch else generators[0],
                    num_images_per_prompt=len(seeds),
                    callback_on_step_end=step_end_for(index),
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
    request = ImageRequest(prompt="warm-up", seed=0, num_inference_steps=WARMUP_STEPS)
    denoise(prepare(request), lambda step, total: None, threading.Event())
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# 5. Response: encoded images (data URIs, or URLs in S3-compatible storage), seeds, timings.
# ---------------------------------------------------------------------------------------------
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def upload(job_id: str, index: int, seed: int, data: bytes, output_format: str) -> str:
    """Store one image with the SDK's S3 helper and return its presigned URL (valid 7 days)."""
    with tempfile.NamedTemporaryFile(suffix=f".{output_format}") as file:
        file.write(data)
        file.flush()
        return rp_upload.upload_file_to_bucket(
            file_name=f"{index}-{seed}.{output_format}",
            file_location=file.name,
            bucket_creds=BUCKET_CREDENTIALS,
            bucket_name=BUCKET_NAME,
            prefix=job_id,
            extra_args={"ContentType": MIME[output_format]},
        )


class DeliveryError(Exception):
    """Finished images that cannot reach the caller; the message says why and what to change."""


def upload_failure(error: Exception) -> str:
    """An upload's failure as the caller can act on it: the bucket, and S3's error code and HTTP
    status when the bucket answered (boto3 wraps S3's answer; the keys are never in it)."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ClientError):
        code = cause.response.get("Error", {}).get("Code", "unknown error")
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"the upload to bucket {BUCKET_NAME!r} failed: {code} (HTTP {status})"
    return f"the upload to bucket {BUCKET_NAME!r} failed: {type(error).__name__} (no answer from BUCKET_ENDPOINT_URL)"


def inline_size(located: list[str]) -> int:
    return sum(len(where) for where in located)


def deliver(
    job_id: str, job: Job, images: list[Generated], budget: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Encode (and upload) every image within `budget` bytes of result; returns the images with
    their seeds, and the time each part took. An upload that fails falls back to data URIs when
    they fit, with the upload's error in each image; otherwise DeliveryError says why."""
    started = time.perf_counter()
    fmt = job.request.output_format
    encoded = [encode_image(generated.image, fmt, job.request.output_quality) for generated in images]
    timings = {"encode_ms": (time.perf_counter() - started) * 1000}
    located: list[str] | None = None
    upload_error = None
    if UPLOAD:
        started = time.perf_counter()
        try:
            located = [
                upload(job_id, i, seed, data, fmt)
                for i, (seed, data) in enumerate(zip(job.seeds, encoded, strict=True))
            ]
        except Exception as error:  # noqa: BLE001 - boto3 and botocore raise many types; all are reported
            upload_error = upload_failure(error)
            log.error(f"{upload_error}: {type(error).__name__}: {error}", job_id)
        timings["upload_ms"] = (time.perf_counter() - started) * 1000
    if located is None:
        located = [data_uri(data, fmt) for data in encoded]
        if inline_size(located) > budget:
            size = f"the {len(located)} image(s) come to {inline_size(located)} bytes as data URIs"
            if upload_error:
                raise DeliveryError(
                    f"{upload_error}, and {size}, over the result limit of {MAX_RESULT_BYTES} bytes (MAX_RESULT_BYTES)"
                    " to return them inline: fix the bucket, or ask for fewer images or output_format jpeg or webp"
                )
            raise DeliveryError(
                f"{size}, over the result limit of {MAX_RESULT_BYTES} bytes (MAX_RESULT_BYTES): {WAYS_OUT}"
            )
    results = []
    for where, seed, generated in zip(located, job.seeds, images, strict=True):
        result: dict[str, Any] = {"image": where, "seed": seed}
        if upload_error:
            result["upload_error"] = upload_error
        if generated.nsfw is not None:
            result["nsfw_content_detected"] = generated.nsfw
        results.append(result)
    return results, timings


class TimeLimitExceeded(Exception):
    """Denoising ran past MAX_GENERATION_SECONDS; it is interrupted at its next step."""


def progress_chunk(step: int, total: int) -> dict[str, Any]:
    return {"status": "progress", "step": step, "total": total}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate and fetch before the first yield, then stream progress and images.
# ---------------------------------------------------------------------------------------------
async def image_stream(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """One job's chunks: a clear error, or progress then the images."""
    job_id = str(job.get("id"))
    loop = asyncio.get_running_loop()
    try:
        request = parse_request(job.get("input"))
        prepared = await loop.run_in_executor(None, prepare, request)
    except (RequestError, ImageInputError, LoraError) as error:
        log.warn(f"Rejected request: {error}", job_id)
        yield {"error": str(error)}
        return

    # Only the newest step waits to be streamed: a step overtaken by a newer one is dropped, never
    # queued, and once the images are ready no progress is sent before them.
    newest: list[tuple[int, int]] = []
    stepped = asyncio.Event()
    cancelled = threading.Event()

    def note_step(step: int, total: int) -> None:
        newest[:] = [(step, total)]
        stepped.set()

    def on_step(step: int, total: int) -> None:
        loop.call_soon_threadsafe(note_step, step, total)

    started = time.perf_counter()
    deadline = loop.time() + MAX_GENERATION_SECONDS if MAX_GENERATION_SECONDS else None
    running = loop.run_in_executor(PIPELINE_THREADS, denoise, prepared, on_step, cancelled)
    streamed_bytes = 0  # the progress chunks are part of the aggregated result too
    try:
        while not running.done():
            waiter = asyncio.ensure_future(stepped.wait())
            remaining = None if deadline is None else max(deadline - loop.time(), 0)
            await asyncio.wait({waiter, running}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if running.done():
                break  # the images are ready: progress not yet sent is stale
            if not stepped.is_set():  # the time limit passed first
                raise TimeLimitExceeded
            stepped.clear()
            chunk = progress_chunk(*newest[0])
            streamed_bytes += len(json.dumps(chunk)) + 2  # the chunk and its separator in the result list
            yield chunk
        images = running.result()
        inference_ms = (time.perf_counter() - started) * 1000
        budget = MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES - streamed_bytes
        results, timings = await loop.run_in_executor(None, deliver, job_id, prepared, images, budget)
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
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the memory back so the next job can run
        log.error(f"Out of GPU memory at {prepared.width}x{prepared.height}", job_id)
        yield {"error": "out of GPU memory for this size: lower width and height or num_images"}
        return
    except torch.AcceleratorError:
        # The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers.
        WORKER_CONFIG["refresh_worker"] = True
        log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
        yield {"error": "the GPU failed while generating; retry the request"}
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        log.error(f"Generation failed: {type(error).__name__}: {error}", job_id)
        yield {"error": "image generation failed inside the worker; see the worker logs"}
        return
    finally:
        # Reached when the job is cancelled or its consumer leaves too: stop at the next step.
        cancelled.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(running)

    log.info(
        f"{len(results)} image(s) {prepared.width}x{prepared.height}, {prepared.steps} steps in {inference_ms:.0f} ms",
        job_id,
    )
    yield {"images": results, "parameters": prepared.parameters(), "timings": {"inference_ms": inference_ms, **timings}}


def is_progress(chunk: Any) -> bool:
    return isinstance(chunk, dict) and chunk.get("status") == "progress"


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    # The SDK POSTs each chunk and waits for that POST before asking for the next: coalesced keeps
    # the job running meanwhile, and of the progress that piled up during a POST sends the newest.
    async for chunk in coalesced(image_stream(job), keep_latest(is_progress)):
        yield chunk


if TORCH_COMPILE:
    # On the denoising thread, where jobs will run: CUDA graphs are recorded per thread.
    log.info(f"Warm-up image (TORCH_COMPILE) done in {PIPELINE_THREADS.submit(warm_up).result():.1f}s")
    startup.COLD_START.report("compile warm-up")

WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    "return_aggregate_stream": True,  # /runsync and /status get every chunk, not []
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
