"""A request's images, fetched in parallel under one deadline and one decoded-pixel budget.

images.py (shared with 02) reads one image safely: SSRF-safe download, byte cap, pixel cap from
the header, EXIF orientation. A request here can carry many images (64 for a CLIP embed), so on
top of it:

* **In parallel, bounded across jobs.** Downloads run on one pool of `max_parallel` threads that
  every job shares: a request's images download together, and concurrent jobs together never open
  more than `max_parallel` connections (nor hold more than that many images in flight).
* **One deadline per request** (`MAX_REQUEST_SECONDS`): every download gets what is left of it as
  its own timeout, and a request whose images are not all in by then fails with a message naming
  the limit, before any decoding or model work. Sixty-four slow URLs cannot hold a job past
  Runpod's execution timeout.
* **One pixel budget per request** (`MAX_REQUEST_PIXELS`): once the bytes are in, every image's
  size is read from its header and the request is refused if together they would decode to more
  pixels than the budget, before any of them is decompressed.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from PIL import Image, UnidentifiedImageError

from images import ImageInputError, ImageLimits, decode_image, read_image_bytes


class RequestDeadlineError(ImageInputError):
    """The request's images did not all arrive within its deadline."""


class ImageFetcher:
    def __init__(self, limits: ImageLimits, max_parallel: int, request_seconds: float, request_pixels: int) -> None:
        self.limits = limits  # per image: bytes, pixels, download timeout
        self.request_seconds = request_seconds
        self.request_pixels = request_pixels
        self.pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="image-fetch")

    def _deadline_error(self, count: int) -> RequestDeadlineError:
        what = "the image" if count == 1 else f"the request's {count} images"
        return RequestDeadlineError(
            f"images: downloading {what} took longer than the request's {self.request_seconds:g}-second limit "
            "(MAX_REQUEST_SECONDS); send fewer images, smaller ones, or ones from a faster host"
        )

    def _read(self, field: str, source: str, deadline: float, count: int) -> bytes:
        """One image's bytes, with what is left of the request's deadline as its timeout (on a pool thread)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._deadline_error(count)
        limits = replace(self.limits, timeout_s=min(self.limits.timeout_s, left))
        try:
            return read_image_bytes(field, source, limits)
        except ImageInputError:
            if time.monotonic() >= deadline:  # timed out on the request's deadline, not its own
                raise self._deadline_error(count) from None
            raise

    def _size(self, field: str, data: bytes) -> int:
        try:
            width, height = Image.open(io.BytesIO(data)).size  # the header only
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise ImageInputError(f"{field}: not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
        return width * height

    async def fetch(self, sources: Sequence[tuple[str, str]]) -> list[Image.Image]:
        """(field, source) pairs → upright RGB images, in order. Raises ImageInputError naming the
        field (or the request's limit) for the first problem found."""
        if not sources:
            return []
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.request_seconds
        reads = [
            loop.run_in_executor(self.pool, self._read, field, source, deadline, len(sources))
            for field, source in sources
        ]
        try:
            datas = await asyncio.wait_for(asyncio.gather(*reads), self.request_seconds)
        except TimeoutError:
            raise self._deadline_error(len(sources)) from None
        finally:
            for read in reads:  # downloads still queued for the pool never start
                read.cancel()

        sizes = [self._size(field, data) for (field, _), data in zip(sources, datas, strict=True)]
        if sum(sizes) > self.request_pixels:
            raise ImageInputError(
                f"images: {len(sources)} images of {sum(sizes)} pixels in all, over the request's budget of "
                f"{self.request_pixels} decoded pixels (MAX_REQUEST_PIXELS); send fewer or smaller images"
            )
        decodes = [
            loop.run_in_executor(self.pool, decode_image, field, data, self.limits.max_pixels)
            for (field, _), data in zip(sources, datas, strict=True)
        ]
        return list(await asyncio.gather(*decodes))
