"""Runpod caps one streamed chunk at 1 MB (its /stream API reference): an image too large for one
chunk goes out in ordered parts, and joined they are the image, on /stream and /runsync alike."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from tests.shared.harness import REPO, load_copy_beside, load_handler, run_job
from tests.shared.image_generation import EXAMPLE, SMALL
from tests.shared.runpod_api import JobAPI, Worker


def joined_images(chunks: list[dict[str, Any]]) -> list[str]:
    """What a client does with the chunks: each image whole, its parts joined in order."""
    *rest, final = chunks
    parts: dict[int, list[str]] = {}
    for chunk in rest:
        if "image_part" in chunk:
            part = chunk["image_part"]
            assert part["part"] == len(parts.setdefault(part["index"], [])), "parts come in order"
            parts[part["index"]].append(part["data"])
    return [
        "".join(parts[index]) if result["image"] is None else result["image"]
        for index, result in enumerate(final["images"])
    ]


def chunk_bytes(chunk: Any) -> int:
    return len(json.dumps(chunk).encode())


@pytest.fixture(scope="module")
def delivery() -> ModuleType:
    return load_copy_beside(REPO / EXAMPLE / "delivery.py")


def test_a_final_chunk_that_fits_goes_out_whole(delivery: ModuleType) -> None:
    final = {"images": [{"image": "data:image/png;base64," + "A" * 100, "seed": 1}], "parameters": {}}
    assert delivery.within_stream_chunks(final, 1000) == [final]
    linked = {"images": [{"image": "https://bucket/x.png?sig=" + "s" * 2000, "seed": 1}]}
    assert delivery.within_stream_chunks(linked, 1000)[-1]["images"] == linked["images"]  # a URL is never split


def test_large_images_go_first_in_parts_within_the_cap(delivery: ModuleType) -> None:
    images = [{"image": "data:image/png;base64," + chr(65 + i) * 2500, "seed": i} for i in range(3)]
    final = {"images": images, "parameters": {"steps": 2}, "timings": {}}
    chunks = delivery.within_stream_chunks(final, 1000)
    assert all(chunk_bytes(chunk) <= 1000 for chunk in chunks)
    assert joined_images(chunks) == [image["image"] for image in images]
    assert chunks[-1]["images"][0] == {"image": None, "parts": 4, "seed": 0}  # 2,522 characters, 744 a part
    assert chunks[-1]["parameters"] == {"steps": 2}


def test_the_handler_streams_parts_under_its_cap_and_they_join_to_the_image(
    tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15"))})
    request = {"prompt": "a kite", "seed": 3, "num_images": 2, **SMALL}
    whole = run_job(module.handler, request)["output"][-1]["images"]
    monkeypatch.setattr(module, "STREAM_CHUNK_BYTES", 4096)
    chunks = run_job(module.handler, request)["output"]
    assert all(chunk_bytes(chunk) <= 4096 for chunk in chunks)
    assert any("image_part" in chunk for chunk in chunks)
    assert joined_images([c for c in chunks if c.get("status") != "progress"]) == [i["image"] for i in whole]


def test_a_megapixel_png_through_the_job_loop_stays_under_a_megabyte_a_chunk(
    tiny_model: Callable[[str], Path],
) -> None:
    """`python handler.py` against the emulated job API: the worker POSTs every chunk of a ~2 MB
    image under Runpod's 1 MB cap, and /stream and /runsync rebuild the same PNG."""
    request = {"prompt": "noise", "seed": 5, "width": 768, "height": 768, "num_inference_steps": 1}
    with JobAPI() as api, Worker(EXAMPLE, api, {"MODEL_NAME": str(tiny_model("sd15"))}) as worker:
        job = worker.api.run(request)
    assert job.status == "COMPLETED", job.error
    streamed = [chunk for chunk in job.chunks if chunk.get("status") != "progress"]
    assert max(chunk_bytes(chunk) for chunk in job.chunks) <= 1_000_000
    [image] = joined_images(streamed)
    assert len(image) > 1_000_000, "the image needs more than one chunk"
    assert joined_images([c for c in job.output if c.get("status") != "progress"]) == [image]
    png = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1])))
    assert png.size == (768, 768)
