"""Build tiny random-weight models of the real architectures the examples serve, offline.

Every example loads its model from `MODEL_NAME`, a Hub id or a local folder. The folders this
package writes are real checkpoints of the same architectures (same config classes, tokenizers
and file layout as the Hub models), only with a hidden size of 32-64 and two layers, so each
handler runs its real code path on CPU in seconds, without network access. One module per family:
text.py (causal LMs), image.py (Stable Diffusion, its ControlNets and LoRAs), single_file.py (SD as
one LDM checkpoint), flow.py (FLUX.1, SD 3.5), embeddings.py (sentence-transformers, cross-encoder,
SPLADE), multimodal.py (CLIP, SigLIP, the VLMs); corpus.py and vocabularies.py hold what several share.

Try a handler offline with one (from the repository's root):

    python -m tests.shared.tiny_models sentence-transformer /tmp/tiny-embedder
    cd 03_embeddings && MODEL_NAME=/tmp/tiny-embedder python handler.py

The causal LM kinds (llama, mistral, mixtral, qwen3, phi3, gemma3) each come with their family's
special tokens, chat template and end-of-turn eos token, e.g.

    python -m tests.shared.tiny_models qwen3 /tmp/tiny-qwen3

The Stable Diffusion kinds (sd15, sd2, sdxl, sdxl-turbo) are whole diffusers pipelines, loaded with
`AutoPipelineForText2Image.from_pretrained(folder)`; controlnet-sd15 and controlnet-sdxl are lone
`ControlNetModel`s for those UNets, to pass as `from_pipe(pipeline, controlnet=...)`:

    python -m tests.shared.tiny_models sdxl /tmp/tiny-sdxl
    python -m tests.shared.tiny_models controlnet-sdxl /tmp/tiny-controlnet-sdxl

The vision-language kinds take any image, resized to 32 px: clip (CLIPModel + CLIPProcessor, for
zero-shot labels and image/text embeddings), llava (LLaVA 1.5, Llama) and llava-next (LLaVA-NeXT,
Mistral, anyres tiles), both with a chat template that takes OpenAI-style image and text parts, and
blip2 (BLIP-2 with OPT, for captions and "Question: ... Answer:" prompts). They load with
`AutoProcessor` and `CLIPModel` or `AutoModelForImageTextToText`:

    python -m tests.shared.tiny_models llava /tmp/tiny-llava

Weights are seeded: the same kind always gives the same weights. Two things still differ from one
process to the next: the WordPiece vocabularies (sentence-transformer, cross-encoder, splade,
remote-code-sentence-transformer: the `tokenizers` trainer orders equally frequent pieces by a
hash seeded per process) and qwen3-vllm-lora's adapter_config.json (the temporary base folder, the
target modules' order). The test suite takes each kind from `cached` (cache.py): one build on disk,
shared by every session until this package's code or the libraries that write the files change.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.shared.tiny_models.cache import cache_key, cache_root, cached, listing
from tests.shared.tiny_models.corpus import CORPUS, SEED
from tests.shared.tiny_models.embeddings import (
    build_cross_encoder,
    build_remote_code_sentence_transformer,
    build_sentence_transformer,
    build_splade,
)
from tests.shared.tiny_models.flow import FLOW_PIPELINES, build_flow_controlnet, build_flux_lora
from tests.shared.tiny_models.image import DIFFUSION, build_controlnet, build_lora, build_stable_diffusion
from tests.shared.tiny_models.multimodal import (
    LLAVA,
    build_blip2,
    build_clip,
    build_gemma3_vlm,
    build_idefics3,
    build_llava,
    build_llava_onevision,
    build_qwen_vl,
    build_siglip,
)
from tests.shared.tiny_models.single_file import build_single_file
from tests.shared.tiny_models.text import (
    FAMILIES,
    build_causal_lm,
    build_lora_adapter,
    build_qwen3_generation_defaults,
    build_qwen3_vllm,
)

__all__ = ["BUILDERS", "CORPUS", "SEED", "build", "cache_key", "cache_root", "cached", "listing"]

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sentence-transformer": build_sentence_transformer,
    "cross-encoder": build_cross_encoder,
    **{kind: partial(build_causal_lm, kind=kind) for kind in FAMILIES},
    "qwen3-generation-defaults": build_qwen3_generation_defaults,
    "qwen3-vllm": build_qwen3_vllm,
    "qwen3-vllm-lora": build_lora_adapter,
    **{kind: partial(build_stable_diffusion, kind=kind) for kind in DIFFUSION},
    "controlnet-sd15": partial(build_controlnet, base="sd15"),
    "controlnet-sdxl": partial(build_controlnet, base="sdxl"),
    "lora-sd15-a": partial(build_lora, base="sd15", seed=1),
    "lora-sd15-b": partial(build_lora, base="sd15", seed=2),
    "lora-sdxl": partial(build_lora, base="sdxl", seed=3),
    "sd15-single-file": build_single_file,
    "flux-schnell": FLOW_PIPELINES["flux-schnell"],
    "flux-dev": FLOW_PIPELINES["flux-dev"],
    "sd3.5-large": FLOW_PIPELINES["sd3.5-large"],
    "controlnet-flux-schnell": partial(build_flow_controlnet, base="flux-schnell"),
    "lora-flux-schnell": build_flux_lora,
    "controlnet-sd3.5-large": partial(build_flow_controlnet, base="sd3.5-large"),
    "sd3.5-medium": FLOW_PIPELINES["sd3.5-medium"],
    "clip": build_clip,
    **{kind: partial(build_llava, kind=kind) for kind in LLAVA},
    "blip2": build_blip2,
    "siglip": partial(build_siglip, version=1),
    "siglip2": partial(build_siglip, version=2),
    "qwen2-vl": partial(build_qwen_vl, version="2"),
    "qwen2.5-vl": partial(build_qwen_vl, version="2.5"),
    "gemma3-vlm": build_gemma3_vlm,
    "idefics3": partial(build_idefics3, kind="idefics3"),
    "smolvlm": partial(build_idefics3, kind="smolvlm"),
    "llava-onevision": build_llava_onevision,
    "remote-code-sentence-transformer": build_remote_code_sentence_transformer,
    "splade": build_splade,
}


def build(kind: str, out: str | Path) -> Path:
    """Build the tiny model `kind` into the folder `out` and return the folder."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(BUILDERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return BUILDERS[kind](out)
