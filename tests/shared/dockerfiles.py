"""The examples' Dockerfiles and requirement pins, read as the repository tests check them."""

from __future__ import annotations

import re
from pathlib import Path

from tests.shared.harness import EXAMPLES, REPO

DOCKERFILES = sorted(path for example in EXAMPLES for path in (REPO / example).glob("Dockerfile*"))


def dockerfile_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def cpu_image(dockerfile: Path) -> bool:
    """An image built for CPU endpoints (DEVICE=cpu): no CUDA contract, no Triton."""
    return any(line.startswith("ENV ") and "DEVICE=cpu" in line.split() for line in instructions(dockerfile))


def pins(requirements: Path) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line of a requirements file."""
    found = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line):
            found[re.sub(r"\[.*\]", "", match[1]).lower().replace("_", "-")] = match[2]
    return found
