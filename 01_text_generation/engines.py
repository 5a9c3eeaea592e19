"""Generation engines behind one small interface, so the handler never depends on a library.

An engine takes a prompt (text the chat template already produced, or a raw completion prompt)
and sampling parameters, and streams `Delta`s (see textstream.py): text that is safe to show,
then a last delta with the finish reason and token usage. `TransformersEngine` runs Hugging Face
transformers anywhere; `VLLMEngine` runs vLLM (imported only when chosen: the CUDA image has it).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from textstream import Delta, GenerationTimeout, SamplingParams, StreamingGenerator, Usage, recommended_sampling


class Engine(Protocol):
    """What the handler needs from an engine."""

    max_model_len: int
    has_chat_template: bool
    sampling_defaults: dict[str, Any]  # the model's recommended temperature, top_p, ... if it has any

    def render_chat(self, messages: list[dict[str, str]], continue_final_message: bool) -> str: ...

    def count_prompt_tokens(self, prompt: str, is_chat: bool) -> int: ...

    def generate(self, prompt: str, is_chat: bool, params: SamplingParams) -> AsyncIterator[Delta]: ...


class HuggingFacePrompts:
    """Prompt handling both engines share: the model's own chat template and tokenizer, so the
    same request is the same token sequence whichever engine runs it."""

    tokenizer: Any

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


@dataclass
class TransformersEngine(HuggingFacePrompts):
    """`AutoModelForCausalLM` with the model's chat template, streamed by `StreamingGenerator`."""

    model: Any
    tokenizer: Any
    max_model_len: int
    max_concurrency: int
    eos_token_ids: set[int] = field(default_factory=set)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float | None = None  # per generation

    def __post_init__(self) -> None:
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.generator = StreamingGenerator(
            self.model, self.tokenizer, self.eos_token_ids, self.max_concurrency, self.time_limit_s
        )

    @property
    def active(self) -> int:
        """Generations running now."""
        return self.generator.active

    def generate(self, prompt: str, is_chat: bool, params: SamplingParams) -> AsyncIterator[Delta]:
        input_ids = torch.tensor([self._prompt_ids(prompt, is_chat)], device=self.generator.device)
        return self.generator.generate({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, params)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str, cuda: bool) -> torch.dtype:
    """DTYPE=auto: bf16 on GPUs that have it (Ampere and newer), else fp16; fp32 on CPU."""
    if name not in ("auto", *DTYPES):
        raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
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


def load_tokenizer(
    model_name: str, tokenizer_name: str | None, revision: str | None, trust_remote_code: bool, cache_dir: str | None
) -> Any:
    """The model's tokenizer, or TOKENIZER_NAME's; both engines tokenize and template with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        tokenizer_name or model_name,
        revision=None if tokenizer_name else revision,  # MODEL_REVISION names a commit of the model's repo
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
    )


def load_transformers_engine(
    model_name: str,
    *,
    revision: str | None,
    tokenizer_name: str | None,
    dtype: str,
    quantization: str | None,
    max_model_len: int | None,
    max_concurrency: int,
    time_limit_s: float | None,
    trust_remote_code: bool,
    cache_dir: str | None,
    tokenizer_cache_dir: str | None,
) -> TransformersEngine:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    compute_dtype = torch_dtype(dtype, cuda)
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    tokenizer = load_tokenizer(model_name, tokenizer_name, revision, trust_remote_code, tokenizer_cache_dir)
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
        time_limit_s=time_limit_s,
        eos_token_ids=eos_ids,
    )


# ---------------------------------------------------------------------------------------------
# vLLM: continuous batching and a paged KV cache (the production engine on GPUs)
# ---------------------------------------------------------------------------------------------
VLLM_QUANTIZATION = {"awq": "awq", "gptq": "gptq", "fp8": "fp8", "bnb-4bit": "bitsandbytes"}


def vllm_engine_args(
    model_name: str,
    *,
    revision: str | None,
    tokenizer_name: str | None,
    dtype: str,
    quantization: str | None,
    max_model_len: int | None,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    max_num_seqs: int,
    enforce_eager: bool,
    trust_remote_code: bool,
    download_dir: str | None,
) -> dict[str, Any]:
    """The environment's settings as vLLM `AsyncEngineArgs` keywords. Pure: no vLLM import."""
    if quantization and quantization not in VLLM_QUANTIZATION:
        raise ValueError(
            f"QUANTIZATION={quantization} is not available on the vLLM engine; use one of "
            f"{', '.join(VLLM_QUANTIZATION)} (bnb-8bit needs ENGINE=transformers)"
        )
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"DTYPE must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return {
        "model": model_name,
        "revision": revision,
        "tokenizer": tokenizer_name,
        "dtype": dtype,
        "quantization": VLLM_QUANTIZATION.get(quantization or ""),
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": enforce_eager,
        "trust_remote_code": trust_remote_code,
        "download_dir": download_dir,
        "disable_log_stats": True,  # per-request stats would log at INFO on every step
    }


class VLLMEngine(HuggingFacePrompts):
    """vLLM's `AsyncLLM`, run on an event loop of its own, behind the same interface.

    An AsyncLLM serves only the event loop it first ran on (it starts its output handler there
    once), while Runpod's loop, tests and local runs may each bring their own. So the engine lives
    on a daemon thread's loop, and each generation is bridged to it: the request runs there and its
    deltas come back through a queue; leaving early aborts the request in the engine.
    """

    def __init__(self, engine_args: dict[str, Any], tokenizer: Any, time_limit_s: float | None) -> None:
        from transformers import GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.time_limit_s = time_limit_s
        self.active = 0  # generations running now
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True).start()

        async def build() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))

        try:
            self.engine = asyncio.run_coroutine_threadsafe(build(), self.loop).result()
        except Exception as error:
            raise ValueError(f"vLLM refused the engine settings: {type(error).__name__}: {error}") from error
        self.max_model_len = self.engine.model_config.max_model_len
        written = self.engine.model_config.try_get_generation_config()  # the model's generation_config.json
        self.sampling_defaults = recommended_sampling(GenerationConfig.from_dict(written)) if written else {}

    def shutdown(self) -> None:
        """Stop the engine from its own loop, where its output task lives (from any other thread,
        vLLM stops the engine core first and that task logs a dead engine on its way out)."""

        async def stop() -> None:
            self.engine.shutdown()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result()

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,  # vLLM's "no top-k"
            repetition_penalty=params.repetition_penalty,
            stop=list(params.stop) or None,
            seed=params.seed,
            output_kind=RequestOutputKind.DELTA,  # each output carries only the new tokens
        )

    async def generate(self, prompt: str, is_chat: bool, params: SamplingParams) -> AsyncIterator[Delta]:
        import asyncio

        from vllm.inputs import TokensPrompt

        # Our own tokenization, as the transformers engine does it: a rendered chat template already
        # holds its BOS, so vLLM must not add another.
        prompt_ids = self._prompt_ids(prompt, is_chat)
        request_id = uuid.uuid4().hex
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        async def pump() -> None:  # runs on the engine's loop
            try:
                async for output in self.engine.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), self._sampling(params), request_id
                ):
                    caller.call_soon_threadsafe(queue.put_nowait, output)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting job below
                caller.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                caller.call_soon_threadsafe(queue.put_nowait, done)

        self.active += 1
        running = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        deadline = caller.time() + self.time_limit_s if self.time_limit_s else None
        completion_tokens, finished = 0, False
        try:
            while True:
                remaining = None if deadline is None else max(deadline - caller.time(), 0)
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    raise GenerationTimeout(f"generation stopped at its {self.time_limit_s:g}-second limit") from None
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                completion = item.outputs[0]
                completion_tokens += len(completion.token_ids)
                if completion.text:
                    yield Delta(text=completion.text)
                if item.finished:
                    finished = True
                    reason = "length" if completion.finish_reason == "length" else "stop"
                    yield Delta(finish_reason=reason, usage=Usage(len(prompt_ids), completion_tokens))
        finally:
            self.active -= 1
            if not finished:  # cancelled, abandoned, timed out or failed: free the engine's slot
                running.cancel()
                asyncio.run_coroutine_threadsafe(self.engine.abort(request_id), self.loop)


def load_vllm_engine(
    engine_args: dict[str, Any], *, tokenizer_cache_dir: str | None, time_limit_s: float | None
) -> VLLMEngine:
    tokenizer = load_tokenizer(
        engine_args["model"],
        engine_args["tokenizer"],
        engine_args["revision"],
        engine_args["trust_remote_code"],
        tokenizer_cache_dir,
    )
    return VLLMEngine(engine_args, tokenizer, time_limit_s)
