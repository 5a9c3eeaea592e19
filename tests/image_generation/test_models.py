"""02_image_generation: inpainting, single-file checkpoints, batched images and the TORCH_COMPILE warm-up,
on tiny random-weight SD 1.5 and SDXL pipelines through the handler."""

from __future__ import annotations

import json
import threading
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.shared.harness import lazy_handlers, load_handler, run_job
from tests.shared.image_generation import EXAMPLE, SMALL, assert_progress, generate
from tests.shared.images import decode, mask_data_uri, pixels, png_data_uri


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per tiny model, built on first use and shared by the module's tests."""
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


# ---- inpainting -------------------------------------------------------------------------------


def test_inpainting_matches_the_raw_inpainting_pipeline(handlers, tiny_model) -> None:
    """image + mask through the handler give exactly what AutoPipelineForInpainting gives with the
    same inputs and seed, and not the image-to-image result."""
    from diffusers import AutoPipelineForInpainting

    sd15 = handlers["sd15"]
    source, mask = png_data_uri(64, 64, seed=1), mask_data_uri(64, 64, (16, 16, 48, 48))
    request = {"prompt": "a window", "image": source, "mask": mask, "strength": 0.9, "seed": 7, **SMALL}
    _, inpainted = generate(sd15, **request)
    raw = AutoPipelineForInpainting.from_pretrained(str(tiny_model("sd15")))
    raw.set_progress_bar_config(disable=True)
    expected = raw(
        "a window",
        image=decode(source).convert("RGB"),
        mask_image=decode(mask).convert("L"),
        strength=0.9,
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    assert type(sd15.INPAINTING).__name__ == "StableDiffusionInpaintPipeline"
    np.testing.assert_array_equal(pixels(inpainted["images"][0]["image"]), np.asarray(expected))
    _, img2img = generate(sd15, **{key: value for key, value in request.items() if key != "mask"})
    assert not np.array_equal(pixels(inpainted["images"][0]["image"]), pixels(img2img["images"][0]["image"]))
    assert inpainted["parameters"]["inpainting"] is True and "inpainting" not in img2img["parameters"]


def test_sdxl_inpainting_reproduces_its_seed_and_follows_the_mask(handlers) -> None:
    sdxl = handlers["sdxl"]
    source = png_data_uri(64, 64, seed=3)
    request = {"prompt": "a door", "image": source, "strength": 0.8, "seed": 11, **SMALL}
    progress, first = generate(sdxl, mask=mask_data_uri(64, 64, (0, 0, 32, 64)), **request)
    _, again = generate(sdxl, mask=mask_data_uri(64, 64, (0, 0, 32, 64)), **request)
    _, other_mask = generate(sdxl, mask=mask_data_uri(64, 64, (32, 0, 64, 64)), **request)
    assert type(sdxl.INPAINTING).__name__ == "StableDiffusionXLInpaintPipeline"
    assert_progress(progress)
    assert first["images"][0]["seed"] == 11 and decode(first["images"][0]["image"]).size == (64, 64)
    np.testing.assert_array_equal(pixels(first["images"][0]["image"]), pixels(again["images"][0]["image"]))
    assert not np.array_equal(pixels(first["images"][0]["image"]), pixels(other_mask["images"][0]["image"]))


@pytest.mark.parametrize(
    ("request_input", "message"),
    [
        ({"mask": mask_data_uri(64, 64, (0, 0, 8, 8))}, "mask needs image: inpainting repaints the masked part"),
        (
            {"image": png_data_uri(64, 48), "mask": mask_data_uri(32, 32, (0, 0, 8, 8))},
            "mask: 32x32 does not match image's 64x48: send a mask of the image's size",
        ),
        ({"image": png_data_uri(64, 64), "mask": "%%% not base64"}, "mask: not valid base64"),
        (
            {"image": png_data_uri(64, 64), "mask": "http://169.254.169.254/latest/meta-data"},
            "mask: the URL is refused",
        ),
    ],
)
def test_bad_masks_are_clear_errors(handlers, request_input: dict[str, Any], message: str) -> None:
    result = run_job(handlers["sd15"].handler, {"prompt": "x", **SMALL, **request_input})
    assert message in result.get("error", ""), result
    assert result["stream"] == []


# ---- single-file checkpoints -------------------------------------------------------------------


def test_a_single_file_checkpoint_gives_the_images_of_its_diffusers_folder(tiny_model) -> None:
    """The tiny SD 1.5 written as one original-layout .safetensors: its family is told from its
    keys, its configs come from MODEL_CONFIG, and it makes the same images as the folder."""
    built = tiny_model("sd15-single-file")
    env = {"MODEL_NAME": str(built / "model.safetensors"), "MODEL_CONFIG": str(built / "diffusers")}
    single = load_handler(EXAMPLE, env)
    folder = load_handler(EXAMPLE, {"MODEL_NAME": str(built / "diffusers")})
    assert single.SINGLE_FILE and type(single.TEXT2IMAGE).__name__ == "StableDiffusionPipeline"
    assert single.FAMILY.name == "sd1"
    assert single.pipeline_class_name() == "StableDiffusionPipeline"  # what DTYPE=auto reads on a GPU
    for request in ({"prompt": "a kite", "seed": 3}, {"prompt": "a kite", "seed": 4, "image": png_data_uri(64, 64)}):
        _, from_file = generate(single, **request, **SMALL)
        _, from_folder = generate(folder, **request, **SMALL)
        np.testing.assert_array_equal(
            pixels(from_file["images"][0]["image"]), pixels(from_folder["images"][0]["image"])
        )


def test_bad_checkpoint_settings_are_clear_errors_at_start(tiny_model, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"MODEL_NAME: no checkpoint file at /nowhere/model\.safetensors"):
        load_handler(EXAMPLE, {"MODEL_NAME": "/nowhere/model.safetensors"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a readable checkpoint"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(junk)})
    with pytest.raises(ValueError, match="MODEL_FAMILY must be one of sd1, sd2"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15")), "MODEL_FAMILY": "sd9"})


def test_model_family_overrides_the_detected_family(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15")), "MODEL_FAMILY": "sd-turbo"})
    assert module.FAMILY.name == "sd-turbo" and module.FAMILY.steps == 1


# ---- batched images -------------------------------------------------------------------------

# How close a batched image is to its seed's solo run on this CPU (float32): pixel levels of 255.
BATCH_MAX_PIXEL_DIFFERENCE = 2


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_batched_images_are_close_to_their_solo_runs(handlers, family: str) -> None:
    module = handlers[family]
    progress, batched = generate(module, prompt="a lighthouse", seed=100, num_images=3, batch=True, **SMALL)
    assert [image["seed"] for image in batched["images"]] == [100, 101, 102]
    assert batched["parameters"]["batch"] is True
    per_run = 3 if family == "sd15" else 2  # PNDM's warm-up step
    assert_progress(progress, total=per_run)  # one run for the three images
    got = [pixels(image["image"]).astype(int) for image in batched["images"]]
    for seed, image in zip((100, 101, 102), got, strict=True):
        _, alone = generate(module, prompt="a lighthouse", seed=seed, **SMALL)
        difference = np.abs(image - pixels(alone["images"][0]["image"]).astype(int)).max()
        assert difference <= BATCH_MAX_PIXEL_DIFFERENCE, (seed, difference)
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[1], got[2])


def test_batch_images_setting_and_request_flag(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15")), "BATCH_IMAGES": "true"})
    progress, batched = generate(module, prompt="x", seed=1, num_images=2, **SMALL)
    assert batched["parameters"]["batch"] is True and progress[-1]["total"] == 3
    progress, one_by_one = generate(module, prompt="x", seed=1, num_images=2, batch=False, **SMALL)
    assert one_by_one["parameters"]["batch"] is False and progress[-1]["total"] == 6


# ---- TORCH_COMPILE warm-up ------------------------------------------------------------------


def test_torch_compile_warms_up_on_the_denoising_thread_before_the_first_job(tiny_model, monkeypatch) -> None:
    """torch.compile itself is replaced by a recorder here (inductor on two CPU cores takes minutes):
    what is tested is that TORCH_COMPILE compiles the denoiser and runs one warm-up image through
    it at start, at the family's default size, on the thread jobs run on."""
    compiled: list[dict[str, Any]] = []
    calls: list[tuple[str, tuple[int, ...]]] = []

    def recording_compile(model: Any, **options: Any) -> Any:
        if not isinstance(model, torch.nn.Module):
            return model  # a library's own @torch.compile function, met when it is first imported
        compiled.append({"model": type(model).__name__, **options})
        model.register_forward_hook(lambda _, args, out: calls.append((threading.current_thread().name, args[0].shape)))
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15")), "TORCH_COMPILE": "true"})
    assert compiled == [{"model": "UNet2DConditionModel", "mode": "max-autotune", "fullgraph": True}]
    assert len(calls) == module.WARMUP_STEPS + 1  # PNDM's warm-up step
    assert all(name.startswith("denoise") and shape[-2:] == (64, 64) for name, shape in calls), calls  # 512² latents


@pytest.mark.compile
def test_a_real_torch_compile_warms_up_at_start_and_serves_loras_without_recompiling(tiny_model) -> None:
    """Inductor for real, on the CPU (~70 s here): TORCH_COMPILE_MODE=default, since max-autotune
    times candidate kernels and takes far longer. fullgraph=True proves the UNet compiles without
    a graph break; the warm-up's graph serves the first job at the default size unchanged.

    Then LoRAs (issue 22): before, the compiled UNet was invisible to diffusers' adapter APIs, the
    adapter was injected and then refused, and the next plain job differed from the one before it by
    up to 56 levels. Now a request's LoRA and an endpoint LoRA are copied into the slot compiled
    with the UNet: no recompilation, and the plain jobs between them are byte-identical."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    endpoint = json.dumps([{"name": "b", "source": str(tiny_model("lora-sd15-b")), "weight": 0.5}])
    env = {"MODEL_NAME": str(tiny_model("sd15")), "LORAS": endpoint}
    module = load_handler(EXAMPLE, {**env, "TORCH_COMPILE": "true", "TORCH_COMPILE_MODE": "default"})
    assert type(module.TEXT2IMAGE.unet).__name__ == "OptimizedModule"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the warm-up image compiled the UNet"
    request = {"prompt": "a tree", "seed": 3, "num_inference_steps": 2}  # the default size, as the warm-up
    lora_a = [{"source": str(tiny_model("lora-sd15-a"))}]
    jobs = [{}, {"loras": lora_a}, {}, {"loras": [{"source": "b"}]}, {}]
    plain, with_a, after_a, with_b, after_b = (image(generate(module, **request, **job)) for job in jobs)
    assert counters["stats"]["unique_graphs"] == graphs, "a job, or an adapter, compiled again"
    np.testing.assert_array_equal(after_a, plain)  # no adapter left behind
    np.testing.assert_array_equal(after_b, plain)
    assert not np.array_equal(with_a, plain) and not np.array_equal(with_b, plain)
    two = run_job(module.handler, {**request, "loras": [*lora_a, {"source": "b"}]})
    assert "over the 1 this endpoint's compiled unet holds (LORA_SLOTS, with TORCH_COMPILE)" in two["error"], two
    # The plain image against the uncompiled worker's. Not the LoRA ones: these tiny random LoRAs (20×
    # a trained one's deltas) amplify inductor's rounding to ~60 levels even for a LoRA loaded before
    # compiling, without hotswap; test_loras.py shows the slot's image bit-equal to diffusers' own load.
    _, eager = generate(load_handler(EXAMPLE, env), **request)
    assert np.abs(plain.astype(int) - pixels(eager["images"][0]["image"]).astype(int)).max() <= 2


def image(job: tuple[list[dict[str, Any]], dict[str, Any]]) -> np.ndarray:
    """The first image of a job `generate` ran, as pixels."""
    return pixels(job[1]["images"][0]["image"])
