"""Endpoint settings as handler.py reads them: each from its environment variable, once, at import.
One identical copy per example (each folder is its own Docker build context).

An unset or empty variable gives the default; handler.py names every setting, its default and the
reason for it (and the README's Configuration table lists exactly the variables it reads).
"""

from __future__ import annotations

import os
from typing import TypeVar

Default = TypeVar("Default", int, float, None)


def env_int(name: str, default: int | Default) -> int | Default:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def env_flag(name: str, default: bool) -> bool:
    """ "1", "true" or "yes" (any case) is true; anything else set is false."""
    return (os.environ.get(name) or str(default)).lower() in ("1", "true", "yes")
