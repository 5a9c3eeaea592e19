"""hub_cache.py: where the Hugging Face cache lives, what a model loads, and the bake step. The
pure parts are tested on every copy; workers are started as Runpod starts them (`python
handler.py`) with a baked model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.copied_modules.test_device import Recording, logged
from tests.shared.harness import json_lines, load_copy, run_local, shared_copies

COPIES = shared_copies("hub_cache.py")
SHA_BAKED = "a" * 40
SHA_NEWER = "b" * 40


@pytest.fixture(scope="module", params=COPIES, ids=[path.parent.name for path in COPIES])
def hub_cache(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    # Importing it settles this process's cache (no volume, no record here: no change).
    yield load_copy(request.param)


def test_it_reads_only_documented_settings(hub_cache: ModuleType, tmp_path: Path) -> None:
    """What it reads is CONFIGURATION (in every README) or the handler's own model settings;
    tests/repository/test_repository.py checks the READMEs against CONFIGURATION."""
    environ = Recording({"MODEL_NAME": "org/model", "HF_HOME": str(tmp_path)})
    hub_cache.cache_environment(environ, volume=str(tmp_path / "volume"))
    allowed = {*hub_cache.CONFIGURATION, *hub_cache.MODEL_VARIABLES, "MODEL_REVISION"}
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


def test_without_a_volume_nothing_changes(hub_cache: ModuleType, tmp_path: Path) -> None:
    environ = {"MODEL_NAME": "org/model", "HF_HOME": hub_cache.IMAGE_HF_HOME}
    assert hub_cache.cache_environment(environ, volume=str(tmp_path / "no-volume")) == {}


def test_with_a_volume_and_no_baked_model_the_cache_moves_onto_it(hub_cache: ModuleType, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    for hf_home in (hub_cache.IMAGE_HF_HOME, None):
        environ = {"MODEL_NAME": "org/model", **({"HF_HOME": hf_home} if hf_home else {})}
        changes = hub_cache.cache_environment(environ, volume=str(volume))
        assert changes == {"HF_HOME": str(volume / "huggingface")}
        assert "huggingface-cache" not in changes["HF_HOME"]  # Runpod's cached models are never written


def test_a_cache_the_user_chose_stays_where_it_is(hub_cache: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "volume").mkdir()
    for chosen in ({"HF_HOME": "/data/hf"}, {"HF_HUB_CACHE": "/data/hub"}):
        assert hub_cache.cache_environment({"MODEL_NAME": "org/model", **chosen}, volume=str(tmp_path / "volume")) == {}


def test_runpods_cached_models_are_loaded_offline_never_written(hub_cache: ModuleType, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    snapshot = hub_snapshot(volume / "huggingface-cache" / "hub", "org/model", SHA_BAKED, {"config.json": "{}"})
    environ = {"MODEL_NAME": "org/model", "HF_HOME": hub_cache.IMAGE_HF_HOME}
    expected = {"HF_HUB_OFFLINE": "1", "MODEL_REVISION": SHA_BAKED}
    assert hub_cache.cache_environment(environ, volume=str(volume)) == expected
    assert hub_cache.LocalModels.find(environ, str(volume)).folder("org/model") == str(snapshot)
    # A second model that is not cached there: online, into our own cache on the volume; the cached
    # one stays at its commit, so a newer main on the Hub is never written into Runpod's folder.
    changes = hub_cache.cache_environment({**environ, "RERANK_MODEL_NAME": "org/other"}, volume=str(volume))
    assert changes == {"HF_HOME": str(volume / "huggingface"), "MODEL_REVISION": SHA_BAKED}


def bake_into(hub_cache: ModuleType, hf_home: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """The bake step with a stand-in for the Hub: each model lands in HF_HOME's cache as a download would."""

    def fetch(repo: str, revision: str | None, **options: Any) -> str:
        commit = revision or SHA_BAKED
        hub_snapshot(hf_home / "hub", repo, commit, {"config.json": "{}"}, ref=None)
        return commit

    return hub_cache.bake({"HF_HOME": str(hf_home), **environ}, fetch=fetch)


def test_a_baked_model_loads_offline_at_the_baked_commit(hub_cache: ModuleType, tmp_path: Path) -> None:
    record = bake_into(hub_cache, tmp_path, {"MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"})
    assert record == {
        "MODEL_NAME": {"repo": "org/model", "revision": SHA_BAKED},
        "RERANK_MODEL_NAME": {"repo": "org/reranker", "revision": SHA_BAKED},
    }
    (tmp_path / "volume").mkdir()
    environ = {"HF_HOME": str(tmp_path), "MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"}
    expected = {"HF_HUB_OFFLINE": "1", "MODEL_REVISION": SHA_BAKED}
    assert hub_cache.cache_environment(environ, volume=str(tmp_path / "volume")) == expected
    local = hub_cache.LocalModels.find(environ, str(tmp_path / "volume"))
    snapshots = tmp_path / "hub" / "models--org--model" / "snapshots"
    assert local.folder("org/model") == local.folder("org/model", SHA_BAKED) == str(snapshots / SHA_BAKED)
    # An explicit HF_HUB_OFFLINE is the deployment's (or the worker's: 02 keeps the Hub on).
    online = {**environ, "HF_HUB_OFFLINE": "0"}
    assert hub_cache.cache_environment(online, volume=str(tmp_path / "volume")) == {"MODEL_REVISION": SHA_BAKED}
    # A revision the deployment names is the deployment's: that one comes from the Hub.
    pinned = {**environ, "MODEL_REVISION": "v2"}
    assert local.folder("org/model", "v2") is None
    assert hub_cache.cache_environment(pinned, volume=str(tmp_path / "volume")) == {}
    # A record whose snapshot is gone promises nothing.
    shutil.rmtree(snapshots)
    assert hub_cache.LocalModels.find(environ, str(tmp_path / "volume")).folder("org/model") is None


def test_a_model_other_than_the_baked_one_goes_online(hub_cache: ModuleType, tmp_path: Path) -> None:
    bake_into(hub_cache, tmp_path, {"MODEL_NAME": "org/model"})
    (tmp_path / "volume").mkdir()
    volume = str(tmp_path / "volume")
    # Another model: not the baked commit, and from the Hub (into the HF_HOME the user chose).
    assert hub_cache.cache_environment({"HF_HOME": str(tmp_path), "MODEL_NAME": "org/another"}, volume) == {}
    environ = {"HF_HOME": str(tmp_path), "MODEL_NAME": "org/model", "RERANK_MODEL_NAME": "org/reranker"}
    assert hub_cache.cache_environment(environ, volume) == {"MODEL_REVISION": SHA_BAKED}  # HF_HOME is the user's
    local = hub_cache.LocalModels.find(environ, volume)
    assert local.folder("org/model") and local.folder("org/reranker") is None


def test_baked_models_load_from_the_image_and_the_hub_stays_on_for_the_rest(
    hub_cache: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """02 baked with its ControlNet; the endpoint adds a VAE that was not baked. The baked models
    resolve to their snapshots and are not downloaded; the VAE goes to the Hub, which stays on.
    (Before, "every MODEL_VARIABLES model is baked" turned the Hub off for the whole worker.)"""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf"
    bake_into(hub_cache, hf_home, {"MODEL_NAME": "acme/pipe", "CONTROLNET_MODEL": "acme/controlnet"})
    vae = "madebyollin/sdxl-vae-fp16-fix"
    environ = {
        "HF_HOME": str(hf_home),
        "MODEL_NAME": "acme/pipe",
        "CONTROLNET_MODEL": "acme/controlnet",
        "VAE_NAME": vae,
    }
    changes = hub_cache.cache_environment(environ, volume=str(tmp_path / "no-volume"))
    assert changes == {"MODEL_REVISION": SHA_BAKED}  # and no HF_HUB_OFFLINE: the VAE must download
    # MODEL_CONFIG likewise.
    with_config = {**environ, "VAE_NAME": "", "MODEL_CONFIG": "stabilityai/stable-diffusion-xl-base-1.0"}
    assert "HF_HUB_OFFLINE" not in hub_cache.cache_environment(with_config, volume=str(tmp_path / "no-volume"))
    local = hub_cache.LocalModels.find(environ, str(tmp_path / "no-volume"))
    pipe = str(hf_home / "hub" / "models--acme--pipe" / "snapshots" / SHA_BAKED)
    assert local.folder("acme/pipe", SHA_BAKED) == pipe
    assert local.folder(vae) is None

    fetched: list[tuple[str, str | None]] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on Runpod, not as in this suite
    monkeypatch.setattr(hub_cache, "LOCAL_MODELS", local)
    monkeypatch.setattr(hub_cache, "download", lambda repo, revision, **options: fetched.append((repo, revision)))
    hub_cache.prefetch("acme/pipe", "acme/controlnet", vae, revision=SHA_BAKED, variant="fp16")
    assert fetched == [(vae, None)]
    assert hub_cache.local_model("acme/pipe", SHA_BAKED) == pipe and hub_cache.local_model(vae) is None
    # A VAE baked too (VAE_NAME as a build arg) is local like the rest: nothing left to download.
    bake_into(hub_cache, hf_home, {"MODEL_NAME": "acme/pipe", "CONTROLNET_MODEL": "acme/controlnet", "VAE_NAME": vae})
    assert hub_cache.LocalModels.find(environ, str(tmp_path / "no-volume")).folder(vae)
    assert hub_cache.cache_environment(environ, volume=str(tmp_path / "no-volume"))["HF_HUB_OFFLINE"] == "1"


def test_the_bake_passes_revision_token_remote_code_and_variant(hub_cache: ModuleType, tmp_path: Path) -> None:
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
    hub_cache.bake(build_args, fetch=fetch)
    options = {"remote_code": True, "variant": "fp16", "runtime_file": None, "weights": True, "token": "hf_secret"}
    assert calls == [("org/model", "v1", options), ("org/tokenizer", None, options)]
    # 02's VAE_NAME is baked with its weights; MODEL_CONFIG (a single file's configs) without.
    calls.clear()
    hub_cache.bake({**build_args, "VAE_NAME": "org/vae", "MODEL_CONFIG": "org/base"}, fetch=fetch)
    assert [(call[0], call[2]["weights"]) for call in calls[2:]] == [("org/vae", True), ("org/base", False)]
    # 03's CPU image bakes its BACKEND's export of the model (only the model's: not the tokenizer's repo).
    calls.clear()
    hub_cache.bake({**build_args, "BACKEND": "openvino"}, fetch=fetch)
    assert [call[2]["runtime_file"] for call in calls] == ["openvino/openvino_model.xml", None]
    calls.clear()
    hub_cache.bake({**build_args, "BACKEND": "openvino", "BACKEND_FILE": "openvino/int8.xml"}, fetch=fetch)
    assert calls[0][2]["runtime_file"] == "openvino/int8.xml"
    assert "hf_secret" not in (tmp_path / hub_cache.BAKED_RECORD).read_text()
    assert hub_cache.bake({"HF_HOME": str(tmp_path / "none")}, fetch=fetch) == {}  # no MODEL_NAME: nothing baked
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# What a bake or a cold start downloads
# ---------------------------------------------------------------------------------------------
def reader(files: Mapping[str, Any]) -> Callable[[str], str]:
    """A repo's JSON files as `download` reads them from the Hub; any other read fails the test."""
    return lambda name: json.dumps(files[name])


NO_READS = reader({})


def weight_map(*shards: str) -> dict[str, Any]:
    """A shard index: two tensors per shard, as an index maps every tensor to its file."""
    tensors = {f"layers.{index}.{part}.weight": shard for index, shard in enumerate(shards) for part in ("a", "b")}
    return {"metadata": {"total_size": 2 * len(shards)}, "weight_map": tensors}


def test_safetensors_configs_and_tokenizer_files_not_duplicates_or_exports(hub_cache: ModuleType) -> None:
    repo = [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "README.md",
        "onnx/model.onnx", "onnx/config.json", "openvino/openvino_model.bin", "flax_model.msgpack",
        "modeling_custom.py", "1_Pooling/config.json", "2_Dense/pytorch_model.bin",
    ]  # fmt: skip
    read = reader(
        {
            "model.safetensors.index.json": weight_map(
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
            )
        }
    )
    assert hub_cache.files_to_fetch(repo, remote_code=False, read=read) == [
        "1_Pooling/config.json", "2_Dense/pytorch_model.bin", "chat_template.jinja", "config.json",
        "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]  # fmt: skip
    assert "modeling_custom.py" in hub_cache.files_to_fetch(repo, remote_code=True, read=read)


def test_the_backend_export_comes_with_its_weights_and_no_other_export(hub_cache: ModuleType) -> None:
    repo = [
        "config.json", "model.safetensors", "tokenizer.json", "onnx/model.onnx", "onnx/model.onnx_data",
        "onnx/model_qint8_avx512.onnx", "openvino/openvino_model.xml", "openvino/openvino_model.bin",
        "openvino/openvino_model_qint8_quantized.xml", "openvino/openvino_model_qint8_quantized.bin",
    ]  # fmt: skip
    plain = ["config.json", "model.safetensors", "tokenizer.json"]

    def fetch(files: list[str], runtime_file: str) -> list[str]:
        return hub_cache.files_to_fetch(files, remote_code=False, read=NO_READS, runtime_file=runtime_file)

    openvino = fetch(repo, "openvino/openvino_model.xml")
    assert openvino == sorted([*plain, "openvino/openvino_model.bin", "openvino/openvino_model.xml"])
    int8 = fetch(repo, "openvino/openvino_model_qint8_quantized.xml")
    assert int8 == sorted(
        [*plain, "openvino/openvino_model_qint8_quantized.bin", "openvino/openvino_model_qint8_quantized.xml"]
    )
    onnx = fetch(repo, hub_cache.BACKEND_FILES["onnx"])
    assert onnx == sorted([*plain, "onnx/model.onnx", "onnx/model.onnx_data"])
    # A repo without the export: the PyTorch weights, which the backend exports at load.
    assert fetch(plain, "openvino/openvino_model.xml") == plain
    assert hub_cache.backend_file({}) is None and hub_cache.backend_file({"BACKEND": "torch"}) is None


def test_bin_only_checkpoints_and_the_fp16_variant_per_folder(hub_cache: ModuleType) -> None:
    bin_only = ["config.json", "pytorch_model.bin", "training_args.bin"]
    assert hub_cache.files_to_fetch(bin_only, remote_code=False, read=NO_READS) == ["config.json", "pytorch_model.bin"]
    diffusers = [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "v1-5-pruned.ckpt",
    ]  # fmt: skip
    parts = ("unet", "vae", "text_encoder", "tokenizer")
    read = reader(
        {"model_index.json": {"_class_name": "StableDiffusionPipeline", **{part: ["x", "X"] for part in parts}}}
    )
    assert hub_cache.files_to_fetch(diffusers, remote_code=False, read=read, variant="fp16") == [
        "model_index.json", "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",  # no fp16 file in this folder: the full one
    ]  # fmt: skip
    fetched = hub_cache.files_to_fetch(diffusers, remote_code=False, read=read)
    assert "unet/diffusion_pytorch_model.safetensors" in fetched


# stabilityai/stable-diffusion-xl-base-1.0 as the Hub lists it: the diffusers folders (with fp16
# variants, Flax, ONNX and OpenVINO exports), and at the root the original single-file checkpoints
# (6.9 GB each) and an example LoRA, which a diffusers load never reads.
SDXL_BASE = [
    ".gitattributes", "01.png", "LICENSE.md", "README.md", "comparison.png", "model_index.json", "pipeline.png",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/flax_model.msgpack", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx", "text_encoder/model.safetensors", "text_encoder/openvino_model.bin",
    "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/flax_model.msgpack", "text_encoder_2/model.fp16.safetensors",
    "text_encoder_2/model.onnx", "text_encoder_2/model.onnx_data", "text_encoder_2/model.safetensors",
    "text_encoder_2/openvino_model.bin", "text_encoder_2/openvino_model.xml",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_flax_model.msgpack", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "unet/model.onnx", "unet/model.onnx_data",
    "unet/openvino_model.bin", "unet/openvino_model.xml",
    "vae/config.json", "vae/diffusion_flax_model.msgpack", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/config.json", "vae_decoder/model.onnx", "vae_decoder/openvino_model.bin",
    "vae_decoder/openvino_model.xml",
    "vae_encoder/config.json", "vae_encoder/model.onnx", "vae_encoder/openvino_model.bin",
    "vae_encoder/openvino_model.xml",
]  # fmt: skip
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_CONFIGS = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder_2/config.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json", "unet/config.json", "vae/config.json",
]  # fmt: skip


def test_a_diffusers_pipeline_is_its_components_not_the_single_files_beside_them(hub_cache: ModuleType) -> None:
    read = reader({"model_index.json": SDXL_INDEX})
    fp16 = hub_cache.files_to_fetch(SDXL_BASE, remote_code=False, read=read, variant="fp16")
    assert fp16 == sorted([
        *SDXL_CONFIGS, "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    ])  # fmt: skip
    full = hub_cache.files_to_fetch(SDXL_BASE, remote_code=False, read=read)
    assert full == sorted([
        *SDXL_CONFIGS, "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    ])  # fmt: skip
    # MODEL_CONFIG, the configs a single-file SDXL checkpoint lacks: no weights at all.
    assert hub_cache.files_to_fetch(SDXL_BASE, remote_code=False, read=read, weights=False) == SDXL_CONFIGS


# black-forest-labs/FLUX.1-dev: the diffusers folders (the transformer and T5 sharded), and at the
# root the original checkpoint (23.8 GB) and autoencoder (335 MB).
FLUX_DEV = [
    ".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg", "flux1-dev.safetensors",
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip


def test_flux_is_its_components_with_the_shards_their_indexes_name(hub_cache: ModuleType) -> None:
    flux_index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],  # optional parts this pipeline does not have
        "feature_extractor": [None, None],
    }
    transformer = [f"diffusion_pytorch_model-0000{shard}-of-00003.safetensors" for shard in (1, 2, 3)]
    read = reader({
        "model_index.json": flux_index,
        "text_encoder_2/model.safetensors.index.json": weight_map(
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        ),
        "transformer/diffusion_pytorch_model.safetensors.index.json": weight_map(*transformer),
    })  # fmt: skip
    chosen = hub_cache.files_to_fetch(FLUX_DEV, remote_code=False, read=read, variant="fp16")  # no fp16 files: full
    skipped = {".gitattributes", "LICENSE.md", "README.md", "dev_grid.jpg", "ae.safetensors", "flux1-dev.safetensors"}
    assert chosen == sorted(set(FLUX_DEV) - skipped)


# mistralai/Mistral-7B-Instruct-v0.3: the transformers shards with their index, and beside them the
# same weights in Mistral's own format (consolidated.safetensors, 14.5 GB, with params.json).
MISTRAL_7B = [
    ".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "params.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer.model.v3", "tokenizer_config.json",
]  # fmt: skip


def test_a_sharded_checkpoint_is_the_shards_its_index_names_never_the_consolidated_copy(hub_cache: ModuleType) -> None:
    shards = [f"model-0000{shard}-of-00003.safetensors" for shard in (1, 2, 3)]
    reads: list[str] = []

    def read(name: str) -> str:
        reads.append(name)
        return json.dumps(weight_map(*shards))

    chosen = hub_cache.files_to_fetch(MISTRAL_7B, remote_code=False, read=read)
    assert reads == ["model.safetensors.index.json"]
    assert "consolidated.safetensors" not in chosen
    assert [name for name in chosen if name.endswith(".safetensors")] == shards
    # Exactly what the index names: a shard it does not name is not fetched either.
    two = hub_cache.files_to_fetch(MISTRAL_7B, remote_code=False, read=reader({reads[0]: weight_map(*shards[:2])}))
    assert [name for name in two if name.endswith(".safetensors")] == shards[:2]


def test_a_variants_shards_come_from_its_own_index(hub_cache: ModuleType) -> None:
    """SD3's T5 encoder: full-precision shards and fp16 ones, each set with its index; the fp16
    shards in diffusers' older naming (model.fp16-00001-of-00002), which only the index tells."""
    folder = [
        "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
        "text_encoder_3/model.fp16-00001-of-00002.safetensors", "text_encoder_3/model.fp16-00002-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.fp16.json",
    ]  # fmt: skip
    full = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    half = ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]
    read = reader({
        "text_encoder_3/model.safetensors.index.json": weight_map(*full),
        "text_encoder_3/model.safetensors.index.fp16.json": weight_map(*half),
    })  # fmt: skip
    for variant, shards in (("fp16", half), (None, full)):
        chosen = hub_cache.files_to_fetch(folder, remote_code=False, read=read, variant=variant)
        assert [name for name in chosen if name.endswith(".safetensors")] == [f"text_encoder_3/{s}" for s in shards]


def test_a_single_file_repo_still_gets_its_checkpoint_and_a_vae_repo_one_copy(hub_cache: ModuleType) -> None:
    # No model_index.json: the root checkpoint is the model (a Civitai-style single-file repo).
    for checkpoint in ("dreamshaper_8.safetensors", "sd_xl_base_1.0.safetensors"):
        repo = [".gitattributes", "README.md", checkpoint]
        assert hub_cache.files_to_fetch(repo, remote_code=False, read=NO_READS, variant="fp16") == [checkpoint]
    # madebyollin/sdxl-vae-fp16-fix, a VAE_NAME: diffusers' file, not its copies for other UIs.
    vae = [
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors", "images/activation-magnitudes.jpg", "sdxl.vae.safetensors",
        "sdxl_vae.safetensors",
    ]  # fmt: skip
    assert hub_cache.files_to_fetch(vae, remote_code=False, read=NO_READS, variant="fp16") == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_remote_code_in_other_repos_is_found(hub_cache: ModuleType) -> None:
    config = {
        "auto_map": {
            "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
            "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
            "AutoTokenizer": ["tokenization_own.OwnTokenizer", None],
        }
    }
    assert hub_cache.code_repos(config) == {"nomic-ai/nomic-bert-2048"}
    assert hub_cache.code_repos({}) == set()


@pytest.fixture(scope="module")
def embedder(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("sentence-transformer")


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


@contextlib.contextmanager
def fake_hub(files: Mapping[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """The Hub's file endpoint on localhost, as hf_hub_download uses it: `files` by
    "owner/repo/path" at one commit, 404 for anything else. Yields its URL and every path asked for."""
    asked: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            asked.append(self.path)
            parts = self.path.lstrip("/").split("/")  # owner/repo/resolve/<revision>/<path>
            data = files.get("/".join(parts[:2] + parts[4:])) if parts[2:3] == ["resolve"] else None
            self.send_response(200 if data is not None else 404)
            if data is not None:
                self.send_header("X-Repo-Commit", SHA_NEWER)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_a_baked_image_worker_loads_its_model_offline_and_still_fetches_loras_from_the_hub(
    tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """02 with its pipeline baked and an endpoint LoRA on the Hub. The pipeline loads from the
    image's snapshot at the baked commit (refs/main points at a newer, broken one) without a single
    Hub request; the LoRA downloads. Before, a baked image turned the Hub off for the whole worker,
    and the LoRA (a VAE_NAME, a LoRA a request names) could not be fetched."""
    hub = tmp_path / "hf" / "hub"
    snapshot = hub_snapshot(hub, "acme/pipe", SHA_BAKED, {}, ref=None)
    shutil.copytree(tiny_model("sd15"), snapshot, dirs_exist_ok=True)
    hub_snapshot(hub, "acme/pipe", SHA_NEWER, {"model_index.json": "not json"})
    record = {"MODEL_NAME": {"repo": "acme/pipe", "revision": SHA_BAKED}}
    (tmp_path / "hf" / "baked-models.json").write_text(json.dumps(record))
    lora = (tiny_model("lora-sd15-a") / "pytorch_lora_weights.safetensors").read_bytes()
    with fake_hub({"acme/style/pytorch_lora_weights.safetensors": lora}) as (url, asked):
        env = {
            "HF_HOME": str(tmp_path / "hf"),
            "MODEL_NAME": "acme/pipe",
            "LORAS": json.dumps([{"name": "style", "source": "acme/style", "weight": 0.8}]),
            "HF_HUB_OFFLINE": "",  # the harness sets 1: here only the worker and its record decide
            "TRANSFORMERS_OFFLINE": "",
            "HF_ENDPOINT": url,
        }
        run = run_local("02_image_generation", env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [path for path in asked if "acme/pipe" in path] == []
    assert "/acme/style/resolve/main/pytorch_lora_weights.safetensors" in asked
    lines = logged(run.stdout + run.stderr)
    assert f"Hugging Face cache: MODEL_REVISION={SHA_BAKED}" in lines
    assert any(line.startswith("Loaded acme/pipe ") for line in lines), lines
    assert "Job local_test completed successfully." in lines  # test_input.json, with the LoRA loaded at start
