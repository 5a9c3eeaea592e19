"""CLIP and SigLIP: images and texts embedded in one space, and zero-shot scores from them.

Both families encode an image and a text into unit vectors whose dot product says how well they
match. They differ in how that similarity becomes a probability, because they were trained
differently:

  CLIP    a softmax over the labels of a request (contrastive loss over a batch): the scores sum
          to 1 and say which label fits best *among these*;
  SigLIP  a sigmoid of each label on its own (pairwise sigmoid loss): every label gets an
          independent yes/no probability, so "none of these" is visible, and SigLIP's texts are
          padded to the fixed length it was trained with (`padding="max_length"`).

`ContrastiveModel` holds one of them and exposes the three steps the batcher (clip_batcher.py)
schedules: preprocess images (per job, off the model thread), encode image and text batches (on
the model thread), and score one image against its labels (cheap, per job).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

# model_type in config.json → scoring family. SigLIP 2 (siglip2) takes any aspect ratio (NaFlex:
# its image processor also returns a patch mask and the patch grid), scored like SigLIP.
CONTRASTIVE_FAMILIES = {"clip": "clip", "siglip": "siglip", "siglip2": "siglip"}


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length 1 (float32 on the CPU), so cosine similarity is a dot product."""
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


@dataclass
class ContrastiveModel:
    model: Any  # CLIPModel, SiglipModel or Siglip2Model
    processor: Any
    family: str  # "clip" or "siglip"

    def __post_init__(self) -> None:
        text_config = self.model.config.text_config
        self.max_text_tokens = int(text_config.max_position_embeddings)  # 77 for CLIP, 64 for SigLIP
        self.dimensions = int(getattr(self.model.config, "projection_dim", None) or text_config.hidden_size)
        self.device = next(self.model.parameters()).device
        # SigLIP was trained on texts padded to its full length; CLIP on unpadded ones (its causal
        # mask and end-of-text pooling make padding irrelevant to it).
        padding: dict[str, Any] = {"padding": "max_length"} if self.family == "siglip" else {"padding": True}
        self.text_kwargs = {**padding, "truncation": True, "max_length": self.max_text_tokens, "return_tensors": "pt"}
        # A fast tokenizer keeps its padding and truncation settings in shared state that each call
        # rewrites: counting (no truncation) on another thread while the model thread encodes
        # (truncation, padding) made a concurrent job's batch come out unpadded. Each thread gets
        # its own tokenizer.
        self.counting_tokenizer = copy.deepcopy(self.processor.tokenizer)

    # ---- per job, off the model thread ----------------------------------------------------------
    def preprocess_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The image processor's tensors for these images (pixel_values; for SigLIP 2 also the
        patch mask and grid); rows of several jobs' tensors concatenate into one batch."""
        return dict(self.processor.image_processor(images=images, return_tensors="pt"))

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text before truncation, special tokens included: over max_text_tokens is cut.
        Called on one counting thread (contrastive_tasks.py), with a tokenizer of its own."""
        if not texts:
            return []
        encoded = self.counting_tokenizer(texts, add_special_tokens=True, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    # ---- on the model thread --------------------------------------------------------------------
    def encode_images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {
            name: value.to(self.device, dtype=self.model.dtype) if name == "pixel_values" else value.to(self.device)
            for name, value in pixels.items()
        }
        with torch.inference_mode():
            return unit_rows(self.model.get_image_features(**inputs).pooler_output)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(texts, **self.text_kwargs).to(self.device)
        with torch.inference_mode():
            return unit_rows(self.model.get_text_features(**tokens).pooler_output)

    # ---- per job --------------------------------------------------------------------------------
    def probabilities(self, image: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One image's (unit vector) scores against each label's caption (unit rows), as the model's
        own forward computes them: scaled cosine similarity, then softmax (CLIP) or sigmoid (SigLIP)."""
        scale = self.model.logit_scale.detach().float().exp().cpu()
        logits = labels @ image * scale
        if self.family == "siglip":
            return torch.sigmoid(logits + self.model.logit_bias.detach().float().cpu()).tolist()
        return torch.softmax(logits, dim=-1).tolist()
