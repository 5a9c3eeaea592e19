"""04's CLIP through Runpod's real job loop: classify and embed throughput by jobs in flight.

The worker runs as in production (`python handler.py`, the runpod SDK's job loop, its default
`MAX_CONCURRENCY`) against the emulated job API of `tests/shared/runpod_api.py`. Unlike
`multimodal.py`'s batching rows, which call the handler with `asyncio.gather` and so skip the SDK's
cap on jobs in flight, here the SDK decides how many jobs run at once, as on an endpoint.

For each kind (`classify`: one 640x480 JPEG and `--labels` labels; `embed`: one image) it measures:

* one at a time: `--sequential` jobs, each submitted when the previous one has its result;
* N in flight, for N in `--jobs` (1, 8, 32, 128): N jobs queued at once, timed from the queueing
  to the last result, `--rounds` times (median); the batcher's forward passes per round are read
  from the worker's log;
* one perfect batch: the raw model on the N inputs at once, in this process (the processor on the
  decoded images and the captions, one forward pass, the softmax for classify), timed
  `--rounds`, each right after a round of the jobs (the ratio is the median of the paired ratios):
  what batching can reach at best, with no job loop, no JSON and no JPEG decoding.

Printed per row: jobs/s, and the ratios to one at a time (higher is better) and to the perfect
batch (1.00× would be a free job loop). Ratios are labels, never assertions.

    python benchmarks/clip_job_loop.py            # the tiny CLIP of tests/shared/tiny_models/
    python benchmarks/clip_job_loop.py --shape base   # random weights in clip-vit-base-patch32's shape
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import QUIET_ENV, machine_line, median, paired_ratio, table
from benchmarks.multimodal import LABELS, build_clip, photo_uri

from tests.shared.runpod_api import JobAPI, Worker

# The batcher logs every forward-pass round it makes (clip_batcher.py): counted per round.
BATCH_LINE = re.compile(r"Encoded a batch of (\d+) encodes")
JOBS_IN_FLIGHT = (1, 8, 32, 128)
HEADERS = ["kind", "jobs", "jobs/s", "forward-pass rounds", "vs one at a time", "vs one perfect batch"]


def requests(uri: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    return {
        f"classify ({len(labels)} labels)": {"task": "classify", "image": uri, "labels": labels},
        "embed (one image)": {"task": "embed", "images": [uri]},
    }


class RawModel:
    """The checkpoint itself, loaded in this process: one perfect batch of N jobs' inputs."""

    def __init__(self, folder: Path, labels: list[str], uri: str) -> None:
        import base64
        import io

        from PIL import Image
        from transformers import AutoModel, AutoProcessor

        self.model = AutoModel.from_pretrained(folder).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.captions = [f"a photo of a {label}." for label in labels]  # the handler's default template
        data = base64.b64decode(uri.split(",", 1)[1])
        self.image = Image.open(io.BytesIO(data)).convert("RGB")  # decoded once: the raw side is spared it

    def run(self, kind: str, jobs: int) -> float:
        import torch

        images = [self.image] * jobs
        started = time.perf_counter()
        with torch.inference_mode():
            if kind.startswith("classify"):
                inputs = self.processor(text=self.captions, images=images, return_tensors="pt", padding=True)
                self.model(**inputs).logits_per_image.softmax(dim=-1).tolist()
            else:
                inputs = self.processor(images=images, return_tensors="pt")
                torch.nn.functional.normalize(self.model.get_image_features(**inputs).pooler_output, dim=-1).tolist()
        return time.perf_counter() - started


def burst(api: JobAPI, worker: Worker, request: dict[str, Any], jobs: int) -> tuple[float, int]:
    """`jobs` jobs queued at once: seconds from the queueing to the last result, and forward-pass rounds."""
    log_before = len(worker.output())
    started = time.monotonic()
    ids = api.submit_many([request] * jobs)
    done = [api.wait(job_id, timeout=600) for job_id in ids]
    failed = [job.error for job in done if job.status != "COMPLETED"]
    if failed:
        raise SystemExit(f"{len(failed)} of {jobs} jobs failed: {failed[:3]}\n{worker.output()[-3000:]}")
    seconds = max(job.result.at for job in done) - started
    return seconds, len(BATCH_LINE.findall(worker.output()[log_before:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "base"), default="tiny", help="tiny CLIP or ViT-B/32's shape")
    parser.add_argument("--labels", type=int, default=10, help="labels per classify job")
    parser.add_argument("--jobs", type=int, nargs="*", default=list(JOBS_IN_FLIGHT), help="jobs in flight")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement (median)")
    parser.add_argument("--sequential", type=int, default=16, help="jobs in the one-at-a-time baseline")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="bench-clip-loop-"))
    folder = build_clip(out, tiny=args.shape == "tiny")
    uri, jpeg_bytes = photo_uri()
    labels = LABELS[: args.labels]
    raw = RawModel(folder, labels, uri)
    print(machine_line())
    params = sum(p.numel() for p in raw.model.parameters())
    print(
        f"CLIP ({args.shape}): {params / 1e6:.1f}M parameters, random weights, float32 on CPU; input a 640x480 JPEG "
        f"({jpeg_bytes / 1024:.0f} KiB) as a data URI; the worker at its default MAX_CONCURRENCY; medians of "
        f"{args.rounds} rounds\n",
        flush=True,
    )
    env = {**QUIET_ENV, "MODEL_NAME": str(folder), "RUNPOD_LOG_LEVEL": "INFO"}  # INFO: the batcher's lines
    rows: list[list[object]] = []
    with JobAPI() as api, Worker("04_multimodal", api, env) as worker:
        for kind, request in requests(uri, labels).items():
            for _ in range(3):  # warm-up: the first passes allocate
                api.run(request)
            burst(api, worker, request, max(args.jobs))
            raw.run(kind, max(args.jobs))
            started = time.monotonic()
            for _ in range(args.sequential):
                job = api.run(request)
                assert job.status == "COMPLETED", job.error
            one_at_a_time = args.sequential / (time.monotonic() - started)
            rows.append([kind, "one at a time", f"{one_at_a_time:.1f}", "1 a job", "1.00×", ""])
            for jobs in args.jobs:
                timed, perfect = [], []
                for _ in range(args.rounds):  # alternated, so a busier moment hits both sides
                    timed.append(burst(api, worker, request, jobs))
                    perfect.append(raw.run(kind, jobs))
                seconds = [elapsed for elapsed, _ in timed]
                throughput = jobs / median(seconds)
                rows.append(
                    [
                        kind,
                        f"{jobs} in flight",
                        f"{throughput:.1f}",
                        f"{median([rounds for _, rounds in timed]):.0f}",
                        f"{throughput / one_at_a_time:.2f}×",
                        f"{paired_ratio(perfect, seconds):.2f}× ({jobs / median(perfect):.1f} jobs/s)",
                    ]
                )
            print(table(HEADERS, rows[-len(args.jobs) - 1 :]) + "\n", flush=True)
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
