"""02_image_generation: FLUX.1 [schnell] and [dev], SD 3.5 Large and Medium through the handler, on tiny
random-weight flow-matching pipelines (CLIP and T5 text encoders with offline-trained tokenizers)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from tests.shared.harness import lazy_handlers, load_handler, run_job
from tests.shared.image_generation import EXAMPLE, SMALL, assert_progress, generate
from tests.shared.images import decode, mask_data_uri, pixels, png_data_uri

FLOW_FAMILIES = [
    ("flux-schnell", "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    ("flux-dev", "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    ("sd3.5-large", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    ("sd3.5-medium", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
]


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per tiny model, built on first use and shared by the module's tests."""
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


@pytest.mark.parametrize(("family", "text2image", "image2image", "inpainting"), FLOW_FAMILIES)
def test_each_flow_family_text_image_and_inpainting_reproduce_their_seeds(
    handlers, family: str, text2image: str, image2image: str, inpainting: str
) -> None:
    module = handlers[family]
    assert module.FAMILY.name == family, "told by the transformer's config, not the folder's name"
    assert [type(p).__name__ for p in (module.TEXT2IMAGE, module.IMAGE2IMAGE, module.INPAINTING)] == [
        text2image,
        image2image,
        inpainting,
    ]
    source, mask = png_data_uri(64, 64, seed=5), mask_data_uri(64, 64, (16, 16, 48, 48))
    requests = [
        {"prompt": "a red kite", "seed": 3},
        {"prompt": "a red kite", "seed": 3, "image": source, "strength": 0.75},
        {"prompt": "a red kite", "seed": 3, "image": source, "mask": mask, "strength": 0.9},
    ]
    outputs = []
    for request in requests:
        progress, first = generate(module, **request, **SMALL)
        _, again = generate(module, **request, **SMALL)
        assert_progress(progress)
        assert first["parameters"]["family"] == family and decode(first["images"][0]["image"]).size == (64, 64)
        outputs.append(pixels(first["images"][0]["image"]))
        np.testing.assert_array_equal(outputs[-1], pixels(again["images"][0]["image"]))
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])


@pytest.mark.parametrize(("family", "guidance"), [("flux-schnell", 0.0), ("flux-dev", 3.5), ("sd3.5-large", 3.5)])
def test_a_flow_job_matches_the_raw_pipeline(handlers, tiny_model, family: str, guidance: float) -> None:
    """The handler's defaults (guidance, T5 sequence length) and its fresh scheduler give exactly what the
    raw diffusers pipeline gives with the same seed."""
    from diffusers import AutoPipelineForText2Image

    module = handlers[family]
    _, final = generate(module, prompt="a lighthouse", seed=9, **SMALL)
    assert final["parameters"]["guidance_scale"] == guidance
    raw = AutoPipelineForText2Image.from_pretrained(str(tiny_model(family)))
    raw.set_progress_bar_config(disable=True)
    expected = raw(
        "a lighthouse",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=guidance,
        max_sequence_length=module.FAMILY.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(9),
    ).images[0]
    np.testing.assert_array_equal(pixels(final["images"][0]["image"]), np.asarray(expected))


def test_flow_family_defaults(handlers) -> None:
    schnell, dev, large, medium = (handlers[f] for f in ("flux-schnell", "flux-dev", "sd3.5-large", "sd3.5-medium"))
    assert (schnell.FAMILY.steps, schnell.FAMILY.guidance, schnell.FAMILY.max_sequence_length) == (4, 0.0, 256)
    assert (dev.FAMILY.steps, dev.FAMILY.guidance, dev.FAMILY.max_sequence_length) == (28, 3.5, 512)
    assert (large.FAMILY.steps, medium.FAMILY.steps, medium.FAMILY.guidance) == (28, 40, 4.5)
    assert {m.FAMILY.width for m in (schnell, dev, large, medium)} == {1024}
    _, final = generate(schnell, prompt="x", seed=1, width=64, height=64)
    assert final["parameters"]["num_inference_steps"] == 4


@pytest.mark.parametrize(
    ("family", "request_input", "message"),
    [
        ("flux-schnell", {"negative_prompt": "blurry"}, "negative_prompt: FLUX.1 [schnell] takes no negative prompt"),
        ("flux-schnell", {"guidance_scale": 3.5}, "guidance_scale: FLUX.1 [schnell] has no guidance to set"),
        ("flux-schnell", {"scheduler": "euler-a"}, "scheduler: 'euler-a' is a Stable Diffusion scheduler"),
        ("flux-dev", {"negative_prompt": "blurry"}, "negative_prompt: FLUX.1 [dev] takes no negative prompt"),
        ("sd3.5-large", {"scheduler": "dpm++2m"}, "SD 3.5 Large is a flow-matching model that runs its own"),
        ("flux-dev", {"width": 72}, "width: FLUX.1 [dev] takes multiples of 16, got 72"),
        ("sd3.5-medium", {"height": 88}, "height: SD 3.5 Medium takes multiples of 16, got 88"),
    ],
)
def test_what_a_flow_family_cannot_honour_is_refused(handlers, family: str, request_input: dict, message: str) -> None:
    result = run_job(handlers[family].handler, {"prompt": "x", **SMALL, **request_input})
    assert message in result.get("error", ""), result
    assert result["stream"] == []


def test_sd35_takes_a_negative_prompt_and_flux_image_to_image_keeps_multiples_of_16(handlers) -> None:
    _, plain = generate(handlers["sd3.5-large"], prompt="a cat", seed=2, **SMALL)
    _, negative = generate(handlers["sd3.5-large"], prompt="a cat", negative_prompt="a dog", seed=2, **SMALL)
    assert not np.array_equal(pixels(plain["images"][0]["image"]), pixels(negative["images"][0]["image"]))
    _, fitted = generate(handlers["flux-schnell"], prompt="x", image=png_data_uri(100, 70), width=128, seed=1)
    assert decode(fitted["images"][0]["image"]).size == (128, 96)  # 89.6 rounded to a multiple of 16, not 8 (88)


@pytest.mark.parametrize(
    ("family", "controlnet", "pipeline"),
    [
        ("flux-schnell", "controlnet-flux-schnell", "FluxControlNetPipeline"),
        ("sd3.5-large", "controlnet-sd3.5-large", "StableDiffusion3ControlNetPipeline"),
    ],
)
def test_flow_controlnets_follow_the_control_image(tiny_model, family: str, controlnet: str, pipeline: str) -> None:
    env = {"MODEL_NAME": str(tiny_model(family)), "CONTROLNET_MODEL": str(tiny_model(controlnet))}
    module = load_handler(EXAMPLE, env)
    assert type(module.CONTROLNET).__name__ == pipeline
    assert type(module.CONTROLNET.controlnet).__name__ == (
        "FluxControlNetModel" if "flux" in family else "SD3ControlNetModel"
    )
    _, a = generate(module, prompt="a room", control_image=png_data_uri(64, 64, 1), seed=4, **SMALL)
    _, again = generate(module, prompt="a room", control_image=png_data_uri(64, 64, 1), seed=4, **SMALL)
    _, b = generate(module, prompt="a room", control_image=png_data_uri(64, 64, 2), seed=4, **SMALL)
    _, plain = generate(module, prompt="a room", seed=4, **SMALL)
    np.testing.assert_array_equal(pixels(a["images"][0]["image"]), pixels(again["images"][0]["image"]))
    assert not np.array_equal(pixels(a["images"][0]["image"]), pixels(b["images"][0]["image"]))
    assert not np.array_equal(pixels(a["images"][0]["image"]), pixels(plain["images"][0]["image"]))
    assert a["parameters"]["controlnet_conditioning_scale"] == 1.0
    # The same request at half the conditioning is another image: the scale reaches the pipeline.
    _, half = generate(
        module,
        prompt="a room",
        control_image=png_data_uri(64, 64, 1),
        controlnet_conditioning_scale=0.5,
        seed=4,
        **SMALL,
    )
    assert not np.array_equal(pixels(a["images"][0]["image"]), pixels(half["images"][0]["image"]))


def test_a_flux_lora_job_matches_the_raw_pipeline_with_that_adapter(handlers, tiny_model) -> None:
    from diffusers import FluxPipeline

    module = handlers["flux-schnell"]
    adapter = str(tiny_model("lora-flux-schnell"))
    _, with_lora = generate(module, prompt="a tree", seed=5, loras=[{"source": adapter}], **SMALL)
    _, again = generate(module, prompt="a tree", seed=5, loras=[{"source": adapter}], **SMALL)
    _, plain = generate(module, prompt="a tree", seed=5, **SMALL)
    raw = FluxPipeline.from_pretrained(str(tiny_model("flux-schnell")))
    raw.set_progress_bar_config(disable=True)
    raw.load_lora_weights(adapter, adapter_name="a")
    expected = raw(
        "a tree",
        generator=torch.Generator("cpu").manual_seed(5),
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        max_sequence_length=module.FAMILY.max_sequence_length,
    )
    np.testing.assert_array_equal(pixels(with_lora["images"][0]["image"]), np.asarray(expected.images[0]))
    np.testing.assert_array_equal(pixels(with_lora["images"][0]["image"]), pixels(again["images"][0]["image"]))
    assert not np.array_equal(pixels(with_lora["images"][0]["image"]), pixels(plain["images"][0]["image"]))
    # The adapter leaves with its job: the next plain job is the base model's image again.
    _, plain_after = generate(module, prompt="a tree", seed=5, **SMALL)
    np.testing.assert_array_equal(pixels(plain_after["images"][0]["image"]), pixels(plain["images"][0]["image"]))


@pytest.mark.compile
def test_a_real_torch_compile_of_the_flux_transformer_serves_loras_without_recompiling(tiny_model) -> None:
    """Issue 22 on FLUX.1 [schnell]: inductor for real on the CPU (TORCH_COMPILE_MODE=default, at a
    64² default size so the warm-up compiles the jobs' shape). A request's LoRA and an endpoint LoRA
    go into the slot compiled with the transformer: no recompilation, the plain job after each is
    byte-identical to the one before, and each LoRA image is close to the uncompiled worker's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    adapter = str(tiny_model("lora-flux-schnell"))
    env = {
        "MODEL_NAME": str(tiny_model("flux-schnell")),
        "LORAS": f'[{{"name": "f", "source": "{adapter}", "weight": 0.5}}]',
        "DEFAULT_WIDTH": "64",
        "DEFAULT_HEIGHT": "64",
    }
    module = load_handler(EXAMPLE, {**env, "TORCH_COMPILE": "true", "TORCH_COMPILE_MODE": "default"})
    assert type(module.TEXT2IMAGE.transformer).__name__ == "OptimizedModule"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the warm-up image compiled the transformer"
    jobs = [{}, {"loras": [{"source": adapter}]}, {}, {"loras": [{"source": "f"}]}, {}]
    plain, with_lora, after_lora, with_endpoint, after_endpoint = (
        pixels(generate(module, prompt="a tree", seed=5, **SMALL, **job)[1]["images"][0]["image"]) for job in jobs
    )
    assert counters["stats"]["unique_graphs"] == graphs, "a job, or an adapter, compiled again"
    np.testing.assert_array_equal(after_lora, plain)  # no adapter left behind
    np.testing.assert_array_equal(after_endpoint, plain)
    assert not np.array_equal(with_lora, plain) and not np.array_equal(with_endpoint, with_lora)
    eager = load_handler(EXAMPLE, env)
    for job, compiled in zip(jobs[:2] + jobs[3:4], (plain, with_lora, with_endpoint), strict=True):
        _, expected = generate(eager, prompt="a tree", seed=5, **SMALL, **job)
        difference = np.abs(compiled.astype(int) - pixels(expected["images"][0]["image"]).astype(int))
        assert difference.max() <= 2, difference.max()  # inductor rounds differently, by a pixel level at most


def test_auto_dtype_is_bf16_for_flow_models_on_gpus_told_before_the_weights_load(handlers) -> None:
    module = handlers["flux-schnell"]
    assert module.pipeline_class_name() == "FluxPipeline"  # from model_index.json
    assert handlers["sd3.5-medium"].pipeline_class_name() == "StableDiffusion3Pipeline"

    def never() -> str:
        raise AssertionError("the CPU needs no look at the model")

    def native_bf16(including_emulation: bool) -> bool:  # torch.cuda.is_bf16_supported on an Ampere GPU
        return True

    assert module.auto_dtype("cpu", never, native_bf16) == torch.float32
    assert module.auto_dtype("cuda", module.pipeline_class_name, native_bf16) == torch.bfloat16
    assert module.auto_dtype("cuda", handlers["sd3.5-medium"].pipeline_class_name, native_bf16) == torch.bfloat16
    assert module.auto_dtype("cuda", lambda: "StableDiffusionXLPipeline", native_bf16) == torch.float16
    # GPUs without bf16 units, and both answers of torch's check: test_precision.py
