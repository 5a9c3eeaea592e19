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

# Bytes one value takes in the JSON result, separator included. Written out as a JSON number, a
# float32 is short only when it is a round binary fraction (0.5, 0.0): real embeddings average
# about 20 characters ("-0.08346541225910187, "), never under 8. An int8 value is at least "0, ".
MIN_JSON_BYTES_PER_FLOAT = 8
MAX_JSON_BYTES_PER_FLOAT = 25
MIN_JSON_BYTES_PER_INT = 3
# Room for everything beside the vectors (model name, usage, truncated indices).
RESULT_OVERHEAD_BYTES = 1_000


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


def too_large(size: int, limit: int, certain: bool) -> str:
    """The error for a result of `size` bytes over `limit` (MAX_RESULT_BYTES), with the ways out."""
    amount = f"at least {size:,}" if certain else f"{size:,}"
    return (
        f"the result would be {amount} bytes, over MAX_RESULT_BYTES ({limit:,}: Runpod's limit "
        'for a job result); send encoding_format "base64" (about a quarter of the size), fewer texts '
        "per request, or fewer dimensions"
    )


def measured(output: dict[str, Any], ceiling: int, limit: int) -> dict[str, Any]:
    """`output`, after measuring it when it might be over `limit` (its `ceiling` says so; json.dumps
    costs time, so only then): a result Runpod would refuse becomes this job's clear error."""
    if ceiling > limit and (size := len(json.dumps(output).encode())) > limit:
        return {"error": too_large(size, limit, certain=False)}
    return output
