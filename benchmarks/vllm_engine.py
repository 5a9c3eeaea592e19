"""Benchmark 01_text_generation's handler with ENGINE=vllm against vLLM's AsyncLLM called directly.

Runs in the vLLM environment that tests/vllm_cpu.sh builds (vLLM's CPU build cannot share the
main one), from the repository root:

    .venv-vllm/bin/python benchmarks/vllm_engine.py [--max-tokens 64] [--concurrency 1 8] [--repeats 5]

Tokens per second, greedy, at 1 and 8 requests at once: native streaming chat requests through
the handler (its VLLMEngine: the chat template and our tokenization, the engine on its own event
loop thread, deltas bridged back to the caller's loop) against `AsyncLLM.generate` on the same
token ids with the same SamplingParams (greedy, deltas, plus ignore_eos, which the handler cannot
set: the script checks that both generated the same number of tokens and the same text). Target
≥ 0.9×. Two raw references:

* the handler's own AsyncLLM, called directly on the event loop it serves (a coroutine submitted
  to that loop), alternated with the handler request by request: the same engine and model in
  the same run, so the ratio is a median of back-to-back paired ratios, as in the other
  benchmarks;
* a separate AsyncLLM with the same engine settings (the handler's own `vllm_engine_args`), built
  and used inside one asyncio.run() after the handler's engine is shut down (only one engine fits
  a small machine comfortably). Measured after the handler, not interleaved with it, so its ratio
  is a ratio of medians and exposed to drift in the machine's speed; it shows that an engine on
  the handler's thread serves as fast as a plain one. `--skip-separate` leaves it out.

The model is the random-weight Llama of benchmarks/text_generation.py (hidden 512, 8 layers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Light imports only at module level: vLLM's engine core process is spawned and imports this
# script again (as __mp_main__); everything else happens inside main().
from benchmarks._common import QUIET_ENV as COMMON_QUIET_ENV  # noqa: E402
from benchmarks._common import machine_line, median, paired_ratio, ratio_note, table  # noqa: E402

EXAMPLE = "01_text_generation"
QUIET_ENV = {
    **COMMON_QUIET_ENV,
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM logs its start-up at INFO; a benchmark prints tables. Set VLLM_LOGGING_LEVEL=INFO to see it.
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
}

Call = Callable[[], Awaitable[tuple[int, str]]]  # one request: (completion tokens, text)


@dataclass
class Sample:
    seconds: float  # wall time of the whole batch of concurrent requests
    tokens: list[int]  # completion tokens of each request
    texts: list[str]

    @property
    def rate(self) -> float:
        return sum(self.tokens) / self.seconds


async def gather_timed(calls: list[Call]) -> Sample:
    started = time.perf_counter()
    results = await asyncio.gather(*(call() for call in calls))
    return Sample(time.perf_counter() - started, [r[0] for r in results], [r[1] for r in results])


def handler_call(module: ModuleType, messages: list[dict[str, str]], max_tokens: int) -> Call:
    """One native streaming chat request through the handler, driven directly."""
    job = {
        "id": "bench",
        "input": {
            "messages": messages,
            "sampling_params": {"temperature": 0, "max_tokens": max_tokens},
            "stream": True,
        },
    }

    async def call() -> tuple[int, str]:
        parts, usage = [], None
        async with contextlib.aclosing(module.handler(job)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    raise RuntimeError(f"the handler failed: {chunk!r}")
                parts.append(chunk.get("text", ""))
                usage = chunk.get("usage") or usage
        return usage["completion_tokens"], "".join(parts)

    return call


def raw_call(llm: Any, prompt_ids: list[int], params: Any) -> Call:
    """One `AsyncLLM.generate` on token ids, streamed as deltas; must run on the loop `llm` serves."""
    from vllm.inputs import TokensPrompt

    async def call() -> tuple[int, str]:
        tokens, parts = 0, []
        async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
            tokens += len(output.outputs[0].token_ids)
            parts.append(output.outputs[0].text)
        return tokens, "".join(parts)

    return call


Runner = Callable[[list[Call]], Sample]  # runs one batch of concurrent calls on the right loop


def measure(paths: dict[str, tuple[Runner, Callable[[int], Call]]], concurrency: list[int], repeats: int) -> dict:
    """samples[path][c]: for each concurrency c, a warm-up of every path, then `repeats` rounds of
    c requests at once (prompts 0..c-1) on each path, in alternating order."""
    samples: dict[str, dict[int, list[Sample]]] = {name: {c: [] for c in concurrency} for name in paths}
    for c in concurrency:
        batches = {name: (run, [make(index) for index in range(c)]) for name, (run, make) in paths.items()}
        for run, batch in batches.values():
            run(batch)  # warm-up
        for repeat in range(repeats):
            for name in list(batches) if repeat % 2 == 0 else list(reversed(batches)):  # drift hits both alike
                run, batch = batches[name]
                samples[name][c].append(run(batch))
    return samples


def separate_engine(
    engine_args: dict[str, Any], calls: Callable[[Any], Callable[[int], Call]], concurrency: list[int], repeats: int
) -> tuple[float, dict[int, list[Sample]]]:
    """(engine start seconds, samples[c]) of a fresh AsyncLLM that lives and serves inside this one asyncio.run()."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main() -> tuple[float, dict[int, list[Sample]]]:
        started = time.perf_counter()
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        start_s = time.perf_counter() - started
        try:
            make = calls(llm)
            samples: dict[int, list[Sample]] = {c: [] for c in concurrency}
            for c in concurrency:
                batch = [make(index) for index in range(c)]
                await gather_timed(batch)  # warm-up
                for _ in range(repeats):
                    samples[c].append(await gather_timed(batch))
            return start_s, samples
        finally:
            llm.shutdown()

    return asyncio.run(main())


def import_engines() -> ModuleType:
    """01_text_generation/engines.py, for its vllm_engine_args: the settings the handler gives vLLM."""
    folder = str(REPO / EXAMPLE)
    sys.path.insert(0, folder)
    try:
        import engines
    finally:
        sys.path.remove(folder)
    return engines


def handler_engine_args(module: ModuleType) -> dict[str, Any]:
    """The engine settings the loaded handler passed to vLLM (its load_engine's call, with its values)."""
    return module.vllm_engine_args(
        module.MODEL_NAME,
        revision=module.MODEL_REVISION,
        tokenizer_name=module.TOKENIZER_NAME,
        dtype=module.DTYPE,
        quantization=module.QUANTIZATION,
        max_model_len=module.MAX_MODEL_LEN,
        gpu_memory_utilization=module.GPU_MEMORY_UTILIZATION,
        tensor_parallel_size=module.TENSOR_PARALLEL_SIZE,
        max_num_seqs=module.MAX_NUM_SEQS,
        enforce_eager=module.ENFORCE_EAGER,
        trust_remote_code=module.TRUST_REMOTE_CODE,
        download_dir=module.cached_hub_folder(module.MODEL_NAME),
    )


def handler_run(
    env: dict[str, str],
    messages: list[list[dict[str, str]]],
    prompt_ids: list[list[int]],
    engine_args: dict[str, Any],
    params: Any,
    args: argparse.Namespace,
) -> tuple[float, dict[str, dict[int, list[Sample]]], list[str]]:
    """Load the handler (its engine starts), measure it alternated with its own AsyncLLM called directly,
    shut the engine down: (handler start seconds, samples[path][c], checks)."""
    from tests.harness import load_handler

    print("Starting the handler's engine (import handler) ...", flush=True)
    started = time.perf_counter()
    module = load_handler(EXAMPLE, env)
    start_s = time.perf_counter() - started
    engine = module.ENGINE
    try:
        # What the handler's engine hands vLLM for each chat: its own rendering and tokenization.
        handler_ids = [engine._prompt_ids(engine.render_chat(m, False), is_chat=True) for m in messages]
        checks = [
            f"handler's engine settings equal the separate engine's: {handler_engine_args(module) == engine_args}",
            f"handler's prompt token ids equal the raw prompts: {handler_ids == prompt_ids}",
        ]
        with asyncio.Runner() as runner:

            def on_engine_loop(batch: list[Call]) -> Sample:
                return asyncio.run_coroutine_threadsafe(gather_timed(batch), engine.loop).result()

            paths = {
                "raw": (on_engine_loop, lambda i: raw_call(engine.engine, prompt_ids[i], params)),
                "handler": (
                    lambda batch: runner.run(gather_timed(batch)),
                    lambda i: handler_call(module, messages[i], args.max_tokens),
                ),
            }
            samples = measure(paths, args.concurrency, args.repeats)
    finally:
        engine.shutdown()  # on the engine's own loop, as vLLM expects
        # Forget the handler when this returns: an AsyncLLM left for the interpreter's exit fails in its __del__.
        sys.modules.pop(module.__name__, None)
    print("Handler measured; its engine is shut down.", flush=True)
    return start_s, samples, checks


def rate_row(c: int, label: str, samples: list[Sample], ratio: float | None) -> list[object]:
    seconds = [s.seconds for s in samples]
    return [
        c,
        label,
        sum(samples[0].tokens),
        f"{median(seconds):.3f}",
        f"{min(seconds):.3f}",
        f"{median([s.rate for s in samples]):.1f}",
        "1.00×" if ratio is None else f"{ratio:.2f}×",
        "" if ratio is None else ratio_note(ratio, 0.9, True),
    ]


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Llama (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="length of each user message (default 128)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests at once (default 1 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per measurement, median (default 5)")
    parser.add_argument("--skip-separate", action="store_true", help="skip the separate raw engine")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("vllm") is None:
        parser.exit(2, "vLLM is not installed here: run this with .venv-vllm/bin/python (bash tests/vllm_cpu.sh)\n")
    os.environ.update(QUIET_ENV)  # before runpod and vLLM read them (vLLM sets up its logging on import)
    import vllm
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from benchmarks.text_generation import build_model, make_messages

    from tests.test_vllm_engine import vllm_cpu_env

    max_seqs = max(args.concurrency)
    # The handler's request (temperature 0, max_tokens) as vLLM parameters, plus ignore_eos.
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as out:
        print(f"Building a random Llama: hidden {args.hidden}, {args.layers} layers ...", flush=True)
        model_dir = build_model(Path(out), args.hidden, args.layers)
        rpc = Path(out) / "rpc"
        rpc.mkdir()
        env = {**vllm_cpu_env(model_dir, rpc), "MAX_NUM_SEQS": str(max(8, max_seqs))}
        # The separate engine's process reads the same VLLM_* variables: the whole run has them.
        os.environ.update({name: value for name, value in env.items() if name.startswith("VLLM_")})
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        messages = [make_messages(tokenizer, args.prompt_tokens + index) for index in range(max_seqs)]
        # As the handler's engine tokenizes a chat: the rendered template, no second BOS.
        prompt_ids = [
            tokenizer(
                tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            for m in messages
        ]
        engine_args = import_engines().vllm_engine_args(
            str(model_dir),
            revision=None,
            tokenizer_name=None,
            dtype=env["DTYPE"],
            quantization=None,
            max_model_len=int(env["MAX_MODEL_LEN"]),
            gpu_memory_utilization=0.9,
            tensor_parallel_size=1,
            max_num_seqs=int(env["MAX_NUM_SEQS"]),
            enforce_eager=True,
            trust_remote_code=False,
            download_dir=None,
        )

        print(f"Machine: {machine_line()}")
        print(
            f"vLLM {vllm.__version__} (CPU build); model: random Llama, hidden {args.hidden}, {args.layers} layers, "
            f"float32, max_model_len {env['MAX_MODEL_LEN']}, max_num_seqs {env['MAX_NUM_SEQS']}, eager; prompts "
            f"{min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens (distinct per concurrent request), "
            f"max_tokens {args.max_tokens}, greedy; median of {args.repeats} samples after a warm-up\n",
            flush=True,
        )

        handler_start_s, samples, checks = handler_run(env, messages, prompt_ids, engine_args, params, args)
        gc.collect()  # the handler's AsyncLLM goes now, while its __del__ still has what it needs

        separate: dict[int, list[Sample]] = {}
        if not args.skip_separate:
            print("Starting a separate AsyncLLM ...", flush=True)
            separate_start_s, separate = separate_engine(
                engine_args,
                lambda llm: lambda i: raw_call(llm, prompt_ids[i], params),
                args.concurrency,
                args.repeats,
            )
            print("Separate engine measured and shut down.", flush=True)
        print()

    # -- checks
    everything = {**samples, **({"separate": separate} if separate else {})}
    counts = {name: sorted({n for c in by_c for s in by_c[c] for n in s.tokens}) for name, by_c in everything.items()}
    same_text = all(
        s.texts == samples["raw"][c][0].texts for by_c in everything.values() for c in by_c for s in by_c[c]
    )
    checks += [
        "completion tokens per request: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
        + f" (max_tokens {args.max_tokens})",
        f"same text from every path for every prompt and repeat: {same_text}",
    ]
    print("Checks:\n  " + "\n  ".join(checks) + "\n")
    if len({tuple(count) for count in counts.values()}) > 1:
        print("WARNING: the handler stopped at an eos token before max_tokens: compare tokens/s, not times\n")

    # -- tokens per second
    rows: list[list[object]] = []
    for c in args.concurrency:
        raw, handler = samples["raw"][c], samples["handler"][c]
        rows.append(rate_row(c, "raw: the handler's AsyncLLM.generate", raw, None))
        rows.append(rate_row(c, "handler", handler, paired_ratio([s.rate for s in handler], [s.rate for s in raw])))
    print("Streamed tokens per second, all requests together (higher is better): same engine, alternated")
    print(table(["at once", "path", "tokens", "median s", "best s", "tok/s", "vs raw", "note"], rows) + "\n")

    if separate:
        rows = []
        for c in args.concurrency:
            base = median([s.rate for s in separate[c]])
            rows.append(rate_row(c, "raw: separate AsyncLLM, one asyncio.run", separate[c], None))
            for label, name in (("raw: the handler's AsyncLLM.generate", "raw"), ("handler", "handler")):
                ratio = median([s.rate for s in samples[name][c]]) / base
                row = rate_row(c, label, samples[name][c], ratio)
                rows.append(row if name == "handler" else row[:-1])
        print("Against a separate engine measured afterwards (ratios of medians, not paired)")
        print(table(["at once", "path", "tokens", "median s", "best s", "tok/s", "vs separate", "note"], rows) + "\n")
        start_rows = [
            ["separate: AsyncLLM.from_engine_args", f"{separate_start_s:.1f}", "1.00×"],
            [
                "handler: import handler (tokenizer + engine)",
                f"{handler_start_s:.1f}",
                f"{handler_start_s / separate_start_s:.2f}×",
            ],
        ]
        print("Engine start, once each (the handler's was this process's first vLLM start)")
        print(table(["start", "seconds", "vs separate"], start_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
