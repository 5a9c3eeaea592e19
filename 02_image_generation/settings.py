"""Endpoint settings as handler.py reads them: each from its environment variable, once, at import.

An unset or empty variable gives the default; handler.py names every setting, its default and the
reason for it (and the README's Configuration table lists exactly the variables it reads).
"""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def env_flag(name: str, default: bool) -> bool:
    """ "1", "true" or "yes" (any case) is true; anything else set is false."""
    return (os.environ.get(name) or str(default)).lower() in ("1", "true", "yes")
