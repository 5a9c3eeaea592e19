"""Reranking with a cross-encoder (RERANK_MODEL_NAME): every (query, document) pair scored, best
first, and the ranking in the shape its client reads.

The request is schema.RerankRequest, whichever client sent it (Cohere, Jina, Infinity, TEI);
`rerank_shape` (schema.py) notes at validation whose answer it expects.

A rerank shares the model thread fairly with embeddings: its pairs are tokenized (counted, and cut
as the request asks) on the tokenize thread, then queue in the embedder's batcher (batcher.py) as
items of their own, with the cross-encoder as their model function. So they are cut into batches
by the same token budget, and a one-line embedding job that arrives during a 1,000-document rerank
rides in the very next batch instead of waiting for all 1,000 pairs. Within a batch, the
cross-encoder runs at most `batch_size` (BATCH_SIZE) pairs per pass.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from batcher import TokenBudgetBatcher
from encoder import without_first_tokens
from errors import RequestError
from result_size import measured, rerank_result_bytes, too_large
from schema import RerankRequest

# What to send instead, when a ranking would be over MAX_RESULT_BYTES: its documents are what makes it big.
RERANK_WAYS_OUT = (
    "send fewer documents per request, a smaller top_n, or return_documents false (indices and scores only)"
)


@dataclass(frozen=True)
class Pair:
    """One (query, document) pair as the batcher carries it; `raw` asks for the logits (raw_scores)."""

    query: str
    document: str
    raw: bool


class Reranker:
    """A loaded CrossEncoder behind the batcher: `pairs` on the tokenize thread, `score` on the model's."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        # The tokens it reads per pair, query and special tokens included: its preprocessing cuts
        # longer pairs there (truncation "longest_first": the longer of query and document loses its end).
        self.max_length: int = model.max_seq_length
        # The tokenize thread's own copy: a fast tokenizer keeps settings in state each call rewrites,
        # and the model thread's predict uses the model's.
        self.tokenizer = copy.deepcopy(model.tokenizer)

    def pairs(self, request: RerankRequest) -> tuple[list[Pair], list[int]]:
        """The request's pairs and their lengths in tokens (at most max_length, what a batch pads to).
        A pair over max_length is refused with `truncate: false`; with `truncation_direction: "left"`
        its document loses its first tokens (the query stays whole) so that it fits."""
        query, documents = request.query, list(request.documents)
        counts = [len(ids) for ids in self.tokenizer([query] * len(documents), documents, verbose=False)["input_ids"]]
        if long := [i for i, count in enumerate(counts) if count > self.max_length]:
            if not request.truncate:
                raise RequestError(
                    f"documents.{long[0]}: {counts[long[0]]} tokens with the query, more than the "
                    f"{self.max_length} this reranker reads (its max_seq_length), and truncate is false: "
                    "shorten it, or send truncate: true to cut it"
                )
            if request.truncation_direction == "left":
                for i in long:
                    documents[i] = without_first_tokens(documents[i], counts[i] - self.max_length, self.tokenizer)
        lengths = [min(count, self.max_length) for count in counts]
        return [Pair(query, document, request.raw_scores) for document in documents], lengths

    def score(self, pairs: list[Pair]) -> list[float]:
        """One batch on the model thread (its pairs share `raw`: see `rerank`), in passes of batch_size."""
        # raw_scores: the logits, as TEI and Infinity return them when asked; else the model's own
        # activation (a sigmoid for the usual one-logit rerankers).
        activation = torch.nn.Identity() if pairs[0].raw else None
        with torch.inference_mode():
            scores = self.model.predict(
                [(pair.query, pair.document) for pair in pairs],
                batch_size=self.batch_size,
                show_progress_bar=False,
                activation_fn=activation,
            )
        return [float(score) for score in scores]


def check_rerank_budget(request: RerankRequest, limit: int) -> None:
    """Refuse, before any work, a ranking that would certainly be over `limit` (MAX_RESULT_BYTES)."""
    if (floor := rerank_result_bytes(request, most=False)) > limit:
        raise RequestError(too_large(floor, limit, certain=True, ways_out=RERANK_WAYS_OUT))


async def rerank(
    reranker: Reranker, request: RerankRequest, batcher: TokenBudgetBatcher, tokenize_thread: Executor
) -> list[tuple[int, float]]:
    """Every (query, document) pair through the cross-encoder, in the batcher's batches: (index,
    score), best first (ties in document order, as CrossEncoder.rank), the first top_n."""
    pairs, lengths = await asyncio.get_running_loop().run_in_executor(tokenize_thread, reranker.pairs, request)
    # The group keeps raw and activated scores in batches of their own: one activation per pass.
    scores = await batcher.submit(pairs, lengths, group=("rerank", request.raw_scores), run=reranker.score)
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    return [(index, scores[index]) for index in order[: request.top_n]]


def rerank_response(
    ranked: list[tuple[int, float]], request: RerankRequest, model_name: str | None, max_result_bytes: int
) -> dict[str, Any] | list[dict[str, Any]]:
    """The ranking in the shape its client reads (see `schema.rerank_shape`), best first, measured
    when it might be over `max_result_bytes` (MAX_RESULT_BYTES: then the job's error instead):
    TEI:      [{"index", "score", "text"?}]
    Infinity: {"model", "results": [{"index", "relevance_score", "document"?: text}]}
    Cohere, Jina: the same with "document"?: {"text": text}"""
    ceiling = rerank_result_bytes(request, most=True)
    return measured(ranking(ranked, request, model_name), ceiling, max_result_bytes, RERANK_WAYS_OUT)


def ranking(
    ranked: list[tuple[int, float]], request: RerankRequest, model_name: str | None
) -> dict[str, Any] | list[dict[str, Any]]:
    """The ranking in the shape `rerank_response` describes."""
    documents = request.documents if request.return_documents else None
    if request._shape == "tei":
        return [
            {"index": index, "score": score, **({"text": documents[index]} if documents else {})}
            for index, score in ranked
        ]
    results = []
    for index, score in ranked:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if documents:
            result["document"] = {"text": documents[index]} if request._shape == "cohere" else documents[index]
        results.append(result)
    return {"model": model_name, "results": results}
