"""02_image_generation under hostile and heavy traffic, on a tiny SD 1.5 with a tiny ControlNet.

Fuzzed requests, 200 concurrent jobs, a soak, secrets and prompts kept out of the logs of
`python handler.py` (with a real S3 server for uploads), and a burst through the real dev server.
"""

from __future__ import annotations

import json
import secrets
import time
from types import ModuleType
from typing import Any

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.shared.harness import DevServer, json_lines, load_handler, run_job, run_local
from tests.shared.images import decode, png_data_uri
from tests.shared.reliability import (
    FUZZ,
    JUNK,
    ConcurrencyCounter,
    answer,
    assert_clean,
    assert_no_leaks,
    burst,
    dev_server_error,
    distinctive_prompt,
    job_inputs,
    load_mix,
    mutated,
    not_costly_int,
    payload_fingerprint,
    quiet_logs,
    report_load,
    run_load,
    secret_env,
    secret_values,
    soak,
    weighted,
)
from tests.shared.servers import s3_server

EXAMPLE = "02_image_generation"
MAX_CONCURRENCY = 2
# Only 64x64 fits the pixel budget, so every image the fuzz can get generated is tiny.
ENV = {
    "MAX_PIXELS": str(64 * 64),
    "MAX_IMAGES": "2",
    "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "DOWNLOAD_TIMEOUT_S": "2",
    "MAX_GENERATION_SECONDS": "60",
}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 1}
SCHEDULERS = ["default", "ddim", "pndm", "lms", "euler", "euler-a", "heun", "dpm++2m", "dpm++2m-karras", "unipc"]
TINY_PNG = png_data_uri(16, 16, seed=1)
NOISE = png_data_uri(64, 64, seed=2)
JPEG = png_data_uri(40, 24, seed=3, image_format="JPEG")
WIDE = png_data_uri(32, 8, seed=4)  # its size follows the aspect ratio, within the pixel budget
PRIVATE_URL = "http://127.0.0.1:9/x.png"


@pytest.fixture(scope="module")
def env(tiny_model) -> dict[str, str]:
    return {"MODEL_NAME": str(tiny_model("sd15")), "CONTROLNET_MODEL": str(tiny_model("controlnet-sd15")), **ENV}


@pytest.fixture(scope="module")
def worker(env: dict[str, str]) -> ModuleType:
    return load_handler(EXAMPLE, env)


@pytest.fixture(scope="module")
def canary(worker: ModuleType) -> Any:
    """A fixed seeded job and its images on the fresh worker; calling it proves the worker still
    gives exactly those images."""
    job = {"prompt": "a lighthouse", "seed": 1, **SMALL}
    expected = image_answer(run_job(worker.handler, job))
    assert "output" in expected, expected

    def check() -> None:
        assert image_answer(run_job(worker.handler, job)) == expected, (
            "the worker no longer serves a valid job correctly"
        )

    return check


def image_answer(result: dict[str, Any]) -> Any:
    """What a caller compares: the error, or the final chunk. Which progress steps get sent depends
    on timing (a step overtaken by a newer one before it was sent is dropped), so progress is only
    checked to be progress."""
    if "error" in result:
        return answer(result)
    *progress, final = result["output"]
    assert all(chunk.get("status") == "progress" for chunk in progress), progress
    return answer({"output": [final]})


# ---- fuzzing ----------------------------------------------------------------------------------

PROMPT = weighted((4, st.text(min_size=1, max_size=60)), (1, st.sampled_from(["a lighthouse " * 150, "x" * 2000])))
SOURCES = weighted(
    (4, st.sampled_from([TINY_PNG, TINY_PNG.split(",", 1)[1], JPEG, WIDE])),  # data URIs and bare base64
    (
        1,
        st.sampled_from(
            [
                PRIVATE_URL,  # refused before any connection: only public addresses are fetched
                "http://169.254.169.254/latest/meta-data",
                "ftp://example.com/x.png",
                "data:text/plain;base64,aGk=",
                "data:image/png;base64,",
                "data:image/png;base64,%%%",
                "aGVsbG8gd29ybGQ=",
            ]
        ),
    ),
    (1, st.text(max_size=30)),
)
SIDE = st.sampled_from([64, 64, 64, 64, 64, None])  # None: the family default, 512, over budget
STEPS = st.integers(1, 2)
COMMON = {
    "negative_prompt": st.none() | st.text(max_size=40),
    "guidance_scale": st.floats(0, 30),
    "seed": st.integers(0, 2**63 - 3),
    "num_images": st.integers(1, 2),
    "scheduler": st.sampled_from(SCHEDULERS),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    "output_quality": st.integers(1, 100),
}
# Junk never holds a small int a worker would accept and spend on (steps, images, sizes).
CHEAP_JUNK = JUNK.filter(not_costly_int(2))
TEXT_TO_IMAGE = mutated(
    {"prompt": PROMPT, "width": SIDE, "height": SIDE, "num_inference_steps": STEPS}, COMMON, junk=CHEAP_JUNK
)
IMAGE_TO_IMAGE = mutated(
    {"prompt": PROMPT, "image": SOURCES, "num_inference_steps": st.just(2)},  # 2 x strength: one step to run
    {**COMMON, "strength": st.floats(0.5, 1), "width": SIDE, "height": SIDE},
    junk=CHEAP_JUNK,
)
CONTROLNET = mutated(
    {"prompt": PROMPT, "control_image": SOURCES, "num_inference_steps": STEPS, "width": SIDE, "height": SIDE},
    {
        **COMMON,
        "canny": st.booleans(),
        "canny_low_threshold": st.integers(0, 255),
        "canny_high_threshold": st.integers(0, 255),
        "controlnet_conditioning_scale": st.floats(0, 2),
    },
    junk=CHEAP_JUNK,
)
REQUESTS = job_inputs(weighted((3, TEXT_TO_IMAGE), (2, IMAGE_TO_IMAGE), (2, CONTROLNET)), junk=CHEAP_JUNK)


def check_output(output: list[dict[str, Any]]) -> None:
    """Progress chunks count up to their total; the images are as many, as big and in the format
    the parameters say, and never over the pixel budget."""
    *progress, final = output
    steps = [chunk["step"] for chunk in progress]  # a step overtaken before it was sent is dropped
    assert steps == sorted(set(steps)) and all(1 <= c["step"] <= c["total"] for c in progress)
    used = final["parameters"]
    assert len(final["images"]) == used["num_images"] and used["width"] * used["height"] <= 64 * 64
    for image in final["images"]:
        assert image["image"].startswith(f"data:image/{used['output_format']};base64,")
        assert decode(image["image"]).size == (used["width"], used["height"])


def test_fuzzed_requests_get_a_result_or_a_clear_error(worker: ModuleType, canary: Any) -> None:
    """Any JSON in any field (text-to-image, image-to-image, ControlNet), fields missing or unknown,
    junk and private-URL images, wrong nesting: every job ends with images or a clear error (no
    escaped exception, no traceback), and the worker serves on."""
    served = refused = 0

    @FUZZ
    @given(job_input=REQUESTS)
    def one_request(job_input: Any) -> None:
        nonlocal served, refused
        result = run_job(worker.handler, job_input)
        if assert_clean(result, job_input) is None:
            served += 1
            check_output(result["output"])
        else:
            refused += 1
        canary()

    with quiet_logs():
        one_request()
    print(f"\n[fuzz] {EXAMPLE}: {served} requests served, {refused} refused")
    assert served and refused, "the fuzz should both serve and refuse requests"


# ---- bugs the fuzzing found (precise reproducers) ---------------------------------------------


@pytest.mark.parametrize("strength", [5e-324, 1e-7])
def test_a_tiny_strength_without_steps_is_refused_or_bounded(worker: ModuleType, strength: float) -> None:
    """Image-to-image with no num_inference_steps runs max(family steps, ceil(1 / strength)) steps of
    schedule: a strength the schema accepts must never ask for more than MAX_STEPS (nor overflow)."""
    job_input = {"prompt": "x", "image": TINY_PNG, "strength": strength}
    result = run_job(worker.handler, job_input)
    if assert_clean(result, job_input) is None:
        assert result["output"][-1]["parameters"]["num_inference_steps"] <= worker.MAX_STEPS


def test_concurrent_jobs_never_share_a_tokenizers_padding(worker: ModuleType, monkeypatch) -> None:
    """With MAX_CONCURRENCY > 1, denoising runs encode their prompts on different threads. A fast
    tokenizer keeps its padding and truncation settings on the object, set on each call before it
    encodes: threads sharing one get each other's padding (prompt embeddings of the wrong length: a
    failed job, or another image for the same seed). A pause after each setting makes every overlap
    of two encodings a collision, so the run is the same every time."""
    tokenizer_class = type(worker.TEXT2IMAGE.tokenizer)
    set_padding = tokenizer_class.set_truncation_and_padding

    def slow_set_padding(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = set_padding(self, *args, **kwargs)
        time.sleep(0.005)
        return result

    jobs = [{"prompt": f"a tree number {index}", "seed": index, **SMALL} for index in range(6)]
    with quiet_logs():
        alone = [image_answer(run_job(worker.handler, job)) for job in jobs]
        monkeypatch.setattr(tokenizer_class, "set_truncation_and_padding", slow_set_padding)
        together = run_load(worker.handler, jobs)
    assert [image_answer(result) for result in together.results] == alone


# ---- load ---------------------------------------------------------------------------------------

VALID = [
    {"prompt": "a tree", "seed": 1, **SMALL},
    {"prompt": "a house", "seed": 2, "scheduler": "euler-a", **SMALL, "num_inference_steps": 2},
    {"prompt": "a river", "seed": 3, "num_images": 2, **SMALL},
    {"prompt": "a boat", "seed": 4, "image": NOISE, "strength": 1.0, "num_inference_steps": 1},
    {"prompt": "edges", "seed": 5, "control_image": NOISE, "canny": True, **SMALL},
    {"prompt": "a jpeg", "seed": 6, "output_format": "jpeg", "output_quality": 50, **SMALL},
]
INVALID = [
    {"prompt": "x", "width": 128, "height": 128},
    {"prompt": "x", "image": PRIVATE_URL, **SMALL},
    {"prompt": "x", "num_images": 3, **SMALL},
    {"prompt": "", **SMALL},
    {"prompt": "x", "image": "%%% not base64 %%%", **SMALL},
    "just a string",
]


def test_200_concurrent_mixed_jobs_match_their_solo_runs(worker: ModuleType, monkeypatch) -> None:
    """200 jobs at once, valid and invalid interleaved: every one answered as when run alone (the
    same progress, and bit-for-bit the same images for the same seeds, so the same pixels; each error
    the same), with at most MAX_CONCURRENCY denoising runs at a time."""
    assert worker.WORKER_CONFIG["concurrency_modifier"](1) == worker.MAX_CONCURRENCY == MAX_CONCURRENCY
    assert worker.PIPELINE_THREADS._max_workers == MAX_CONCURRENCY
    specs = VALID + INVALID
    with quiet_logs():
        alone = [image_answer(run_job(worker.handler, spec)) for spec in specs]
        assert all("output" in a for a in alone[: len(VALID)]) and all("error" in a for a in alone[len(VALID) :])
        counter = ConcurrencyCounter()
        monkeypatch.setattr(worker, "denoise", counter.wrap(worker.denoise))
        inputs = load_mix(specs, 200)
        run = run_load(worker.handler, inputs)
    for index, result in enumerate(run.results):
        assert_clean(result)
        assert image_answer(result) == alone[index % len(specs)], f"job {index}: {str(inputs[index])[:200]}"
    valid = sum(1 for index in range(200) if index % len(specs) < len(VALID))
    report_load(EXAMPLE, run, valid, MAX_CONCURRENCY, counter.peak)
    assert counter.calls == valid
    assert 1 < counter.peak <= MAX_CONCURRENCY, f"peak of {counter.peak} concurrent denoising runs"


# ---- soak ---------------------------------------------------------------------------------------

SOAK_JOBS = 500  # each denoises a 64x64 image in 1 step and encodes it: ~30 ms on 2 CPU cores


def test_sequential_jobs_leak_no_memory_threads_or_files(worker: ModuleType) -> None:
    """After a warm-up, 500 jobs (64x64, 1 step) one after another: every answer the same as the
    first time, resident memory grows under 10%, threads and open files come back to their count."""
    specs = [VALID[0], VALID[3], VALID[5], INVALID[1], VALID[4], INVALID[0]]
    with quiet_logs():
        expected = [image_answer(run_job(worker.handler, spec)) for spec in specs]

        def check(index: int, result: dict[str, Any]) -> None:
            assert image_answer(result) == expected[index % len(specs)], index

        run = soak(worker.handler, specs, check, jobs=SOAK_JOBS)
    run.report(EXAMPLE)
    run.assert_steady()


# ---- secrets and prompts in logs ------------------------------------------------------------------


def test_python_handler_py_keeps_secrets_prompts_and_images_out_of_the_logs(env: dict[str, str]) -> None:
    """`python handler.py` at INFO, uploading to a real S3 server (moto), with HF_TOKEN, RUNPOD_API_KEY
    and the bucket's secret key set: no secret anywhere in its output (presigned URLs carry only the
    access key id), and neither the prompt nor the input image's base64 in any log line. The prompt
    is over CLIP's 77 tokens: the part cut off stays out of the logs too (transformers' truncation
    warning would print it)."""
    image = png_data_uri(64, 64, seed=secrets.randbelow(10**6))
    tail = f"tailword{secrets.token_hex(4)}"
    prompt = distinctive_prompt() + " a lighthouse" * 60 + " " + tail
    with s3_server() as endpoint:
        run_env = {
            **env,
            **secret_env(),
            "BUCKET_ENDPOINT_URL": endpoint,
            "BUCKET_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "BUCKET_NAME": "outputs",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=run_env["BUCKET_ACCESS_KEY_ID"],
            aws_secret_access_key=run_env["BUCKET_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="outputs")
        job = {"input": {"prompt": prompt, "image": image, "strength": 0.5, "num_inference_steps": 2, "seed": 1}}
        run = run_local(EXAMPLE, run_env, "--test_input", json.dumps(job))
        stored = s3.list_objects_v2(Bucket="outputs").get("Contents", [])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [url] = [item["image"] for item in json_lines(run.stdout)[-1]["images"]]
    assert url.startswith(f"{endpoint}/outputs/local_test/") and len(stored) == 1
    assert_no_leaks(run.stdout + run.stderr, secret_values(run_env), [prompt, tail, payload_fingerprint(image)])


# ---- the real dev server ------------------------------------------------------------------------


def test_dev_server_answers_a_concurrent_burst_without_a_500(worker: ModuleType, env: dict[str, str]) -> None:
    """16 concurrent /runsync requests, valid and invalid, through `python handler.py --rp_serve_api`:
    no HTTP 500; valid ones COMPLETED with the same images (size and seed included) as in-process,
    invalid ones with their error."""
    bodies = load_mix(VALID[:4] + INVALID[:4], 16)
    with quiet_logs():
        expected = [image_answer(run_job(worker.handler, body)) for body in bodies]
    server_env = {**env, **secret_env()}
    with DevServer(EXAMPLE, server_env) as server:
        responses = burst(server, [{"input": body} for body in bodies])
        logs = server.stop()
    assert [response.status_code for response in responses] == [200] * len(bodies), logs[-3000:]
    for body, response, want in zip(bodies, responses, expected, strict=True):
        got = response.json()
        if "error" in want:
            assert dev_server_error(got) == want["error"], got
        else:
            assert got["status"] == "COMPLETED" and dev_server_error(got) is None, str(got)[:500]
            assert image_answer({"output": got["output"]}) == want, body
            first = got["output"][-1]["images"][0]
            assert first["seed"] == body["seed"]
            assert decode(first["image"]).size == (body.get("width", 64), body.get("height", 64))
    assert_no_leaks(logs, secret_values(server_env), [])
