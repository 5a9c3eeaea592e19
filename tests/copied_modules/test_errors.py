"""errors.py: the error contract every example shares. One identical copy per example
(tests/copied_modules/test_copies.py checks the copies); each handler's tests check the messages its
callers see."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from tests.shared.harness import load_copy, shared_copies

COPIES = shared_copies("errors.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def errors(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(request.param)


class Inner(BaseModel):
    top_p: float = Field(gt=0, le=1)


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str
    sampling_params: Inner = Inner(top_p=1)


def test_validation_errors_name_each_field_on_one_line(errors: ModuleType) -> None:
    assert errors.validated(Request, {"prompt": "hi"}).prompt == "hi"
    with pytest.raises(errors.RequestError) as raised:
        errors.validated(Request, {"prompt": 3, "sampling_params": {"top_p": 2}, "extra": 1})
    message = str(raised.value)
    assert message.startswith("prompt: Input should be a valid string; sampling_params.top_p: ")
    assert "extra: Extra inputs are not permitted" in message and "\n" not in message
    with pytest.raises(errors.RequestError, match=r"^openai_input\.prompt: Field required$"):
        errors.validated(Request, {}, prefix="openai_input")
    with pytest.raises(errors.RequestError, match=r"^input: Input should be a valid dictionary"):
        errors.validated(Request, [], None)  # no field to name: the input itself
    with pytest.raises(errors.RequestError, match=r"^openai_input: Input should be a valid dictionary"):
        errors.validated(Request, [], None, prefix="openai_input")


def test_each_failure_is_one_error_for_the_caller(errors: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert errors.rejected(errors.RequestError("width: too wide"), "job") == {"error": "width: too wide"}
    freed: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    assert errors.out_of_memory("Out of GPU memory at 2048x2048", "lower the size", "job") == {
        "error": "lower the size"
    }
    assert freed == [True]  # the memory goes back once, for the next job
    assert errors.out_of_memory("logged", "shorter texts", "job", free_cache=False) == {"error": "shorter texts"}
    assert freed == [True]
    failure = errors.failed("Generation", RuntimeError("/secret/path"), "generation failed; see the logs", "job")
    assert failure == {"error": "generation failed; see the logs"}  # the details stay in the log


def test_a_lost_gpu_retires_the_worker_whichever_way_the_handler_returns(errors: ModuleType) -> None:
    config: dict = {"handler": None}
    assert errors.gpu_lost("the GPU failed; retry", "job", config) == {"error": "the GPU failed; retry"}
    assert config["refresh_worker"] is True  # a generator handler: the SDK reads its config after the job
    assert errors.gpu_lost("the GPU failed; retry", "job") == {"error": "the GPU failed; retry", "refresh_worker": True}
