"""The embedding model run on one batch of texts: what it reads, and what comes out.

handler.py tokenizes each request once (`tokenize_within`), hands every text to the batcher
(`Encoder.batcher`, batcher.py) as a `ToEncode`, and the batcher calls `Encoder.encode` with a
batch on the single thread that owns the model. The model's modules run here one by one, all but
a final `Normalize`: the response step normalises per request instead, so `normalize: false` gets
the model's raw vectors.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import runpod
import torch
from sentence_transformers.base.modules import Normalize, Router, Transformer
from sentence_transformers.util import batch_to_device

from batcher import PaddingBound, TokenBudgetBatcher
from errors import RequestError
from sparse import SparseVector, active_terms

log = runpod.RunPodLogger()

# How much padding a batch may carry on a CPU (batcher.PaddingBound). There a forward pass costs
# about its padded tokens plus a fixed part, the weights read once: all-MiniLM-L6-v2 on one core of
# the AMX Xeon, 10.5 ms a pass and 0.175 ms a padded token, so the fixed part is worth 60 tokens.
# One-line queries of 7 to 33 tokens, taken as they arrive (64 jobs in flight, 32 texts a batch),
# were padded to 2.2x their own tokens, and the worker trailed Infinity there; with at most 1.5x
# plus 128 tokens, 4.2 -> 3.7 ms of CPU per text, 0.90x -> 0.99x of Infinity (README: Benchmarks).
# The slack is two passes' fixed part: with one (64) batches of 8 texts were split, a far longer
# one left to a pass of its own, and cost 20 % more. A GPU is left unbounded: its fixed part
# (kernel launches) is worth thousands of short tokens, and its batches are not measured here.
CPU_PADDING = PaddingBound(ratio=1.5, slack=128)


@dataclass
class Tokenized:
    """One request's texts, tokenised once: what the model reads, and what it was asked to read."""

    encodings: list[dict[str, list[int]]]  # per text: input_ids etc., cut to the model's window
    counts: list[int]  # tokens per text before the cut, prompt and special tokens included


@dataclass(frozen=True)
class Cut:
    """What happens to a text longer than the model reads (TEI's `truncate` and `truncation_direction`)."""

    side: str = "right"  # "right" keeps the start (sentence-transformers' way); "left" keeps the end
    refuse: str | None = None  # with `truncate: false`, the field to name in the error instead of cutting


CUT_RIGHT = Cut()  # the default, as sentence-transformers cuts: a long text keeps its start


def tokenize_within(texts: list[str], prompt: str, tokenizer: Any, max_length: int, cut: Cut = CUT_RIGHT) -> Tokenized:
    """The model's own tokenizer over `prompt + text`, as sentence-transformers does it; texts past
    `max_length` are cut there (keeping the special tokens), at the end or, with `cut.side` "left",
    at the start of the text (the prompt stays), or refused with `cut.refuse`. `tokenizer` is the
    calling thread's own copy (a fast tokenizer's settings are state each call rewrites)."""
    prompted = [prompt + text for text in texts]
    encodings = whole_encodings(prompted, tokenizer)
    counts = [len(encoding["input_ids"]) for encoding in encodings]
    if long := [i for i, count in enumerate(counts) if count > max_length]:
        if cut.refuse is not None:
            raise RequestError(
                f"{cut.refuse}.{long[0]}: {counts[long[0]]} tokens, more than the {max_length} this model reads "
                "(its max_seq_length), and truncate is false: shorten it, or send truncate: true to cut it"
            )
        if cut.side == "left":
            prompted = {i: prompt + without_first_tokens(texts[i], counts[i] - max_length, tokenizer) for i in long}
        cut_ids = tokenizer([prompted[i] for i in long], truncation=True, max_length=max_length, verbose=False)
        for row, i in enumerate(long):
            encodings[i] = {key: values[row] for key, values in cut_ids.items()}
    return Tokenized(encodings, counts)


def whole_encodings(texts: list[str], tokenizer: Any) -> list[dict[str, list[int]]]:
    """What `tokenizer(texts)` gives (special tokens added, nothing cut or padded), one dict per text.

    A fast tokenizer's Rust backend is called directly, with the settings transformers' own call
    would give it: that call costs 35 µs more for a one-line query (62 -> 29 µs on the AMX Xeon),
    a tenth of such a job's work on the event loop, where it competes with the model for the CPU
    (README: Side by side with Infinity). The cut below leaves truncation on, so it is reset here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        full = tokenizer(texts, add_special_tokens=True, verbose=False)
        return [{key: values[i] for key, values in full.items()} for i in range(len(texts))]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    if backend.encode_special_tokens != tokenizer.split_special_tokens:
        backend.encode_special_tokens = tokenizer.split_special_tokens
    type_ids, mask = "token_type_ids" in tokenizer.model_input_names, "attention_mask" in tokenizer.model_input_names
    encodings = []
    for encoding in backend.encode_batch(texts, add_special_tokens=True):
        fields = {"input_ids": encoding.ids}
        if type_ids:
            fields["token_type_ids"] = encoding.type_ids
        if mask:
            fields["attention_mask"] = encoding.attention_mask
        encodings.append(fields)
    return encodings


def without_first_tokens(text: str, excess: int, tokenizer: Any) -> str:
    """`text` from its `excess`-th token on (as the tokenizer splits the text alone), cut where that
    token starts, so what remains tokenizes as the text's last tokens. Where the prompt's tokens
    join the text's differently, the right cut that follows trims the one token left over."""
    alone = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = alone["offset_mapping"]
    return text[offsets[min(excess, len(offsets) - 1)][0] :]


@dataclass(frozen=True)
class ToEncode:
    """One text as the batcher carries it: its token ids, or for the preprocess path its text."""

    encoding: dict[str, list[int]]
    text: str
    prompt: str
    task: str | None


def release_memory(error: BaseException) -> None:
    """Before a failed batch is split and retried: give the GPU memory back, log the cause (no texts)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    log.warn(f"A batch failed ({type(error).__name__}); retrying its texts in smaller batches")


class Encoder:
    """A loaded sentence-transformers model (dense, or sparse: a SparseEncoder), one batch at a time."""

    def __init__(self, model: Any, sparse: bool) -> None:
        self.model, self.sparse = model, sparse
        # The modules a batch runs through: all but a final Normalize (applied per request instead).
        modules = list(model.children())
        self.raw_modules = modules[:-1] if isinstance(modules[-1], Normalize) else modules
        # False when a Normalize sits inside the model: then no request can have raw vectors.
        self.raw_vectors = not any(isinstance(module, Normalize) for module in self.raw_modules)
        # Plain text transformers (nearly every embedding model) take the token ids made once per
        # request, off the model thread. Others (routers, prompt-excluding pooling, query expansion)
        # are preprocessed by sentence-transformers itself on the model thread, per batch of one prompt.
        self.token_ids_path = (
            isinstance(modules[0], Transformer)
            and set(modules[0].modality_config) == {"text"}
            and getattr(modules[0], "query_expansion", None) is None
            and all(getattr(module, "include_prompt", True) for module in modules)
        )

    def group(self, prompt: str, task: str | None) -> tuple[str, str | None] | None:
        """What texts must share to share a batch: nothing on the token-ids path, else prompt and task."""
        return None if self.token_ids_path else (prompt, task)

    def features(self, batch: list[ToEncode]) -> dict[str, Any]:
        """The model's input for a batch: token ids padded to the longest, or sentence-transformers'
        own preprocessing (every item of such a batch shares its prompt and task: see `group`)."""
        model = self.model
        if self.token_ids_path:
            features = dict(model.tokenizer.pad([item.encoding for item in batch], padding=True, return_tensors="pt"))
            return {**batch_to_device(features, model.device), "modality": "text"}
        first = batch[0]
        features = model.preprocess([item.text for item in batch], prompt=first.prompt or None, task=first.task)
        return batch_to_device(features, model.device)

    def encode(self, batch: list[ToEncode]) -> list[np.ndarray] | list[SparseVector]:
        """One forward pass on the model thread: raw float32 vectors, one per text (no final
        Normalize); for a sparse model each text's active terms, so only those leave the model thread."""
        features = self.features(batch)
        task = batch[0].task
        with torch.inference_mode():
            for module in self.raw_modules:
                features = module(features, task=task) if isinstance(module, Router) else module(features)
        if self.sparse:
            return active_terms(features["sentence_embedding"])
        return list(features["sentence_embedding"].float().cpu().numpy())

    def batcher(self, executor: Executor, max_tokens: int, max_texts: int) -> TokenBudgetBatcher:
        """Batches of at most `max_tokens` padded tokens and `max_texts` texts (on a CPU, with no
        more padding than CPU_PADDING), encoded on `executor` (the model's one thread). A batch
        that fails is split and retried, down to single texts, so only a text that cannot fit
        fails its job; a lost GPU context fails every text at once: splitting cannot bring it back."""
        return TokenBudgetBatcher(
            self.encode,
            executor,
            max_tokens,
            max_texts,
            fatal=(torch.AcceleratorError,),
            on_error=release_memory,
            padding=CPU_PADDING if self.model.device.type == "cpu" else None,
        )
