"""Images as jobs carry them: data URIs in (random pixels, inpainting masks), decoded pictures out."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_data_uri(width: int, height: int, seed: int = 0, image_format: str = "PNG") -> str:
    """An image of random pixels as a data URI: every payload distinct, none of it repeated in an output."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def mask_data_uri(width: int, height: int, box: tuple[int, int, int, int]) -> str:
    """Black (keep) with a white (repaint) box, as inpainting masks are drawn."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode(data_uri: str) -> Image.Image:
    """The image of a data URI (or of "<anything>,<base64>")."""
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])))


def pixels(data_uri: str) -> np.ndarray:
    """The RGB pixels of a data URI's image."""
    return np.asarray(decode(data_uri).convert("RGB"))
