"""Tool calls and reasoning in OpenAI chat responses, for the transformers engine.

The model writes everything as text; this module turns that text into OpenAI's fields, streamed
or whole, the way vLLM's `hermes` tool parser and `qwen3` / `deepseek_r1` reasoning parsers do:

  * tool calls, hermes style (Qwen 2.5 / 3, Hermes, many fine-tunes):
        <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
    become `tool_calls` entries; `tool_call_grammar` makes `tool_choice: "required"` or a named
    tool certain, by constraining generation to exactly that shape (llguidance, structured_output.py):
    the turn cannot end before one whole call, closing tag included.
  * `<think>…</think>` becomes the `reasoning` field (vLLM's name for it).

Pure text in, `Delta`s out: `parse_choices` sits between the generator and the response shapes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from structured_output import COMPACT_JSON
from textstream import Delta

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
# vLLM's parser names. deepseek_r1: the model thinks first, always (its template opens <think>);
# qwen3: it thinks when the prompt left a <think> open or the output starts with one.
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def grammar_tag(tag: str, tokenizer: Any = None) -> str:
    """A Lark term for `tag` in a grammar for `tokenizer` (an llguidance tokenizer, structured_output.py).

    Where the tokenizer holds the tag as one added token (Qwen 2.5 and 3: <tool_call> is token 151657),
    that token, by id: llguidance keeps added tokens apart from text, so a quoted
    "<tool_call>" would never match the token such a model writes, and a matcher fed it fails (which
    ended forced calls right after their first token). Else the tag's text. None: the text.
    """
    if tokenizer is not None:
        ids = tokenizer.tokenize_str(tag, parse_special=True)
        if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
    return json.dumps(tag)


def tool_call_grammar(tools: Sequence[dict[str, Any]], parallel: bool, tokenizer: Any = None) -> str:
    """An llguidance grammar for hermes tool calls of `tools` (OpenAI tool definitions): one call,
    or with `parallel` one or more, each `<tool_call>`, `{"name": <one of them>, "arguments": <its
    parameters>}`, `</tool_call>`. The end tokens are allowed only after a whole call. `tokenizer`
    (the llguidance tokenizer it is for) decides how the tags are matched (`grammar_tag`)."""
    import llguidance

    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"anyOf": options, "x-guidance": COMPACT_JSON}
    opening, closing = grammar_tag(TOOL_CALL_START, tokenizer), grammar_tag(TOOL_CALL_END, tokenizer)
    call = " ".join((opening, json.dumps("\n"), "%json", json.dumps(schema), json.dumps("\n"), closing))
    more = ' ("\\n" call)*' if parallel else ""  # further calls, one per line
    return llguidance.LLMatcher.grammar_from_lark(f"start: call{more}\ncall: {call}")


def tool_call_entry(name: str, arguments: Any, index: int) -> dict[str, Any]:
    """One OpenAI tool call; `index` is its place among the choice's calls (streamed deltas need it)."""
    return {
        "index": index,
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_call(body: str) -> tuple[str, Any] | None:
    """(name, arguments) of a hermes call's JSON, or None when it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could still grow into `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ToolCallParser:
    """Streamed text in; (content, finished tool calls) out, holding back a possible `<tool_call>`.

    Text outside the tags is content (whitespace between and after calls is dropped). A block
    whose JSON is not a call goes out as content, unchanged, as vLLM's hermes parser does.
    """

    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False
        self.calls = 0

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.pending += text
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.pending.find(TOOL_CALL_END)
                if end < 0:
                    return content, calls
                body, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_END) :]
                self.in_call = False
                content += self._call_or_text(body, calls, closed=True)
                continue
            start = self.pending.find(TOOL_CALL_START)
            if start >= 0:
                before, self.pending = self.pending[:start], self.pending[start + len(TOOL_CALL_START) :]
                content += before if not (self.calls and not before.strip()) else ""
                self.in_call = True
                continue
            hold = _held(self.pending, TOOL_CALL_START)
            released, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
            if not (self.calls and not released.strip()):
                content += released
            return content, calls

    def _call_or_text(self, body: str, calls: list[dict[str, Any]], closed: bool) -> str:
        parsed = parse_call(body.strip())
        if parsed is None:
            return TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")
        calls.append(tool_call_entry(*parsed, index=self.calls))
        self.calls += 1
        return ""

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """The end: an unclosed call still counts when its JSON is whole (the stop string ate the tag)."""
        rest, self.pending = self.pending, ""
        calls: list[dict[str, Any]] = []
        if self.in_call:
            self.in_call = False
            return self._call_or_text(rest, calls, closed=False), calls
        return ("" if self.calls and not rest.strip() else rest), calls


class ReasoningParser:
    """Streamed text in; (reasoning, content) out. Reasoning runs until `</think>`; a `<think>` at
    the very start of the output opens it (and is dropped); partial tags are held back."""

    def __init__(self, thinking: bool) -> None:
        self.state = "thinking" if thinking else "start"  # start → thinking | content
        self.pending = ""
        self.opening = True  # a leading <think> may still come

    def push(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning = ""
        if self.opening:
            stripped = self.pending.lstrip()
            if stripped.startswith(THINK_START):
                self.pending, self.state, self.opening = stripped[len(THINK_START) :], "thinking", False
            elif THINK_START.startswith(stripped):
                return "", ""  # could still become <think>
            else:
                self.opening = False
        if self.state == "start":
            self.state = "content"
        if self.state == "thinking":
            end = self.pending.find(THINK_END)
            if end < 0:
                hold = _held(self.pending, THINK_END)
                reasoning, self.pending = (
                    self.pending[: len(self.pending) - hold],
                    self.pending[len(self.pending) - hold :],
                )
                return reasoning, ""
            reasoning, self.pending, self.state = self.pending[:end], self.pending[end + len(THINK_END) :], "content"
        content, self.pending = self.pending, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        return (rest, "") if self.state == "thinking" else ("", rest)


def prompt_opens_thinking(prompt: str) -> bool:
    """The rendered prompt ends inside a <think> block (a template that starts the thoughts)."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


@dataclass
class ChoiceParser:
    """Reasoning first, then tool calls in what remains, for one choice."""

    reasoning: ReasoningParser | None
    tools: ToolCallParser | None
    include_reasoning: bool = True
    called: bool = False

    def _split(self, reasoning: str, content: str, calls: list[dict[str, Any]]) -> Delta:
        self.called = self.called or bool(calls)
        return Delta(text=content, reasoning=reasoning if self.include_reasoning else "", tool_calls=tuple(calls))

    def push(self, text: str) -> Delta:
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        content, calls = self.tools.push(content) if self.tools else (content, [])
        return self._split(reasoning, content, calls)

    def flush(self) -> Delta:
        reasoning, content = self.reasoning.flush() if self.reasoning else ("", "")
        calls: list[dict[str, Any]] = []
        if self.tools:
            more, calls = self.tools.push(content)
            rest, last = self.tools.flush()
            content, calls = more + rest, calls + last
        return self._split(reasoning, content, calls)


def _carries(delta: Delta) -> bool:
    return bool(delta.text or delta.reasoning or delta.tool_calls or delta.logprobs)


async def parse_choices(
    deltas: AsyncIterator[Delta], *, tools: bool, reasoning: str | None, thinking: bool, include_reasoning: bool
) -> AsyncIterator[Delta]:
    """The generator's text deltas with reasoning and hermes tool calls split out, per choice.

    `reasoning` names the reasoning parser (None: none); `thinking`: the prompt left <think> open.
    A choice that made tool calls and stopped by itself finishes with "tool_calls", as in vLLM.
    """
    parsers: dict[int, ChoiceParser] = {}
    async for delta in deltas:
        parser = parsers.setdefault(
            delta.index,
            ChoiceParser(
                ReasoningParser(thinking or reasoning == "deepseek_r1") if reasoning else None,
                ToolCallParser() if tools else None,
                include_reasoning,
            ),
        )
        if delta.finish_reason is None:
            out = replace(parser.push(delta.text), index=delta.index, logprobs=delta.logprobs)
            if _carries(out):
                yield out
            continue
        out = replace(parser.flush(), index=delta.index)
        if _carries(out):
            yield out
        finish = "tool_calls" if parser.called and delta.finish_reason == "stop" else delta.finish_reason
        yield replace(delta, finish_reason=finish)
