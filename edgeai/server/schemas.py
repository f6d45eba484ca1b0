"""Pydantic models of the OpenAI request/response shapes the server speaks.

Sampling fields take their bounds and descriptions from `edgeai.options.GenerationOptions`
(the one place defaults live); here they are optional, and an absent field means "the
GenerationOptions default". Unknown fields are ignored, as OpenAI clients send many.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeai.options import GenerationOptions

POLICIES = ("local-only", "auto", "remote")  # edgeai.routing.router.POLICIES (checked in the tests)
# A request's prompt is tokenized on the model's one thread: these bound that work (a 3 MB
# request of 100k messages took 5.6 s there). 4096 turns is far beyond any real chat, and
# 131072 ids beyond any served context (the prompt must leave room for one token anyway).
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096
MAX_PROMPT_IDS = 131072


def _opt(name: str, **override: Any) -> Any:
    """GenerationOptions.<name> as an optional field: same type and bounds, default None."""
    info = GenerationOptions.model_fields[name]
    typ = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    desc = override.pop("description", info.description)
    return Annotated[typ | None, Field(None, description=f"{desc} (default {info.get_default(call_default_factory=True)!r})", **override)]


MaxTokens = _opt("max_tokens")
Temperature = _opt("temperature")
TopP = _opt("top_p")
TopK = _opt("top_k", description="edgeai extension: keep the k most likely tokens (0 = off)")
MinP = _opt("min_p", description="edgeai extension: drop tokens below min_p × the top probability")
Seed = _opt("seed")
TopLogprobs = _opt("top_logprobs")
Stop = Annotated[
    Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]
    | None,
    Field(None, description="stop string(s); not included in the output"),
]
Policy = Annotated[
    Literal[POLICIES] | None,  # type: ignore[valid-type]
    Field(None, description="edgeai extension: escalation policy for this request (default: the server's)"),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send a last chunk with token usage")


class ContentPart(_Request):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="who wrote the message")
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] = Field(
        description="the text, or a list of text parts")


class _Sampling(_Request):
    model: str = Field(min_length=1, description="a model from GET /v1/models")
    max_tokens: MaxTokens
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    min_p: MinP
    seed: Seed
    stop: Stop
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = Field(False, description="stream server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="ignored")
    policy: Policy
    adapter: str | None = Field(None, min_length=1, description=(
        "edgeai extension: a stored LoRA adapter (`edgeai adapter list`) applied to this request only"))
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="penalty for tokens already present")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="penalty by how often a token appeared")
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                               Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None = Field(
        None, description="token id → bias added to its logit (-100 bans it, 100 forces it)")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES,
                                        description="the conversation so far")
    max_completion_tokens: MaxTokens
    logprobs: bool = Field(False, description="return log-probabilities of the output tokens")
    top_logprobs: TopLogprobs


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[
        list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)] = Field(
        description="the text to continue (one string, or token ids)")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="return this many alternatives per token (with the token's own logprob)")
    echo: Literal[False] = Field(False, description="echoing the prompt is not supported")


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: Annotated[str, Field(max_length=100_000)] | Annotated[
        list[Annotated[str, Field(max_length=100_000)]], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float"] = "float"


# -- responses ---------------------------------------------------------------------------


class EdgeaiInfo(BaseModel):
    """Which tier answered and how sure the local model was (ignored by OpenAI clients)."""

    tier: str = Field(description='"local" or the remote tier that answered')
    confidence: float | None = Field(None, description="calibrated P(correct) of the local answer, when scored")
    threshold: float | None = None
    route: str | None = None
    policy: str | None = None
    reasons: list[str] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    edgeai: EdgeaiInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    edgeai: EdgeaiInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    edgeai: EdgeaiInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "edgeai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float]


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    models: list[dict[str, Any]]
    active: int
    waiting: int
    max_batch: int
    max_queue: int
    tokens_per_second: float
