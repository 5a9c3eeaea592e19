"""Reranking with a cross-encoder (RERANK_MODEL_NAME): every (query, document) pair scored, best
first, and the ranking in the shape its client reads.

The request is schema.RerankRequest, whichever client sent it (Cohere, Jina, Infinity, TEI);
`rerank_shape` (schema.py) notes at validation whose answer it expects.
"""

from __future__ import annotations

from typing import Any

import torch

from schema import RerankRequest


def rerank(reranker: Any, request: RerankRequest, batch_size: int) -> list[tuple[int, float]]:
    """Every (query, document) pair through the cross-encoder: (index, score), best first."""
    # raw_scores: the logits, as TEI and Infinity return them when asked; else the model's own
    # activation (a sigmoid for the usual one-logit rerankers).
    activation = torch.nn.Identity() if request.raw_scores else None
    with torch.inference_mode():
        ranked = reranker.rank(
            request.query,
            request.documents,
            top_k=request.top_n,
            batch_size=batch_size,
            show_progress_bar=False,
            activation_fn=activation,
        )
    return [(int(item["corpus_id"]), float(item["score"])) for item in ranked]


def rerank_response(
    ranked: list[tuple[int, float]], request: RerankRequest, model_name: str | None
) -> dict[str, Any] | list[dict[str, Any]]:
    """The ranking in the shape its client reads (see `schema.rerank_shape`), best first:
    TEI:      [{"index", "score", "text"?}]
    Infinity: {"model", "results": [{"index", "relevance_score", "document"?: text}]}
    Cohere, Jina: the same with "document"?: {"text": text}"""
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
