"""The request schema: the single source of truth for the names, defaults and limits of a request.

Three routes share one worker (handler.py): the native request (the shape of Runpod's vLLM worker),
OpenAI's chat completions and OpenAI's text completions. Each is a pydantic model in strict mode
(`"max_tokens": "9"` is an error, not silently coerced), and every feature this worker lacks is
refused with a message instead of silently dropped.

The limits that depend on the loaded model (its context length, its vocabulary) are not known
here: they come in as pydantic's validation context, a `ModelLimits`, so this module imports
nothing from the handler and is built on no placeholder. `parse_request(job_input, limits)` is a
pure function from a job's input to a route and a validated request, tested without a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from errors import RequestError, validated
from structured_output import grammar_from, json_schema_grammar

# Limits of the request schema (OpenAI's own where it has one).
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # a stop string longer than this is a mistake, and holding it back delays streaming
MAX_MESSAGES = 1024  # far beyond any real conversation; bounds the work of rendering the template
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 2.0  # above 2 output degrades into noise
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each bias is [-100, 100]
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit on logit_bias entries
MAX_STOP_TOKEN_IDS = 64  # each is checked after every token; a real list has a handful
# Choices per request (n): each is one more row of the batch, with its own KV cache.
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (and vLLM's default max_logprobs)
MAX_TOOLS = 128  # OpenAI's limit
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries: a template reads a few flags
# No tokenizer packs more than ~32 characters into one token, so a longer prompt cannot fit the
# context: it is refused before the tokenizer spends time on it.
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model allows; validation reads it as its context:
    `GenerateRequest.model_validate(data, context=ModelLimits(...))`. A request built without it
    (a test's `GenerateRequest(messages=...)`) gets only the bounds that hold for every model."""

    context_len: int  # prompt + completion tokens: MAX_MODEL_LEN, or the model's own context
    vocab_size: int  # token ids a request may name (logit_bias, stop_token_ids): the tokenizer's vocabulary


def _limits(info: ValidationInfo) -> ModelLimits | None:
    return info.context if isinstance(info.context, ModelLimits) else None


def _within_context(value: int, info: ValidationInfo) -> int:
    """No more tokens than the whole context holds (pydantic's own `le` error, with the model's bound)."""
    if (limits := _limits(info)) and value > limits.context_len:
        raise PydanticKnownError("less_than_equal", {"le": limits.context_len})
    return value


def _in_vocabulary(value: int, info: ValidationInfo) -> int:
    if (limits := _limits(info)) and value >= limits.vocab_size:
        raise PydanticKnownError("less_than", {"lt": limits.vocab_size})
    return value


def _can_fit_context(value: str, info: ValidationInfo) -> str:
    if (limits := _limits(info)) and len(value) > (most := limits.context_len * CHARS_PER_TOKEN_BOUND):
        raise PydanticKnownError("string_too_long", {"max_length": most})
    return value


def unsupported(feature: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{feature} is not supported by this worker{hint}")


# MaxTokens, TokenId and PromptText also have the model's bounds: their validators read ModelLimits from the context.
MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_within_context)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1)]  # -1 and 0 both mean "no top-k", as in vLLM
MinP = Annotated[float, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=MAX_REPETITION_PENALTY)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TokenId = Annotated[int, Field(ge=0), AfterValidator(_in_vocabulary)]
StopList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)
]
PromptText = Annotated[str, Field(min_length=1), AfterValidator(_can_fit_context)]
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


def _one_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# vLLM fields this worker cannot honour. Each is refused when set to anything but its no-op value,
# so a request never silently gets something other than it asked for.
REFUSED_FIELDS: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "spaces_between_special_tokens": (None, True),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "add_special_tokens": (None, False),
    "chat_template": (None,),
    "mm_processor_kwargs": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "priority": (None, 0),
    "detokenize": (None, True),
}
# OpenAI fields that do not change the output: accepted, and that is all.
HARMLESS_FIELDS = ("user", "metadata", "store", "service_tier", "request_id", "prompt_cache_key", "safety_identifier")


def refuse_unsupported_fields(data: Any) -> Any:
    """A `before` validator: a refused field that is set is an error naming it; harmless ones go."""
    if not isinstance(data, dict):
        return data
    for name, no_ops in REFUSED_FIELDS.items():
        if name in data and not any(data[name] == value and type(data[name]) is type(value) for value in no_ops):
            hint = "; use structured_outputs or response_format" if name.startswith("guided_") else ""
            raise unsupported(name, hint)
    return {name: value for name, value in data.items() if name not in REFUSED_FIELDS and name not in HARMLESS_FIELDS}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    # extra="ignore": other fields of OpenAI's message types are harmless on a turn
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's new name for system
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the template, as vLLM does
    # An earlier answer's thoughts (vLLM's field, and its older name): templates that keep them
    # (interleaved thinking) read both, as vLLM passes both.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result names the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in value):
            raise unsupported("non-text content", "; this worker serves a text-only model")
        return value

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content is required (null only on an assistant turn with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only an assistant turn has tool_calls")
        return self

    def text(self) -> str:
        """The content as one string; text parts joined by newlines, as vLLM joins them."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class Sampling(BaseModel):
    """Sampling fields shared by every route (vLLM's names); None means the model's default (or the usual one)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
            Field(max_length=MAX_LOGIT_BIAS_TOKENS),
        ]
        | None
    ) = None
    stop: StopList | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0), AfterValidator(_within_context)] | None = None
    skip_special_tokens: bool | None = None
    seed: Seed | None = None
    n: Choices | None = None

    _stop_as_list = field_validator("stop", mode="before")(_one_as_list)
    _refused = model_validator(mode="before")(refuse_unsupported_fields)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        limits = _limits(info)
        for token in value or {}:
            if not token.isdigit() or (limits and int(token) >= limits.vocab_size):
                vocabulary = f" (0 to {limits.vocab_size - 1})" if limits else ""
                raise PydanticCustomError("token_id", f"{token!r} is not a token id{vocabulary}")
        return value


class TemplateOptions(BaseModel):
    """How messages become the prompt, with vLLM's names and defaults."""

    add_generation_prompt: bool = True  # open a new assistant turn after the messages
    continue_final_message: bool = False  # instead continue the last (assistant) message
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None = None

    @model_validator(mode="after")
    def _one_ending(self) -> TemplateOptions:
        if self.add_generation_prompt and self.continue_final_message:
            raise PydanticCustomError(
                "template", "continue_final_message: set add_generation_prompt to false to continue the last message"
            )
        reserved = {"messages", "conversation", "tools", "documents", "tokenize", "add_generation_prompt"}
        reserved |= {"continue_final_message", "chat_template", "return_dict"}
        if clash := reserved & set(self.chat_template_kwargs or {}):
            raise PydanticCustomError(
                "template", f"chat_template_kwargs: {', '.join(sorted(clash))} is a field of its own"
            )
        return self


class NativeSampling(Sampling):
    @field_validator("n")
    @classmethod
    def _one_text(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise unsupported(f"n={value} on the native route", "; the OpenAI routes return several choices")
        return value


class GenerateRequest(TemplateOptions):
    """The native request (the shape of Runpod's vLLM worker)."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt field is an error, not ignored
    prompt: PromptText | None = None
    messages: Messages | None = None
    sampling_params: NativeSampling = NativeSampling()
    stream: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "send exactly one of prompt or messages")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one constraint on the output."""

    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None  # Lark or GBNF

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if (
            sum(
                value not in (None, False)
                for value in (self.json_, self.json_object, self.regex, self.choice, self.grammar)
            )
            != 1
        ):
            raise PydanticCustomError("structured", "set exactly one of json, json_object, regex, choice, grammar")
        return self

    def grammar_text(self) -> str:
        if self.json_ is not None:
            return json_schema_grammar(json.loads(self.json_) if isinstance(self.json_, str) else self.json_)
        if self.json_object:
            return json_schema_grammar(None)
        if self.choice is not None:
            return grammar_from("choice", json.dumps(self.choice))
        return grammar_from("regex", self.regex) if self.regex is not None else grammar_from("grammar", self.grammar)


class OpenAIRequest(Sampling):
    """Fields common to OpenAI's chat and text completions, with vLLM's extensions. An unknown field
    is an error naming it: a feature this worker lacks is refused, never silently dropped."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    model: str | None = None  # one endpoint serves one model, whatever the name says
    # OpenAI accepts null for every optional field, so these do too (null = the default).
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    structured_outputs: StructuredOutputs | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # "description" and "strict" change nothing here
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "response_format.json_schema is required with type json_schema")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # The tool-call grammar always holds to the schema; kept only because the template renders it,
    # as vLLM passes it.
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAIRequest, TemplateOptions):
    messages: Messages
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    documents: list[dict[str, Any]] | None = None  # for templates that take retrieved documents (RAG)
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # given to the template, as vLLM does
    include_reasoning: bool = True  # vLLM's switch to leave the reasoning out of the response

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs needs logprobs: true")
        names = [tool.function.name for tool in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise PydanticCustomError("tool_choice", "tool_choice other than none or auto needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise PydanticCustomError(
                "tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools"
            )
        constrained = (self.response_format and self.response_format.type != "text") or self.structured_outputs
        if constrained and self.tool_choice not in (None, "none", "auto"):
            raise PydanticCustomError("tool_choice", "a forced tool_choice cannot be combined with a response format")
        if self.response_format and self.response_format.type != "text" and self.structured_outputs:
            raise PydanticCustomError("response_format", "send response_format or structured_outputs, not both")
        return self


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: TopLogprobs | None = None  # the chosen token's and this many alternatives

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(p, str) for p in value):
            raise unsupported("a prompt of token ids", "; send text")
        if isinstance(value, list) and len(value) > 1:
            raise unsupported("a batch of prompts", "; send one request per prompt")
        return _one_as_list(value)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CompletionRequest:
        if self.echo:
            raise unsupported("echo")
        if self.suffix:
            raise unsupported("suffix")
        return self


NATIVE = "native"
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
OPENAI_ROUTES = {CHAT_ROUTE: ChatCompletionRequest, COMPLETIONS_ROUTE: CompletionRequest, MODELS_ROUTE: None}


def generic_as_openai(job_input: dict[str, Any]) -> dict[str, Any]:
    """worker-vllm's generic shape (`route`, `body`, `method`) as the OpenAI job it stands for.
    Pure. The method defaults to POST with a body, GET without one, as in worker-vllm."""
    unknown = sorted(set(job_input) - {"route", "body", "method"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} beside route; send route, body and method")
    route, body = job_input["route"], job_input.get("body")
    if not isinstance(route, str) or route not in OPENAI_ROUTES:
        raise RequestError(f"route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    method = job_input.get("method") or ("POST" if body is not None else "GET")
    if not isinstance(method, str) or method.upper() != ("GET" if OPENAI_ROUTES[route] is None else "POST"):
        raise RequestError(f"{route} takes {'GET' if OPENAI_ROUTES[route] is None else 'POST'}, got {method!r}")
    if OPENAI_ROUTES[route] is None:
        if body is not None:
            raise RequestError(f"{route} takes no body")
        return {"openai_route": route}
    return {"openai_route": route, "openai_input": body}


def parse_request(job_input: Any, limits: ModelLimits | None) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request) within the model's `limits`. Pure: no model, no I/O."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "route" in job_input:
        job_input = generic_as_openai(job_input)
    if "openai_route" not in job_input:
        return NATIVE, validated(GenerateRequest, job_input, limits)

    route = job_input["openai_route"]
    if not isinstance(route, str) or route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    model = OPENAI_ROUTES[route]
    if model is None:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    return route, validated(model, body, limits, prefix="openai_input")
