"""02_image_generation's jobs as its test files run them: a small request, one job's progress and
final chunk, and what its progress chunks must look like."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tests.shared.harness import run_job

EXAMPLE = "02_image_generation"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def generate(module: ModuleType, **request: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one job; return (progress chunks, final chunk)."""
    result = run_job(module.handler, request)
    assert "error" not in result, result
    *progress, final = result["output"]
    return progress, final


def assert_progress(progress: list[dict[str, Any]], total: int | None = None) -> None:
    """Progress chunks count up (a step overtaken by a newer one before it was sent is dropped, so
    steps may be skipped, never repeated or reordered) to one fixed total."""
    steps = [chunk["step"] for chunk in progress]
    assert progress and all(chunk["status"] == "progress" for chunk in progress), progress
    assert steps == sorted(set(steps)) and steps[0] >= 1, steps
    totals = {chunk["total"] for chunk in progress}
    assert len(totals) == 1 and steps[-1] <= totals.pop() == (total or progress[0]["total"]), progress
