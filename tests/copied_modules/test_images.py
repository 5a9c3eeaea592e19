"""images.py: image input and output shared by the image examples. One identical copy per example."""

from __future__ import annotations

import base64
import io
import random
import time
from http.server import BaseHTTPRequestHandler
from types import ModuleType

import pytest
from PIL import Image

from tests.shared.harness import load_copy, shared_copies
from tests.shared.servers import http_server

COPIES = shared_copies("images.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def images(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(request.param)


@pytest.fixture
def limits(images: ModuleType):
    return images.ImageLimits(max_bytes=200_000, max_pixels=1_000_000, timeout_s=2.0)


def png(width: int = 16, height: int = 12, color: tuple[int, int, int] = (200, 30, 60), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buffer, format="JPEG")  # noise: a long data segment
    return buffer.getvalue()


def test_base64_data_uri_and_bare_base64(images: ModuleType, limits) -> None:
    raw = base64.b64encode(png()).decode()
    for source in (raw, f"data:image/png;base64,{raw}", raw[:20] + "\n" + raw[20:], f"  {raw}  "):
        image = images.load_image("image", source, limits)
        assert image.mode == "RGB" and image.size == (16, 12)
        assert image.getpixel((0, 0)) == (200, 30, 60)


def test_alpha_and_grayscale_become_rgb(images: ModuleType, limits) -> None:
    rgba = io.BytesIO()
    Image.new("RGBA", (4, 4), (1, 2, 3, 128)).save(rgba, format="PNG")
    for data in (rgba.getvalue(), png(mode="L")):
        assert images.load_image("image", base64.b64encode(data).decode(), limits).mode == "RGB"


def test_exif_orientation_is_applied(images: ModuleType, limits) -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (0, 0, 255)).save(buffer, format="JPEG", exif=exif)
    image = images.load_image("image", base64.b64encode(buffer.getvalue()).decode(), limits)
    assert image.size == (20, 40)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("not base64 at all!", "image: not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "image: the data URI holds text/plain, not an image"),
        ("data:image/png,rawdata", "image: a data URI must look like data:image/png;base64,<data>"),
        (base64.b64encode(b"hello, not an image").decode(), "image: not an image PIL can read"),
        ("file:///etc/passwd", "image: only http(s) URLs are fetched"),
        ("ftp://example.com/cat.png", "image: only http(s) URLs are fetched"),
        ("", "image: expected an image URL, data URI or base64 string"),
        (base64.b64encode(jpeg()[:3000]).decode(), "image: not a decodable image (truncated or corrupt data)"),
    ],
)
def test_bad_sources_name_the_field(images: ModuleType, limits, source: str, message: str) -> None:
    with pytest.raises(images.ImageInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        images.load_image("image", source, limits)


def test_bytes_cap_on_base64(images: ModuleType) -> None:
    small = images.ImageLimits(max_bytes=100, max_pixels=10**6, timeout_s=1)
    with pytest.raises(images.ImageInputError, match="image: the image is larger than 100 bytes"):
        images.load_image("image", base64.b64encode(png(64, 64, (1, 2, 3)) + b"\0" * 200).decode(), small)


def test_a_decompression_bomb_is_refused_from_its_header(images: ModuleType, limits) -> None:
    bomb = png(3000, 3000, mode="L")  # 9 MP of zeros compress to a few KB
    assert len(bomb) < limits.max_bytes
    with pytest.raises(images.ImageInputError, match="image: 3000x3000 is 9000000 pixels, over the limit of 1000000"):
        images.load_image("image", base64.b64encode(bomb).decode(), limits)


def test_urls_private_addresses_refused_unless_allowed(images: ModuleType, limits, monkeypatch) -> None:
    routes = {"/cat.png": (200, "image/png", png()), "/page": (200, "text/html", b"<html>hi</html>")}
    with http_server(routes) as base:
        monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
        with pytest.raises(images.ImageInputError, match="image: the URL is refused: only public http"):
            images.load_image("image", f"{base}/cat.png", limits)

        monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
        assert images.load_image("image", f"{base}/cat.png", limits).size == (16, 12)
        with pytest.raises(images.ImageInputError, match="image: not an image PIL can read"):
            images.load_image("image", f"{base}/page", limits)
        with pytest.raises(images.ImageInputError, match="image: downloading the URL gave HTTP 404"):
            images.load_image("image", f"{base}/missing.png", limits)


def test_download_byte_cap_and_timeout(images: ModuleType, monkeypatch) -> None:
    def slow(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.end_headers()
        for _ in range(40):
            request.wfile.write(b"x" * 100)
            request.wfile.flush()
            time.sleep(0.05)

    routes = {"/big.png": (200, "image/png", b"\0" * 5000), "/slow.png": slow}
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    with http_server(routes) as base:
        capped = images.ImageLimits(max_bytes=1000, max_pixels=10**6, timeout_s=5)
        with pytest.raises(images.ImageInputError, match="image: the image is larger than 1000 bytes"):
            images.load_image("image", f"{base}/big.png", capped)
        # The slow route sends its 4000 bytes over 2 s; without the deadline it would arrive whole
        # and fail later as "not an image".
        hurried = images.ImageLimits(max_bytes=10**6, max_pixels=10**6, timeout_s=0.5)
        with pytest.raises(images.ImageInputError, match=r"image: the download took longer than 0\.5 s"):
            images.load_image("image", f"{base}/slow.png", hurried)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_and_data_uri_round_trip(images: ModuleType, limits, fmt: str) -> None:
    original = Image.new("RGB", (24, 16), (10, 120, 240))
    uri = images.data_uri(images.encode_image(original, fmt, quality=95), fmt)
    assert uri.startswith(f"data:image/{fmt};base64,")
    decoded = images.load_image("image", uri, limits)
    assert decoded.size == (24, 16)
    if fmt == "png":
        assert list(decoded.getdata()) == list(original.getdata())


def with_exif(fmt: str) -> bytes:
    """A small photo-like image in `fmt` carrying an EXIF block: orientation, camera, date."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    exif[0x010F] = "Camera"  # make
    exif[0x0132] = "2024:01:01 00:00:00"  # date and time
    buffer = io.BytesIO()
    Image.effect_noise((32, 24), 40).convert("RGB").save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


EXIF_MARKERS = {"JPEG": b"Exif", "PNG": b"eXIf", "WEBP": b"EXIF"}
MUTATIONS = 2000  # per format: corrupt EXIF broke the decoder in about 1 of 300 JPEG mutations


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_mutated_images_decode_or_fail_with_a_clear_error(images: ModuleType, fmt: str) -> None:
    """Random byte changes, most inside the EXIF block (where PIL's parser raised struct.error or
    TypeError out of exif_transpose), the rest anywhere: every one gives an RGB image or an
    ImageInputError naming the field, never another exception."""
    original = with_exif(fmt)
    exif_at = original.find(EXIF_MARKERS[fmt])
    assert exif_at > 0, f"no EXIF block in the {fmt} sample"
    rng = random.Random(fmt)
    outcomes = {"decoded": 0, "refused": 0}
    for index in range(MUTATIONS):
        data = bytearray(original)
        start, end = (exif_at, min(len(data), exif_at + 120)) if index % 4 else (0, len(data))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(start, end)] = rng.randrange(256)
        try:
            image = images.decode_image("image", bytes(data), max_pixels=10**6)
        except images.ImageInputError as error:
            assert str(error).startswith("image: "), error
            outcomes["refused"] += 1
        else:
            assert image.mode == "RGB"
            outcomes["decoded"] += 1
    assert outcomes["decoded"] and (fmt == "WEBP" or outcomes["refused"]), outcomes
