"""The requests a multimodal job sends: one pydantic model per task and per OpenAI route, the single
source of truth for their field names, defaults and limits, and `parse_request`, the pure function
from a job's input to a task and its validated request.

Five limits are not known here: the endpoint's MAX_LABELS, MAX_EMBED_ITEMS and MAX_INPUTS (settings
read by handler.py) and the loaded model's context length and vocabulary. They come in as pydantic's
validation context, `ClassifyRequest.model_validate(data, context=RequestLimits(...))`, so this
module reads no environment and imports nothing from the handler; each one raises pydantic's own
error (less_than_equal, too_long), so every message reads as pydantic words a fixed bound. A request
built without a context (a test's `Sampling(max_tokens=8)`) gets only the fixed bounds. Every other
limit is fixed here, with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from errors import RequestError, validated
from token_ids import TokenIds, input_kind, is_one_array

MAX_LABEL_CHARS = 200  # CLIP reads 77 tokens of a label's caption; longer is a mistake
MAX_TEXT_CHARS = 4000  # one label, question or message: far beyond any model's window
MAX_MESSAGES = 64  # turns in a chat
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 2.0  # above 2 output degrades into noise
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty is [-2, 2]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit on entries


@dataclass(frozen=True)
class RequestLimits:
    """The limits of this endpoint and its model: the validation context of every request."""

    context_len: int  # prompt + completion tokens: the language model's max_position_embeddings
    vocab_size: int  # token ids logit_bias may name
    max_labels: int  # MAX_LABELS: zero-shot classes per classify request
    max_embed_items: int  # MAX_EMBED_ITEMS: images plus texts per embed request, images per /v1/embeddings one
    max_inputs: int  # MAX_INPUTS: inputs (texts, images or token-id arrays) per /v1/embeddings request


def _limits(info: ValidationInfo) -> RequestLimits | None:
    return info.context if isinstance(info.context, RequestLimits) else None


def _within_context(value: int, info: ValidationInfo) -> int:
    """No more tokens than the whole context holds (pydantic's own `le` error, with the model's bound)."""
    limits = _limits(info)
    if limits is not None and value > limits.context_len:
        raise PydanticKnownError("less_than_equal", {"le": limits.context_len})
    return value


def _at_most(setting: str) -> BeforeValidator:
    """A list no longer than the RequestLimits field `setting`, checked on the input before its items,
    as pydantic checks its own `max_length` (so a too-long list reports only that)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if limits is not None and isinstance(value, list) and len(value) > (limit := getattr(limits, setting)):
            context = {"field_type": "List", "max_length": limit, "actual_length": len(value)}
            raise PydanticKnownError("too_long", context)
        return value

    return BeforeValidator(check)


def unsupported(feature: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{feature} is not supported by this worker{hint}")


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
ImageSource = Annotated[str, Field(min_length=1)]  # URL, data URI or base64; checked when fetched
MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_within_context)]  # at most the context's length
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class Sampling(BaseModel):
    """Sampling for the generating families (the text worker's names and ranges); None means the
    model's default (or the usual one)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 and 0 both mean "no top-k"
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=MAX_REPETITION_PENALTY)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt field is an error, not ignored


class ClassifyRequest(Strict):
    task: Literal["classify"]
    image: ImageSource
    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]],
        Field(min_length=2),
        _at_most("max_labels"),
    ]
    # CLIP was trained on captions, so "a photo of a dog." scores better than the bare label "dog".
    hypothesis_template: Annotated[str, Field(max_length=MAX_LABEL_CHARS)] = "a photo of a {}."

    @field_validator("hypothesis_template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        try:
            fits = value.count("{}") == 1 and value.format("label") is not None
        except (IndexError, KeyError, ValueError):
            fits = False
        if not fits:
            raise PydanticCustomError(
                "template", "must contain exactly one {} where the label goes (write other braces as {{ and }})"
            )
        return value


class EmbedRequest(Strict):
    task: Literal["embed"]
    images: Annotated[list[ImageSource], _at_most("max_embed_items")] = []
    texts: Annotated[list[Text], _at_most("max_embed_items")] = []

    @model_validator(mode="after")
    def _something_to_embed(self, info: ValidationInfo) -> EmbedRequest:
        if not self.images and not self.texts:
            raise PydanticCustomError("empty", "send images, texts or both")
        limits = _limits(info)
        if limits is not None and len(self.images) + len(self.texts) > limits.max_embed_items:
            raise PydanticCustomError("too_many", f"images and texts together must be at most {limits.max_embed_items}")
        return self


class Generating(Strict):
    sampling_params: Sampling = Sampling()
    stream: bool = False


class CaptionRequest(Generating):
    task: Literal["caption"]
    image: ImageSource


class AnswerRequest(Generating):
    task: Literal["answer"]
    image: ImageSource
    question: Text
    # A JSON schema the answer must match (document extraction, tagging), enforced while generating.
    json_schema: dict[str, Any] | None = None


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's "detail" is accepted and has no effect here
    url: ImageSource


class Part(BaseModel):
    """OpenAI content parts: {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "image_url"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload(self) -> Part:
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("part", "a text part needs text")
        if self.type == "image_url" and self.image_url is None:
            raise PydanticCustomError("part", "an image_url part needs image_url.url")
        return self


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[Part]


Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatRequest(Generating):
    task: Literal["chat"]
    messages: Messages


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)  # "strict": always enforced
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "response_format.json_schema is required with type json_schema")
        return self


class OpenAIChatRequest(Sampling):
    """OpenAI's chat request with image_url parts and the text worker's sampling fields. Unknown
    fields are ignored; features this worker lacks are refused, never silently dropped."""

    model_config = ConfigDict(strict=True, extra="ignore")
    messages: Messages
    model: str | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_completion_tokens: MaxTokens | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
            Field(max_length=MAX_LOGIT_BIAS_TOKENS),
        ]
        | None
    ) = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self, info: ValidationInfo) -> OpenAIChatRequest:
        if self.n not in (None, 1):
            raise unsupported(f"n={self.n}", "; send one request per choice (n must be 1)")
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs needs logprobs: true")
        if self.tools or self.tool_choice not in (None, "none"):
            raise unsupported("tool calling (tools, tool_choice)", "; the text worker serves tools")
        limits = _limits(info)
        for token in self.logit_bias or {}:
            if not token.isdigit() or (limits is not None and int(token) >= limits.vocab_size):
                raise PydanticCustomError("logit_bias", f"logit_bias: {token!r} is not a token id of this model")
        return self


# OpenAI's clients may send cl100k_base token ids instead of text (LangChain's OpenAIEmbeddings does
# by default): token_ids.py checks them as a field and decodes them back to text, as 03 does. Texts
# and images share the other form.
OpenAIItem = Annotated[str, Field(min_length=1)]  # a text or an image: which, and a text's length, checked below
OpenAIInput = Annotated[
    Annotated[Annotated[list[OpenAIItem], Field(min_length=1), _at_most("max_inputs")], Tag("texts")]
    | Annotated[Annotated[list[TokenIds], Field(min_length=1), _at_most("max_inputs")], Tag("token_ids")],
    Discriminator(input_kind),
]


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, for CLIP and SigLIP, with images too (Infinity's convention):
    `modality: "image"` makes every input an image (URL, data URI or base64); without it a
    `data:image/...` URI is an image and anything else a text. Token-id arrays are texts. Unknown
    fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: OpenAIInput  # a text or an image, several, one token-id array or several
    model: str | None = None  # this endpoint serves one model whatever the name says
    modality: Literal["text", "image"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None  # the first N dimensions, re-normalised
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_input_as_list(cls, value: Any) -> Any:
        if is_one_array(value):
            return [value]  # one token-id array
        return [value] if isinstance(value, str) else value

    @property
    def token_ids(self) -> bool:
        """Whether `input` is token-id arrays (decoded to texts before encoding), not texts and images."""
        return isinstance(self.input[0], list)

    def is_image(self, item: str) -> bool:
        return self.modality == "image" or (self.modality is None and item.startswith("data:image/"))

    @model_validator(mode="after")
    def _texts_and_images(self, info: ValidationInfo) -> OpenAIEmbeddingRequest:
        if self.token_ids:
            if self.modality == "image":
                raise PydanticCustomError(
                    "modality", "modality: image takes images (URLs, data URIs, base64), not token ids"
                )
            return self
        images = 0
        for index, item in enumerate(self.input):
            if self.is_image(item):
                images += 1
            elif len(item) > MAX_TEXT_CHARS:
                raise PydanticCustomError("too_long", f"input.{index}: a text has at most {MAX_TEXT_CHARS} characters")
        limits = _limits(info)
        if limits is not None and images > limits.max_embed_items:
            # Each image is downloaded and preprocessed whole before it is encoded: MAX_EMBED_ITEMS bounds
            # that memory per request, as it does for the native embed task. Texts cost far less.
            raise PydanticCustomError(
                "too_many", f"input: {images} images, over the limit of {limits.max_embed_items} (MAX_EMBED_ITEMS)"
            )
        return self


NATIVE_REQUESTS = {
    "classify": ClassifyRequest,
    "embed": EmbedRequest,
    "caption": CaptionRequest,
    "answer": AnswerRequest,
    "chat": ChatRequest,
}
CHAT_ROUTE = "/v1/chat/completions"
EMBEDDINGS_ROUTE = "/v1/embeddings"
MODELS_ROUTE = "/v1/models"
OPENAI_ROUTES = (CHAT_ROUTE, EMBEDDINGS_ROUTE, MODELS_ROUTE)


def parse_request(
    job_input: Any, family: str, tasks: tuple[str, ...], limits: RequestLimits
) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (task or route, validated request), for a `family` model that can do
    `tasks`. Pure: no model, no I/O."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" in job_input:
        route = job_input["openai_route"]
        if route not in OPENAI_ROUTES:
            raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
        if route == MODELS_ROUTE:
            return route, None
        if route == CHAT_ROUTE and "chat" not in tasks:
            raise RequestError(f"this is a {family} model, which cannot chat; it can do: {', '.join(tasks)}")
        if route == EMBEDDINGS_ROUTE and "embed" not in tasks:
            raise RequestError(f"this is a {family} model, which cannot embed; it can do: {', '.join(tasks)}")
        body = job_input.get("openai_input")
        if not isinstance(body, dict):
            raise RequestError(f"openai_input must be a JSON object with the {route} request body")
        schema = OpenAIChatRequest if route == CHAT_ROUTE else OpenAIEmbeddingRequest
        return route, validated(schema, body, limits, prefix="openai_input")

    task = job_input.get("task")
    if not isinstance(task, str) or task not in NATIVE_REQUESTS:
        raise RequestError(f"task must be one of {', '.join(tasks)} (what this {family} model can do), got {task!r}")
    if task not in tasks:
        raise RequestError(f"task: a {family} model cannot {task}; it can do: {', '.join(tasks)}")
    return task, validated(NATIVE_REQUESTS[task], job_input, limits)
