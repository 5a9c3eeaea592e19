"""Streaming through Runpod's real worker loop: how much a slow network costs a streamed job.

Each worker runs as in production (`python handler.py`, the runpod SDK's job loop) against the
emulated job API of `tests/shared/runpod_api.py`, which holds every POST for 0 ms, then 50 ms (a
network round trip between a worker and Runpod). The SDK awaits each stream POST before it asks
for the next chunk, so a job's time is bounded below by POSTs × round trip unless the worker sends
what piled up meanwhile in one POST (`coalesce.py`). Printed per workload: the job's time (from
the take to the result) at each delay, the POST counts, and the ratio slow ÷ fast.

    python benchmarks/worker_loop.py                         # 01 (transformers), 02, 04
    .venv-vllm/bin/python benchmarks/worker_loop.py --only vllm   # 01 on vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import QUIET_ENV, machine_line, median, ratio_note, table

from tests.shared import tiny_models
from tests.shared.runpod_api import JobAPI, Worker

SLOW_NETWORK_S = 0.05


@dataclass
class Workload:
    name: str
    example: str
    model_kind: str
    job: dict[str, Any]
    target: float  # slow ÷ fast time, at most
    env: dict[str, str]


def workloads(tokens: int, steps: int) -> dict[str, Workload]:
    text_job = {
        "prompt": "Once upon a time",
        "sampling_params": {"max_tokens": tokens, "temperature": 1.0, "seed": 11, "ignore_eos": True},
        "stream": True,
    }
    image = json.loads((Path(__file__).parents[1] / "04_multimodal" / "test_input.json").read_text())["input"]["image"]
    return {
        "text": Workload("01 text, transformers", "01_text_generation", "llama", text_job, 1.3, {}),
        "vllm": Workload(
            "01 text, vLLM",
            "01_text_generation",
            "llama",
            text_job,
            1.3,
            {
                "ENGINE": "vllm",
                "ENFORCE_EAGER": "true",
                "DTYPE": "float32",
                "MAX_MODEL_LEN": "2048",
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
            },
        ),
        "image": Workload(
            "02 image, progress",
            "02_image_generation",
            "sd15",
            {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": steps, "seed": 5},
            1.2,
            {},
        ),
        "multimodal": Workload(
            "04 answer, LLaVA",
            "04_multimodal",
            "llava",
            {
                "task": "answer",
                "image": image,
                "question": "What is in the picture?",
                "sampling_params": {"max_tokens": min(tokens, 96), "temperature": 1.0, "seed": 3},
                "stream": True,
            },
            1.3,
            {},
        ),
    }


def measure(workload: Workload, repeats: int) -> list[Any]:
    model = tiny_models.build(workload.model_kind, tempfile.mkdtemp(prefix=f"bench-{workload.model_kind}-"))
    env = {**QUIET_ENV, "MODEL_NAME": str(model), **workload.env}
    times: dict[float, list[float]] = {0.0: [], SLOW_NETWORK_S: []}
    posts: dict[float, int] = {}
    with JobAPI() as api, Worker(workload.example, api, env) as worker:
        first = api.run(workload.job)  # warm-up
        if first.status != "COMPLETED":
            raise SystemExit(f"{workload.name}: {first.error}\n{worker.output()[-2000:]}")
        for repeat in range(repeats):
            order = (0.0, SLOW_NETWORK_S) if repeat % 2 == 0 else (SLOW_NETWORK_S, 0.0)
            for delay in order:
                api.post_delay_s = delay
                job = api.run(workload.job)
                api.post_delay_s = 0.0
                assert job.status == "COMPLETED", job.error
                times[delay].append(job.seconds)
                posts[delay] = len(job.stream) + 1  # the stream POSTs and the result
        units = chunk_units(first.chunks)
    fast, slow = median(times[0.0]), median(times[SLOW_NETWORK_S])
    ratio = slow / fast
    return [
        workload.name,
        units,
        f"{fast * 1000:.0f} ms / {posts[0.0]}",
        f"{slow * 1000:.0f} ms / {posts[SLOW_NETWORK_S]}",
        f"{ratio:.2f}×",
        ratio_note(ratio, workload.target, higher_is_better=False),
    ]


def chunk_units(chunks: list[Any]) -> str:
    last = chunks[-1] if chunks else {}
    if isinstance(last, dict) and "usage" in last:
        return f"{last['usage']['completion_tokens']} tokens"
    if isinstance(last, dict) and "images" in last:
        progress = sum(1 for c in chunks if isinstance(c, dict) and c.get("status") == "progress")
        return f"{progress} progress chunks (0 ms)"
    return f"{len(chunks)} chunks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens of the text streams")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps of the image job")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["text", "image", "multimodal"], help="text vllm image multimodal")
    args = parser.parse_args()
    chosen = workloads(args.tokens, args.steps)
    print(machine_line())
    rows = [measure(chosen[name], args.repeats) for name in args.only]
    headers = ["workload", "size", "0 ms: time / POSTs", "50 ms: time / POSTs", "slow ÷ fast", "target"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
