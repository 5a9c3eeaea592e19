"""02_image_generation's LoRA adapters (loras.py): the adapter gate's cache of loaded adapters,
and downloads bounded in bytes and time, streamed to disk, cached by what identifies the file."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.shared.harness import REPO, load_copy, load_handler, run_job
from tests.shared.image_generation import SMALL, generate
from tests.shared.images import pixels
from tests.shared.servers import http_server

EXAMPLE = "02_image_generation"


@pytest.fixture(scope="module")
def loras() -> ModuleType:
    """loras.py on its own, with its folder's images.py."""
    folder = REPO / EXAMPLE
    sys.path.insert(0, str(folder))
    try:
        return load_copy(folder / "loras.py")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("images", None)


class StubPipeline:
    """diffusers' adapter API as the gate uses it, strict as peft is: set_adapters refuses a name
    that is not loaded (ValueError)."""

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.loads: list[str] = []
        self.active: list[str] | None = None

    def load_lora_weights(self, path: str, adapter_name: str) -> None:
        self.loads.append(adapter_name)
        self.adapters.append(adapter_name)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"unet": list(self.adapters)}

    def delete_adapters(self, name: str) -> None:
        self.adapters.remove(name)

    def set_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        if missing := [name for name in names if name not in self.adapters]:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters")
        self.active = names

    def enable_lora(self) -> None:
        pass

    def disable_lora(self) -> None:
        self.active = None


def adapter(loras: ModuleType, name: str) -> Any:
    return loras.Adapter(name, f"/loras/{name}.safetensors")


# ---- the cache of loaded adapters -------------------------------------------------------------


def test_switching_in_a_set_never_evicts_an_adapter_of_that_set(loras) -> None:
    """The order that broke: the endpoint's LORAS pinned (2 of MAX_LORAS_LOADED=4), then a request
    of two new adapters. Loading the second went over the bound, and the least recently used
    unpinned adapter was the first of the same set, loaded a moment before: set_adapters then
    raised ValueError. Now the set being switched in is pinned while it loads."""
    pipeline = StubPipeline()
    gate = loras.AdapterGate(pipeline, max_loaded=4, pinned={"p1", "p2"})
    gate.preload([(adapter(loras, "p1"), "LORAS"), (adapter(loras, "p2"), "LORAS")])
    with gate.using(loras.adapter_set([(adapter(loras, "x"), 1.0)]), ["loras.0.source"]):
        pass  # an older request's adapter: the one to evict
    wanted = loras.adapter_set([(adapter(loras, "a"), 1.0), (adapter(loras, "b"), 0.5)])
    with gate.using(wanted, ["loras.0.source", "loras.1.source"]):
        assert pipeline.active == ["a", "b"]
    assert sorted(pipeline.adapters) == ["a", "b", "p1", "p2"]  # x went, never a or b


def test_a_set_bigger_than_the_cache_is_refused_before_anything_loads(loras) -> None:
    """Two pinned + two new with MAX_LORAS_LOADED=3 cannot all be loaded at once: refused with a
    message naming MAX_LORAS_LOADED, nothing loaded, the worker serving on."""
    pipeline = StubPipeline()
    gate = loras.AdapterGate(pipeline, max_loaded=3, pinned={"p1", "p2"})
    gate.preload([(adapter(loras, "p1"), "LORAS"), (adapter(loras, "p2"), "LORAS")])
    wanted = loras.adapter_set([(adapter(loras, "a"), 1.0), (adapter(loras, "b"), 1.0)])
    with pytest.raises(loras.LoraError, match="MAX_LORAS_LOADED") as refused:
        with gate.using(wanted, ["loras.0.source", "loras.1.source"]):
            pass
    assert "3" in str(refused.value)
    assert pipeline.loads == ["p1", "p2"] and pipeline.active is None
    one = loras.adapter_set([(adapter(loras, "a"), 1.0)])
    with gate.using(one, ["loras.0.source"]):
        assert pipeline.active == ["a"]


def lora_copies(tiny_model, folder: Path, names: list[str]) -> list[str]:
    """Copies of the tiny SD 1.5 LoRAs under other paths: each a distinct adapter to the worker."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["lora-sd15-a", "lora-sd15-b"]
    paths = []
    for index, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        shutil.copy(tiny_model(kinds[index % 2]) / "pytorch_lora_weights.safetensors", path)
        paths.append(str(path))
    return paths


def test_through_the_handler_a_request_that_cannot_fit_beside_the_endpoint_loras_is_refused(
    tiny_model, tmp_path
) -> None:
    """2 endpoint LoRAs, MAX_LORAS_LOADED=3, a request for 2 more: before, loading the second evicted
    the first and the job failed with "image generation failed inside the worker". Now it is refused
    with a message naming MAX_LORAS_LOADED, nothing loaded, and the worker serves on."""
    p1, p2, a, b = lora_copies(tiny_model, tmp_path, ["p1", "p2", "a", "b"])
    env = {
        "MODEL_NAME": str(tiny_model("sd15")),
        "MAX_LORAS_LOADED": "3",
        "LORAS": json.dumps([{"name": "one", "source": p1}, {"name": "two", "source": p2}]),
    }
    module = load_handler(EXAMPLE, env)
    loaded = dict(module.GATE.loaded)
    refused = run_job(module.handler, {"prompt": "x", "loras": [{"source": a}, {"source": b}], **SMALL})
    assert "MAX_LORAS_LOADED" in refused.get("error", ""), refused
    assert refused["error"].startswith("loras: 2 adapter(s) beside the endpoint's 2 LORAS make 4 loaded at once")
    assert dict(module.GATE.loaded) == loaded
    _, with_both = generate(module, prompt="x", seed=1, loras=[{"source": "one"}, {"source": a}], **SMALL)
    _, again = generate(module, prompt="x", seed=1, loras=[{"source": "one"}, {"source": a}], **SMALL)
    np.testing.assert_array_equal(pixels(with_both["images"][0]["image"]), pixels(again["images"][0]["image"]))
    _, by_path = generate(module, prompt="x", seed=1, loras=[{"source": p1}, {"source": a}], **SMALL)  # one is p1
    np.testing.assert_array_equal(pixels(with_both["images"][0]["image"]), pixels(by_path["images"][0]["image"]))


def test_more_endpoint_loras_than_the_cache_stop_the_worker_at_start(tiny_model, tmp_path) -> None:
    sources = lora_copies(tiny_model, tmp_path, ["p1", "p2"])
    env = {
        "MODEL_NAME": str(tiny_model("sd15")),
        "MAX_LORAS_LOADED": "1",
        "LORAS": json.dumps([{"name": f"n{i}", "source": source} for i, source in enumerate(sources)]),
    }
    with pytest.raises(ValueError, match=r"LORAS names 2 adapters, over MAX_LORAS_LOADED \(1\)"):
        load_handler(EXAMPLE, env)


# ---- downloads: bounded, streamed to disk, cached by what identifies the file --------------------


@pytest.fixture
def lora_bytes(tiny_model) -> bytes:
    return (tiny_model("lora-sd15-a") / "pytorch_lora_weights.safetensors").read_bytes()


@pytest.fixture
def private_urls(monkeypatch) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")  # the test servers are on localhost


def counted(body: bytes, hits: list[str]) -> Any:
    """A route serving `body` that records each request it answers."""

    def route(request: BaseHTTPRequestHandler) -> None:
        hits.append(f"{request.command} {request.path}")
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    return route


def stalled(head: bytes, rest: bytes, release: threading.Event, content_length: int | None = None) -> Any:
    """A route that sends `head`, then holds the connection until `release` is set, then sends `rest`:
    a server trickling bytes, without racing the wall clock."""

    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(content_length or len(head) + len(rest)))
        request.end_headers()
        request.wfile.write(head)
        request.wfile.flush()
        release.wait(timeout=60)
        request.wfile.write(rest)

    return route


def wait_until(condition: Any, seconds: float = 30.0) -> bool:
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def limits(loras: ModuleType, max_bytes: int = 1 << 20, timeout_s: float = 30.0) -> Any:
    return loras.LoraLimits(max_bytes=max_bytes, timeout_s=timeout_s, max_loaded=8)


def test_a_url_lora_over_the_cap_is_refused_naming_it_and_leaves_nothing(loras, lora_bytes, tmp_path, private_urls):
    """Refused from its declared size, and, when the server declares none, as soon as the bytes pass
    the cap: no file and no temporary file left either way."""
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    cap = len(lora_bytes) - 1

    def undeclared(request: BaseHTTPRequestHandler) -> None:  # no Content-Length: the body runs to the close
        request.send_response(200)
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(lora_bytes)
        request.close_connection = True

    routes = {"/declared.safetensors": (200, "application/octet-stream", lora_bytes), "/undeclared": undeclared}
    with http_server(routes) as base:
        for path in ("/declared.safetensors", "/undeclared"):
            with pytest.raises(loras.LoraError) as refused:
                loras.resolve("loras.0.source", base + path, {}, cache, limits(loras, max_bytes=cap))
            assert str(refused.value) == f"loras.0.source: the file is larger than {cap} bytes (MAX_LORA_BYTES)"
            assert not list(cache.folder.glob("*")) if cache.folder.exists() else True


def test_a_stalled_url_download_is_refused_at_its_deadline_and_cleaned_up(loras, lora_bytes, tmp_path, private_urls):
    """A server that sends half the file and holds the connection: refused at LORA_DOWNLOAD_TIMEOUT_S,
    or sooner at the job's own deadline (MAX_GENERATION_SECONDS), naming which; the abandoned
    download's temporary file goes once the connection moves again."""
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    release = threading.Event()
    half = len(lora_bytes) // 2
    routes = {"/slow.safetensors": stalled(lora_bytes[:half], lora_bytes[half:], release)}
    try:
        with http_server(routes) as base:
            url = base + "/slow.safetensors"
            with pytest.raises(loras.LoraError, match=r"took longer than 0.5 s \(LORA_DOWNLOAD_TIMEOUT_S\)"):
                loras.resolve("loras.0.source", url, {}, cache, limits(loras, timeout_s=0.5))
            # Refused while the server still holds the rest (release is not set): had the deadline not
            # held, the download would have completed once the server gave up waiting, and not raised.
            with pytest.raises(loras.LoraError, match=r"stopped at the job's time limit \(MAX_GENERATION_SECONDS\)"):
                loras.resolve("loras.0.source", url, {}, cache, limits(loras), deadline=time.monotonic() + 0.5)
            release.set()
            assert wait_until(lambda: not list(cache.folder.glob("*")))  # no .part, no half file
    finally:
        release.set()


def test_a_url_lora_streams_to_disk_in_chunks(loras, lora_bytes, tmp_path, private_urls, monkeypatch):
    """Never held whole in memory: every write to the file is at most LORA_CHUNK_BYTES."""
    monkeypatch.setattr(loras, "LORA_CHUNK_BYTES", 4096)
    writes: list[int] = []
    real_fdopen = os.fdopen

    class Recorder:
        def __init__(self, file: Any) -> None:
            self.file = file

        def write(self, data: bytes) -> int:
            writes.append(len(data))
            return self.file.write(data)

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(loras.os, "fdopen", lambda *args, **kwargs: Recorder(real_fdopen(*args, **kwargs)))
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    with http_server({"/a.safetensors": (200, "application/octet-stream", lora_bytes)}) as base:
        adapter = loras.resolve("loras.0.source", base + "/a.safetensors", {}, cache, limits(loras))
    assert Path(adapter.path).read_bytes() == lora_bytes
    assert sum(writes) == len(lora_bytes) and max(writes) <= 4096 and len(writes) >= len(lora_bytes) // 4096


def test_the_cache_is_bounded_least_recently_used_first(loras, lora_bytes, tmp_path, private_urls, monkeypatch):
    """Past LORA_CACHE_BYTES the least recently used files go; a cache hit counts as a use."""
    monkeypatch.setattr(loras, "CACHE_IN_USE_S", 0.0)  # here, only the order of use decides
    cache = loras.LoraCache(int(3.5 * len(lora_bytes)), tmp_path / "cache")
    routes = {f"/{name}.safetensors": (200, "x", lora_bytes) for name in "abcd"}
    with http_server(routes) as base:

        def fetch(name: str) -> Path:
            return Path(loras.resolve("f", f"{base}/{name}.safetensors", {}, cache, limits(loras)).path)

        paths = {name: fetch(name) for name in "abc"}
        for age, name in enumerate("cba", start=1):  # a used first, c last
            os.utime(paths[name], (time.time() - 10 * age,) * 2)
        assert fetch("a") == paths["a"]  # a hit: now the most recently used
        paths["d"] = fetch("d")
    assert sorted(path.name for path in cache.folder.iterdir()) == sorted(paths[n].name for n in "acd")


def test_recently_used_files_are_not_evicted(loras, lora_bytes, tmp_path, private_urls) -> None:
    """A file resolved moments ago may be about to load into a job: the bound waits for it."""
    cache = loras.LoraCache(len(lora_bytes), tmp_path / "cache")
    with http_server({f"/{n}.safetensors": (200, "x", lora_bytes) for n in "ab"}) as base:
        for name in "ab":
            loras.resolve("f", f"{base}/{name}.safetensors", {}, cache, limits(loras))
    assert len(list(cache.folder.glob("*.safetensors"))) == 2


@pytest.fixture(scope="module")
def worker(tiny_model) -> ModuleType:
    return load_handler(EXAMPLE, {"MODEL_NAME": str(tiny_model("sd15"))})


def test_a_signed_url_is_downloaded_once_whatever_its_signature(worker, tiny_model, lora_bytes, tmp_path, private_urls):
    """The same file behind two signatures (an S3 presigned URL's query changes every time): one
    download, one cached file, one adapter; the second job does not reach the server."""
    hits: list[str] = []
    route = counted(lora_bytes, hits)
    signed = [f"/loras/pixel.safetensors?X-Amz-Signature={signature}&X-Amz-Expires=600" for signature in "12"]
    cache = type(worker.LORA_CACHE)(1 << 30, tmp_path / "cache")
    with pytest.MonkeyPatch.context() as patch, http_server(dict.fromkeys(signed, route)) as base:
        patch.setattr(worker, "LORA_CACHE", cache)
        images = [
            pixels(
                generate(worker, prompt="x", seed=3, loras=[{"source": base + path}], **SMALL)[1]["images"][0]["image"]
            )
            for path in signed
        ]
    assert hits == [f"GET {signed[0]}"]
    assert len(list(cache.folder.iterdir())) == 1
    np.testing.assert_array_equal(images[0], images[1])
    _, local = generate(worker, prompt="x", seed=3, loras=[{"source": str(tiny_model("lora-sd15-a"))}], **SMALL)
    np.testing.assert_array_equal(images[0], pixels(local["images"][0]["image"]))


def test_a_lora_download_counts_against_the_jobs_time_limit(worker, lora_bytes, tmp_path, private_urls) -> None:
    """MAX_GENERATION_SECONDS starts with the job: a LoRA still downloading when it runs out fails
    the job naming it, long before LORA_DOWNLOAD_TIMEOUT_S (300 s)."""
    release = threading.Event()
    half = len(lora_bytes) // 2
    cache = type(worker.LORA_CACHE)(1 << 30, tmp_path / "cache")
    try:
        routes = {"/slow.safetensors": stalled(lora_bytes[:half], lora_bytes[half:], release)}
        with pytest.MonkeyPatch.context() as patch, http_server(routes) as base:
            patch.setattr(worker, "LORA_CACHE", cache)
            patch.setattr(worker, "MAX_GENERATION_SECONDS", 1.0)
            # The job answers while the server still holds the file's rest (see the test above).
            result = run_job(
                worker.handler, {"prompt": "x", "loras": [{"source": base + "/slow.safetensors"}], **SMALL}
            )
            release.set()
        assert (
            result["error"]
            == "loras.0.source: the download was stopped at the job's time limit (MAX_GENERATION_SECONDS)"
        )
    finally:
        release.set()


# ---- Hub LoRAs: the same bounds, cached by repo, commit and file --------------------------------


@pytest.fixture
def local_hub(monkeypatch) -> Any:
    """Point huggingface_hub at a local server for the test (the suite runs with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    def serve(routes: dict[str, Any]) -> Any:
        server = http_server(routes)
        base = server.__enter__()
        monkeypatch.setattr(constants, "ENDPOINT", base)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", base + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        servers.append(server)
        return base

    servers: list[Any] = []
    yield serve
    for server in servers:
        server.__exit__(None, None, None)


def hub_routes(body: bytes, hits: list[str], commit: str = "c0ffee", release: threading.Event | None = None) -> Any:
    """The Hub's two answers for someone/lora: HEAD at main (its commit and size), GET at the commit."""

    def head(request: BaseHTTPRequestHandler) -> None:
        hits.append(f"{request.command} {request.path}")
        request.send_response(200)
        request.send_header("X-Repo-Commit", commit)
        request.send_header("ETag", '"etag"')
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()

    file = "pytorch_lora_weights.safetensors"
    get = counted(body, hits) if release is None else stalled(body[:10], body[10:], release)
    return {f"/someone/lora/resolve/main/{file}": head, f"/someone/lora/resolve/{commit}/{file}": get}


def test_a_hub_lora_over_the_cap_is_refused_before_its_download(loras, lora_bytes, tmp_path, local_hub) -> None:
    hits: list[str] = []
    local_hub(hub_routes(lora_bytes, hits))
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    with pytest.raises(loras.LoraError, match=rf"larger than {len(lora_bytes) - 1} bytes \(MAX_LORA_BYTES\)"):
        loras.resolve("loras.0.source", "someone/lora", {}, cache, limits(loras, max_bytes=len(lora_bytes) - 1))
    assert [hit.split()[0] for hit in hits] == ["HEAD"] and not cache.folder.exists()


def test_a_stalled_hub_download_is_refused_at_its_deadline(loras, lora_bytes, tmp_path, local_hub) -> None:
    release = threading.Event()
    local_hub(hub_routes(lora_bytes, [], release=release))
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    try:
        with pytest.raises(loras.LoraError, match=r"took longer than 0.5 s \(LORA_DOWNLOAD_TIMEOUT_S\)"):
            loras.resolve("loras.0.source", "someone/lora", {}, cache, limits(loras, timeout_s=0.5))
        release.set()
        assert wait_until(lambda: not list(cache.folder.glob("*")))
    finally:
        release.set()


def test_a_hub_lora_is_cached_by_its_commit(loras, lora_bytes, tmp_path, local_hub, monkeypatch) -> None:
    """Asked once per worker; a new worker (the memo cleared) asks the Hub for the commit again and
    finds the file in the cache without downloading it; a new commit is a new file."""
    hits: list[str] = []
    local_hub({**hub_routes(lora_bytes, hits)})
    cache = loras.LoraCache(1 << 30, tmp_path / "cache")
    monkeypatch.setattr(loras, "_HUB_FILES", {})
    first = loras.resolve("f", "someone/lora", {}, cache, limits(loras))
    assert loras.resolve("f", "someone/lora", {}, cache, limits(loras)) == first
    assert [hit.split()[0] for hit in hits] == ["HEAD", "GET"]
    monkeypatch.setattr(loras, "_HUB_FILES", {})  # another worker on the same volume
    assert loras.resolve("f", "someone/lora", {}, cache, limits(loras)) == first
    assert [hit.split()[0] for hit in hits] == ["HEAD", "GET", "HEAD"]
    assert Path(first.path).read_bytes() == lora_bytes and Path(first.path).parent == cache.folder


# ---- LoRAs on a compiled denoiser (TORCH_COMPILE): what cannot fit a slot is refused first ------
# The real inductor compiles are in test_models.py and test_flow.py; here torch.compile only wraps
# the UNet (it compiles at the first call, and none is made): what is tested is the refusals.


def compiled_gate(loras: ModuleType, tiny_model, tmp_path: Path, slots: int, max_rank: int) -> tuple[Any, Any]:
    """The tiny SD 1.5 with its UNet under torch.compile's eager backend: dynamo traces it (the slots
    must hold in one graph) and runs the traced code without inductor, so an image takes a second."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(str(tiny_model("sd15")))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet = torch.compile(pipeline.unet, fullgraph=True, backend="eager")
    limits = loras.LoraLimits(max_bytes=2**20, timeout_s=5.0, max_loaded=8, slots=slots, max_rank=max_rank)
    gate, _, _ = loras.load_endpoint_loras(None, pipeline, loras.LoraCache(2**20, tmp_path), limits)
    return pipeline, gate


def slot_weights(pipeline: Any) -> dict[str, Any]:
    return {key: value for key, value in pipeline.unet._orig_mod.state_dict().items() if ".lora_" in key}


def test_a_compiled_unet_refuses_what_its_lora_slots_cannot_hold_before_copying_anything(
    loras, tiny_model, tmp_path
) -> None:
    """The tiny LoRAs are rank 4: over LORA_MAX_RANK=2 each is refused naming it, two adapters
    over LORA_SLOTS=1 are refused naming that, and the slots stay zeros (the base model exactly)."""
    pipeline, gate = compiled_gate(loras, tiny_model, tmp_path, slots=1, max_rank=2)
    weights = slot_weights(pipeline)
    assert weights and all(name.split(".lora_")[1].split(".")[1] == "slot_0" for name in weights)
    a, b = (
        loras.Adapter(f"lora_{kind}", str(tiny_model(f"lora-sd15-{kind}") / "pytorch_lora_weights.safetensors"))
        for kind in "ab"
    )
    with pytest.raises(loras.LoraError, match=r"rank 4 is over the 2 .*raise LORA_MAX_RANK"):
        with gate.using(loras.adapter_set([(a, 1.0)]), ["loras.0.source"]):
            pass
    with pytest.raises(loras.LoraError, match=r"2 adapters at once, over the 1 .*\(LORA_SLOTS, with TORCH_COMPILE\)"):
        with gate.using(loras.adapter_set([(a, 1.0), (b, 1.0)]), ["loras.0.source", "loras.1.source"]):
            pass
    assert all(not value.any() for value in slot_weights(pipeline).values())
    assert sorted(slot_weights(pipeline)) == sorted(weights)  # the slot is still there, of zeros


def test_a_lora_in_a_compiled_slot_gives_the_image_of_diffusers_own_load(loras, tiny_model, tmp_path) -> None:
    """Each adapter at its weight, copied into the slot, gives bit for bit the image of the same
    adapter loaded the usual way on an uncompiled pipeline; a plain job gets zeros, the base image."""
    import torch
    from diffusers import AutoPipelineForText2Image

    def image(pipeline: Any) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(3)
        return np.asarray(pipeline("a tree", width=64, height=64, num_inference_steps=2, generator=generator).images[0])

    pipeline, gate = compiled_gate(loras, tiny_model, tmp_path, slots=1, max_rank=8)
    reference = AutoPipelineForText2Image.from_pretrained(str(tiny_model("sd15")))
    reference.set_progress_bar_config(disable=True)
    with gate.using((), []):
        plain = image(pipeline)
    np.testing.assert_array_equal(plain, image(reference))
    for kind, weight in (("a", 1.0), ("b", 0.5)):
        path = str(tiny_model(f"lora-sd15-{kind}") / "pytorch_lora_weights.safetensors")
        with gate.using(loras.adapter_set([(loras.Adapter(kind, path), weight)]), ["loras.0.source"]):
            with_lora = image(pipeline)
        reference.load_lora_weights(path, adapter_name=kind)
        reference.set_adapters([kind], adapter_weights=[weight])
        np.testing.assert_array_equal(with_lora, image(reference))
        assert not np.array_equal(with_lora, plain)
    with gate.using((), []):
        np.testing.assert_array_equal(image(pipeline), plain)
        assert all(not value.any() for value in slot_weights(pipeline).values())
    sdxl = loras.Adapter("lora_x", str(tiny_model("lora-sdxl") / "pytorch_lora_weights.safetensors"))
    with pytest.raises(loras.LoraError, match=r"does not fit this model|only the attention projections"):
        with gate.using(loras.adapter_set([(sdxl, 1.0)]), ["loras.0.source"]):
            pass
    assert all(not value.any() for value in slot_weights(pipeline).values())
