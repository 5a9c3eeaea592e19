"""structured_output.py: llguidance grammars and the logits processor that enforces them. One
identical copy per text example (tests/copied_modules/test_copies.py checks the copies)."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from tests.shared.harness import load_copy_beside, shared_copies

COPIES = shared_copies("structured_output.py")


@pytest.fixture(params=COPIES, ids=[path.parent.name for path in COPIES])
def structured_output(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy_beside(request.param)


def test_grammar_constraint_makes_any_model_write_the_schema(structured_output: ModuleType, tiny_model) -> None:
    """The structured-output entry point other examples reuse: a JSON schema through `generate`."""
    import jsonschema
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen3")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    grammar = structured_output.json_schema_grammar(schema)
    eos = [tokenizer.eos_token_id]
    assert (
        structured_output.grammar_error(
            grammar, structured_output.grammar_tokenizer(tokenizer, model.config.vocab_size, eos)
        )
        == ""
    )
    inputs = tokenizer("Answer:", return_tensors="pt")
    processor = structured_output.grammar_constraint(
        tokenizer, model.config.vocab_size, eos, grammar, 1, inputs["input_ids"].shape[1]
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, logits_processor=[processor], eos_token_id=eos)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), schema)
    assert structured_output.grammar_error(structured_output.json_schema_grammar({"type": "nope"}), None), (
        "a bad schema is named"
    )
