"""What a validated request asks of the engine, decided before the first chunk: the turns the chat
template reads, the tokenized prompt, the output grammar, all gathered in a `Plan`.

The handler's `render_prompt` and `plan` (handler.py, "4. Inference") use these pieces with the
loaded engine and the worker's settings; everything here takes the engine as an argument, so this
module imports nothing from the handler.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from errors import RequestError
from openai_tools import tool_call_grammar
from schema import Message, NamedToolChoice
from structured_output import grammar_error, grammar_tokenizer, json_schema_grammar
from textstream import SamplingParams


@dataclass(frozen=True)
class Prompt:
    text: str
    is_chat: bool
    ids: list[int]  # tokenized once, here; generation reads these

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Plan:
    """Everything generation and the response need, decided before the first chunk."""

    prompt: Prompt
    params: SamplingParams
    parse_tools: bool  # hermes tool calls become tool_calls
    reasoning: str | None  # the reasoning parser, chat only
    thinking: bool  # the prompt left a <think> open
    include_reasoning: bool


def chat_turn(index: int, message: Message) -> dict[str, Any]:
    """One message as vLLM hands it to chat templates: its name, an assistant's earlier thoughts
    (as `reasoning` and `reasoning_content`), earlier tool calls with their arguments as objects
    (templates write them out with tojson). A developer turn stays one until `conversation`."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        turn["name"] = message.name
    thoughts = message.reasoning if message.reasoning is not None else message.reasoning_content
    if message.role == "assistant" and thoughts is not None:
        turn["reasoning"] = turn["reasoning_content"] = thoughts
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for number, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                raise RequestError(f"messages.{index}.tool_calls.{number}.function.arguments: not valid JSON") from None
            calls.append(
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
            )
        turn["tool_calls"] = calls
    return turn


def conversation(turns: list[dict[str, Any]], chat_template: str) -> list[dict[str, Any]]:
    """The turns a template reads, by vLLM's rule: a template that names the developer role gets
    developer turns as they are; any other gets them as system turns, every system turn merged into
    one at the start (some templates allow a system turn only there), their texts joined by a
    blank line."""
    if not any(turn["role"] == "developer" for turn in turns) or re.search(r"[\"']developer[\"']", chat_template):
        return turns
    turns = [{**turn, "role": "system"} if turn["role"] == "developer" else turn for turn in turns]
    systems = [index for index, turn in enumerate(turns) if turn["role"] == "system"]
    if systems in ([], [0]):
        return turns
    merged = {"role": "system", "content": "\n\n".join(turns[i]["content"] for i in systems if turns[i]["content"])}
    return [merged, *(turn for turn in turns if turn["role"] != "system")]


def engine_grammar_tokenizer(engine: Any) -> Any:
    """llguidance's view of the engine's tokenizer (built once per worker, structured_output.py)."""
    return grammar_tokenizer(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))


def requested_grammar(request: BaseModel, engine: Any = None) -> str | None:
    """The llguidance grammar a request's response_format, structured_outputs or forced tool_choice asks
    for; a forced call's tags are matched as the engine's tokenizer writes them (None: as text)."""
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        return json_schema_grammar(None)
    if response_format is not None and response_format.type == "json_schema":
        return json_schema_grammar(response_format.json_schema.schema_)
    if request.structured_outputs is not None:
        return request.structured_outputs.grammar_text()
    choice = getattr(request, "tool_choice", None)
    if choice != "required" and not isinstance(choice, NamedToolChoice):
        return None
    tokenizer = engine_grammar_tokenizer(engine) if engine is not None else None
    if choice == "required":
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
        return tool_call_grammar(tools, parallel=request.parallel_tool_calls is not False, tokenizer=tokenizer)
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools if tool.function.name == choice.function.name]
    return tool_call_grammar(tools, parallel=False, tokenizer=tokenizer)


def checked_grammar(request: BaseModel, engine: Any) -> str | None:
    """The requested grammar, compiled once against the engine's tokenizer: a grammar the engine
    refuses is the caller's error, before any generation."""
    try:
        grammar = requested_grammar(request, engine)
    except ValueError as error:  # a schema that is not JSON, for instance
        raise RequestError(f"structured output: {error}") from None
    if grammar is None:
        return None
    if problem := grammar_error(grammar, engine_grammar_tokenizer(engine)):
        raise RequestError(f"structured output: the grammar engine refused it: {problem}")
    return grammar
