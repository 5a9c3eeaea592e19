"""Small helpers shared by the benchmarks: statistics, ratios and plain-text tables."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence

# Quiet, offline, no progress bars: the same for the handler and for the raw library. The SDK logs
# every job's input and output at its default level (DEBUG); a benchmark prints tables.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "RUNPOD_LOG_LEVEL": os.environ.get("RUNPOD_LOG_LEVEL", "WARN"),
}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i of two paths timed back to back in each repeat.

    Pairing cancels a slow drift in the machine's speed (another process, CPU frequency) that a
    ratio of the two medians would take for handler overhead.
    """
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_note(ratio: float, target: float, higher_is_better: bool) -> str:
    """'meets' or 'MISSES' the target, as a label only: benchmarks never assert on timings."""
    ok = ratio >= target if higher_is_better else ratio <= target
    sign = "≥" if higher_is_better else "≤"
    return f"target {sign} {target:g}×: {'meets' if ok else 'MISSES'}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned first column, right-aligned others, with a rule under the header."""
    padded = [[*row, *[""] * (len(headers) - len(row))] for row in rows]  # short rows end blank
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in padded]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )
