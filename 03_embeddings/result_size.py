"""The size of a job's result against MAX_RESULT_BYTES, Runpod's limit for a job's result (20 MB on
/runsync, and on /run's /status): a result over it never reaches the caller. So a request whose
result would certainly pass it is refused before any work, sized with the fewest bytes a value
can take (`result_bytes`), and a result that might pass it, sized with the most, is measured
before it is returned (`measured`): either way the caller gets an error that names the ways out.

Pure functions, tested directly (tests/embeddings/test_handler.py). A sparse result's ceiling is
sparse.sparse_result_ceiling: its size is known only once its active terms are.
"""

from __future__ import annotations

import json
from typing import Any

from errors import RequestError

# Bytes one value takes in the JSON result, separator included. A float32 is written in at most 9
# significant digits (dense.float32_decimals), fewer only when its decimal ends in zeros: a unit
# vector's values average about 14 characters ("-0.0834654122, "), never under 8; 25 covers a value
# outside dense.DECIMAL_RANGE, written with float64's 17. An int8 value is at least "0, ".
MIN_JSON_BYTES_PER_FLOAT = 8
MAX_JSON_BYTES_PER_FLOAT = 25
MIN_JSON_BYTES_PER_INT = 3
# Room for everything beside the vectors (model name, usage, truncated indices).
RESULT_OVERHEAD_BYTES = 1_000
# One result of a ranking, without its document's text, at the fewest bytes (TEI's keys, the
# shortest, with a one-digit index and a score written as "0.0") and at the most (Cohere's keys,
# the longest, with a seven-digit index and the longest float json writes).
MIN_RERANK_RESULT_BYTES = len('{"index": 0, "score": 0.0}, ')
MAX_RERANK_RESULT_BYTES = len(
    '{"index": 1000000, "relevance_score": -1.2345678901234567e-300, "document": {"text": ""}}, '
)
MIN_DOCUMENT_KEY_BYTES = len(', "text": ""')  # a returned document's key and quotes, at the fewest
# json.dumps writes a character as itself (1 byte) at the fewest, as two \uXXXX escapes (12) at the most.
MAX_JSON_BYTES_PER_CHAR = 12
# What to send instead, when an embedding result would be over the limit.
EMBEDDING_WAYS_OUT = (
    'send encoding_format "base64" (about a third of the size), fewer texts per request, or fewer dimensions'
)


def result_bytes(count: int, dimensions: int, precision: str, encoding_format: str, json_bytes: int) -> int:
    """The size of a result of `count` vectors: exact for base64, with `json_bytes` per value for
    JSON numbers (MIN_JSON_BYTES_PER_FLOAT for a floor, MAX_... for a ceiling)."""
    values = dimensions // 8 if precision in ("binary", "ubinary") else dimensions
    raw_bytes = 4 if precision == "float32" else 1
    if encoding_format == "base64":
        per_vector = 4 * -(-values * raw_bytes // 3) + len('"", ')  # base64 of the bytes, quoted
    else:
        per_vector = values * (json_bytes if precision == "float32" else MIN_JSON_BYTES_PER_INT) + len("[], ")
    return count * per_vector + RESULT_OVERHEAD_BYTES


def rerank_result_bytes(request: Any, most: bool) -> int:
    """The size of the ranking a rerank request (schema.RerankRequest) gets, at the fewest bytes (its
    top_n shortest documents, a byte a character) or, with `most`, at the most (its longest ones)."""
    count = min(request.top_n or len(request.documents), len(request.documents))
    size = count * (MAX_RERANK_RESULT_BYTES if most else MIN_RERANK_RESULT_BYTES)
    if request.return_documents:  # which documents come back is known only once they are scored
        chars = sorted(map(len, request.documents), reverse=most)[:count]
        size += sum(chars) * MAX_JSON_BYTES_PER_CHAR if most else sum(chars) + count * MIN_DOCUMENT_KEY_BYTES
    return size + RESULT_OVERHEAD_BYTES if most else size


def too_large(size: int, limit: int, certain: bool, ways_out: str = EMBEDDING_WAYS_OUT) -> str:
    """The error for a result of `size` bytes over `limit` (MAX_RESULT_BYTES), with the ways out."""
    amount = f"at least {size:,}" if certain else f"{size:,}"
    limit_named = f"MAX_RESULT_BYTES ({limit:,}: Runpod's limit for a job result)"
    return f"the result would be {amount} bytes, over {limit_named}; {ways_out}"


def measured(output: Any, ceiling: int, limit: int, ways_out: str = EMBEDDING_WAYS_OUT) -> Any:
    """`output`, after measuring it when it might be over `limit` (its `ceiling` says so; json.dumps
    costs time, so only then): a result Runpod would refuse becomes this job's clear error."""
    if ceiling > limit and (size := len(json.dumps(output).encode())) > limit:
        return {"error": too_large(size, limit, certain=False, ways_out=ways_out)}
    return output


def dense_result_bytes(count: int, request: Any, dimensions: int, json_bytes: int) -> int:
    """The size of the result of `count` dense vectors of `dimensions` shaped by `request`."""
    precision = getattr(request, "precision", "float32")
    return result_bytes(count, request.dimensions or dimensions, precision, request.encoding_format, json_bytes)


def check_result_budget(count: int, request: Any, dimensions: int, limit: int) -> None:
    """Refuse, before any work, a request whose result would certainly exceed `limit` (MAX_RESULT_BYTES)."""
    if (floor := dense_result_bytes(count, request, dimensions, MIN_JSON_BYTES_PER_FLOAT)) > limit:
        raise RequestError(too_large(floor, limit, certain=True))
