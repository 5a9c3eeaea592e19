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

import contextlib
import importlib.util
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import runpod
import torch
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from textstream import (
    ContextLengthError,
    Delta,
    GenerationTimeout,
    OpenAIShape,
    Usage,
    native_responses,
    openai_responses,
    resolve_sampling,
)

from engines import Engine, load_transformers_engine, load_vllm_engine, vllm_engine_args
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
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 4)
# Completion length when a request names none: long enough for a real answer (OpenAI's
# completions default of 16 tokens silently truncates), short enough to bound a forgotten limit.
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 512)
# Seconds one generation may run: well under Runpod's default execution timeout (600 s), so a
# runaway request ends with an answer instead of a killed job. 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 300.0)
# vLLM only. It reserves GPU_MEMORY_UTILIZATION of the GPU up front, for the weights and a paged
# KV cache shared by all running requests; 0.9 leaves room for CUDA's own allocations.
GPU_MEMORY_UTILIZATION = env_float("GPU_MEMORY_UTILIZATION", 0.9)
TENSOR_PARALLEL_SIZE = env_int("TENSOR_PARALLEL_SIZE", 1)  # GPUs one model is split across
MAX_NUM_SEQS = env_int("MAX_NUM_SEQS", 256)  # sequences batched per step: vLLM's own default
ENFORCE_EAGER = env_str("ENFORCE_EAGER", "false").lower() in ("1", "true", "yes")  # no CUDA graphs: faster start

# Limits of the request schema (OpenAI's own where it has one).
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # a stop string longer than this is a mistake, and holding it back delays streaming
MAX_MESSAGES = 1024  # far beyond any real conversation; bounds the work of rendering the template
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 2.0  # above 2 output degrades into noise
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
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
    if kind == "vllm":
        args = vllm_engine_args(
            MODEL_NAME,
            revision=MODEL_REVISION,
            tokenizer_name=TOKENIZER_NAME,
            dtype=DTYPE,
            quantization=QUANTIZATION,
            max_model_len=MAX_MODEL_LEN,
            gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
            tensor_parallel_size=TENSOR_PARALLEL_SIZE,
            max_num_seqs=MAX_NUM_SEQS,
            enforce_eager=ENFORCE_EAGER,
            trust_remote_code=TRUST_REMOTE_CODE,
            download_dir=cached_hub_folder(MODEL_NAME),
        )
        return load_vllm_engine(
            args,
            tokenizer_cache_dir=cached_hub_folder(TOKENIZER_NAME or MODEL_NAME),
            time_limit_s=MAX_GENERATION_SECONDS or None,
        )
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


# vLLM's engine core runs in a process started with multiprocessing's "spawn", which imports this
# file again as __mp_main__: that process must not load a second engine.
IN_ENGINE_PROCESS = __name__ == "__mp_main__"
_load_started = time.perf_counter()
ENGINE_KIND = choose_engine(ENGINE_NAME, importlib.util.find_spec("vllm") is not None, torch.cuda.is_available())
ENGINE: Engine | None = None if IN_ENGINE_PROCESS else load_engine(ENGINE_KIND)
CONTEXT_LEN = ENGINE.max_model_len if ENGINE else 1
SAMPLING_DEFAULTS = ENGINE.sampling_defaults if ENGINE else {}  # what the model's generation_config.json recommends
LOADED_AT = int(time.time())
if ENGINE:
    log.info(
        f"Loaded {MODEL_NAME} with {ENGINE_KIND} ({QUANTIZATION or DTYPE}) in "
        f"{time.perf_counter() - _load_started:.1f}s: context {CONTEXT_LEN} tokens, chat template: "
        f"{'yes' if ENGINE.has_chat_template else 'no'}, sampling defaults: {SAMPLING_DEFAULTS or 'none'}"
    )


# ---------------------------------------------------------------------------------------------
# 3. Request schema: the single source of truth for names, defaults and limits.
# ---------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


def unsupported(feature: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{feature} is not supported by this worker{hint}")


MaxTokens = Annotated[int, Field(ge=1, le=CONTEXT_LEN)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1)]  # -1 and 0 both mean "no top-k", as in vLLM
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=MAX_REPETITION_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
StopList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)
]
PromptText = Annotated[str, Field(min_length=1, max_length=CONTEXT_LEN * CHARS_PER_TOKEN_BOUND)]


def _one_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # "name" and other OpenAI extras are harmless
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new name for system
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in value):
            raise unsupported("non-text content", "; this worker serves a text-only model")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class Sampling(BaseModel):
    """Sampling fields shared by every route; None means the model's default (or the usual one)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: StopList | None = None
    seed: Seed | None = None

    _stop_as_list = field_validator("stop", mode="before")(_one_as_list)


class GenerateRequest(BaseModel):
    """The native request."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt field is an error, not ignored
    prompt: PromptText | None = None
    messages: Messages | None = None
    sampling_params: Sampling = Sampling()
    stream: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "send exactly one of prompt or messages")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIRequest(Sampling):
    """Fields common to OpenAI's chat and text completions. Unknown fields are ignored, as
    OpenAI-compatible servers do; features this worker lacks are refused, never silently dropped."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None  # one endpoint serves one model, whatever the name says
    # OpenAI accepts null for every optional field, so these do too (null = the default).
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise unsupported(f"n={value}", "; send one request per choice (n must be 1)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_openai_penalties(cls, value: float | None, info: Any) -> float | None:
        if value:
            raise unsupported(f"{info.field_name} other than 0", "; use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise unsupported("logit_bias")
        return value


class ChatCompletionRequest(OpenAIRequest):
    messages: Messages
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise unsupported("logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise unsupported("tool calling (tools, tool_choice)")
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported("response_format other than text")
        return self


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

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
        if self.best_of not in (None, 1):
            raise unsupported(f"best_of={self.best_of}")
        if self.logprobs is not None:
            raise unsupported("logprobs")
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
# 4. Prompt and sampling: the chat template, the context check, the model's defaults.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    text: str
    is_chat: bool
    tokens: int


def render_prompt(request: BaseModel) -> Prompt:
    """The text the model reads: the chat template applied to messages, or the raw prompt."""
    messages = getattr(request, "messages", None)
    if messages is None:
        prompt = request.prompt if isinstance(request, GenerateRequest) else request.prompt[0]
        return Prompt(prompt, False, ENGINE.count_prompt_tokens(prompt, is_chat=False))
    if not ENGINE.has_chat_template:
        raise RequestError(f"{MODEL_NAME} has no chat template: send a raw prompt instead of messages")
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    characters = sum(len(turn["content"]) for turn in turns)
    if characters > CONTEXT_LEN * CHARS_PER_TOKEN_BOUND:
        raise RequestError(
            f"messages: {characters} characters cannot fit the {CONTEXT_LEN}-token context (MAX_MODEL_LEN)"
        )
    try:
        # A conversation ending with an assistant turn asks the model to continue that turn.
        text = ENGINE.render_chat(turns, continue_final_message=turns[-1]["role"] == "assistant")
    except TemplateError as error:  # the template's own rules, e.g. "roles must alternate user/assistant"
        raise RequestError(f"messages: the model's chat template refused them: {error}") from None
    return Prompt(text, True, ENGINE.count_prompt_tokens(text, is_chat=True))


# ---------------------------------------------------------------------------------------------
# 5. Response: textstream.py shapes deltas into native chunks or OpenAI objects (plain JSON only).
# ---------------------------------------------------------------------------------------------
def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------------------------------
# 6. The handler: validate everything before the first yield, then stream.
# ---------------------------------------------------------------------------------------------
def respond(route: str, request: BaseModel, deltas: AsyncIterator[Delta]) -> AsyncIterator[Any]:
    """The chunks this route sends: native ones, or OpenAI's objects (SSE events when streamed)."""
    if route == NATIVE:
        return native_responses(deltas, request.stream)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    shape = OpenAIShape.new(chat=route == CHAT_ROUTE, model=SERVED_MODEL_NAME)
    return openai_responses(shape, deltas, bool(request.stream), include_usage)


async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    job_id = job.get("id")
    try:
        route, request = parse_request(job.get("input"))
        if route == MODELS_ROUTE:
            yield models_response()
            return
        prompt = render_prompt(request)
        sampling = request.sampling_params if isinstance(request, GenerateRequest) else request
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
            sampling = sampling.model_copy(update={"max_tokens": request.max_completion_tokens})
        params = resolve_sampling(
            sampling, prompt.tokens, SAMPLING_DEFAULTS, CONTEXT_LEN, DEFAULT_MAX_TOKENS, " (MAX_MODEL_LEN)"
        )
    except (RequestError, ContextLengthError) as error:
        log.warn(f"Rejected request: {error}", job_id)
        yield {"error": str(error)}
        return

    started = time.perf_counter()
    usage: Usage | None = None
    try:
        # aclosing: if the job is cancelled or its consumer leaves, generation stops at once.
        async with contextlib.aclosing(ENGINE.generate(prompt.text, prompt.is_chat, params)) as deltas:

            async def observed() -> AsyncIterator[Delta]:
                nonlocal usage
                async for delta in deltas:
                    usage = delta.usage or usage
                    yield delta

            async for chunk in respond(route, request, observed()):
                yield chunk
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
    "concurrency_modifier": lambda current: MAX_CONCURRENCY,
}

if __name__ == "__main__":
    WORKER_CONFIG["handler"] = for_local_run(handler)
    runpod.serverless.start(WORKER_CONFIG)
