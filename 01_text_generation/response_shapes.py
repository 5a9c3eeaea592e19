"""The shapes streamed text is sent in: pure functions from `Delta`s (textstream.py) to the
native chunks and OpenAI's chat and text completion objects, SSE too, with tool calls, reasoning
and logprobs where a delta carries them. Plain JSON out, nothing else.

Copied, identical, into every example that generates text (each folder is its own Docker context);
tests/copied_modules/test_copies.py checks that the copies match.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from textstream import Delta, SamplingParams, TokenLogprob, Usage


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def limited(fields: dict[str, Any], limit: str | None) -> dict[str, Any]:
    """`fields` with the setting that ended the answer early (`"limit": "MAX_GENERATION_SECONDS"`)
    beside its finish_reason "length", when one did: the caller keeps the text and knows why it ends."""
    return {**fields, "limit": limit} if limit else fields


def native_chunk(delta: Delta) -> dict[str, Any]:
    """A streamed chunk: {"text": "..."} (never empty), then {"finish_reason": ..., "usage": ...}."""
    if delta.finish_reason is None:
        return {"text": delta.text}
    return limited({"finish_reason": delta.finish_reason, "usage": usage_json(delta.usage)}, delta.limit)


def sse(payload: dict[str, Any] | str) -> str:
    """One whole server-sent event, as OpenAI's streaming API sends it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat's `logprobs` of a choice: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {
        "content": [
            {
                "token": item.token,
                "logprob": item.logprob,
                "bytes": _token_bytes(item.token),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in item.top],
            }
            for item in logprobs
        ]
    }


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' `logprobs`: parallel lists, text_offset counted from `offset` characters."""
    offsets, position = [], offset
    for item in logprobs:
        offsets.append(position)
        position += len(item.token)
    return {
        "tokens": [item.token for item in logprobs],
        "token_logprobs": [item.logprob for item in logprobs],
        "top_logprobs": [dict(item.top) for item in logprobs],
        "text_offset": offsets,
    }


def guaranteed_tokens(params: SamplingParams) -> int:
    """Tokens each choice is certain to generate: `max_tokens` when only the length can end it,
    else `min_tokens` (a stop string or a completed grammar can end a choice at any token)."""
    if params.stop or params.grammar is not None:
        return 0
    if params.ignore_eos and not params.stop_token_ids:
        return params.max_tokens
    return params.min_tokens


def logprobs_floor_bytes(params: SamplingParams, chat: bool) -> int:
    """The fewest bytes a response's logprobs certainly take, as JSON: its guaranteed tokens in each
    choice, each with the shortest entry there can be (an empty token, distinct one-letter
    alternatives, log-probabilities of 0). A request over its result budget by this alone is
    refused before any work."""
    if params.logprobs is None:
        return 0
    top = tuple((chr(ord("a") + i - 1) if i else "", 0.0) for i in range(params.logprobs))
    entry = TokenLogprob("", 0.0, top)
    shape = chat_logprobs if chat else completion_logprobs
    per_token = len(json.dumps(shape([entry, entry]))) - len(json.dumps(shape([entry])))
    return per_token * guaranteed_tokens(params) * params.n


@dataclass(frozen=True)
class OpenAIShape:
    """Builds OpenAI's objects for one response: chat.completion(.chunk) or text_completion."""

    chat: bool  # chat.completion(.chunk) objects, else text_completion
    id: str
    created: int
    model: str
    logprobs: bool = False  # the request asked for logprobs: every choice carries them

    @classmethod
    def new(cls, chat: bool, model: str, logprobs: bool = False) -> OpenAIShape:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, logprobs)

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def _logprobs(self, logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(logprobs) if self.chat else completion_logprobs(logprobs, offset)

    def role_chunk(self, index: int = 0, **extra: Any) -> dict[str, Any]:
        """Chat only: the first chunk of a choice, with the role."""
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope("chat.completion.chunk", [choice], **extra)

    def chunk(self, delta: Delta, offset: int = 0, **extra: Any) -> dict[str, Any]:
        """One streamed chunk of one choice. Chat: `delta` with content, reasoning and tool calls
        as they come (each tool call whole); text: `text`. `offset`: characters already sent."""
        logprobs = self._logprobs(delta.logprobs, offset) if delta.logprobs else None
        if self.chat:
            message: dict[str, Any] = {}
            if delta.reasoning:
                message["reasoning"] = delta.reasoning
            if delta.text:
                message["content"] = delta.text
            if delta.tool_calls:
                message["tool_calls"] = list(delta.tool_calls)
            choice = {
                "index": delta.index,
                "delta": message,
                "logprobs": logprobs,
                "finish_reason": delta.finish_reason,
            }
            return self._envelope("chat.completion.chunk", [limited(choice, delta.limit)], **extra)
        choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        return self._envelope("text_completion", [limited(choice, delta.limit)], **extra)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage_json(usage))

    def complete(self, choices: Sequence[Collected], usage: Usage) -> dict[str, Any]:
        """The whole response: one choice per index."""
        if self.chat:
            bodies = []
            for c in choices:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": c.text if c.text or not c.tool_calls else None,
                }
                if c.reasoning:
                    message["reasoning"] = c.reasoning
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                body = {
                    "index": c.index,
                    "message": message,
                    "logprobs": self._logprobs(c.logprobs),
                    "finish_reason": c.finish_reason,
                }
                bodies.append(limited(body, c.limit))
            return self._envelope("chat.completion", bodies, usage=usage_json(usage))
        bodies = [
            limited(
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": self._logprobs(c.logprobs),
                    "finish_reason": c.finish_reason,
                },
                c.limit,
            )
            for c in choices
        ]
        return self._envelope("text_completion", bodies, usage=usage_json(usage))


async def openai_events(shape: OpenAIShape, deltas: AsyncIterator[Delta], include_usage: bool) -> AsyncIterator[str]:
    """vLLM's stream shape: a role delta per choice (chat), then content (and reasoning, tool call)
    deltas, a finish_reason chunk per choice, optional usage, [DONE]."""
    extra = {"usage": None} if include_usage else {}  # OpenAI: null usage on every chunk but the last
    started: set[int] = set()
    sent: dict[int, int] = {}  # characters sent per choice, for the completions' text_offset
    async for delta in deltas:
        if shape.chat and delta.index not in started:
            started.add(delta.index)
            yield sse(shape.role_chunk(delta.index, **extra))
        yield sse(shape.chunk(delta, sent.get(delta.index, 0), **extra))
        sent[delta.index] = sent.get(delta.index, 0) + len(delta.text)
        if include_usage and delta.usage is not None:
            yield sse(shape.usage_chunk(delta.usage))
    yield SSE_DONE


@dataclass
class Collected:
    """One choice, gathered from its deltas."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    limit: str | None = None


async def collect_choices(deltas: AsyncIterator[Delta]) -> tuple[list[Collected], Usage | None]:
    """Every choice's whole text, reasoning, tool calls and logprobs, in index order, and the usage."""
    choices: dict[int, Collected] = {}
    usage = None
    async for delta in deltas:
        choice = choices.setdefault(delta.index, Collected(delta.index))
        choice.text += delta.text
        choice.reasoning += delta.reasoning
        choice.tool_calls.extend(delta.tool_calls)
        choice.logprobs.extend(delta.logprobs)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        choice.limit = delta.limit or choice.limit
        usage = delta.usage or usage
    return [choices[index] for index in sorted(choices)], usage


async def native_responses(deltas: AsyncIterator[Delta], stream: bool) -> AsyncIterator[dict[str, Any]]:
    """Streamed: a chunk per delta. Not streamed: one chunk with the whole text, finish reason and usage."""
    if stream:
        async for delta in deltas:
            yield native_chunk(delta)
    else:
        [choice], usage = await collect_choices(deltas)
        yield limited(
            {"text": choice.text, "finish_reason": choice.finish_reason, "usage": usage_json(usage)}, choice.limit
        )


async def openai_responses(
    shape: OpenAIShape, deltas: AsyncIterator[Delta], stream: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    """Streamed: SSE events. Not streamed: one ChatCompletion or Completion object."""
    if stream:
        async for event in openai_events(shape, deltas, include_usage):
            yield event
    else:
        choices, usage = await collect_choices(deltas)
        yield shape.complete(choices, usage)


def closing_chunks(shape: OpenAIShape | None, unfinished: Sequence[int], limit: str) -> list[Any]:
    """The end of a stream a limit stopped after it sent text (`shape`: the OpenAI stream's, None
    for a native one): each unfinished choice ends with finish_reason "length" and the limit's
    name, as max_tokens would end it; an OpenAI stream then sends [DONE]."""
    ends = [Delta(finish_reason="length", index=index, limit=limit) for index in unfinished]
    if shape is None:
        return [{"finish_reason": end.finish_reason, "limit": limit} for end in ends]
    return ["".join(sse(shape.chunk(end)) for end in ends) + SSE_DONE]
