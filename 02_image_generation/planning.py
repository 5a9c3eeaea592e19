"""What one request becomes before it denoises (a `Job`), and what denoising hands back (`Generated`).

The rules that settle a job are pure functions, tested without a model: the output size that
keeps an input image's aspect inside the pixel budget, the steps a strength needs, the seed of
each image, the Canny edge map a ControlNet expects. handler.py's `prepare` applies them, and
`load_inputs` (the request's images, fetched), with the endpoint's settings.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from errors import RequestError
from families import Family
from images import ImageLimits, load_image
from loras import AdapterSet
from schema import MAX_SIDE, MAX_STEPS, MIN_SIDE, ImageRequest

DEFAULT_STRENGTH = 0.8  # diffusers' own default: keeps the input's layout, repaints its details
RANDOM_SEED_BOUND = 2**53  # drawn seeds stay exact in JavaScript's JSON numbers too


def fit_size(width: int, height: int, target_pixels: int, max_pixels: int, multiple: int = 8) -> tuple[int, int]:
    """An output size with the input's aspect ratio, about `target_pixels`, in multiples of `multiple`."""
    scale = (min(target_pixels, max_pixels) / (width * height)) ** 0.5
    fitted = [max(MIN_SIDE, min(MAX_SIDE, int(side * scale) // multiple * multiple)) for side in (width, height)]
    while fitted[0] * fitted[1] > max_pixels:  # rounding and MIN_SIDE can overshoot by a little
        fitted = [max(MIN_SIDE, side - multiple) for side in fitted]
    return fitted[0], fitted[1]


def load_inputs(
    request: ImageRequest, limits: ImageLimits
) -> tuple[Image.Image | None, Image.Image | None, Image.Image | None]:
    """The request's image, control_image and mask, fetched and decoded (images.load_image).
    Blocking (downloads): runs off the event loop."""
    source = load_image("image", request.image, limits) if request.image else None
    control = load_image("control_image", request.control_image, limits) if request.control_image else None
    mask = load_image("mask", request.mask, limits) if request.mask else None
    if mask is not None and source is not None and mask.size != source.size:
        raise RequestError(
            f"mask: {mask.width}x{mask.height} does not match image's {source.width}x{source.height}:"
            " send a mask of the image's size"
        )
    return source, control, mask


def output_size(request: ImageRequest, source: Image.Image | None, family: Family, max_pixels: int) -> tuple[int, int]:
    """The requested size; a missing side follows the input image's aspect (or the family default).
    A size past `max_pixels` (MAX_PIXELS) or MAX_SIDE is refused."""
    width, height = _output_size(request, source, family, max_pixels)
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise RequestError(
            f"width × height is {width}x{height} = {width * height} pixels, over the budget of {max_pixels}"
            f" (MAX_PIXELS) or a side over {MAX_SIDE}"
        )
    return width, height


def _output_size(request: ImageRequest, source: Image.Image | None, family: Family, max_pixels: int) -> tuple[int, int]:
    if request.width and request.height:
        return request.width, request.height
    if source is None:
        return request.width or family.width, request.height or family.height
    multiple = family.size_multiple
    if request.width:
        return request.width, max(MIN_SIDE, round(request.width * source.height / source.width / multiple) * multiple)
    if request.height:
        return max(MIN_SIDE, round(request.height * source.width / source.height / multiple) * multiple), request.height
    return fit_size(source.width, source.height, family.width * family.height, max_pixels, multiple)


def default_steps(request: ImageRequest, image_to_image: bool, family: Family) -> int:
    """The family's steps; with an input image, at least enough for strength to run one step
    (SDXL Turbo's single step × strength 0.8 would run none)."""
    if request.num_inference_steps is not None:
        return request.num_inference_steps
    if image_to_image:
        if (request.strength or DEFAULT_STRENGTH) * MAX_STEPS < 1:
            raise RequestError(f"strength must be at least {1 / MAX_STEPS:g}: lower strengths run no step")
        return max(family.steps, math.ceil(1 / (request.strength or DEFAULT_STRENGTH)))
    return family.steps


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
    scheduler: str  # a key of pipelines.SCHEDULERS, or "default": the model's own
    seeds: list[int]
    source: Image.Image | None = None  # image-to-image input, resized
    mask: Image.Image | None = None  # inpainting mask (L mode), resized like source
    batch: bool = False  # the images as one batch, not one after another
    control: Image.Image | None = None  # ControlNet conditioning, resized
    adapters: AdapterSet = ()  # LoRA adapters and their weights
    adapter_fields: tuple[str, ...] = ()  # the request field of each, for errors
    lora_weights: tuple[float, ...] = ()  # the weight each of request.loras got: its own, LORAS' or 1

    def parameters(self, model: str, family: str) -> dict[str, Any]:
        """What was actually used, so a caller can reproduce the output."""
        used: dict[str, Any] = {
            "model": model,
            "family": family,
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
            used["loras"] = [
                {"source": lora.source, "weight": weight}
                for lora, weight in zip(self.request.loras, self.lora_weights, strict=True)
            ]
        return used

    @property
    def strength(self) -> float:
        return self.request.strength if self.request.strength is not None else DEFAULT_STRENGTH


@dataclass(frozen=True)
class Generated:
    image: Image.Image
    nsfw: bool | None  # None: the model has no safety checker
