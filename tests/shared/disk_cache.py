"""A folder built once into an on-disk cache that every test session shares, and never written after.

The tiny models (`tiny_models/cache.py`) and the pgvector build (`postgres.py`) are each made by
the first session that asks, while parallel test processes (pytest -n) may ask at the same moment:
the build runs under a file lock, into a temporary folder beside the cache, renamed into place
whole, so a reader sees the complete folder or none, and a crashed build leaves nothing behind
that counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built_once(base: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`base/name`, made by `build(folder)` if no session made it before. Never write into it."""
    final = base / name
    if final.is_dir():
        return final
    partials = base / ".partial" / name
    with _locked(base / ".locks" / f"{name}.lock"):
        if final.is_dir():  # another session built it while this one waited
            return final
        # Under the lock nobody else builds this name: what is left here is a crashed build's.
        shutil.rmtree(partials, ignore_errors=True)
        partials.mkdir(parents=True)
        partial = Path(tempfile.mkdtemp(dir=partials))
        try:
            build(partial)
            # mkdtemp's 0700 would hide the folder from other accounts: a container's users, the
            # account PostgreSQL runs as.
            partial.chmod(0o755)
            os.replace(partial, final)
        finally:
            shutil.rmtree(partials, ignore_errors=True)
    return final
