"""The CUDA contract: the device this worker runs on, decided before it loads a model. One
identical copy per example (each folder is its own Docker build context).

Importing this module makes the choice (`DEVICE`), so `handler.py` imports it before any library
(pyproject.toml gives it an isort section of its own, right after hub_cache's): DEVICE=cpu hides
every GPU (CUDA_VISIBLE_DEVICES) before torch, accelerate or an engine can pick one.

torch's PyPI wheel is built for one CUDA version (torch 2.13.0: CUDA 13.0, which needs an NVIDIA
driver >= 580 and has no kernels for sm_70 GPUs such as the V100). On a host whose driver is
older, torch silently sees no GPU and the worker would serve on the CPU, 100x slower, while
callers time out. So on Runpod (the platform sets RUNPOD_POD_ID and RUNPOD_ENDPOINT_ID) a worker
without a usable GPU stops here, before it takes a job, with one log line naming what it found,
what the image needs and the endpoint setting that fixes it. DEVICE=cpu runs on the CPU on
purpose; off Runpod (a laptop, the tests) the CPU is allowed with a warning.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

RUNPOD_VARIABLES = ("RUNPOD_POD_ID", "RUNPOD_ENDPOINT_ID")  # set by Runpod on every worker
# What a deployment may set for this module; every README's Configuration table lists them
# (tests/repository/test_repository.py reads this tuple; tests/copied_modules/test_device.py
# checks nothing else is read).
CONFIGURATION = ("DEVICE",)
DEVICES = ("auto", "cuda", "cpu")
# Oldest NVIDIA driver for each CUDA major version (CUDA's minor-version compatibility: a driver
# for 13.0 runs anything built with 13.x).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
ALLOWED_CUDA_SETTING = '"Allowed CUDA versions" (endpoint settings, Advanced)'
LIBCUDA = "libcuda.so.1"  # the driver's library, mounted by the NVIDIA container runtime (tests load a fake)


@dataclass(frozen=True)
class CudaFound:
    """What this container offers: the driver, and the GPU as torch sees it."""

    driver_cuda: tuple[int, int] | None  # newest CUDA the host's driver runs; None: no NVIDIA driver
    torch_cuda: str | None  # the CUDA version torch was built for ("13.0"); None: a CPU build
    torch_version: str
    gpus: int = 0  # devices torch can use
    gpu_name: str = ""
    capability: tuple[int, int] | None = None  # device 0's compute capability, (7, 0) for a V100
    arch_list: tuple[str, ...] = ()  # what torch has kernels for: ("sm_75", "sm_80", ..., "compute_120")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda" or "cpu"
    message: str
    fatal: bool = False  # stop the worker before it takes a job
    warning: bool = False


def on_runpod(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name) for name in RUNPOD_VARIABLES)


def runs_on(capability: tuple[int, int], arch_list: Iterable[str]) -> bool:
    """Whether torch has kernels for this GPU: a cubin for the same major version and a lower or
    equal minor one, or PTX for an older architecture that the driver compiles at load."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        arch_major, arch_minor = divmod(int(number), 10)
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def _problem(found: CudaFound) -> tuple[str, str]:
    """(what is wrong, the endpoint setting that fixes it) when torch cannot use a GPU."""
    needed = found.torch_cuda or "?"
    major = int(needed.split(".")[0]) if found.torch_cuda else 0
    driver = f" (NVIDIA driver >= {MIN_DRIVER[major]})" if major in MIN_DRIVER else ""
    pick_cuda = f"set {ALLOWED_CUDA_SETTING} to {needed} and newer only"
    if found.torch_cuda is None:
        return f"torch {found.torch_version} is a CPU build", "build the image from its Dockerfile"
    if found.driver_cuda is None:
        return f"no NVIDIA driver or GPU in this container; torch {found.torch_version} needs CUDA {needed}{driver}", (
            "give the endpoint GPU workers"
        )
    if found.driver_cuda[0] < major:
        have = ".".join(map(str, found.driver_cuda))
        needs = f"torch {found.torch_version} needs CUDA {needed}{driver}"
        return f"the host's NVIDIA driver runs CUDA {have} at most; {needs}", pick_cuda
    if found.gpus == 0:
        return f"the NVIDIA driver (CUDA {'.'.join(map(str, found.driver_cuda))}) shows torch no usable GPU", pick_cuda
    assert found.capability is not None
    sm = f"sm_{found.capability[0]}{found.capability[1]}"
    kernels = ", ".join(arch for arch in found.arch_list if arch.startswith("sm_"))
    return (
        f"GPU {found.gpu_name} ({sm}) has no kernels in torch {found.torch_version} (built for {kernels})",
        "choose GPU types of a newer architecture on the endpoint",
    )


def choose_device(environ: Mapping[str, str], found: CudaFound) -> DeviceChoice:
    """DEVICE=auto|cuda|cpu against what the container offers; pure, so every case is tested."""
    requested = (environ.get("DEVICE") or "auto").lower()
    if requested not in DEVICES:
        return DeviceChoice("cpu", f"DEVICE must be one of {', '.join(DEVICES)}, got {requested!r}", fatal=True)
    if requested == "cpu":
        return DeviceChoice("cpu", "DEVICE=cpu: running on the CPU on purpose")
    usable = found.gpus > 0 and found.capability is not None and runs_on(found.capability, found.arch_list)
    if usable:
        driver = ".".join(map(str, found.driver_cuda)) if found.driver_cuda else "?"
        return DeviceChoice(
            "cuda",
            f"GPU: {found.gpus} x {found.gpu_name} (sm_{found.capability[0]}{found.capability[1]}), "
            f"driver CUDA {driver}, torch {found.torch_version} built for CUDA {found.torch_cuda}",
        )
    what, fix = _problem(found)
    if on_runpod(environ) or requested == "cuda":
        why = "DEVICE=cuda" if requested == "cuda" else "on Runpod"
        return DeviceChoice(
            "cpu",
            f"No usable CUDA device ({why}): {what}. Fix: {fix}; or set DEVICE=cpu to run on the CPU.",
            fatal=True,
        )
    return DeviceChoice(
        "cpu", f"No usable CUDA device: {what}. Running on the CPU (slow); on Runpod this stops.", warning=True
    )


def driver_cuda_version(library: str = LIBCUDA) -> tuple[int, int] | None:
    """The newest CUDA the host's driver runs, asked of libcuda itself: torch cannot tell an old
    driver from no GPU at all."""
    try:
        libcuda = ctypes.CDLL(library)
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return divmod(version.value, 1000)[0], (version.value % 1000) // 10


def probe_cuda(library: str = LIBCUDA) -> CudaFound:
    import torch  # here, not at the top: torch reads CUDA_VISIBLE_DEVICES, which DEVICE=cpu sets first

    found = CudaFound(
        driver_cuda=driver_cuda_version(library), torch_cuda=torch.version.cuda, torch_version=torch.__version__
    )
    if not torch.cuda.is_available():
        return found
    return CudaFound(
        driver_cuda=found.driver_cuda,
        torch_cuda=found.torch_cuda,
        torch_version=found.torch_version,
        gpus=torch.cuda.device_count(),
        gpu_name=torch.cuda.get_device_name(0),
        capability=torch.cuda.get_device_capability(0),
        arch_list=tuple(torch.cuda.get_arch_list()),
    )


def _log(message: str, level: str = "info") -> None:
    import runpod  # the SDK's logger, so these lines look like (and filter like) the worker's others

    getattr(runpod.RunPodLogger(), level)(message)


def settle(environ: MutableMapping[str, str]) -> str:
    """Apply the device choice to this process; stop on a fatal one."""
    if (environ.get("DEVICE") or "").lower() == "cpu":
        environ["CUDA_VISIBLE_DEVICES"] = ""  # nothing (the engine, accelerate) can pick a GPU now
    choice = choose_device(environ, probe_cuda())
    if choice.fatal:
        _log(choice.message, "error")
        raise SystemExit(1)
    _log(choice.message, "warn" if choice.warning else "info")
    return choice.device


DEVICE = settle(os.environ)  # "cuda", or "cpu" when asked (DEVICE=cpu) or off Runpod
