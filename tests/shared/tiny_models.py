"""Build tiny random-weight models of the real architectures the examples serve, offline.

Every example loads its model from `MODEL_NAME`, a Hub id or a local folder. The folders this
module writes are real checkpoints of the same architectures (same config classes, tokenizers
and file layout as the Hub models), only with a hidden size of 32-64 and two layers, so each
handler runs its real code path on CPU in seconds, without network access.

Try a handler offline with one:

    python tests/shared/tiny_models.py sentence-transformer /tmp/tiny-embedder
    cd 03_embeddings && MODEL_NAME=/tmp/tiny-embedder python handler.py

The causal LM kinds (llama, mistral, mixtral, qwen3, phi3, gemma3) each come with their family's
special tokens, chat template and end-of-turn eos token, e.g.

    python tests/shared/tiny_models.py qwen3 /tmp/tiny-qwen3

The Stable Diffusion kinds (sd15, sd2, sdxl, sdxl-turbo) are whole diffusers pipelines, loaded with
`AutoPipelineForText2Image.from_pretrained(folder)`; controlnet-sd15 and controlnet-sdxl are lone
`ControlNetModel`s for those UNets, to pass as `from_pipe(pipeline, controlnet=...)`:

    python tests/shared/tiny_models.py sdxl /tmp/tiny-sdxl
    python tests/shared/tiny_models.py controlnet-sdxl /tmp/tiny-controlnet-sdxl

The vision-language kinds take any image, resized to 32 px: clip (CLIPModel + CLIPProcessor, for
zero-shot labels and image/text embeddings), llava (LLaVA 1.5, Llama) and llava-next (LLaVA-NeXT,
Mistral, anyres tiles), both with a chat template that takes OpenAI-style image and text parts, and
blip2 (BLIP-2 with OPT, for captions and "Question: ... Answer:" prompts). They load with
`AutoProcessor` and `CLIPModel` or `AutoModelForImageTextToText`:

    python tests/shared/tiny_models.py llava /tmp/tiny-llava

Builds are deterministic: the same kind always gives the same weights and vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

# A few hundred words of varied English, so trained tokenizers have a real vocabulary and
# tests can send ordinary sentences without every word falling back to unknown tokens.
CORPUS = """
The quick brown fox jumps over the lazy dog. A serverless worker loads its model once and then
answers many jobs. Cats and dogs are popular pets; people love them. The weather today is sunny
with a light breeze, and tomorrow it may rain. Paris is the capital of France, Berlin is the
capital of Germany, and Tokyo is the capital of Japan. Machine learning models turn text into
vectors, and similar sentences get similar vectors. A GPU makes inference fast. Stock markets
rose after the central bank held interest rates. The recipe needs flour, sugar, eggs and butter.
Football fans cheered as their team scored in the final minute. Please summarise this document in
three sentences. What is the meaning of life? How do I reset my password? The train to London
leaves at nine o'clock. Photosynthesis converts sunlight, water and carbon dioxide into sugar.
Write a short poem about the sea. Translate hello into Spanish: hola. Numbers: 0 1 2 3 4 5 6 7 8 9.
Café, naïve, jalapeño, 東京, Здравствуйте, 😀 — unicode text must survive every step.
""".strip()

SEED = 0


def _train_wordpiece(vocab_size: int = 400):
    """A BERT-style WordPiece tokenizer trained on CORPUS (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([CORPUS] * 4, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_sentence_transformer(out: Path) -> Path:
    """A BERT sentence-transformer (Transformer → mean Pooling → Normalize), like all-MiniLM-L6-v2.

    It defines `query`/`document` prompts (as E5- and BGE-style models do) and a short maximum
    sequence length of 32 tokens, so tests can reach prompt handling and truncation cheaply.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=32)
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(
            modules=[transformer, pooling, models.Normalize()],
            prompts={"query": "query: ", "document": "passage: "},
            device="cpu",
        )
        model.save(str(out))
    return out


def build_cross_encoder(out: Path) -> Path:
    """A BERT cross-encoder (one relevance logit per query-document pair), like BAAI/bge-reranker-base."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        BertForSequenceClassification(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        CrossEncoder(tmp, device="cpu", max_length=128).save(str(out))
    return out


# ---- causal LMs -------------------------------------------------------------------------------
#
# Every family shares one byte-level BPE vocabulary (only the special tokens differ; the real
# Mistral, Phi-3 and Gemma use SentencePiece, but byte-level BPE round-trips any text exactly) and
# one set of dimensions; a `_Family` holds what really differs: config class, special tokens and
# chat template. head_dim is 32 because vLLM's CPU attention kernels need head sizes of 32 or more.

_LM_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,  # grouped-query attention, as most of these families use
    "head_dim": 32,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}

# Gemma and Mistral templates refuse a system message; ours fold it into the first user turn (as
# Gemma's official template does), so one request shape works with every family.
_FOLD_SYSTEM = (
    r"{%- if messages and messages[0]['role'] == 'system' %}"
    r"{%- set system = messages[0]['content'] + '\n\n' %}{%- set messages = messages[1:] %}"
    r"{%- else %}{%- set system = '' %}{%- endif %}"
)


@dataclass(frozen=True)
class _Family:
    config: str  # name of the transformers config class
    specials: list[str]  # special tokens, in id order from 0
    eos: str  # end of turn: the tokenizer's eos_token, so a chat reply stops on it
    pad: str
    chat_template: str | None = None  # None for base (non-chat) models
    bos: str | None = None  # added in front of every encoding when set (Qwen and Phi-3 add none)
    stop: tuple[str, ...] = ()  # more tokens that end generation, as in the real generation_config
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, Any] = field(default_factory=_LM_DIMS.copy)  # OPT names its dimensions differently


_LLAMA_TEMPLATE = (
    r"{{- bos_token }}{%- for m in messages %}"
    r"{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_MISTRAL_TEMPLATE = _FOLD_SYSTEM + (
    r"{{- bos_token }}{%- for m in messages %}"
    r"{%- if m['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    r"{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    r"{%- else %}{{- raise_exception('roles must be user and assistant after an optional system message') }}"
    r"{%- endif %}{%- endfor %}"
)
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]

_FAMILIES: dict[str, _Family] = {
    # Llama 3 Instruct: header tokens around each role, <|eot_id|> ends a turn.
    "llama": _Family(
        config="LlamaConfig",
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        stop=("<|end_of_text|>", "<|eom_id|>"),
        chat_template=_LLAMA_TEMPLATE,
    ),
    # Mistral Instruct: [INST] ... [/INST] turns, </s> after each reply. No pad token of its own.
    "mistral": _Family(
        config="MistralConfig",
        specials=_MISTRAL_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        chat_template=_MISTRAL_TEMPLATE,
        config_kwargs={"sliding_window": None},  # as Mistral 7B v0.2 and later
    ),
    # Mixtral: Mistral's tokenizer with sparse mixture-of-experts MLPs (4 experts, 2 per token).
    "mixtral": _Family(
        config="MixtralConfig",
        specials=_MISTRAL_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        chat_template=_MISTRAL_TEMPLATE,
        config_kwargs={"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # Qwen3: ChatML, no bos token; q/k norms in attention.
    "qwen3": _Family(
        config="Qwen3Config",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        stop=("<|endoftext|>",),
        chat_template=(
            r"{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            r"{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
        ),
    ),
    # Phi-3: <|role|> tags, <|end|> ends a turn; the tokenizer adds no bos token.
    "phi3": _Family(
        config="Phi3Config",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        eos="<|end|>",
        pad="<|endoftext|>",
        stop=("<|endoftext|>",),
        chat_template=(
            r"{%- for m in messages %}{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            r"{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
        ),
        config_kwargs={"original_max_position_embeddings": _LM_DIMS["max_position_embeddings"]},
    ),
    # Gemma 3 text-only (Gemma3ForCausalLM, like gemma-3-1b-it): the assistant role is "model";
    # one sliding-window layer then one global layer, as the real 5:1 pattern shortened.
    "gemma3": _Family(
        config="Gemma3TextConfig",
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        stop=("<eos>",),
        chat_template=_FOLD_SYSTEM
        + (
            r"{{- bos_token }}{%- for m in messages %}"
            r"{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
            r"{{- '<start_of_turn>' + role + '\n' + (system if loop.first else '') + m['content'] | trim }}"
            r"{{- '<end_of_turn>\n' }}{%- endfor %}"
            r"{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
        ),
        config_kwargs={
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window_pattern": 2,  # the older spelling of layer_types, still read by some loaders
            "sliding_window": 512,
            "query_pre_attn_scalar": 32,  # = head_dim, as in the real models
        },
    ),
}


# ---- 01 transformers engine: tool calling and thinking (Qwen 2.5 / Qwen3 style) ----------------
#
# Qwen's hermes-style tool calling: the tools as JSON in the system turn, each call as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results in <tool_response> user turns.
# <tool_call> and <think> stay plain text (as in the real tokenizers, where they are not special
# tokens), so decoding keeps them for the parsers.
_CHATML_TOOLS_TEMPLATE = (
    r"{%- if tools %}{{- '<|im_start|>system\n' }}"
    r"{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    r"{{- '# Tools\n\nYou may call one or more functions.\n\n<tools>' }}"
    r"{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    r"{{- '\n</tools>\n\nFor each call, return <tool_call>\n{\"name\": <function-name>, \"arguments\": <args>}\n"
    r"</tool_call><|im_end|>\n' }}"
    r"{%- elif messages[0]['role'] == 'system' %}"
    r"{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    r"{%- endif %}"
    r"{%- for m in messages %}"
    r"{%- if m['role'] == 'system' and loop.first %}"
    # As Qwen3's template, an earlier answer keeps only what follows its thoughts.
    r"{%- elif m['role'] == 'assistant' %}"
    r"{{- '<|im_start|>assistant\n' + (m['content'] or '').split('</think>')[-1].lstrip('\n') }}"
    r"{%- for call in m['tool_calls'] or [] %}"
    r"{{- '\n<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    r"{{- call['function']['arguments'] | tojson + '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    r"{%- elif m['role'] == 'tool' %}"
    r"{{- '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    r"{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    r"{%- endfor %}"
)
# Qwen3 (2507 thinking style): the generation prompt opens <think>; enable_thinking=false closes
# it at once, as chat_template_kwargs {"enable_thinking": false} does with the real template.
_FAMILIES["qwen3-tools"] = replace(
    _FAMILIES["qwen3"],
    chat_template=_CHATML_TOOLS_TEMPLATE
    + r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
)
_FAMILIES["qwen3-thinking"] = replace(
    _FAMILIES["qwen3"],
    chat_template=_CHATML_TOOLS_TEMPLATE
    + r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    + r"{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\n\n</think>\n\n' }}"
    + r"{%- else %}{{- '<think>\n' }}{%- endif %}{%- endif %}",
)


def build_qwen3_generation_defaults(out: Path) -> Path:
    """The tiny Qwen3 whose generation_config.json, like some real checkpoints', sets more than
    sampling: beam search and an n-gram ban, which must not reach a request's generation."""
    build_causal_lm(out, "qwen3")
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config |= {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "num_beams": 2, "no_repeat_ngram_size": 2}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return out


# Real Qwen3 tokenizers hold <think>, </think>, <tool_call> and </tool_call> as added tokens of one
# id each that decoding keeps (not special): vLLM's reasoning and hermes tool parsers look those ids up.
_QWEN3_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]


def build_qwen3_vllm(out: Path) -> Path:
    """qwen3-thinking (hermes-style tools, a generation prompt that opens <think>) with Qwen3's
    added tokens, so vLLM's deepseek_r1/qwen3 reasoning and hermes tool-call parsers accept it."""
    import torch
    from transformers import AutoModelForCausalLM

    family = _FAMILIES["qwen3-thinking"]
    tokenizer = _train_byte_bpe(family)
    tokenizer.add_tokens(_QWEN3_ADDED)
    config, generation_config = _text_config(family, tokenizer)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _v4_tokenizer_class(out)
    return out


def build_lora_adapter(out: Path) -> Path:
    """A peft LoRA adapter (rank 8 on the attention's q and v projections, random non-zero
    weights, so it changes the output) for the tiny qwen3-vllm model, which builds the same
    weights every time: serve it with vLLM's LORA_MODULES next to `tiny_model("qwen3-vllm")`.
    Needs peft (in the vLLM test environment, tests/requirements-vllm-tests.txt)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as base:
        build_qwen3_vllm(Path(base))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(SEED)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def _train_byte_bpe(family: _Family, vocab_size: int = 1000, **kwargs: Any):
    """A byte-level BPE tokenizer (as Llama 3, Qwen and GPT use) trained on CORPUS, no download.

    Byte-level means every string, emoji and CJK included, encodes without unknown tokens and
    decodes back exactly. `kwargs` go to the tokenizer, e.g. padding_side.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=family.specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if family.bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos}:1 $B:1", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=None,
        model_max_length=_LM_DIMS["max_position_embeddings"],
        **({"chat_template": family.chat_template} if family.chat_template else {}),
        **kwargs,
    )


def _text_config(family: _Family, tokenizer) -> tuple[Any, Any]:
    """The language model's config for `family` and its generation config, with the tokenizer's ids."""
    import transformers
    from transformers import GenerationConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in family.specials}
    bos_id = ids.get(family.bos) if family.bos else None
    token_ids = {"bos_token_id": bos_id, "eos_token_id": ids[family.eos], "pad_token_id": ids[family.pad]}
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), **family.dims, **token_ids, **family.config_kwargs
    )
    # The real generation configs stop on every end token (e.g. Llama 3 on <|eot_id|>, <|eom_id|>
    # and <|end_of_text|>), so generation ends the same way whichever one the model emits.
    eos_ids = [ids[family.eos], *(ids[name] for name in family.stop)]
    generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0], pad_token_id=ids[family.pad]
    )
    return config, generation_config


def _v4_tokenizer_class(out: Path) -> None:
    """transformers 5 records a tokenizer built from a `tokenizers` object as "TokenizersBackend", a
    name transformers 4 (which a vLLM release may pin) cannot load; both read "PreTrainedTokenizerFast"
    as this same tokenizer."""
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def build_causal_lm(out: Path, kind: str) -> Path:
    """A causal LM of family `kind` with random float32 weights, saved as a Hub-style checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    family = _FAMILIES[kind]
    tokenizer = _train_byte_bpe(family)
    config, generation_config = _text_config(family, tokenizer)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _v4_tokenizer_class(out)
    return out


# ---- Stable Diffusion -------------------------------------------------------------------------
#
# Real pipeline layouts (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
# tiny widths. The VAE keeps the real four blocks, so it downsamples by 8 (vae_scale_factor 8) and
# latents have the real shapes; the UNets are two blocks deep, enough for down/up and attention.
# sample_size is the real one (64, 96 and 128 latents), so a pipeline's default size is the real
# model's (512, 768 and 1024 px).

_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]

# The training betas every SD 1.x/2.x/XL checkpoint ships in scheduler/scheduler_config.json.
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}

_VAE: dict[str, Any] = {
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
_CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
# OpenCLIP ViT-H (SD 2.x) and ViT-bigG (SDXL's second encoder) use plain gelu.
_OPEN_CLIP_TEXT: dict[str, Any] = _CLIP_TEXT | {"hidden_act": "gelu"}
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
    _TextEncoder("CLIPTextModel", _CLIP_TEXT, pad="<|endoftext|>"),
    _TextEncoder(
        "CLIPTextModelWithProjection",
        _OPEN_CLIP_TEXT | {"hidden_size": 64, "intermediate_size": 128, "projection_dim": 64},
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

_DIFFUSION: dict[str, _Diffusion] = {
    # Stable Diffusion 1.5: PNDM, epsilon prediction. Its attention_head_dim (which diffusers reads as
    # a head count) is 8; 2 here, as 8 heads of width 4 made CPU attention on 64x64 latents 3x slower.
    "sd15": _Diffusion(
        pipeline="StableDiffusionPipeline",
        unet=_UNET | _SD_UNET_BLOCKS | {"cross_attention_dim": 32, "attention_head_dim": 2, "sample_size": 64},
        text_encoders=(_TextEncoder("CLIPTextModel", _CLIP_TEXT, pad="<|endoftext|>"),),
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
        text_encoders=(_TextEncoder("CLIPTextModel", _OPEN_CLIP_TEXT, pad="!"),),
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


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte alphabet, in its vocabulary order: printable bytes stand for
    themselves, the others are shifted to code points 256+ so no token holds whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _train_clip_bpe(max_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, learnt from CORPUS split the way CLIPTokenizer splits text.

    As in the real vocab.json: the 256 byte symbols, the same with the "</w>" end-of-word suffix,
    one token per merge, then the two specials. Having every byte, with and without suffix, means
    any text (emoji, CJK) encodes without unknown tokens. A few lines of BPE rather than the
    `tokenizers` trainer, whose order among equally frequent pairs changes from run to run when
    an end-of-word suffix is set.
    """
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # an empty vocabulary, but CLIP's normalizer and pre-tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(CORPUS)):
        words[(*word[:-1], word[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:  # every word is a single token
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # among equally frequent pairs, the first in order
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            symbols: list[str] = []
            for symbol in word:
                if symbols and (symbols[-1], symbol) == best:
                    symbols[-1] += symbol
                else:
                    symbols.append(symbol)
            merged[tuple(symbols)] += n
        words = merged
    alphabet = _bytes_to_unicode()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), *_CLIP_SPECIALS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _write_clip_vocab(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """transformers 5 saves tokenizer.json only; the real checkpoints also carry vocab.json and
    merges.txt, which transformers 4's slow CLIPTokenizer needs."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


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

    family = _DIFFUSION[kind]
    vocab, merges = _train_clip_bpe()
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
    vae = diffusers.AutoencoderKL(**_VAE | family.vae)
    scheduler = getattr(diffusers, family.scheduler)(**_SD_BETAS | family.scheduler_config)
    pipeline = getattr(diffusers, family.pipeline)(
        vae=vae, unet=_diffusion_unet(family), scheduler=scheduler, **components, **family.pipeline_kwargs
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    for folder in out.glob("tokenizer*"):
        _write_clip_vocab(folder, vocab, merges)
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

    unet = _diffusion_unet(_DIFFUSION[base])
    torch.manual_seed(SEED)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_CONTROLNET_COND_CHANNELS)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.reset_parameters()
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


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
    _v4_tokenizer_class(out)


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

    vocab, merges = _train_clip_bpe()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = transformers.CLIPConfig(
        text_config=_CLIP_TEXT | {"vocab_size": len(vocab), "pad_token_id": tokenizer.pad_token_id, **ids},
        vision_config=_CLIP_VISION,
        projection_dim=_CLIP_TEXT["projection_dim"],
    )
    torch.manual_seed(SEED)
    transformers.CLIPModel(config).save_pretrained(out)
    image_processor = _image_processor("CLIPImageProcessor", **_CLIP_IMAGE)
    _save_processor(transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), out)
    _write_clip_vocab(out, vocab, merges)
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
    family: _Family  # the language model: config class, tokenizer specials (with <image>), chat template
    shared: dict[str, Any] = field(default_factory=dict)  # settings both the model config and image processor hold


_LLAVA: dict[str, _Llava] = {
    # LLaVA 1.5 (llava-hf/llava-1.5-7b-hf): Vicuna's "USER: ... ASSISTANT:" turns, </s> after each reply
    # as in LLaVA's own conversation format. No bos in the template: the tokenizer adds it, as the
    # processor tokenizes the rendered prompt.
    "llava": _Llava(
        config="LlavaConfig",
        processor="LlavaProcessor",
        image_processor="CLIPImageProcessor",
        family=_Family(
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
        family=_Family(
            config="MistralConfig",
            specials=[*_MISTRAL_SPECIALS, "<image>", "<pad>"],
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

    llava = _LLAVA[kind]
    # Left padding, as llava-hf's tokenizers: every prompt of a padded batch ends where generation starts.
    tokenizer = _train_byte_bpe(llava.family, padding_side="left")
    text_config, generation_config = _text_config(llava.family, tokenizer)
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
_OPT = _Family(
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

    tokenizer = _train_byte_bpe(_OPT)
    text_config, generation_config = _text_config(_OPT, tokenizer)
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


def _train_sentencepiece(folder: Path, vocab_size: int = 200) -> Path:
    """A SentencePiece unigram model trained on CORPUS (no download), with SigLIP's special ids:
    <pad> 0, </s> 1, <unk> 2, as google/siglip-base-patch16-224's spiece.model has them."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


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
                vocab_file=str(_train_sentencepiece(Path(tmp))), model_max_length=_SIGLIP_TEXT_TOKENS
            )
        image_processor = _image_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
        vision |= {"image_size": 32}
        config_class, model_class, processor_class = "SiglipConfig", "SiglipModel", "SiglipProcessor"
    else:
        family = _Family(config="", specials=["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", pad="<pad>")
        tokenizer = _train_byte_bpe(family, vocab_size=400)
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

    unet = _diffusion_unet(_DIFFUSION[base])
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    layers = get_peft_model_state_dict(unet)
    getattr(diffusers, _DIFFUSION[base].pipeline).save_lora_weights(out, unet_lora_layers=layers)
    return out


# ---- modern VLMs: Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM (appended for 04_multimodal) ---------------
#
# Real architectures at toy sizes: the language models share _LM_DIMS and the byte-level BPE; the
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
_QWEN_VL_FAMILY = _Family(
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

    tokenizer = _train_byte_bpe(_QWEN_VL_FAMILY)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _QWEN_VL_FAMILY.specials}
    prefix = "Qwen2_5_VL" if version == "2.5" else "Qwen2VL"
    text = _LM_DIMS | {
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
            "out_hidden_size": _LM_DIMS["hidden_size"],
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        vision |= {"embed_dim": 32, "hidden_size": _LM_DIMS["hidden_size"], "mlp_ratio": 2}
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

    base = _FAMILIES["gemma3"]
    images = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    family = replace(base, specials=[*base.specials, *images.values()], chat_template=_GEMMA3_VLM_TEMPLATE)
    tokenizer = _train_byte_bpe(family, extra_special_tokens=images)
    text_config, generation_config = _text_config(family, tokenizer)
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
_IDEFICS3_FAMILY = _Family(
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
    tokenizer = _train_byte_bpe(_IDEFICS3_FAMILY)
    text_config, generation_config = _text_config(_IDEFICS3_FAMILY, tokenizer)
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
_ONEVISION_FAMILY = _Family(
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

    tokenizer = _train_byte_bpe(_ONEVISION_FAMILY, padding_side="left")
    text_config, generation_config = _text_config(_ONEVISION_FAMILY, tokenizer)
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


_REMOTE_CODE = """\"\"\"A BERT whose hidden states come out with their halves interleaved (einops).\"\"\"

import einops
from transformers import BertConfig, BertModel


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote-bert"


class TinyRemoteModel(BertModel):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.last_hidden_state = einops.rearrange(
            output.last_hidden_state, "b s (two half) -> b s (half two)", two=2
        )
        return output
"""


def build_remote_code_sentence_transformer(out: Path) -> Path:
    """The tiny BERT sentence-transformer with its model class in the folder's own code
    (`modeling_tiny_remote.py`, importing einops), loaded only with trust_remote_code=True, as
    nomic-embed and jina-embeddings are. Its embeddings are the plain tiny model's with the
    dimensions' halves interleaved, so a test can tell the remote code ran."""
    build_sentence_transformer(out)
    (out / "modeling_tiny_remote.py").write_text(_REMOTE_CODE)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="tiny-remote-bert",
        architectures=["TinyRemoteModel"],
        auto_map={
            "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
            "AutoModel": "modeling_tiny_remote.TinyRemoteModel",
        },
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# The SPLADE model's MLM head sees a token's own embedding at its position (no attention or feed-forward
# contribution, no position embeddings): at 256 dimensions its own logit is ~180-260, every other
# ~0 ± 16 (under 80 across the vocabulary). This bias keeps only the first, so each text's sparse
# vector is the bag of its tokens. (At 64 dimensions the margin was ~5: a vocabulary trained in
# another order now and then let a foreign term through.)
_SPLADE_BIAS = -120.0
# Far below any logit: special tokens ([CLS], [SEP]...) are in every text and would match every text.
_SPLADE_SPECIAL_BIAS = -1000.0


def build_splade(out: Path) -> Path:
    """A SPLADE sparse encoder (BERT masked-LM → SpladePooling, max), like naver/splade-v3, loaded
    with sentence-transformers' SparseEncoder. Random weights, except that the layers add nothing
    to a token's embedding and the MLM head's bias cuts what does not match it: each text's vector
    holds exactly its own (non-special) tokens, with weights log(1 + logit), so a sparse search is
    a true lexical match and tests can tell which documents share words with a query."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    hidden = 256  # enough dimensions that a random embedding's match with itself stands out from the rest
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(config)  # decoder tied to the word embeddings
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
        model.bert.embeddings.position_embeddings.weight.zero_()
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:  # residual-only layers: the LayerNorms pass the embedding on
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        transform = model.cls.predictions.transform
        transform.dense.weight.copy_(torch.eye(hidden))
        transform.dense.bias.zero_()
        model.cls.predictions.bias.fill_(_SPLADE_BIAS)
        model.cls.predictions.bias[tokenizer.all_special_ids] = _SPLADE_SPECIAL_BIAS
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=32, transformer_task="fill-mask")
        pooling = SpladePooling("max", embedding_dimension=len(tokenizer))
        SparseEncoder(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


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
        processor = spm.SentencePieceProcessor(model_file=str(_train_sentencepiece(Path(tmp))))
        vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    config = transformers.T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **_T5)
    torch.manual_seed(SEED)
    return transformers.T5EncoderModel(config), tokenizer


def _clip_encoder(cls: str, config: dict[str, Any], pad: str) -> tuple[Any, Any]:
    import torch
    import transformers

    vocab, merges = _train_clip_bpe()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), pad_token_id=tokenizer.pad_token_id, **ids, **config
    )
    torch.manual_seed(SEED)
    return getattr(transformers, cls)(text_config), tokenizer


def _save_flow_pipeline(pipeline: Any, out: Path) -> Path:
    pipeline.save_pretrained(out, safe_serialization=True)
    vocab, merges = _train_clip_bpe()
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name / "tokenizer_config.json").exists() and "CLIP" in type(getattr(pipeline, name)).__name__:
            _write_clip_vocab(out / name, vocab, merges)
    return out


def build_flux(out: Path, kind: str) -> Path:
    """FLUX.1 [schnell] ("schnell": timestep-distilled, no guidance embedding, a fixed shift) or
    [dev] ("dev": guidance-distilled, `guidance_embeds`, resolution-dependent shift), like
    black-forest-labs/FLUX.1-schnell and -dev: CLIP-L for the pooled prompt, T5 for its tokens."""
    import diffusers
    import torch

    clip, clip_tokenizer = _clip_encoder("CLIPTextModel", _CLIP_TEXT, pad="<|endoftext|>")
    t5, t5_tokenizer = _t5_encoder()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(**_VAE | _FLOW_VAE | {"scaling_factor": 0.3611, "shift_factor": 0.1159})
    torch.manual_seed(SEED)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _FLOW_VAE["latent_channels"],  # 2x2 latent patches packed into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5["d_model"],
        pooled_projection_dim=_CLIP_TEXT["hidden_size"],
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

    projected = _CLIP_TEXT | {"projection_dim": 32}
    clip_l, tokenizer_l = _clip_encoder("CLIPTextModelWithProjection", projected, pad="<|endoftext|>")
    clip_g, tokenizer_g = _clip_encoder("CLIPTextModelWithProjection", projected | {"hidden_act": "gelu"}, pad="!")
    t5, t5_tokenizer = _t5_encoder()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(**_VAE | _FLOW_VAE | {"scaling_factor": 1.5305, "shift_factor": 0.0609})
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
        pipeline_config = json.loads((BUILDERS[base](Path(folder)) / "transformer" / "config.json").read_text())
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


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sentence-transformer": build_sentence_transformer,
    "cross-encoder": build_cross_encoder,
    **{kind: partial(build_causal_lm, kind=kind) for kind in _FAMILIES},
    "qwen3-generation-defaults": build_qwen3_generation_defaults,
    "qwen3-vllm": build_qwen3_vllm,
    "qwen3-vllm-lora": build_lora_adapter,
    **{kind: partial(build_stable_diffusion, kind=kind) for kind in _DIFFUSION},
    "controlnet-sd15": partial(build_controlnet, base="sd15"),
    "controlnet-sdxl": partial(build_controlnet, base="sdxl"),
    "lora-sd15-a": partial(build_lora, base="sd15", seed=1),
    "lora-sd15-b": partial(build_lora, base="sd15", seed=2),
    "lora-sdxl": partial(build_lora, base="sdxl", seed=3),
    "sd15-single-file": build_single_file,
    "flux-schnell": partial(build_flux, kind="schnell"),
    "flux-dev": partial(build_flux, kind="dev"),
    "sd3.5-large": partial(build_sd3, kind="large"),
    "controlnet-flux-schnell": partial(build_flow_controlnet, base="flux-schnell"),
    "lora-flux-schnell": build_flux_lora,
    "controlnet-sd3.5-large": partial(build_flow_controlnet, base="sd3.5-large"),
    "sd3.5-medium": partial(build_sd3, kind="medium"),
    "clip": build_clip,
    **{kind: partial(build_llava, kind=kind) for kind in _LLAVA},
    "blip2": build_blip2,
    "siglip": partial(build_siglip, version=1),
    "siglip2": partial(build_siglip, version=2),
    "qwen2-vl": partial(build_qwen_vl, version="2"),
    "qwen2.5-vl": partial(build_qwen_vl, version="2.5"),
    "gemma3-vlm": build_gemma3_vlm,
    "idefics3": partial(build_idefics3, kind="idefics3"),
    "smolvlm": partial(build_idefics3, kind="smolvlm"),
    "llava-onevision": build_llava_onevision,
    "remote-code-sentence-transformer": build_remote_code_sentence_transformer,
    "splade": build_splade,
}


def build(kind: str, out: str | Path) -> Path:
    """Build the tiny model `kind` into the folder `out` and return the folder."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(BUILDERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return BUILDERS[kind](out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(BUILDERS), help="which architecture to build")
    parser.add_argument("out", help="folder to write the model to (use it as MODEL_NAME)")
    args = parser.parse_args(argv)
    path = build(args.kind, args.out)
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
