"""LoRA adapters over shared weights: where they come from, how many stay loaded, and which job sees which.

A LoRA adapter adds small low-rank layers to the UNet (and sometimes the text encoders). diffusers
loads it with peft *into the shared modules* (`load_lora_weights(..., adapter_name=...)`) and
chooses the active adapters and their weights *on those modules* (`set_adapters`). So the active
set is state every job on the worker shares, and two jobs wanting different sets cannot run at
the same moment. `AdapterGate` admits jobs by their adapter set: any number of jobs with the
same set (no adapters included) run together; a job wanting another set waits until they are
done, then the set is switched (loading what is missing, evicting the least recently used beyond
`max_loaded`) while no job runs. A waiting job stops the admission of new jobs of the running
set, so nobody waits forever.

Sources, resolved to a local file before a job waits for the gate (`resolve`; a request's list with
`resolve_requested`, the endpoint's LORAS at start with `load_endpoint_loras`):
* an endpoint LoRA's name (the LORAS setting, loaded at start);
* a local or network-volume path: a `.safetensors` file, or a folder holding
  `pytorch_lora_weights.safetensors` (what diffusers' training scripts write);
* an http(s) URL, downloaded with the image downloader's caps (size, SSRF guard, deadline) and
  cached on disk by the URL's hash;
* a Hub file `owner/repo/file.safetensors`, or a Hub repo `owner/repo` holding
  `pytorch_lora_weights.safetensors`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images import ImageInputError, ImageLimits, download

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' trainers write


class LoraError(ValueError):
    """An adapter the caller must fix; the message names the field."""


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


# Hub files this process has fetched and checked, by (repo, file). hf_hub_download asks the Hub for
# the file's current revision on every call, even when it is cached: a round trip per job. So a
# worker resolves each Hub file once; a new worker (a restart, a scale-up) sees the newest revision.
_HUB_FILES: dict[tuple[str, str], Path] = {}


def resolve(field: str, source: str, named: dict[str, Adapter], cache_dir: Path, limits: ImageLimits) -> Adapter:
    """The local adapter file behind `source`. Blocking (downloads): run it off the event loop."""
    if source in named:
        return named[source]
    if source.startswith(("https://", "http://")):
        target = cache_dir / (hashlib.sha256(source.encode()).hexdigest() + ".safetensors")
        if not target.exists():
            try:
                data = download(field, source, limits, what="file")
            except ImageInputError as error:
                raise LoraError(str(error)) from None
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            _check_safetensors(field, partial)
            partial.replace(target)  # only whole, valid files ever land under the final name
        return Adapter(_adapter_name(source), str(target))
    path = Path(source)
    if path.is_absolute():
        if path.is_dir():
            path = path / DIFFUSERS_LORA_FILE
        if not path.is_file():
            raise LoraError(f"{field}: no LoRA file at {source}")
        _check_safetensors(field, path)
        return Adapter(_adapter_name(str(path.resolve())), str(path))
    parts = source.split("/")
    if len(parts) >= 2 and all(parts):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or DIFFUSERS_LORA_FILE
        if (local := _HUB_FILES.get((repo, filename))) is None:
            try:
                local = Path(hf_hub_download(repo, filename))
            except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
                raise LoraError(
                    f"{field}: {repo}/{filename} could not be fetched from the Hub ({type(error).__name__})"
                ) from None
            _check_safetensors(field, local)
            _HUB_FILES[(repo, filename)] = local
        return Adapter(_adapter_name(f"hub:{repo}/{filename}"), str(local))
    raise LoraError(
        f"{field}: expected an endpoint LoRA's name, an absolute path, an http(s) URL or a Hub repo"
        " (owner/repo or owner/repo/file.safetensors)"
    )


# An adapter set: (adapter, weight) pairs in a fixed order, so equal sets compare equal.
AdapterSet = tuple[tuple[Adapter, float], ...]


def adapter_set(chosen: list[tuple[Adapter, float]]) -> AdapterSet:
    return tuple(sorted(chosen, key=lambda pair: (pair[0].name, pair[1])))


class AdapterGate:
    """Jobs run together only when they want the same adapters; see the module docstring."""

    def __init__(self, pipeline: Any, max_loaded: int, pinned: set[str]) -> None:
        self.pipeline = pipeline  # adapters load into its modules, which every pipeline shares
        self.max_loaded = max_loaded
        self.pinned = pinned  # endpoint LoRAs: never evicted
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self.current: AdapterSet = ()
        self.running = 0
        self.waiting: dict[AdapterSet, int] = {}
        self.changed = threading.Condition()

    def load(self, adapter: Adapter, field: str) -> None:
        """Load one adapter into the shared modules. Only while no job runs (or at start)."""
        if adapter.name in self.loaded:
            self.loaded.move_to_end(adapter.name)
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
        while len(self.loaded) > self.max_loaded:
            unpinned = next((name for name in self.loaded if name not in self.pinned), None)
            if unpinned is None or unpinned == adapter.name:
                break
            self._forget(unpinned)

    def preload(self, adapters: list[tuple[Adapter, str]]) -> None:
        """Load the endpoint's adapters at start, then leave the base model active."""
        for adapter, field in adapters:
            self.load(adapter, field)
        self._switch((), [])

    def _forget(self, name: str) -> None:
        self.loaded.pop(name, None)
        if any(name in names for names in self.pipeline.get_list_adapters().values()):
            self.pipeline.delete_adapters(name)

    def _switch(self, wanted: AdapterSet, fields: list[str]) -> None:
        for (adapter, _), field in zip(wanted, fields, strict=True):
            self.load(adapter, field)
        if wanted:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([a.name for a, _ in wanted], adapter_weights=[w for _, w in wanted])
        elif self.loaded:
            self.pipeline.disable_lora()  # the base weights exactly: peft's layers pass straight through
        self.current = wanted

    @contextmanager
    def using(self, wanted: AdapterSet, fields: list[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the shared modules with `wanted` active for the body's duration."""
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
    cache_dir: Path,
    limits: ImageLimits,
) -> tuple[AdapterSet, tuple[str, ...], tuple[float, ...]]:
    """A request's `loras`, as (source, weight) pairs in its order: the adapter set of their local
    files (downloaded or fetched from the Hub if need be), the request field of each adapter in the
    set (for errors), and the weight each pair got: its own, the endpoint LoRA's, or 1."""
    weights = tuple(weight if weight is not None else named_weights.get(source, 1.0) for source, weight in requested)
    chosen: dict[str, tuple[Adapter, float, str]] = {}
    for index, ((source, _), weight) in enumerate(zip(requested, weights, strict=True)):
        field = f"loras.{index}.source"
        adapter = resolve(field, source, named, cache_dir, limits)
        if adapter.name in chosen:
            raise LoraError(f"{field}: the same adapter twice; give it one weight")
        chosen[adapter.name] = (adapter, weight, field)
    adapters = adapter_set([(adapter, weight) for adapter, weight, _ in chosen.values()])
    fields = {adapter.name: field for adapter, _, field in chosen.values()}
    return adapters, tuple(fields[adapter.name] for adapter, _ in adapters), weights


def load_endpoint_loras(
    value: str | None, pipeline: Any, max_loaded: int, cache_dir: Path, limits: ImageLimits
) -> tuple[AdapterGate, dict[str, Adapter], dict[str, float]]:
    """The endpoint's own LoRAs (LORAS), loaded into `pipeline` at start and never evicted: the gate
    over them, and each one's adapter and weight by name."""
    gate = AdapterGate(pipeline, max_loaded, pinned=set())
    adapters: dict[str, Adapter] = {}
    weights: dict[str, float] = {}
    for index, entry in enumerate(parse_endpoint_loras(value)):
        adapter = resolve(f"LORAS[{index}]", entry["source"], {}, cache_dir, limits)
        adapters[entry["name"]] = adapter
        weights[entry["name"]] = entry["weight"]
        gate.pinned.add(adapter.name)
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
