"""01_text_generation with ENGINE=vllm, through Runpod's worker loop, against raw vLLM on the same settings.

Runs in the vLLM environment that tests/vllm_cpu.sh builds (vLLM's CPU build cannot share the
main one), from the repository root, on an otherwise idle machine:

    HEAVY_EXCLUSIVE=1 heavy .venv-vllm/bin/python benchmarks/vllm_engine.py \
        [--hidden 512] [--layers 8] [--max-tokens 64] [--concurrency 1 8 32] [--repeats 3] [--post-delay-ms 0]

Four paths serve the same streamed, greedy, `ignore_eos` chat requests (so every request makes
exactly `--max-tokens` tokens), each on its own engine with identical settings, all started at
once and measured alternately, round by round, so a drift in the machine's speed hits them alike:

* raw AsyncLLM: vLLM's engine client in this process, built from the worker's own vLLM server
  arguments exactly as vLLM's OpenAI server builds it (`AsyncEngineArgs.from_cli_args`,
  `build_async_engine_client_from_engine_args`), fed the token ids of the rendered chat;
* raw vLLM server: `python -m vllm.entrypoints.launchers.api_server.entry` with those arguments,
  `/v1/chat/completions` streamed, read by one aiohttp session (what a client on loopback sees);
* worker, native: `python handler.py` (ENGINE=vllm, its own vLLM server as a child process) taking
  jobs from the emulated Runpod job API of tests/shared/runpod_api.py, POSTs answered at once; native
  `{"messages", "sampling_params", "stream": true}` jobs, timed from submission to the arrival of
  the last result;
* worker, OpenAI route: the same worker, `openai_route: /v1/chat/completions` jobs with the raw
  server's exact request body (Runpod's `/openai/v1/...` route), streamed as SSE chunks.

Printed: tokens/s (all requests of a round together) of each path, and the paired ratios (median
of the per-round ratios) that issue 11 (worker vs AsyncLLM, target ≥ 0.9×, at 1, 8 and 32 streams)
and issue 12 (the worker's OpenAI route vs the raw vLLM server, target ≥ 0.95×, at 1 and 8) ask for;
then the CPU time per token of every process outside the engine (this process, vLLM's API server,
the handler) with the worker's tokens per POST, which say where a gap comes from on a small CPU
machine, and the CPU that other people's processes used meanwhile. `--post-delay-ms 50` holds each
of the worker's POSTs as a network round trip to Runpod would. `--sdk-cost` only times, without
vLLM, the runpod SDK's CPU per streamed chunk against the relay's own per-event work.
The model is the random-weight Llama of benchmarks/text_generation.py (its tokenizer has 726 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Light imports only at module level: vLLM spawns its engine-core process, which imports this
# script again (as __mp_main__); everything else happens inside main().
from benchmarks._common import QUIET_ENV as COMMON_QUIET_ENV  # noqa: E402
from benchmarks._common import machine_line, median, paired_ratio, ratio_note, table  # noqa: E402

EXAMPLE = "01_text_generation"
SERVED = "bench-llama"
HOST = "127.0.0.1"
START_TIMEOUT_S = 600  # three vLLM engines starting at once on a 2-core machine
JOB_TIMEOUT_S = 600
# vLLM's CPU engine runs its model in a worker process that, after each step, busy-polls its
# shared-memory queue for one second (shm_broadcast's busy_loop_s) before it sleeps. An engine
# that has just served a round would take a core from the next path's engine for that second:
# each round starts after this pause, when the other engines are idle.
SETTLE_S = 1.5
QUIET_ENV = {
    **COMMON_QUIET_ENV,
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM logs its start-up at INFO; a benchmark prints tables. Set VLLM_LOGGING_LEVEL=INFO to see it.
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
}

ISSUE_11_TARGET = 0.9  # worker tokens/s ÷ raw AsyncLLM's
ISSUE_12_TARGET = 0.95  # the worker's OpenAI route ÷ the raw vLLM server's
ISSUE_12_LEVELS = (1, 8)

RAW_ENGINE = "raw AsyncLLM"
RAW_SERVER = "raw vLLM server"
WORKER_NATIVE = "worker, native"
WORKER_OPENAI = "worker, OpenAI route"
PATHS = (RAW_ENGINE, RAW_SERVER, WORKER_NATIVE, WORKER_OPENAI)
# The processes around the engine (its engine-core and model-worker processes are the engine):
THIS_PROCESS = "this process"  # raw AsyncLLM: the engine client; raw server: the HTTP client; worker: the job API
VLLM_API = "vLLM API server"  # vLLM's OpenAI server process (raw, or the worker's child)
HANDLER = "handler"  # python handler.py: the runpod SDK's job loop and the relay
ROLES = (THIS_PROCESS, VLLM_API, HANDLER)


@dataclass
class Sample:
    seconds: float  # from the first request sent to the last one finished
    tokens: int  # completion tokens of all the round's requests
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds of each process around the engine
    posts: int = 0  # the worker's POSTs to the job API (stream chunks and results)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


Round = Callable[[int], Awaitable[Sample]]  # c requests at once (prompts 0..c-1)


# ---- settings -----------------------------------------------------------------------------------
def worker_env(model: Path, rpc: Path, max_num_seqs: int, max_model_len: int) -> dict[str, str]:
    """The endpoint's environment variables; the raw paths get the vLLM arguments they map to."""
    return {
        **QUIET_ENV,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB each: three engines share this machine
        "VLLM_HOST_IP": HOST,
        "VLLM_RPC_BASE_PATH": str(rpc),
        "MODEL_NAME": str(model),
        "SERVED_MODEL_NAME": SERVED,
        "ENGINE": "vllm",
        "DTYPE": "float32",
        "MAX_MODEL_LEN": str(max_model_len),
        "MAX_NUM_SEQS": str(max_num_seqs),
        "ENFORCE_EAGER": "true",  # no torch.compile: seconds to start instead of minutes
        "DEVICE": "cpu",  # as tests/shared/runpod_api.py's Worker sets it
    }


def import_vllm_server() -> Any:
    """01_text_generation/vllm_server.py: the worker's mapping of its environment to vLLM's flags."""
    folder = str(REPO / EXAMPLE)
    sys.path.insert(0, folder)
    try:
        import vllm_server
    finally:
        sys.path.remove(folder)
    return vllm_server


# ---- the requests -------------------------------------------------------------------------------
def chat_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed OpenAI chat request: greedy, exactly `max_tokens` tokens, usage at the end."""
    return {
        "model": SERVED,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def native_job(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return {"messages": messages, "sampling_params": sampling, "stream": True}


def sse_usage(text: str) -> dict[str, Any]:
    """The usage of a streamed OpenAI answer: its last data event that has one."""
    for event in reversed(text.split("\n\n")):
        if event.startswith("data: {"):
            usage = json.loads(event[len("data: ") :]).get("usage")
            if usage:
                return usage
    raise RuntimeError(f"no usage in the stream's last events: {text[-300:]!r}")


# ---- the paths ----------------------------------------------------------------------------------
def engine_round(llm: Any, prompt_ids: list[list[int]], max_tokens: int) -> Round:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(ids: list[int]) -> int:
        tokens = 0
        async for output in llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
            tokens += len(output.outputs[0].token_ids)
        return tokens

    async def run(c: int) -> Sample:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(prompt_ids[i]) for i in range(c)))
        return Sample(time.perf_counter() - started, sum(counts))

    return run


def server_round(session: Any, url: str, bodies: list[dict[str, Any]]) -> Round:
    async def one(body: dict[str, Any]) -> int:
        parts = []
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"the raw server answered {response.status}: {await response.text()}")
            async for data in response.content.iter_any():
                parts.append(data)
        return sse_usage(b"".join(parts).decode())["completion_tokens"]

    async def run(c: int) -> Sample:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(bodies[i]) for i in range(c)))
        return Sample(time.perf_counter() - started, sum(counts))

    return run


def worker_round(api: Any, inputs: list[dict[str, Any]], tokens_of: Callable[[list[Any]], int]) -> Round:
    """c jobs submitted at once; timed on the job API's clock, to the arrival of the last result."""

    def submit_and_wait(c: int) -> Sample:
        started = time.monotonic()
        ids = [api.submit(inputs[i]) for i in range(c)]
        jobs = [api.wait(job_id, timeout=JOB_TIMEOUT_S) for job_id in ids]
        for job in jobs:
            if job.status != "COMPLETED":
                raise RuntimeError(f"a worker job failed: {job.error}")
        seconds = max(job.result.at for job in jobs) - started
        posts = sum(len(job.stream) + 1 for job in jobs)
        return Sample(seconds, sum(tokens_of(job.output) for job in jobs), posts=posts)

    async def run(c: int) -> Sample:
        return await asyncio.to_thread(submit_and_wait, c)

    return run


def native_tokens(output: list[Any]) -> int:
    return output[-1]["usage"]["completion_tokens"]


def openai_tokens(output: list[Any]) -> int:
    return sse_usage("".join(output))["completion_tokens"]


# ---- measuring ----------------------------------------------------------------------------------
def cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(
    rounds: dict[str, Round], frontends: dict[str, dict[str, Any]], levels: list[int], repeats: int
) -> dict[str, dict[int, list[Sample]]]:
    """samples[path][c]: a warm-up round of every path, then per level `repeats` rounds of each,
    the paths' order rotated from round to round, each round after SETTLE_S of quiet. Each sample
    also has the CPU time that the path's processes outside the engine (`frontends[path]`, by
    role) used during the round."""
    samples: dict[str, dict[int, list[Sample]]] = {name: {c: [] for c in levels} for name in rounds}
    names = list(rounds)
    for name in names:  # warm-up, with every prompt (vLLM's prefix cache then holds them all on every path)
        await asyncio.sleep(SETTLE_S)
        await rounds[name](max(levels))
    for c in levels:
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                await asyncio.sleep(SETTLE_S)
                before = {role: cpu_seconds(process) for role, process in frontends[name].items()}
                sample = await rounds[name](c)
                sample.cpu_s = {role: cpu_seconds(process) - before[role] for role, process in frontends[name].items()}
                samples[name][c].append(sample)
        rates = ", ".join(f"{name} {median([s.rate for s in samples[name][c]]):.0f}" for name in names)
        print(f"  {c} at once: {rates} tok/s", flush=True)
    return samples


def others_cpu(here: Any) -> dict[int, float]:
    """CPU seconds so far of every process outside this benchmark's tree (other people's work)."""
    import psutil

    ours = {here.pid, *(child.pid for child in here.children(recursive=True))}
    seconds = {}
    for process in psutil.process_iter():
        if process.pid not in ours:
            with contextlib.suppress(psutil.Error):
                seconds[process.pid] = cpu_seconds(process)
    return seconds


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the raw vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no /health from the raw vLLM server in {timeout:g}s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def ratio_rows(samples: dict[str, dict[int, list[Sample]]], levels: list[int]) -> list[list[object]]:
    def ratio(a: str, b: str, c: int) -> float:
        return paired_ratio([s.rate for s in samples[a][c]], [s.rate for s in samples[b][c]])

    rows: list[list[object]] = []
    for c in levels:
        comparisons = [
            (WORKER_NATIVE, RAW_ENGINE, ISSUE_11_TARGET, "11"),
            (WORKER_OPENAI, RAW_ENGINE, ISSUE_11_TARGET, "11"),
            (WORKER_OPENAI, RAW_SERVER, ISSUE_12_TARGET if c in ISSUE_12_LEVELS else None, "12"),
            (WORKER_NATIVE, RAW_SERVER, None, ""),
            (RAW_SERVER, RAW_ENGINE, None, ""),
        ]
        for a, b, target, issue in comparisons:
            value = ratio(a, b, c)
            note = f"issue {issue}: {ratio_note(value, target, True)}" if target else ""
            rows.append([c, f"{a} ÷ {b}", f"{value:.2f}×", note])
    return rows


# ---- the runpod SDK's share ---------------------------------------------------------------------
SDK_COST_CHUNKS = 2000
# One chunk as the relay streams it on the OpenAI route: a whole server-sent event of one token.
SSE_EVENT = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"bench-llama",'
    '"choices":[{"index":0,"delta":{"content":" word"},"logprobs":null,"finish_reason":null}]}\n\n'
)


async def sdk_chunk_cost(chunks: int) -> None:
    """CPU of the handler's event loop per streamed chunk: the runpod SDK's `handle_job` (wrapping,
    JSON, one POST per chunk to the emulated job API, which runs on another thread), then the
    relay's own splitting of vLLM's byte stream into events and `coalesced`, without any network."""
    os.environ.update(QUIET_ENV)  # the SDK's log level (WARN, as the worker runs here) is read at import
    import aiohttp
    from runpod.serverless.modules import rp_http, rp_job

    from tests.shared.runpod_api import JobAPI

    sys.path.insert(0, str(REPO / EXAMPLE))
    try:
        from coalesce import coalesced, merge_text
        from vllm_server import split_events
    finally:
        sys.path.remove(str(REPO / EXAMPLE))

    async def generator(job: dict[str, Any]) -> Any:
        for _ in range(chunks):
            yield SSE_EVENT

    with JobAPI() as api:
        # The SDK reads its URLs at import; point them at this job API.
        urls = {name: value.replace("$RUNPOD_POD_ID", "bench") for name, value in api.env().items()}
        rp_http.JOB_DONE_URL = urls["RUNPOD_WEBHOOK_POST_OUTPUT"]
        rp_http.JOB_STREAM_URL = urls["RUNPOD_WEBHOOK_POST_STREAM"]
        job_id = api.submit({})
        config = {"handler": generator, "return_aggregate_stream": True}
        async with aiohttp.ClientSession() as session:
            started, cpu = time.perf_counter(), time.thread_time()
            await rp_job.handle_job(session, config, {"id": job_id, "input": {}})
            sdk_cpu, wall = time.thread_time() - cpu, time.perf_counter() - started
        posts = len(api.jobs[job_id].stream)

    data = SSE_EVENT.encode()

    async def events() -> Any:
        buffer = b""
        for _ in range(chunks):
            complete, buffer = split_events(buffer + data)
            for event in complete:
                yield event

    cpu = time.thread_time()
    async for _ in coalesced(events(), merge_text):
        pass
    relay_cpu = time.thread_time() - cpu
    print(
        f"runpod SDK handle_job: {chunks} chunks in {posts} stream POSTs, {sdk_cpu / chunks * 1000:.3f} ms of the "
        f"event loop's CPU per chunk ({wall / chunks * 1000:.3f} ms wall, the job API's thread included)\n"
        f"relay's split_events + coalesced: {relay_cpu / chunks * 1000:.3f} ms of CPU per event"
    )


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Llama (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="length of each user message (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="streams at once (1 8 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path and level, median (default 3)")
    parser.add_argument(
        "--post-delay-ms",
        type=float,
        default=0,
        help="the job API holds each POST this long (default 0; 50: a network)",
    )
    parser.add_argument(
        "--sdk-cost",
        action="store_true",
        help="only time the runpod SDK's work per streamed chunk and the relay's own, without vLLM",
    )
    args = parser.parse_args(argv)
    if args.sdk_cost:
        asyncio.run(sdk_chunk_cost(SDK_COST_CHUNKS))
        return 0
    if importlib.util.find_spec("vllm") is None:
        parser.exit(2, "vLLM is not installed here: run this with .venv-vllm/bin/python (bash tests/vllm_cpu.sh)\n")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as out:
        status = asyncio.run(run(args, Path(out)))
    gc.collect()  # the AsyncLLM goes now, while its __del__ still has what it needs, not at exit
    return status


async def run(args: argparse.Namespace, out: Path) -> int:
    os.environ.update(QUIET_ENV)  # before runpod and vLLM read them (vLLM sets up its logging on import)
    import aiohttp
    import psutil
    import vllm
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.usage.usage_lib import UsageContext

    from benchmarks.text_generation import build_model, make_messages

    from tests.shared.harness import base_env
    from tests.shared.runpod_api import JobAPI, Worker

    levels = sorted(set(args.concurrency))
    most = max(levels)
    print(f"Building a random Llama: hidden {args.hidden}, {args.layers} layers ...", flush=True)
    model = build_model(out, args.hidden, args.layers)
    rpc = out / "rpc"
    rpc.mkdir()
    # Room for the longest prompt (prompt_tokens + most - 1, plus the template's tokens) and its answer.
    max_model_len = args.prompt_tokens + most + args.max_tokens + 64
    env = worker_env(model, rpc, max_num_seqs=most, max_model_len=max_model_len)
    os.environ.update({name: value for name, value in env.items() if name.startswith("VLLM_")})  # the raw engines'
    server_args = import_vllm_server().checked_argv(env)  # exactly what the worker gives its vLLM server

    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [make_messages(tokenizer, args.prompt_tokens + index) for index in range(most)]
    # As vLLM's chat route tokenizes: the rendered template, its special tokens already in the text.
    prompt_ids = [
        tokenizer(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        for m in messages
    ]
    bodies = [chat_body(m, args.max_tokens) for m in messages]

    print(f"Machine: {machine_line()}")
    print(
        f"vLLM {vllm.__version__} (CPU build); random Llama, hidden {args.hidden}, {args.layers} layers, float32, "
        f"eager; vLLM arguments (all three engines): {' '.join(server_args)}\n"
        f"prompts {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens (distinct per concurrent request), "
        f"{args.max_tokens} tokens each (greedy, ignore_eos), streamed; median of {args.repeats} rounds after a "
        "warm-up",
        flush=True,
    )

    port = free_port()
    url = f"http://{HOST}:{port}"
    server_log = out / "raw-server.log"
    print("Starting the raw vLLM server, the raw AsyncLLM and the worker ...", flush=True)
    address = ["--host", HOST, "--port", str(port)]
    with server_log.open("w") as log_file:
        raw_server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *server_args, *address],
            env=base_env(**env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        parsed = import_vllm_server().vllm_parser().parse_args(server_args)
        engine_args = AsyncEngineArgs.from_cli_args(parsed)
        async with build_async_engine_client_from_engine_args(
            engine_args, usage_context=UsageContext.OPENAI_API_SERVER
        ) as llm:
            with JobAPI(post_delay_s=args.post_delay_ms / 1000) as api:
                worker = await asyncio.to_thread(Worker, EXAMPLE, api, env, START_TIMEOUT_S)
                try:
                    await asyncio.to_thread(wait_healthy, url, raw_server, server_log, START_TIMEOUT_S)
                    connector = aiohttp.TCPConnector(limit=0)
                    timeout = aiohttp.ClientTimeout(total=JOB_TIMEOUT_S)
                    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                        rounds = {
                            RAW_ENGINE: engine_round(llm, prompt_ids, args.max_tokens),
                            RAW_SERVER: server_round(session, url, bodies),
                            WORKER_NATIVE: worker_round(
                                api, [native_job(m, args.max_tokens) for m in messages], native_tokens
                            ),
                            WORKER_OPENAI: worker_round(
                                api,
                                [{"openai_route": "/v1/chat/completions", "openai_input": b} for b in bodies],
                                openai_tokens,
                            ),
                        }
                        here = psutil.Process()
                        handler = psutil.Process(worker.process.pid)
                        relayed_to = next(p for p in handler.children() if "vllm_server.py" in " ".join(p.cmdline()))
                        worker_side = {THIS_PROCESS: here, VLLM_API: relayed_to, HANDLER: handler}
                        frontends = {
                            RAW_ENGINE: {THIS_PROCESS: here},
                            RAW_SERVER: {THIS_PROCESS: here, VLLM_API: psutil.Process(raw_server.pid)},
                            WORKER_NATIVE: worker_side,
                            WORKER_OPENAI: worker_side,
                        }
                        print("All three are serving; measuring:", flush=True)
                        before = others_cpu(here)
                        started = time.monotonic()
                        samples = await measure(rounds, frontends, levels, args.repeats)
                        measured_s = time.monotonic() - started
                        after = others_cpu(here)  # processes that ended meanwhile are missed
                        others_cpu_s = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
                        prompt_check = await check_prompt_tokens(session, url, bodies[0], prompt_ids[0])
                finally:
                    worker.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(raw_server.pid, 15)
        try:
            raw_server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(raw_server.pid, 9)

    expected = {c: c * args.max_tokens for c in levels}
    counts_ok = all(s.tokens == expected[c] for by_c in samples.values() for c in by_c for s in by_c[c])
    print(f"\nChecks: every round made exactly c × {args.max_tokens} tokens on every path: {counts_ok}")
    print(f"        {prompt_check}\n")

    rows = []
    for c in levels:
        for name in PATHS:
            rates = [s.rate for s in samples[name][c]]
            seconds = [s.seconds for s in samples[name][c]]
            rows.append([c, name, expected[c], f"{median(seconds):.3f}", f"{median(rates):.1f}", f"{max(rates):.1f}"])
    print("Streamed tokens per second, all the round's requests together (higher is better)")
    print(table(["at once", "path", "tokens", "median s", "tok/s", "best tok/s"], rows) + "\n")
    print("Ratios of tokens/s, median of the per-round ratios (paths alternated)")
    print(table(["at once", "ratio", "value", "target"], ratio_rows(samples, levels)) + "\n")
    cpu_rows = []
    for c in levels:
        for name in PATHS:
            per_token = {
                role: median([s.cpu_s[role] / s.tokens for s in samples[name][c]]) * 1000
                for role in ROLES
                if role in samples[name][c][0].cpu_s
            }
            cells = [f"{per_token[role]:.2f}" if role in per_token else "" for role in ROLES]
            posts = median([s.tokens / s.posts for s in samples[name][c]]) if samples[name][c][0].posts else None
            cpu_rows.append([c, name, *cells, f"{sum(per_token.values()):.2f}", f"{posts:.1f}" if posts else ""])
    print(
        "CPU ms per generated token outside the engine (its engine-core and model processes), by process: "
        "on a 2-core machine\nthe engine's own processes use both cores while it generates, so this is time "
        "taken from the engine"
    )
    print(table(["at once", "path", *ROLES, "total", "tokens per POST"], cpu_rows))
    print(
        f"\nOther processes on the machine (not this benchmark's) used {others_cpu_s:.1f} CPU-seconds during the "
        f"{measured_s:.0f} s of measurement ({others_cpu_s / measured_s / (os.cpu_count() or 1):.0%} of its CPUs)"
    )
    return 0 if counts_ok else 1


async def check_prompt_tokens(session: Any, url: str, body: dict[str, Any], ids: list[int]) -> str:
    """The raw AsyncLLM's token ids are what vLLM's chat route makes of the same messages."""
    async with session.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 1}) as response:
        served = sse_usage((await response.read()).decode())["prompt_tokens"]
    verdict = "same" if served == len(ids) else "DIFFER"
    return f"prompt tokens of the first request, raw AsyncLLM {len(ids)}, the chat route {served}: {verdict}"


if __name__ == "__main__":
    sys.exit(main())
