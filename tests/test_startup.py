"""startup.py: the CUDA contract, where the Hugging Face cache lives, the bake step and the
cold-start timer. One identical copy per example; the pure parts are tested on every copy, and
each worker is started as Runpod starts it (`python handler.py`) to see it stop, or not."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness import EXAMPLES, json_lines, load_copy, run_local, shared_copies

COPIES = shared_copies("startup.py")
SHA_BAKED = "a" * 40
SHA_NEWER = "b" * 40


def test_every_example_has_an_identical_copy() -> None:
    assert [path.parent.name for path in COPIES] == list(EXAMPLES)
    assert len({path.read_text() for path in COPIES}) == 1, "startup.py copies differ between examples"


@pytest.fixture(scope="module", params=COPIES, ids=[path.parent.name for path in COPIES])
def startup(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    # Importing it settles this process (it finds no GPU here, off Runpod: a warning, no change).
    yield load_copy(request.param)


def cuda(startup: ModuleType, **overrides: Any) -> Any:
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
    return startup.CudaFound(**{**found, **overrides})


ON_RUNPOD = {"RUNPOD_ENDPOINT_ID": "ep-123", "RUNPOD_POD_ID": "pod-1"}
OLD_DRIVER = {"driver_cuda": (12, 4), "gpus": 0, "gpu_name": "", "capability": None, "arch_list": ()}
NO_DRIVER = {"driver_cuda": None, "gpus": 0, "gpu_name": "", "capability": None, "arch_list": ()}
V100 = {"gpu_name": "Tesla V100-SXM2-16GB", "capability": (7, 0)}


# ---------------------------------------------------------------------------------------------
# The CUDA contract
# ---------------------------------------------------------------------------------------------
def test_a_usable_gpu_is_used(startup: ModuleType) -> None:
    choice = startup.choose_device(ON_RUNPOD, cuda(startup))
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
    startup: ModuleType, found: dict[str, Any], what: str
) -> None:
    for runpod_variable in ON_RUNPOD:
        choice = startup.choose_device({runpod_variable: "x"}, cuda(startup, **found))
        assert choice.fatal and "\n" not in choice.message
        assert what in choice.message
        assert "torch 2.13.0+cu130 needs CUDA 13.0 (NVIDIA driver >= 580)" in choice.message
        if found is OLD_DRIVER:
            assert 'Fix: set "Allowed CUDA versions" (endpoint settings, Advanced) to 13.0 and newer' in choice.message
        assert "DEVICE=cpu" in choice.message


def test_a_gpu_without_kernels_in_this_torch_stops(startup: ModuleType) -> None:
    choice = startup.choose_device(ON_RUNPOD, cuda(startup, **V100))
    assert choice.fatal
    assert "Tesla V100-SXM2-16GB (sm_70) has no kernels in torch 2.13.0+cu130 (built for sm_75, sm_80" in choice.message
    assert "newer architecture" in choice.message


@pytest.mark.parametrize(
    ("capability", "runs"),
    [((8, 6), True), ((8, 9), True), ((7, 0), False), ((12, 1), True), ((12, 0), True), ((13, 0), True)],
)
def test_kernels_run_on_the_same_major_and_ptx_on_newer(
    startup: ModuleType, capability: tuple[int, int], runs: bool
) -> None:
    # sm_86 cubins run on sm_89; compute_120 PTX is compiled by the driver for anything newer.
    assert startup.runs_on(capability, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_120", "compute_120")) is runs


def test_device_cpu_runs_on_the_cpu_on_purpose_even_on_runpod(startup: ModuleType) -> None:
    for found in (cuda(startup), cuda(startup, **NO_DRIVER)):
        choice = startup.choose_device({**ON_RUNPOD, "DEVICE": "cpu"}, found)
        assert (choice.device, choice.fatal, choice.warning) == ("cpu", False, False)


def test_off_runpod_the_cpu_is_allowed_with_a_warning(startup: ModuleType) -> None:
    choice = startup.choose_device({}, cuda(startup, **NO_DRIVER))
    assert (choice.device, choice.fatal, choice.warning) == ("cpu", False, True)
    assert "Running on the CPU" in choice.message


def test_device_cuda_stops_without_a_gpu_anywhere_and_other_values_are_refused(startup: ModuleType) -> None:
    assert startup.choose_device({"DEVICE": "cuda"}, cuda(startup, **NO_DRIVER)).fatal
    refused = startup.choose_device({"DEVICE": "gpu"}, cuda(startup))
    assert refused.fatal and "DEVICE must be one of auto, cuda, cpu, got 'gpu'" in refused.message


def test_a_cpu_build_of_torch_is_named(startup: ModuleType) -> None:
    choice = startup.choose_device(ON_RUNPOD, cuda(startup, torch_cuda=None, torch_version="2.13.0+cpu", **NO_DRIVER))
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


def test_it_reads_only_documented_settings(startup: ModuleType, tmp_path: Path) -> None:
    """What it reads is CONFIGURATION (in every README), the platform's variables, or the handler's
    own model settings; tests/test_repository.py checks the READMEs against CONFIGURATION."""
    environ = Recording({"MODEL_NAME": "org/model", "HF_HOME": str(tmp_path)})
    startup.choose_device(environ, cuda(startup))
    startup.cache_environment(environ, volume=str(tmp_path / "volume"))
    allowed = {*startup.CONFIGURATION, *startup.RUNPOD_VARIABLES, *startup.MODEL_VARIABLES, "MODEL_REVISION"}
    assert environ.read and environ.read <= allowed


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache
# ---------------------------------------------------------------------------------------------
def hub_snapshot(hub: Path, repo: str, sha: str, files: Mapping[str, str], ref: str | None = "main") -> Path:
    """A Hugging Face cache entry as huggingface_hub writes one: snapshots/<sha>/ and refs/<ref>."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / sha
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
    return snapshot


def test_without_a_volume_nothing_changes(startup: ModuleType, tmp_path: Path) -> None:
    environ = {"MODEL_NAME": "org/model", "HF_HOME": startup.IMAGE_HF_HOME}
    assert startup.cache_environment(environ, volume=str(tmp_path / "no-volume")) == {}


def test_with_a_volume_and_no_baked_model_the_cache_moves_onto_it(startup: ModuleType, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    for hf_home in (startup.IMAGE_HF_HOME, None):
        environ = {"MODEL_NAME": "org/model", **({"HF_HOME": hf_home} if hf_home else {})}
        changes = startup.cache_environment(environ, volume=str(volume))
        assert changes == {"HF_HOME": str(volume / "huggingface")}
        assert "huggingface-cache" not in changes["HF_HOME"]  # Runpod's cached models are never written


def test_a_cache_the_user_chose_stays_where_it_is(startup: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "volume").mkdir()
    for chosen in ({"HF_HOME": "/data/hf"}, {"HF_HUB_CACHE": "/data/hub"}):
        assert startup.cache_environment({"MODEL_NAME": "org/model", **chosen}, volume=str(tmp_path / "volume")) == {}


def test_runpods_cached_models_are_loaded_offline_never_written(startup: ModuleType, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    hub_snapshot(volume / "huggingface-cache" / "hub", "org/model", SHA_BAKED, {"config.json": "{}"})
    environ = {"MODEL_NAME": "org/model", "HF_HOME": startup.IMAGE_HF_HOME}
    assert startup.cache_environment(environ, volume=str(volume)) == {"HF_HUB_OFFLINE": "1"}
    # A second model that is not cached there: online, into our own cache on the volume.
    changes = startup.cache_environment({**environ, "RERANK_MODEL_NAME": "org/other"}, volume=str(volume))
    assert changes == {"HF_HOME": str(volume / "huggingface")}


def bake_into(startup: ModuleType, hf_home: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    def fetch(repo: str, revision: str | None, **options: Any) -> str:
        return revision or SHA_BAKED

    return startup.bake({"HF_HOME": str(hf_home), **environ}, fetch=fetch)


def test_a_baked_model_loads_offline_at_the_baked_commit(startup: ModuleType, tmp_path: Path) -> None:
    record = bake_into(startup, tmp_path, {"MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"})
    assert record == {
        "MODEL_NAME": {"repo": "org/model", "revision": SHA_BAKED},
        "RERANK_MODEL_NAME": {"repo": "org/reranker", "revision": SHA_BAKED},
    }
    (tmp_path / "volume").mkdir()
    environ = {"HF_HOME": str(tmp_path), "MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"}
    expected = {"HF_HUB_OFFLINE": "1", "MODEL_REVISION": SHA_BAKED}
    assert startup.cache_environment(environ, volume=str(tmp_path / "volume")) == expected
    # A revision the deployment names, or an explicit HF_HUB_OFFLINE, is the deployment's.
    pinned = {**environ, "MODEL_REVISION": "v2", "HF_HUB_OFFLINE": "0"}
    assert startup.cache_environment(pinned, volume=str(tmp_path / "volume")) == {}


def test_a_model_other_than_the_baked_one_goes_online(startup: ModuleType, tmp_path: Path) -> None:
    bake_into(startup, tmp_path, {"MODEL_NAME": "org/model"})
    (tmp_path / "volume").mkdir()
    for environ in ({"MODEL_NAME": "org/another"}, {"MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"}):
        changes = startup.cache_environment({"HF_HOME": str(tmp_path), **environ}, volume=str(tmp_path / "volume"))
        assert "HF_HUB_OFFLINE" not in changes


def test_the_bake_passes_revision_token_remote_code_and_variant(startup: ModuleType, tmp_path: Path) -> None:
    calls = []

    def fetch(repo: str, revision: str | None, **options: Any) -> str:
        calls.append((repo, revision, options))
        return SHA_NEWER

    build_args = {
        "HF_HOME": str(tmp_path),
        "MODEL_NAME": "org/model",
        "MODEL_REVISION": "v1",
        "TOKENIZER_NAME": "org/tokenizer",
        "TRUST_REMOTE_CODE": "true",
        "HF_TOKEN": "hf_secret",
        "BAKE_VARIANT": "fp16",
    }
    startup.bake(build_args, fetch=fetch)
    options = {"remote_code": True, "variant": "fp16", "runtime_file": None, "token": "hf_secret"}
    assert calls == [("org/model", "v1", options), ("org/tokenizer", None, options)]
    # 03's CPU image bakes its BACKEND's export of the model (only the model's: not the tokenizer's repo).
    calls.clear()
    startup.bake({**build_args, "BACKEND": "openvino"}, fetch=fetch)
    assert [call[2]["runtime_file"] for call in calls] == ["openvino/openvino_model.xml", None]
    calls.clear()
    startup.bake({**build_args, "BACKEND": "openvino", "BACKEND_FILE": "openvino/int8.xml"}, fetch=fetch)
    assert calls[0][2]["runtime_file"] == "openvino/int8.xml"
    assert "hf_secret" not in (tmp_path / startup.BAKED_RECORD).read_text()
    assert startup.bake({"HF_HOME": str(tmp_path / "none")}, fetch=fetch) == {}  # no MODEL_NAME: nothing baked
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# What a bake or a cold start downloads
# ---------------------------------------------------------------------------------------------
def test_safetensors_configs_and_tokenizer_files_not_duplicates_or_exports(startup: ModuleType) -> None:
    repo = [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "README.md",
        "onnx/model.onnx", "onnx/config.json", "openvino/openvino_model.bin", "flax_model.msgpack",
        "modeling_custom.py", "1_Pooling/config.json", "2_Dense/pytorch_model.bin",
    ]  # fmt: skip
    assert startup.files_to_fetch(repo, remote_code=False) == [
        "1_Pooling/config.json", "2_Dense/pytorch_model.bin", "chat_template.jinja", "config.json",
        "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]  # fmt: skip
    assert "modeling_custom.py" in startup.files_to_fetch(repo, remote_code=True)


def test_the_backend_export_comes_with_its_weights_and_no_other_export(startup: ModuleType) -> None:
    repo = [
        "config.json", "model.safetensors", "tokenizer.json", "onnx/model.onnx", "onnx/model.onnx_data",
        "onnx/model_qint8_avx512.onnx", "openvino/openvino_model.xml", "openvino/openvino_model.bin",
        "openvino/openvino_model_qint8_quantized.xml", "openvino/openvino_model_qint8_quantized.bin",
    ]  # fmt: skip
    plain = ["config.json", "model.safetensors", "tokenizer.json"]
    openvino = startup.files_to_fetch(repo, remote_code=False, runtime_file="openvino/openvino_model.xml")
    assert openvino == sorted([*plain, "openvino/openvino_model.bin", "openvino/openvino_model.xml"])
    int8 = startup.files_to_fetch(repo, remote_code=False, runtime_file="openvino/openvino_model_qint8_quantized.xml")
    assert int8 == sorted(
        [*plain, "openvino/openvino_model_qint8_quantized.bin", "openvino/openvino_model_qint8_quantized.xml"]
    )
    onnx = startup.files_to_fetch(repo, remote_code=False, runtime_file=startup.BACKEND_FILES["onnx"])
    assert onnx == sorted([*plain, "onnx/model.onnx", "onnx/model.onnx_data"])
    # A repo without the export: the PyTorch weights, which the backend exports at load.
    assert startup.files_to_fetch(plain, remote_code=False, runtime_file="openvino/openvino_model.xml") == plain
    assert startup.backend_file({}) is None and startup.backend_file({"BACKEND": "torch"}) is None


def test_bin_only_checkpoints_and_the_fp16_variant_per_folder(startup: ModuleType) -> None:
    assert startup.files_to_fetch(["config.json", "pytorch_model.bin", "training_args.bin"], remote_code=False) == [
        "config.json",
        "pytorch_model.bin",
    ]
    diffusers = [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "v1-5-pruned.ckpt",
    ]  # fmt: skip
    assert startup.files_to_fetch(diffusers, remote_code=False, variant="fp16") == [
        "model_index.json", "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",  # no fp16 file in this folder: the full one
    ]  # fmt: skip
    assert "unet/diffusion_pytorch_model.safetensors" in startup.files_to_fetch(diffusers, remote_code=False)


def test_remote_code_in_other_repos_is_found(startup: ModuleType) -> None:
    config = {
        "auto_map": {
            "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
            "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
            "AutoTokenizer": ["tokenization_own.OwnTokenizer", None],
        }
    }
    assert startup.code_repos(config) == {"nomic-ai/nomic-bert-2048"}
    assert startup.code_repos({}) == set()


# ---------------------------------------------------------------------------------------------
# The cold start, in parts
# ---------------------------------------------------------------------------------------------
def test_cold_start_phases_add_up(startup: ModuleType) -> None:
    ticks = iter([104.0, 104.5, 110.0, 111.25])
    cold = startup.ColdStart(started=100.0, clock=lambda: next(ticks))
    for phase in ("imports", "download", "load to cuda", "warm-up"):
        cold.done(phase)
    assert cold.summary() == "Cold start 11.2s: imports 4.0s, download 0.5s, load to cuda 5.5s, warm-up 1.2s"


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


def test_a_baked_model_is_loaded_offline_at_the_commit_the_build_recorded(embedder: Path, tmp_path: Path) -> None:
    """A Hub id, no network: the worker finds the image's record, goes offline and loads the baked
    commit, although refs/main points at a newer (here broken) snapshot."""
    hub = tmp_path / "hf" / "hub"
    snapshot = hub_snapshot(hub, "acme/embedder", SHA_BAKED, {}, ref=None)
    shutil.copytree(embedder, snapshot, dirs_exist_ok=True)
    hub_snapshot(hub, "acme/embedder", SHA_NEWER, {"config.json": "not json"})
    record = {"MODEL_NAME": {"repo": "acme/embedder", "revision": SHA_BAKED}}
    (tmp_path / "hf" / "baked-models.json").write_text(json.dumps(record))
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "MODEL_NAME": "acme/embedder",
        "HF_HUB_OFFLINE": "",  # the harness sets 1: here only the record may turn it on
        "TRANSFORMERS_OFFLINE": "",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: a Hub request would fail loudly
    }
    run = run_local("03_embeddings", env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = logged(run.stdout + run.stderr)
    assert f"Hugging Face cache: HF_HUB_OFFLINE=1, MODEL_REVISION={SHA_BAKED}" in lines
    assert [value["model"] for value in json_lines(run.stdout) if isinstance(value, dict) and "model" in value]
