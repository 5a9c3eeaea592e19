"""Vision-language models at 32 px: CLIP and SigLIP (1 and 2) for image/text embeddings; LLaVA 1.5,
LLaVA-NeXT, BLIP-2, Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3, SmolVLM 2 and LLaVA-OneVision for chat
and captions. Their language models are text.py's, with each family's image tokens added."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tests.shared.tiny_models.corpus import SEED
from tests.shared.tiny_models.image import CLIP_TEXT
from tests.shared.tiny_models.text import (
    FAMILIES,
    LM_DIMS,
    MISTRAL_SPECIALS,
    Family,
    text_config_for,
    train_byte_bpe,
    v4_tokenizer_class,
)
from tests.shared.tiny_models.vocabularies import train_clip_bpe, train_sentencepiece, write_clip_vocab

# ---- vision-language models -------------------------------------------------------------------
#
# CLIP, LLaVA 1.5, LLaVA-NeXT and BLIP-2 at 32x32 pixels. Every vision tower is a ViT with 4-pixel
# patches, so an image is 8x8 = 64 patches (plus a CLS token); the image processors resize any photo
# down to 32 px, as the real ones do to 224 or 336. Processors are saved in the Hub's layout.

_CLIP_VISION: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
# CLIPImageProcessor's steps, as for the real 224 or 336 px: shortest edge to 32, then a 32x32 centre crop.
_CLIP_IMAGE: dict[str, Any] = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def _save_processor(processor, out: Path) -> None:
    """Save `processor` in the layout of the Hub's checkpoints, which transformers 4 and 5 both load.

    transformers 5 nests the image processor's settings in processor_config.json, which transformers
    4 would pass as the image processor itself; the Hub's repos keep them in preprocessor_config.json.
    """
    processor.save_pretrained(out)
    processor_config = out / "processor_config.json"
    settings = json.loads(processor_config.read_text())
    settings.pop("image_processor", None)
    processor_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    processor.image_processor.save_pretrained(out)
    v4_tokenizer_class(out)


def _image_processor(name: str, **kwargs: Any):
    """The PIL backend of image processor `name` (the default one needs torchvision); it is saved under
    the plain name, so a machine with torchvision loads the default backend with the same settings."""
    import transformers

    return getattr(transformers, f"{name}Pil")(**kwargs)


def build_clip(out: Path) -> Path:
    """A CLIPModel (ViT image and text towers, projected to 32 dims) with CLIPProcessor, like
    openai/clip-vit-base-patch32, for zero-shot classification and image/text embeddings."""
    import torch
    import transformers

    vocab, merges = train_clip_bpe()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = transformers.CLIPConfig(
        text_config=CLIP_TEXT | {"vocab_size": len(vocab), "pad_token_id": tokenizer.pad_token_id, **ids},
        vision_config=_CLIP_VISION,
        projection_dim=CLIP_TEXT["projection_dim"],
    )
    torch.manual_seed(SEED)
    transformers.CLIPModel(config).save_pretrained(out)
    image_processor = _image_processor("CLIPImageProcessor", **_CLIP_IMAGE)
    _save_processor(transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), out)
    write_clip_vocab(out, vocab, merges)
    return out


# The chat templates take a message's content as a string or as OpenAI-style parts; as in the real
# LLaVA templates, a message's images come first, one "<image>\n" each, then its text parts.
_VLM_CONTENT = (
    r"{%- macro render(content) %}{%- if content is string %}{{- content }}{%- else %}"
    r"{%- for part in content if part['type'] in ('image', 'image_url') %}{{- '<image>\n' }}{%- endfor %}"
    r"{{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    r"{%- endif %}{%- endmacro %}"
)


@dataclass(frozen=True)
class _Llava:
    config: str  # LlavaConfig or LlavaNextConfig
    processor: str
    image_processor: str
    family: Family  # the language model: config class, tokenizer specials (with <image>), chat template
    shared: dict[str, Any] = field(default_factory=dict)  # settings both the model config and image processor hold


LLAVA: dict[str, _Llava] = {
    # LLaVA 1.5 (llava-hf/llava-1.5-7b-hf): Vicuna's "USER: ... ASSISTANT:" turns, </s> after each reply
    # as in LLaVA's own conversation format. No bos in the template: the tokenizer adds it, as the
    # processor tokenizes the rendered prompt.
    "llava": _Llava(
        config="LlavaConfig",
        processor="LlavaProcessor",
        image_processor="CLIPImageProcessor",
        family=Family(
            config="LlamaConfig",
            specials=["<unk>", "<s>", "</s>", "<image>", "<pad>"],
            bos="<s>",
            eos="</s>",
            pad="<pad>",
            chat_template=_VLM_CONTENT
            + (
                r"{%- for m in messages %}"
                r"{%- if m['role'] == 'system' %}{{- render(m['content']) + ' ' }}"
                r"{%- elif m['role'] == 'user' %}{{- 'USER: ' + render(m['content']) + ' ' }}"
                r"{%- else %}{{- 'ASSISTANT: ' + render(m['content']) + eos_token }}{%- endif %}"
                r"{%- endfor %}{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
            ),
        ),
    ),
    # LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf): Mistral's [INST] turns. "anyres": the image is
    # also resized to the best fitting of these resolutions, the real ones scaled by 32/336, and cut
    # into 32x32 tiles, each encoded like the whole image.
    "llava-next": _Llava(
        config="LlavaNextConfig",
        processor="LlavaNextProcessor",
        image_processor="LlavaNextImageProcessor",
        family=Family(
            config="MistralConfig",
            specials=[*MISTRAL_SPECIALS, "<image>", "<pad>"],
            bos="<s>",
            eos="</s>",
            pad="<pad>",
            chat_template=_VLM_CONTENT
            + (
                r"{%- set ns = namespace(system='') %}{%- for m in messages %}"
                r"{%- if m['role'] == 'system' %}{%- set ns.system = render(m['content']) + '\n\n' %}"
                r"{%- elif m['role'] == 'user' %}{{- '[INST] ' + ns.system + render(m['content']) + ' [/INST]' }}"
                r"{%- set ns.system = '' %}"
                r"{%- elif m['role'] == 'assistant' %}{{- ' ' + render(m['content']) + eos_token }}"
                r"{%- else %}{{- raise_exception('roles must be system, user and assistant') }}"
                r"{%- endif %}{%- endfor %}"
            ),
            config_kwargs={"sliding_window": None},
        ),
        shared={"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]},
    ),
}


def build_llava(out: Path, kind: str) -> Path:
    """A LLaVA model of family `kind`: CLIP vision tower, two-layer MLP projector and a Llama or
    Mistral language model; its processor expands each <image> into one token per image feature."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    llava = LLAVA[kind]
    # Left padding, as llava-hf's tokenizers: every prompt of a padded batch ends where generation starts.
    tokenizer = train_byte_bpe(llava.family, padding_side="left")
    text_config, generation_config = text_config_for(llava.family, tokenizer)
    patch_size = _CLIP_VISION["patch_size"]
    # As the real ones: features from the second to last layer, without the CLS token ("default").
    strategy = "default"
    config = getattr(transformers, llava.config)(
        vision_config=transformers.CLIPVisionConfig(**_CLIP_VISION),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(_CLIP_VISION["image_size"] // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        **llava.shared,
    )
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    processor = getattr(transformers, llava.processor)(
        image_processor=_image_processor(llava.image_processor, **_CLIP_IMAGE, **llava.shared),
        tokenizer=tokenizer,
        chat_template=llava.family.chat_template,
        patch_size=patch_size,
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        vision_feature_select_strategy=strategy,
    )
    _save_processor(processor, out)
    return out


# OPT as in Salesforce/blip2-opt-2.7b: GPT-2's byte-level BPE, with </s> as both bos and eos.
_OPT = Family(
    config="OPTConfig",
    specials=["<s>", "<pad>", "</s>", "<unk>", "<image>"],
    bos="</s>",
    eos="</s>",
    pad="<pad>",
    dims={
        "hidden_size": 64,
        "word_embed_proj_dim": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 2048,
    },
)
_BLIP2_QUERY_TOKENS = 8  # the real 32, shrunk


def build_blip2(out: Path) -> Path:
    """A BLIP-2 captioning / visual question answering model with an OPT language model.

    The Q-Former turns the image into 8 query embeddings, which stand in for 8 <image> tokens the
    processor puts in front of the text (or generate() in front of bos when there is none).
    """
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    tokenizer = train_byte_bpe(_OPT)
    text_config, generation_config = text_config_for(_OPT, tokenizer)
    vision = {k: v for k, v in _CLIP_VISION.items() if k != "projection_dim"} | {"hidden_act": "gelu"}
    config = transformers.Blip2Config(
        vision_config=vision,
        # The real Q-Former is a BERT-base with cross-attention to the image every other layer.
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": vision["hidden_size"],
        },
        text_config=text_config,
        num_query_tokens=_BLIP2_QUERY_TOKENS,
        image_text_hidden_size=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    # BLIP resizes straight to the square size, without keeping the aspect ratio or cropping.
    image_processor = _image_processor("BlipImageProcessor", size={"height": 32, "width": 32})
    processor = transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=_BLIP2_QUERY_TOKENS)
    _save_processor(processor, out)
    return out


# ---- SigLIP and SigLIP 2 (appended for 04_multimodal) --------------------------------------------
#
# Image and text towers of one width (SigLIP compares the pooled outputs directly), 32 px images in
# 4 px patches, and a text tower reading 16 tokens (the real one reads 64), so truncation is cheap to reach.
_SIGLIP_TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_SIGLIP_TEXT_TOKENS = 16


def build_siglip(out: Path, version: int) -> Path:
    """A SigLIP (1: SentencePiece SiglipTokenizer, 32x32 resize) or SigLIP 2 (Gemma-style byte BPE,
    NaFlex image processor keeping the aspect ratio in at most 16 patches) model with its processor,
    like google/siglip-base-patch16-224 and google/siglip2-base-patch16-224."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    text = _SIGLIP_TOWER | {"max_position_embeddings": _SIGLIP_TEXT_TOKENS}
    vision = _SIGLIP_TOWER | {"patch_size": 4}
    if version == 1:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = transformers.SiglipTokenizer(
                vocab_file=str(train_sentencepiece(Path(tmp))), model_max_length=_SIGLIP_TEXT_TOKENS
            )
        image_processor = _image_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
        vision |= {"image_size": 32}
        config_class, model_class, processor_class = "SiglipConfig", "SiglipModel", "SiglipProcessor"
    else:
        family = Family(config="", specials=["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", pad="<pad>")
        tokenizer = train_byte_bpe(family, vocab_size=400)
        tokenizer.model_max_length, tokenizer.unk_token = _SIGLIP_TEXT_TOKENS, "<unk>"
        image_processor = _image_processor("Siglip2ImageProcessor", patch_size=4, max_num_patches=16)
        vision |= {"num_patches": 16}
        config_class, model_class, processor_class = "Siglip2Config", "Siglip2Model", "Siglip2Processor"
    text |= {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,  # SigLIP tokenizers add no bos; the config's default is CLIP's id
    }
    config = getattr(transformers, config_class)(text_config=text, vision_config=vision)
    getattr(transformers, model_class)(config).save_pretrained(out)
    _save_processor(getattr(transformers, processor_class)(image_processor=image_processor, tokenizer=tokenizer), out)
    return out


# ---- modern VLMs: Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM (appended for 04_multimodal) ---------------
#
# Real architectures at toy sizes: the language models share LM_DIMS and the byte-level BPE; the
# vision towers are two layers of 32 wide. The processors are the real classes with their real
# settings shrunk, saved without a video processor (transformers' video processors need torchvision).

_QWEN_VL_TEMPLATE = (
    r"{%- for m in messages %}"
    r"{%- if loop.first and m['role'] != 'system' %}"
    r"{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    r"{%- endif %}{{- '<|im_start|>' + m['role'] + '\n' }}"
    r"{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for part in m['content'] %}"
    r"{%- if part['type'] in ('image', 'image_url') %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    r"{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    r"{{- '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_QWEN_VL_FAMILY = Family(
    config="",
    specials=[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ],
    eos="<|im_end|>",
    pad="<|endoftext|>",
    stop=("<|endoftext|>",),
    chat_template=_QWEN_VL_TEMPLATE,
)


def _images_only(processor_class: Any, **parts: Any) -> Any:
    """`processor_class` built without its video processor (every one in transformers 5.24 needs
    torchvision), saved with all its own settings (num_image_tokens, image_seq_len) as the Hub's are.
    04_multimodal/families.py loads them the same way."""

    class ImagesOnly(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:  # the parts ProcessorMixin expects, checks and saves
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly(video_processor=None, **parts)


def build_qwen_vl(out: Path, version: str) -> Path:
    """Qwen2-VL ("2") or Qwen2.5-VL ("2.5"), like Qwen/Qwen2.5-VL-7B-Instruct: a ViT of 14 px patches
    merged 2x2 into one token, at the image's own resolution (dynamic, bounded by the image
    processor's min/max pixels), multimodal rotary positions, ChatML. The image processor here
    allows at most 64 vision tokens an image (the real one 16,384), so tests stay fast."""
    import torch
    import transformers

    tokenizer = train_byte_bpe(_QWEN_VL_FAMILY)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _QWEN_VL_FAMILY.specials}
    prefix = "Qwen2_5_VL" if version == "2.5" else "Qwen2VL"
    text = LM_DIMS | {
        "vocab_size": len(tokenizer),
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": None,
        # M-RoPE: the head's rotary halves split between time, height and width (the real [16, 24, 24] of 64).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "2.5":
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": LM_DIMS["hidden_size"],
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        vision |= {"embed_dim": 32, "hidden_size": LM_DIMS["hidden_size"], "mlp_ratio": 2}
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(SEED)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    merge = vision["patch_size"] * vision["spatial_merge_size"]  # 28 px per vision token
    image_processor = _image_processor(
        "Qwen2VLImageProcessor", size={"shortest_edge": 4 * merge * merge, "longest_edge": 64 * merge * merge}
    )
    processor = _images_only(
        getattr(transformers, f"{prefix}Processor"),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_QWEN_VL_TEMPLATE,
    )
    _save_processor(processor, out)
    return out


# ---- modern VLMs: Gemma 3, Idefics3, SmolVLM 2, LLaVA-OneVision (appended for 04_multimodal) ---------
#
# As above: real classes at toy sizes, 32 px images in 4 px patches, the byte-level BPE with each
# family's own special tokens, templates shaped like the checkpoints' own (an image part becomes the
# family's placeholder, which the processor expands into the image's tokens).

_SIGLIP_VISION: dict[str, Any] = _SIGLIP_TOWER | {"image_size": 32, "patch_size": 4}

# Gemma 3 (google/gemma-3-4b-it): <start_of_image> where an image goes, expanded by the processor
# into 16 soft tokens (the real 256: SigLIP's 64x64 patches pooled to 16x16; here 8x8 pooled to 4x4).
_GEMMA3_IMAGE_TOKENS = 16
_GEMMA3_VLM_TEMPLATE = (
    r"{{- bos_token }}{%- set ns = namespace(system='') %}{%- for m in messages %}"
    r"{%- if m['role'] == 'system' %}"
    r"{%- set ns.system = m['content'] if m['content'] is string else "
    r"m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    r"{%- set ns.system = ns.system + '\n\n' %}{%- else %}"
    r"{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    r"{{- '<start_of_turn>' + role + '\n' + ns.system }}{%- set ns.system = '' %}"
    r"{%- if m['content'] is string %}{{- m['content'] | trim }}{%- else %}{%- for part in m['content'] %}"
    r"{%- if part['type'] in ('image', 'image_url') %}{{- '<start_of_image>' }}"
    r"{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}{%- endfor %}{%- endif %}"
    r"{{- '<end_of_turn>\n' }}{%- endif %}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)


def build_gemma3_vlm(out: Path) -> Path:
    """Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, like google/gemma-3-4b-it): a
    SigLIP encoder whose patches are average-pooled into a fixed 16 tokens an image, at one square
    resolution; image tokens attend to each other both ways (the processor's token_type_ids)."""
    import torch
    import transformers

    base = FAMILIES["gemma3"]
    images = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    family = replace(base, specials=[*base.specials, *images.values()], chat_template=_GEMMA3_VLM_TEMPLATE)
    tokenizer = train_byte_bpe(family, extra_special_tokens=images)
    text_config, generation_config = text_config_for(family, tokenizer)
    config = transformers.Gemma3Config(
        text_config=text_config.to_dict(),
        vision_config=_SIGLIP_VISION | {"vision_use_head": False},
        mm_tokens_per_image=_GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.convert_tokens_to_ids(images["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(images["eoi_token"]),
        image_token_index=tokenizer.convert_tokens_to_ids(images["image_token"]),
    )
    torch.manual_seed(SEED)
    model = transformers.Gemma3ForConditionalGeneration(config)
    model.generation_config = generation_config
    model.save_pretrained(out)
    image_processor = _image_processor("Gemma3ImageProcessor", size={"height": 32, "width": 32})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_GEMMA3_VLM_TEMPLATE,
        image_seq_length=_GEMMA3_IMAGE_TOKENS,
    )
    _save_processor(processor, out)
    return out


# Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3) and SmolVLM (HuggingFaceTB/SmolVLM-256M-Instruct is an
# idefics3 model; SmolVLM2 is "smolvlm"): "User:<image>...<end_of_utterance>\nAssistant:" turns. An
# image is cut into tiles of 32 px (the real 364 or 512) plus a global view of the whole, each tile
# 8x8 patches shuffled 2x2 into 16 tokens between <fake_token_around_image> and a <row_i_col_j> tag.
_IDEFICS3_TEMPLATE = (
    r"<|im_start|>{%- for m in messages %}{{- m['role'] | capitalize }}"
    r"{%- if m['content'] is string %}{{- ': ' + m['content'] }}{%- else %}"
    r"{%- if m['content'][0]['type'] in ('image', 'image_url') %}{{- ':' }}{%- else %}{{- ': ' }}{%- endif %}"
    r"{%- for part in m['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    r"{%- elif part['type'] in ('image', 'image_url') %}{{- '<image>' }}{%- endif %}{%- endfor %}{%- endif %}"
    r"{{- '<end_of_utterance>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)
_IDEFICS3_FAMILY = Family(
    config="LlamaConfig",
    specials=[
        "<|im_start|>",
        "<|im_end|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        "<pad>",
        *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    ],
    eos="<end_of_utterance>",
    pad="<pad>",
    stop=("<|im_end|>",),
    chat_template=_IDEFICS3_TEMPLATE,
)
_IDEFICS3_SCALE = 2  # pixel shuffle: 2x2 patches into one token
_IDEFICS3_TILE_TOKENS = (_SIGLIP_VISION["image_size"] // _SIGLIP_VISION["patch_size"]) ** 2 // _IDEFICS3_SCALE**2


def build_idefics3(out: Path, kind: str) -> Path:
    """Idefics3 ("idefics3", as SmolVLM 1 ships) or SmolVLM 2 ("smolvlm"): a SigLIP tower, pixel
    shuffle, a linear connector and a Llama; at most 2x2 tiles of 32 px plus the global view."""
    import torch
    import transformers

    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    tokenizer = train_byte_bpe(_IDEFICS3_FAMILY)
    text_config, generation_config = text_config_for(_IDEFICS3_FAMILY, tokenizer)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_SIGLIP_VISION,
        text_config=text_config.to_dict(),
        scale_factor=_IDEFICS3_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=text_config.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.generation_config = generation_config
    model.save_pretrained(out)
    image_processor = _image_processor(
        f"{prefix}ImageProcessor",
        size={"longest_edge": 2 * _SIGLIP_VISION["image_size"]},  # the whole image at most 2 tiles wide
        max_image_size={"longest_edge": _SIGLIP_VISION["image_size"]},  # one tile
        do_image_splitting=True,
    )
    processor_class = getattr(transformers, f"{prefix}Processor")
    make = partial(_images_only, processor_class) if kind == "smolvlm" else processor_class
    processor = make(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_IDEFICS3_TEMPLATE,
        image_seq_len=_IDEFICS3_TILE_TOKENS,
    )
    _save_processor(processor, out)
    return out


# LLaVA-OneVision (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP (all its patches, no CLS), a
# two-layer projector and Qwen2 in ChatML. "anyres_max_9": the whole image plus tiles of the best
# fitting grid below (the real 384 px grids scaled to 32 px), the tiles' features downsampled when
# there are more than 9 tiles' worth.
_ONEVISION_TEMPLATE = (
    r"{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' }}"
    r"{%- if m['content'] is string %}{{- m['content'] }}{%- else %}"
    r"{%- for part in m['content'] if part['type'] in ('image', 'image_url') %}{{- '<image>\n' }}{%- endfor %}"
    r"{{- m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    r"{%- endif %}{{- '<|im_end|>\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_ONEVISION_FAMILY = Family(
    config="Qwen2Config",
    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    eos="<|im_end|>",
    pad="<|endoftext|>",
    stop=("<|endoftext|>",),
    chat_template=_ONEVISION_TEMPLATE,
)
_ONEVISION_GRIDS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def build_llava_onevision(out: Path) -> Path:
    """LLaVA-OneVision: a SigLIP tower whose 64 patch features per tile (the real 729) go through the
    projector, tiles chosen from _ONEVISION_GRIDS, an image_newline after each row, Qwen2 in ChatML."""
    import torch
    import transformers

    tokenizer = train_byte_bpe(_ONEVISION_FAMILY, padding_side="left")
    text_config, generation_config = text_config_for(_ONEVISION_FAMILY, tokenizer)
    config = transformers.LlavaOnevisionConfig(
        vision_config=_SIGLIP_VISION | {"model_type": "siglip_vision_model", "vision_use_head": False},
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_ONEVISION_GRIDS,
    )
    torch.manual_seed(SEED)
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    model.generation_config = generation_config
    model.save_pretrained(out)
    image_processor = _image_processor(
        "LlavaOnevisionImageProcessor", size={"height": 32, "width": 32}, image_grid_pinpoints=_ONEVISION_GRIDS
    )
    processor = _images_only(
        transformers.LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_ONEVISION_TEMPLATE,
        num_image_tokens=(_SIGLIP_VISION["image_size"] // _SIGLIP_VISION["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    _save_processor(processor, out)
    return out
