"""Run the examples' handlers the way Runpod does, on CPU, from the tests.

* `load_handler` imports an example's `handler.py` by path under a given environment, so its
  module-level model load runs exactly as in a worker.
* `run_job` pushes one job through the runpod SDK's own job runners (`run_job` for plain and
  async handlers, `run_job_generator` for sync and async generators), shaped as the SDK's
  `handle_job` shapes it, and checks every output with `json.dumps`: production silently drops
  anything it cannot encode, and sends NaN or Infinity as tokens strict JSON parsers refuse.
* `run_local` runs `python handler.py` in the example's folder, as a user does.
* `DevServer` starts `python handler.py --rp_serve_api` on a free port and stops it by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from runpod.serverless.modules.rp_handler import is_generator
from runpod.serverless.modules.rp_job import run_job as sdk_run_job
from runpod.serverless.modules.rp_job import run_job_generator as sdk_run_job_generator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ("01_text_generation", "02_image_generation", "03_embeddings", "04_multimodal")

# Variables the SDK reads to decide it is on Runpod; a test environment must never inherit them.
_RUNPOD_SERVING_VARS = ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_REALTIME_PORT", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID")


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_handler(example: str, env: Mapping[str, str]) -> ModuleType:
    """Import `<example>/handler.py` as a fresh module; its model loads now, under `env`.

    Each call gives an independent module (its own model and settings), so tests can load the
    same example twice with different environments.
    """
    folder = REPO / example
    name = f"{example}_handler_{abs(hash(frozenset(env.items())))}"
    spec = importlib.util.spec_from_file_location(name, folder / "handler.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # Sibling modules (local_run.py, ...) have the same names in every example folder: import
    # this folder's copies, and forget them afterwards so the next example gets its own.
    siblings = {path.stem for path in folder.glob("*.py")} - {"handler"}
    sys.path.insert(0, str(folder))
    sys.modules[name] = module  # as an import does: pydantic resolves the handler's annotations here
    try:
        with patched_environ(env):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(folder))
        for sibling in siblings:
            sys.modules.pop(sibling, None)
    return module


def beside(background: Callable[[], None], foreground: Callable[[], None], times: int) -> list[BaseException]:
    """Run `foreground` `times` times while another thread runs `background` over and over; the
    errors `background` raised (the foreground's propagate). For races between two threads."""
    stop, errors = threading.Event(), []

    def loop() -> None:
        try:
            while not stop.is_set():
                background()
        except Exception as error:  # noqa: BLE001 - returned to the test
            errors.append(error)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for _ in range(times):
            foreground()
    finally:
        stop.set()
        thread.join()
    return errors


class _LazyHandlers(dict):
    def __init__(self, example: str, env: Callable[[str], Mapping[str, str]]) -> None:
        super().__init__()
        self.example, self.env = example, env

    def __missing__(self, key: str) -> ModuleType:
        self[key] = load_handler(self.example, self.env(key))
        return self[key]


def lazy_handlers(example: str, env: Callable[[str], Mapping[str, str]]) -> dict[str, ModuleType]:
    """`example`'s handler for each key, loaded under `env(key)` the first time a test asks: a test
    module's families share their loads, and a test run selecting a few loads only theirs."""
    return _LazyHandlers(example, env)


def shared_copies(filename: str) -> list[Path]:
    """Every example's copy of a helper that is repeated on purpose (each folder is its own image)."""
    return [REPO / example / filename for example in EXAMPLES if (REPO / example / filename).exists()]


def load_copy(path: Path) -> ModuleType:
    """Import one example's copy of a shared helper under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_{path.parent.name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def assert_json(value: Any) -> None:
    """Fail the test where production would lose a result (json.dumps raising TypeError) or send
    one no strict JSON parser reads: NaN and Infinity, which json.dumps writes by default as bare
    NaN/Infinity tokens that JSON has not got (JavaScript's JSON.parse and most clients refuse them)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AssertionError(f"handler output is not plain JSON: {error}") from error


async def run_job_async(handler: Any, job: dict[str, Any], return_aggregate_stream: bool = True) -> dict[str, Any]:
    """One job through the SDK's runners, with the final result shaped as `rp_job.handle_job` does.

    For generators the result also has "stream": every chunk as it would reach `/stream`.
    """
    job = {"id": "test-job", **job}
    if not is_generator(handler):
        result = await sdk_run_job(handler, job)
        assert_json(result)
        return result

    result: dict[str, Any] = {"output": []}
    stream: list[Any] = []
    async for part in sdk_run_job_generator(handler, job):
        if isinstance(part.get("output"), dict) and part["output"].get("error"):
            part = {"error": str(part["output"]["error"])}
        if part.get("error"):
            result = part
            break
        assert_json(part)
        stream.append(part["output"])
        if return_aggregate_stream:
            result["output"].append(part["output"])
    assert_json(result)
    return {**result, "stream": stream}


def run_job(handler: Any, job_input: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one job with `job_input` as its "input" on a fresh event loop; see `run_job_async`."""
    return asyncio.run(run_job_async(handler, {"input": job_input}, **kwargs))


def ok(result: dict[str, Any]) -> Any:
    """A job's output, failing the test (with the result) if the job failed."""
    assert "error" not in result, result
    return result["output"]


def openai_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The job input that Runpod's OpenAI gateway makes of a POST /v1/chat/completions `body`."""
    return {"openai_route": "/v1/chat/completions", "openai_input": body}


def base_env(**env: str) -> dict[str, str]:
    """The current environment without Runpod's serving variables, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in _RUNPOD_SERVING_VARS}
    clean.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    clean.update(env)
    return clean


def run_local(
    example: str, env: Mapping[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python handler.py [args]` in the example's folder, as a user runs it."""
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=REPO / example,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_lines(text: str) -> list[Any]:
    """The lines of a local run's stdout that are JSON documents (the printed results)."""
    values = []
    for line in text.splitlines():
        if line.startswith(("{", "[", '"')):
            with contextlib.suppress(json.JSONDecodeError):
                values.append(json.loads(line))
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process and its children (its own session), SIGKILL if still there after 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class DevServer:
    """`python handler.py --rp_serve_api` on a free port, in its own process group."""

    def __init__(self, example: str, env: Mapping[str, str], startup_timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a chatty server would fill a pipe nobody reads and block.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(self.port)],
            cwd=REPO / example,
            env=base_env(**env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._wait_until_up(startup_timeout)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dev server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"dev server did not listen on port {self.port} within {timeout}s")

    def post(self, route: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}{route}", json=body, timeout=timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> str:
        """Stop the server's whole process group by its pid and return what it printed."""
        stop_process_group(self.process)
        return self.output()

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def openai_failure(result: dict[str, Any]) -> tuple[str, int, str]:
    """A failed OpenAI-route job's (message, HTTP status, error type): its error text is OpenAI's
    error object as JSON, the status in `code` (errors.openai_error)."""
    error = json.loads(result["error"])["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error["message"], error["code"], error["type"]


def load_copy_beside(path: Path) -> ModuleType:
    """`load_copy`, with `path`'s folder first on sys.path while it imports, and its sibling
    modules forgotten before and after (the next example's copy gets its own)."""
    siblings = {module.stem for module in path.parent.glob("*.py")}
    for name in siblings:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(path.parent))
    try:
        return load_copy(path)
    finally:
        sys.path.remove(str(path.parent))
        for name in siblings:
            sys.modules.pop(name, None)
