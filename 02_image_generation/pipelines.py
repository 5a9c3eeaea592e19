"""The diffusers pipelines: loaded once over one set of weights, and a light copy of one per request.

Loading (`load_pipelines`): the dtype (`auto_dtype`, told before any weights load), the published
fp16 weight variant, a replacement VAE and SDXL's VAE kept in fp32 (`needs_fp32_vae`), a single-file
checkpoint, the ControlNet class that fits the denoiser, bitsandbytes quantization of the big modules as
they load (`quantization_config`), and torch.compile; a pipeline of another kind stops the worker
(families.require_supported). Text-to-image, image-to-image, inpainting and
ControlNet then share every module.

Serving (`own_copy`, `call_arguments`, `step_reporter`, `global_seed`): a request's own scheduler
and tokenizers over those shared modules, so nothing a request sets outlives it; each pipeline's
names for a job's inputs; the step callback that reports progress and stops a cancelled run.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hub_cache  # before every library: settles the Hugging Face cache (hub_cache.py)

import diffusers
import runpod
import torch
import transformers
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
from diffusers.quantizers import PipelineQuantizationConfig

from checkpoints import BASES, checkpoint_family, local_file
from families import Family, require_supported
from planning import Job

log = runpod.RunPodLogger()

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Trained in bf16: in fp16 their activations overflow into black or noisy images.
BF16_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")
# The pipelines whose fp16 VAE diffusers runs in fp32 when its config says force_upcast: SDXL's,
# whose VAE overflows in fp16. SD 1.x/2.x, FLUX.1 and SD 3.5 run theirs in the model's dtype (their
# image-to-image and inpainting would hand an fp32 VAE's latents to the fp16 denoiser as they are).
FP32_VAE_PIPELINES = ("StableDiffusionXLPipeline",)
# QUANTIZATION → bitsandbytes' settings, the same for diffusers' and transformers' BitsAndBytesConfig:
# NF4 (4-bit NormalFloat, bitsandbytes' and diffusers' recommended 4-bit type: ~0.56 bytes a weight
# with its scales) or LLM.int8 (~1 byte a weight). Computing happens in the model's dtype (bf16).
QUANTIZATIONS: dict[str, dict[str, Any]] = {
    "bnb-4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bnb-8bit": {"load_in_8bit": True},
}
# What quantizes, per pipeline: the modules that hold most of the weights, the transformer (diffusers)
# and the T5-XXL text encoder (transformers; 4.7B parameters). CLIP and the VAE (~0.1-0.8B) stay as
# they are. SD 1.x/2.x and SDXL fit a 24 GB GPU in fp16 and are not wired: QUANTIZATION is refused there.
QUANTIZED_MODULES: dict[str, dict[str, str]] = {
    "FluxPipeline": {"transformer": "diffusers", "text_encoder_2": "transformers"},
    "StableDiffusion3Pipeline": {"transformer": "diffusers", "text_encoder_3": "transformers"},
}


# ---- loading, once per worker ---------------------------------------------------------------
def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache)."""
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


@dataclass(frozen=True)
class ModelSpec:
    """What the endpoint's settings name to load (handler.py reads them)."""

    name: str  # MODEL_NAME: a Hub id, a local folder, or a .safetensors/.ckpt file
    revision: str | None  # MODEL_REVISION
    source: str  # where `name` loads from: its local snapshot folder (hub_cache.local_model), else `name`
    single_file: bool  # `name` is one checkpoint file (checkpoints.py)
    family: str | None  # MODEL_FAMILY: what a single file is when its keys cannot tell
    config: str | None  # MODEL_CONFIG: a single file's configs and tokenizers
    vae: str | None  # VAE_NAME: a replacement VAE
    controlnet: str | None  # CONTROLNET_MODEL

    def checkpoint(self) -> str:
        """A single-file checkpoint as a local path (downloaded from the Hub if need be)."""
        repo = "/".join(self.name.split("/")[:2])
        return local_file(self.name, self.revision, cached_hub_folder(repo))

    def pipeline_class_name(self) -> str:
        """The pipeline the model holds, told before any weights load: its family's for a
        single-file checkpoint, else the class its model_index.json names."""
        if self.single_file:
            return BASES[self.family or checkpoint_family(self.checkpoint())].pipeline
        index = diffusers.DiffusionPipeline.load_config(
            self.source, revision=self.revision, cache_dir=cached_hub_folder(self.name)
        )
        return index["_class_name"]


def auto_dtype(device: str, pipeline_class: Callable[[], str], bf16_supported: Callable[..., bool]) -> torch.dtype:
    """DTYPE=auto: fp32 on the CPU; on a GPU bf16 for FLUX.1 and SD 3.5 (where the GPU has it:
    Ampere and newer), fp16 for the UNet families (half the memory of fp32, the same images).

    bf16_supported is torch.cuda.is_bf16_supported, asked without emulation: by default it also
    says yes on Turing (T4, RTX 20xx), which has no bf16 units and would run it emulated, slowly."""
    if device != "cuda":
        return torch.float32
    native_bf16 = pipeline_class() in BF16_PIPELINES and bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def quantization_config(
    quantization: str | None, pipeline_class: str, single_file: bool, dtype: torch.dtype
) -> PipelineQuantizationConfig | None:
    """diffusers' own pipeline-level quantization for QUANTIZATION (None: none asked), or ValueError at
    start, before any download, naming what is wired: the pipelines of QUANTIZED_MODULES, from a
    diffusers folder or repo (diffusers quantizes a pipeline's modules as from_pretrained loads them)."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if pipeline_class not in QUANTIZED_MODULES:
        raise ValueError(
            f"QUANTIZATION={quantization}: quantization is wired for FLUX.1 and SD 3.5 (their transformer and"
            f" T5 encoder), and the model loads as {pipeline_class}, which fits a 24 GB GPU in fp16: unset QUANTIZATION"
        )
    if single_file:
        raise ValueError(
            f"QUANTIZATION={quantization} needs a diffusers folder or repo in MODEL_NAME, not a single file"
        )
    settings = QUANTIZATIONS[quantization]
    if "load_in_4bit" in settings:
        settings = settings | {"bnb_4bit_compute_dtype": dtype}
    library = {"diffusers": diffusers.BitsAndBytesConfig, "transformers": transformers.BitsAndBytesConfig}
    mapping = {name: library[owner](**settings) for name, owner in QUANTIZED_MODULES[pipeline_class].items()}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def from_pretrained_fp16_first(loader: Any, name: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """Most Hub repos publish an fp16 variant: half the download when we load in fp16 anyway."""
    if dtype == torch.float16:
        try:
            return loader.from_pretrained(name, dtype=dtype, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass  # no fp16 variant in this repo: load the full-precision files
    return loader.from_pretrained(name, dtype=dtype, **kwargs)


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


def needs_fp32_vae(pipeline: Any) -> bool:
    """Where diffusers itself decodes in fp32: an fp16 VAE that says force_upcast, in a pipeline that
    reads it (FP32_VAE_PIPELINES). A VAE that decodes in fp16 (madebyollin/sdxl-vae-fp16-fix) says not."""
    vae = pipeline.vae
    return (
        type(pipeline).__name__ in FP32_VAE_PIPELINES
        and vae.dtype == torch.float16
        and bool(vae.config.get("force_upcast"))
    )


def load_single_file(model: ModelSpec, dtype: torch.dtype, components: dict[str, Any]) -> Any:
    """A single-file checkpoint (checkpoints.py): its family from MODEL_FAMILY or its keys, its
    configs and tokenizers from MODEL_CONFIG or the family's reference repo."""
    path = model.checkpoint()
    family = model.family or checkpoint_family(path)
    base = BASES[family]
    config = model.config or base.config
    pipeline_class = getattr(diffusers, base.pipeline)
    log.info(f"Single-file checkpoint: {family} ({base.pipeline}), configs from {config}")
    return pipeline_class.from_single_file(
        path,
        config=hub_cache.local_model(config) or config,
        dtype=dtype,
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


def load_pipelines(
    model: ModelSpec,
    dtype: torch.dtype,
    device: str,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
    compile_mode: str | None = None,
    quantization: PipelineQuantizationConfig | None = None,
) -> tuple[Any, Any, Any, Any | None]:
    """Text-to-image, image-to-image, inpainting and (optionally) ControlNet pipelines over one
    set of weights. compile_mode: torch.compile's mode for the denoiser; None compiles nothing.
    quantization: quantization_config's, applied as the modules load (the rest in `dtype`)."""
    components: dict[str, Any] = {}
    if model.vae:
        vae = hub_cache.local_model(model.vae) or model.vae
        components["vae"] = from_pretrained_fp16_first(
            AutoencoderKL, vae, dtype, cache_dir=cached_hub_folder(model.vae)
        )
    if model.single_file:
        text2image = load_single_file(model, dtype, components)
    else:
        text2image = from_pretrained_fp16_first(
            AutoPipelineForText2Image,
            model.source,
            dtype,
            revision=model.revision,
            cache_dir=cached_hub_folder(model.name),
            **({"quantization_config": quantization} if quantization else {}),
            **components,
        )
    require_supported(text2image)  # another kind of pipeline stops the worker here, naming what is served
    if needs_fp32_vae(text2image):
        keep_vae_in_fp32(text2image.vae)
    if cpu_offload and device == "cuda":
        text2image.enable_model_cpu_offload()
    else:
        text2image.to(device)
    if vae_tiling:
        text2image.vae.enable_tiling()
    text2image.set_progress_bar_config(disable=True)
    if compile_mode is not None:  # the denoiser: a UNet (SD, SDXL) or a transformer (FLUX, SD 3.5)
        name = "transformer" if getattr(text2image, "transformer", None) is not None else "unet"
        setattr(text2image, name, torch.compile(getattr(text2image, name), mode=compile_mode, fullgraph=True))

    # from_pipe shares every component: no second copy of the weights in memory. Inpainting
    # with a text-to-image model's UNet repaints the masked area and keeps the rest's latents.
    image2image = AutoPipelineForImage2Image.from_pipe(text2image)
    inpainting = AutoPipelineForInpainting.from_pipe(text2image)
    controlnet = None
    if model.controlnet:
        source = hub_cache.local_model(model.controlnet) or model.controlnet
        controlnet_model = from_pretrained_fp16_first(
            controlnet_class(text2image), source, dtype, cache_dir=cached_hub_folder(model.controlnet)
        ).to(device)
        controlnet = AutoPipelineForText2Image.from_pipe(text2image, controlnet=controlnet_model)
    for pipeline in (image2image, inpainting, controlnet):
        if pipeline is not None:
            pipeline.set_progress_bar_config(disable=True)
    return text2image, image2image, inpainting, controlnet


# ---- serving, once per request --------------------------------------------------------------
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

_THREAD_LOCAL = threading.local()


def thread_tokenizers(pipeline: Any) -> dict[str, Any]:
    """Tokenizers of this thread's own: a fast tokenizer keeps its padding settings on the object,
    so two threads sharing one get each other's padding."""
    if getattr(_THREAD_LOCAL, "copied_from", None) is not pipeline:
        _THREAD_LOCAL.copied_from = pipeline
        _THREAD_LOCAL.tokenizers = {
            name: copy.deepcopy(getattr(pipeline, name))
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(pipeline, name, None) is not None
        }
    return _THREAD_LOCAL.tokenizers


def own_copy(base: Any, scheduler: str, tokenizers_from: Any) -> Any:
    """`base` with a scheduler (a SCHEDULERS name, or "default") and tokenizers of its own.

    Schedulers keep state while they denoise (their timesteps, step index, past outputs), so
    every request gets a fresh one, of the requested kind, and nothing it sets outlives it.
    """
    if scheduler == "default":
        fresh = type(base.scheduler).from_config(base.scheduler.config)
    else:
        scheduler_class, settings = SCHEDULERS[scheduler]
        fresh = scheduler_class.from_config(base.scheduler.config, **settings)
    # A shallow copy: the same modules, but attributes (scheduler, tokenizers, the per-call state
    # diffusers keeps on the pipeline object) of its own. Not from_pipe, which ends with
    # `.to(dtype)` on every shared module: a cast under the feet of a concurrent job.
    pipeline = copy.copy(base)
    for name, component in {"scheduler": fresh, **thread_tokenizers(tokenizers_from)}.items():
        setattr(pipeline, name, component)
    return pipeline


def call_arguments(pipeline: Any, job: Job, family: Family) -> dict[str, Any]:
    """The job's inputs under the names `pipeline`'s __call__ takes (all but the generator and
    the number of images, which change from one run to the next)."""
    parameters = inspect.signature(type(pipeline).__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": job.request.prompt,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
    }
    if family.negative_prompt:
        kwargs["negative_prompt"] = job.request.negative_prompt
    if family.max_sequence_length:
        kwargs["max_sequence_length"] = family.max_sequence_length
    if job.source is not None:
        kwargs.update(image=job.source, strength=job.strength)
    # Text-to-image, inpainting and FLUX's image-to-image take the size (else their model's default,
    # 1024² for FLUX, not the input's); SD's image-to-image pipelines have no such parameter.
    if "width" in parameters:
        kwargs.update(width=job.width, height=job.height)
    if job.mask is not None:
        kwargs["mask_image"] = job.mask
    if job.control is not None:
        # SD's ControlNet pipelines name the conditioning `image`; FLUX's and SD 3.5's `control_image`.
        name = "control_image" if "control_image" in parameters else "image"
        kwargs.update({name: job.control, "controlnet_conditioning_scale": job.request.controlnet_conditioning_scale})
    return kwargs


def step_reporter(on_step: Callable[[int, int], None], cancelled: threading.Event, run: int, runs: int) -> Any:
    """diffusers' callback_on_step_end for run `run` of `runs`: reports the job's overall step and
    total to `on_step`, and stops the run between steps once `cancelled` is set."""

    def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        # The scheduler's own step count: PNDM adds warm-up steps, image-to-image runs
        # only strength × num_inference_steps of them.
        per_run = pipe.num_timesteps
        on_step(run * per_run + step + 1, per_run * runs)
        if cancelled.is_set():
            pipe._interrupt = True  # diffusers' own way to stop a run between steps
        return tensors

    return step_end


# diffusers' SD 3.5 ControlNet pipeline samples the control image's latents from torch's global
# generator instead of the job's, so the same seed gave another image each time. Such jobs seed the
# global generator themselves, one at a time (nothing else here draws from it).
GLOBAL_GENERATOR = threading.Lock()


@contextlib.contextmanager
def global_seed(pipeline: Any, seed: int) -> Iterator[None]:
    """Around one run of `pipeline`: torch's global generator seeded with `seed` and held, where the
    pipeline draws from it (SD 3.5's ControlNet); nothing otherwise."""
    if not isinstance(getattr(pipeline, "controlnet", None), SD3ControlNetModel):
        yield
        return
    with GLOBAL_GENERATOR:
        torch.manual_seed(seed)
        yield
