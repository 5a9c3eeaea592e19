"""The request an image job sends: one pydantic model, the single source of truth for its field
names, defaults and limits.

Two limits are the endpoint's own settings, read by handler.py (MAX_PIXELS, MAX_IMAGES): they come
in through pydantic's validation context, `ImageRequest.model_validate(job_input,
context=RequestLimits(...))`, so this module reads no environment and imports nothing from the
handler. Every other limit is fixed here, with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_SIDE = 2048  # longest side, so the pixel budget cannot be spent on a 8x2048 sliver
MIN_SIDE = 64  # one 8x8 latent: anything smaller is not an image
MAX_STEPS = 150  # more steps than any scheduler benefits from
MAX_GUIDANCE = 30.0  # beyond this, classifier-free guidance only burns the image
MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; the cap only bounds nonsense
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
MAX_LORAS_PER_REQUEST = 4  # each one adds its layers' work to every UNet call
MAX_LORA_WEIGHT = 4.0  # weights past this only burn the image


@dataclass(frozen=True)
class RequestLimits:
    """The endpoint's own limits: the validation context every request is validated with."""

    max_pixels: int  # MAX_PIXELS: output width × height
    max_images: int  # MAX_IMAGES: images per request


def endpoint_limits(info: ValidationInfo) -> RequestLimits:
    if not isinstance(info.context, RequestLimits):
        raise TypeError("validate with context=RequestLimits(...): the endpoint's MAX_PIXELS and MAX_IMAGES")
    return info.context


# "default" keeps the model's own scheduler; the others are pipelines.SCHEDULERS' names.
SchedulerName = Literal[
    "default", "ddim", "pndm", "lms", "euler", "euler-a", "euler-trailing", "heun", "dpm++2m", "dpm++2m-karras", "unipc"
]
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
    num_images: Annotated[int, Field(ge=1)] = 1  # at most MAX_IMAGES (the context's max_images)
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

    @field_validator("num_images")
    @classmethod
    def _at_most_max_images(cls, value: int, info: ValidationInfo) -> int:
        limit = endpoint_limits(info).max_images
        if value > limit:  # worded as pydantic words its own `le`
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": limit})
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ImageRequest:
        max_pixels = endpoint_limits(info).max_pixels
        if self.width and self.height and self.width * self.height > max_pixels:
            raise PydanticCustomError(
                "pixel_budget",
                f"width × height is {self.width}x{self.height} = {self.width * self.height} pixels,"
                f" over the budget of {max_pixels} (MAX_PIXELS)",
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
