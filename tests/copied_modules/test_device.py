"""device.py: the CUDA contract. The pure choice is tested on every copy, the probe against a
fake libcuda (a shared library compiled here), and each worker is started as Runpod starts it
(`python handler.py`) to see it stop, or not."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.shared.harness import EXAMPLES, json_lines, load_copy, run_local, shared_copies

COPIES = shared_copies("device.py")


@pytest.fixture(scope="module", params=COPIES, ids=[path.parent.name for path in COPIES])
def device(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    # Importing it settles this process (it finds no GPU here, off Runpod: a warning, no change).
    yield load_copy(request.param)


def cuda(device: ModuleType, **overrides: Any) -> Any:
    """What an H100 host with a CUDA 13.0 driver shows the image's torch 2.13.0 (CUDA 13.0)."""
    found = {
        "driver_cuda": (13, 0),
        "torch_cuda": "13.0",
        "torch_version": "2.13.0+cu130",
        "gpus": 1,
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "capability": (9, 0),
        "arch_list": ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"),
    }
    return device.CudaFound(**{**found, **overrides})


ON_RUNPOD = {"RUNPOD_ENDPOINT_ID": "ep-123", "RUNPOD_POD_ID": "pod-1"}
OLD_DRIVER = {"driver_cuda": (12, 4), "gpus": 0, "gpu_name": "", "capability": None, "arch_list": ()}
NO_DRIVER = {"driver_cuda": None, "gpus": 0, "gpu_name": "", "capability": None, "arch_list": ()}
V100 = {"gpu_name": "Tesla V100-SXM2-16GB", "capability": (7, 0)}


# ---------------------------------------------------------------------------------------------
# The CUDA contract
# ---------------------------------------------------------------------------------------------
def test_a_usable_gpu_is_used(device: ModuleType) -> None:
    choice = device.choose_device(ON_RUNPOD, cuda(device))
    assert (choice.device, choice.fatal, choice.warning) == ("cuda", False, False)
    assert "H100" in choice.message and "sm_90" in choice.message and "13.0" in choice.message


@pytest.mark.parametrize(
    ("found", "what"),
    [
        (NO_DRIVER, "no NVIDIA driver or GPU in this container"),
        (OLD_DRIVER, "the host's NVIDIA driver runs CUDA 12.4 at most"),
    ],
    ids=["no-device", "old-driver"],
)
def test_on_runpod_no_usable_cuda_stops_with_what_it_found_needs_and_the_fix(
    device: ModuleType, found: dict[str, Any], what: str
) -> None:
    for runpod_variable in ON_RUNPOD:
        choice = device.choose_device({runpod_variable: "x"}, cuda(device, **found))
        assert choice.fatal and "\n" not in choice.message
        assert what in choice.message
        assert "torch 2.13.0+cu130 needs CUDA 13.0 (NVIDIA driver >= 580)" in choice.message
        if found is OLD_DRIVER:
            assert 'Fix: set "Allowed CUDA versions" (endpoint settings, Advanced) to 13.0 and newer' in choice.message
        assert "DEVICE=cpu" in choice.message


def test_a_gpu_without_kernels_in_this_torch_stops(device: ModuleType) -> None:
    choice = device.choose_device(ON_RUNPOD, cuda(device, **V100))
    assert choice.fatal
    assert "Tesla V100-SXM2-16GB (sm_70) has no kernels in torch 2.13.0+cu130 (built for sm_75, sm_80" in choice.message
    assert "newer architecture" in choice.message


@pytest.mark.parametrize(
    ("capability", "runs"),
    [((8, 6), True), ((8, 9), True), ((7, 0), False), ((12, 1), True), ((12, 0), True), ((13, 0), True)],
)
def test_kernels_run_on_the_same_major_and_ptx_on_newer(
    device: ModuleType, capability: tuple[int, int], runs: bool
) -> None:
    # sm_86 cubins run on sm_89; compute_120 PTX is compiled by the driver for anything newer.
    assert device.runs_on(capability, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_120", "compute_120")) is runs


def test_device_cpu_runs_on_the_cpu_on_purpose_even_on_runpod(device: ModuleType) -> None:
    for found in (cuda(device), cuda(device, **NO_DRIVER)):
        choice = device.choose_device({**ON_RUNPOD, "DEVICE": "cpu"}, found)
        assert (choice.device, choice.fatal, choice.warning) == ("cpu", False, False)


def test_off_runpod_the_cpu_is_allowed_with_a_warning(device: ModuleType) -> None:
    choice = device.choose_device({}, cuda(device, **NO_DRIVER))
    assert (choice.device, choice.fatal, choice.warning) == ("cpu", False, True)
    assert "Running on the CPU" in choice.message


def test_device_cuda_stops_without_a_gpu_anywhere_and_other_values_are_refused(device: ModuleType) -> None:
    assert device.choose_device({"DEVICE": "cuda"}, cuda(device, **NO_DRIVER)).fatal
    refused = device.choose_device({"DEVICE": "gpu"}, cuda(device))
    assert refused.fatal and "DEVICE must be one of auto, cuda, cpu, got 'gpu'" in refused.message


def test_a_cpu_build_of_torch_is_named(device: ModuleType) -> None:
    choice = device.choose_device(ON_RUNPOD, cuda(device, torch_cuda=None, torch_version="2.13.0+cpu", **NO_DRIVER))
    assert choice.fatal and "torch 2.13.0+cpu is a CPU build" in choice.message


class Recording(dict):
    """A mapping that remembers every key it was asked for."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def test_it_reads_only_documented_settings(device: ModuleType) -> None:
    """What it reads is CONFIGURATION (in every README) or the platform's variables;
    tests/repository/test_repository.py checks the READMEs against CONFIGURATION."""
    for found in (cuda(device), cuda(device, **NO_DRIVER)):
        environ = Recording({"MODEL_NAME": "org/model"})
        device.choose_device(environ, found)
        assert environ.read and environ.read <= {*device.CONFIGURATION, *device.RUNPOD_VARIABLES}


# ---------------------------------------------------------------------------------------------
# The probe, against a fake libcuda
# ---------------------------------------------------------------------------------------------
FAKE_LIBCUDA = """
int cuInit(unsigned int flags) { return 0; }
int cuDriverGetVersion(int *version) { *version = DRIVER_VERSION; return VERSION_RESULT; }
int cuDeviceGetCount(int *count) { *count = 0; return 0; }
"""


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """A libcuda stand-in built with the C compiler: the driver version and result codes chosen."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) to build a fake libcuda")
    folder = tmp_path_factory.mktemp("libcuda")

    def build(driver_version: int = 13000, version_result: int = 0) -> str:
        name = f"libcuda-{driver_version}-{version_result}.so"
        source = folder / "libcuda.c"
        source.write_text(FAKE_LIBCUDA)
        defines = [f"-DDRIVER_VERSION={driver_version}", f"-DVERSION_RESULT={version_result}"]
        subprocess.run([compiler, "-shared", "-fPIC", *defines, "-o", folder / name, source], check=True)
        return str(folder / name)

    return build


def test_no_driver_library_is_no_driver(device: ModuleType, tmp_path: Path) -> None:
    assert device.driver_cuda_version(str(tmp_path / "libcuda.so.1")) is None
    found = device.probe_cuda(str(tmp_path / "libcuda.so.1"))
    assert found.driver_cuda is None and found.gpus == 0


def test_a_driver_that_cannot_answer_is_no_driver(device: ModuleType, fake_libcuda: Callable[..., str]) -> None:
    # CUDA_ERROR_NOT_INITIALIZED (3): the library is there but its driver does not work.
    assert device.driver_cuda_version(fake_libcuda(version_result=3)) is None


@pytest.mark.parametrize(("version", "expected"), [(12040, (12, 4)), (13000, (13, 0)), (13020, (13, 2))])
def test_the_driver_version_is_read_from_libcuda(
    device: ModuleType, fake_libcuda: Callable[..., str], version: int, expected: tuple[int, int]
) -> None:
    assert device.driver_cuda_version(fake_libcuda(driver_version=version)) == expected


def test_a_driver_too_old_for_this_torch_stops_on_runpod(device: ModuleType, fake_libcuda: Callable[..., str]) -> None:
    """The probe with the real torch of this machine (a CPU build) and a fake 12.4 driver, and the
    choice for the image's torch (CUDA 13.0) on that driver."""
    found = device.probe_cuda(fake_libcuda(driver_version=12040))
    assert found.driver_cuda == (12, 4) and found.gpus == 0 and found.capability is None
    image = cuda(device, **{**OLD_DRIVER, "driver_cuda": found.driver_cuda})
    choice = device.choose_device(ON_RUNPOD, image)
    assert choice.fatal and "the host's NVIDIA driver runs CUDA 12.4 at most" in choice.message


def test_a_good_driver_is_reported_as_found(device: ModuleType, fake_libcuda: Callable[..., str]) -> None:
    found = device.probe_cuda(fake_libcuda(driver_version=13000))
    assert found.driver_cuda == (13, 0)
    # Here torch is a CPU build: the driver is fine, so that is what the choice names.
    if found.torch_cuda is None:
        choice = device.choose_device(ON_RUNPOD, found)
        assert choice.fatal and f"torch {found.torch_version} is a CPU build" in choice.message
    choice = device.choose_device(ON_RUNPOD, cuda(device, driver_cuda=found.driver_cuda))
    assert not choice.fatal and choice.device == "cuda" and "driver CUDA 13.0" in choice.message


# ---------------------------------------------------------------------------------------------
# The workers, started as Runpod starts them
# ---------------------------------------------------------------------------------------------
def logged(text: str) -> list[str]:
    """Log messages of a worker's output: the SDK writes JSON lines on Runpod, `LEVEL | msg` locally."""
    lines = [line["message"] for line in json_lines(text) if isinstance(line, dict) and "message" in line]
    return lines + [line.split("|", 1)[1].strip() for line in text.splitlines() if "|" in line]


@pytest.mark.parametrize("example", EXAMPLES)
def test_on_runpod_without_a_gpu_every_worker_stops_before_its_first_job(example: str) -> None:
    # No model exists at this path: a worker that went on would fail loading it, not with this line.
    run = run_local(example, {"RUNPOD_ENDPOINT_ID": "ep-123", "MODEL_NAME": "/nonexistent"}, timeout=180)
    stops = [line for line in logged(run.stdout + run.stderr) if line.startswith("No usable CUDA device")]
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(stops) == 1, run.stdout + run.stderr
    # This machine's torch is the CPU build: that is what it found; the fix and DEVICE=cpu follow.
    assert "(on Runpod): torch 2.13.0+cpu is a CPU build. Fix:" in stops[0] and "DEVICE=cpu" in stops[0]
    assert "Traceback" not in run.stderr and "Loaded" not in run.stdout


@pytest.fixture(scope="module")
def embedder(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("sentence-transformer")


def test_off_runpod_and_with_device_cpu_the_worker_serves_on_the_cpu(embedder: Path) -> None:
    for env, expected in (
        ({}, "No usable CUDA device: torch 2.13.0+cpu is a CPU build. Running on the CPU (slow)"),
        ({"RUNPOD_ENDPOINT_ID": "ep-123", "DEVICE": "cpu"}, "DEVICE=cpu: running on the CPU on purpose"),
    ):
        run = run_local("03_embeddings", {"MODEL_NAME": str(embedder), **env})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        lines = logged(run.stdout + run.stderr)
        assert any(line.startswith(expected) for line in lines), lines
        cold = [line for line in lines if line.startswith("Cold start ")]
        assert len(cold) == 1 and all(f" {phase} " in cold[0] for phase in ("imports", "download", "load to cpu"))
