"""LoRA adapters over shared weights: where they come from, how many stay loaded, and which job sees which.

A LoRA adapter adds small low-rank layers to the UNet (and sometimes the text encoders). diffusers
loads it with peft *into the shared modules* (`load_lora_weights(..., adapter_name=...)`) and
chooses the active adapters and their weights *on those modules* (`set_adapters`). So the active
set is state every job on the worker shares, and two jobs wanting different sets cannot run at
the same moment. `AdapterGate` admits jobs by their adapter set: any number of jobs with the
same set (no adapters included) run together; a job wanting another set waits until they are
done, then the set is switched (loading what is missing, evicting the least recently used beyond
`max_loaded`) while no job runs. A waiting job stops the admission of new jobs of the running
set, so nobody waits forever. Eviction never touches what a job needs: a running job's adapters
are never unloaded (switches happen only while no job runs), the set being switched in is pinned
while it loads, and a set that cannot fit beside the endpoint's own adapters (more than
`max_loaded` in all) is refused before anything loads.

Sources, resolved to a local file before a job waits for the gate (`resolve`; a request's list with
`resolve_requested`, the endpoint's LORAS at start with `load_endpoint_loras`):
* an endpoint LoRA's name (the LORAS setting, loaded at start);
* a local or network-volume path: a `.safetensors` file, or a folder holding
  `pytorch_lora_weights.safetensors` (what diffusers' training scripts write);
* an http(s) URL, fetched through the runpod SDK's SSRF guard (public addresses only);
* a Hub file `owner/repo/file.safetensors`, or a Hub repo `owner/repo` holding
  `pytorch_lora_weights.safetensors`.

Downloads (URL and Hub alike, `fetch_to_cache`) are bounded: `max_bytes` per file (refused from
its declared size, or as soon as the bytes pass it), and a deadline, the sooner of the per-download
`timeout_s` and the end of the job's own time limit. They stream to disk `LORA_CHUNK_BYTES` at a
time into a temporary file renamed into place once whole and valid, so an adapter is never held
whole in memory and a failed download leaves nothing behind. `LoraCache` keeps them under a name
made from what identifies the file: a Hub file by repo, commit and file name, a URL without its
query string (a signed URL's signature changes on every request, the file does not). It is bounded
in bytes: past the bound the least recently used files go, except those used in the last
`CACHE_IN_USE_S` (a job on this worker or on another one sharing the volume may be about to load
them).

On a compiled denoiser (TORCH_COMPILE) adapters cannot be added or removed: the compiled graph is
specialised to its modules, and diffusers' adapter APIs do not see through torch.compile's wrapper.
`HotswapSlots` prepares `slots` zeroed LoRA layers of rank `max_rank` on the denoiser's attention
projections before it compiles (diffusers' `enable_lora_hotswap`); a job's adapters are copied into
them in place (`load_lora_weights(..., hotswap=True)`, no recompilation), and a job without adapters
runs on slots of zeros: the base weights exactly. An adapter that cannot fit a slot (a rank over
LORA_MAX_RANK, layers beyond the attention projections, text encoder layers, DoRA) or a set larger
than LORA_SLOTS is refused before anything is copied.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' trainers write
# Bytes read and written at a time while downloading: a 1 GB adapter never sits in memory, and the
# byte cap and the abandoned flag are checked at every chunk.
LORA_CHUNK_BYTES = 1024 * 1024
# A cached file used this recently is never evicted: between being resolved and being loaded by the
# gate, a job (here or on another worker sharing the volume) needs it; longer than a job's wait.
CACHE_IN_USE_S = 15 * 60.0
# Seconds for the Hub's answer about a file (its commit and size): huggingface_hub's own default.
HUB_METADATA_TIMEOUT_S = 10.0


class LoraError(ValueError):
    """An adapter the caller must fix; the message names the field."""


@dataclass(frozen=True)
class LoraLimits:
    max_bytes: int  # one adapter file, downloaded (MAX_LORA_BYTES)
    timeout_s: float  # one download, all of it (LORA_DOWNLOAD_TIMEOUT_S)
    max_loaded: int  # adapters loaded at once, the endpoint's own included (MAX_LORAS_LOADED)
    slots: int = 1  # TORCH_COMPILE: adapters a job may use at once on the compiled denoiser (LORA_SLOTS)
    max_rank: int = 64  # TORCH_COMPILE: the highest LoRA rank the slots hold (LORA_MAX_RANK)


@dataclass(frozen=True)
class Adapter:
    name: str  # the adapter's name inside the pipeline
    path: str  # a local .safetensors file


def _adapter_name(key: str) -> str:
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_safetensors(field: str, path: Path) -> None:
    """A readable safetensors file with LoRA weights in it, before it reaches the model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except Exception:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise LoraError(f"{field}: not a readable .safetensors LoRA file") from None
    if not any("lora" in key for key in keys):
        raise LoraError(f"{field}: the file holds no LoRA weights (no 'lora' keys)")


class LoraCache:
    """Downloaded adapter files, `<hash of what identifies the file>.safetensors` in one folder,
    bounded to `max_bytes` by evicting the least recently used (a file's mtime is its last use:
    atime is often off on volumes)."""

    def __init__(self, max_bytes: int, folder: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.folder = folder or default_cache_dir()
        self.lock = threading.Lock()  # eviction against this worker's other downloads

    def path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest() + ".safetensors")

    def hit(self, key: str) -> Path | None:
        """The cached file for `key`, marked as just used; None when it is not there."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def evict(self, keep: Path) -> None:
        """Least recently used first until the folder fits `max_bytes`; never `keep` (just written)
        nor a file used in the last CACHE_IN_USE_S. A download's temporary file left that long
        (a worker stopped mid-download) goes too."""
        recent = time.time() - CACHE_IN_USE_S
        with self.lock:
            for partial in self.folder.glob("*.part"):
                with suppress(FileNotFoundError):
                    if partial.stat().st_mtime < recent:
                        partial.unlink()
            files = []
            for path in self.folder.glob("*.safetensors"):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # evicted meanwhile by another worker on the volume
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for mtime, size, path in sorted(files, key=lambda entry: entry[0]):
                if total <= self.max_bytes:
                    break
                if path == keep or mtime > recent:
                    continue
                path.unlink(missing_ok=True)
                total -= size


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a time.monotonic() instant), at least a millisecond; None: no limit."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def fetch_to_cache(
    field: str,
    key: str,
    open_body: Callable[[], Any],
    cache: LoraCache,
    limits: LoraLimits,
    deadline: float | None,
) -> Path:
    """The cached file for `key`, downloaded if need be. `open_body()` is a context manager giving
    (declared size or None, iterator of byte chunks of at most LORA_CHUNK_BYTES). The download runs
    on a thread the job stops waiting for at the sooner of `limits.timeout_s` and `deadline` (the
    job's own time limit); the thread then drops the connection at its next chunk and deletes its
    temporary file: client libraries only time out single reads, so a server trickling bytes could
    otherwise hold a job forever."""
    if (hit := cache.hit(key)) is not None:
        return hit
    outcome: dict[str, Any] = {}
    abandoned = threading.Event()

    def fetch() -> None:
        try:
            outcome["path"] = _stream_to_cache(field, key, open_body, cache, limits.max_bytes, abandoned)
        except Exception as error:  # noqa: BLE001 - handed to the waiting caller below
            outcome["error"] = error

    left = seconds_left(deadline)
    job_bound = left is not None and left < limits.timeout_s
    worker = threading.Thread(target=fetch, name="lora-download", daemon=True)
    worker.start()
    worker.join(left if job_bound else limits.timeout_s)
    if worker.is_alive():
        abandoned.set()
        if job_bound:
            raise LoraError(f"{field}: the download was stopped at the job's time limit (MAX_GENERATION_SECONDS)")
        raise LoraError(f"{field}: the download took longer than {limits.timeout_s:g} s (LORA_DOWNLOAD_TIMEOUT_S)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]


def _too_large(field: str, max_bytes: int) -> LoraError:
    return LoraError(f"{field}: the file is larger than {max_bytes} bytes (MAX_LORA_BYTES)")


def _stream_to_cache(
    field: str, key: str, open_body: Callable[[], Any], cache: LoraCache, max_bytes: int, abandoned: threading.Event
) -> Path:
    """Chunk by chunk into a temporary file in the cache folder, renamed into place when whole and
    a valid LoRA; any failure, the cap or the job giving up removes the temporary file."""
    with open_body() as (declared, chunks):
        if declared is not None and declared > max_bytes:
            raise _too_large(field, max_bytes)
        cache.folder.mkdir(parents=True, exist_ok=True)
        handle, partial_name = tempfile.mkstemp(dir=cache.folder, suffix=".part")
        partial = Path(partial_name)
        try:
            written = 0
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    if abandoned.is_set():
                        raise LoraError(f"{field}: the download was abandoned")  # nobody waits for it
                    written += len(chunk)
                    if written > max_bytes:
                        raise _too_large(field, max_bytes)
                    out.write(chunk)
            _check_safetensors(field, partial)
            target = cache.path(key)
            partial.replace(target)  # atomic: only whole, valid files ever land under the final name
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    cache.evict(keep=target)
    return target


def url_key(url: str) -> str:
    """What identifies a URL's file: the URL without its query string and fragment, so a signed
    URL (S3, R2, GCS: a new signature on every request) names one file, however often it is signed."""
    parts = urlsplit(url)
    return "url:" + urlunsplit((parts.scheme, parts.netloc.lower(), parts.path, "", ""))


@contextmanager
def _url_body(field: str, url: str, limits: LoraLimits) -> Iterator[tuple[int | None, Iterable[bytes]]]:
    """The body behind a request's URL, through the runpod SDK's SSRF guard (public addresses only,
    each redirect re-checked), capped at `max_bytes`."""
    import requests
    from runpod.serverless.utils import rp_ssrf

    def capped(response: Any) -> Iterator[bytes]:
        try:
            yield from rp_ssrf.iter_content_capped(response, LORA_CHUNK_BYTES, limits.max_bytes)
        except rp_ssrf.SSRFError:
            raise _too_large(field, limits.max_bytes) from None
        except requests.RequestException as error:
            raise LoraError(f"{field}: the URL could not be downloaded ({type(error).__name__})") from None

    try:
        response = rp_ssrf.safe_get(url, timeout=limits.timeout_s, max_bytes=limits.max_bytes)
    except rp_ssrf.SSRFError as error:
        if "size cap" in str(error):
            raise _too_large(field, limits.max_bytes) from None
        raise LoraError(f"{field}: the URL is refused: only public http(s) addresses are fetched ({error})") from None
    except requests.RequestException as error:
        raise LoraError(f"{field}: the URL could not be downloaded ({type(error).__name__})") from None
    with response:
        if response.status_code != 200:
            raise LoraError(f"{field}: downloading the URL gave HTTP {response.status_code}")
        yield None, capped(response)  # a declared size over the cap was refused by safe_get


def _hub_error(field: str, repo: str, filename: str, error: Exception) -> LoraError:
    return LoraError(f"{field}: {repo}/{filename} could not be fetched from the Hub ({type(error).__name__})")


# Hub files this process has resolved, by (repo, file): the cache key of the commit it got. Asking
# the Hub which commit a file is at costs a round trip per job; a worker asks once, and a new worker
# (a restart, a scale-up) sees the newest revision.
_HUB_FILES: dict[tuple[str, str], str] = {}


def _hub_file(
    field: str, repo: str, filename: str, cache: LoraCache, limits: LoraLimits, deadline: float | None
) -> tuple[str, Path]:
    """A Hub file in the LoRA cache and its key, the repo, commit and file name: the Hub's answer about
    the file (commit, size; refused over the cap before any byte) and the download both count
    against the deadline."""
    from huggingface_hub import get_hf_file_metadata, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    if (key := _HUB_FILES.get((repo, filename))) is not None and (hit := cache.hit(key)) is not None:
        return key, hit
    left = seconds_left(deadline)
    try:
        timeout = min(HUB_METADATA_TIMEOUT_S, limits.timeout_s, left or HUB_METADATA_TIMEOUT_S)
        metadata = get_hf_file_metadata(hf_hub_url(repo, filename), timeout=timeout)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types (offline, gated, missing, network)
        raise _hub_error(field, repo, filename, error) from None
    if metadata.size is not None and metadata.size > limits.max_bytes:
        raise _too_large(field, limits.max_bytes)
    commit = metadata.commit_hash or "unknown"
    key = f"hub:{repo}@{commit}/{filename}"

    @contextmanager
    def body() -> Iterator[tuple[int | None, Iterable[bytes]]]:
        url = hf_hub_url(repo, filename, revision=metadata.commit_hash)
        try:
            with get_session().stream(
                "GET", url, headers=build_hf_headers(), follow_redirects=True, timeout=limits.timeout_s
            ) as response:
                hf_raise_for_status(response)
                yield metadata.size, response.iter_bytes(LORA_CHUNK_BYTES)
        except LoraError:
            raise
        except Exception as error:  # noqa: BLE001 - as above
            raise _hub_error(field, repo, filename, error) from None

    path = fetch_to_cache(field, key, body, cache, limits, deadline)
    _HUB_FILES[(repo, filename)] = key
    return key, path


def _local_path(source: str) -> Path | None:
    """An absolute path's LoRA file: the file, or a folder's DIFFUSERS_LORA_FILE."""
    path = Path(source)
    if not path.is_absolute():
        return None
    return path / DIFFUSERS_LORA_FILE if path.is_dir() else path


def _hub_path(source: str) -> tuple[str, str] | None:
    """(repo, file) of `owner/repo` (its DIFFUSERS_LORA_FILE) or `owner/repo/file.safetensors`."""
    parts = source.split("/")
    if len(parts) >= 2 and all(parts):
        return "/".join(parts[:2]), "/".join(parts[2:]) or DIFFUSERS_LORA_FILE
    return None


def _identity(source: str, named: dict[str, Adapter]) -> str:
    """The adapter name `source` will resolve to, told without any download: to count a request's
    adapters before fetching them (a Hub file not yet resolved here counts as one of its own)."""
    if source in named:
        return named[source].name
    if source.startswith(("https://", "http://")):
        return _adapter_name(url_key(source))
    if (path := _local_path(source)) is not None:
        return _adapter_name(str(path.resolve()))
    if (hub := _hub_path(source)) is not None and (key := _HUB_FILES.get(hub)) is not None:
        return _adapter_name(key)
    return "unresolved:" + source


def resolve(
    field: str,
    source: str,
    named: dict[str, Adapter],
    cache: LoraCache,
    limits: LoraLimits,
    deadline: float | None = None,
) -> Adapter:
    """The local adapter file behind `source`, downloaded by `deadline` (a time.monotonic() instant,
    the job's time limit; None: only `limits.timeout_s`). Blocking: run it off the event loop."""
    if source in named:
        return named[source]
    if source.startswith(("https://", "http://")):
        key = url_key(source)
        path = fetch_to_cache(field, key, lambda: _url_body(field, source, limits), cache, limits, deadline)
        return Adapter(_adapter_name(key), str(path))
    if (path := _local_path(source)) is not None:
        if not path.is_file():
            raise LoraError(f"{field}: no LoRA file at {source}")
        _check_safetensors(field, path)
        return Adapter(_adapter_name(str(path.resolve())), str(path))
    if (hub := _hub_path(source)) is not None:
        repo, filename = hub
        key, local = _hub_file(field, repo, filename, cache, limits, deadline)
        return Adapter(_adapter_name(key), str(local))
    raise LoraError(
        f"{field}: expected an endpoint LoRA's name, an absolute path, an http(s) URL or a Hub repo"
        " (owner/repo or owner/repo/file.safetensors)"
    )


# An adapter set: (adapter, weight) pairs in a fixed order, so equal sets compare equal.
AdapterSet = tuple[tuple[Adapter, float], ...]


def adapter_set(chosen: list[tuple[Adapter, float]]) -> AdapterSet:
    return tuple(sorted(chosen, key=lambda pair: (pair[0].name, pair[1])))


# ---- adapters on a compiled denoiser (TORCH_COMPILE) ------------------------------------------
# The layers the slots cover: the attention projections, which diffusers' LoRA training scripts
# target (SD, SDXL, FLUX.1, SD 3.5). Every slot computes on every step, zeros or not: a wider
# cover would cost every job, with or without adapters.
HOTSWAP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# A LoRA weight's key in peft's layout: the module, then `lora_A` or `lora_B`.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<tensor>weight|bias)$")


class HotswapSlots:
    """`count` LoRA layers of rank `max_rank` on the attention projections of `pipeline`'s denoiser
    (its `denoiser` attribute: "unet" or "transformer"), prepared before it compiles; a job's adapters
    are copied into them, unused ones hold zeros. See the module docstring."""

    def __init__(self, pipeline: Any, denoiser: str, count: int, max_rank: int) -> None:
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.names = [f"slot_{index}" for index in range(count)]
        self.max_rank = max_rank
        self.modules: dict[str, tuple[int, int]] = {}  # each Linear the slots cover: (in, out) features

    @classmethod
    def prepare(cls, pipeline: Any, limits: LoraLimits) -> HotswapSlots | None:
        """The slots (zeros) on `pipeline`'s denoiser when torch.compile wraps it (None otherwise),
        injected before its first call, so the graph compiled then holds them. A pipeline without LoRA
        hotswap, or LORA_SLOTS=0, gets none: every LoRA request is then refused."""
        import torch

        denoiser = "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"
        model = getattr(pipeline, denoiser)
        if not hasattr(model, "_orig_mod"):  # not compiled: adapters load as usual
            return None
        model = model._orig_mod  # the module torch.compile wraps; it traces it at the first call
        count = limits.slots if hasattr(model, "enable_lora_hotswap") else 0
        slots = cls(pipeline, denoiser, count, limits.max_rank)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in HOTSWAP_TARGETS)):
                slots.modules[name] = (module.in_features, module.out_features)
        for name in slots.names:
            slots.inject(name)
        return slots

    def inject(self, name: str) -> None:
        """A slot of zeros at the target rank, its scalings made tensors (diffusers' enable_lora_hotswap
        before the load): a hotswap then changes values the compiled graph reads, never the graph."""
        model = getattr(self.pipeline, self.denoiser)
        model = getattr(model, "_orig_mod", model)
        model.enable_lora_hotswap(target_rank=self.max_rank, check_compiled="ignore")
        model.load_lora_adapter(self.zeros(everywhere=True), prefix=self.denoiser, adapter_name=name)

    def zeros(self, everywhere: bool = False) -> dict[str, Any]:
        """A LoRA of zeros, fresh tensors (loading may keep them as the slot's own). Hotswapped in with
        one module, it zeroes every other module of the slot too (peft zeroes the keys it lacks)."""
        import torch

        modules = list(self.modules.items())
        state = {}
        for name, (features_in, features_out) in modules if everywhere else modules[:1]:
            state[f"{self.denoiser}.{name}.lora_A.weight"] = torch.zeros(self.max_rank, features_in)
            state[f"{self.denoiser}.{name}.lora_B.weight"] = torch.zeros(features_out, self.max_rank)
        return state

    def check_count(self, wanted: AdapterSet) -> None:
        if len(wanted) > len(self.names):
            raise LoraError(
                f"loras: {len(wanted)} adapters at once, over the {len(self.names)} this endpoint's compiled"
                f" {self.denoiser} holds (LORA_SLOTS, with TORCH_COMPILE): ask for fewer"
            )

    def check(self, adapter: Adapter, field: str) -> None:
        """Refuse, before anything is copied, an adapter a slot cannot hold."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        loaded = self.pipeline.lora_state_dict(adapter.path)
        state = loaded[0] if isinstance(loaded, tuple) else loaded
        setting = "with TORCH_COMPILE (LoRA hotswap)"
        prefix = self.denoiser + "."
        if others := sorted({key.split(".")[0] for key in state if not key.startswith(prefix)}):
            raise LoraError(
                f"{field}: the adapter has layers for {', '.join(others)};"
                f" {setting} only the {self.denoiser}'s are served"
            )
        state = {key.removeprefix(prefix): value for key, value in state.items()}
        if state and not any("lora_A" in key for key in state):
            state = convert_unet_state_dict_to_peft(state)  # diffusers' older layout, as load_lora_weights does
        for key, value in state.items():
            match = _LORA_KEY.match(key)
            if match is None or match["tensor"] != "weight":
                raise LoraError(f"{field}: the adapter holds {key}, not a plain LoRA weight: not served {setting}")
            if match["module"] not in self.modules:
                raise LoraError(
                    f"{field}: the adapter changes {match['module']}; {setting} only the attention projections"
                    f" ({', '.join(HOTSWAP_TARGETS)}) take adapters"
                )
            features_in, features_out = self.modules[match["module"]]
            if value.shape[1 if match["part"] == "A" else 0] != (features_in if match["part"] == "A" else features_out):
                raise LoraError(f"{field}: the adapter does not fit this model ({match['module']} has other sizes)")
            if match["part"] == "A" and value.shape[0] > self.max_rank:
                raise LoraError(
                    f"{field}: the adapter's rank {value.shape[0]} is over the {self.max_rank} this endpoint's"
                    f" compiled {self.denoiser} holds {setting}: raise LORA_MAX_RANK"
                )

    def fill(self, wanted: AdapterSet, fields: list[str]) -> None:
        """Copy `wanted` into the slots, its weights applied, and zero the slots it leaves."""
        self.check_count(wanted)
        for (adapter, _), field in zip(wanted, fields, strict=True):
            self.check(adapter, field)  # every adapter, before any is copied
        for index, name in enumerate(self.names):
            if index < len(wanted):
                adapter, weight = wanted[index]
                self._swap(name, adapter.path, weight, fields[index])
            else:
                self._swap(name, self.zeros(), 1.0, "loras")

    def _swap(self, name: str, source: Any, weight: float, field: str) -> None:
        try:
            self.pipeline.load_lora_weights(source, adapter_name=name, hotswap=True)
        except Exception as error:  # noqa: BLE001 - past check(): diffusers removed the slot; zeros again
            self.inject(name)
            raise LoraError(
                f"{field}: the adapter does not fit the compiled {self.denoiser} ({type(error).__name__})"
            ) from None
        # The weight on the slot's scalings, in place: tensors the compiled graph reads, not constants in it.
        if weight != 1.0:
            from peft.tuners.lora import LoraLayer

            for module in getattr(self.pipeline, self.denoiser).modules():
                if isinstance(module, LoraLayer) and name in module.scaling:
                    module.scaling[name].mul_(weight)


class AdapterGate:
    """Jobs run together only when they want the same adapters; see the module docstring."""

    def __init__(self, pipeline: Any, max_loaded: int, pinned: set[str], slots: HotswapSlots | None = None) -> None:
        self.pipeline = pipeline  # adapters load into its modules, which every pipeline shares
        self.slots = slots  # a compiled denoiser's (TORCH_COMPILE): adapters are copied into them instead
        self.max_loaded = max_loaded
        self.pinned = pinned  # endpoint LoRAs: never evicted
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self.current: AdapterSet = ()
        self.running = 0
        self.waiting: dict[AdapterSet, int] = {}
        self.changed = threading.Condition()

    def load(self, adapter: Adapter, field: str, keep: frozenset[str] = frozenset()) -> None:
        """Load one adapter into the shared modules. Only while no job runs (or at start). Evicts
        the least recently used beyond max_loaded, never a pinned one nor one in `keep`."""
        if adapter.name in self.loaded:
            self.loaded.move_to_end(adapter.name)
            return
        if self.slots is not None:
            self.slots.check(adapter, field)  # copied into a slot by _switch; nothing loads here
            self.loaded[adapter.name] = adapter
            return
        try:
            self.pipeline.load_lora_weights(adapter.path, adapter_name=adapter.name)
        except Exception as error:  # noqa: BLE001 - peft and diffusers raise many types for a bad adapter
            self._forget(adapter.name)
            raise LoraError(f"{field}: the adapter does not fit this model ({type(error).__name__})") from None
        if not any(adapter.name in names for names in self.pipeline.get_list_adapters().values()):
            self._forget(adapter.name)
            raise LoraError(f"{field}: the adapter does not fit this model (none of its layers are in it)")
        self.loaded[adapter.name] = adapter
        kept = self.pinned | keep | {adapter.name}
        while len(self.loaded) > self.max_loaded:
            unpinned = next((name for name in self.loaded if name not in kept), None)
            if unpinned is None:
                break  # cannot happen for a set that passed check_fits
            self._forget(unpinned)

    def preload(self, adapters: list[tuple[Adapter, str]]) -> None:
        """Load the endpoint's adapters at start, then leave the base model active."""
        for adapter, field in adapters:
            self.load(adapter, field)
        self._switch((), [])

    def _forget(self, name: str) -> None:
        self.loaded.pop(name, None)
        if self.slots is None and any(name in names for names in self.pipeline.get_list_adapters().values()):
            self.pipeline.delete_adapters(name)

    def check_fits(self, wanted: AdapterSet) -> None:
        """Refuse a set that cannot be loaded at once beside the endpoint's pinned adapters: loading
        its last adapter would evict its first, and set_adapters would fail."""
        if self.slots is not None:
            self.slots.check_count(wanted)
        needed = self.pinned | {adapter.name for adapter, _ in wanted}
        if len(needed) > self.max_loaded:
            beside = len(needed) - len(wanted)
            raise LoraError(
                f"loras: {len(wanted)} adapter(s) and the endpoint's {beside} other LORAS make {len(needed)}"
                f" loaded at once, over this endpoint's {self.max_loaded} (MAX_LORAS_LOADED): ask for fewer"
            )

    def _switch(self, wanted: AdapterSet, fields: list[str]) -> None:
        if self.slots is not None:
            self.slots.fill(wanted, fields)  # every adapter checked before any is copied; the rest zeroed
            self.current = wanted
            return
        keep = frozenset(adapter.name for adapter, _ in wanted)  # the set switched in: never evicted by itself
        for (adapter, _), field in zip(wanted, fields, strict=True):
            self.load(adapter, field, keep)
        if wanted:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([a.name for a, _ in wanted], adapter_weights=[w for _, w in wanted])
        elif self.loaded:
            self.pipeline.disable_lora()  # the base weights exactly: peft's layers pass straight through
        self.current = wanted

    @contextmanager
    def using(self, wanted: AdapterSet, fields: list[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the shared modules with `wanted` active for the body's duration."""
        self.check_fits(wanted)  # before waiting, before anything loads
        with self.changed:
            self.waiting[wanted] = self.waiting.get(wanted, 0) + 1
            try:
                while not self._admits(wanted):
                    if on_wait:
                        on_wait()
                    self.changed.wait(timeout=1.0)
            finally:
                self.waiting[wanted] -= 1
                if not self.waiting[wanted]:
                    del self.waiting[wanted]
            if wanted != self.current:
                try:
                    self._switch(wanted, fields)
                except LoraError:
                    self._switch((), [])  # a failed load leaves the base model active
                    self.changed.notify_all()
                    raise
            self.running += 1
        try:
            yield
        finally:
            with self.changed:
                self.running -= 1
                self.changed.notify_all()

    def _admits(self, wanted: AdapterSet) -> bool:
        if self.running == 0:
            return True
        others_waiting = any(key != self.current for key in self.waiting)
        return wanted == self.current and not others_waiting


def resolve_requested(
    requested: list[tuple[str, float | None]],
    named: dict[str, Adapter],
    named_weights: dict[str, float],
    cache: LoraCache,
    limits: LoraLimits,
    deadline: float | None = None,
) -> tuple[AdapterSet, tuple[str, ...], tuple[float, ...]]:
    """A request's `loras`, as (source, weight) pairs in its order: the adapter set of their local
    files (downloaded or fetched from the Hub if need be, by `deadline`), the request field of each
    adapter in the set (for errors), and the weight each pair got: its own, the endpoint LoRA's, or 1.
    A request that cannot fit beside the endpoint's own adapters is refused before any download."""
    endpoint = {adapter.name for adapter in named.values()}
    new = {_identity(source, named) for source, _ in requested} - endpoint
    if len(endpoint) + len(new) > limits.max_loaded:
        raise LoraError(
            f"loras: {len(new)} adapter(s) beside the endpoint's {len(endpoint)} LORAS make"
            f" {len(endpoint) + len(new)} loaded at once, over this endpoint's {limits.max_loaded}"
            " (MAX_LORAS_LOADED): ask for fewer"
        )
    weights = tuple(weight if weight is not None else named_weights.get(source, 1.0) for source, weight in requested)
    chosen: dict[str, tuple[Adapter, float, str]] = {}
    for index, ((source, _), weight) in enumerate(zip(requested, weights, strict=True)):
        field = f"loras.{index}.source"
        adapter = resolve(field, source, named, cache, limits, deadline)
        if adapter.name in chosen:
            raise LoraError(f"{field}: the same adapter twice; give it one weight")
        chosen[adapter.name] = (adapter, weight, field)
    adapters = adapter_set([(adapter, weight) for adapter, weight, _ in chosen.values()])
    fields = {adapter.name: field for adapter, _, field in chosen.values()}
    return adapters, tuple(fields[adapter.name] for adapter, _ in adapters), weights


def load_endpoint_loras(
    value: str | None, pipeline: Any, cache: LoraCache, limits: LoraLimits
) -> tuple[AdapterGate, dict[str, Adapter], dict[str, float]]:
    """The endpoint's own LoRAs (LORAS), loaded into `pipeline` at start and never evicted: the gate
    over them, and each one's adapter and weight by name. More of them than `limits.max_loaded`
    stops the worker, naming MAX_LORAS_LOADED."""
    gate = AdapterGate(pipeline, limits.max_loaded, pinned=set(), slots=HotswapSlots.prepare(pipeline, limits))
    adapters: dict[str, Adapter] = {}
    weights: dict[str, float] = {}
    for index, entry in enumerate(parse_endpoint_loras(value)):
        adapter = resolve(f"LORAS[{index}]", entry["source"], {}, cache, limits)
        adapters[entry["name"]] = adapter
        weights[entry["name"]] = entry["weight"]
        gate.pinned.add(adapter.name)
    if len(gate.pinned) > limits.max_loaded:
        raise ValueError(
            f"LORAS names {len(gate.pinned)} adapters, over MAX_LORAS_LOADED ({limits.max_loaded}):"
            " raise it or name fewer"
        )
    gate.preload([(adapter, f"LORAS ({name})") for name, adapter in adapters.items()])
    return gate, adapters, weights


def parse_endpoint_loras(value: str | None) -> list[dict[str, Any]]:
    """LORAS: a JSON list of {"name", "source", "weight"}, e.g.
    [{"name": "pixel", "source": "/runpod-volume/loras/pixel.safetensors", "weight": 0.8}]."""
    import json

    if not value:
        return []
    try:
        entries = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"LORAS must be a JSON list of {{name, source, weight}}: {error}") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("source"), str) for e in entries
    ):
        raise ValueError('LORAS must be a JSON list of {"name": str, "source": str, "weight": number}')
    return [{"name": e["name"], "source": e["source"], "weight": float(e.get("weight", 1.0))} for e in entries]


def default_cache_dir(volume: str = "/runpod-volume") -> Path:
    """On the network volume when one is attached, so every worker shares the downloads."""
    return Path(volume, "loras") if os.path.isdir(volume) else Path("/tmp/loras")
