"""The modules copied into several examples (each example folder is its own Docker build context,
so a module several of them need is copied, byte for byte): each copied module, the exact set of
folders that have it, every copy identical, and no stray copy anywhere else."""

from __future__ import annotations

import pytest

from tests.shared.harness import EXAMPLES, REPO

TEXT = ("01_text_generation", "04_multimodal")
STREAMING = ("01_text_generation", "02_image_generation", "04_multimodal")
# module -> the examples that must carry an identical copy of it (and no other example may).
COPIED = {
    "hub_cache.py": EXAMPLES,  # where the Hugging Face cache lives, what a model loads, the bake step
    "device.py": EXAMPLES,  # the CUDA contract: DEVICE, or the worker stops before its first job
    "cold_start.py": EXAMPLES,  # the cold start's seconds, per phase
    "errors.py": EXAMPLES,  # the error contract: request errors, out of memory, a lost GPU, other failures
    "local_run.py": EXAMPLES,  # `python handler.py` prints a job's real output
    "settings.py": EXAMPLES,  # an endpoint setting read from its environment variable
    "coalesce.py": STREAMING,  # streaming at the network's pace
    "images.py": ("02_image_generation", "04_multimodal"),  # images in and out
    "textstream.py": TEXT,  # streamed generation with transformers
    "structured_output.py": TEXT,  # llguidance grammars and their logits processor
    "response_shapes.py": TEXT,  # deltas into native chunks and OpenAI objects
    # the OpenAI routes over local HTTP (`python openai_endpoint.py`): the examples with OpenAI routes
    "openai_endpoint.py": ("01_text_generation", "03_embeddings", "04_multimodal"),
    # OpenAI's token-id inputs (cl100k_base) to /v1/embeddings: the examples with that route
    "token_ids.py": ("03_embeddings", "04_multimodal"),
}


@pytest.mark.parametrize(("module", "examples"), COPIED.items(), ids=list(COPIED))
def test_each_copied_module_is_in_exactly_its_examples_and_identical(module: str, examples: tuple[str, ...]) -> None:
    having = tuple(example for example in EXAMPLES if (REPO / example / module).is_file())
    assert having == tuple(examples), f"{module} is in {having}, expected exactly {examples}"
    copies = {example: (REPO / example / module).read_bytes() for example in having}
    differing = [example for example, data in copies.items() if data != copies[examples[0]]]
    assert not differing, f"{module}: the copies in {differing} differ from {examples[0]}'s"


def test_every_module_found_in_two_examples_is_a_declared_copy() -> None:
    """A module name in several examples that is not in COPIED: a copy nobody checks, or two
    different modules under one name (harder to tell apart in the docs and the tests)."""
    seen: dict[str, list[str]] = {}
    for example in EXAMPLES:
        for path in (REPO / example).glob("*.py"):
            seen.setdefault(path.name, []).append(example)
    shared = {name for name, examples in seen.items() if len(examples) > 1}
    # Per-example modules that share a name on purpose: each example's own handler, request schema,
    # plan and engine (different code under the one name the tour uses).
    own = {"handler.py", "schema.py", "planning.py", "engines.py", "families.py"}
    assert shared - own <= set(COPIED), (
        f"modules in several examples but not declared copies: {shared - own - set(COPIED)}"
    )
