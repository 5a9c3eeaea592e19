"""What every image promises for cold starts and builds, read from its Dockerfile: the bake layer
before the code (an edit never downloads the model again), a token only as a build secret, the
cache where hub_cache.py looks for baked models, a C compiler, the CUDA declaration, and every
Dockerfile lint-clean (tests/repository/test_repository.py lints `Dockerfile`; this covers the others too)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.shared.dockerfiles import DOCKERFILES, cpu_image, dockerfile_id, instructions
from tests.shared.harness import REPO, load_copy, shared_copies

HUB_CACHE = load_copy(shared_copies("hub_cache.py")[0])


def index_of(lines: list[str], pattern: str) -> int:
    found = [index for index, line in enumerate(lines) if re.search(pattern, line)]
    assert found, f"no instruction matches {pattern!r}"
    return found[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_the_bake_layer_comes_after_the_packages_and_before_the_code(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    packages = index_of(lines, r"^RUN .*pip install")
    bake = index_of(lines, r"^RUN .*python hub_cache\.py bake")
    code = index_of(lines, r"^COPY .*\bhandler\.py\b")
    assert packages < bake < code
    assert index_of(lines, r"^COPY hub_cache\.py \.$") < bake  # the only code the bake layer depends on


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_the_token_is_a_build_secret_and_every_baked_model_is_configured_too(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    bake = lines[index_of(lines, r"python hub_cache\.py bake")]
    assert "--mount=type=secret,id=HF_TOKEN" in bake and "/run/secrets/HF_TOKEN" in bake
    assert not any(re.match(r"^(ARG|ENV) .*\bHF_TOKEN\b", line) for line in lines)
    build_args = {re.match(r"ARG (\w+)", line)[1] for line in lines if line.startswith("ARG ")}
    assert {"MODEL_NAME", "MODEL_REVISION"} <= build_args
    environment = " ".join(line for line in lines if line.startswith("ENV "))
    for name in build_args & {*HUB_CACHE.MODEL_VARIABLES, "MODEL_REVISION", "TRUST_REMOTE_CODE", "BACKEND_FILE"}:
        # The worker must load what was baked: the build arg becomes its setting.
        assert f"{name}=${{{name}}}" in environment, f"ARG {name} is baked but never reaches the worker"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_models_are_baked_where_hub_cache_looks_for_them(dockerfile: Path) -> None:
    assert f"HF_HOME={HUB_CACHE.IMAGE_HF_HOME}" in " ".join(instructions(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_each_image_declares_its_cuda_and_has_a_c_compiler(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    if cpu_image(dockerfile):  # a CPU endpoint's image (03's OpenVINO one) promises no CUDA
        assert "cuda-versions" not in text and "gpu-compute-capability" not in text
        assert "BACKEND=openvino" in " ".join(instructions(dockerfile))
        return
    assert re.search(r'cuda-versions="\d+\.\d+"', text) and 'gpu-compute-capability=">=7.5"' in text
    assert re.search(r"apt-get install -y --no-install-recommends gcc\b", text)
    assert "C compiler" in text  # and the reason, beside it


def test_the_vllm_image_ships_the_same_code_as_the_transformers_one() -> None:
    folder = DOCKERFILES[0].parent
    copies = [
        next(line for line in instructions(folder / name) if re.match(r"COPY .*handler\.py", line))
        for name in ("Dockerfile", "Dockerfile.vllm")
    ]
    assert copies[0] == copies[1]
    vllm = " ".join(instructions(folder / "Dockerfile.vllm"))
    assert "VLLM_PYTHON=/opt/vllm/bin/python" in vllm and "hardlink" in vllm and "vllm_launch.py" in vllm


def test_the_openvino_image_ships_the_same_code_as_the_gpu_one() -> None:
    folder = REPO / "03_embeddings"
    copies = [
        next(line for line in instructions(folder / name) if re.match(r"COPY .*handler\.py", line))
        for name in ("Dockerfile", "Dockerfile.openvino")
    ]
    assert copies[0] == copies[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_every_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -r requirements-dev.txt"
    run = subprocess.run([hadolint, dockerfile.name], cwd=dockerfile.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
