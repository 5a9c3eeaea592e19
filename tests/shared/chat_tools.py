"""Tools the text-generation tests offer a model: OpenAI function definitions."""

from __future__ import annotations

# Two parameters, both constrained: a grammar can only fill them one way or another of a few.
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}, "precise": {"type": "boolean"}},
            "required": ["zone", "precise"],
            "additionalProperties": False,
        },
    },
}
