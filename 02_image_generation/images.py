"""Images in and out of a worker: one contract for every example that takes or returns images.

In: an https URL, a `data:image/...;base64,` URI, or bare base64. Downloads go through the
runpod SDK's SSRF-safe fetcher (`rp_ssrf.safe_get`: public addresses only, each redirect hop
re-checked, the connection pinned to the checked address). Private and loopback addresses are
refused unless `RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true` (for local testing). Bytes are capped
before decoding and pixels before the image is decompressed, so a 50 KB PNG that would expand
to gigabytes (a decompression bomb) is refused from its header alone. EXIF orientation is
applied and the result is RGB, so a phone photo is upright whatever its metadata says; a file
no decoder can read, corrupt metadata included, is an ImageInputError naming the field.

Out: PNG, JPEG or WebP bytes, as a data URI (or uploaded elsewhere by the caller).

This file is copied, identical, into every example that handles images (each folder is its own
Docker context); `tests/copied_modules/test_copies.py` checks that the copies match and
`tests/copied_modules/test_images.py` exercises each one.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
from dataclasses import dataclass
from typing import Any

import requests
from PIL import Image, ImageOps
from runpod.serverless.utils import rp_ssrf

# Read size while downloading: small enough that the byte cap and the deadline are checked often.
DOWNLOAD_CHUNK_BYTES = 16 * 1024
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?);base64,(?P<data>.*)$", re.DOTALL)


class ImageInputError(ValueError):
    """An image the caller must fix; the message names the field."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # encoded size, checked while downloading or decoding base64
    max_pixels: int  # width × height, checked from the header before decompression
    timeout_s: float  # whole download, not per read


def _decode_base64(field: str, text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            f"{field}: not valid base64 (send an https URL, a data URI or base64 image bytes)"
        ) from None


def _fetch(field: str, url: str, limits: ImageLimits, abandoned: threading.Event, what: str) -> bytes:
    try:
        with rp_ssrf.safe_get(url, timeout=limits.timeout_s, max_bytes=limits.max_bytes) as response:
            if response.status_code != 200:
                raise ImageInputError(f"{field}: downloading the URL gave HTTP {response.status_code}")
            body = bytearray()
            for chunk in rp_ssrf.iter_content_capped(response, DOWNLOAD_CHUNK_BYTES, limits.max_bytes):
                if abandoned.is_set():
                    break
                body += chunk
            return bytes(body)
    except rp_ssrf.SSRFError as error:
        if "size cap" in str(error):
            raise ImageInputError(f"{field}: the {what} is larger than {limits.max_bytes} bytes") from None
        raise ImageInputError(
            f"{field}: the URL is refused: only public http(s) addresses are fetched ({error})"
        ) from None
    except requests.Timeout:
        raise ImageInputError(f"{field}: the download took longer than {limits.timeout_s:g} s") from None
    except requests.RequestException as error:
        raise ImageInputError(f"{field}: the URL could not be downloaded ({type(error).__name__})") from None


def download(field: str, url: str, limits: ImageLimits, what: str = "image") -> bytes:
    """The body behind an http(s) URL: `_fetch` under a deadline for the whole download. Also
    used for other files a request names (a LoRA adapter), with the same caps and SSRF guard.

    requests only times out single reads, so a server trickling bytes just fast enough could hold
    a job forever. The fetch runs on a thread the job stops waiting for at the deadline; that
    thread then drops the connection at its next chunk.
    """
    outcome: dict[str, Any] = {}
    abandoned = threading.Event()

    def fetch() -> None:
        try:
            outcome["data"] = _fetch(field, url, limits, abandoned, what)
        except Exception as error:  # noqa: BLE001 - handed to the waiting caller below
            outcome["error"] = error

    worker = threading.Thread(target=fetch, name="image-download", daemon=True)
    worker.start()
    worker.join(limits.timeout_s)
    if worker.is_alive():
        abandoned.set()
        raise ImageInputError(f"{field}: the download took longer than {limits.timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def read_image_bytes(field: str, source: str, limits: ImageLimits) -> bytes:
    """The encoded bytes behind a URL, a data URI or bare base64, within `limits.max_bytes`."""
    source = source.strip()
    if source.startswith(("https://", "http://")):
        data = download(field, source, limits)
    elif source.startswith("data:"):
        match = _DATA_URI.match(source)
        if not match:
            raise ImageInputError(f"{field}: a data URI must look like data:image/png;base64,<data>")
        if match["mime"] and not match["mime"].startswith("image/"):
            raise ImageInputError(f"{field}: the data URI holds {match['mime']}, not an image")
        data = _decode_base64(field, match["data"])
    elif re.match(r"^[a-z][a-z0-9+.-]*://", source, flags=re.IGNORECASE):
        raise ImageInputError(f"{field}: only http(s) URLs are fetched")
    else:
        data = _decode_base64(field, source)
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"{field}: the image is larger than {limits.max_bytes} bytes")
    if not data:
        raise ImageInputError(f"{field}: the image is empty")
    return data


def decode_image(field: str, data: bytes, max_pixels: int) -> Image.Image:
    """An upright RGB image, refusing anything over `max_pixels` before decompressing it."""
    # PIL's parsers raise whatever the broken bytes lead to (OSError, SyntaxError, struct.error,
    # TypeError and IndexError from a corrupt EXIF block, ...): any failure is the caller's image.
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
    except Exception:  # noqa: BLE001 - see above
        raise ImageInputError(f"{field}: not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    if width * height > max_pixels:
        raise ImageInputError(f"{field}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}")
    try:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - see above
        raise ImageInputError(f"{field}: not a decodable image (truncated or corrupt data)") from None


def load_image(field: str, source: str, limits: ImageLimits) -> Image.Image:
    """URL, data URI or base64 in; an upright RGB PIL image out. Blocking: run it off the event loop."""
    if not isinstance(source, str) or not source.strip():
        raise ImageInputError(f"{field}: expected an image URL, data URI or base64 string")
    return decode_image(field, read_image_bytes(field, source, limits), limits.max_pixels)


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """PNG (lossless), or JPEG/WebP at `quality`."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=OUTPUT_FORMATS[output_format], quality=quality)
    return buffer.getvalue()


def data_uri(data: bytes, output_format: str) -> str:
    return f"data:image/{output_format};base64,{base64.b64encode(data).decode('ascii')}"
