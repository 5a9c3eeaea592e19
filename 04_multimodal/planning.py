"""What a validated generation request (caption, answer, chat, OpenAI chat) asks of the engine,
decided before the first chunk: the images it carries, the prompt the engine renders, the output
grammar and the sampling.

The handler's `image_sources`, `prepare_generation` and `requested_grammar` (handler.py, "4.
Inference") call these with the loaded model's tokenizer and the worker's settings; everything here
takes them as arguments, so this module imports nothing from the handler.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from errors import RequestError
from schema import AnswerRequest, CaptionRequest, ChatRequest, Message, OpenAIChatRequest, Part, Sampling
from structured_output import grammar_error, grammar_tokenizer, json_schema_grammar

BLIP2_QUESTION = "Question: {} Answer:"  # the prompt format BLIP-2 was fine-tuned on for VQA
CAPTION_INSTRUCTION = "Describe this image in one sentence."  # caption, for the families that chat


def chat_turns(messages: list[Message], max_images: int) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI-style messages → the processor's chat format, plus the image sources in order."""
    turns, sources = [], []
    for message in messages:
        parts = [Part(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for part in parts:
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image"})
                sources.append(part.image_url.url)
        turns.append({"role": message.role, "content": content})
    if len(sources) > max_images:
        raise RequestError(
            f"messages: {len(sources)} images, more than the limit of {max_images} (MAX_IMAGES_PER_REQUEST)"
        )
    if not sources:
        raise RequestError("messages: send at least one image (an image_url part); this worker answers about images")
    return turns, sources


def image_sources(request: BaseModel, max_images: int) -> list[tuple[str, str]]:
    """(field, source) of every image a generation request carries, in prompt order."""
    if isinstance(request, (ChatRequest, OpenAIChatRequest)):
        return [(f"image {index}", source) for index, source in enumerate(chat_turns(request.messages, max_images)[1])]
    return [("image", request.image)]


def generation_prompt(task: str, request: BaseModel, family: str, max_images: int) -> list[dict[str, Any]] | str:
    """What the engine renders: chat turns (each image a {"type": "image"} part), or for BLIP-2,
    which has no chat template, its own prompt as text (none to caption)."""
    if task == "chat" or isinstance(request, OpenAIChatRequest):
        return chat_turns(request.messages, max_images)[0]
    if family == "blip2":
        return BLIP2_QUESTION.format(request.question) if task == "answer" else ""
    question = request.question if task == "answer" else CAPTION_INSTRUCTION
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def requested_grammar(request: BaseModel, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> str | None:
    """The llguidance grammar (structured_output.py, as the text worker's) that the request's response_format
    or json_schema asks for, checked against this model's tokenizer; None for free text."""
    if isinstance(request, OpenAIChatRequest) and request.response_format and request.response_format.type != "text":
        fmt = request.response_format
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    elif isinstance(request, AnswerRequest) and request.json_schema is not None:
        schema = request.json_schema
    else:
        return None
    try:
        grammar = json_schema_grammar(schema)
    except ValueError as error:
        raise RequestError(f"structured output: {error}") from None
    if problem := grammar_error(grammar, grammar_tokenizer(tokenizer, vocab_size, sorted(eos_token_ids))):
        raise RequestError(f"structured output: the grammar engine refused the schema: {problem}")
    return grammar


def sampling_of(request: BaseModel) -> Sampling:
    if isinstance(request, OpenAIChatRequest):
        if request.max_completion_tokens is not None:
            return request.model_copy(update={"max_tokens": request.max_completion_tokens})
        return request
    sampling = request.sampling_params
    if isinstance(request, (CaptionRequest, AnswerRequest)) and sampling.temperature is None:
        # A caption or an answer is expected to be repeatable: greedy, whatever the model's
        # generation_config recommends for chat, unless the request asks for a temperature.
        return sampling.model_copy(update={"temperature": 0.0})
    return sampling
