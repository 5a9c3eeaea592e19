"""Stable Diffusion pipelines (SD 1.5, SD 2.1, SDXL, SDXL Turbo) in the Hub's diffusers layout, with the
ControlNets and LoRA adapters that fit their UNets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.shared.tiny_models.corpus import SEED
from tests.shared.tiny_models.vocabularies import train_clip_bpe, write_clip_vocab

# ---- Stable Diffusion -------------------------------------------------------------------------
#
# Real pipeline layouts (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
# tiny widths. The VAE keeps the real four blocks, so it downsamples by 8 (vae_scale_factor 8) and
# latents have the real shapes; the UNets are two blocks deep, enough for down/up and attention.
# sample_size is the real one (64, 96 and 128 latents), so a pipeline's default size is the real
# model's (512, 768 and 1024 px).
# The training betas every SD 1.x/2.x/XL checkpoint ships in scheduler/scheduler_config.json.
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}

VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 32],  # the real ones are [128, 256, 512, 512]
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
}

_UNET: dict[str, Any] = {"in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1}
# The SD 1.x/2.x layout: attention at the high resolution, none at the lowest.
_SD_UNET_BLOCKS: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
# CLIP ViT-L/14, SD 1.x's text encoder (and SDXL's first), shrunk.
CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
# OpenCLIP ViT-H (SD 2.x) and ViT-bigG (SDXL's second encoder) use plain gelu.
OPEN_CLIP_TEXT: dict[str, Any] = CLIP_TEXT | {"hidden_act": "gelu"}
# ControlNet's conditioning embedding maps the control image to latent size, so it too downsamples
# by 8 (three stride-2 convs); the real channels are (16, 32, 96, 256).
_CONTROLNET_COND_CHANNELS = (8, 16, 32, 32)


@dataclass(frozen=True)
class _TextEncoder:
    cls: str  # CLIPTextModel, or CLIPTextModelWithProjection for SDXL's pooled second encoder
    config: dict[str, Any]
    pad: str  # OpenCLIP tokenizers pad with "!", OpenAI CLIP's with <|endoftext|>


@dataclass(frozen=True)
class _Diffusion:
    pipeline: str  # diffusers pipeline class
    unet: dict[str, Any]
    text_encoders: tuple[_TextEncoder, ...]  # saved as text_encoder/tokenizer, text_encoder_2/tokenizer_2
    scheduler: str
    scheduler_config: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=dict)
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

# SDXL: no attention at the highest resolution, more transformer layers deeper down, cross-attention
# on both encoders' hidden states concatenated (real 768 + 1280), and "text_time" added conditioning:
# the second encoder's pooled projection plus six size/crop numbers, each embedded in
# addition_time_embed_dim (real 1280 + 6 * 256 = 2816).
_SDXL_ENCODERS = (
    _TextEncoder("CLIPTextModel", CLIP_TEXT, pad="<|endoftext|>"),
    _TextEncoder(
        "CLIPTextModelWithProjection",
        OPEN_CLIP_TEXT | {"hidden_size": 64, "intermediate_size": 128, "projection_dim": 64},
        pad="!",
    ),
)
_SDXL = _Diffusion(
    pipeline="StableDiffusionXLPipeline",
    unet=_UNET
    | {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "cross_attention_dim": 32 + 64,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64 + 6 * 8,
        "sample_size": 128,
    },
    text_encoders=_SDXL_ENCODERS,
    vae={"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024},  # the SDXL VAE's
    scheduler="EulerDiscreteScheduler",
    scheduler_config={"prediction_type": "epsilon", "timestep_spacing": "leading", "interpolation_type": "linear"},
    pipeline_kwargs={"force_zeros_for_empty_prompt": True},
)

DIFFUSION: dict[str, _Diffusion] = {
    # Stable Diffusion 1.5: PNDM, epsilon prediction. Its attention_head_dim (which diffusers reads as
    # a head count) is 8; 2 here, as 8 heads of width 4 made CPU attention on 64x64 latents 3x slower.
    "sd15": _Diffusion(
        pipeline="StableDiffusionPipeline",
        unet=_UNET | _SD_UNET_BLOCKS | {"cross_attention_dim": 32, "attention_head_dim": 2, "sample_size": 64},
        text_encoders=(_TextEncoder("CLIPTextModel", CLIP_TEXT, pad="<|endoftext|>"),),
        vae={"sample_size": 512},
        scheduler="PNDMScheduler",
        scheduler_config={"skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon"},
        pipeline_kwargs=_NO_SAFETY_CHECKER,
    ),
    # Stable Diffusion 2.1 (768-v): v-prediction DDIM, per-block head counts, linear projections and
    # upcast attention as its UNet config has, OpenCLIP text encoder.
    "sd2": _Diffusion(
        pipeline="StableDiffusionPipeline",
        unet=_UNET
        | _SD_UNET_BLOCKS
        | {
            "cross_attention_dim": 32,
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "upcast_attention": True,
            "sample_size": 96,
        },
        text_encoders=(_TextEncoder("CLIPTextModel", OPEN_CLIP_TEXT, pad="!"),),
        vae={"sample_size": 768},
        scheduler="DDIMScheduler",
        scheduler_config={"prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False},
        pipeline_kwargs=_NO_SAFETY_CHECKER,
    ),
    "sdxl": _SDXL,
    # SDXL Turbo is SDXL distilled for 1-4 steps: same architecture, ancestral Euler on trailing steps.
    "sdxl-turbo": replace(
        _SDXL, scheduler="EulerAncestralDiscreteScheduler", scheduler_config={"timestep_spacing": "trailing"}
    ),
}


def _diffusion_unet(family: _Diffusion):
    """The family's UNet, seeded on its own so a ControlNet copies exactly the pipeline's weights."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(**family.unet)


def build_stable_diffusion(out: Path, kind: str) -> Path:
    """A Stable Diffusion pipeline of family `kind` with random float32 weights, saved like the Hub's."""
    import diffusers
    import torch
    import transformers

    family = DIFFUSION[kind]
    vocab, merges = train_clip_bpe()
    components: dict[str, Any] = {}
    for i, encoder in enumerate(family.text_encoders):
        suffix = f"_{i + 1}" if i else ""
        tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=encoder.pad, model_max_length=77)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = transformers.CLIPTextConfig(
            vocab_size=len(vocab), pad_token_id=tokenizer.pad_token_id, **ids, **encoder.config
        )
        torch.manual_seed(SEED)
        components[f"text_encoder{suffix}"] = getattr(transformers, encoder.cls)(config)
        components[f"tokenizer{suffix}"] = tokenizer
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(**VAE | family.vae)
    scheduler = getattr(diffusers, family.scheduler)(**_SD_BETAS | family.scheduler_config)
    pipeline = getattr(diffusers, family.pipeline)(
        vae=vae, unet=_diffusion_unet(family), scheduler=scheduler, **components, **family.pipeline_kwargs
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    for folder in out.glob("tokenizer*"):
        write_clip_vocab(folder, vocab, merges)
    return out


def build_controlnet(out: Path, base: str) -> Path:
    """A ControlNetModel for the `base` family's tiny UNet, saved alone (as ControlNets ship).

    from_unet copies the UNet's encoder weights, as ControlNet training starts. Its "zero
    convolutions" then get PyTorch's default random init instead of zeros, and the convolutions
    embedding the control image a variance-preserving (Kaiming) one: with zeros, or with the
    default init shrinking the image's signal conv after conv, the control image would change the
    output by less than one pixel level; so, like a trained ControlNet's, it changes the image.
    """
    import torch
    from diffusers import ControlNetModel

    unet = _diffusion_unet(DIFFUSION[base])
    torch.manual_seed(SEED)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_CONTROLNET_COND_CHANNELS)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.reset_parameters()
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


# ---- LoRA adapters for the diffusion models -----------------------------------------------------
#
# Made with peft as training scripts make them (diffusers' train_text_to_image_lora.py): rank-4 LoRA
# layers on the UNet's attention projections, saved with the pipeline's save_lora_weights as
# pytorch_lora_weights.safetensors in diffusers' key layout. Random B matrices (a trained LoRA's are
# not zero either), scaled up so the adapter visibly changes a 64x64 image.


def build_lora(out: Path, base: str, seed: int) -> Path:
    """A LoRA adapter for the tiny `base` pipeline's UNet; `seed` makes different adapters."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _diffusion_unet(DIFFUSION[base])
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    layers = get_peft_model_state_dict(unet)
    getattr(diffusers, DIFFUSION[base].pipeline).save_lora_weights(out, unet_lora_layers=layers)
    return out
