"""The Hugging Face cache: where it lives, what a model loads, and the bake step that puts models
into the image. One identical copy per example (each folder is its own Docker build context).

Importing this module settles the cache, so `handler.py` imports it first, before any library
(pyproject.toml gives it an isort section of its own, the first after the standard library):
huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when it is imported.

A model baked into the image (`python hub_cache.py bake` in the Dockerfile) is loaded at the
commit the build recorded (MODEL_REVISION becomes that commit), and so is one in Runpod's cached
models (/runpod-volume/huggingface-cache: the platform's and read-only, so nothing is ever written
into it). When every model the settings name is one of those, the worker goes offline
(HF_HUB_OFFLINE=1). A worker that names more models at run time (02: LoRAs in requests) keeps the
Hub on with HF_HUB_OFFLINE=0 and loads these from their snapshot folders (`local_model`), so a VAE
or a LoRA that was not baked still downloads. Otherwise, with a network volume attached, HF_HOME
moves onto it so that only the first worker ever downloads.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

RUNPOD_VOLUME = "/runpod-volume"  # where Runpod mounts an endpoint's network volume
RUNPOD_MODEL_CACHE = "huggingface-cache"  # Runpod's cached models on the volume: the platform's, read-only
VOLUME_HF_HOME = "huggingface"  # our own Hugging Face cache on the volume, shared by every worker
BAKED_RECORD = "baked-models.json"  # written under HF_HOME by `python hub_cache.py bake`
IMAGE_HF_HOME = "/models/huggingface"  # every Dockerfile's HF_HOME: where the bake step puts models
# The variables that name a Hub repo in any of the workers (each worker reads only its own); the
# bake step fetches each one that is set.
MODEL_VARIABLES = ("MODEL_NAME", "TOKENIZER_NAME", "CONTROLNET_MODEL", "RERANK_MODEL_NAME", "VAE_NAME", "MODEL_CONFIG")
# ...of which these name a repo read only for its configs and tokenizers (02's MODEL_CONFIG: what a
# single-file checkpoint lacks), so baking it fetches no weights.
CONFIG_ONLY_VARIABLES = ("MODEL_CONFIG",)
COMMIT = re.compile(r"[0-9a-f]{40}")  # a revision that is a commit hash, not a branch or tag
# What a deployment may set for this module; every README's Configuration table lists them
# (tests/repository/test_repository.py reads this tuple; tests/copied_modules/test_hub_cache.py
# checks nothing else is read).
CONFIGURATION = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
# Files a model loads besides its weights: configs, tokenizers, chat templates, sentencepiece and
# tiktoken vocabularies. Weights are chosen per folder by `files_to_fetch`.
SMALL_FILES = ("*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken", "tokenizer*", "*.spm", "*.vocab")
# Exports for other runtimes that repos often carry beside the PyTorch weights (ONNX, OpenVINO,
# Core ML, TensorFlow, Flax): never loaded here, sometimes larger than the model itself.
OTHER_RUNTIME_FOLDERS = ("onnx", "openvino", "coreml", "tf", "flax", "mlx")
# ...except the export a worker runs on: the embeddings worker's BACKEND (sentence-transformers'
# ONNX and OpenVINO backends) loads this file from the repo when it is there, and exports at start
# otherwise; BACKEND_FILE picks another one (a quantized variant, say).
BACKEND_FILES = {"onnx": "onnx/model.onnx", "openvino": "openvino/openvino_model.xml"}
# The weight files from_pretrained reads by name (transformers, diffusers, PyTorch .bin): a folder
# that has them loads only them, whatever other checkpoints lie beside them (a VAE repo's
# sdxl_vae.safetensors copy).
LIBRARY_WEIGHTS = ("model", "diffusion_pytorch_model", "pytorch_model")
# A sharded checkpoint's index, "<name>.safetensors.index[.<variant>].json": its weight_map names the shards.
SHARD_INDEX = re.compile(r"(?P<name>[^.]+)\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json")
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline's root file: it names the component folders


def backend_file(environ: Mapping[str, str]) -> str | None:
    """The runtime export a worker loads (BACKEND_FILE, else its BACKEND's default); None for torch."""
    return environ.get("BACKEND_FILE") or BACKEND_FILES.get((environ.get("BACKEND") or "torch").lower())


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache: baked, on the network volume, or Runpod's cached models
# ---------------------------------------------------------------------------------------------
def hub_folder(hub_cache: str | Path, repo: str) -> Path:
    return Path(hub_cache) / ("models--" + repo.replace("/", "--"))


def default_hf_home(environ: Mapping[str, str]) -> str:
    return environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def read_baked(hf_home: str) -> dict[str, dict[str, str]]:
    """{variable: {"repo": ..., "revision": commit}} for the models the image holds; {} for none."""
    record = Path(hf_home) / BAKED_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def snapshot_folder(hub_cache: str | Path, repo: str, revision: str | None = None) -> Path | None:
    """The snapshot a Hugging Face cache holds of `repo` at `revision` (a commit, or a branch or tag
    recorded under refs/; main when None), else None."""
    entry = hub_folder(hub_cache, repo)
    commit = revision or "main"
    if not COMMIT.fullmatch(commit):
        ref = entry / "refs" / commit
        commit = ref.read_text().strip() if ref.is_file() else ""
    snapshot = entry / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


@dataclass(frozen=True)
class LocalModels:
    """The models a worker loads without the Hub: those baked into the image (at the commit the
    build recorded) and those in Runpod's cached models. Loaded from their snapshot folders, they
    need no offline mode, so the Hub can stay on for everything else the worker fetches."""

    baked: Mapping[str, str]  # {repo: commit} from the image's record
    image_hub: Path  # where the bake step put them
    runpod_hub: Path

    @classmethod
    def find(cls, environ: Mapping[str, str], volume: str = RUNPOD_VOLUME) -> LocalModels:
        """Read before HF_HOME moves: the record and the snapshots are in the image's cache."""
        hf_home = default_hf_home(environ)
        baked = {entry["repo"]: entry["revision"] for entry in read_baked(hf_home).values()}
        image_hub = Path(environ.get("HF_HUB_CACHE") or Path(hf_home) / "hub")
        return cls(baked, image_hub, Path(volume) / RUNPOD_MODEL_CACHE / "hub")

    def folder(self, repo: str | None, revision: str | None = None) -> str | None:
        """The snapshot folder to load `repo` (at `revision`) from; None: it comes from the Hub, or
        it is a path already."""
        if not repo or Path(repo).exists():
            return None
        baked = repo in self.baked and snapshot_folder(self.image_hub, repo, revision or self.baked[repo])
        found = baked or snapshot_folder(self.runpod_hub, repo, revision)
        return str(found) if found else None


def cache_environment(environ: Mapping[str, str], volume: str = RUNPOD_VOLUME) -> dict[str, str]:
    """The environment changes that put the Hugging Face cache in the right place; pure (it only
    reads the file system), so each case is tested with and without a volume folder."""
    local = LocalModels.find(environ, volume)
    models = {name: environ[name] for name in MODEL_VARIABLES if environ.get(name)}
    revisions = {"MODEL_NAME": environ.get("MODEL_REVISION") or None}
    changes: dict[str, str] = {}
    model_folder = local.folder(models.get("MODEL_NAME"), revisions["MODEL_NAME"])
    if model_folder and not revisions["MODEL_NAME"]:  # the baked (or cached) commit, for loaders given the Hub id
        changes["MODEL_REVISION"] = Path(model_folder).name
    if models and all(Path(repo).is_dir() or local.folder(repo, revisions.get(name)) for name, repo in models.items()):
        # Every model the settings name is in the image or in Runpod's cache: no network at all,
        # unless the deployment says otherwise, or the worker, which may name more at run time (02's
        # LoRAs: it sets HF_HUB_OFFLINE=0 and loads these from their snapshot folders, `local_model`).
        if environ.get("HF_HUB_OFFLINE") in (None, ""):
            changes["HF_HUB_OFFLINE"] = "1"
        return changes  # and the cache stays where the models are
    # The image's (or the library's) default cache, not one the user chose with HF_HOME / HF_HUB_CACHE.
    own_cache = environ.get("HF_HOME") in (None, "", IMAGE_HF_HOME) and not environ.get("HF_HUB_CACHE")
    if Path(volume).is_dir() and own_cache:
        changes["HF_HOME"] = str(Path(volume) / VOLUME_HF_HOME)
    return changes


# ---------------------------------------------------------------------------------------------
# What to download: the files a model loads, for the bake step and for a cold start alike
# ---------------------------------------------------------------------------------------------
def files_to_fetch(
    repo_files: Iterable[str],
    *,
    remote_code: bool,
    read: Callable[[str], str],
    variant: str | None = None,
    runtime_file: str | None = None,
    weights: bool = True,
) -> list[str]:
    """The files from_pretrained reads, per folder: configs and tokenizer files; the weights (see
    `folder_weights`; none when `weights` is False); the repo's *.py only for remote code. Exports
    for other runtimes are skipped, except `runtime_file` and the files beside it that share its
    name (OpenVINO's .bin weights, ONNX's .onnx_data). A diffusers pipeline loads only the folders
    its model_index.json names: the single-file checkpoints often published beside them at the
    root (SDXL's sd_xl_base_1.0.safetensors, FLUX.1's flux1-dev.safetensors, gigabytes each) and
    folders no component uses are skipped. `read(name)` gives a repo file's text: model_index.json
    and the shard indexes."""
    paths = [PurePosixPath(name) for name in repo_files]
    if runtime_file:
        wanted = PurePosixPath(runtime_file)
        runtime = [path for path in paths if path.parent == wanted.parent and path.stem == wanted.stem]
    else:
        runtime = []
    paths = [path for path in paths if not set(path.parts[:-1]) & set(OTHER_RUNTIME_FOLDERS)]
    pipeline = PurePosixPath(PIPELINE_INDEX) in paths
    if pipeline:
        components = pipeline_components(json.loads(read(PIPELINE_INDEX)))
        paths = [path for path in paths if len(path.parts) == 1 or path.parts[0] in components]
    chosen = [path for path in paths if any(fnmatch.fnmatch(path.name, pattern) for pattern in SMALL_FILES)]
    if remote_code:
        chosen += [path for path in paths if path.suffix == ".py"]
    for folder in sorted({path.parent for path in paths}) if weights else []:
        if pipeline and folder == PurePosixPath("."):
            continue  # a pipeline's weights are its components'
        chosen += folder_weights([path for path in paths if path.parent == folder], variant, read)
    return sorted({str(path) for path in chosen + runtime})


def pipeline_components(model_index: Mapping[str, Any]) -> set[str]:
    """The component folders of a diffusers pipeline: model_index.json's [library, class] entries
    ([null, null] is an optional part the pipeline does not have)."""
    return {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and all(value)
    }


def folder_weights(here: list[PurePosixPath], variant: str | None, read: Callable[[str], str]) -> list[PurePosixPath]:
    """One folder's weights, one copy: safetensors, else PyTorch .bin for checkpoints published
    without them. Sharded: the shards the index's weight_map names (the `variant`'s index when
    there is one), never a consolidated copy beside them (Mistral's consolidated.safetensors).
    Else the `variant` (e.g. fp16) when the folder has it, else the file the library loads by name
    (model.safetensors, diffusion_pytorch_model.safetensors), else a single-file checkpoint."""
    for suffix in (".safetensors", ".bin"):
        weights = [path for path in here if path.suffix == suffix and not fnmatch.fnmatch(path.name, "training_*")]
        if not weights:
            continue
        indexes = {
            match["variant"]: path
            for path in here
            if (match := SHARD_INDEX.fullmatch(path.name)) and match["format"] == suffix[1:]
        }
        index = indexes.get(variant) or indexes.get(None)
        if index is not None:
            weight_map: Mapping[str, str] = json.loads(read(str(index))).get("weight_map") or {}
            return [index.parent / name for name in sorted(set(weight_map.values()))]
        variants = [path for path in weights if variant and path.stem.endswith(f".{variant}")]
        library = [path for path in weights if path.stem in LIBRARY_WEIGHTS]
        plain = [path for path in weights if "." not in path.stem]
        return variants or library or plain or weights
    return []


def code_repos(config: Mapping[str, Any]) -> set[str]:
    """Other repos whose code a remote-code model runs: auto_map entries "org/repo--module.Class"
    (nomic-embed's code lives in nomic-ai/nomic-bert-2048)."""
    entries: list[Any] = list((config.get("auto_map") or {}).values())
    names = [name for entry in entries for name in (entry if isinstance(entry, list) else [entry]) if name]
    return {name.split("--", 1)[0] for name in names if "--" in name}


def download(
    repo: str,
    revision: str | None = None,
    *,
    remote_code: bool = False,
    variant: str | None = None,
    runtime_file: str | None = None,
    weights: bool = True,
    token: str | None = None,
) -> str:
    """Fetch what `repo` needs into the Hugging Face cache (remote code in other repos too) and
    return the commit it resolved to. Writes refs/<revision> so a later offline load finds it."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    info = HfApi().model_info(repo, revision=revision, token=token)

    def read(name: str) -> str:  # an index the choice of weights depends on, fetched first
        return Path(hf_hub_download(repo, name, revision=info.sha, token=token)).read_text()

    patterns = files_to_fetch(
        [file.rfilename for file in info.siblings or []],
        remote_code=remote_code,
        read=read,
        variant=variant,
        runtime_file=runtime_file,
        weights=weights,
    )
    folder = snapshot_download(repo, revision=revision, allow_patterns=patterns, token=token)
    if remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            path = Path(folder) / name
            for other in code_repos(json.loads(path.read_text())) if path.is_file() else ():
                snapshot_download(other, allow_patterns=["*.py", "*.json"], token=token)
    return str(info.sha)


def prefetch(
    *models: str | None,
    revision: str | None = None,
    variant: str | None = None,
    remote_code: bool = False,
    runtime_file: str | None = None,
) -> None:
    """At a cold start, download the models (the first with `revision` and `runtime_file`) before
    loading them, so the log tells the download from the load. Nothing to do offline, for a local
    folder, or for a model baked into the image or in Runpod's cached models."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    for index, repo in enumerate(models):
        first = index == 0
        if not repo or Path(repo).is_dir() or hub_folder(RUNPOD_HUB, repo).is_dir():
            continue
        if not local_model(repo, revision if first else None):
            download(
                repo,
                revision if first else None,
                remote_code=remote_code,
                variant=variant,
                runtime_file=runtime_file if first else None,
            )


def local_model(name: str | None, revision: str | None = None) -> str | None:
    """The folder to load `name` from without the Hub: its snapshot when it is baked into the image
    (at the recorded commit) or in Runpod's cached models. None: it comes from the Hub, or `name`
    is a path already. Load with `local_model(name) or name`."""
    return LOCAL_MODELS.folder(name, revision)


def flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def bake(environ: Mapping[str, str], fetch: Callable[..., str] = download) -> dict[str, dict[str, str]]:
    """The Dockerfile's bake step: download every model the build args name (MODEL_NAME at
    MODEL_REVISION with its BACKEND's export, and TOKENIZER_NAME, CONTROLNET_MODEL, RERANK_MODEL_NAME,
    VAE_NAME, MODEL_CONFIG's configs where the example has them) and record the commits under HF_HOME,
    for `cache_environment` and `local_model` to load them without the Hub."""
    token = environ.get("HF_TOKEN") or None
    record = {}
    for name in MODEL_VARIABLES:
        if repo := environ.get(name):
            main = name == "MODEL_NAME"
            commit = fetch(
                repo,
                (environ.get("MODEL_REVISION") or None) if main else None,
                remote_code=flag(environ.get("TRUST_REMOTE_CODE")),
                variant=environ.get("BAKE_VARIANT") or None,
                runtime_file=backend_file(environ) if main else None,
                weights=name not in CONFIG_ONLY_VARIABLES,
                token=token,
            )
            record[name] = {"repo": repo, "revision": commit}
    if record:
        hf_home = Path(default_hf_home(environ))
        hf_home.mkdir(parents=True, exist_ok=True)
        (hf_home / BAKED_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _log(message: str, level: str = "info") -> None:
    import runpod  # the SDK's logger, so these lines look like (and filter like) the worker's others

    getattr(runpod.RunPodLogger(), level)(message)


def settle(environ: MutableMapping[str, str]) -> None:
    """Apply the cache changes to this process, and log them."""
    changes = cache_environment(environ)
    environ.update(changes)
    if changes:
        _log("Hugging Face cache: " + ", ".join(f"{name}={value}" for name, value in sorted(changes.items())))


RUNPOD_HUB = Path(RUNPOD_VOLUME) / RUNPOD_MODEL_CACHE / "hub"

if __name__ == "__main__":
    if sys.argv[1:] != ["bake"]:
        raise SystemExit("usage: python hub_cache.py bake (reads MODEL_NAME, MODEL_REVISION, ... from the environment)")
    for variable, baked_model in bake(os.environ).items():
        _log(f"Baked {variable}={baked_model['repo']} at {baked_model['revision']}")
else:
    LOCAL_MODELS = LocalModels.find(os.environ)  # before settle moves HF_HOME: the image's record
    settle(os.environ)
