"""LLM text generation on Runpod Serverless: streaming, OpenAI-compatible, optionally quantized.

One worker serves one causal language model three ways:
  * native:        {"input": {"messages": [...] | "prompt": "...", "sampling_params": {...}, "stream": true}}
  * OpenAI chat:   {"input": {"openai_route": "/v1/chat/completions", "openai_input": {...}}}
  * OpenAI text:   {"input": {"openai_route": "/v1/completions", "openai_input": {...}}}
    (Runpod sends the OpenAI shapes for https://api.runpod.ai/v2/<endpoint>/openai/v1/...)

The handler is an async generator: each chunk reaches `/stream` as soon as it is made, and
`return_aggregate_stream=True` also gives `/runsync` the whole list. The file reads top to
bottom: configuration, model load, request schema, prompt and sampling, response, the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import startup  # before every library: settles the device and the Hugging Face cache (startup.py)

import runpod
import torch
from coalesce import ResultTooLarge, coalesced, merge_text, within_result_budget
from jinja2 import TemplateError
from openai_tools import REASONING_PARSERS, parse_choices, prompt_opens_thinking, tool_call_grammar
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from textstream import (
    ContextLengthError,
    Delta,
    GenerationTimeout,
    OpenAIShape,
    SamplingParams,
    Usage,
    grammar_error,
    grammar_from,
    grammar_tokenizer,
    json_schema_grammar,
    logprobs_floor_bytes,
    native_responses,
    openai_responses,
    resolve_sampling,
)
from vllm_launch import vllm_installed
from vllm_server import VLLMServer, server_environment, start_vllm_server

from engines import Engine, load_transformers_engine
from local_run import for_local_run

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


# Qwen2.5-0.5B-Instruct: a real instruct model with a chat template and a 32k context, ungated
# (no HF_TOKEN needed), 1 GB in bf16: it deploys on any GPU and still answers on CPU.
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MODEL_NAME = env_str("MODEL_NAME", DEFAULT_MODEL)  # a Hub id or a local folder
MODEL_REVISION = env_str("MODEL_REVISION", None)  # a commit hash makes deployments reproducible
TOKENIZER_NAME = env_str("TOKENIZER_NAME", None)  # when the tokenizer lives in another repo
SERVED_MODEL_NAME = env_str("SERVED_MODEL_NAME", MODEL_NAME)  # the id /v1/models lists
# auto: vLLM when it is installed and a GPU is present (the CUDA image), transformers otherwise.
ENGINE_NAME = env_str("ENGINE", "auto")  # auto | transformers | vllm
# The Python that runs vLLM's server: Dockerfile.vllm keeps vLLM in /opt/vllm, an environment of
# its own (vllm and runpod require incompatible fastapi releases); elsewhere, this worker's Python.
VLLM_PYTHON = env_str("VLLM_PYTHON", sys.executable)
DTYPE = env_str("DTYPE", "auto")  # auto: bf16 on Ampere+ GPUs, fp16 on older ones, fp32 on CPU
# transformers: bnb-8bit | bnb-4bit (~1/2 and ~1/4 of the fp16 memory); vLLM: awq | gptq | fp8 |
# bnb-4bit (pre-quantized awq/gptq checkpoints, fp8 on Ada/Hopper GPUs).
QUANTIZATION = env_str("QUANTIZATION", None)
TRUST_REMOTE_CODE = env_str("TRUST_REMOTE_CODE", "false").lower() in ("1", "true", "yes")
# Prompt + completion tokens per request. Unset: the model's own context length. Lower it to
# bound the KV cache a single request can take.
MAX_MODEL_LEN = env_int("MAX_MODEL_LEN", None)
# Jobs one worker runs at once, each on its own generation thread with its own KV cache.
# 4 keeps short answers from queueing behind a long one without multiplying memory much.
# (ENGINE=vllm batches them in one engine: its default follows MAX_NUM_SEQS, see vllm_server.py.)
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 4)
# How the model marks its thoughts (vLLM's parser names): qwen3 or deepseek_r1 split <think>...</think>
# into the response's `reasoning` field. Unset: the text stays as the model wrote it.
REASONING_PARSER = env_str("REASONING_PARSER", None)
# Completion length when a request names none: long enough for a real answer (OpenAI's
# completions default of 16 tokens silently truncates), short enough to bound a forgotten limit.
# A reasoning model thinks for thousands of tokens before it answers, so with REASONING_PARSER
# set the default is what the context has left after the prompt (as vLLM does), not 512.
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", None if REASONING_PARSER else 512)
# Seconds one generation may run: well under Runpod's default execution timeout (600 s), so a
# runaway request ends with an answer instead of a killed job. 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 300.0)
# Runpod's limit on a job's result (20 MB on /runsync; 10 MB on /run), and with
# return_aggregate_stream the result holds every streamed chunk. Past it the caller would get
# nothing, so a request certain to exceed it (logprobs of n long choices) is refused before the
# work, and a stream that reaches it stops with an error that says so.
MAX_RESULT_BYTES = env_int("MAX_RESULT_BYTES", 20_000_000)
# Room in the result for what surrounds the chunks: the job's id and status, the final error.
RESULT_ENVELOPE_BYTES = 4096
TOO_LARGE = (
    f"the result would pass MAX_RESULT_BYTES ({MAX_RESULT_BYTES:,} bytes, Runpod's limit for a job's result):"
    " lower max_tokens, n or top_logprobs"
)
# ENGINE=vllm also takes every setting of vLLM's server from the environment (vllm_server.py).

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

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"


# ---------------------------------------------------------------------------------------------
# 2. Model load: once per worker, at import, before the first job is taken.
# ---------------------------------------------------------------------------------------------
def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache)."""
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


def choose_engine(requested: str, vllm_installed: bool, gpu: bool) -> str:
    if requested == "auto":
        return "vllm" if vllm_installed and gpu else "transformers"
    if requested not in ("transformers", "vllm"):
        raise ValueError(f"ENGINE must be auto, transformers or vllm, got {requested!r}")
    if requested == "vllm" and not vllm_installed:
        raise ValueError("ENGINE=vllm, but vLLM is not installed in this image")
    return requested


def load_engine(kind: str) -> Engine:
    return load_transformers_engine(
        MODEL_NAME,
        revision=MODEL_REVISION,
        tokenizer_name=TOKENIZER_NAME,
        dtype=DTYPE,
        quantization=QUANTIZATION,
        max_model_len=MAX_MODEL_LEN,
        max_concurrency=MAX_CONCURRENCY,
        time_limit_s=MAX_GENERATION_SECONDS or None,
        trust_remote_code=TRUST_REMOTE_CODE,
        cache_dir=cached_hub_folder(MODEL_NAME),
        tokenizer_cache_dir=cached_hub_folder(TOKENIZER_NAME or MODEL_NAME),
    )


startup.COLD_START.done("imports")  # the download is timed apart from the load
startup.prefetch(MODEL_NAME, TOKENIZER_NAME, revision=MODEL_REVISION, remote_code=TRUST_REMOTE_CODE)
_load_started = time.perf_counter()
ENGINE_KIND = choose_engine(ENGINE_NAME, vllm_installed(VLLM_PYTHON), startup.DEVICE == "cuda")
if ENGINE_KIND == "transformers" and REASONING_PARSER not in (None, *REASONING_PARSERS):
    raise ValueError(
        f"REASONING_PARSER must be one of {', '.join(REASONING_PARSERS)} on the transformers engine,"
        f" got {REASONING_PARSER!r}"
    )
# ENGINE=vllm: vLLM's own OpenAI server answers every job (vllm_server.py), so nothing below the
# handler's first lines runs; the schema and the steps that follow are the transformers engine's.
VLLM: VLLMServer | None = (
    start_vllm_server(
        MAX_GENERATION_SECONDS or None,
        VLLM_PYTHON,
        server_environment(os.environ, MODEL_NAME, cached_hub_folder(MODEL_NAME)),
    )
    if ENGINE_KIND == "vllm"
    else None
)
ENGINE: Engine | None = None if VLLM else load_engine(ENGINE_KIND)
CONTEXT_LEN = ENGINE.max_model_len if ENGINE else 1
SAMPLING_DEFAULTS = ENGINE.sampling_defaults if ENGINE else {}  # what the model's generation_config.json recommends
LOADED_AT = int(time.time())
if ENGINE:
    log.info(
        f"Loaded {MODEL_NAME} with {ENGINE_KIND} ({QUANTIZATION or DTYPE}) in "
        f"{time.perf_counter() - _load_started:.1f}s: context {CONTEXT_LEN} tokens, chat template: "
        f"{'yes' if ENGINE.has_chat_template else 'no'}, sampling defaults: {SAMPLING_DEFAULTS or 'none'}"
    )
    startup.COLD_START.report(f"load to {startup.DEVICE}")


# ---------------------------------------------------------------------------------------------
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


def unsupported(feature: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{feature} is not supported by this worker{hint}")


# Token ids a request may name (logit_bias, stop_token_ids): the tokenizer's vocabulary.
VOCAB_SIZE = len(ENGINE.tokenizer) if ENGINE else 1

MaxTokens = Annotated[int, Field(ge=1, le=CONTEXT_LEN)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1)]  # -1 and 0 both mean "no top-k", as in vLLM
MinP = Annotated[float, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=MAX_REPETITION_PENALTY)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TokenId = Annotated[int, Field(ge=0, lt=VOCAB_SIZE)]
StopList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)
]
PromptText = Annotated[str, Field(min_length=1, max_length=CONTEXT_LEN * CHARS_PER_TOKEN_BOUND)]
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
    # extra="ignore": OpenAI's "name" and a previous answer's "reasoning" are harmless on a turn
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's new name for system
    content: str | list[TextPart] | None = None
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
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


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
    min_tokens: Annotated[int, Field(ge=0, le=CONTEXT_LEN)] | None = None
    skip_special_tokens: bool | None = None
    seed: Seed | None = None
    n: Choices | None = None

    _stop_as_list = field_validator("stop", mode="before")(_one_as_list)
    _refused = model_validator(mode="before")(refuse_unsupported_fields)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token in value or {}:
            if not token.isdigit() or int(token) >= VOCAB_SIZE:
                raise PydanticCustomError("token_id", f"{token!r} is not a token id (0 to {VOCAB_SIZE - 1})")
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
    model_config = ConfigDict(strict=True, extra="ignore")  # "strict": the tool-call grammar always holds to the schema
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None


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


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: "sampling_params.top_p: Input should be ..."."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        location = f"{prefix}.{field}" if prefix and field else prefix or field or "input"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def parse_request(job_input: Any) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request). Pure: no model, no I/O."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" not in job_input:
        try:
            return NATIVE, GenerateRequest.model_validate(job_input)
        except ValidationError as error:
            raise RequestError(describe_validation_error(error)) from None

    route = job_input["openai_route"]
    if not isinstance(route, str) or route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    schema = OPENAI_ROUTES[route]
    if schema is None:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    try:
        return route, schema.model_validate(body)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error, prefix="openai_input")) from None


# ---------------------------------------------------------------------------------------------
# 4. Prompt and sampling: the chat template, the context check, the grammar, the model's defaults.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    text: str
    is_chat: bool
    ids: list[int]  # tokenized once, here; generation reads these

    @property
    def tokens(self) -> int:
        return len(self.ids)


def chat_turn(index: int, message: Message) -> dict[str, Any]:
    """One message as chat templates read it: developer is system, earlier tool calls carry their
    arguments as objects (templates write them out with tojson), as vLLM passes them."""
    turn: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.text(),
    }
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


def render_prompt(request: BaseModel) -> Prompt:
    """The text the model reads: the chat template applied to messages, or the raw prompt."""
    messages = getattr(request, "messages", None)
    if messages is None:
        prompt = request.prompt if isinstance(request, GenerateRequest) else request.prompt[0]
        return Prompt(prompt, False, ENGINE.tokenize(prompt, is_chat=False))
    if not ENGINE.has_chat_template:
        raise RequestError(f"{MODEL_NAME} has no chat template: send a raw prompt instead of messages")
    turns = [chat_turn(index, message) for index, message in enumerate(messages)]
    characters = sum(len(turn["content"]) for turn in turns)
    if characters > CONTEXT_LEN * CHARS_PER_TOKEN_BOUND:
        raise RequestError(
            f"messages: {characters} characters cannot fit the {CONTEXT_LEN}-token context (MAX_MODEL_LEN)"
        )
    template_kwargs = dict(request.chat_template_kwargs or {})
    if getattr(request, "reasoning_effort", None):
        template_kwargs.setdefault("reasoning_effort", request.reasoning_effort)
    tools = getattr(request, "tools", None)
    try:
        text = ENGINE.render_chat(
            turns,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=[tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            documents=getattr(request, "documents", None),
            template_kwargs=template_kwargs,
        )
    except TemplateError as error:  # the template's own rules, e.g. "roles must alternate user/assistant"
        raise RequestError(f"messages: the model's chat template refused them: {error}") from None
    except Exception as error:  # noqa: BLE001 - the message may quote the prompt: only its type goes out
        hint = "; to continue the last message it must be an assistant turn" if request.continue_final_message else ""
        raise RequestError(
            f"messages: the model's chat template could not render them ({type(error).__name__}){hint}"
        ) from None
    return Prompt(text, True, ENGINE.tokenize(text, is_chat=True))


@dataclass(frozen=True)
class Plan:
    """Everything generation and the response need, decided before the first chunk."""

    prompt: Prompt
    params: SamplingParams
    parse_tools: bool  # hermes tool calls become tool_calls
    reasoning: str | None  # the reasoning parser, chat only
    thinking: bool  # the prompt left a <think> open
    include_reasoning: bool


def requested_grammar(request: BaseModel) -> str | None:
    """The llguidance grammar a request's response_format, structured_outputs or forced tool_choice asks for."""
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        return json_schema_grammar(None)
    if response_format is not None and response_format.type == "json_schema":
        return json_schema_grammar(response_format.json_schema.schema_)
    if request.structured_outputs is not None:
        return request.structured_outputs.grammar_text()
    choice = getattr(request, "tool_choice", None)
    if choice == "required":
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
        return tool_call_grammar(tools, parallel=request.parallel_tool_calls is not False)
    if isinstance(choice, NamedToolChoice):
        tools = [
            tool.model_dump(exclude_none=True) for tool in request.tools if tool.function.name == choice.function.name
        ]
        return tool_call_grammar(tools, parallel=False)
    return None


def checked_grammar(request: BaseModel) -> str | None:
    try:
        grammar = requested_grammar(request)
    except ValueError as error:  # a schema that is not JSON, for instance
        raise RequestError(f"structured output: {error}") from None
    if grammar is None:
        return None
    engine_tokenizer = grammar_tokenizer(ENGINE.tokenizer, ENGINE.vocab_size, sorted(ENGINE.eos_token_ids))
    if problem := grammar_error(grammar, engine_tokenizer):
        raise RequestError(f"structured output: the grammar engine refused it: {problem}")
    return grammar


def plan(route: str, request: BaseModel) -> Plan:
    """Render, tokenize, compile the grammar and resolve sampling. Blocking (templates, tokenizers,
    grammars take milliseconds to seconds): the handler runs it on a thread, off the event loop."""
    prompt = render_prompt(request)
    sampling = request.sampling_params if isinstance(request, GenerateRequest) else request
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        sampling = sampling.model_copy(update={"max_tokens": request.max_completion_tokens})
    if isinstance(request, ChatCompletionRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = getattr(request, "logprobs", None)
    grammar = None if isinstance(request, GenerateRequest) else checked_grammar(request)
    params = resolve_sampling(
        sampling,
        prompt.tokens,
        SAMPLING_DEFAULTS,
        CONTEXT_LEN,
        DEFAULT_MAX_TOKENS or CONTEXT_LEN,
        " (MAX_MODEL_LEN)",
        logprobs=logprobs,
        grammar=grammar,
    )
    chat = isinstance(request, ChatCompletionRequest)
    if (floor := logprobs_floor_bytes(params, chat)) > MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES:
        raise RequestError(f"{TOO_LARGE}: its logprobs alone take at least {floor:,} bytes")
    return Plan(
        prompt=prompt,
        params=params,
        parse_tools=chat and bool(request.tools) and request.tool_choice != "none",
        reasoning=REASONING_PARSER if chat else None,
        thinking=prompt_opens_thinking(prompt.text),
        include_reasoning=not chat or request.include_reasoning,
    )


# ---------------------------------------------------------------------------------------------
# 5. Response: textstream.py shapes deltas into native chunks or OpenAI objects (plain JSON only).
# ---------------------------------------------------------------------------------------------
def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate everything before the first yield, then stream.
# ---------------------------------------------------------------------------------------------
def respond(route: str, request: BaseModel, job: Plan, deltas: AsyncIterator[Delta]) -> AsyncIterator[Any]:
    """The chunks this route sends: native ones, or OpenAI's objects (SSE events when streamed)."""
    if route == NATIVE:
        return native_responses(deltas, request.stream)
    if job.parse_tools or job.reasoning:
        deltas = parse_choices(
            deltas,
            tools=job.parse_tools,
            reasoning=job.reasoning,
            thinking=job.thinking,
            include_reasoning=job.include_reasoning,
        )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    shape = OpenAIShape.new(chat=route == CHAT_ROUTE, model=SERVED_MODEL_NAME, logprobs=job.params.logprobs is not None)
    return openai_responses(shape, deltas, bool(request.stream), include_usage)


async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    if VLLM:  # relayed to vLLM's server, which validates and answers the request itself
        try:
            async with contextlib.aclosing(VLLM.handle(job, WORKER_CONFIG)) as relayed:
                async for chunk in within_result_budget(relayed, MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES):
                    yield chunk
        except ResultTooLarge:
            log.warn("Stopped a result at MAX_RESULT_BYTES", job.get("id"))
            yield {"error": TOO_LARGE}
        return
    job_id = job.get("id")
    try:
        route, request = parse_request(job.get("input"))
        if route == MODELS_ROUTE:
            yield models_response()
            return
        planned = await asyncio.to_thread(plan, route, request)
    except (RequestError, ContextLengthError) as error:
        log.warn(f"Rejected request: {error}", job_id)
        yield {"error": str(error)}
        return
    except Exception as error:  # noqa: BLE001 - its message may quote the prompt: the type only, anywhere
        log.error(f"Preparing the request failed: {type(error).__name__}", job_id)
        yield {"error": "the worker could not prepare this request; see the worker logs"}
        return

    prompt, params = planned.prompt, planned.params
    started = time.perf_counter()
    usage: Usage | None = None
    try:
        # aclosing: if the job is cancelled or its consumer leaves, generation stops at once.
        async with contextlib.aclosing(ENGINE.generate(prompt.ids, params)) as deltas:

            async def observed() -> AsyncIterator[Delta]:
                nonlocal usage
                async for delta in deltas:
                    usage = delta.usage or usage
                    yield delta

            # coalesced: the tokens made while the SDK POSTs one chunk go out together in the next.
            # Closed first (aclosing) when the job ends early: its task stops reading `deltas`,
            # which can then be closed too (a generator still being read cannot).
            async with contextlib.aclosing(coalesced(respond(route, request, planned, observed()), merge_text)) as out:
                async for chunk in within_result_budget(out, MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES):
                    yield chunk
    except ResultTooLarge:
        log.warn(f"Stopped a result at MAX_RESULT_BYTES ({prompt.tokens} prompt tokens)", job_id)
        yield {"error": TOO_LARGE}
        return
    except GenerationTimeout as error:
        log.warn(f"{error} (MAX_GENERATION_SECONDS)", job_id)
        yield {"error": f"{error} (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit on the endpoint"}
        return
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the memory back so the next job can run
        log.error(f"Out of GPU memory ({prompt.tokens} prompt tokens, max_tokens {params.max_tokens})", job_id)
        yield {"error": "out of GPU memory for this request; lower max_tokens or shorten the prompt"}
        return
    except torch.AcceleratorError:
        # The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers.
        # A generator cannot return refresh_worker, but the SDK reads the flag from this config
        # after every job, so setting it here retires the worker once this error is delivered.
        WORKER_CONFIG["refresh_worker"] = True
        log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
        yield {"error": "the GPU failed during generation; retry the request"}
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        log.error(f"Generation failed: {type(error).__name__}: {error}", job_id)
        yield {"error": "generation failed inside the worker; see the worker logs"}
        return

    if usage is not None:
        seconds = time.perf_counter() - started
        log.info(
            f"{route}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens in {seconds:.2f}s"
            f" ({usage.completion_tokens / max(seconds, 1e-9):.1f} tokens/s)",
            job_id,
        )


WORKER_CONFIG: dict[str, Any] = {
    "handler": handler,
    "return_aggregate_stream": True,  # /runsync and /status get every chunk, not []
    # Only async handlers run concurrently in the SDK; this sets how many jobs at once.
    "concurrency_modifier": lambda current: VLLM.max_concurrency if VLLM else MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
