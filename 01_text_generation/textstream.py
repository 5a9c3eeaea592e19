"""Streaming text generation with transformers: `StreamingGenerator` runs `model.generate` on a
thread and streams `Delta`s.

Each delta is text that is safe to show (never half a UTF-8 character, never the start of a stop
string that may still complete), then a last delta per choice with its finish reason (the very
last one carries the token usage). Sampling uses each request's own `torch.Generator`, so a seed
reproduces its output even with concurrent jobs. Every logits processor is built here, per
request, from `SamplingParams`: the model's generation_config.json never adds one of its own;
structured output's comes from structured_output.py. The deltas become responses in
response_shapes.py.

This file is copied, identical, into every example that generates text (each folder is its own
Docker context); tests/copied_modules/test_copies.py checks that the copies match and
tests/copied_modules/test_textstream.py exercises each one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from structured_output import grammar_constraint

# Tokens of the prompt's end kept as decoding context: some tokenizers (SentencePiece) drop a
# token's leading space when it is decoded alone, so each delta is decoded after a little context.
DECODE_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation, every field resolved (vLLM's names and meanings)."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability
    repetition_penalty: float = 1.0  # divides the logits of tokens in the prompt and the output
    presence_penalty: float = 0.0  # subtracted once from each token the output already has
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()  # more tokens that end generation, besides the model's own
    include_stop_str_in_output: bool = False  # keep the matched stop string (or stop token) in the text
    ignore_eos: bool = False  # the model's end tokens do not end generation
    min_tokens: int = 0  # end tokens are masked until this many tokens exist (see MinTokens)
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # added to those tokens' logits
    seed: int | None = None
    n: int = 1  # independent choices for one prompt, generated as one batch
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    skip_special_tokens: bool = True
    grammar: str | None = None  # an llguidance grammar the output must match (see json_schema_grammar)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before any penalty or grammar, as
    vLLM reports them), and the `top` most likely alternatives as (token, logprob) pairs."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text of one choice, or (last of that choice) its finish reason; the very last delta of
    a generation also carries the usage. `reasoning` and `tool_calls` are filled by a parser that
    sits between the generator and the response (the generator itself only produces text)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or stop string), "length", "tool_calls"
    usage: Usage | None = None
    index: int = 0  # the choice, when a request asks for n > 1
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # complete OpenAI tool_calls entries
    # With finish_reason "length": the worker's setting that ended the choice before max_tokens did.
    limit: str | None = None


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character (vLLM's approach).

    Each new token is decoded together with a few tokens before it; text is released only when
    it no longer ends in U+FFFD, the replacement character a decoder gives for a partial byte
    sequence, so an emoji spread over four byte-tokens comes out whole.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

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
    held until it either completes the stop string (and is dropped, or kept with `include_stop`)
    or cannot any more.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = [stop for stop in stops if stop]
        self.include_stop = include_stop
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        matches = [(i, stop) for stop in self.stops if (i := self.pending.find(stop)) >= 0]
        if matches:
            cut, stop = min(matches)
            self.stopped = True
            released, self.pending = self.pending[: cut + (len(stop) if self.include_stop else 0)], ""
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
# Logits processors: each request's own, in vLLM's order (penalties, bias, masks, then sampling).
# ---------------------------------------------------------------------------------------------
class SeededSampler:
    """Sampling with the request's own `torch.Generator` (a transformers logits processor).

    `generate` samples from torch's global RNG, which concurrent jobs would share (and race on),
    so a seed could never reproduce an output. Instead generation runs greedy, and this last
    processor applies transformers' own temperature / top-k / top-p / min-p warpers, draws the
    token with the request's generator (one draw per choice), and leaves only that token for
    greedy selection to pick.
    """

    def __init__(self, params: SamplingParams, seed: int, device: torch.device) -> None:
        from transformers.generation import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers: list[Any] = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0.0:
            self.warpers.append(MinPLogitsWarper(params.min_p))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter_(1, chosen, 0.0)


class MinTokens:
    """min_tokens, by vLLM's rule: the end tokens are masked until `min_tokens` tokens exist, unless
    masking them would leave a row no token at all. Only a grammar can leave just the end tokens
    (JSON whose object is closed, a choice made): its answer then ends, shorter than min_tokens, as
    in vLLM, instead of drawing from nothing. So it comes after the grammar's mask."""

    def __init__(self, prompt_len: int, min_tokens: int, stop_ids: set[int], device: torch.device) -> None:
        self.prompt_len, self.min_tokens = prompt_len, min_tokens
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_len >= self.min_tokens:
            return scores
        ends = scores[:, self.stop_ids].clone()
        scores[:, self.stop_ids] = float("-inf")
        only_ends = torch.isneginf(scores).all(dim=-1)
        if only_ends.any():
            scores[only_ends.nonzero(), self.stop_ids] = ends[only_ends]
        return scores


class OutputPenalties:
    """OpenAI's presence and frequency penalties, counted over the generated tokens only (as vLLM)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        output = input_ids[:, self.prompt_len :]
        if output.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBias:
    """OpenAI's logit_bias: a fixed amount added to chosen tokens' logits at every step."""

    def __init__(self, bias: Mapping[int, float], device: torch.device) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class TokenStream:
    """A transformers streamer that hands each step's token ids to the event loop, and stop switches.

    `generate` calls `put` from its thread with one token per choice; the step lands on an
    asyncio queue as a list of (token id, TokenLogprob or None). `stop` ends every choice and
    `stop_rows` single ones; both are checked after every token (this is also a StoppingCriteria),
    so a cancelled job ends its generation. With logprobs, `RawLogprobs` (the first logits
    processor) leaves each step's raw log-probabilities here for `put` to pick the chosen token's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Any = None, top_logprobs: int | None = None) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[tuple[int, TokenLogprob | None]] | None] = asyncio.Queue()
        self.stop = threading.Event()
        self.stop_rows: set[int] = set()
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs
        self.last_logprobs: torch.Tensor | None = None
        self._prompt_seen = False

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob(self, row: int, token_id: int) -> TokenLogprob:
        logprobs = self.last_logprobs[row]
        top = ()
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, self.top_logprobs)
            top = tuple((self._token(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(self._token(token_id), float(logprobs[token_id]), top)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first streams the prompt itself
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        record = self.top_logprobs is not None and self.last_logprobs is not None
        step = [(token_id, self._logprob(row, token_id) if record else None) for row, token_id in enumerate(ids)]
        self.loop.call_soon_threadsafe(self.queue.put_nowait, step)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)
        for row in list(self.stop_rows):
            done[row] = True
        return done


class RawLogprobs:
    """First logits processor: keeps the model's own log-probabilities of this step for TokenStream."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stream.last_logprobs = torch.log_softmax(scores.float(), dim=-1).cpu()
        return scores


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


def special_tokens_only(generation_config: Any) -> Any:
    """A copy of a model's generation config with its special tokens and nothing else.

    `generate` fills every field a request leaves unset from `model.generation_config`, so a
    checkpoint's `num_beams: 2` or `no_repeat_ngram_size: 3` would change (or break) every
    request. Read `recommended_sampling` first, then give the model this config.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=generation_config.bos_token_id,
        eos_token_id=generation_config.eos_token_id,
        pad_token_id=generation_config.pad_token_id,
    )


def resolve_sampling(
    sampling: Any,
    prompt_tokens: int,
    defaults: dict[str, Any],
    context_len: int,
    default_max_tokens: int,
    context_setting: str = "",
    **extra: Any,
) -> SamplingParams:
    """Request values (`sampling` has fields of SamplingParams, None where unset; the ones it lacks
    take their usual values), else the model's recommended ones, else the usual ones; checked
    against the context. `context_setting` names the setting that sets the context length, for
    the error messages (e.g. " (MAX_MODEL_LEN)"). `extra` are resolved fields (grammar, logprobs)."""
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
        value = getattr(sampling, name, None)
        return value if value is not None else defaults.get(name, usual)

    def given(name: str, usual: Any) -> Any:  # fields no model recommends
        value = getattr(sampling, name, None)
        return value if value is not None else usual

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=max(pick("top_k", 0), 0),
        min_p=given("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=given("presence_penalty", 0.0),
        frequency_penalty=given("frequency_penalty", 0.0),
        stop=tuple(given("stop", ())),
        stop_token_ids=tuple(given("stop_token_ids", ())),
        include_stop_str_in_output=given("include_stop_str_in_output", False),
        ignore_eos=given("ignore_eos", False),
        min_tokens=given("min_tokens", 0),
        logit_bias={int(token): bias for token, bias in given("logit_bias", {}).items()},
        seed=given("seed", None),
        n=given("n", 1),
        skip_special_tokens=given("skip_special_tokens", True),
        **extra,
    )


class GenerationTimeout(TimeoutError):
    """A generation reached its time limit before it produced any token; it was stopped."""


# The setting behind `time_limit_s` in every example: a generation it ends after some tokens keeps
# them, as `max_tokens` would, with finish_reason "length" and this name in the Delta's `limit`.
TIME_LIMIT_SETTING = "MAX_GENERATION_SECONDS"


@dataclass
class _Choice:
    """The decoding state of one choice."""

    decoder: IncrementalDecoder
    stops: StopStringFilter
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a text delta


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
        self.vocab_size = model.config.get_text_config().vocab_size
        self.active = 0  # generations running now
        self._active_lock = threading.Lock()

    def stop_token_ids(self, params: SamplingParams) -> set[int]:
        """The tokens that end a choice: the model's end tokens (unless ignore_eos) and stop_token_ids."""
        return (set() if params.ignore_eos else set(self.eos_token_ids)) | set(params.stop_token_ids)

    def _processors(self, params: SamplingParams, stream: TokenStream, prompt_len: int) -> Any:
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        processors = LogitsProcessorList()
        if params.logprobs is not None:
            processors.append(RawLogprobs(stream))  # first: the model's own distribution, as vLLM reports it
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(OutputPenalties(params.presence_penalty, params.frequency_penalty, prompt_len))
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias, self.device))
        if params.grammar is not None:
            eos = sorted(self.eos_token_ids | set(params.stop_token_ids))
            processors.append(
                grammar_constraint(self.tokenizer, self.vocab_size, eos, params.grammar, params.n, prompt_len)
            )
        stop_ids = self.stop_token_ids(params)
        if params.min_tokens and stop_ids:  # after the grammar, which may allow only the end (MinTokens)
            processors.append(MinTokens(prompt_len, params.min_tokens, stop_ids, self.device))
        if params.temperature >= 1e-5:  # below that, greedy, as vLLM does: scores / temperature overflow
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            processors.append(SeededSampler(params, seed, self.device))
        return processors

    def _generate_kwargs(self, params: SamplingParams, stream: TokenStream, prompt_len: int) -> dict[str, Any]:
        from transformers import GenerationConfig, StoppingCriteriaList

        base = self.model.generation_config
        # A clean config per request: the model's special tokens and this request's limits. Every
        # processor is in `logits_processor`, in vLLM's order, none from the model's defaults.
        config = GenerationConfig(
            bos_token_id=base.bos_token_id,
            # [] rather than None for "no end token" (ignore_eos): generate fills a None from the model.
            eos_token_id=sorted(self.stop_token_ids(params)),
            pad_token_id=base.pad_token_id if base.pad_token_id is not None else self.tokenizer.pad_token_id,
            max_new_tokens=params.max_tokens,
            do_sample=False,
            num_beams=1,
        )
        return {
            "generation_config": config,
            "logits_processor": self._processors(params, stream, prompt_len),
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
        (input_ids and attention_mask, plus pixel_values for vision models); n > 1 runs it as a batch."""
        prompt_ids = model_inputs["input_ids"][0].tolist()
        loop = asyncio.get_running_loop()
        stream = TokenStream(loop, self.tokenizer, params.logprobs)
        if params.n > 1:
            model_inputs = {
                name: value.repeat(params.n, *[1] * (value.dim() - 1)) if isinstance(value, torch.Tensor) else value
                for name, value in model_inputs.items()
            }
        # The logits processors are built on a generation thread, before the time limit starts:
        # compiling a grammar (structured_output.py, once per choice) takes seconds for a large
        # schema, and on the event loop it would stall every other stream meanwhile.
        built = await loop.run_in_executor(self.pool, self._generate_kwargs, params, stream, len(prompt_ids))
        kwargs = {**model_inputs, **built}
        stop_ids = self.stop_token_ids(params)
        choices = [
            _Choice(
                IncrementalDecoder(self.tokenizer, prompt_ids[-DECODE_CONTEXT_TOKENS:], params.skip_special_tokens),
                StopStringFilter(params.stop, params.include_stop_str_in_output),
            )
            for _ in range(params.n)
        ]
        running = loop.run_in_executor(self.pool, self._run, kwargs)
        deadline = loop.time() + self.time_limit_s if self.time_limit_s else None
        timed_out = False

        async def next_step() -> list[tuple[int, TokenLogprob | None]] | None:
            # What is already queued is taken at once: on Python 3.11, wait_for(get(), 0) raises
            # TimeoutError even when an item is waiting, and a generation that finished in time
            # must never report the time limit.
            nonlocal timed_out
            if not stream.queue.empty():
                return stream.queue.get_nowait()
            if deadline is None:
                return await stream.queue.get()
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                return await asyncio.wait_for(stream.queue.get(), remaining)
            except TimeoutError:
                if not any(choice.tokens for choice in choices):  # nothing to keep: the job fails
                    raise GenerationTimeout(f"generation stopped at its {self.time_limit_s:g}-second limit") from None
                timed_out = True
                stream.stop.set()  # the thread ends at its next token; what it made so far is kept
                return None

        def finish(index: int, reason: str) -> None:
            choices[index].finish_reason = reason
            stream.stop_rows.add(index)
            if all(choice.finish_reason for choice in choices):
                stream.stop.set()  # the thread ends at its next token; the rest is discarded

        try:
            while (step := await next_step()) is not None:
                for index, (token_id, logprob) in enumerate(step):
                    choice = choices[index]
                    if choice.finish_reason:
                        continue  # a finished choice gets padding until the batch ends
                    choice.tokens += 1
                    if logprob is not None:
                        choice.logprobs.append(logprob)
                    ends = token_id in stop_ids
                    text = "" if ends and not params.include_stop_str_in_output else choice.decoder.push(token_id)
                    if text := choice.stops.push(text):
                        yield Delta(text=text, index=index, logprobs=tuple(choice.logprobs))
                        choice.logprobs.clear()
                    if choice.stops.stopped or ends:
                        finish(index, "stop")
                if stream.stop.is_set():
                    break
            await running  # re-raises what generate raised (out of memory, ...)
            for index, choice in enumerate(choices):
                if text := choice.stops.push(choice.decoder.flush()) + choice.stops.flush():
                    yield Delta(text=text, index=index, logprobs=tuple(choice.logprobs))
                    choice.logprobs.clear()
            usage = Usage(len(prompt_ids), sum(choice.tokens for choice in choices))
            for index, choice in enumerate(choices):
                last = index == len(choices) - 1
                yield Delta(
                    finish_reason=choice.finish_reason or "length",
                    usage=usage if last else None,
                    index=index,
                    logprobs=tuple(choice.logprobs),
                    limit=TIME_LIMIT_SETTING if timed_out and not choice.finish_reason else None,
                )
        finally:
            # Reached on completion, on error, and when the job is cancelled or its consumer goes
            # away: the generation thread stops at its next token instead of running on unseen.
            stream.stop.set()
