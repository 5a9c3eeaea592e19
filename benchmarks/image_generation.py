"""Benchmark 02_image_generation's handler against the raw diffusers pipeline on the same model.

Two measurements, each printed as absolute numbers and as a ratio to the raw library measured in
the same run (targets are labels, never assertions):

* images per second: one job of one image with a fixed seed, driving the handler's async
  generator to its final chunk (progress chunks, then the encoded image), against the raw call
  `TEXT2IMAGE(prompt, width, height, num_inference_steps, guidance_scale, generator=...)` with the
  same settings on the handler's own loaded pipeline (target ≥ 0.95×). The handler is timed
  twice: driven directly on one event loop, and through the runpod SDK's `run_job_generator` with
  the JSON check on every chunk (the loop of tests.shared.harness.run_job_async);
* output encoding: png, jpeg and webp (at the handler's default quality) of the generated image,
  as milliseconds per image and as a share of the raw generation time;
* progress over a slow network: `python handler.py` serving the emulated Runpod job API
  (tests/shared/runpod_api.py), a 30-step 256² job with 0 ms and with 50 ms per POST, the time from the
  worker taking the job to its result arriving, and the stream POSTs it made (target: 50 ms
  within 1.2× of 0 ms: superseded progress is dropped, never queued).

* more models and modes (`--more`, on by default): a FLUX.1 [schnell] job and a job with a LoRA
  adapter, each against the raw pipeline with the same settings (and the same adapter active),
  target ≥ 0.95×; and four images batched (`"batch": true`) against four one by one, with how far
  each batched image is from its solo run.

The model is the tiny SD 1.5 pipeline of tests/shared/tiny_models/ (real layout, scheduler and VAE
depth, tiny widths), float32 on CPU: the absolute numbers say nothing about a real model's speed,
only the ratios do.

    python benchmarks/image_generation.py [--size 512] [--steps 8] [--repeats 7] [--network-repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
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

EXAMPLE = "02_image_generation"
PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
FORMATS = ("png", "jpeg", "webp")


@dataclass
class HandlerRun:
    seconds: float  # from calling the handler to its final chunk
    progress_chunks: int
    final: dict[str, Any]


class _Recorder:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.progress = 0
        self.final: dict[str, Any] | None = None
        self.final_at = 0.0

    def chunk(self, chunk: Any) -> None:
        now = time.perf_counter()
        if not isinstance(chunk, dict) or "error" in chunk:
            raise RuntimeError(f"the handler failed: {chunk!r}")
        if chunk.get("status") == "progress":
            self.progress += 1
        elif "images" in chunk:
            self.final, self.final_at = chunk, now

    def result(self) -> HandlerRun:
        if self.final is None:
            raise RuntimeError("the stream ended without images")
        return HandlerRun(self.final_at - self.started, self.progress, self.final)


async def run_direct(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> HandlerRun:
    """Drive the handler's async generator directly, as one task on this event loop."""
    recorder = _Recorder()
    async with contextlib.aclosing(handler(job)) as chunks:
        async for chunk in chunks:
            recorder.chunk(chunk)
    return recorder.result()


async def run_sdk(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> HandlerRun:
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


def decode_data_uri(uri: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def timed_ms(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e3


def encoding_rows(module: ModuleType, image: Any, quality: int, generation_ms: float, repeats: int) -> list:
    """Per format: the handler's own encode_image, then data_uri (base64), each the median of repeats."""
    rows: list[list[object]] = []
    for fmt in FORMATS:
        data = module.encode_image(image, fmt, quality)  # warm-up (and the size)
        encode = [timed_ms(lambda fmt=fmt: module.encode_image(image, fmt, quality), 3) for _ in range(repeats)]
        uri = [timed_ms(lambda fmt=fmt, data=data: module.data_uri(data, fmt), 3) for _ in range(repeats)]
        total = median(encode) + median(uri)
        rows.append(
            [
                fmt if fmt == "png" else f"{fmt} (quality {quality})",
                f"{len(data) / 1024:.0f}",
                f"{median(encode):.1f}",
                f"{min(encode):.1f}",
                f"{median(uri):.1f}",
                f"{total:.1f}",
                f"{total / generation_ms:.2%}",
            ]
        )
    return rows


def network_section(model_dir: Path, repeats: int) -> None:
    """A 30-step 256² job through the SDK's real job loop, POSTs instant and 50 ms each."""
    from tests.shared.runpod_api import JobAPI, Worker

    request = {"prompt": PROMPT, "seed": 42, "width": 256, "height": 256, "num_inference_steps": 30}
    runs: dict[float, list[Any]] = {0.0: [], 0.05: []}
    with JobAPI() as api, Worker(EXAMPLE, api, {"MODEL_NAME": str(model_dir), **QUIET_ENV}):
        api.run(request)  # warm-up
        for repeat in range(repeats):
            for delay in (0.0, 0.05) if repeat % 2 == 0 else (0.05, 0.0):
                api.post_delay_s = delay
                job = api.run(request)
                if job.status != "COMPLETED":
                    raise RuntimeError(f"the job failed: {job.error}")
                runs[delay].append(job)
    base = median([job.seconds for job in runs[0.0]])
    rows: list[list[object]] = []
    for delay, jobs in runs.items():
        seconds = median([job.seconds for job in jobs])
        ratio = seconds / base
        rows.append(
            [
                f"{delay * 1e3:.0f} ms per POST",
                f"{seconds * 1e3:.0f}",
                f"{median([len(job.stream) for job in jobs]):.0f}",
                f"{median([job.chunks[-1]['timings']['inference_ms'] for job in jobs]):.0f}",
                f"{ratio:.2f}×",
                ratio_note(ratio, 1.2, False) if delay else "",
            ]
        )
    print(
        f"Progress over a slow network: python handler.py and the emulated job API, 256x256, 30 steps "
        f"(31 with PNDM's warm-up), median of {repeats}"
    )
    print(table(["network", "job ms", "stream POSTs", "inference ms", "vs 0 ms", "note"], rows))
    print("  job ms: from the worker taking the job to its result arriving at the API.\n")


def paired(handler_run: Callable[[], float], raw_run: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """Median seconds of each path, timed back to back in alternating order, and the throughput ratio."""
    handler_run(), raw_run()  # warm-up
    handler_s: list[float] = []
    raw_s: list[float] = []
    for repeat in range(repeats):
        for run, into in ((handler_run, handler_s), (raw_run, raw_s))[:: 1 if repeat % 2 == 0 else -1]:
            into.append(run())
    return median(handler_s), median(raw_s), paired_ratio(raw_s, handler_s)


def more_section(size: int, repeats: int) -> None:
    """FLUX and LoRA jobs against the raw pipeline; batched against one-by-one images."""
    import numpy as np
    import torch

    from tests.shared import tiny_models
    from tests.shared.harness import load_handler

    def timed_job(module: ModuleType, request: dict[str, Any]) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            final = asyncio.run(run_direct(module.handler, {"id": "bench", "input": request})).final
            timed_job.last = final  # type: ignore[attr-defined]
            return time.perf_counter() - started

        return run

    settings = {"width": size, "height": size, "num_inference_steps": 4}
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-more-") as tmp:
        flux = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_models.build("flux-schnell", Path(tmp) / "flux"))})

        def raw_flux() -> float:
            started = time.perf_counter()
            generator = torch.Generator("cpu").manual_seed(1)
            flux.TEXT2IMAGE(PROMPT, guidance_scale=0.0, max_sequence_length=256, generator=generator, **settings)
            return time.perf_counter() - started

        handler_s, raw_s, ratio = paired(timed_job(flux, {"prompt": PROMPT, "seed": 1, **settings}), raw_flux, repeats)
        rows.append(
            ["FLUX.1 [schnell] (tiny), one image", f"{raw_s * 1e3:.0f}", f"{handler_s * 1e3:.0f}", f"{ratio:.2f}×"]
        )
        rows[-1].append(ratio_note(ratio, 0.95, True))

        sd15 = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_models.build("sd15", Path(tmp) / "sd15"))})
        adapter = str(tiny_models.build("lora-sd15-a", Path(tmp) / "lora"))
        lora_job = timed_job(sd15, {"prompt": PROMPT, "seed": 1, "loras": [{"source": adapter}], **settings})
        lora_job()  # loads the adapter and leaves it active on the shared pipeline: the raw call uses it too

        def raw_lora() -> float:
            started = time.perf_counter()
            sd15.TEXT2IMAGE(PROMPT, generator=torch.Generator("cpu").manual_seed(1), **settings)
            return time.perf_counter() - started

        handler_s, raw_s, ratio = paired(lora_job, raw_lora, repeats)
        rows.append(
            ["SD 1.5 (tiny) + LoRA, one image", f"{raw_s * 1e3:.0f}", f"{handler_s * 1e3:.0f}", f"{ratio:.2f}×"]
        )
        rows[-1].append(ratio_note(ratio, 0.95, True))

        four = {"prompt": PROMPT, "seed": 1, "num_images": 4, **settings}
        batched, one_by_one = timed_job(sd15, {**four, "batch": True}), timed_job(sd15, {**four, "batch": False})
        batched_s, single_s, ratio = paired(batched, one_by_one, repeats)
        batched()
        together = [decode_data_uri(image["image"]) for image in timed_job.last["images"]]  # type: ignore[attr-defined]
        one_by_one()
        alone = [decode_data_uri(image["image"]) for image in timed_job.last["images"]]  # type: ignore[attr-defined]
        difference = max(
            int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
            for a, b in zip(together, alone, strict=True)
        )
        rows.append(
            [
                "4 images batched vs one by one (SD 1.5)",
                f"{single_s * 1e3:.0f}",
                f"{batched_s * 1e3:.0f}",
                f"{ratio:.2f}×",
            ]
        )
        rows[-1].append(f"largest pixel difference to the solo images: {difference} of 255")
    print(f"More models and modes: {size}x{size}, 4 steps, median of {repeats} paired runs after a warm-up")
    print(table(["job", "raw / reference ms", "handler ms", "throughput vs reference", "note"], rows))
    print(
        "  reference: the raw pipeline with the same settings (and adapter); for batching, the same job one by one.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="width and height in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps (default 8)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance_scale (default 7.5, SD 1.5's)")
    parser.add_argument("--seed", type=int, default=42, help="the fixed seed of every image (default 42)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per path, median (default 7)")
    parser.add_argument("--model-dir", type=Path, help="a diffusers folder to load (default: tiny SD 1.5, built now)")
    parser.add_argument("--network-repeats", type=int, default=3, help="jobs per network delay (0: skip; default 3)")
    parser.add_argument("--more-repeats", type=int, default=5, help="paired runs of FLUX, LoRA, batching (0: skip)")
    parser.add_argument("--more-size", type=int, default=256, help="image size of those runs (default 256)")
    args = parser.parse_args(argv)

    os.environ.update(QUIET_ENV)  # before runpod is imported: its logger reads the level once
    import numpy as np
    import torch

    from tests.shared import tiny_models
    from tests.shared.harness import load_handler

    with contextlib.ExitStack() as stack:
        model_dir = args.model_dir
        if model_dir is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sd-")))
            print("Building the tiny SD 1.5 pipeline ...", flush=True)
            model_dir = tiny_models.build("sd15", out / "sd15")
        module: ModuleType = load_handler(EXAMPLE, {"MODEL_NAME": str(model_dir)})
        pipeline = module.TEXT2IMAGE
        quality = module.ImageRequest.model_fields["output_quality"].default
        components = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
        params = sum(p.numel() for component in components for p in component.parameters())
        settings = {
            "width": args.size,
            "height": args.size,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance,
        }
        job = {"id": "bench-job", "input": {"prompt": PROMPT, "seed": args.seed, **settings}}

        def raw() -> tuple[float, Any]:
            started = time.perf_counter()
            image = pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(args.seed), **settings).images[0]
            return time.perf_counter() - started, image

        print(f"Machine: {machine_line()}")
        print(
            f"Model: {model_dir.name} ({type(pipeline).__name__}, {params / 1e6:.2f}M parameters, "
            f"{type(pipeline.scheduler).__name__}), {module.DEVICE} {module.TORCH_DTYPE}; {args.size}x{args.size}, "
            f"{args.steps} steps, guidance {args.guidance:g}, seed {args.seed}, one image per job, output png; "
            f"median of {args.repeats} runs after a warm-up; ratios are medians of per-repeat paired ratios",
            flush=True,
        )
        if not torch.cuda.is_available():
            print(
                "No GPU here (torch.cuda.is_available() is False): CPU run with a tiny model only; "
                "the GPU run (a real SD 1.5 / SDXL in fp16) is future work."
            )
        print()

        with asyncio.Runner() as runner:
            _, reference = raw()  # warm-up: the first call at a new size sets up its kernels
            runner.run(run_direct(module.handler, job))
            runner.run(run_sdk(module.handler, job))

            raw_s: list[float] = []
            direct: list[HandlerRun] = []
            sdk: list[HandlerRun] = []
            images: list[Any] = []

            def run_raw() -> None:
                seconds, image = raw()
                raw_s.append(seconds)
                images.append(image)

            steps: list[Callable[[], None]] = [
                run_raw,
                lambda: direct.append(runner.run(run_direct(module.handler, job))),
                lambda: sdk.append(runner.run(run_sdk(module.handler, job))),
            ]
            for repeat in range(args.repeats):
                # Forward then backward order, so a drift in the machine's speed hits every path alike.
                for step in steps if repeat % 2 == 0 else steps[::-1]:
                    step()

        expected = np.asarray(reference)
        handler_images = [decode_data_uri(run.final["images"][0]["image"]) for run in direct + sdk]
        checks = [
            f"handler images (png) pixel-identical to the raw pipeline's: "
            f"{all(np.array_equal(np.asarray(image), expected) for image in handler_images)}",
            f"raw images identical across runs: {all(np.array_equal(np.asarray(i), expected) for i in images)}",
            f"handler seed and size: {direct[0].final['images'][0]['seed']}, "
            f"{direct[0].final['parameters']['width']}x{direct[0].final['parameters']['height']}",
            f"progress chunks per job: {sorted({run.progress_chunks for run in direct + sdk})}",
        ]
        print("Checks:\n  " + "\n  ".join(checks) + "\n")

        # -- one image per job
        base = median(raw_s)
        best = min(raw_s)
        rows: list[list[object]] = [
            ["raw: TEXT2IMAGE(...).images[0]", f"{base * 1e3:.0f}", f"{best * 1e3:.0f}", f"{1 / base:.3f}", "1.00×"]
        ]
        for label, runs in (("handler, driven directly", direct), ("handler, via SDK run_job_generator", sdk)):
            seconds = [run.seconds for run in runs]
            ratio = paired_ratio(raw_s, seconds)  # throughput: raw time ÷ handler time
            rows.append(
                [
                    label,
                    f"{median(seconds) * 1e3:.0f}",
                    f"{min(seconds) * 1e3:.0f}",
                    f"{1 / median(seconds):.3f}",
                    f"{ratio:.2f}×",
                    ratio_note(ratio, 0.95, True),
                ]
            )
        print("One image per job, to the final chunk (higher images/s is better)")
        print(table(["path", "median ms", "best ms", "images/s", "vs raw", "note"], rows))
        runs = direct + sdk
        inference = median([run.final["timings"]["inference_ms"] for run in runs])
        encode = median([run.final["timings"]["encode_ms"] for run in runs])
        outside = median([run.seconds * 1e3 - run.final["timings"]["inference_ms"] for run in runs])
        print(
            f"  The handler's own timings (median): inference_ms {inference:.0f} (on the denoising thread: a fresh "
            f"scheduler and pipeline view, then the pipeline), encode_ms {encode:.1f} (png).\n"
            f"  Handler time outside inference_ms, per job (median): {outside:.1f} ms: validation, the hops to "
            "and from threads, encoding, the data URI and the chunks.\n"
        )

        # -- output encoding
        print(f"Encoding one {args.size}x{args.size} output image, median of {args.repeats} × 3 calls")
        rows = encoding_rows(module, reference, quality, base * 1e3, args.repeats)
        headers = ["format", "KiB", "encode ms", "best ms", "data URI ms", "total ms", "of generation"]
        print(table(headers, rows))
        print(
            "  encode: the handler's encode_image; data URI: base64 into the JSON string (not done when uploading\n"
            "  to a bucket). 'of generation' is the total over the raw generation time of this run; a GPU\n"
            "  generates far faster than this CPU, so there the share is larger.\n"
        )
        if args.network_repeats:
            network_section(model_dir, args.network_repeats)
        if args.more_repeats:
            more_section(args.more_size, args.more_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
