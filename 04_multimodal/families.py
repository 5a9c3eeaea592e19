"""Vision-language model families: what differs between LLaVA, Qwen2-VL and the others.

The handler reads `model_type` from the model's config and asks this module three things about
its family: how to load its processor, how many images one request may carry, and how a turn's
images and text become the model's inputs. Everything else (generation, streaming, sampling,
structured output) is the same for every family and lives in textstream.py and structured_output.py.

  family        model_type                 images                                  default max images
  LLaVA 1.5     llava                      one 336 px view: 576 tokens             4
  LLaVA-NeXT    llava_next                 336 px tiles (anyres): up to ~2,900     4
  OneVision     llava_onevision            384 px tiles (anyres_max_9): up to ~7,300   4
  Qwen2(.5)-VL  qwen2_vl, qwen2_5_vl       its own resolution, 28 px per token,    8
                                           bounded by MIN/MAX_IMAGE_TOKENS
  Idefics3      idefics3 (SmolVLM)         512 px tiles + a global view, 81 each  4
  SmolVLM 2     smolvlm                    as Idefics3 (64 tokens a tile)          4
  Gemma 3       gemma3                     one 896 px view: 256 tokens             8

Every family's processor renders the checkpoint's own chat template (`apply_chat_template`) with
one `{"type": "image"}` part per image, in the order the images came, and expands each image
placeholder into the image's tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import transformers
from jinja2 import TemplateError
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BitsAndBytesConfig, ProcessorMixin

from errors import RequestError


@dataclass(frozen=True)
class VLMFamily:
    name: str  # what the handler calls it in messages and logs
    processor_class: str | None  # None: AutoProcessor; else that class loaded without a video processor
    max_images: int  # MAX_IMAGES_PER_REQUEST's default: what its context holds comfortably
    # Module paths (from the model's root) kept in full precision when QUANTIZATION is set: the
    # vision encoder and projector are small and lose the most accuracy at low precision.
    keep_unquantized: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    dynamic_resolution: bool = False  # Qwen: the image's own size sets its tokens (see image_token_bounds)
    # Activations past float16's range (65,504): Gemma 3's overflow to inf/NaN in fp16, so DTYPE=auto
    # never picks fp16 for it (its checkpoints are bfloat16, which vLLM also picks).
    fp16_overflows: bool = False


VLM_FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily("llava", None, max_images=4),
    "llava_next": VLMFamily("llava", None, max_images=4),
    "llava_onevision": VLMFamily("llava-onevision", "LlavaOnevisionProcessor", max_images=4),
    "qwen2_vl": VLMFamily("qwen2-vl", "Qwen2VLProcessor", 8, ("model.visual", "lm_head"), dynamic_resolution=True),
    "qwen2_5_vl": VLMFamily(
        "qwen2.5-vl", "Qwen2_5_VLProcessor", 8, ("model.visual", "lm_head"), dynamic_resolution=True
    ),
    "idefics3": VLMFamily("idefics3", None, 4, ("model.vision_model", "model.connector", "lm_head")),
    "smolvlm": VLMFamily("smolvlm", "SmolVLMProcessor", 4, ("model.vision_model", "model.connector", "lm_head")),
    "gemma3": VLMFamily(
        "gemma3", None, 8, ("model.vision_tower", "model.multi_modal_projector", "lm_head"), fp16_overflows=True
    ),
}


def auto_dtype(model_type: str, device: str, bf16_native: bool) -> str:
    """DTYPE=auto, decided without a model: float32 on CPU; on a GPU float16 (half the memory of
    float32, and native on every GPU), except for a family that overflows in it (Gemma 3): then
    bfloat16 where the GPU computes it natively (Ampere and later: `bf16_native`), else float32."""
    if device != "cuda":
        return "float32"
    family = VLM_FAMILIES.get(model_type)
    if family is not None and family.fp16_overflows:
        return "bfloat16" if bf16_native else "float32"
    return "float16"


SUB_PROCESSORS = ("image_processor", "tokenizer", "video_processor")  # loaded apart, never settings


def images_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` for a processor built without its video processor. transformers 5.24 builds
    one for Qwen2-VL, LLaVA-OneVision and SmolVLM, and every video processor needs torchvision,
    which this image does not install (PyPI's build breaks transformers beside this torch)."""

    class ImagesOnly(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:  # the parts ProcessorMixin expects, checks and saves
            return [name for name in super().get_attributes() if name != "video_processor"]

        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            # SmolVLM's own override reads its video processor's frame settings, even for images.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


def load_processor(family: VLMFamily, model_name: str, **common: Any) -> Any:
    """The family's processor. Without a video processor, the parts load one by one, and the
    processor's own settings (OneVision's num_image_tokens, SmolVLM's image_seq_len, the chat
    template) come from its processor_config.json as from_pretrained would pass them."""
    if family.processor_class is None:
        return AutoProcessor.from_pretrained(model_name, **common)
    processor_class = images_only(getattr(transformers, family.processor_class))
    settings, _ = processor_class.get_processor_dict(model_name, **common)
    accepted = inspect.signature(processor_class.__init__).parameters
    return processor_class(
        image_processor=AutoImageProcessor.from_pretrained(model_name, **common),
        tokenizer=AutoTokenizer.from_pretrained(model_name, **common),
        video_processor=None,
        **{name: value for name, value in settings.items() if name in accepted and name not in SUB_PROCESSORS},
    )


def image_token_bounds(processor: Any, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """Qwen2-VL's dynamic resolution, bounded: each image is resized (keeping its aspect ratio) to
    between `min_tokens` and `max_tokens` vision tokens of 28×28 px, so a 12 MP photo cannot become
    15,000 tokens. Returns the pixel bounds now set on the image processor."""
    image_processor = processor.image_processor
    per_token = (image_processor.patch_size * image_processor.merge_size) ** 2
    bounds = (min_tokens * per_token, max_tokens * per_token)
    image_processor.size = {"shortest_edge": bounds[0], "longest_edge": bounds[1]}
    return bounds


def model_inputs(processor: Any, turns: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """The chat template's prompt for `turns` (each image a {"type": "image"} part), tokenized with
    the images expanded into their tokens: input_ids, attention_mask, pixel_values and whatever else
    the family's forward takes (Qwen's image_grid_thw, Idefics3's pixel_attention_mask)."""
    try:
        prompt = processor.apply_chat_template(turns, add_generation_prompt=True)
    except TemplateError as error:  # the template's own rule, e.g. Gemma 3's "roles must alternate user/assistant"
        raise RequestError(f"messages: the model's chat template refused them: {error}") from None
    except ValueError as error:  # transformers' own checks; their message may quote the prompt: only its type
        raise RequestError(
            f"messages: the model's chat template could not render them ({type(error).__name__})"
        ) from None
    # Templates that write the bos token themselves (Gemma 3's) must not get a second one.
    bos = processor.tokenizer.bos_token
    special_tokens = not (bos and prompt.startswith(bos))
    return dict(processor(images=images, text=prompt, add_special_tokens=special_tokens, return_tensors="pt"))


# Module paths (from the model's root) that stay in full precision when QUANTIZATION is set.
KEEP_UNQUANTIZED = {"blip2": ("vision_model", "qformer", "language_projection", "language_model.lm_head")} | {
    vlm.name: vlm.keep_unquantized for vlm in VLM_FAMILIES.values()
}


def quantization_config(name: str | None, family: str, compute_dtype: Any) -> BitsAndBytesConfig | None:
    """transformers' bitsandbytes config for QUANTIZATION (None: none); the reason when a family has none."""
    if not name:
        return None
    if family not in KEEP_UNQUANTIZED:  # CLIP and SigLIP
        raise ValueError(
            "QUANTIZATION applies to LLaVA and BLIP-2; CLIP and SigLIP are small enough to serve unquantized"
        )
    # Only the language model is quantized: it holds ~95% of the weights, while the vision encoder
    # and the projector are small and lose the most accuracy at low precision.
    keep = list(KEEP_UNQUANTIZED[family])
    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if name == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=keep,
        )
    raise ValueError(f"QUANTIZATION must be bnb-8bit or bnb-4bit, got {name!r}")
