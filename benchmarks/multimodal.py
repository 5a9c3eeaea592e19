"""Benchmark 04_multimodal's handler against raw transformers on the same CLIP and LLaVA models.

Two comparisons, each printed as absolute numbers and as a ratio to the raw library measured in
the same run (targets are labels, never assertions):

* CLIP zero-shot classifications per second: one job of one image (a 640x480 JPEG data URI) and
  N labels, repeated, against the raw model on the same batch: the processor on the decoded
  image and the N captions, the forward pass and the softmax (target ≥ 0.95×);
* LLaVA time to first token: calling the handler with a streamed, greedy `answer` request until
  its first {"text"} chunk, against `MODEL.generate` of that one token on the same prepared inputs
  (target ≤ 1.5×, as for the text worker).

The handler is timed twice each: driving its async generator directly on one event loop, and
through the runpod SDK's `run_job_generator` with the JSON check on every chunk (the loop of
tests.shared.harness.run_job_async). Its time includes decoding the image from the data URI, which the
raw side is spared (the script prints that cost on its own).

The models are random-weight ones built on the fly from the tiny kinds of tests/shared/tiny_models/
(their tokenizers, processors and chat template), at sizes where CPU timings mean something: CLIP
in the shape of the handler's default openai/clip-vit-base-patch32 (224 px, 32 px patches, 12+12
layers, 150M parameters), LLaVA with a 224 px / 14 px-patch vision tower (256 image tokens) and an
8-layer, 512-wide Llama. `--tiny` uses the tiny kinds as they are (32 px images).

    python benchmarks/multimodal.py [--labels 10] [--max-tokens 16] [--repeats 7] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
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

EXAMPLE = "04_multimodal"
LABELS = [
    "cat", "dog", "lighthouse", "car", "bicycle", "mountain", "beach", "city street", "forest", "bowl of fruit",
    "train", "aeroplane", "boat", "horse", "bird", "flower", "computer", "book", "pizza", "snowy field",
]  # fmt: skip
QUESTION = "What is in the picture?"


# ---- models -------------------------------------------------------------------------------------
def _copy_except(source: Path, folder: Path, skip: set[str]) -> None:
    for file in source.iterdir():
        if file.name not in skip:
            shutil.copy(file, folder / file.name)


def _set_image_size(folder: Path, size: int, patch_size: int | None = None) -> None:
    """The processor's resize and centre crop (and LLaVA's patch size, which sets the image tokens)."""
    path = folder / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    settings.update({"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}})
    path.write_text(json.dumps(settings, indent=2) + "\n")
    if patch_size is not None:
        path = folder / "processor_config.json"
        settings = json.loads(path.read_text())
        settings["patch_size"] = patch_size
        path.write_text(json.dumps(settings, indent=2) + "\n")


def build_clip(out: Path, tiny: bool) -> Path:
    """Random weights in openai/clip-vit-base-patch32's shape, with the tiny CLIP's tokenizer and processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from tests.shared import tiny_models

    small = tiny_models.build("clip", out / "tiny-clip")
    if tiny:
        return small
    config = CLIPConfig.from_pretrained(small)
    config.vision_config.update(
        {
            "image_size": 224,
            "patch_size": 32,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 512,
        }
    )
    config.text_config.update(
        {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "projection_dim": 512,
        }
    )
    config.projection_dim = 512
    torch.manual_seed(tiny_models.SEED)
    folder = out / "clip"
    CLIPModel(config).save_pretrained(folder)
    _copy_except(small, folder, {"config.json", "model.safetensors"})
    _set_image_size(folder, 224)
    return folder


def build_llava(out: Path, tiny: bool) -> Path:
    """LLaVA 1.5 with a 224 px / 14 px-patch vision tower and a 512-wide, 8-layer Llama, random weights,
    with the tiny LLaVA's tokenizer, processor and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from tests.shared import tiny_models

    small = tiny_models.build("llava", out / "tiny-llava")
    if tiny:
        return small
    config = AutoConfig.from_pretrained(small)
    size, patch = 224, 14
    config.vision_config.update(
        {
            "image_size": size,
            "patch_size": patch,
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
        }
    )
    hidden = 512
    config.text_config.update(
        {
            "hidden_size": hidden,
            "num_hidden_layers": 8,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
            "head_dim": 64,
            "intermediate_size": 1408,  # Llama's ~2.7× MLP, rounded to 64
        }
    )
    config.image_seq_length = (size // patch) ** 2
    torch.manual_seed(tiny_models.SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(small)
    folder = out / "llava"
    model.save_pretrained(folder)
    _copy_except(small, folder, {"config.json", "generation_config.json", "model.safetensors"})
    _set_image_size(folder, size, patch)
    return folder


def build_qwen(out: Path, tiny: bool) -> Path:
    """Qwen2.5-VL with a 4-layer, 256-wide vision tower (14 px patches, 2x2 merge, windowed attention)
    and an 8-layer, 512-wide language model, random weights, with the tiny Qwen2.5-VL's tokenizer,
    processor and chat template; the handler bounds each image to MAX_IMAGE_TOKENS (1280)."""
    import torch
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from tests.shared import tiny_models

    small = tiny_models.build("qwen2.5-vl", out / "tiny-qwen")
    if tiny:
        return small
    config = AutoConfig.from_pretrained(small)
    hidden = 512
    config.vision_config.update(
        {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "depth": 4,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "window_size": 112,
            "fullatt_block_indexes": [3],
        }
    )
    config.text_config.update(
        {
            "hidden_size": hidden,
            "num_hidden_layers": 8,
            "layer_types": ["full_attention"] * 8,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "intermediate_size": 1408,
            # M-RoPE over the 64-wide heads: Qwen's [16, 24, 24] of 128, halved.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        }
    )
    torch.manual_seed(tiny_models.SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(small)
    folder = out / "qwen"
    model.save_pretrained(folder)
    _copy_except(small, folder, {"config.json", "generation_config.json", "model.safetensors"})
    return folder


def photo_uri(width: int = 640, height: int = 480) -> tuple[str, int]:
    """A deterministic photo-like JPEG (smooth gradients, shapes, a little noise) as a data URI, and its bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 8, rgb.shape)
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.2, width * 0.6, height * 0.7), fill=(240, 220, 40))
    draw.rectangle((width * 0.65, height * 0.5, width * 0.9, height * 0.95), fill=(30, 60, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode(), len(data)


# ---- driving the handler ------------------------------------------------------------------------
@dataclass
class Run:
    first_text_s: float | None  # from calling the handler to its first {"text"} chunk
    total_s: float  # to the end of the stream
    chunks: list[Any]


async def run_direct(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> Run:
    """Drive the handler's async generator directly, as one task on this event loop."""
    started, first, chunks = time.perf_counter(), None, []
    async with contextlib.aclosing(handler(job)) as stream:
        async for chunk in stream:
            if not isinstance(chunk, dict) or "error" in chunk:
                raise RuntimeError(f"the handler failed: {chunk!r}")
            if first is None and "text" in chunk:
                first = time.perf_counter()
            chunks.append(chunk)
    end = time.perf_counter()
    return Run(None if first is None else first - started, end - started, chunks)


async def run_sdk(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], job: dict[str, Any]) -> Run:
    """Through the runpod SDK's generator runner, with the JSON check: harness.run_job_async's loop, timed."""
    from runpod.serverless.modules.rp_job import run_job_generator

    from tests.shared.harness import assert_json

    started, first, chunks = time.perf_counter(), None, []
    async for part in run_job_generator(handler, job):
        if part.get("error") or (isinstance(part.get("output"), dict) and "error" in part["output"]):
            raise RuntimeError(f"the handler failed: {part!r}")
        assert_json(part)
        if first is None and "text" in part["output"]:
            first = time.perf_counter()
        chunks.append(part["output"])
    end = time.perf_counter()
    return Run(None if first is None else first - started, end - started, chunks)


# ---- CLIP ---------------------------------------------------------------------------------------
def clip_benchmark(module: ModuleType, uri: str, labels: list[str], calls: int, repeats: int, runner: Any) -> None:
    import torch

    [image] = runner.run(module.FETCHER.fetch([("image", uri)]))  # the same RGB image the handler decodes
    template = module.ClassifyRequest.model_fields["hypothesis_template"].default
    captions = [template.format(label) for label in labels]
    job = {"id": "bench-clip", "input": {"task": "classify", "image": uri, "labels": labels}}

    def raw() -> list[float]:
        inputs = module.PROCESSOR(text=captions, images=image, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            return module.MODEL(**inputs).logits_per_image.softmax(dim=-1)[0].tolist()

    def timed(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - started) / calls

    paths: dict[str, Callable[[], object]] = {
        "raw": raw,
        "direct": lambda: runner.run(run_direct(module.handler, job)),
        "sdk": lambda: runner.run(run_sdk(module.handler, job)),
    }
    for fn in paths.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    decode: list[float] = []
    for repeat in range(repeats):
        for name in list(paths) if repeat % 2 == 0 else list(reversed(paths)):  # drift hits every path alike
            samples[name].append(timed(paths[name]))
        decode.append(timed(lambda: runner.run(module.FETCHER.fetch([("image", uri)]))))

    [result] = runner.run(run_direct(module.handler, job)).chunks
    handler_scores = {item["label"]: item["score"] for item in result["labels"]}
    raw_scores = dict(zip(labels, raw(), strict=True))
    same = all(abs(handler_scores[label] - raw_scores[label]) < 1e-6 for label in labels)
    print(f"Check: handler scores equal the raw softmax (atol 1e-6): {same}\n")

    labels_of = {
        "raw": "raw: processor + forward + softmax",
        "direct": "handler, driven directly",
        "sdk": "handler, via SDK run_job_generator",
    }
    rows: list[list[object]] = []
    for name, label in labels_of.items():
        seconds = median(samples[name])
        ratio = paired_ratio(samples["raw"], samples[name])  # throughput: raw time ÷ handler time
        note = "" if name == "raw" else ratio_note(ratio, 0.95, True)
        best = min(samples[name]) * 1e3
        rows.append([label, f"{seconds * 1e3:.1f}", f"{best:.1f}", f"{1 / seconds:.1f}", f"{ratio:.2f}×", note])
    print(f"CLIP: one classify job (one image, {len(labels)} labels) vs the raw model on the same batch")
    print(table(["path", "median ms/call", "best ms", "classifications/s", "vs raw", "note"], rows))
    print(
        f"  Decoding the image from its data URI (part of the handler's time, not the raw one's): "
        f"{median(decode) * 1e3:.1f} ms per call\n"
    )


def clip_concurrency_benchmark(
    module: ModuleType, uri: str, labels: list[str], jobs: int, repeats: int, runner: Any
) -> None:
    """`jobs` one-image jobs at once (the SDK runs an async handler's jobs concurrently), whose encodes
    the batcher shares, against the same jobs one after another. Throughput ratio: one-by-one time ÷
    concurrent time."""
    kinds = {  # request, encodes per job (classify: the image and the captions)
        "embed (one image)": ({"task": "embed", "images": [uri]}, 1),
        f"classify (one image, {len(labels)} labels)": ({"task": "classify", "image": uri, "labels": labels}, 2),
    }
    rows: list[list[object]] = []
    for name, (request, encodes) in kinds.items():
        batch = [{"id": f"bench-{index}", "input": request} for index in range(jobs)]

        async def one_by_one(batch: list[dict[str, Any]] = batch) -> list[Run]:
            return [await run_direct(module.handler, job) for job in batch]

        async def together(batch: list[dict[str, Any]] = batch) -> list[Run]:
            return await asyncio.gather(*(run_direct(module.handler, job) for job in batch))

        def timed(fn: Callable[[], Any]) -> tuple[float, list[Run], int]:
            before = module.BATCHER.batches
            started = time.perf_counter()
            runs = runner.run(fn())
            return time.perf_counter() - started, runs, module.BATCHER.batches - before

        timed(one_by_one), timed(together)  # warm-up
        alone: list[float] = []
        shared: list[float] = []
        passes: list[int] = []
        results: list[dict[str, Any]] = []
        for repeat in range(repeats):
            order = [(one_by_one, alone), (together, shared)]
            for fn, samples in order if repeat % 2 == 0 else order[::-1]:
                seconds, runs, batches = timed(fn)
                samples.append(seconds)
                if fn is together:
                    passes.append(batches)
                    results = [run.chunks[0] for run in runs]
        solo = runner.run(run_direct(module.handler, batch[0])).chunks[0]
        same = all(_close(result, solo) for result in results)
        ratio = paired_ratio(alone, shared)
        rows.append(
            [
                name,
                f"{jobs / median(alone):.1f}",
                f"{jobs / median(shared):.1f}",
                f"{median(passes):.0f} of {jobs * encodes}",
                f"{ratio:.2f}×",
                ratio_note(ratio, 2.0, True),
                str(same),
            ]
        )
    print(f"CLIP: {jobs} concurrent one-image jobs (dynamic batching) vs the same jobs one by one")
    print(table(["jobs", "one by one jobs/s", "concurrent jobs/s", "forward passes", "ratio", "note", "= solo"], rows))
    print()


def _close(got: dict[str, Any], want: dict[str, Any], atol: float = 1e-5) -> bool:
    """A concurrent job's result equals its solo run's (scores and vectors within atol)."""
    if "labels" in want:
        pairs = zip(got["labels"], want["labels"], strict=True)
        return all(a["label"] == b["label"] and abs(a["score"] - b["score"]) < atol for a, b in pairs)
    rows = zip(got["image_embeddings"], want["image_embeddings"], strict=True)
    return all(abs(x - y) < atol for a, b in rows for x, y in zip(a, b, strict=True))


# ---- LLaVA --------------------------------------------------------------------------------------
def tokens_before_text(tokenizer: Any, ids: list[int]) -> int:
    """How many generated tokens it takes before decoded text is non-empty (1 for most answers)."""
    for count in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:count], skip_special_tokens=True)
        if text and not text.endswith("\ufffd"):
            return count
    return len(ids)


def ttft_benchmark(module: ModuleType, name: str, uri: str, max_tokens: int, repeats: int, runner: Any) -> None:
    """Time to first token of a chat VLM (`name`: LLaVA, Qwen2.5-VL) through the handler vs raw generate."""
    import torch

    request = {"task": "answer", "image": uri, "question": QUESTION}
    job = {
        "id": "bench-vlm",
        "input": {**request, "sampling_params": {"temperature": 0, "max_tokens": max_tokens}, "stream": True},
    }
    parsed = module.parse_request(request, module.FAMILY)[1]
    images = runner.run(module.FETCHER.fetch(module.image_sources(parsed)))
    inputs = module.prepare_generation("answer", parsed, images).inputs
    prompt_len = inputs["input_ids"].shape[1]
    eos_ids = sorted(module.GENERATOR.eos_token_ids)

    def generate(max_new_tokens: int) -> tuple[float, list[int]]:
        started = time.perf_counter()
        with torch.inference_mode():
            out = module.MODEL.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=module.TOKENIZER.pad_token_id,
            )
        return time.perf_counter() - started, out[0, prompt_len:].tolist()

    _, reference = generate(max_tokens)  # warm-up, and what both sides answer
    first_k = tokens_before_text(module.TOKENIZER, reference)
    generate(first_k)
    runner.run(run_direct(module.handler, job))
    runner.run(run_sdk(module.handler, job))

    raw_first: list[float] = []
    direct: list[Run] = []
    sdk: list[Run] = []
    steps: list[Callable[[], None]] = [
        lambda: raw_first.append(generate(first_k)[0]),
        lambda: direct.append(runner.run(run_direct(module.handler, job))),
        lambda: sdk.append(runner.run(run_sdk(module.handler, job))),
    ]
    for repeat in range(repeats):
        for step in steps if repeat % 2 == 0 else steps[::-1]:
            step()

    reference_text = module.TOKENIZER.decode(reference, skip_special_tokens=True)
    texts = {"".join(chunk.get("text", "") for chunk in run.chunks) for run in direct + sdk}
    usage = {json.dumps(run.chunks[-1].get("usage"), sort_keys=True) for run in direct + sdk}
    checks = [
        f"streamed text identical to raw greedy generate: {texts == {reference_text}}",
        f"handler usage: {sorted(usage)} (raw prompt {prompt_len} tokens, {len(reference)} generated)",
        f"first text chunk comes with generated token #{first_k}",
    ]
    print("Checks:\n  " + "\n  ".join(checks) + "\n")

    base = median(raw_first)
    rows: list[list[object]] = [
        [f"raw: generate(max_new_tokens={first_k})", f"{base * 1e3:.1f}", f"{min(raw_first) * 1e3:.1f}", "1.00×"]
    ]
    for label, runs in (("handler, driven directly", direct), ("handler, via SDK run_job_generator", sdk)):
        firsts = [run.first_text_s for run in runs]
        ratio = paired_ratio(firsts, raw_first)
        rows.append(
            [
                label,
                f"{median(firsts) * 1e3:.1f}",
                f"{min(firsts) * 1e3:.1f}",
                f"{ratio:.2f}×",
                ratio_note(ratio, 1.5, higher_is_better=False),
            ]
        )
    print(
        f"{name}: time to first token of a streamed greedy answer ({prompt_len}-token prompt with the image; "
        "lower is better)"
    )
    print(table(["path", "median ms", "best ms", "vs raw", "note"], rows))
    print(
        "  The handler's time includes decoding the image, the chat template and the processor (resize,\n"
        "  normalise, image-token expansion), which the raw side gets ready-made.\n"
    )


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=10, help=f"CLIP labels per job, 2-{len(LABELS)} (default 10)")
    parser.add_argument("--calls", type=int, default=3, help="CLIP jobs per timed sample (default 3)")
    parser.add_argument("--max-tokens", type=int, default=16, help="LLaVA max_tokens per answer (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per measurement, median (default 7)")
    parser.add_argument("--tiny", action="store_true", help="the tiny models of tests/shared/tiny_models/ as they are")
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-llava", action="store_true")
    parser.add_argument("--jobs", type=int, default=32, help="concurrent CLIP jobs in the batching run (default 32)")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--skip-qwen", action="store_true")
    args = parser.parse_args(argv)
    if not 2 <= args.labels <= len(LABELS):
        parser.error(f"--labels must be between 2 and {len(LABELS)}")

    os.environ.update(QUIET_ENV)  # before runpod is imported: its logger reads the level once
    from tests.shared.harness import load_handler

    uri, jpeg_bytes = photo_uri()
    print(f"Machine: {machine_line()}")
    print(
        f"Input: one 640x480 JPEG ({jpeg_bytes / 1024:.0f} KiB) as a data URI; models random-weight, float32 on "
        f"CPU ({'tiny kinds' if args.tiny else 'benchmark sizes'}); median of {args.repeats} samples after a "
        "warm-up; ratios are medians of per-repeat paired ratios\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-vlm-") as out, asyncio.Runner() as runner:
        if not args.skip_clip:
            folder = build_clip(Path(out), args.tiny)
            clip = load_handler(EXAMPLE, {"MODEL_NAME": str(folder)})
            params = sum(p.numel() for p in clip.MODEL.parameters())
            vision, text = clip.CONFIG.vision_config, clip.CONFIG.text_config
            print(
                f"CLIP model: {params / 1e6:.0f}M parameters, {vision.image_size} px images in {vision.patch_size} px "
                f"patches, {vision.num_hidden_layers} vision + {text.num_hidden_layers} text layers",
                flush=True,
            )
            clip_benchmark(clip, uri, LABELS[: args.labels], args.calls, args.repeats, runner)
            if not args.skip_batching:
                clip_concurrency_benchmark(clip, uri, LABELS[: args.labels], args.jobs, args.repeats, runner)
            del clip
        if not args.skip_llava:
            folder = build_llava(Path(out), args.tiny)
            llava = load_handler(EXAMPLE, {"MODEL_NAME": str(folder)})
            params = sum(p.numel() for p in llava.MODEL.parameters())
            text = llava.CONFIG.text_config
            print(
                f"LLaVA model: {params / 1e6:.0f}M parameters, {llava.CONFIG.vision_config.image_size} px images, "
                f"{llava.CONFIG.image_seq_length} image tokens, Llama {text.hidden_size} wide with "
                f"{text.num_hidden_layers} layers; max_tokens {args.max_tokens}, greedy",
                flush=True,
            )
            ttft_benchmark(llava, "LLaVA", uri, args.max_tokens, args.repeats, runner)
            del llava
        if not args.skip_qwen:
            folder = build_qwen(Path(out), args.tiny)
            qwen = load_handler(EXAMPLE, {"MODEL_NAME": str(folder)})
            params = sum(p.numel() for p in qwen.MODEL.parameters())
            text, vision = qwen.CONFIG.text_config, qwen.CONFIG.vision_config
            print(
                f"Qwen2.5-VL model: {params / 1e6:.0f}M parameters, vision {vision.hidden_size} wide with "
                f"{vision.depth} layers (14 px patches merged 2x2, at most {qwen.MAX_IMAGE_TOKENS} tokens an image), "
                f"language model {text.hidden_size} wide with {text.num_hidden_layers} layers; "
                f"max_tokens {args.max_tokens}, greedy",
                flush=True,
            )
            ttft_benchmark(qwen, "Qwen2.5-VL", uri, args.max_tokens, args.repeats, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
