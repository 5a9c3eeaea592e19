"""02_image_generation in the precision a GPU runs it in, on the CPU: every family × task in float16
(SD 1.5, SD 2.1, SD Turbo, SDXL, SDXL Turbo) or bfloat16 (FLUX.1, SD 3.5), served and close to its
float32 image; the fp32 VAE only where diffusers decodes in fp32 (SDXL); bf16 only where a GPU has
it natively; an unsupported pipeline stopping the worker at start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.shared import tiny_models
from tests.shared.harness import lazy_handlers, load_handler
from tests.shared.image_generation import EXAMPLE, SMALL, generate
from tests.shared.images import decode, mask_data_uri, pixels, png_data_uri

# family → (its tiny model, the dtype DTYPE=auto gives it on a GPU with bf16, its ControlNet, its LoRA).
# sd-turbo, and the ControlNets and LoRAs the shared tiny models lack, are built here (build_extra).
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "sd1": ("sd15", "float16", "controlnet-sd15", "lora-sd15-a"),
    "sd2-v": ("sd2", "float16", "controlnet-sd2", "lora-sd2"),
    "sd-turbo": ("sd-turbo", "float16", "controlnet-sd2", "lora-sd2"),
    "sdxl": ("sdxl", "float16", "controlnet-sdxl", "lora-sdxl"),
    "sdxl-turbo": ("sdxl-turbo", "float16", "controlnet-sdxl", "lora-sdxl"),
    "flux-schnell": ("flux-schnell", "bfloat16", "controlnet-flux-schnell", "lora-flux-schnell"),
    "flux-dev": ("flux-dev", "bfloat16", "controlnet-flux-dev", "lora-flux-dev"),
    "sd3.5-large": ("sd3.5-large", "bfloat16", "controlnet-sd3.5-large", "lora-sd3.5-large"),
    "sd3.5-medium": ("sd3.5-medium", "bfloat16", "controlnet-sd3.5-medium", "lora-sd3.5-medium"),
}
SOURCE, CONTROL = png_data_uri(64, 64, seed=1), png_data_uri(64, 64, seed=2)
TASKS: dict[str, dict[str, Any]] = {
    "txt2img": {},
    "img2img": {"image": SOURCE, "strength": 0.75},
    "inpainting": {"image": SOURCE, "mask": mask_data_uri(64, 64, (16, 16, 48, 48)), "strength": 0.9},
    "controlnet": {"control_image": CONTROL},
    "lora": {},  # the family's LoRA, added per family
}


# The tiny LoRAs' deltas are scaled up so that one visibly changes a 64x64 image; at full weight they drive
# the tiny denoisers where any rounding is amplified (raw diffusers' fp16 and fp32 SD 1.5 + LoRA images
# then differ as much as the images with and without it). At 0.1 an adapter still moves the image by
# 2-22 levels of 255 on average, more than fp16 or bf16 rounding does.
LORA_WEIGHT = 0.1


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def build_extra(kind: str, out: Path, tiny_model: Any) -> Path:
    """The models this file needs that the shared tiny models lack, built into `out`."""
    from tests.shared.tiny_models.flow import build_flow_controlnet
    from tests.shared.tiny_models.image import build_controlnet, build_lora

    if kind == "sd-turbo":  # SD Turbo: SD 2.1's architecture with an ancestral Euler on trailing timesteps
        shutil.copytree(tiny_model("sd2"), out, dirs_exist_ok=True)
        scheduler = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
        edit_json(out / "scheduler" / "scheduler_config.json", prediction_type="epsilon", **scheduler)
        edit_json(out / "model_index.json", scheduler=["diffusers", scheduler["_class_name"]])
        return out
    if kind == "controlnet-sd2":
        return build_controlnet(out, base="sd2")
    if kind == "lora-sd2":
        return build_lora(out, base="sd2", seed=1)
    if kind.startswith("controlnet-"):
        return build_flow_controlnet(out, base=kind.removeprefix("controlnet-"))
    return build_transformer_lora(tiny_model(kind.removeprefix("lora-")), out)


def build_transformer_lora(base: Path, out: Path) -> Path:
    """A LoRA on a tiny FLUX or SD 3.5 transformer's attention projections, as build_flux_lora makes one."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def class_in(config: Path) -> Any:
        return getattr(diffusers, json.loads(config.read_text())["_class_name"])

    pipeline_class = class_in(base / "model_index.json")
    transformer = class_in(base / "transformer" / "config.json").from_pretrained(base / "transformer")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    transformer.add_adapter(config)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)  # so the adapter visibly changes a 64x64 image
    pipeline_class.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory) -> Any:
    """`model(kind)` → the folder of a shared tiny model, or of one built here (build_extra)."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind in tiny_models.BUILDERS:
            return tiny_model(kind)
        if kind not in built:
            built[kind] = build_extra(kind, tmp_path_factory.mktemp(kind), tiny_model)
        return built[kind]

    return get


@pytest.fixture(scope="module")
def handlers(model) -> dict[tuple[str, str], ModuleType]:
    """handlers[family, dtype]: the family's tiny model with its ControlNet, loaded with DTYPE=dtype."""

    def env(key: tuple[str, str]) -> dict[str, str]:
        kind, _, controlnet, _ = FAMILIES[key[0]]
        return {"MODEL_NAME": str(model(kind)), "CONTROLNET_MODEL": str(model(controlnet)), "DTYPE": key[1]}

    return lazy_handlers(EXAMPLE, env)


def image(module: ModuleType, request: dict[str, Any]) -> np.ndarray:
    _, final = generate(module, **request)
    return pixels(final["images"][0]["image"]).astype(np.int16)


# How far (in levels of 255) a half-precision image may be from its float32 image, at 64x64, 2 steps,
# seed 3. Measured on the tiny models (README, "Verified on the CPU"): at most 29 and 2.4 on average
# in fp16 (SD 1.5's image-to-image, bit-equal to raw diffusers' fp16 run), at most 20 and 2.0 in
# bf16 (FLUX.1 [dev] with a LoRA). About 1.5x that, for CPUs that round another way (AMX or not).
# A path in the wrong precision, or an adapter or control image lost, moves the mean by 10 or more.
MAX_LEVELS = {"float16": 45, "bfloat16": 32}
MEAN_LEVELS = {"float16": 4.0, "bfloat16": 3.0}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_and_task_serves_in_its_gpu_precision_close_to_float32(handlers, model, family, task) -> None:
    """The job serves in the dtype DTYPE=auto gives the family on a GPU (on the CPU through DTYPE),
    and its image is within MAX_LEVELS and MEAN_LEVELS of the same job in float32. The VAE keeps
    the model's dtype except SDXL's in fp16, which diffusers too decodes in fp32 (force_upcast)."""
    _, dtype, _, lora = FAMILIES[family]
    request = {"prompt": "a red kite", "seed": 3, **SMALL, **TASKS[task]}
    if task == "lora":
        request["loras"] = [{"source": str(model(lora)), "weight": LORA_WEIGHT}]
    low, full = handlers[family, dtype], handlers[family, "float32"]
    assert low.FAMILY.name == family
    pipeline = low.TEXT2IMAGE
    denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
    fp32_vae = family in ("sdxl", "sdxl-turbo")
    assert next(denoiser.parameters()).dtype == low.TORCH_DTYPE == getattr(torch, dtype)
    assert next(pipeline.vae.parameters()).dtype == (torch.float32 if fp32_vae else low.TORCH_DTYPE)
    served = image(low, request)
    difference = np.abs(served - image(full, request))
    print(f"{family} {dtype} {task}: max {difference.max()} mean {difference.mean():.2f}")  # the README's figures
    assert difference.max() <= MAX_LEVELS[dtype] and difference.mean() <= MEAN_LEVELS[dtype]
    if task in ("controlnet", "lora"):  # what the job adds moves the image more than the rounding does
        plain = {key: value for key, value in request.items() if key not in ("control_image", "loras")}
        assert np.abs(served - image(low, plain)).mean() > difference.mean()


@pytest.mark.parametrize("task", ["img2img", "inpainting"])
def test_sd15_image_to_image_in_fp16_is_raw_diffusers_fp16(handlers, model, task) -> None:
    """SD 1.x/2.x: the VAE encodes and decodes in fp16, as in diffusers' own pipelines (an fp32 VAE
    handed fp32 latents to the fp16 UNet: 'mat1 and mat2 must have the same dtype')."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForInpainting if task == "inpainting" else AutoPipelineForImage2Image
    raw = auto.from_pretrained(str(model("sd15")), dtype=torch.float16)
    raw.set_progress_bar_config(disable=True)
    inputs = {"image": decode(SOURCE).convert("RGB"), "strength": TASKS[task]["strength"]}
    if task == "inpainting":
        inputs |= {"mask_image": decode(TASKS[task]["mask"]).convert("L"), "width": 64, "height": 64}
    generator = torch.Generator("cpu").manual_seed(3)
    expected = raw("a red kite", num_inference_steps=2, generator=generator, **inputs).images[0]
    got = image(handlers["sd1", "float16"], {"prompt": "a red kite", "seed": 3, **SMALL, **TASKS[task]})
    np.testing.assert_array_equal(got, np.asarray(expected))


# ---- the dtype DTYPE=auto picks on a GPU ------------------------------------------------------


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_only_where_the_gpu_has_it_natively(handlers, native_bf16: bool) -> None:
    """FLUX.1 and SD 3.5 in bf16 only on GPUs with bf16 units (Ampere and newer): torch's check
    is asked without emulation, which says yes on Turing (T4, RTX 20xx) too. The families tested
    above in fp16 get fp16 whatever the answer."""
    module = handlers["sd1", "float16"]
    asked = []

    def is_bf16_supported(*args: Any, **kwargs: Any) -> bool:
        asked.append((args, kwargs))
        assert args == () and kwargs == {"including_emulation": False}, "bf16 emulation must not count"
        return native_bf16

    for family, (_, dtype, *_) in FAMILIES.items():
        pipeline_class = handlers[family, dtype].pipeline_class_name
        expected = torch.bfloat16 if dtype == "bfloat16" and native_bf16 else torch.float16
        assert module.auto_dtype("cuda", pipeline_class, is_bf16_supported) == expected, family
    assert len(asked) == 4  # asked for the flow families only
    assert module.auto_dtype("cpu", lambda: "FluxPipeline", is_bf16_supported) == torch.float32


# ---- a pipeline this worker does not serve ------------------------------------------------------


def test_an_unsupported_pipeline_stops_the_worker_at_start_naming_what_is_served(model, tmp_path) -> None:
    """A tiny PixArt-α (AutoPipeline loads it as it loads any diffusers model): the worker stops
    while loading, with one line naming the families it serves, not a diffusers or attribute error."""
    import diffusers
    from transformers import T5EncoderModel, T5Tokenizer

    flux, sd15 = model("flux-schnell"), model("sd15")  # T5 from one, a 4-channel VAE from the other
    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        caption_channels=T5EncoderModel.config_class.from_pretrained(flux / "text_encoder_2").d_model,
        sample_size=8,
        norm_type="ada_norm_single",
    )
    diffusers.PixArtAlphaPipeline(
        tokenizer=T5Tokenizer.from_pretrained(flux / "tokenizer_2"),
        text_encoder=T5EncoderModel.from_pretrained(flux / "text_encoder_2"),
        vae=diffusers.AutoencoderKL.from_pretrained(sd15 / "vae"),
        transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    ).save_pretrained(tmp_path)
    served = "Stable Diffusion 1.x and 2.x, SD Turbo; SDXL, SDXL Turbo; FLUX.1 [schnell] and [dev]; SD 3.5 Large and"
    with pytest.raises(ValueError) as stopped:
        load_handler(EXAMPLE, {"MODEL_NAME": str(tmp_path)})
    message = str(stopped.value)
    assert message.startswith("MODEL_NAME: the model loads as PixArtAlphaPipeline, which this worker does not serve")
    assert served in message and "\n" not in message


def test_detect_family_names_what_is_served_for_any_other_pipeline(handlers) -> None:
    families = handlers["sd1", "float16"].detect_family.__globals__  # the families module, as the handler loaded it
    sana = type("SanaPipeline", (), {"transformer": object(), "scheduler": object()})()
    with pytest.raises(families["UnsupportedModel"], match=r"loads as SanaPipeline, which this worker does not"):
        families["detect_family"](sana)
