"""The requests an embedding job sends: pydantic models, the single source of truth for their field
names, defaults and limits, and `parse_request`, which routes a job's input to one of them.

Some limits are the endpoint's own settings, read by handler.py (MAX_INPUTS, MAX_INPUT_CHARS,
MIN_DIMENSIONS, MAX_RERANK_DOCUMENTS), and some are the loaded model's (its dimensions, its
prompts, whether it normalises inside its own layers): they come in as pydantic's validation
context, `EmbedRequest.model_validate(body, context=RequestLimits(...))`, so this module reads no
environment and imports nothing from the handler. They are worded as pydantic words its own
bounds ("texts: List should have at most 8 items after validation, not 9"). Every other limit is
fixed here, with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from errors import RequestError, validated
from token_ids import TokenIds, input_kind, is_one_array

# An instruction is a sentence or two; the cap keeps it from eating the model's window.
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class RequestLimits:
    """What this endpoint allows and its model offers: the context every request is validated with."""

    max_inputs: int  # MAX_INPUTS: texts (or token-id arrays) per request
    max_input_chars: int  # MAX_INPUT_CHARS: characters per text
    min_dimensions: int  # MIN_DIMENSIONS: the smallest Matryoshka size a request may ask for
    max_rerank_documents: int  # MAX_RERANK_DOCUMENTS: documents per rerank request
    dimensions: int  # the model's embedding size (a sparse model's: its vocabulary size)
    prompts: Mapping[str, str]  # the model's named prompts, e.g. {"query": "query: "}
    default_prompt: str  # what the model applies when a request names none
    raw_vectors: bool  # no Normalize inside the model, so `normalize: false` can be honoured
    default_max_active_dims: int | None  # sparse: the model's own max_active_dims
    sparse: bool  # MODEL_KIND=sparse: native requests are SparseEmbedRequest, OpenAI's route is refused


def endpoint_limits(info: ValidationInfo) -> RequestLimits:
    if not isinstance(info.context, RequestLimits):
        raise TypeError("validate with context=RequestLimits(...): the endpoint's and the model's limits")
    return info.context


def _within_chars(text: str, info: ValidationInfo) -> str:
    if len(text) > (limit := endpoint_limits(info).max_input_chars):
        raise PydanticKnownError("string_too_long", {"max_length": limit})
    return text


def _at_most(value: Any, limit: int) -> Any:
    """A list longer than `limit` is refused before its items are validated, as pydantic's own
    `max_length` refuses it (an over-long list is not worth validating)."""
    if isinstance(value, list) and len(value) > limit:
        raise PydanticKnownError("too_long", {"field_type": "List", "max_length": limit, "actual_length": len(value)})
    return value


def _at_most_inputs(value: Any, info: ValidationInfo) -> Any:
    return _at_most(value, endpoint_limits(info).max_inputs)


def _at_most_documents(value: Any, info: ValidationInfo) -> Any:
    return _at_most(value, endpoint_limits(info).max_rerank_documents)


def _within_dimensions(size: int, info: ValidationInfo) -> int:
    limits = endpoint_limits(info)
    if size > limits.dimensions:  # the model's own size: Matryoshka only cuts
        raise PydanticKnownError("less_than_equal", {"le": limits.dimensions})
    if size < limits.min_dimensions:
        raise PydanticKnownError("greater_than_equal", {"ge": limits.min_dimensions})
    return size


def _within_vocabulary(count: int, info: ValidationInfo) -> int:
    if count > (size := endpoint_limits(info).dimensions):
        raise PydanticKnownError("less_than_equal", {"le": size})
    return count


Text = Annotated[str, Field(min_length=1), AfterValidator(_within_chars)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1), BeforeValidator(_at_most_inputs)]
Dimensions = Annotated[int, AfterValidator(_within_dimensions)]
EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]
# sentence-transformers' quantization: int8/uint8 keep ~99% of retrieval quality in 1/4 of the
# space; binary/ubinary pack 8 dimensions into a byte (1/32 of the space, ~90-95% quality).
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
RerankShape = Literal["tei", "infinity", "cohere"]  # whose response shape a rerank request gets


def _one_text_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _lower_case(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# TEI's truncation_direction; TEI's clients send "Left"/"Right", OpenAI-style clients "left"/"right".
TruncationDirection = Annotated[Literal["left", "right"], BeforeValidator(_lower_case)]


class PromptOptions(BaseModel):
    """How texts are prompted and cut: shared by every embedding request, dense and sparse."""

    model_config = ConfigDict(strict=True)
    input_field: ClassVar[str] = "texts"  # where the texts are, for errors about one of them

    input_type: InputType | None = None  # selects the model's "query"/"document" prompt, if it has one
    prompt_name: str | None = None  # any prompt the model defines, by name (TEI's and sentence-transformers' field)
    prompt: Prompt | None = None  # a free instruction put before every text (Qwen3-Embedding, e5-instruct)
    # TEI's truncation controls. A text longer than the model reads (its max_seq_length, prompt and
    # special tokens included) is cut, and listed in `truncated`; truncate: false refuses it instead.
    truncate: bool = True
    truncation_direction: TruncationDirection = "right"  # "left" keeps a text's end (the prompt stays)

    @field_validator("prompt_name")
    @classmethod
    def _known_prompt(cls, name: str | None, info: ValidationInfo) -> str | None:
        prompts = endpoint_limits(info).prompts
        if name is not None and name not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise ValueError(f"{name!r} is not one of this model's prompts ({known}); send a free `prompt` instead")
        return name

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptOptions:
        given = [name for name in ("input_type", "prompt_name", "prompt") if getattr(self, name) is not None]
        if len(given) > 1:
            raise PydanticCustomError("prompts", f"send one of input_type, prompt_name and prompt, not {given}")
        return self

    def resolved_prompt(self, limits: RequestLimits) -> str:
        """The text put before every input, among the model's `limits.prompts`, resolved as
        sentence-transformers' encode_query/encode does."""
        if self.prompt is not None:
            return self.prompt
        if self.prompt_name is not None:
            return limits.prompts[self.prompt_name]
        if self.input_type is not None and self.input_type in limits.prompts:
            return limits.prompts[self.input_type]
        return limits.default_prompt


class EmbeddingOptions(PromptOptions):
    """Options of the dense requests, native and OpenAI."""

    dimensions: Dimensions | None = None  # Matryoshka truncation, then re-normalised
    encoding_format: EncodingFormat = "float"  # base64: little-endian float32 bytes, as OpenAI sends
    normalize: bool = True  # unit length, so cosine similarity is a dot product

    @field_validator("normalize")
    @classmethod
    def _raw_available(cls, normalize: bool, info: ValidationInfo) -> bool:
        if not normalize and not endpoint_limits(info).raw_vectors:
            raise ValueError("false is not available: this model normalises inside its own layers")
        return normalize


class EmbedRequest(EmbeddingOptions):
    """The native request: {"texts": "one text" | ["text", ...], ...options}."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt option is an error, not ignored

    texts: Texts
    precision: Precision = "float32"

    @model_validator(mode="after")
    def _whole_bytes(self, info: ValidationInfo) -> EmbedRequest:
        size = self.dimensions or endpoint_limits(info).dimensions
        if self.precision in ("binary", "ubinary") and size % 8:
            raise PydanticCustomError(
                "bits", f"{self.precision} packs 8 dimensions per byte; {size} is not a multiple of 8"
            )
        return self

    _wrap = field_validator("texts", mode="before")(_one_text_as_list)


class SparseEmbedRequest(PromptOptions):
    """The native request of a sparse model (MODEL_KIND=sparse): {"texts": ..., "max_active_dims": 64}.
    Dense-only options (dimensions, precision, encoding_format, normalize) are refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid")

    texts: Texts
    # Keep only the largest terms (sentence-transformers' max_active_dims): smaller vectors and
    # indexes for a little recall; the model's own setting (often none: every active term) when unset.
    max_active_dims: Annotated[int, Field(ge=1), AfterValidator(_within_vocabulary)] | None = None

    _wrap = field_validator("texts", mode="before")(_one_text_as_list)

    @model_validator(mode="after")
    def _model_default(self, info: ValidationInfo) -> SparseEmbedRequest:
        if "max_active_dims" not in self.model_fields_set:  # an explicit null keeps every term
            self.max_active_dims = endpoint_limits(info).default_max_active_dims
        return self


# OpenAI's clients may send cl100k_base token ids instead of text (LangChain's OpenAIEmbeddings does
# by default): token_ids.py checks them as a field and decodes them back to text.
OpenAIInput = Annotated[
    Annotated[Texts, Tag("texts")]
    | Annotated[Annotated[list[TokenIds], Field(min_length=1), BeforeValidator(_at_most_inputs)], Tag("token_ids")],
    Discriminator(input_kind),
]


class OpenAIEmbeddingRequest(EmbeddingOptions):
    """OpenAI's embeddings request. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input_field: ClassVar[str] = "openai_input.input"

    input: OpenAIInput  # a text, texts, one token-id array or several
    model: str | None = None  # this endpoint serves one model whatever the name says
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_input_as_list(cls, value: Any) -> Any:
        if is_one_array(value):
            return [value]  # one token-id array
        return _one_text_as_list(value)


class RerankRequest(BaseModel):
    """A rerank request in the shape any of the usual clients send: Cohere, Jina and Infinity put the
    candidates in `documents` (Infinity's older clients in `docs`), TEI in `texts` (with `return_text`)."""

    model_config = ConfigDict(strict=True, extra="ignore")  # "model" and other client fields are harmless

    query: Text
    documents: Annotated[
        list[Text],
        Field(min_length=1, validation_alias=AliasChoices("documents", "docs", "texts")),
        BeforeValidator(_at_most_documents),
    ]
    top_n: Annotated[int, Field(ge=1)] | None = None  # all documents, best first, when unset
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_text"))
    raw_scores: bool = False  # TEI and Infinity: the cross-encoder's logits, without its activation
    # TEI's truncation controls, for a (query, document) pair longer than the cross-encoder reads:
    # cut (right: the model's own cut, the longer of the two loses its end; left: the document loses
    # its start, the query stays whole), or refused with truncate: false.
    truncate: bool = True
    truncation_direction: TruncationDirection = "right"
    _shape: RerankShape = PrivateAttr("infinity")


OPENAI_EMBEDDINGS_ROUTE = "/v1/embeddings"
OPENAI_MODELS_ROUTE = "/v1/models"
# Rerank routes: Jina's and Cohere's v1 (/v1/rerank), Cohere's v2, and TEI's and Infinity's /rerank.
RERANK_ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")
OPENAI_ROUTES = (OPENAI_EMBEDDINGS_ROUTE, OPENAI_MODELS_ROUTE, *RERANK_ROUTES)


def rerank_shape(route: str, body: dict[str, Any]) -> RerankShape:
    """The response shape the client that sent `body` to `route` reads: TEI's list for its `texts`
    body; Cohere's and Jina's `document: {text}` on their routes; else Infinity's `document: text`."""
    if "texts" in body:
        return "tei"
    return "cohere" if route in ("/v1/rerank", "/v2/rerank") else "infinity"


def rerank_request(body: dict[str, Any], route: str, limits: RequestLimits, prefix: str = "") -> RerankRequest:
    request = validated(RerankRequest, body, limits, prefix=prefix)
    request._shape = rerank_shape(route, body)
    return request


def parse_request(job_input: Any, limits: RequestLimits) -> tuple[str, BaseModel | None]:
    """Turn a job's input into (route, validated request) within `limits`. Pure: no model, no I/O.

    route is "native", "rerank" (native, with "documents"), or an OpenAI-style route; "/v1/models"
    has no request body.
    """
    if not isinstance(job_input, dict):
        raise RequestError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" not in job_input:
        if "documents" in job_input or "docs" in job_input or ("query" in job_input and "texts" in job_input):
            return "rerank", rerank_request(job_input, "native", limits)
        return "native", validated(SparseEmbedRequest if limits.sparse else EmbedRequest, job_input, limits)

    route = job_input["openai_route"]
    if route not in OPENAI_ROUTES:
        raise RequestError(f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}")
    if route == OPENAI_MODELS_ROUTE:
        return route, None
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise RequestError(f"openai_input must be a JSON object with the {route} request body")
    if route in RERANK_ROUTES:
        return "rerank", rerank_request(body, route, limits, prefix="openai_input")
    if limits.sparse:
        raise RequestError(
            "this endpoint serves a sparse model (MODEL_KIND=sparse), and OpenAI's embeddings API has no "
            'sparse vectors; send the native request {"texts": [...]}, answered with {"indices", "values"} per text'
        )
    return route, validated(OpenAIEmbeddingRequest, body, limits, prefix="openai_input")
