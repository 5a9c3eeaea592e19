"""The transformers engine: the model, its tokenizer and chat template, and streamed generation.

`TransformersEngine` takes a prompt (text the chat template already produced, or a raw
completion prompt) and sampling parameters, and streams `Delta`s (see textstream.py): text that
is safe to show, then a last delta with the finish reason and token usage. It runs Hugging Face
transformers anywhere. (ENGINE=vllm needs no engine here: vLLM's own OpenAI server answers those
jobs, see vllm_server.py.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from textstream import Delta, SamplingParams, StreamingGenerator, recommended_sampling, special_tokens_only


class HuggingFacePrompts:
    """Prompt handling both engines share: the model's own chat template and tokenizer, so the
    same request is the same token sequence whichever engine runs it."""

    tokenizer: Any

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The chat template applied as vLLM applies it: `tools` and `documents` are the template's
        own variables, `template_kwargs` (a request's chat_template_kwargs, e.g. enable_thinking)
        become more of them."""
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            documents=documents,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )

    def tokenize(self, prompt: str, is_chat: bool) -> list[int]:
        # A rendered chat template already holds the BOS token; a raw prompt needs the tokenizer's.
        return self.tokenizer(prompt, add_special_tokens=not is_chat)["input_ids"]

    def count_prompt_tokens(self, prompt: str, is_chat: bool) -> int:
        return len(self.tokenize(prompt, is_chat))


@dataclass
class TransformersEngine(HuggingFacePrompts):
    """`AutoModelForCausalLM` with the model's chat template, streamed by `StreamingGenerator`."""

    model: Any
    tokenizer: Any
    max_model_len: int
    max_concurrency: int
    eos_token_ids: set[int] = field(default_factory=set)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float | None = None  # per generation

    def __post_init__(self) -> None:
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.generator = StreamingGenerator(
            self.model, self.tokenizer, self.eos_token_ids, self.max_concurrency, self.time_limit_s
        )

    @property
    def active(self) -> int:
        """Generations running now."""
        return self.generator.active

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits: token ids a request may name (logit_bias, stop_token_ids)."""
        return self.generator.vocab_size

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream the completion of an already tokenized prompt (the handler tokenizes it once)."""
        input_ids = torch.tensor([prompt_ids], device=self.generator.device)
        return self.generator.generate({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, params)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str, cuda: bool) -> torch.dtype:
    """DTYPE=auto: bf16 on GPUs that have it (Ampere and newer), else fp16; fp32 on CPU."""
    if name not in ("auto", *DTYPES):
        raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


BNB_QUANTIZATION = ("bnb-8bit", "bnb-4bit")
VLLM_ONLY_QUANTIZATION = ("awq", "gptq", "fp8")


def quantization_config(name: str | None, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for QUANTIZATION, or a clear refusal of methods this engine lacks."""
    if not name:
        return None
    from transformers import BitsAndBytesConfig

    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if name in VLLM_ONLY_QUANTIZATION:
        raise ValueError(
            f"QUANTIZATION={name} needs the vLLM engine (pre-quantized {name} checkpoints); "
            f"the transformers engine supports {' and '.join(BNB_QUANTIZATION)}"
        )
    choices = ", ".join(BNB_QUANTIZATION + VLLM_ONLY_QUANTIZATION)
    raise ValueError(f"QUANTIZATION must be one of {choices}, got {name!r}")


def load_tokenizer(
    model_name: str, tokenizer_name: str | None, revision: str | None, trust_remote_code: bool, cache_dir: str | None
) -> Any:
    """The model's tokenizer, or TOKENIZER_NAME's; both engines tokenize and template with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        tokenizer_name or model_name,
        revision=None if tokenizer_name else revision,  # MODEL_REVISION names a commit of the model's repo
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
    )


def read_chat_template(value: str) -> str:
    """CUSTOM_CHAT_TEMPLATE as vLLM's --chat-template takes it: a file's path, or the Jinja itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as file:
            return file.read()
    if "{" not in value:  # neither a file nor a template: most likely a path that does not exist
        raise ValueError(f"CUSTOM_CHAT_TEMPLATE={value!r} is neither a file nor a Jinja chat template")
    return value


def load_transformers_engine(
    model_name: str,
    *,
    revision: str | None,
    tokenizer_name: str | None,
    dtype: str,
    quantization: str | None,
    max_model_len: int | None,
    max_concurrency: int,
    time_limit_s: float | None,
    trust_remote_code: bool,
    cache_dir: str | None,
    tokenizer_cache_dir: str | None,
    chat_template: str | None = None,
) -> TransformersEngine:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    compute_dtype = torch_dtype(dtype, cuda)
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    tokenizer = load_tokenizer(model_name, tokenizer_name, revision, trust_remote_code, tokenizer_cache_dir)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    model = AutoModelForCausalLM.from_pretrained(
        model_name,
        dtype=compute_dtype,
        # accelerate spreads a model too big for one GPU over all of them (then over CPU memory).
        device_map="auto" if cuda else None,
        quantization_config=quantization_config(quantization, compute_dtype),
        **common,
    )
    model.eval()
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or tokenizer.model_max_length
    if max_model_len and max_model_len > context:
        raise ValueError(f"MAX_MODEL_LEN={max_model_len} exceeds the model's context of {context} tokens")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    sampling_defaults = recommended_sampling(model.generation_config)
    # From here on a request's own fields are all that reach generate (see special_tokens_only).
    model.generation_config = special_tokens_only(model.generation_config)
    return TransformersEngine(
        sampling_defaults=sampling_defaults,
        model=model,
        tokenizer=tokenizer,
        max_model_len=max_model_len or context,
        max_concurrency=max_concurrency,
        time_limit_s=time_limit_s,
        eos_token_ids=eos_ids,
    )
