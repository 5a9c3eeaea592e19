"""Finished images to the caller: encoded, then uploaded to S3-compatible storage or returned inline
as data URIs, within the result size Runpod accepts.

`deliver` encodes each image (images.encode_image) and, when a `Bucket` is configured, uploads it
and returns presigned URLs; otherwise, or when the upload fails, it returns data URIs if they fit
the bytes left in the result, and raises DeliveryError, saying why and what to change, if they do
not. `refuse_what_cannot_fit` lets handler.py refuse a request that cannot fit before any work.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import runpod
from runpod.serverless.utils import rp_upload

from errors import RequestError
from images import data_uri, encode_image
from planning import Generated, Job
from schema import ImageRequest

log = runpod.RunPodLogger()

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A generated image's PNG takes at least about 1 byte per pixel (photographic SDXL output at 1024²
# is ~1.5-2 MB), and base64 adds a third: the floor used to refuse a request that cannot fit.
PNG_MIN_BYTES_PER_PIXEL = 1.0
BASE64_GROWTH = 4 / 3
WAYS_OUT = "configure S3 upload (BUCKET_ENDPOINT_URL and keys), ask for fewer images, or use output_format jpeg or webp"
# Runpod's cap on one streamed chunk ("The maximum size for a single streamed payload chunk is
# 1 MB", its /stream API reference). One 1024² PNG is 2-3 MB as a data URI.
STREAM_CHUNK_BYTES = 1_000_000
PART_ENVELOPE_BYTES = 256  # room in an image_part chunk for its keys beside the data


@dataclass(frozen=True)
class Bucket:
    """S3-compatible storage for outputs (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, ...)."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    name: str

    def credentials(self) -> dict[str, str]:
        """In the shape the runpod SDK's S3 helper takes."""
        return {
            "endpointUrl": self.endpoint_url,
            "accessId": self.access_key_id,
            "accessSecret": self.secret_access_key,
        }


def upload(bucket: Bucket, job_id: str, index: int, seed: int, data: bytes, output_format: str) -> str:
    """Store one image with the SDK's S3 helper and return its presigned URL (valid 7 days)."""
    with tempfile.NamedTemporaryFile(suffix=f".{output_format}") as file:
        file.write(data)
        file.flush()
        return rp_upload.upload_file_to_bucket(
            file_name=f"{index}-{seed}.{output_format}",
            file_location=file.name,
            bucket_creds=bucket.credentials(),
            bucket_name=bucket.name,
            prefix=job_id,
            extra_args={"ContentType": MIME[output_format]},
        )


class DeliveryError(Exception):
    """Finished images that cannot reach the caller; the message says why and what to change."""


def upload_failure(error: Exception, bucket_name: str) -> str:
    """An upload's failure as the caller can act on it: the bucket, and S3's error code and HTTP
    status when the bucket answered (boto3 wraps S3's answer; the keys are never in it)."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ClientError):
        code = cause.response.get("Error", {}).get("Code", "unknown error")
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"the upload to bucket {bucket_name!r} failed: {code} (HTTP {status})"
    return f"the upload to bucket {bucket_name!r} failed: {type(error).__name__} (no answer from BUCKET_ENDPOINT_URL)"


def inline_size(located: list[str]) -> int:
    return sum(len(where) for where in located)


def smallest_result_bytes(output_format: str, num_images: int, width: int, height: int) -> int:
    """A floor on the images' size as data URIs, to refuse before the work a result that cannot
    fit. PNG only: a JPEG or WebP can be small enough for any size."""
    if output_format != "png":
        return 0
    return int(num_images * width * height * PNG_MIN_BYTES_PER_PIXEL * BASE64_GROWTH)


def refuse_what_cannot_fit(
    request: ImageRequest, width: int, height: int, max_result_bytes: int, envelope_bytes: int
) -> None:
    """RequestError when the request's images, inline as data URIs, cannot fit the result with
    `envelope_bytes` of room for the rest (the floor of smallest_result_bytes): before any work."""
    floor = smallest_result_bytes(request.output_format, request.num_images, width, height)
    if floor > max_result_bytes - envelope_bytes:
        raise RequestError(
            f"{request.num_images} PNG image(s) of {width}x{height} come to at least {floor} bytes as data URIs,"
            f" over the result limit of {max_result_bytes} bytes (MAX_RESULT_BYTES): {WAYS_OUT}"
        )


def deliver(
    job_id: str, job: Job, images: list[Generated], bucket: Bucket | None, budget: int, max_result_bytes: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Encode (and upload to `bucket`, if any) every image within `budget` bytes of result; returns
    the images with their seeds, and the time each part took. An upload that fails falls back to
    data URIs when they fit, with the upload's error in each image; otherwise DeliveryError says
    why, naming `max_result_bytes` (MAX_RESULT_BYTES)."""
    started = time.perf_counter()
    output_format, seeds = job.request.output_format, job.seeds
    encoded = [encode_image(generated.image, output_format, job.request.output_quality) for generated in images]
    timings = {"encode_ms": (time.perf_counter() - started) * 1000}
    located: list[str] | None = None
    upload_error = None
    if bucket is not None:
        started = time.perf_counter()
        try:
            located = [
                upload(bucket, job_id, i, seed, data, output_format)
                for i, (seed, data) in enumerate(zip(seeds, encoded, strict=True))
            ]
        except Exception as error:  # noqa: BLE001 - boto3 and botocore raise many types; all are reported
            upload_error = upload_failure(error, bucket.name)
            log.error(f"{upload_error}: {type(error).__name__}: {error}", job_id)
        timings["upload_ms"] = (time.perf_counter() - started) * 1000
    if located is None:
        located = [data_uri(data, output_format) for data in encoded]
        if inline_size(located) > budget:
            size = f"the {len(located)} image(s) come to {inline_size(located)} bytes as data URIs"
            if upload_error:
                raise DeliveryError(
                    f"{upload_error}, and {size}, over the result limit of {max_result_bytes} bytes (MAX_RESULT_BYTES)"
                    " to return them inline: fix the bucket, or ask for fewer images or output_format jpeg or webp"
                )
            raise DeliveryError(
                f"{size}, over the result limit of {max_result_bytes} bytes (MAX_RESULT_BYTES): {WAYS_OUT}"
            )
    results = []
    for where, seed, generated in zip(located, seeds, images, strict=True):
        result: dict[str, Any] = {"image": where, "seed": seed}
        if upload_error:
            result["upload_error"] = upload_error
        if generated.nsfw is not None:
            result["nsfw_content_detected"] = generated.nsfw
        results.append(result)
    return results, timings


def within_stream_chunks(final: dict[str, Any], limit: int = STREAM_CHUNK_BYTES) -> list[dict[str, Any]]:
    """The images chunk as chunks of at most `limit` bytes of JSON, so /stream delivers each one.

    It goes out whole when it fits (URLs, small images). Otherwise every inline image goes first,
    in order, as `{"image_part": {"index": i, "part": k, "parts": n, "data": ...}}` chunks, and the
    images chunk comes last with that image's `"image"` null and `"parts": n`: the parts' `data`,
    joined in order, is the data URI. /runsync returns the same chunks."""
    if len(json.dumps(final)) <= limit:
        return [final]
    room = limit - PART_ENVELOPE_BYTES
    parts: list[dict[str, Any]] = []
    images = []
    for index, result in enumerate(final["images"]):
        where = result["image"]
        if not where.startswith("data:"):
            images.append(result)
            continue
        count = math.ceil(len(where) / room)
        parts += [
            {"image_part": {"index": index, "part": k, "parts": count, "data": where[k * room : (k + 1) * room]}}
            for k in range(count)
        ]
        images.append({**result, "image": None, "parts": count})
    return [*parts, {**final, "images": images}]
