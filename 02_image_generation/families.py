"""Which model family a loaded pipeline is, told by what it is (its classes and configs), not its name.

A model's name says little: FLUX.1-schnell and a community SDXL fine-tune both load through
`AutoPipeline`, "turbo" appears in names of models distilled in different ways, and a single-file
checkpoint has no name at all. What the pipeline *is* tells more:

* the pipeline class: FLUX (`FluxPipeline`), Stable Diffusion 3 (`StableDiffusion3Pipeline`),
  SDXL (`StableDiffusionXLPipeline`) or Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`);
* FLUX.1 [dev] is guidance-distilled: its transformer embeds the guidance scale
  (`guidance_embeds`), FLUX.1 [schnell] is timestep-distilled and has no guidance at all;
* SD 3.5 Medium is an MMDiT-X: some of its transformer layers have a second attention
  (`dual_attention_layers`); SD 3.5 Large has none (SD 3.5 Large Turbo shares Large's
  architecture and configs: tell it apart with DEFAULT_STEPS=4 and DEFAULT_GUIDANCE=0);
* SD 2.x UNets use linear projections in their transformer blocks (SD 1.x convolutions), and the
  768 px SD 2.x models predict v rather than the noise (`prediction_type`);
* SDXL Turbo and SD Turbo ship an ancestral Euler scheduler on trailing timesteps, which only
  few-step distilled models use. SDXL-Lightning and Hyper-SD ship SDXL base's own configs, so
  nothing tells them apart: set DEFAULT_STEPS and DEFAULT_SCHEDULER=euler-trailing.

Each family carries the defaults its authors recommend, and what it can and cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# FLUX and SD3 read prompts with T5 as well as CLIP: T5 reads this many tokens (the pipelines'
# defaults: 512 for FLUX.1 [dev], 256 for [schnell], which was trained with 256, and for SD3).
FLUX_DEV_MAX_SEQUENCE = 512
FLUX_SCHNELL_MAX_SEQUENCE = 256
SD3_MAX_SEQUENCE = 256


@dataclass(frozen=True)
class Family:
    """What the loaded model is, and the defaults its authors recommend."""

    name: str
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str = "default"  # a key of the handler's SCHEDULERS, or the model's own
    negative_prompt: bool = True  # classifier-free guidance with a negative prompt
    guidance_scale: bool = True  # False: the model has no guidance to set (FLUX.1 [schnell])
    flow_matching: bool = False  # a flow-matching model: the SD schedulers do not apply
    max_sequence_length: int | None = None  # T5 tokens read, for the models that use T5
    size_multiple: int = 8  # the VAE's 8x; FLUX and SD 3.5 also take 2x2 latent patches: 16
    label: str = ""  # for error messages

    def describe(self) -> str:
        return self.label or self.name


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", 512, 512, 30, 7.5, label="Stable Diffusion 1.x"),
        Family("sd2", 512, 512, 30, 7.5, label="Stable Diffusion 2.x (512, ε-prediction)"),
        Family("sd2-v", 768, 768, 30, 7.5, label="Stable Diffusion 2.x (768, v-prediction)"),
        Family("sd-turbo", 512, 512, 1, 0.0, label="SD Turbo"),
        Family("sdxl", 1024, 1024, 30, 5.0, label="SDXL"),
        Family("sdxl-turbo", 512, 512, 1, 0.0, label="SDXL Turbo"),
        Family(
            "flux-schnell",
            1024,
            1024,
            4,
            0.0,
            negative_prompt=False,
            guidance_scale=False,
            flow_matching=True,
            max_sequence_length=FLUX_SCHNELL_MAX_SEQUENCE,
            size_multiple=16,
            label="FLUX.1 [schnell]",
        ),
        Family(
            "flux-dev",
            1024,
            1024,
            28,
            3.5,
            negative_prompt=False,
            flow_matching=True,
            max_sequence_length=FLUX_DEV_MAX_SEQUENCE,
            size_multiple=16,
            label="FLUX.1 [dev]",
        ),
        Family(
            "sd3.5-large",
            1024,
            1024,
            28,
            3.5,
            flow_matching=True,
            max_sequence_length=SD3_MAX_SEQUENCE,
            size_multiple=16,
            label="SD 3.5 Large",
        ),
        Family(
            "sd3.5-medium",
            1024,
            1024,
            40,
            4.5,
            flow_matching=True,
            max_sequence_length=SD3_MAX_SEQUENCE,
            size_multiple=16,
            label="SD 3.5 Medium",
        ),
    )
}


# The text-to-image pipelines this worker serves, and the families each holds: anything else
# AutoPipeline loads (PixArt, Sana, Kandinsky, ...) has other components, inputs and defaults.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x and 2.x, SD Turbo",
    "StableDiffusionXLPipeline": "SDXL, SDXL Turbo",
    "FluxPipeline": "FLUX.1 [schnell] and [dev]",
    "StableDiffusion3Pipeline": "SD 3.5 Large and Medium",
}


class UnsupportedModel(ValueError):
    """The model loads as a pipeline this worker does not serve: the worker stops at start."""


def require_supported(pipeline: Any) -> None:
    """Raise UnsupportedModel, in one line naming what is served, unless `pipeline` is one of SUPPORTED_PIPELINES."""
    kind = type(pipeline).__name__
    if kind not in SUPPORTED_PIPELINES:
        raise UnsupportedModel(
            f"MODEL_NAME: the model loads as {kind}, which this worker does not serve;"
            f" it serves {'; '.join(SUPPORTED_PIPELINES.values())}"
        )


def _config(component: Any) -> dict[str, Any]:
    return dict(getattr(component, "config", None) or {})


def detect_family(pipeline: Any) -> Family:
    """The family of a loaded text-to-image pipeline, from its classes and configs."""
    require_supported(pipeline)
    kind = type(pipeline).__name__
    if kind.startswith("Flux"):
        guided = _config(pipeline.transformer).get("guidance_embeds", False)
        return FAMILIES["flux-dev" if guided else "flux-schnell"]
    if kind.startswith("StableDiffusion3"):
        medium = bool(_config(pipeline.transformer).get("dual_attention_layers"))
        return FAMILIES["sd3.5-medium" if medium else "sd3.5-large"]
    scheduler = _config(pipeline.scheduler)
    few_step = type(pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler" and (
        scheduler.get("timestep_spacing") == "trailing"
    )
    if "XL" in kind:
        return FAMILIES["sdxl-turbo" if few_step else "sdxl"]
    if few_step:
        return FAMILIES["sd-turbo"]
    if _config(pipeline.unet).get("use_linear_projection"):
        return FAMILIES["sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"]
    return FAMILIES["sd1"]


def with_overrides(
    family: Family,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    scheduler: str | None = None,
) -> Family:
    """The family's defaults with the endpoint's DEFAULT_* settings on top, for models no rule
    recognises (SDXL-Lightning: 4 steps, trailing Euler; SD 3.5 Large Turbo: 4 steps, no guidance)."""
    changes = {"steps": steps, "guidance": guidance, "width": width, "height": height, "scheduler": scheduler}
    return replace(family, **{key: value for key, value in changes.items() if value is not None})


def unsupported(family: Family, negative_prompt: bool, guidance_given: float | None, scheduler: str) -> str | None:
    """Why a request asks for something this family cannot do, or None."""
    if negative_prompt and not family.negative_prompt:
        return f"negative_prompt: {family.describe()} takes no negative prompt (it is not trained with one)"
    if guidance_given and not family.guidance_scale:
        return f"guidance_scale: {family.describe()} has no guidance to set (it is distilled without it): leave it out"
    if family.flow_matching and scheduler != "default":
        return (
            f"scheduler: {scheduler!r} is a Stable Diffusion scheduler; {family.describe()} is a flow-matching model"
            " that runs its own: send 'default'"
        )
    return None
