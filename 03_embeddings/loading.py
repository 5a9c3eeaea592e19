"""Where a model loads from, and with which runtime's options: what handler.py hands
sentence-transformers' `SentenceTransformer`, `SparseEncoder` and `CrossEncoder` at start.

The runtime is sentence-transformers' `backend`: torch (GPUs, and the reference), openvino (Intel's
CPU runtime, Dockerfile.openvino's image) or onnx. The settings arrive as arguments: this module
reads no environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Runpod's "cached models" put Hub snapshots here, on the host, before the worker starts.
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"


def cached_hub_folder(model_name: str, cache_dir: str = RUNPOD_HF_CACHE) -> str | None:
    """The Runpod model cache when it holds `model_name`, else None (the default Hugging Face cache).

    Only a cache that already has the model is used: a job never downloads into the shared volume.
    """
    snapshot = os.path.join(cache_dir, "models--" + model_name.replace("/", "--"))
    return cache_dir if os.path.isdir(snapshot) else None


def model_source(model_name: str, revision: str | None, backend: str) -> str:
    """What the model loads from. The torch backend takes the Hub id; an export backend takes the
    downloaded snapshot's folder, because for a Hub id sentence-transformers lists the repo's files
    online to find the export, which a baked image (offline) cannot."""
    if backend == "torch" or Path(model_name).is_dir():
        return model_name
    from huggingface_hub import snapshot_download

    cache = cached_hub_folder(model_name)
    return snapshot_download(model_name, revision=revision, cache_dir=cache, local_files_only=True)


def model_options(backend: str, source: str, export_file: str | None, dtype: Any, precision: str) -> dict[str, Any]:
    """from_pretrained's options: torch's `dtype`, or the export file an export backend loads
    (None: sentence-transformers looks for the plain one, and exports the model if there is none)
    and, for OpenVINO, the `precision` it computes in."""
    if backend == "torch":
        return {"dtype": dtype}
    # OpenVINO's settings: optimum-intel passes ov_config to OpenVINO when it compiles the model.
    options: dict[str, Any] = {"ov_config": {"INFERENCE_PRECISION_HINT": precision}} if backend == "openvino" else {}
    if export_file is None:
        return options
    if not (Path(source) / export_file).is_file():  # else sentence-transformers would try the Hub for it
        raise SystemExit(f"BACKEND_FILE={export_file} is not in {source}: name a file the model's repo has")
    return {**options, "file_name": export_file}


def openvino_precision(model: Any, asked: str) -> str:
    """The precision OpenVINO compiled `model` to run in ("f32", "bf16"), as the compiled model reports it."""
    compiled = getattr(getattr(model[0], "auto_model", None), "request", None)
    if compiled is None:  # a first module that is not a transformer (a Router): what was asked
        return f"{asked} asked"
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
