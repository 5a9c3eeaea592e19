"""Streaming text generation with transformers, and the shapes streamed text is sent in.

`StreamingGenerator` runs `model.generate` on a thread and streams `Delta`s: text that is safe to
show (never half a UTF-8 character, never the start of a stop string that may still complete),
then a last delta with the finish reason and token usage. Sampling uses each request's own
`torch.Generator`, so a seed reproduces its output even with concurrent jobs. The second half
turns deltas into the native chunks and OpenAI's chat and text completion objects (SSE too).

This file is copied, identical, into every example that generates text (each folder is its own
Docker context); `tests/test_textstream.py` checks that the copies match and exercises each one.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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


class SeededSampler:
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


class TokenStream:
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


# ---------------------------------------------------------------------------------------------
# Sampling: the request's values, the model's recommendations, the context length.
# ---------------------------------------------------------------------------------------------
class ContextLengthError(ValueError):
    """Prompt and completion cannot fit the context; the message says by how much."""


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def recommended_sampling(generation_config: Any) -> dict[str, Any]:
    """The sampling values a model's generation_config.json sets (Llama 3: temperature 0.6, top_p 0.9).

    Only values its authors wrote down count, and only when they ask for sampling, as vLLM does.
    """
    written = generation_config.to_diff_dict()
    if not written.get("do_sample"):
        return {}
    return {name: written[name] for name in SAMPLING_FIELDS if name in written}


def resolve_sampling(
    sampling: Any,
    prompt_tokens: int,
    defaults: dict[str, Any],
    context_len: int,
    default_max_tokens: int,
    context_setting: str = "",
) -> SamplingParams:
    """Request values (`sampling` has the fields of SamplingParams, None where unset), else the model's
    recommended ones, else the usual ones; checked against the context. `context_setting` names
    the setting that sets the context length, for the error messages (e.g. " (MAX_MODEL_LEN)")."""
    room = context_len - prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens, which leaves no room in the {context_len}-token context"
            f"{context_setting}: shorten it"
        )
    max_tokens = sampling.max_tokens
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        raise ContextLengthError(
            f"max_tokens: the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}; together they must"
            f" fit the {context_len}-token context{context_setting}, so max_tokens can be at most {room}"
        )

    def pick(name: str, usual: Any) -> Any:
        value = getattr(sampling, name)
        return value if value is not None else defaults.get(name, usual)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=max(pick("top_k", 0), 0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        stop=tuple(sampling.stop or ()),
        seed=sampling.seed,
    )


class GenerationTimeout(TimeoutError):
    """A generation ran past its time limit; it was stopped."""


class StreamingGenerator:
    """`model.generate` on a pool of threads (one per running generation), streamed as Deltas."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_concurrency: int,
        time_limit_s: float | None = None,
    ) -> None:
        self.model = model
        self.time_limit_s = time_limit_s  # per generation; None: no limit
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self.device = next(model.parameters()).device
        self.active = 0  # generations running now
        self._active_lock = threading.Lock()

    def _generate_kwargs(self, params: SamplingParams, stream: TokenStream) -> dict[str, Any]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        base = self.model.generation_config
        # A clean config per request: the model's special tokens, none of its sampling defaults
        # (the caller already resolved those into `params`).
        config = GenerationConfig(
            bos_token_id=base.bos_token_id,
            eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=base.pad_token_id or self.tokenizer.pad_token_id,
            max_new_tokens=params.max_tokens,
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
        )
        processors = LogitsProcessorList()
        if params.temperature >= 1e-5:  # below that, greedy, as vLLM does: scores / temperature overflow
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            processors.append(SeededSampler(params, seed, self.device))
        return {
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

    async def generate(self, model_inputs: dict[str, Any], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream one generation. `model_inputs` is what the model's forward takes for one prompt
        (input_ids and attention_mask, plus pixel_values for vision models)."""
        prompt_ids = model_inputs["input_ids"][0].tolist()
        stream = TokenStream(asyncio.get_running_loop())
        kwargs = {**model_inputs, **self._generate_kwargs(params, stream)}
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids[-DECODE_CONTEXT_TOKENS:])
        stops = StopStringFilter(params.stop)
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.pool, self._run, kwargs)
        deadline = loop.time() + self.time_limit_s if self.time_limit_s else None
        generated: list[int] = []

        async def next_token() -> int | None:
            if deadline is None:
                return await stream.queue.get()
            try:
                return await asyncio.wait_for(stream.queue.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise GenerationTimeout(f"generation stopped at its {self.time_limit_s:g}-second limit") from None

        try:
            while (token_id := await next_token()) is not None:
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


# ---------------------------------------------------------------------------------------------
# Response shapes: pure functions from deltas to plain JSON (or SSE strings).
# ---------------------------------------------------------------------------------------------
def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def native_chunk(delta: Delta) -> dict[str, Any]:
    """A streamed chunk: {"text": "..."} (never empty), then {"finish_reason": ..., "usage": ...}."""
    if delta.finish_reason is None:
        return {"text": delta.text}
    return {"finish_reason": delta.finish_reason, "usage": usage_json(delta.usage)}


def sse(payload: dict[str, Any] | str) -> str:
    """One whole server-sent event, as OpenAI's streaming API sends it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass(frozen=True)
class OpenAIShape:
    """Builds OpenAI's objects for one response: chat.completion(.chunk) or text_completion."""

    chat: bool  # chat.completion(.chunk) objects, else text_completion
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, chat: bool, model: str) -> OpenAIShape:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, **extra: Any) -> dict:
        """One streamed chunk. Chat: `delta` carries the role first, then content; text: `text`."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage_json(usage))

    def complete(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage=usage_json(usage))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage=usage_json(usage))


async def openai_events(shape: OpenAIShape, deltas: AsyncIterator[Delta], include_usage: bool) -> AsyncIterator[str]:
    """vLLM's stream shape: a role delta (chat), content deltas, a finish_reason chunk, optional usage, [DONE]."""
    extra = {"usage": None} if include_usage else {}  # OpenAI: null usage on every chunk but the last
    if shape.chat:
        yield sse(shape.chunk(None, role=True, **extra))
    async for delta in deltas:
        if delta.finish_reason is None:
            yield sse(shape.chunk(delta.text, **extra))
            continue
        yield sse(shape.chunk(None, finish_reason=delta.finish_reason, **extra))
        if include_usage:
            yield sse(shape.usage_chunk(delta.usage))
    yield SSE_DONE


async def collect(deltas: AsyncIterator[Delta]) -> tuple[str, Delta]:
    parts, last = [], Delta()
    async for delta in deltas:
        if delta.finish_reason is None:
            parts.append(delta.text)
        else:
            last = delta
    return "".join(parts), last


async def native_responses(deltas: AsyncIterator[Delta], stream: bool) -> AsyncIterator[dict[str, Any]]:
    """Streamed: a chunk per delta. Not streamed: one chunk with the whole text, finish reason and usage."""
    if stream:
        async for delta in deltas:
            yield native_chunk(delta)
    else:
        text, last = await collect(deltas)
        yield {"text": text, **native_chunk(last)}


async def openai_responses(
    shape: OpenAIShape, deltas: AsyncIterator[Delta], stream: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    """Streamed: SSE events. Not streamed: one ChatCompletion or Completion object."""
    if stream:
        async for event in openai_events(shape, deltas, include_usage):
            yield event
    else:
        text, last = await collect(deltas)
        yield shape.complete(text, last.finish_reason, last.usage)
