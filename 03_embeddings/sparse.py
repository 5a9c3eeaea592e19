"""Sparse vectors (MODEL_KIND=sparse): what a SPLADE model's output becomes on its way to the caller.

A sentence-transformers `SparseEncoder` (SPLADE, or any model ending in SpladePooling) gives each
text one weight per vocabulary term, nearly all zero (30,522 terms for a BERT vocabulary, ~100-300
of them active for a trained SPLADE). Only the active terms travel: `{"indices", "values"}`, the
shape Qdrant's `SparseVector`, Elasticsearch's and Pinecone's sparse values take.

Pure functions on arrays, tested directly (tests/embeddings/test_sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Bytes one active term takes in the JSON result, at the most: a vocabulary index ("30521, ")
# and a float32 written out as a JSON number (about 20 characters; 25 at the most).
MAX_JSON_BYTES_PER_INDEX = 8
MAX_JSON_BYTES_PER_VALUE = 25
# Per vector: the brackets and keys of {"indices": [], "values": []}, separators included.
JSON_BYTES_PER_VECTOR = len('{"indices": [], "values": []}, ')


@dataclass(frozen=True)
class SparseVector:
    """One text's active terms: vocabulary indices in ascending order, and their weights."""

    indices: np.ndarray  # int64
    values: np.ndarray  # float32, all non-zero


def active_terms(embeddings: torch.Tensor) -> list[SparseVector]:
    """The non-zero entries of each row of a (texts × vocabulary) batch, as SparseVectors."""
    rows = embeddings.float().cpu()
    vectors = []
    for row in rows:
        indices = torch.nonzero(row, as_tuple=True)[0]  # ascending
        vectors.append(SparseVector(indices.numpy(), row[indices].numpy()))
    return vectors


def top_terms(vector: SparseVector, max_active_dims: int | None) -> SparseVector:
    """At most `max_active_dims` terms, the largest in absolute value (as sentence-transformers'
    `max_active_dims` keeps them), still in ascending index order; None keeps every term."""
    if max_active_dims is None or len(vector.indices) <= max_active_dims:
        return vector
    keep = np.sort(np.argpartition(-np.abs(vector.values), max_active_dims - 1)[:max_active_dims])
    return SparseVector(vector.indices[keep], vector.values[keep])


def sparse_json(vector: SparseVector) -> dict[str, list[Any]]:
    """Plain JSON for one vector: Python ints and floats (json.dumps cannot encode numpy values)."""
    return {"indices": vector.indices.tolist(), "values": vector.values.tolist()}


def sparse_result_ceiling(vectors: list[SparseVector], overhead: int) -> int:
    """The most bytes the JSON result of `vectors` can take (`overhead` for the fields beside them)."""
    terms = sum(len(vector.indices) for vector in vectors)
    per_term = MAX_JSON_BYTES_PER_INDEX + MAX_JSON_BYTES_PER_VALUE
    return terms * per_term + len(vectors) * JSON_BYTES_PER_VECTOR + overhead
