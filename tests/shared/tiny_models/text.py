"""Causal language models (Llama, Mistral, Mixtral, Qwen3, Phi-3, Gemma 3) with their tokenizers, chat
templates and generation configs, plus the Qwen3 variants 01_text_generation's engines need. The
vision-language models of multimodal.py reuse `Family`, the byte-level BPE and the text configs."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.shared.tiny_models.corpus import CORPUS, SEED

# ---- causal LMs -------------------------------------------------------------------------------
#
# Every family shares one byte-level BPE vocabulary (only the special tokens differ; the real
# Mistral, Phi-3 and Gemma use SentencePiece, but byte-level BPE round-trips any text exactly) and
# one set of dimensions; a `Family` holds what really differs: config class, special tokens and
# chat template. head_dim is 32 because vLLM's CPU attention kernels need head sizes of 32 or more.

LM_DIMS: dict[str, Any] = {
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
class Family:
    config: str  # name of the transformers config class
    specials: list[str]  # special tokens, in id order from 0
    eos: str  # end of turn: the tokenizer's eos_token, so a chat reply stops on it
    pad: str
    chat_template: str | None = None  # None for base (non-chat) models
    bos: str | None = None  # added in front of every encoding when set (Qwen and Phi-3 add none)
    stop: tuple[str, ...] = ()  # more tokens that end generation, as in the real generation_config
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, Any] = field(default_factory=LM_DIMS.copy)  # OPT names its dimensions differently


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
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]

FAMILIES: dict[str, Family] = {
    # Llama 3 Instruct: header tokens around each role, <|eot_id|> ends a turn.
    "llama": Family(
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
    "mistral": Family(
        config="MistralConfig",
        specials=MISTRAL_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        chat_template=_MISTRAL_TEMPLATE,
        config_kwargs={"sliding_window": None},  # as Mistral 7B v0.2 and later
    ),
    # Mixtral: Mistral's tokenizer with sparse mixture-of-experts MLPs (4 experts, 2 per token).
    "mixtral": Family(
        config="MixtralConfig",
        specials=MISTRAL_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        chat_template=_MISTRAL_TEMPLATE,
        config_kwargs={"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # Qwen3: ChatML, no bos token; q/k norms in attention.
    "qwen3": Family(
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
    "phi3": Family(
        config="Phi3Config",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        eos="<|end|>",
        pad="<|endoftext|>",
        stop=("<|endoftext|>",),
        chat_template=(
            r"{%- for m in messages %}{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            r"{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
        ),
        config_kwargs={"original_max_position_embeddings": LM_DIMS["max_position_embeddings"]},
    ),
    # Gemma 3 text-only (Gemma3ForCausalLM, like gemma-3-1b-it): the assistant role is "model";
    # one sliding-window layer then one global layer, as the real 5:1 pattern shortened.
    "gemma3": Family(
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
FAMILIES["qwen3-tools"] = replace(
    FAMILIES["qwen3"],
    chat_template=_CHATML_TOOLS_TEMPLATE
    + r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
)
FAMILIES["qwen3-thinking"] = replace(
    FAMILIES["qwen3"],
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

    family = FAMILIES["qwen3-thinking"]
    tokenizer = train_byte_bpe(family)
    tokenizer.add_tokens(_QWEN3_ADDED)
    config, generation_config = text_config_for(family, tokenizer)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    v4_tokenizer_class(out)
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


def train_byte_bpe(family: Family, vocab_size: int = 1000, **kwargs: Any):
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
        model_max_length=LM_DIMS["max_position_embeddings"],
        **({"chat_template": family.chat_template} if family.chat_template else {}),
        **kwargs,
    )


def text_config_for(family: Family, tokenizer) -> tuple[Any, Any]:
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


def v4_tokenizer_class(out: Path) -> None:
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

    family = FAMILIES[kind]
    tokenizer = train_byte_bpe(family)
    config, generation_config = text_config_for(family, tokenizer)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    v4_tokenizer_class(out)
    return out
