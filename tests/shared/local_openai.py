"""The examples' local OpenAI endpoint (openai_endpoint.py) over real HTTP, for the tests: on a
loaded handler in this process (uvicorn on a thread, on a free port), or as the command a user runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

import httpx
import openai
import uvicorn

from tests.shared.harness import REPO, base_env, free_port, load_copy, stop_process_group


def endpoint_module(example: str) -> ModuleType:
    """`example`'s copy of openai_endpoint.py, imported under a name of its own."""
    return load_copy(REPO / example / "openai_endpoint.py")


@contextlib.contextmanager
def serving(endpoint: ModuleType, worker_config: Mapping[str, Any], routes: Iterable[str]) -> Iterator[str]:
    """`endpoint.openai_app(worker_config, routes)` on a free port; yields the server's base URL."""
    app = endpoint.openai_app(worker_config, routes)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the local OpenAI endpoint did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serving_handler(example: str, module: ModuleType) -> Iterator[str]:
    """A loaded handler module (tests.shared.harness.load_handler) behind its example's endpoint."""
    with serving(endpoint_module(example), module.WORKER_CONFIG, module.schema.OPENAI_ROUTES) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    """The official client on the endpoint; no retries, so a 500 fails the call at once."""
    return openai.OpenAI(api_key="local", base_url=f"{url}/openai/v1", max_retries=0, timeout=120)


class EndpointCommand:
    """`python openai_endpoint.py --port N` in the example's folder, as a user runs it, in its own
    process group (stopped by its pid)."""

    def __init__(self, example: str, env: Mapping[str, str], startup_timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # a file: a chatty server never blocks on a pipe
        self.process = subprocess.Popen(
            [sys.executable, "openai_endpoint.py", "--port", str(self.port)],
            cwd=REPO / example,
            env=base_env(**env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"openai_endpoint.py exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/openai/v1/models", timeout=1).status_code == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"openai_endpoint.py did not answer on port {self.port} within {startup_timeout}s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> str:
        stop_process_group(self.process)
        return self.output()

    def __enter__(self) -> EndpointCommand:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
