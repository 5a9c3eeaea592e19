"""The error contract the four workers share: one shape for every failure. A job fails with
`{"error": message}`, a message the caller can act on, never a traceback, an internal path or a
secret; the details go to the worker log. One identical copy per example (each folder is its own
Docker build context).

* A request the caller must fix raises `RequestError`; its message goes back as it is.
  `validated` checks a request against its pydantic schema, and `describe_validation_error` turns
  pydantic's errors into one line that names each field.
* Out of GPU memory answers only the job that hit it, and gives the cached memory back so the
  next job can run (`out_of_memory`).
* A lost GPU (torch.AcceleratorError: a device-side assert, an ECC error) is the one failure only
  a fresh worker recovers from: `gpu_lost` asks Runpod for one. Deciding on the exception type, not
  on "cuda" in a message, keeps every other job's worker alive.
* Anything else fails that job with a generic message and logs the exception (`failed`).
* On an OpenAI route the error text is OpenAI's error object as JSON (`openai_error`), with the
  HTTP status vLLM's server would answer as its `code`: a gateway or the local endpoint turns it
  into that status, and the official `openai` client raises the matching exception.
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

import runpod
from pydantic import BaseModel, ValidationError

log = runpod.RunPodLogger()
Request = TypeVar("Request", bound=BaseModel)

# The statuses a worker answers on OpenAI routes, with the error type vLLM's server names them by.
BAD_REQUEST, NOT_FOUND, INTERNAL, UNAVAILABLE = 400, 404, 500, 503
ERROR_TYPES = {
    BAD_REQUEST: "BadRequestError",
    NOT_FOUND: "NotFoundError",
    INTERNAL: "InternalServerError",
    UNAVAILABLE: "ServiceUnavailableError",  # retry: the worker is being replaced
}


class RequestError(ValueError):
    """A request the caller must fix; its message is returned to them as is."""


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: "sampling_params.top_p: Input should be ..."."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        location = f"{prefix}.{field}" if prefix and field else prefix or field or "input"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def validated(schema: type[Request], body: Any, context: Any = None, prefix: str = "") -> Request:
    """`body` as a `schema` request, validated with `context` (the endpoint's limits); a
    RequestError naming each field (under `prefix`, e.g. "openai_input") when it is not one."""
    try:
        return schema.model_validate(body, context=context)
    except ValidationError as error:
        raise RequestError(describe_validation_error(error, prefix=prefix)) from None


def rejected(error: Exception, job_id: Any) -> dict[str, str]:
    """A request refused before (or while) it ran: its message, to the caller and the log."""
    log.warn(f"Rejected request: {error}", job_id)
    return {"error": str(error)}


def out_of_memory(logged: str, message: str, job_id: Any, *, free_cache: bool = True) -> dict[str, str]:
    """CUDA ran out of memory on this job: only it fails. The cache is given back (unless the
    caller already did) so the next job can run; `logged` says what the job asked for."""
    if free_cache:
        import torch  # here: this module is imported by schemas that need no torch

        torch.cuda.empty_cache()
    log.error(logged, job_id)
    return {"error": message}


def gpu_lost(message: str, job_id: Any, worker_config: MutableMapping[str, Any] | None = None) -> dict[str, Any]:
    """The CUDA context is gone (device-side assert, ECC error): only a fresh worker recovers. A
    generator handler cannot return refresh_worker, but the SDK reads the flag from its config
    (`worker_config`) after every job, so setting it there retires the worker once this error is
    delivered; a plain handler returns it with the error."""
    log.error("Unrecoverable GPU error; asking Runpod for a fresh worker", job_id)
    if worker_config is not None:
        worker_config["refresh_worker"] = True
        return {"error": message}
    return {"error": message, "refresh_worker": True}


def failed(what: str, error: Exception, message: str, job_id: Any) -> dict[str, str]:
    """Any other exception: the caller gets `message`, the log gets `what` failed, and why."""
    log.error(f"{what} failed: {type(error).__name__}: {error}", job_id)
    return {"error": message}


def openai_error(message: str, status: int, param: str | None = None) -> str:
    """`message` as OpenAI's error object, in JSON text (a job's error must be text)."""
    error = {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": param, "code": status}
    return json.dumps({"error": error}, ensure_ascii=False)


def error_shape(job_input: Any) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """How this job's failures read: a native job's as the message; an OpenAI route's (openai_route,
    or worker-vllm's route + body) as OpenAI's error object with the HTTP status vLLM would give. A
    result without an error passes unchanged."""
    if not (isinstance(job_input, dict) and {"openai_route", "route"} & set(job_input)):
        return lambda result, status: result
    return lambda result, status: (
        {**result, "error": openai_error(result["error"], status)} if "error" in result else result
    )
