"""Structured output: llguidance grammars (a JSON schema, any JSON object, a regex, a choice, a
Lark grammar) and the logits processor that enforces one on `model.generate`.

Copied, identical, into every example that generates text (each folder is its own Docker context);
tests/copied_modules/test_copies.py checks that the copies match.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# llguidance compiles a tokenizer's vocabulary once (about a second for a 150k-token vocabulary);
# it is kept per tokenizer object for the worker's life.
_GRAMMAR_TOKENIZERS: dict[int, tuple[Any, Any]] = {}
_GRAMMAR_TOKENIZERS_LOCK = threading.Lock()
# No whitespace between JSON tokens: with flexible whitespace a model (a small or random one
# especially) can emit spaces until max_tokens and never close the object.
COMPACT_JSON = {"whitespace_flexible": False}


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """The llguidance view of a Hugging Face fast tokenizer, built once and cached."""
    import llguidance.hf

    with _GRAMMAR_TOKENIZERS_LOCK:
        cached = _GRAMMAR_TOKENIZERS.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
            cached = _GRAMMAR_TOKENIZERS[id(tokenizer)] = (tokenizer, built)
        return cached[1]


def json_schema_grammar(schema: Mapping[str, Any] | None) -> str:
    """An llguidance grammar for JSON that matches `schema`; None: any JSON object (OpenAI's
    json_object). Compact whitespace (COMPACT_JSON). Check it with `grammar_error` before use."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        dict(schema) if schema is not None else {"type": "object"}, overrides=COMPACT_JSON
    )


def grammar_from(kind: str, text: str) -> str:
    """An llguidance grammar from a regex, a JSON list of choices, or a Lark/GBNF grammar
    (vLLM's structured_outputs.regex / choice / grammar)."""
    import llguidance

    return llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[kind], text)


def grammar_error(grammar: str, tokenizer: Any) -> str:
    """'' when llguidance accepts `grammar` for this tokenizer, else its one-line reason."""
    import llguidance

    try:
        return llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except ValueError as error:
        return str(error)


class GrammarConstraint:
    """A transformers logits processor that leaves only the tokens `grammar` allows (llguidance).

    One matcher per choice: each consumes its row's last token, then masks the next step's
    logits to the allowed tokens. Once the grammar is complete only the end tokens remain.
    """

    def __init__(self, tokenizer: Any, grammar: str, rows: int, prompt_len: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance

        self.matchers = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(rows)]
        self.prompt_len = prompt_len
        self.eos = sorted(eos_token_ids)

    def allowed(self, matcher: Any, vocab: int) -> np.ndarray:
        """The matcher's bitmask (bit i of the vocabulary: token i allowed) as booleans."""
        if matcher.is_error():  # a finished row (padding follows) or a broken one: it may only end
            allowed = np.zeros(vocab, dtype=bool)
            allowed[self.eos] = True
            return allowed
        packed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(packed, bitorder="little")[:vocab].astype(bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] > self.prompt_len and not matcher.is_stopped():
                matcher.consume_token(int(input_ids[row, -1]))
        # numpy unpacks the bits; on CPU np.putmask applies them in place (boolean indexing, and
        # torch's multithreaded elementwise ops, cost ms per token over a 100k-token vocabulary:
        # benchmarks/text_generation.py measures it); on a GPU, one torch.where there.
        allowed = np.stack([self.allowed(matcher, vocab) for matcher in self.matchers])
        if scores.device.type == "cpu" and scores.is_contiguous():
            np.putmask(scores.numpy(), ~allowed, -np.inf)
            return scores
        return torch.where(torch.from_numpy(allowed).to(scores.device), scores, float("-inf"))


def grammar_constraint(
    tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], grammar: str, rows: int = 1, prompt_len: int = 0
) -> GrammarConstraint:
    """The public entry point for structured output: a logits processor for `model.generate`
    enforcing `grammar` (from `json_schema_grammar` or `grammar_from`) on `rows` sequences whose
    prompt is `prompt_len` tokens long. `eos_token_ids` end the output once the grammar is done."""
    return GrammarConstraint(
        grammar_tokenizer(tokenizer, vocab_size, eos_token_ids), grammar, rows, prompt_len, eos_token_ids
    )
