"""Single-file checkpoints: one `.safetensors` or `.ckpt` file, as Civitai and A1111/ComfyUI ship them.

Most fine-tuned Stable Diffusion models are one file in the original (LDM) layout, not a diffusers
folder. diffusers loads them with `<Pipeline>.from_single_file`, which needs two things the file
does not hold:

* the pipeline class: the file's keys tell SD 1.x, 2.x, SDXL, FLUX.1 and SD 3.x apart (diffusers'
  own `infer_diffusers_model_type`, read here from the file's header only, no weights loaded);
  `MODEL_FAMILY` says it when a file cannot be told (a pruned or unusual checkpoint);
* the base model's configs and tokenizers (`config=`): a diffusers folder or Hub repo of the same
  family. By default the family's reference repo on the Hub (what diffusers itself would fetch);
  `MODEL_CONFIG` points elsewhere, e.g. a folder on the network volume for a worker that never
  reaches the Hub.

A checkpoint's source is a local or network-volume path, or a Hub file `owner/repo/file.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".safetensors", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint the worker cannot load; the message says which setting fixes it."""


@dataclass(frozen=True)
class Base:
    pipeline: str  # the diffusers pipeline class with from_single_file
    config: str  # the reference repo whose configs and tokenizers the single file lacks


# By our family names (families.py). Turbo checkpoints are their base architecture with their own scheduler.
BASES: dict[str, Base] = {
    "sd1": Base("StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2": Base("StableDiffusionPipeline", "stabilityai/stable-diffusion-2-base"),
    "sd2-v": Base("StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1"),
    "sd-turbo": Base("StableDiffusionPipeline", "stabilityai/sd-turbo"),
    "sdxl": Base("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sdxl-turbo": Base("StableDiffusionXLPipeline", "stabilityai/sdxl-turbo"),
    "flux-schnell": Base("FluxPipeline", "black-forest-labs/FLUX.1-schnell"),
    "flux-dev": Base("FluxPipeline", "black-forest-labs/FLUX.1-dev"),
    "sd3.5-large": Base("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large"),
    "sd3.5-medium": Base("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium"),
}

# diffusers' model types (infer_diffusers_model_type) → our families. "v2" is SD 2.1 at 768 (v-prediction),
# the SD 2.x checkpoint people use; the 512 base needs MODEL_FAMILY=sd2.
DIFFUSERS_TYPES = {
    "v1": "sd1",
    "v2": "sd2-v",
    "xl_base": "sdxl",
    "flux-schnell": "flux-schnell",
    "flux-dev": "flux-dev",
    "sd3": "sd3.5-large",
    "sd35_large": "sd3.5-large",
    "sd35_medium": "sd3.5-medium",
}


def is_single_file(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


class _Shape:
    """Stands in for a tensor where diffusers' detection reads only `.shape`."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


def header(path: str) -> dict[str, Any]:
    """The checkpoint's keys with their shapes: a safetensors header, or a mmapped .ckpt."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as weights:
            return {key: _Shape(weights.get_slice(key).get_shape()) for key in weights.keys()}
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return state.get("state_dict", state)


def checkpoint_family(path: str) -> str:
    """Our family name for a checkpoint, told by diffusers from its keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(header(path))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file raises many types
        raise CheckpointError(f"MODEL_NAME: {path} is not a readable checkpoint ({type(error).__name__})") from None
    if kind not in DIFFUSERS_TYPES:
        raise CheckpointError(
            f"MODEL_NAME: a {kind!r} checkpoint is not a text-to-image model this worker serves; if it is one,"
            f" set MODEL_FAMILY to one of {', '.join(BASES)}"
        )
    return DIFFUSERS_TYPES[kind]


def local_file(name: str, revision: str | None, cache_dir: str | None) -> str:
    """A path for the checkpoint: `name` itself, or the Hub file `owner/repo/file.safetensors` downloaded."""
    if Path(name).is_absolute() or Path(name).exists():
        if not Path(name).is_file():
            raise CheckpointError(f"MODEL_NAME: no checkpoint file at {name}")
        return name
    parts = name.split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"MODEL_NAME: {name} is neither a file here nor a Hub file (owner/repo/file.safetensors)")
    from huggingface_hub import hf_hub_download

    return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision, cache_dir=cache_dir)
