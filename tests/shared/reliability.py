"""Shared tools of the reliability tests (tests/*/test_reliability.py).

* Fuzzing: hypothesis strategies that start from a valid request built from a handler's real field
  names and break it a little (a field set to any JSON value, a huge or empty one, a field dropped,
  an unknown field added), plus whole inputs of the wrong shape.
* `assert_clean`: the property every fuzzed job must keep: a result, or an error that explains
  itself; never an exception escaping the handler (the SDK then sends its traceback to the caller).
* `run_load` and `ConcurrencyCounter`: many jobs at once on one event loop, as the SDK runs them,
  with the concurrency the worker really reached.
* `soak`: many jobs one after another, with resident memory, open files and threads before and after.
* Leak checks for `python handler.py` runs: secrets nowhere, prompts and payloads in no log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gc
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import runpod
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from tests.shared.harness import DevServer, json_lines, run_job_async

# ---- fuzzing ------------------------------------------------------------------------------------

# Each fuzz test runs this many requests; the handlers answer a tiny model in milliseconds.
# In CI (CI=true) the examples are derived from each test's name, not drawn at random, so a red run
# is the same red run again; elsewhere every run explores new inputs.
FUZZ = settings(
    derandomize=os.environ.get("CI") == "true",
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=24))
# Any JSON value (NaN and infinities too: Python's json module, which parses job inputs, accepts them).
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


# Empty, huge and extreme values: what a broken client or a hostile one sends.
EXTREMES: list[Any] = [
    "",
    " ",
    [],
    {},
    0,
    -1,
    None,
    "x" * 300_000,
    "word " * 40_000,
    "😀" * 20_000,
    "\x00" * 1_000,
    10**40,
    -(10**40),
    2**63,
    1e308,
    -1e308,
    5e-324,
    float("inf"),
    float("nan"),
    [0] * 20_000,
    ["a"] * 20_000,
    _nested(200),
    {str(index): index for index in range(5_000)},
]
JUNK = st.one_of(JSON, st.sampled_from(EXTREMES))


def weighted(*choices: tuple[int, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """One of `choices`, each drawn in proportion to its weight (st.one_of weighs them all alike)."""
    options = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(options))).flatmap(lambda index: options[index])


def not_costly_int(limit: int) -> Callable[[Any], bool]:
    """For junk values: no plain int in (limit, 100000], which a worker would accept and spend on
    (steps, tokens); the fuzz keeps every request it could serve cheap. Bigger ones are refused."""
    return lambda value: not (type(value) is int and limit < value <= 100_000)


@st.composite
def mutated(
    draw: Callable[[SearchStrategy[Any]], Any],
    required: Mapping[str, SearchStrategy[Any]],
    optional: Mapping[str, SearchStrategy[Any]] | None = None,
    junk: SearchStrategy[Any] = JUNK,
    mutations: Sequence[int] = (0, 0, 0, 1, 2),
) -> dict[str, Any]:
    """A valid request (every required field, some optional ones, each with a valid value), then as
    many mutations as drawn from `mutations` (mostly none): a field set to junk, a field dropped, or
    an unknown field added."""
    optional = dict(optional or {})
    body = draw(st.fixed_dictionaries(dict(required), optional=optional))
    names = sorted({*required, *optional})
    for _ in range(draw(st.sampled_from(mutations))):
        action = draw(st.sampled_from(("junk", "junk", "drop", "extra")))
        if action == "extra":
            body[draw(st.text(max_size=12))] = draw(junk)
        elif names:
            name = draw(st.sampled_from(names))
            if action == "drop":
                body.pop(name, None)
            else:
                body[name] = draw(junk)
    return body


def job_inputs(requests: SearchStrategy[dict[str, Any]], junk: SearchStrategy[Any] = JUNK) -> SearchStrategy[Any]:
    """Mostly requests, plus the wrong shapes: any JSON value, a request in a list, or one level too deep."""
    return weighted(
        (8, requests),
        (1, junk),
        (1, requests.map(lambda request: [request])),
        (1, requests.map(lambda request: {"input": request})),
    )


# Markers of an exception that escaped the handler: `rp_job.run_job` answers with a JSON error
# holding error_type and error_traceback, `run_job_generator` with "handler: ... traceback: ...".
ESCAPED = ("Traceback", "traceback:", "error_traceback", "error_type")
# What each handler answers when something unexpected fails: right for a broken GPU, wrong for a
# request, which must be refused with a message saying what to fix.
INTERNAL_FAILURE = "inside the worker"


def assert_clean(result: dict[str, Any], job_input: Any = None) -> str | None:
    """A job ended with a result or a clear error: no escaped exception, no traceback, no internal
    failure for what was only a bad request. Returns the error, or None for a result."""
    assert isinstance(result, dict) and ("output" in result or "error" in result), result
    error = result.get("error")
    if error is None:
        return None
    assert isinstance(error, str) and error.strip(), f"an empty error: {result!r}"
    assert not error.startswith("handler: "), f"an exception escaped the handler:\n{error[:3000]}"
    with contextlib.suppress(ValueError, TypeError):
        assert "error_traceback" not in json.loads(error), f"an exception escaped the handler:\n{error[:3000]}"
    sent = json.dumps(job_input, ensure_ascii=False, default=str)  # a marker the caller sent may be echoed
    for marker in ESCAPED:
        assert marker not in error or marker in sent, f"a traceback reached the caller:\n{error[:3000]}"
    assert INTERNAL_FAILURE not in error or INTERNAL_FAILURE in sent, (
        f"a request was answered as a worker failure instead of being refused: {error}"
    )
    return error


@contextlib.contextmanager
def quiet_logs(level: str = "ERROR") -> Iterator[None]:
    """Keep thousands of jobs' INFO/WARN lines out of the test output (messages are still built)."""
    logger = runpod.RunPodLogger()
    saved = logger.level
    logger.level = level
    try:
        yield
    finally:
        logger.level = saved


# ---- results ------------------------------------------------------------------------------------


def normalized(value: Any) -> Any:
    """A result without what differs between two runs of the same request: OpenAI ids and
    timestamps (SSE events are parsed first), and timings."""
    if isinstance(value, str) and value.startswith("data: {"):
        return normalized(json.loads(value[len("data: ") :]))
    if isinstance(value, dict):
        return {key: normalized(item) for key, item in value.items() if key not in ("id", "created", "timings")}
    if isinstance(value, list):
        return [normalized(item) for item in canonical_chunks(value)]
    return value


def _text_apart(chunk: Any) -> list[Any]:
    """An end chunk that carries text (coalesce.merge_answer) as that text delta, then the end."""
    if not (isinstance(chunk, dict) and "text" in chunk and "finish_reason" in chunk):
        return [chunk]
    text = {key: value for key, value in chunk.items() if key in ("index", "text")}
    return [text, {key: value for key, value in chunk.items() if key != "text"}]


def canonical_chunks(chunks: list[Any]) -> list[Any]:
    """Streamed chunks as one event or text piece each: how many tokens went out together in one
    chunk depends on timing (coalesce.py merges what piled up during a POST), what they say not.
    SSE strings become one string per event; consecutive text-only chunks become one, and the text
    an end chunk carries (coalesce.merge_answer) joins them, the end following on its own."""
    out: list[Any] = []
    for chunk in [piece for whole in chunks for piece in _text_apart(whole)]:
        if isinstance(chunk, str) and chunk.startswith("data: "):
            out += [event + "\n\n" for event in chunk.split("\n\n") if event]
        elif (
            isinstance(chunk, dict)
            and chunk.keys() == {"text"}
            and out
            and isinstance(out[-1], dict)
            and out[-1].keys() == {"text"}
        ):
            out[-1] = {"text": out[-1]["text"] + chunk["text"]}
        else:
            out.append(chunk)
    return out


def answer(result: dict[str, Any]) -> Any:
    """What a caller compares: the error, or the normalized output."""
    return {"error": result["error"]} if "error" in result else {"output": normalized(result["output"])}


def assert_close(got: Any, want: Any, atol: float = 1e-5, where: str = "output") -> None:
    """`got` equals `want` up to float rounding (jobs batched together may round differently),
    base64 float32 vectors included."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {got!r:.300} != {want!r:.300}"
        for key in want:
            assert_close(got[key], want[key], atol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r:.300} != {want!r:.300}"
        for index, (item, expected) in enumerate(zip(got, want, strict=True)):
            assert_close(item, expected, atol, f"{where}.{index}")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float | int) and abs(got - want) <= atol, f"{where}: {got} != {want}"
    elif isinstance(want, str) and got != want and len(want) % 4 == 0 and len(want) >= 8:
        vectors = [np.frombuffer(base64.b64decode(value), dtype="<f4") for value in (got, want)]
        np.testing.assert_allclose(vectors[0], vectors[1], atol=atol, err_msg=where)
    else:
        assert got == want, f"{where}: {got!r:.300} != {want!r:.300}"


# ---- load ---------------------------------------------------------------------------------------


@dataclass
class LoadRun:
    results: list[dict[str, Any]]
    seconds: float
    peak: int  # the highest value the probe returned while the jobs ran (0 without a probe)


def run_load(handler: Any, inputs: Sequence[Any], probe: Callable[[], int] | None = None) -> LoadRun:
    """Every input as its own job, all at once on one event loop (as the SDK runs a worker's jobs),
    while a background task samples `probe` (e.g. the generations running now)."""

    async def main() -> LoadRun:
        samples = [0]
        finished = asyncio.Event()

        async def watch() -> None:
            while not finished.is_set():
                samples.append(probe())
                await asyncio.sleep(0.0005)

        watcher = asyncio.create_task(watch()) if probe else None
        started = time.perf_counter()
        jobs = [
            run_job_async(handler, {"id": f"load-{index}", "input": copy.deepcopy(job_input)})
            for index, job_input in enumerate(inputs)
        ]
        results = await asyncio.gather(*jobs)
        seconds = time.perf_counter() - started
        finished.set()
        if watcher:
            await watcher
        return LoadRun(list(results), seconds, max(samples))

    return asyncio.run(main())


class ConcurrencyCounter:
    """Wraps functions to count how many calls run at the same moment, across threads."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.running += 1
                self.calls += 1
                self.peak = max(self.peak, self.running)
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        return counted


def load_mix(specs: Sequence[Any], jobs: int) -> list[Any]:
    """`jobs` inputs cycling through `specs`, interleaved so valid and invalid jobs run side by side."""
    return [specs[index % len(specs)] for index in range(jobs)]


def report_load(name: str, run: LoadRun, valid: int, limit: int, peak: int) -> None:
    print(
        f"\n[load] {name}: {len(run.results)} concurrent jobs ({valid} valid, {len(run.results) - valid} invalid)"
        f" in {run.seconds:.1f} s; peak concurrent model runs {peak} (limit {limit})"
    )


# ---- soak ---------------------------------------------------------------------------------------


# The most resident memory may grow, in percent, over a soak after its warm-up.
SOAK_GROWTH_PERCENT = 1.0


@dataclass(frozen=True)
class Resources:
    rss: int  # bytes
    fds: int
    threads: int

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        process = psutil.Process()
        return cls(process.memory_info().rss, process.num_fds(), threading.active_count())


@dataclass
class SoakRun:
    jobs: int
    seconds: float
    before: Resources
    after: Resources

    @property
    def growth(self) -> float:
        """Resident memory growth over the run, in percent."""
        return (self.after.rss - self.before.rss) / self.before.rss * 100

    def report(self, name: str) -> None:
        mib = 1024 * 1024
        print(
            f"\n[soak] {name}: {self.jobs} sequential jobs in {self.seconds:.1f} s"
            f" ({self.seconds / self.jobs * 1000:.1f} ms/job); RSS {self.before.rss / mib:.1f} -> "
            f"{self.after.rss / mib:.1f} MiB ({self.growth:+.2f}%); threads {self.before.threads} -> "
            f"{self.after.threads}; open fds {self.before.fds} -> {self.after.fds}"
        )

    def assert_steady(self) -> None:
        # Measured +0.00 to +0.13 % here (the root README's table); 1 % of the suite's ~1-2 GB process
        # still catches a job that keeps ~40 KB or more (a decoded image, a tensor) for good.
        assert self.growth < SOAK_GROWTH_PERCENT, f"resident memory grew {self.growth:.2f}% over {self.jobs} jobs"
        # No more than before: a leak grows them. Fewer is fine: threads an earlier test left winding
        # down (a server's, a pool's) may end during the soak.
        assert self.after.threads <= self.before.threads, (self.before, self.after)
        assert self.after.fds <= self.before.fds, (self.before, self.after)


def soak(
    handler: Any,
    inputs: Sequence[Any],
    check: Callable[[int, dict[str, Any]], None],
    jobs: int = 500,
    warmup: int = 25,
) -> SoakRun:
    """A warm-up, then `jobs` jobs one after another on one event loop (as a worker runs them for its
    whole life), cycling through `inputs`; `check(index, result)` judges every answer.

    The warm-up runs `warmup` jobs one by one, then as many at once: thread pools start their
    threads lazily, up to their fixed size, and only a burst makes them reach it. Any thread that
    appears after the warm-up is then one that should not be there."""

    async def run(index: int, name: str) -> None:
        job_input = copy.deepcopy(inputs[index % len(inputs)])
        check(index, await run_job_async(handler, {"id": f"{name}-{index}", "input": job_input}))

    async def main() -> SoakRun:
        for index in range(warmup):
            await run(index, "warmup")
        await asyncio.gather(*(run(index, "burst") for index in range(warmup)))
        before = Resources.now()
        started = time.perf_counter()
        for index in range(jobs):
            await run(index, "soak")
        seconds = time.perf_counter() - started
        return SoakRun(jobs, seconds, before, Resources.now())

    return asyncio.run(main())


# ---- secrets and logs ---------------------------------------------------------------------------


def secret_env() -> dict[str, str]:
    """Fresh random credentials, and the log level a deployment runs at."""
    return {
        "HF_TOKEN": "hf_" + secrets.token_hex(17),
        "RUNPOD_API_KEY": "rpa_" + secrets.token_hex(20).upper(),
        "BUCKET_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "RUNPOD_LOG_LEVEL": "INFO",
    }


def secret_values(env: Mapping[str, str]) -> list[str]:
    return [value for name, value in env.items() if name in ("HF_TOKEN", "RUNPOD_API_KEY", "BUCKET_SECRET_ACCESS_KEY")]


def distinctive_prompt() -> str:
    return f"kumquat {secrets.token_hex(6)} lighthouse {secrets.token_hex(6)}"


def log_lines(text: str) -> list[str]:
    """The lines of a run's output that are not printed JSON results: the logs."""
    return [line for line in text.splitlines() if not json_lines(line)]


def assert_no_leaks(output: str, secret: Sequence[str], private: Sequence[str]) -> None:
    """No secret anywhere in `output`; no private text (prompts, input payloads) in any log line."""
    for value in secret:
        assert value not in output, "a secret reached the output"
    for line in log_lines(output):
        for value in private:
            assert value not in line, f"request content in a log line: {line[:300]}"


def payload_fingerprint(data_uri: str) -> str:
    """A stretch of an image's base64 from its middle: the common header every PNG shares is no evidence."""
    data = data_uri.split(",", 1)[1]
    return data[len(data) // 2 : len(data) // 2 + 48]


# ---- the dev server -----------------------------------------------------------------------------


def burst(server: DevServer, bodies: Sequence[dict[str, Any]], workers: int = 16) -> list[Any]:
    """POST every body to /runsync at once, from `workers` client threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda body: server.post("/runsync", body, timeout=300), bodies))


def dev_server_error(body: dict[str, Any]) -> str | None:
    """The error of a /runsync answer. A plain handler's is FAILED with "error"; the dev server
    appends a generator's error chunk to a COMPLETED output instead (production fails that job)."""
    if body.get("status") == "FAILED":
        return body.get("error")
    output = body.get("output")
    if isinstance(output, list) and output and isinstance(output[-1], dict) and "error" in output[-1]:
        return output[-1]["error"]
    return None
