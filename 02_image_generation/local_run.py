"""Make `python handler.py` print what a job really returns, chunk by chunk.

The runpod SDK's local mode (`python handler.py`, reading `test_input.json` or `--test_input`)
never iterates a generator handler: it logs `<generator object ...>` and exits 0, even when the
generator would fail. It also never JSON-encodes the result, so an output production could not
deliver (bytes, numpy values) passes locally.

`for_local_run(handler)` leaves the handler untouched whenever the SDK will take real jobs (on
Runpod, or under `--rp_serve_api`). For a local test run it returns a plain async handler that
drives the real one, prints every chunk (or the single result) as a JSON line the moment it
comes, and turns an `{"error": ...}` chunk into a failed job, so the process exits non-zero
exactly when the job would fail in production.

This file is copied, identical, into every example folder (each folder is its own Docker
context); `tests/copied_modules/test_local_run.py` checks that the copies match and exercises each one.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def is_local_test_run(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True when `runpod.serverless.start` will run one local test job (the SDK's own rule)."""
    if _has_flag(argv, "--rp_serve_api") or environ.get("RUNPOD_REALTIME_PORT"):
        return False
    return _has_flag(argv, "--test_input") or not environ.get("RUNPOD_WEBHOOK_GET_JOB")


def _print_json(value: Any) -> None:
    # json.dumps is what production uses to send results: anything it cannot encode fails here too.
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _error_of(chunk: Any) -> str | None:
    # The SDK ends a streamed job as failed on the first chunk that is a dict with a truthy "error".
    if isinstance(chunk, dict) and chunk.get("error"):
        return str(chunk["error"])
    return None


async def _iterate(stream: Any) -> AsyncIterator[Any]:
    if inspect.isasyncgen(stream):
        async for chunk in stream:
            yield chunk
    else:
        for chunk in stream:
            yield chunk


def for_local_run(
    handler: Callable[[dict], Any],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Callable[[dict], Any]:
    """Return `handler` as is for real serving, or a printing wrapper for a local test run."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    if not is_local_test_run(argv, environ):
        return handler

    async def run_and_print(job: dict) -> Any:
        result = handler(job)
        if inspect.isawaitable(result):
            result = await result
        if not (inspect.isasyncgen(result) or inspect.isgenerator(result)):
            _print_json(result)
            return result

        chunks = []
        async for chunk in _iterate(result):
            if (error := _error_of(chunk)) is not None:
                return {"error": error}
            _print_json(chunk)
            chunks.append(chunk)
        return chunks

    return run_and_print
