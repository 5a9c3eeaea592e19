"""LLM text generation on Runpod Serverless: streaming, OpenAI-compatible, optionally quantized.

One worker serves one causal language model three ways:
  * native:        {"input": {"messages": [...] | "prompt": "...", "sampling_params": {...}, "stream": true}}
  * OpenAI chat:   {"input": {"openai_route": "/v1/chat/completions", "openai_input": {...}}}
  * OpenAI text:   {"input": {"openai_route": "/v1/completions", "openai_input": {...}}}
    (Runpod sends the OpenAI shapes for https://api.runpod.ai/v2/<endpoint>/openai/v1/...)

The handler is an async generator: each chunk reaches `/stream` as soon as it is made, and
`return_aggregate_stream=True` also gives `/runsync` the whole list. The file reads top to
bottom: configuration, model load, request, inference, response, start. What grew past a tour
has a module of its own beside it: the request schema (schema.py), the prompt and grammar pieces
(planning.py), the engine (engines.py), token streaming (textstream.py), structured output
(structured_output.py), the response shapes (response_shapes.py) and the error contract (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import hub_cache  # first, before every library: settles the Hugging Face cache (hub_cache.py)

import device  # then the CUDA contract: DEVICE, or the worker stops here (device.py)

import runpod
import torch
from jinja2 import TemplateError
from pydantic import BaseModel

import schema
from coalesce import ResultTooLarge, coalesced, merge_answer, within_result_budget
from cold_start import COLD_START
from engines import TransformersEngine, load_transformers_engine
from errors import (
    BAD_REQUEST,
    INTERNAL,
    UNAVAILABLE,
    RequestError,
    error_shape,
    failed,
    gpu_lost,
    out_of_memory,
    rejected,
)
from local_run import for_local_run
from openai_tools import REASONING_PARSERS, parse_choices, prompt_opens_thinking
from planning import Plan, Prompt, chat_turn, checked_grammar, conversation
from response_shapes import OpenAIShape, closing_chunks, logprobs_floor_bytes, native_responses, openai_responses
from schema import (
    CHARS_PER_TOKEN_BOUND,
    CHAT_ROUTE,
    MODELS_ROUTE,
    NATIVE,
    ChatCompletionRequest,
    GenerateRequest,
    ModelLimits,
    Sampling,
)
from settings import env_float, env_int, env_str
from textstream import ContextLengthError, Delta, GenerationTimeout, Usage, resolve_sampling
from vllm_launch import vllm_installed
from vllm_server import VLLMServer, server_environment, start_vllm_server

log = runpod.RunPodLogger()


# ---------------------------------------------------------------------------------------------
# 1. Configuration: read once from the environment, each default with its reason.
# ---------------------------------------------------------------------------------------------
# settings.py reads each variable (env_int, env_str, ...): unset or empty, it is the default.

# Qwen2.5-0.5B-Instruct: a real instruct model with a chat template and a 32k context, ungated
# (no HF_TOKEN needed), 1 GB in bf16: it deploys on any GPU and still answers on CPU.
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MODEL_NAME = env_str("MODEL_NAME", DEFAULT_MODEL)  # a Hub id or a local folder
MODEL_REVISION = env_str("MODEL_REVISION", None)  # a commit hash makes deployments reproducible
TOKENIZER_NAME = env_str("TOKENIZER_NAME", None)  # when the tokenizer lives in another repo
# The id /v1/models lists; OPENAI_SERVED_MODEL_NAME_OVERRIDE is worker-vllm's name for it.
if env_str("OPENAI_SERVED_MODEL_NAME_OVERRIDE", None) and env_str("SERVED_MODEL_NAME", None):
    raise ValueError("OPENAI_SERVED_MODEL_NAME_OVERRIDE and SERVED_MODEL_NAME both set the served name: set one")
SERVED_MODEL_NAME = env_str("OPENAI_SERVED_MODEL_NAME_OVERRIDE", None) or env_str("SERVED_MODEL_NAME", MODEL_NAME)
# A chat template in place of the model's (a file's path, or the Jinja itself), on both engines.
CUSTOM_CHAT_TEMPLATE = env_str("CUSTOM_CHAT_TEMPLATE", None)
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
# Seconds one generation may run. Runpod fails a job that passes the endpoint's execution timeout
# (600 s by default) and stops its worker; this ends the answer 30 s before, with what was
# generated and finish_reason "length", leaving time to deliver it. Raise both together (a
# reasoning model's long answers): this = execution timeout - 30. 0 turns the limit off.
MAX_GENERATION_SECONDS = env_float("MAX_GENERATION_SECONDS", 570.0)
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

# The request's own limits (stop strings, messages, temperature, ...) are fixed constants beside
# the request schema (schema.py); the model's (context length, vocabulary) are known once it loads.

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


def load_engine(kind: str) -> TransformersEngine:
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
        chat_template=CUSTOM_CHAT_TEMPLATE,
    )


COLD_START.done("imports")  # the download is timed apart from the load
hub_cache.prefetch(MODEL_NAME, TOKENIZER_NAME, revision=MODEL_REVISION, remote_code=TRUST_REMOTE_CODE)
COLD_START.done("download")
_load_started = time.perf_counter()
ENGINE_KIND = choose_engine(ENGINE_NAME, vllm_installed(VLLM_PYTHON), device.DEVICE == "cuda")
if ENGINE_KIND == "transformers" and REASONING_PARSER not in (None, *REASONING_PARSERS):
    raise ValueError(
        f"REASONING_PARSER must be one of {', '.join(REASONING_PARSERS)} on the transformers engine,"
        f" got {REASONING_PARSER!r}"
    )
# ENGINE=vllm: vLLM's own OpenAI server answers every job (vllm_server.py), so nothing below the
# handler's first lines runs; the request, inference and response steps are the transformers engine's.
VLLM: VLLMServer | None = (
    start_vllm_server(
        MAX_GENERATION_SECONDS or None,
        VLLM_PYTHON,
        server_environment(os.environ, MODEL_NAME, cached_hub_folder(MODEL_NAME)),
        DEFAULT_MAX_TOKENS,
    )
    if ENGINE_KIND == "vllm"
    else None
)
ENGINE: TransformersEngine | None = None if VLLM else load_engine(ENGINE_KIND)
# What a request may ask of this model, handed to the request schema as its validation context:
# prompt + completion tokens, and the token ids it may name (the tokenizer's vocabulary). vLLM's
# server checks its own requests, so with ENGINE=vllm there are none here.
LIMITS = ModelLimits(context_len=ENGINE.max_model_len, vocab_size=len(ENGINE.tokenizer)) if ENGINE else None
CONTEXT_LEN = LIMITS.context_len if LIMITS else None
SAMPLING_DEFAULTS = ENGINE.sampling_defaults if ENGINE else {}  # what the model's generation_config.json recommends
LOADED_AT = int(time.time())
if ENGINE:
    log.info(
        f"Loaded {MODEL_NAME} with {ENGINE_KIND} ({QUANTIZATION or DTYPE}) in "
        f"{time.perf_counter() - _load_started:.1f}s: context {CONTEXT_LEN} tokens, chat template: "
        f"{'yes' if ENGINE.has_chat_template else 'no'}, sampling defaults: {SAMPLING_DEFAULTS or 'none'}"
    )
    COLD_START.report(f"load to {device.DEVICE}")


# ---------------------------------------------------------------------------------------------
# 3. Request: schema.py holds the pydantic models, the single source of truth for names, defaults
#    and limits; the loaded model's own limits reach them as pydantic's validation context.
# ---------------------------------------------------------------------------------------------
# GenerateRequest (native), ChatCompletionRequest and CompletionRequest (OpenAI) are strict:
# "max_tokens": "9" is an error, not coerced. An unknown field is an error naming it (OpenAI's
# harmless ones, like user, pass), and a vLLM feature this worker lacks is refused, never silently
# dropped. The error is one line naming each field ("sampling_params.top_p: Input should be ...").
def parse_request(job_input: Any) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request), within this model's limits. No I/O."""
    return schema.parse_request(job_input, LIMITS)


# ---------------------------------------------------------------------------------------------
# 4. Inference: the prompt, the grammar and the sampling decided before the first chunk
#    (planning.py holds the pieces); the engine then generates (engines.py).
# ---------------------------------------------------------------------------------------------
def render_prompt(request: BaseModel) -> Prompt:
    """The text the model reads: the chat template applied to messages, or the raw prompt."""
    messages = getattr(request, "messages", None)
    if messages is None:
        prompt = request.prompt if isinstance(request, GenerateRequest) else request.prompt[0]
        return Prompt(prompt, False, ENGINE.tokenize(prompt, is_chat=False))
    if not ENGINE.has_chat_template:
        raise RequestError(f"{MODEL_NAME} has no chat template: send a raw prompt instead of messages")
    turns = [chat_turn(index, message) for index, message in enumerate(messages)]
    turns = conversation(turns, str(ENGINE.tokenizer.chat_template))  # developer turns, as vLLM reads them
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


def plan(route: str, request: BaseModel) -> Plan:
    """Render, tokenize, compile the grammar and resolve sampling. Blocking (templates, tokenizers,
    grammars take milliseconds to seconds): the handler runs it on a thread, off the event loop."""
    prompt = render_prompt(request)
    sampling: Sampling = request.sampling_params if isinstance(request, GenerateRequest) else request
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        sampling = sampling.model_copy(update={"max_tokens": request.max_completion_tokens})
    if isinstance(request, ChatCompletionRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = getattr(request, "logprobs", None)
    grammar = None if isinstance(request, GenerateRequest) else checked_grammar(request, ENGINE)
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
# 5. Response: response_shapes.py shapes deltas into native chunks or OpenAI objects (plain JSON only).
# ---------------------------------------------------------------------------------------------
def models_response() -> dict[str, Any]:
    model = {"id": SERVED_MODEL_NAME, "object": "model", "created": LOADED_AT, "owned_by": "runpod"}
    return {"object": "list", "data": [model]}


def openai_shape(route: str, job: Plan) -> OpenAIShape:
    """The OpenAI object one job's chunks share (its id, creation time and model)."""
    return OpenAIShape.new(chat=route == CHAT_ROUTE, model=SERVED_MODEL_NAME, logprobs=job.params.logprobs is not None)


def respond(
    route: str, request: BaseModel, job: Plan, shape: OpenAIShape, deltas: AsyncIterator[Delta]
) -> AsyncIterator[Any]:
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
    return openai_responses(shape, deltas, bool(request.stream), include_usage)


# ---------------------------------------------------------------------------------------------
# 6. Start: the handler validates everything before the first yield, then streams; the SDK runs it.
# ---------------------------------------------------------------------------------------------
async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    if VLLM:  # relayed to vLLM's server, which validates and answers the request itself
        relayed = VLLM.handle(job, WORKER_CONFIG, MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES, TOO_LARGE)
        async with contextlib.aclosing(relayed) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    job_id = job.get("id")
    shaped = error_shape(job.get("input"))
    try:
        route, request = parse_request(job.get("input"))
        if route == MODELS_ROUTE:
            yield models_response()
            return
        planned = await asyncio.to_thread(plan, route, request)
    except (RequestError, ContextLengthError) as error:
        yield shaped(rejected(error, job_id), BAD_REQUEST)
        return
    except Exception as error:  # noqa: BLE001 - its message may quote the prompt: the type only, anywhere
        log.error(f"Preparing the request failed: {type(error).__name__}", job_id)
        yield shaped({"error": "the worker could not prepare this request; see the worker logs"}, INTERNAL)
        return

    prompt, params = planned.prompt, planned.params
    shape = openai_shape(route, planned)
    started = time.perf_counter()
    usage: Usage | None = None
    finished: set[int] = set()  # the choices that ended
    ended: set[int] = set()  # the choices whose end reached the caller
    sent = False  # whether a chunk reached the caller: then a limit ends the answer, not the job
    try:
        # aclosing: if the job is cancelled or its consumer leaves, generation stops at once.
        async with contextlib.aclosing(ENGINE.generate(prompt.ids, params)) as deltas:

            async def observed() -> AsyncIterator[Delta]:
                nonlocal usage
                async for delta in deltas:
                    usage = delta.usage or usage
                    if delta.finish_reason:
                        finished.add(delta.index)
                    yield delta

            # coalesced: the tokens made while the SDK POSTs one chunk go out together in the next.
            # Closed first (aclosing) when the job ends early: its task stops reading `deltas`,
            # which can then be closed too (a generator still being read cannot).
            chunks = respond(route, request, planned, shape, observed())
            async with contextlib.aclosing(coalesced(chunks, merge_answer)) as out:
                async for chunk in within_result_budget(out, MAX_RESULT_BYTES - RESULT_ENVELOPE_BYTES):
                    # An end is in this chunk or an earlier one: the coalescer queues each chunk in the
                    # step that observed its delta. One held back by the limit never reached the caller.
                    sent, ended = True, set(finished)
                    yield chunk
    except ResultTooLarge:
        log.warn(f"Stopped a result at MAX_RESULT_BYTES ({prompt.tokens} prompt tokens)", job_id)
        if not sent:  # one whole answer that cannot be delivered
            yield shaped({"error": TOO_LARGE}, BAD_REQUEST)
            return
        # A stream keeps what it sent and ends as max_tokens would end it, naming the limit.
        unfinished = [index for index in range(params.n) if index not in ended]
        for chunk in closing_chunks(None if route == NATIVE else shape, unfinished, "MAX_RESULT_BYTES"):
            yield chunk
        return
    except GenerationTimeout as error:
        log.warn(f"{error} (MAX_GENERATION_SECONDS)", job_id)
        message = f"{error} (MAX_GENERATION_SECONDS): lower max_tokens, or raise the limit on the endpoint"
        yield shaped({"error": message}, INTERNAL)
        return
    except torch.cuda.OutOfMemoryError:  # this job fails, the memory goes back, the next job runs
        oom = f"Out of GPU memory ({prompt.tokens} prompt tokens, max_tokens {params.max_tokens})"
        message = "out of GPU memory for this request; lower max_tokens or shorten the prompt"
        yield shaped(out_of_memory(oom, message, job_id), INTERNAL)
        return
    except torch.AcceleratorError:  # the GPU is lost: this worker retires once the error is delivered
        yield shaped(
            gpu_lost("the GPU failed during generation; retry the request", job_id, WORKER_CONFIG), UNAVAILABLE
        )
        return
    except Exception as error:  # noqa: BLE001 - the caller gets a message, the log gets the details
        message = "generation failed inside the worker; see the worker logs"
        yield shaped(failed("Generation", error, message, job_id), INTERNAL)
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
