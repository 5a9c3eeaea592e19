"""04_multimodal: the modern VLM families through the handler, on tiny random-weight models built
offline with their real processors: Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3, SmolVLM 2, LLaVA-OneVision.

Every family: caption, answer and OpenAI chat with an image, streamed, equal to transformers' own
greedy `generate` on the same inputs; seeded sampling reproduces; several images in one message;
its MAX_IMAGES_PER_REQUEST; structured output that validates against its schema.
"""

from __future__ import annotations

import base64
import io
import json
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from tests.multimodal.test_handler import (
    EXAMPLE,
    GREEDY,
    image_question,
    image_uri,
    one,
    prepare,
    reference_answer,
)
from tests.shared.harness import lazy_handlers, load_handler, ok, openai_chat, run_job

# tiny model kind → (family the handler reports, model class, processor class, default max images)
FAMILIES: dict[str, tuple[str, str, str, int]] = {
    "qwen2-vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 8),
    "qwen2.5-vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 8),
    "gemma3-vlm": ("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor", 8),
    "idefics3": ("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor", 4),
    "smolvlm": ("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor", 4),
    "llava-onevision": ("llava-onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", 4),
}
KINDS = list(FAMILIES)


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per tiny model, built on first use and shared by the module's tests."""
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


def image_token_id(module: ModuleType) -> int:
    config = module.CONFIG
    found = getattr(config, "image_token_id", None)
    return found if found is not None else config.image_token_index


def image_tokens(module: ModuleType, job_input: dict[str, Any]) -> int:
    """How many image tokens the handler's prompt for this request holds."""
    return prepare(module, job_input).inputs["input_ids"][0].tolist().count(image_token_id(module))


def photo_uri(width: int, height: int) -> str:
    """A large image that stays small as a PNG (a gradient, not noise)."""
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sse_text(events: list[str]) -> tuple[str, list[ChatCompletionChunk]]:
    """The content of an OpenAI chat stream (chunks may hold several whole events) and its chunks."""
    stream = "".join(events)
    assert stream.endswith("data: [DONE]\n\n")
    blocks = [block for block in stream.split("\n\n") if block][:-1]
    chunks = [ChatCompletionChunk.model_validate(json.loads(block[len("data: ") :])) for block in blocks]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def two_images(text: str = "Compare them.") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_uri(seed=1)}},
                {"type": "image_url", "image_url": {"url": image_uri(120, 60, seed=2)}},
                {"type": "text", "text": text},
            ],
        },
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_the_family_and_its_processor_come_from_the_config(handlers, kind: str) -> None:
    module = handlers[kind]
    family, model_class, processor_class, max_images = FAMILIES[kind]
    assert module.FAMILY == family and type(module.MODEL).__name__ == model_class
    assert type(module.PROCESSOR).__name__ == processor_class
    assert module.MAX_IMAGES_PER_REQUEST == max_images
    assert module.TASKS[family] == ("caption", "answer", "chat")


@pytest.mark.parametrize("kind", KINDS)
def test_caption_and_answer_stream_and_match_raw_generate(handlers, kind: str) -> None:
    module = handlers[kind]
    for request in (
        {"task": "caption", "image": image_uri()},
        {"task": "answer", "image": image_uri(), "question": "What is in the picture?"},
    ):
        *deltas, last = ok(run_job(module.handler, {**request, "sampling_params": GREEDY, "stream": True}))
        assert deltas and all(set(d) == {"text"} and d["text"] for d in deltas), "text deltas, never empty"
        prepared = prepare(module, request)
        assert image_tokens(module, request) > 0, "the processor expanded the image into its tokens"
        assert last["usage"]["prompt_tokens"] == prepared.prompt_tokens
        reference = reference_answer(module, prepared.inputs, GREEDY["max_tokens"])
        assert "".join(d["text"] for d in deltas) == reference
        [whole] = ok(run_job(module.handler, {**request, "sampling_params": GREEDY}))
        assert whole["text"] == reference and whole["usage"] == last["usage"]


@pytest.mark.parametrize("kind", KINDS)
def test_openai_chat_with_an_image_streams_the_native_answer(handlers, kind: str) -> None:
    module = handlers[kind]
    body = {"model": "m", "messages": image_question(image_uri()), "temperature": 0, "max_tokens": 10}
    native = one(
        module, task="answer", image=image_uri(), question="What?", sampling_params=GREEDY | {"max_tokens": 10}
    )
    [response] = ok(run_job(module.handler, openai_chat(body)))
    assert ChatCompletion.model_validate(response).choices[0].message.content == native["text"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, chunks = sse_text(ok(run_job(module.handler, openai_chat(stream))))
    assert text == native["text"] and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == native["usage"]["prompt_tokens"]


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_sampling_reproduces(handlers, kind: str) -> None:
    module = handlers[kind]
    body = {"messages": two_images("Tell a story."), "temperature": 1.0, "max_tokens": 12, "stream": True}
    runs = [sse_text(ok(run_job(module.handler, openai_chat({**body, "seed": 5}))))[0] for _ in range(2)]
    assert runs[0] == runs[1]
    others = {sse_text(ok(run_job(module.handler, openai_chat({**body, "seed": seed}))))[0] for seed in range(4)}
    assert len(others) > 1, "another seed samples another answer"
    params = {"temperature": 1.0, "max_tokens": 12, "seed": 9}
    answers = {one(module, task="answer", image=image_uri(), question="Why?", sampling_params=params)["text"]}
    answers.add(one(module, task="answer", image=image_uri(), question="Why?", sampling_params=params)["text"])
    assert len(answers) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_several_images_in_one_message(handlers, kind: str) -> None:
    module = handlers[kind]
    messages = two_images()
    request = {"task": "chat", "messages": messages}
    [whole] = ok(run_job(module.handler, {**request, "sampling_params": GREEDY}))
    assert whole["text"] == reference_answer(module, prepare(module, request).inputs, GREEDY["max_tokens"])
    # Each image gets its own tokens, in order: as many as the two images asked about one at a time.
    *pictures, question = messages[1]["content"]
    alone = [
        image_tokens(module, {"task": "chat", "messages": [{"role": "user", "content": [p, question]}]})
        for p in pictures
    ]
    assert all(alone) and image_tokens(module, request) == sum(alone)
    too_many = [{"role": "user", "content": [messages[1]["content"][0]] * (module.MAX_IMAGES_PER_REQUEST + 1)}]
    result = run_job(module.handler, {"task": "chat", "messages": too_many})
    assert result["error"] == (
        f"messages: {module.MAX_IMAGES_PER_REQUEST + 1} images, more than the limit of "
        f"{module.MAX_IMAGES_PER_REQUEST} (MAX_IMAGES_PER_REQUEST)"
    )


SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["caption", "count"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("kind", KINDS)
def test_structured_output_from_an_image_validates(handlers, kind: str) -> None:
    module = handlers[kind]
    body = {
        "messages": image_question(image_uri()),
        "max_tokens": 80,
        "temperature": 1.0,
        "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "tags", "schema": SCHEMA}},
    }
    [response] = ok(run_job(module.handler, openai_chat(body)))
    jsonschema.validate(json.loads(response["choices"][0]["message"]["content"]), SCHEMA)
    answer = one(
        module,
        task="answer",
        image=image_uri(),
        question="Tag it.",
        json_schema=SCHEMA,
        sampling_params={"max_tokens": 80, "seed": 4, "temperature": 1.0},
    )
    jsonschema.validate(json.loads(answer["text"]), SCHEMA)


# ---- what differs between families ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwens_dynamic_resolution_is_bounded_by_min_and_max_image_tokens(tiny_model, kind: str) -> None:
    """A large photo would become hundreds of vision tokens at Qwen's own resolution (thousands on a
    real checkpoint); MAX_IMAGE_TOKENS caps each image, MIN_IMAGE_TOKENS floors a tiny one."""
    bounded = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model(kind)), "MAX_IMAGE_TOKENS": "16"})
    default = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model(kind))})
    assert default.MAX_IMAGE_TOKENS == 1280 and default.MIN_IMAGE_TOKENS == 4
    photo = {"task": "caption", "image": photo_uri(1000, 700)}
    assert image_tokens(default, photo) > 800, "unbounded by 16, the photo keeps its resolution"
    prepared = prepare(bounded, photo)
    count = image_tokens(bounded, photo)
    [(frames, height, width)] = prepared.inputs["image_grid_thw"].tolist()
    assert 4 <= count <= 16 and count == frames * height * width // 4, "2x2 patches merged into each token"
    assert bounded.PROCESSOR.image_processor.size["longest_edge"] == 16 * 28 * 28
    assert image_tokens(bounded, {"task": "caption", "image": image_uri(20, 20)}) >= 4
    [whole] = ok(run_job(bounded.handler, {**photo, "sampling_params": GREEDY}))
    assert whole["usage"]["prompt_tokens"] == prepared.prompt_tokens


def test_gemma3_prompt_starts_with_one_bos(handlers) -> None:
    """Gemma 3's template writes <bos> itself; the tokenizer must not add a second one."""
    module = handlers["gemma3-vlm"]
    ids = prepare(module, {"task": "caption", "image": image_uri()}).inputs["input_ids"][0].tolist()
    assert ids[0] == module.TOKENIZER.bos_token_id and ids.count(module.TOKENIZER.bos_token_id) == 1
    assert prepare(module, {"task": "caption", "image": image_uri()}).inputs["token_type_ids"].sum() > 0, (
        "image tokens are marked, so they attend to each other both ways"
    )


def test_one_vision_and_idefics3_tile_a_large_image_within_their_own_bound(handlers) -> None:
    """Their image tokens come from a fixed set of tiles: more pixels, never more tokens than the
    largest grid (OneVision's anyres_max_9) or the longest_edge tiling (Idefics3 resizes every image
    to it, so a small one gets the same tiles)."""
    for kind in ("llava-onevision", "idefics3"):
        module = handlers[kind]
        small = image_tokens(module, {"task": "caption", "image": image_uri(30, 30)})
        large = image_tokens(module, {"task": "caption", "image": photo_uri(1000, 700)})
        huge = image_tokens(module, {"task": "caption", "image": photo_uri(3000, 2000)})
        assert small <= large and huge <= large, (kind, small, large, huge)  # 6 MP: no more than 0.7 MP
        assert (small < large) == (kind == "llava-onevision"), (kind, small, large)


def test_auto_dtype_never_runs_gemma3_in_float16(handlers) -> None:
    """DTYPE=auto, decided as a pure function: Gemma 3 overflows in fp16 (04's README), so on a GPU
    it gets its checkpoint's bf16 where the GPU computes bf16 natively, else fp32; the other
    families keep fp16 on a GPU, and everything runs fp32 on CPU."""
    module = handlers["gemma3-vlm"]
    auto_dtype = module.auto_dtype  # families.auto_dtype, as the handler calls it
    assert auto_dtype("gemma3", "cuda", bf16_native=True) == "bfloat16"
    assert auto_dtype("gemma3", "cuda", bf16_native=False) == "float32"  # V100, T4: no native bf16
    for model_type in ("llava", "qwen2_5_vl", "idefics3", "clip", "siglip", "blip-2"):
        assert auto_dtype(model_type, "cuda", bf16_native=True) == "float16"
    assert {auto_dtype(kind, "cpu", bf16_native=True) for kind in ("gemma3", "llava", "clip")} == {"float32"}
    assert str(module.TORCH_DTYPE) == "torch.float32"  # this CPU run
