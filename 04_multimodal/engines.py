"""The generation engine: a transformers vision-language model, its processor, streamed generation.

The handler hands an engine a prompt, either chat turns (each image a {"type": "image"} part)
or, for models without a chat template (BLIP-2), plain text, together with the decoded images;
the engine returns a `Prepared` request (it knows its prompt's length in tokens, image tokens
included, before anything is generated) and then streams `Delta`s for it (textstream.py).

`TransformersVisionEngine` runs any transformers image-text-to-text model. Its methods are the
text worker's (render, count, generate), shaped for images: a vLLM engine
would take the same turns and images (vLLM renders the same chat template and takes PIL images
as `multi_modal_data`), count with its own processor and stream from `AsyncLLM`. It is not here
because vLLM's multimodal code imports torchvision, which cannot be installed beside the CPU
torch the tests run on, so it could not be tested.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from families import model_inputs
from textstream import Delta, SamplingParams, StreamingGenerator


@dataclass
class Prepared:
    """One request, ready to generate: what the engine needs, and its prompt's length."""

    inputs: dict[str, Any]
    prompt_tokens: int


@dataclass
class TransformersVisionEngine:
    """A transformers vision-language model and its processor, streamed by `StreamingGenerator`."""

    model: Any
    processor: Any
    context_len: int
    max_concurrency: int
    eos_token_ids: set[int]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float | None = None  # per generation

    def __post_init__(self) -> None:
        self.generator = StreamingGenerator(
            self.model, self.processor.tokenizer, self.eos_token_ids, self.max_concurrency, self.time_limit_s
        )

    @property
    def active(self) -> int:
        """Generations running now."""
        return self.generator.active

    def prepare(self, prompt: list[dict[str, Any]] | str, images: list[Image.Image]) -> Prepared:
        """Template, tokenize, preprocess the images (resize, normalise, expand their placeholders).
        Blocking: the handler runs it off the event loop."""
        if isinstance(prompt, str):
            inputs = dict(self.processor(images=images, text=prompt, return_tensors="pt"))
        else:
            inputs = model_inputs(self.processor, prompt, images)
        device, dtype = self.generator.device, self.model.dtype
        inputs = {  # only floating-point pixels take the model's dtype; grids, masks and ids keep theirs
            name: value.to(device, dtype=dtype) if name == "pixel_values" else value.to(device)
            for name, value in inputs.items()
        }
        return Prepared(inputs, int(inputs["input_ids"].shape[1]))

    def generate(self, prepared: Prepared, params: SamplingParams) -> AsyncIterator[Delta]:
        return self.generator.generate(prepared.inputs, params)
