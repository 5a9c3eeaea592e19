"""Flow-matching pipelines (FLUX.1 schnell and dev, Stable Diffusion 3.5 Large and Medium) with a FLUX
LoRA and the ControlNets that fit their transformers."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tests.shared.tiny_models.corpus import SEED
from tests.shared.tiny_models.image import CLIP_TEXT, VAE
from tests.shared.tiny_models.vocabularies import train_clip_bpe, train_sentencepiece, write_clip_vocab

# ---- FLUX.1 and Stable Diffusion 3.5 ----------------------------------------------------------------
#
# Flow-matching transformers that read the prompt with CLIP and T5. The VAEs have 16 latent channels
# and the real 8x downsampling; the transformers take 2x2 latent patches, so sizes are multiples of 16.

# T5 v1.1 (google/t5-v1_1-xxl, 4096 wide, 24 layers in the real models), shrunk; gated-gelu as the real one.
_T5: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "decoder_start_token_id": 0,
}
_FLOW_VAE: dict[str, Any] = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}


def _t5_encoder() -> tuple[Any, Any]:
    """A T5 encoder and its unigram tokenizer, trained on CORPUS with T5's ids (<pad> 0, </s> 1, <unk> 2)."""
    import sentencepiece as spm
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        processor = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(Path(tmp))))
        vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    config = transformers.T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **_T5)
    torch.manual_seed(SEED)
    return transformers.T5EncoderModel(config), tokenizer


def _clip_encoder(cls: str, config: dict[str, Any], pad: str) -> tuple[Any, Any]:
    import torch
    import transformers

    vocab, merges = train_clip_bpe()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), pad_token_id=tokenizer.pad_token_id, **ids, **config
    )
    torch.manual_seed(SEED)
    return getattr(transformers, cls)(text_config), tokenizer


def _save_flow_pipeline(pipeline: Any, out: Path) -> Path:
    pipeline.save_pretrained(out, safe_serialization=True)
    vocab, merges = train_clip_bpe()
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name / "tokenizer_config.json").exists() and "CLIP" in type(getattr(pipeline, name)).__name__:
            write_clip_vocab(out / name, vocab, merges)
    return out


def build_flux(out: Path, kind: str) -> Path:
    """FLUX.1 [schnell] ("schnell": timestep-distilled, no guidance embedding, a fixed shift) or
    [dev] ("dev": guidance-distilled, `guidance_embeds`, resolution-dependent shift), like
    black-forest-labs/FLUX.1-schnell and -dev: CLIP-L for the pooled prompt, T5 for its tokens."""
    import diffusers
    import torch

    clip, clip_tokenizer = _clip_encoder("CLIPTextModel", CLIP_TEXT, pad="<|endoftext|>")
    t5, t5_tokenizer = _t5_encoder()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(**VAE | _FLOW_VAE | {"scaling_factor": 0.3611, "shift_factor": 0.1159})
    torch.manual_seed(SEED)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _FLOW_VAE["latent_channels"],  # 2x2 latent patches packed into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5["d_model"],
        pooled_projection_dim=CLIP_TEXT["hidden_size"],
        guidance_embeds=kind == "dev",
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) to 128
    )
    if kind == "dev":
        shift = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
        shift |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}
    else:
        shift = {"shift": 1.0, "use_dynamic_shifting": False}
    pipeline = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **shift),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _save_flow_pipeline(pipeline, out)


def build_sd3(out: Path, kind: str) -> Path:
    """Stable Diffusion 3.5 Large ("large") or Medium ("medium": MMDiT-X, a second attention in its
    first layer's `dual_attention_layers`), like stabilityai/stable-diffusion-3.5-large: CLIP-L and
    CLIP-G (pooled and token embeddings) and T5, a flow-matching MMDiT with RMS-normed q and k."""
    import diffusers
    import torch

    projected = CLIP_TEXT | {"projection_dim": 32}
    clip_l, tokenizer_l = _clip_encoder("CLIPTextModelWithProjection", projected, pad="<|endoftext|>")
    clip_g, tokenizer_g = _clip_encoder("CLIPTextModelWithProjection", projected | {"hidden_act": "gelu"}, pad="!")
    t5, t5_tokenizer = _t5_encoder()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(**VAE | _FLOW_VAE | {"scaling_factor": 1.5305, "shift_factor": 0.0609})
    torch.manual_seed(SEED)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=128,  # the real one: 1024 px by default
        patch_size=2,
        in_channels=_FLOW_VAE["latent_channels"],
        out_channels=_FLOW_VAE["latent_channels"],
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=_T5["d_model"],  # CLIP-L + CLIP-G token embeddings (32 + 32), padded to T5's width
        pooled_projection_dim=2 * 32,  # the two pooled projections side by side
        pos_embed_max_size=96,
        dual_attention_layers=(0,) if kind == "medium" else (),
        qk_norm="rms_norm",
    )
    pipeline = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer_l,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer_g,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
    )
    return _save_flow_pipeline(pipeline, out)


def build_flux_lora(out: Path) -> Path:
    """A LoRA adapter for the tiny FLUX.1 [schnell] pipeline's transformer (its attention
    projections), saved in diffusers' FLUX LoRA layout, as FLUX LoRAs are published."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with tempfile.TemporaryDirectory() as folder:
        transformer = diffusers.FluxTransformer2DModel.from_pretrained(
            build_flux(Path(folder), "schnell") / "transformer"
        )
    torch.manual_seed(SEED)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    transformer.add_adapter(config)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)  # random LoRA deltas this small would not change a pixel
    diffusers.FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


def build_flow_controlnet(out: Path, base: str) -> Path:
    """A ControlNet for the tiny `base` FLUX or SD 3.5 pipeline, saved alone (as ControlNets ship):
    its transformer's dimensions with one block. diffusers zero-initialises the projections that
    feed the control signal into the transformer, as training starts; here they get PyTorch's default
    random init, so, like a trained ControlNet's, the control image changes the image."""
    import inspect

    import diffusers
    import torch

    with tempfile.TemporaryDirectory() as folder:
        pipeline_config = json.loads((FLOW_PIPELINES[base](Path(folder)) / "transformer" / "config.json").read_text())
    flux = base.startswith("flux")
    cls = diffusers.FluxControlNetModel if flux else diffusers.SD3ControlNetModel
    accepted = inspect.signature(cls.__init__).parameters
    config = {key: value for key, value in pipeline_config.items() if key in accepted}
    config |= {"num_layers": 1, "num_single_layers": 0} if flux else {"num_layers": 1}
    torch.manual_seed(SEED)
    controlnet = cls(**config)
    for module in controlnet.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not module.weight.any():
            module.reset_parameters()
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


# The pipelines a ControlNet can be built for, by kind.
FLOW_PIPELINES: dict[str, Callable[[Path], Path]] = {
    "flux-schnell": partial(build_flux, kind="schnell"),
    "flux-dev": partial(build_flux, kind="dev"),
    "sd3.5-large": partial(build_sd3, kind="large"),
    "sd3.5-medium": partial(build_sd3, kind="medium"),
}
