"""local_run.py: how `python handler.py` prints a job's real output. One identical copy per example."""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import pytest

from tests.shared.harness import load_copy, shared_copies

COPIES = shared_copies("local_run.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def local_run(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(request.param)


@pytest.mark.parametrize(
    ("argv", "environ", "local"),
    [
        ([], {}, True),
        (["--test_input", "{}"], {"RUNPOD_WEBHOOK_GET_JOB": "https://api"}, True),
        (["--test_input={}"], {}, True),
        ([], {"RUNPOD_WEBHOOK_GET_JOB": "https://api"}, False),
        (["--rp_serve_api"], {}, False),
        ([], {"RUNPOD_REALTIME_PORT": "8000"}, False),
    ],
)
def test_local_test_run_follows_the_sdks_rule(local_run: ModuleType, argv, environ, local: bool) -> None:
    assert local_run.is_local_test_run(argv, environ) is local


def test_real_serving_gets_the_handler_untouched(local_run: ModuleType) -> None:
    async def handler(job: dict) -> Any:
        yield 1

    assert local_run.for_local_run(handler, [], {"RUNPOD_WEBHOOK_GET_JOB": "x"}) is handler


def run(local_run: ModuleType, handler: Any) -> Any:
    wrapped = local_run.for_local_run(handler, [], {})
    return asyncio.run(wrapped({"id": "local_test", "input": {}}))


def test_async_generator_chunks_are_printed_as_they_come(local_run: ModuleType, capsys) -> None:
    printed_before: list[str] = []

    async def handler(job: dict) -> Any:
        yield {"text": "Hé"}
        printed_before.append(capsys.readouterr().out)  # the first chunk is out before the second is made
        yield {"text": "llo", "finish_reason": "stop"}

    assert run(local_run, handler) == [{"text": "Hé"}, {"text": "llo", "finish_reason": "stop"}]
    assert printed_before == ['{"text": "Hé"}\n']
    assert capsys.readouterr().out == '{"text": "llo", "finish_reason": "stop"}\n'


def test_sync_generator_and_plain_handlers(local_run: ModuleType, capsys) -> None:
    def generator(job: dict) -> Any:
        yield "a"
        yield "b"

    async def plain(job: dict) -> Any:
        return {"answer": 42}

    assert run(local_run, generator) == ["a", "b"]
    assert run(local_run, plain) == {"answer": 42}
    assert capsys.readouterr().out == '"a"\n"b"\n{"answer": 42}\n'


def test_an_error_chunk_fails_the_job(local_run: ModuleType, capsys) -> None:
    async def handler(job: dict) -> Any:
        yield {"text": "partial"}
        yield {"error": "max_tokens: must be at most 4096"}
        yield {"text": "never reached"}

    assert run(local_run, handler) == {"error": "max_tokens: must be at most 4096"}
    assert "never reached" not in capsys.readouterr().out


def test_output_production_could_not_send_fails_locally_too(local_run: ModuleType) -> None:
    async def handler(job: dict) -> Any:
        yield {"image": b"\x89PNG"}

    with pytest.raises(TypeError, match="not JSON serializable"):
        run(local_run, handler)
