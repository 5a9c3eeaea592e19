"""The contrastive worker's tasks (CLIP, SigLIP): classify, embed and OpenAI's embeddings, each
answered with one plain-JSON chunk that fits Runpod's limit on a job's result.

`ContrastiveTasks` holds what the handler loaded (the model, contrastive.py; the batcher that
shares forward passes between concurrent jobs, clip_batcher.py; the image fetcher,
image_fetcher.py) and the two settings the answers need, so this module imports nothing from the
handler. The generating families' inference is the handler's own (handler.py, "4. Inference").
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from clip_batcher import EncodeBatcher
from contrastive import ContrastiveModel
from errors import RequestError
from image_fetcher import ImageFetcher
from schema import MAX_TEXT_CHARS, ClassifyRequest, EmbedRequest, OpenAIEmbeddingRequest
from token_ids import decode_token_ids

# A float32 of a unit vector prints as about 20 characters in JSON ("-0.012706473283469677, ");
# 10 is a floor no real embedding goes under, so a result estimated with it is certainly too big.
MIN_JSON_FLOAT_BYTES = 10


def result_bytes_at_least(vectors: int, dimensions: int, encoding_format: str) -> int:
    """A floor on the JSON size of `vectors` embeddings: base64 exactly, floats at MIN_JSON_FLOAT_BYTES each."""
    if encoding_format == "base64":
        return vectors * (4 * -(-4 * dimensions // 3) + 2)
    return vectors * dimensions * MIN_JSON_FLOAT_BYTES


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A JSON value for one embedding: numbers, or base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@dataclass
class ContrastiveTasks:
    embedder: ContrastiveModel
    batcher: EncodeBatcher  # encodes of concurrent jobs, in shared batches on the model's thread
    fetcher: ImageFetcher
    served_model_name: str  # the "model" of every answer
    max_result_bytes: int  # MAX_RESULT_BYTES: Runpod's limit for a job's result
    # Token counts (for `truncated` and `usage`) run on one thread of their own, the only user of the
    # model's counting tokenizer: a request of 2,048 texts of 4,000 characters takes seconds to
    # tokenize, which on the event loop would stall every other job and the SDK's heartbeats.
    counter: Executor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="count"))

    async def token_counts(self, texts: list[str]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.counter, self.embedder.token_counts, texts)

    def truncated_indices(self, counts: list[int]) -> list[int]:
        """Inputs longer than the text tower reads (77 tokens for CLIP, 64 for SigLIP): cut, as 03 reports."""
        return [index for index, count in enumerate(counts) if count > self.embedder.max_text_tokens]

    async def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit image embeddings, preprocessed on this job's own thread, encoded in a shared batch."""
        if not images:
            return torch.empty(0, self.embedder.dimensions)
        pixels = await asyncio.get_running_loop().run_in_executor(None, self.embedder.preprocess_images, images)
        return await self.batcher.images(pixels)

    async def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return await self.batcher.texts(texts) if texts else torch.empty(0, self.embedder.dimensions)

    async def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        """Zero-shot classification: the image against each label's caption, as one batch entry each.
        CLIP: a softmax over the labels (they sum to 1); SigLIP: each label's own sigmoid."""
        images = await self.fetcher.fetch([("image", request.image)])
        captions = [request.hypothesis_template.format(label) for label in request.labels]
        image_rows, caption_rows = await asyncio.gather(self.encode_images(images), self.encode_texts(captions))
        probabilities = self.embedder.probabilities(image_rows[0], caption_rows)
        ranked = sorted(zip(request.labels, probabilities, strict=True), key=lambda pair: pair[1], reverse=True)
        return {
            "model": self.served_model_name,
            "labels": [{"label": label, "score": score} for label, score in ranked],
            "truncated": self.truncated_indices(await self.token_counts(captions)),  # indices into labels as sent
        }

    def check_result_budget(self, vectors: int, dimensions: int, encoding_format: str) -> None:
        """Refuse, before any work, an embed result that would certainly exceed MAX_RESULT_BYTES."""
        floor = result_bytes_at_least(vectors, dimensions, encoding_format)
        if floor > self.max_result_bytes:
            fewer = (
                ", fewer dimensions or encoding_format base64" if encoding_format == "float" else " or fewer dimensions"
            )
            raise RequestError(
                f"the result would be at least {floor} bytes ({vectors} embeddings of {dimensions} dimensions), over "
                f"MAX_RESULT_BYTES ({self.max_result_bytes}), Runpod's limit for a job's result: send fewer inputs per"
                f" job{fewer}"
            )

    def fits_result_budget(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result itself, measured as Runpod will send it: too large is a clear error, never a lost result."""
        size = len(json.dumps(result, ensure_ascii=False))
        if size > self.max_result_bytes:
            raise RequestError(
                f"the result is {size} bytes, over MAX_RESULT_BYTES ({self.max_result_bytes}), Runpod's limit for a"
                " job's result: send fewer inputs per job"
            )
        return result

    async def embed(self, request: EmbedRequest) -> dict[str, Any]:
        """Image and text embeddings in the model's shared space, unit length: cosine similarity is a dot product."""
        dimensions = self.embedder.dimensions
        self.check_result_budget(len(request.images) + len(request.texts), dimensions, "float")
        images = await self.fetcher.fetch([(f"images.{index}", source) for index, source in enumerate(request.images)])
        image_rows, text_rows = await asyncio.gather(self.encode_images(images), self.encode_texts(request.texts))
        response: dict[str, Any] = {"model": self.served_model_name, "dimensions": dimensions}
        if request.images:
            response["image_embeddings"] = image_rows.tolist()
        if request.texts:
            response["text_embeddings"] = text_rows.tolist()
            response["truncated"] = self.truncated_indices(await self.token_counts(request.texts))  # into texts
        return self.fits_result_budget(response)

    async def openai_embeddings(self, request: OpenAIEmbeddingRequest) -> dict[str, Any]:
        """OpenAI's embeddings object for a mix of texts and images (or for token-id arrays), in input order."""
        embedder = self.embedder
        dimensions = request.dimensions or embedder.dimensions
        if dimensions > embedder.dimensions:
            raise RequestError(
                f"openai_input.dimensions: this model's embeddings have {embedder.dimensions} dimensions"
            )
        self.check_result_budget(len(request.input), dimensions, request.encoding_format)
        cut: set[int] = set()  # decoded texts cut at MAX_TEXT_CHARS: truncated whatever their count
        if request.token_ids:  # OpenAI's cl100k_base ids (LangChain's default): back to text, off the event loop
            decoded = await asyncio.get_running_loop().run_in_executor(None, decode_token_ids, request.input)
            # LangChain sends up to 8,191 ids an input (~30,000 characters); CLIP reads 77 tokens of it
            # (SigLIP 64), far inside MAX_TEXT_CHARS, so the rest is cut before any tokenizer pays for it.
            cut = {index for index, text in enumerate(decoded) if len(text) > MAX_TEXT_CHARS}
            texts = [text[:MAX_TEXT_CHARS] for text in decoded]
            image_at, text_at = [], list(range(len(texts)))
        else:
            image_at = [index for index, item in enumerate(request.input) if request.is_image(item)]
            text_at = [index for index, item in enumerate(request.input) if not request.is_image(item)]
            texts = [request.input[index] for index in text_at]
        images = await self.fetcher.fetch([(f"openai_input.input.{index}", request.input[index]) for index in image_at])
        image_rows, text_rows = await asyncio.gather(self.encode_images(images), self.encode_texts(texts))
        rows = torch.empty(len(request.input), embedder.dimensions)
        rows[torch.tensor(image_at, dtype=torch.long)] = image_rows
        rows[torch.tensor(text_at, dtype=torch.long)] = text_rows
        # Matryoshka-style truncation as 03 offers it (CLIP was not trained for it: the first dimensions
        # keep less than a trained model's would), re-normalised to unit length.
        rows = torch.nn.functional.normalize(rows[:, :dimensions], dim=-1)
        counts = await self.token_counts(texts)
        tokens = sum(min(count, embedder.max_text_tokens) for count in counts)
        response: dict[str, Any] = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": encode_vector(row, request.encoding_format)}
                for index, row in enumerate(rows)
            ],
            "model": self.served_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},  # the text tokens read
        }
        # OpenAI's shape has no field for this; as 03, one is added only when it has something to say.
        if truncated := {text_at[position] for position in self.truncated_indices(counts)} | cut:
            response["truncated"] = sorted(truncated)
        return self.fits_result_budget(response)
