"""Generation engines behind one small interface, so the handler never depends on a library.

An engine takes a prompt (text the chat template already produced, or a raw completion prompt)
and sampling parameters, and streams `Delta`s: text that is safe to show (never half a UTF-8
character, never the start of a stop string that may still complete), then a last delta with the
finish reason and token usage. `TransformersEngine` runs Hugging Face transformers.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Tokens of the prompt's end kept as decoding context: some tokenizers (SentencePiece) drop a
# token's leading space when it is decoded alone, so each delta is decoded after a little context.
DECODE_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """New text, or (last of a generation) the finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or stop string) or "length"
    usage: Usage | None = None


class Engine(Protocol):
    """What the handler needs from an engine."""

    max_model_len: int
    has_chat_template: bool
    sampling_defaults: dict[str, Any]  # the model's recommended temperature, top_p, ... if it has any

    def render_chat(self, messages: list[dict[str, str]], continue_final_message: bool) -> str: ...

    def count_prompt_tokens(self, prompt: str, is_chat: bool) -> int: ...

    def generate(self, prompt: str, is_chat: bool, params: SamplingParams) -> AsyncIterator[Delta]: ...


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character (vLLM's approach).

    Each new token is decoded together with a few tokens before it; text is released only when
    it no longer ends in U+FFFD, the replacement character a decoder gives for a partial byte
    sequence, so an emoji spread over four byte-tokens comes out whole.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (a genuinely invalid byte sequence, if anything)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        rest = self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest


class StopStringFilter:
    """Applies `stop` strings to streamed text: cuts at the first match, holds back possible starts.

    Text that could be the beginning of a stop string ("Obs" while waiting for "Observation:") is
    held until it either completes the stop string (and is dropped) or cannot any more.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self.pending = self.pending[:cut], ""
            return released
        hold = max((self._partial_match(stop) for stop in self.stops), default=0)
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(released) :]
        return released

    def _partial_match(self, stop: str) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of `stop`."""
        for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------
class _SeededSampler:
    """Sampling with the request's own `torch.Generator` (a transformers logits processor).

    `generate` samples from torch's global RNG, which concurrent jobs would share (and race on),
    so a seed could never reproduce an output. Instead generation runs greedy, and this last
    processor applies transformers' own temperature / top-k / top-p warpers, draws the token with
    the request's generator, and leaves only that token for greedy selection to pick.
    """

    def __init__(self, params: SamplingParams, seed: int, device: torch.device) -> None:
        from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter_(1, chosen, 0.0)


class _TokenStream:
    """A transformers streamer that hands each new token id to the event loop, and a stop switch.

    `generate` calls `put` from its thread; the ids land on an asyncio queue. `stop` is checked
    after every token (it is also a StoppingCriteria), so a cancelled job ends its generation.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.stop = threading.Event()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first streams the prompt itself
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token_id)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class TransformersEngine:
    """`AutoModelForCausalLM` with the model's chat template; one thread per running generation."""

    model: Any
    tokenizer: Any
    max_model_len: int
    max_concurrency: int
    eos_token_ids: set[int] = field(default_factory=set)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    active: int = 0  # generations running now

    def __post_init__(self) -> None:
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="generate")
        self.device = next(self.model.parameters()).device
        self.base_config = self.model.generation_config
        self._active_lock = threading.Lock()

    def render_chat(self, messages: list[dict[str, str]], continue_final_message: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )

    def _prompt_ids(self, prompt: str, is_chat: bool) -> list[int]:
        # A rendered chat template already holds the BOS token; a raw prompt needs the tokenizer's.
        return self.tokenizer(prompt, add_special_tokens=not is_chat)["input_ids"]

    def count_prompt_tokens(self, prompt: str, is_chat: bool) -> int:
        return len(self._prompt_ids(prompt, is_chat))

    def _generate_kwargs(self, prompt_ids: list[int], params: SamplingParams, stream: _TokenStream) -> dict[str, Any]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        # A clean config per request: the model's special tokens, none of its sampling defaults
        # (the handler already resolved those into `params`).
        config = GenerationConfig(
            bos_token_id=self.base_config.bos_token_id,
            eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=self.base_config.pad_token_id or self.tokenizer.pad_token_id,
            max_new_tokens=params.max_tokens,
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
        )
        processors = LogitsProcessorList()
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            processors.append(_SeededSampler(params, seed, self.device))
        input_ids = torch.tensor([prompt_ids], device=self.device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "generation_config": config,
            "logits_processor": processors,
            "stopping_criteria": StoppingCriteriaList([stream]),
            "streamer": stream,
        }

    def _run(self, kwargs: dict[str, Any]) -> None:
        with self._active_lock:
            self.active += 1
        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        finally:
            with self._active_lock:
                self.active -= 1
            kwargs["streamer"].end()

    async def generate(self, prompt: str, is_chat: bool, params: SamplingParams) -> AsyncIterator[Delta]:
        prompt_ids = self._prompt_ids(prompt, is_chat)
        stream = _TokenStream(asyncio.get_running_loop())
        kwargs = self._generate_kwargs(prompt_ids, params, stream)
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids[-DECODE_CONTEXT_TOKENS:])
        stops = StopStringFilter(params.stop)
        running = asyncio.get_running_loop().run_in_executor(self.pool, self._run, kwargs)
        generated: list[int] = []
        try:
            while (token_id := await stream.queue.get()) is not None:
                generated.append(token_id)
                if text := stops.push(decoder.push(token_id)):
                    yield Delta(text=text)
                if stops.stopped:
                    stream.stop.set()  # the thread ends at its next token; the rest is discarded
                    break
            await running  # re-raises what generate raised (out of memory, ...)
            if text := stops.push(decoder.flush()) + stops.flush():
                yield Delta(text=text)
            hit_eos = bool(generated) and generated[-1] in self.eos_token_ids
            finish_reason = "stop" if stops.stopped or hit_eos else "length"
            yield Delta(finish_reason=finish_reason, usage=Usage(len(prompt_ids), len(generated)))
        finally:
            # Reached on completion, on error, and when the job is cancelled or its consumer goes
            # away: the generation thread stops at its next token instead of running on unseen.
            stream.stop.set()


def torch_dtype(name: str, cuda: bool) -> torch.dtype:
    """DTYPE=auto: bf16 on GPUs that have it (Ampere and newer), else fp16; fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
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


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def recommended_sampling(generation_config: Any) -> dict[str, Any]:
    """The sampling values a model's generation_config.json sets (Llama 3: temperature 0.6, top_p 0.9).

    Only values its authors wrote down count, and only when they ask for sampling, as vLLM does.
    """
    written = generation_config.to_diff_dict()
    if not written.get("do_sample"):
        return {}
    return {name: written[name] for name in SAMPLING_FIELDS if name in written}


def load_transformers_engine(
    model_name: str,
    *,
    revision: str | None,
    tokenizer_name: str | None,
    dtype: str,
    quantization: str | None,
    max_model_len: int | None,
    max_concurrency: int,
    trust_remote_code: bool,
    cache_dir: str | None,
    tokenizer_cache_dir: str | None,
) -> TransformersEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    compute_dtype = torch_dtype(dtype, cuda)
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_name or model_name,
        revision=None if tokenizer_name else revision,  # MODEL_REVISION names a commit of the model's repo
        trust_remote_code=trust_remote_code,
        cache_dir=tokenizer_cache_dir,
    )
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
    return TransformersEngine(
        sampling_defaults=recommended_sampling(model.generation_config),
        model=model,
        tokenizer=tokenizer,
        max_model_len=max_model_len or context,
        max_concurrency=max_concurrency,
        eos_token_ids=eos_ids,
    )
