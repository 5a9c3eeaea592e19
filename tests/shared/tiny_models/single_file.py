"""The tiny SD 1.5 pipeline as one original-layout (LDM) .safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.shared.tiny_models.image import build_stable_diffusion

# ---- single-file checkpoints --------------------------------------------------------------------
#
# Most fine-tuned SD models ship as one .safetensors file in the original (LDM / "CompVis") layout,
# as A1111 and ComfyUI save them. These functions write the tiny SD 1.5 pipeline in that layout: the
# reverse of diffusers' own conversion (its scripts/convert_diffusers_to_original_stable_diffusion.py),
# for any number of blocks and layers_per_block instead of the real model's fixed four and two.


def _ldm_unet_names(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) pairs for a UNet2DConditionModel's blocks."""
    per = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    pairs = []
    for i in range(blocks):
        for j in range(per):
            pairs.append((f"input_blocks.{1 + i * (per + 1) + j}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{1 + i * (per + 1) + j}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{(i + 1) * (per + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        up_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            pairs.append((f"output_blocks.{i * (per + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{i * (per + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            upsample = f"output_blocks.{i * (per + 1) + per}.{2 if up_attention else 1}."
            pairs.append((upsample, f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0.")]
    pairs.append(("middle_block.2.", "mid_block.resnets.1."))
    return pairs


_LDM_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_LDM_RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _ldm_unet(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    pairs = _ldm_unet_names(config)
    out = {}
    for key, value in state.items():
        new = key
        for diffusers_name, ldm_name in _LDM_UNET_TOP.items():
            if new.startswith(diffusers_name):
                new = ldm_name + new[len(diffusers_name) :]
        if "resnets" in key:
            head, _, leaf = new.rpartition(".")
            block, _, layer = head.rpartition(".")
            new = f"{block}.{_LDM_RESNET.get(layer, layer)}.{leaf}"
        for ldm_prefix, diffusers_prefix in pairs:
            if new.startswith(diffusers_prefix):
                new = ldm_prefix + new[len(diffusers_prefix) :]
        out["model.diffusion_model." + new] = value
    return out


def _ldm_vae(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    blocks = len(config["block_out_channels"])
    pairs = [("mid.attn_1.", "mid_block.attentions.0."), ("mid.block_1.", "mid_block.resnets.0.")]
    pairs.append(("mid.block_2.", "mid_block.resnets.1."))
    for i in range(blocks):
        pairs.append((f"down.{i}.block.", f"down_blocks.{i}.resnets."))
        pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        pairs.append((f"up.{blocks - 1 - i}.block.", f"up_blocks.{i}.resnets."))
        pairs.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for ldm_prefix, diffusers_prefix in pairs:
            new = new.replace(diffusers_prefix, ldm_prefix)
        if "mid.attn_1." in new:
            for diffusers_name, ldm_name in attention.items():
                new = new.replace("mid.attn_1." + diffusers_name, "mid.attn_1." + ldm_name)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
        out["first_stage_model." + new] = value
    return out


def build_single_file(out: Path, kind: str = "sd15") -> Path:
    """The tiny `kind` pipeline as one original-layout checkpoint, out/model.safetensors, next to the
    diffusers folder it came from (out/diffusers: the `config=` a loader needs offline)."""
    from diffusers import AutoPipelineForText2Image
    from safetensors.torch import save_file

    folder = build_stable_diffusion(out / "diffusers", kind)
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    state = _ldm_unet(pipeline.unet.state_dict(), dict(pipeline.unet.config))
    state |= _ldm_vae(pipeline.vae.state_dict(), dict(pipeline.vae.config))
    # The real checkpoints' CLIP keys sit under text_model. (transformers 5 flattened CLIPTextModel's).
    text = {k.removeprefix("text_model."): v for k, v in pipeline.text_encoder.state_dict().items()}
    state |= {"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()}
    save_file({key: value.contiguous() for key, value in state.items()}, out / "model.safetensors")
    return out
