"""The tiny models on disk, built once and shared by every test session on the machine.

CI runs several pytest sessions (the main suite, tests/vllm_cpu.sh, tests/openvino_cpu.sh, the
built-image tests that mount tiny models into containers); each asks for the same kinds. `cached`
builds a kind the first time any of them asks and hands out that folder from then on:

    $TINY_MODELS_CACHE (default ~/.cache/runpod-workers/tiny-models) / <key> / <kind>

The key hashes this package's source files and the installed versions of the libraries that write
the files, so changing a builder or upgrading transformers gives new folders instead of stale ones
(delete old keys' folders at will). A build goes into a temporary folder beside its final place and
is renamed there in one step, under a per-kind file lock: a crash or a concurrent session never
leaves, nor sees, half a model. The folders are shared, so a test must never write into one: copy it
to tmp_path first (tests/conftest.py fails the session if a handed-out folder changed).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tests.shared.disk_cache import built_once

PACKAGE = Path(__file__).resolve().parent
DEFAULT_ROOT = Path.home() / ".cache" / "runpod-workers" / "tiny-models"

# Every distribution the builders import (directly or through the ones they call to save files),
# plus those whose versions end up in the files (sentence-transformers' model cards list accelerate
# and datasets). A missing one counts as "absent".
LIBRARIES = (
    "torch",
    "transformers",
    "diffusers",
    "sentence-transformers",
    "tokenizers",
    "sentencepiece",
    "peft",
    "safetensors",
    "huggingface-hub",
    "accelerate",
    "datasets",
    "numpy",
)


def library_versions() -> dict[str, str]:
    """{distribution: installed version or "absent"} for LIBRARIES, and Python's own version."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def source_files() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def cache_key(sources: Iterable[Path] | None = None, versions: Mapping[str, str] | None = None) -> str:
    """16 hex digits of a hash over the package's sources (name and bytes) and the library versions."""
    digest = hashlib.sha256()
    for path in sorted(source_files() if sources is None else sources, key=lambda path: path.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name, version in sorted((library_versions() if versions is None else versions).items()):
        digest.update(f"{name}=={version}\n".encode())
    return digest.hexdigest()[:16]


@functools.cache
def _this_key() -> str:
    return cache_key()


def cache_root() -> Path:
    return Path(os.environ.get("TINY_MODELS_CACHE") or DEFAULT_ROOT)


def cached(
    kind: str,
    root: Path | None = None,
    key: str | None = None,
    build: Callable[[str, Path], Path] | None = None,
) -> Path:
    """The folder of tiny model `kind` in the cache, built there (with `build`, by default the
    package's) if no session built it before. Never write into it."""
    if build is None:
        from tests.shared.tiny_models import build
    folder = (cache_root() if root is None else Path(root)) / (key or _this_key())
    return built_once(folder, kind, lambda partial: build(kind, partial))


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime in ns)} of every file under `folder`: changes when a file is
    written, added or removed."""
    return {
        str(path.relative_to(folder)): (stat.st_size, stat.st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (stat := path.stat())
    }
