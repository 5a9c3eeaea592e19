"""An emulated Runpod job API on 127.0.0.1, and workers started against it exactly as in production.

In production `runpod.serverless.start` does not call the handler in-process: it takes jobs over
HTTP, POSTs every streamed chunk and the final result back, and long-polls a stop channel
(`../shared/notes/runpod-sdk-1.12.md` §1 describes the protocol). `JobAPI` serves those routes:

  GET  /job-take/<worker>?...            one job (JSON object) or 204 when the queue is empty
  GET  /job-take-batch/<worker>?...      up to `batch_size` jobs (a JSON list) or 204
  GET  /job-stop/<worker>?...            {"jobsToStop": [...]} for cancelled jobs, or 204
  POST /job-stream/<worker>/<job>?...    one streamed chunk, {"output": chunk}
  POST /job-done/<worker>/<job>?...      the result (or an IN_PROGRESS progress update)
  GET  /ping/<worker>                    the heartbeat

It records every POST with its arrival time, and can hold each POST for `post_delay_s` before it
answers, standing in for the network between a worker and Runpod. Take routes long-poll for a
moment, as the real server does, so an idle worker does not spin.

`Worker` runs `python handler.py` in an example's folder with the SDK's webhook variables
pointing at a `JobAPI`: the real job loop, concurrency, streaming and stop signals of the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.shared.harness import REPO, base_env, stop_process_group

# How long an empty take or stop poll is held open before it answers 204 (the real API long-polls).
LONG_POLL_S = 0.5


@dataclass
class Post:
    at: float  # time.monotonic() when the POST arrived
    body: Any  # the JSON the worker sent


@dataclass
class Job:
    id: str
    input: Any
    submitted_at: float
    taken_at: float | None = None
    stream: list[Post] = field(default_factory=list)  # stream POSTs, in arrival order
    progress: list[Post] = field(default_factory=list)  # IN_PROGRESS updates to the done route
    result: Post | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def status(self) -> str:
        if self.result is None:
            return "IN_PROGRESS" if self.taken_at else "IN_QUEUE"
        return "FAILED" if self.result.body.get("error") else "COMPLETED"

    @property
    def output(self) -> Any:
        return None if self.result is None else self.result.body.get("output")

    @property
    def error(self) -> str | None:
        return None if self.result is None else self.result.body.get("error")

    @property
    def chunks(self) -> list[Any]:
        """What `/stream` serves: each streamed chunk, in order."""
        return [post.body.get("output") for post in self.stream]

    @property
    def seconds(self) -> float:
        """From the moment a worker took the job to the moment its result arrived."""
        assert self.taken_at is not None and self.result is not None
        return self.result.at - self.taken_at


class JobAPI:
    """The worker-facing half of Runpod's serverless API, on a free port of 127.0.0.1."""

    def __init__(self, post_delay_s: float = 0.0) -> None:
        self.post_delay_s = post_delay_s
        self.jobs: dict[str, Job] = {}
        self.takes = 0  # job-take requests seen: the first one means a worker is serving
        self.max_batch_asked = 0  # the largest batch_size a worker asked for
        self.take_sizes: list[int] = []  # jobs handed out by each take that gave any, in order
        self.pings = 0
        self._queue: list[str] = []
        self._to_stop: list[str] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="job-api", daemon=True)
        self._thread.start()
        self._started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    # -- the test's side ---------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The variables with which the SDK talks to this API instead of Runpod's."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.url}/job-stream/$RUNPOD_POD_ID/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_PING": f"{self.url}/ping/$RUNPOD_POD_ID",
            "RUNPOD_AI_API_KEY": "emulated-api-key",
        }

    def submit(self, job_input: Any) -> str:
        job = Job(id=f"job-{uuid.uuid4().hex[:12]}", input=job_input, submitted_at=time.monotonic())
        with self._lock:
            self.jobs[job.id] = job
            self._queue.append(job.id)
        return job.id

    def submit_many(self, job_inputs: list[Any]) -> list[str]:
        """Queue several jobs at once: a take that comes after finds them all."""
        jobs = [
            Job(id=f"job-{uuid.uuid4().hex[:12]}", input=job_input, submitted_at=time.monotonic())
            for job_input in job_inputs
        ]
        with self._lock:
            for job in jobs:
                self.jobs[job.id] = job
                self._queue.append(job.id)
        return [job.id for job in jobs]

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop a job, as Runpod does on /cancel or an execution timeout."""
        with self._lock:
            self._to_stop.append(job_id)

    def wait(self, job_id: str, timeout: float = 120) -> Job:
        job = self.jobs[job_id]
        if not job.done.wait(timeout):
            raise TimeoutError(f"{job_id} had no result after {timeout}s (status {job.status})")
        return job

    def run(self, job_input: Any, timeout: float = 120) -> Job:
        """Submit one job and wait for its result."""
        return self.wait(self.submit(job_input), timeout)

    def wait_taken(self, job_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.jobs[job_id].taken_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker took {job_id} within {timeout}s")
            time.sleep(0.02)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> JobAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker's side -------------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=256 * 1024 * 1024)  # results up to Runpod's limits and beyond
        app.router.add_get("/job-take/{worker}", self._take)
        app.router.add_get("/job-take-batch/{worker}", self._take)
        app.router.add_get("/job-stop/{worker}", self._stop)
        app.router.add_post("/job-stream/{worker}/{job}", self._stream)
        app.router.add_post("/job-done/{worker}/{job}", self._done)
        app.router.add_get("/ping/{worker}", self._ping)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # the free port the OS chose
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _long_poll(self, pick: Any) -> Any:
        deadline = time.monotonic() + LONG_POLL_S
        while True:
            with self._lock:
                found = pick()
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.01)

    async def _take(self, request: web.Request) -> web.Response:
        batch = "batch_size" in request.query
        size = int(request.query.get("batch_size", 1))
        self.takes += 1
        self.max_batch_asked = max(self.max_batch_asked, size)

        def pick() -> list[Job]:
            taken, self._queue[:] = self._queue[:size], self._queue[size:]
            jobs = [self.jobs[job_id] for job_id in taken]
            for job in jobs:
                job.taken_at = time.monotonic()
            if jobs:
                self.take_sizes.append(len(jobs))
            return jobs

        jobs = await self._long_poll(pick)
        if not jobs:
            return web.Response(status=204)
        bodies = [{"id": job.id, "input": job.input} for job in jobs]
        return web.json_response(bodies if batch else bodies[0])

    async def _stop(self, request: web.Request) -> web.Response:
        def pick() -> list[str]:
            ids, self._to_stop[:] = list(self._to_stop), []
            return ids

        ids = await self._long_poll(pick)
        return web.json_response({"jobsToStop": ids}) if ids else web.Response(status=204)

    async def _read(self, request: web.Request) -> tuple[Job | None, Post]:
        arrived = time.monotonic()
        # The SDK sends JSON with a form content type; the body is the JSON document itself.
        post = Post(at=arrived, body=json.loads(await request.text()))
        if self.post_delay_s:
            await asyncio.sleep(self.post_delay_s)
        return self.jobs.get(request.match_info["job"]), post

    async def _stream(self, request: web.Request) -> web.Response:
        job, post = await self._read(request)
        if job is not None:
            job.stream.append(post)
        return web.Response(text="ok")

    async def _done(self, request: web.Request) -> web.Response:
        job, post = await self._read(request)
        if job is not None:
            if isinstance(post.body, dict) and post.body.get("status") == "IN_PROGRESS":
                job.progress.append(post)  # runpod.serverless.progress_update
            else:
                job.result = post
                job.done.set()
        return web.Response(text="ok")

    async def _ping(self, request: web.Request) -> web.Response:
        self.pings += 1
        return web.Response(text="ok")


class Worker:
    """`python handler.py` in an example's folder, serving `api` as a Runpod worker does."""

    def __init__(
        self,
        example: str,
        api: JobAPI,
        env: Mapping[str, str],
        startup_timeout: float = 300,
        python: str = sys.executable,  # another environment's interpreter (the vLLM one, say)
    ) -> None:
        self.api = api
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe nobody reads
        worker_env = {
            **api.env(),
            "RUNPOD_POD_ID": f"worker-{uuid.uuid4().hex[:8]}",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # the network check dials 8.8.8.8
            "RUNPOD_PING_INTERVAL": "1000",
            "DEVICE": "cpu",  # on purpose: a Runpod worker without a GPU otherwise refuses to start
            **env,
        }
        self.process = subprocess.Popen(
            [python, "handler.py"],
            cwd=REPO / example,
            env=base_env(**worker_env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._wait_serving(startup_timeout)

    def _wait_serving(self, timeout: float) -> None:
        takes_before = self.api.takes
        deadline = time.monotonic() + timeout
        while self.api.takes == takes_before:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"worker took no job within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def exited(self, timeout: float = 30) -> int | None:
        """The exit code once the process has left on its own within `timeout`, else None."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(timeout=timeout)
        return None

    def stop(self) -> str:
        """SIGTERM (the SDK's graceful shutdown), SIGKILL after a while; returns the worker's log."""
        stop_process_group(self.process)
        return self.output()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_with_delay(api: JobAPI, job_input: Any, delay_s: float) -> Job:
    """One job with every POST of the worker held `delay_s` (a slow network), then none again."""
    api.post_delay_s = delay_s
    try:
        return api.run(job_input)
    finally:
        api.post_delay_s = 0.0
