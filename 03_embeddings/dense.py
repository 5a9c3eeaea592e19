"""Dense vectors: what a model's output becomes on its way to the caller.

Each job shapes the full-size float32 vectors the model gave with its own options: Matryoshka
truncation to `dimensions`, unit length if asked, sentence-transformers' quantization to
`precision`, then plain JSON numbers or base64 (result_size.py says how many bytes that takes).
The sparse counterpart is sparse.py.

Pure functions on arrays, tested directly (tests/embeddings/test_handler.py).
"""

from __future__ import annotations

import base64

import numpy as np
from sentence_transformers import quantize_embeddings


def shape_embeddings(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka-truncate to `dimensions`, then scale each row to unit length if asked."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return vectors.astype(np.float32, copy=False)


def quantize(
    vectors: np.ndarray, precision: str, calibration: np.ndarray, dimensions: int | None, normalize: bool
) -> np.ndarray:
    """sentence-transformers' quantization, with int8/uint8 ranges from the raw `calibration`
    embeddings shaped exactly like the request's, so every request of the same shape shares one scale."""
    if precision == "float32":
        return vectors
    calibration = shape_embeddings(calibration, dimensions, normalize)
    return quantize_embeddings(vectors, precision=precision, calibration_embeddings=calibration)


class JSONVector(list):
    """A plain JSON list of numbers whose repr is a one-line summary.

    The runpod SDK formats every job's output into two debug-log f-strings, even with debug logs
    off (`rp_job.run_job`). For a list of floats that repr costs more than the JSON itself (about
    0.9 ms for one 384-dimension vector, measured): a third of the work of a one-line query on a
    CPU, where it competes with the model for cores. json.dumps writes a list subclass as a list.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<vector of {len(self)} values>"


def encode_vector(vector: np.ndarray, encoding_format: str) -> JSONVector | str:
    """A JSON value for one embedding: a list of numbers, or base64 of its bytes (little-endian
    float32 for floats, one byte per value for the quantized precisions)."""
    if encoding_format == "base64":
        raw = vector.astype("<f4") if vector.dtype.kind == "f" else vector
        return base64.b64encode(raw.tobytes()).decode("ascii")
    if vector.dtype.kind == "f":
        vector = float32_decimals(vector)
    return JSONVector(vector.tolist())  # plain Python numbers: json.dumps cannot encode numpy values


# Nine significant digits name every float32 exactly (one unit of the ninth digit is at most 1e-8
# of the value, a float32's half step at least 3e-8 of it). Written with the 17 digits of the
# float64 it becomes in Python, a 384-dimension vector is 8.4 kB of JSON and json.dumps takes
# 190 µs for it, the largest part of a one-line query's work on the event loop; with 9, 5.6 kB
# and 120 µs (float32_decimals costs 20). TEI too writes a float32 with its own digits.
FLOAT32_DIGITS = 9
# Within these magnitudes the decimal is computed exactly as below (a power of ten up to 10**22 is
# a float64 exactly, and the rounded value is below 10**9); any other value keeps its 17 digits.
DECIMAL_RANGE = (1e-14, 1e8)
POWERS_OF_TEN = np.array([float(10**k) for k in range(23)])


def float32_decimals(vector: np.ndarray) -> np.ndarray:
    """Each float32 as the float64 nearest its 9-significant-digit decimal, which json.dumps writes
    in at most 9 digits and which converts back to exactly the same float32 (checked per value:
    one that would not keeps its own 17 digits)."""
    exact = vector.astype(np.float64)
    magnitude = np.abs(exact)
    within = (magnitude >= DECIMAL_RANGE[0]) & (magnitude < DECIMAL_RANGE[1])
    exponent = np.floor(np.log10(np.where(within, magnitude, 1.0))).astype(np.intp)  # -14 to 7
    scale = POWERS_OF_TEN[FLOAT32_DIGITS - 1 - exponent]  # 10**1 to 10**22
    decimal = np.rint(exact * scale) / scale  # an integer over a power of ten: IEEE division rounds it to nearest
    return np.where(within & (decimal.astype(np.float32) == vector), decimal, exact)
