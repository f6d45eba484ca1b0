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
    return Annotated[
        typ | None,
        Field(
            None,
            description=f"{desc} (default {info.get_default(call_default_factory=True)!r})",
            **override,
        ),
    ]


MaxTokens = _opt("max_tokens")
Temperature = _opt("temperature")
TopP = _opt("top_p")
TopK = _opt("top_k", description="edgeai extension: keep the k most likely tokens (0 = off)")
MinP = _opt("min_p", description="edgeai extension: drop tokens below min_p × the top probability")
Seed = _opt("seed")
TopLogprobs = _opt("top_logprobs")
Stop = Annotated[
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]
    | None,
    Field(None, description="stop string(s); not included in the output"),
]
Policy = Annotated[
    Literal[POLICIES] | None,  # type: ignore[valid-type]
    Field(
        None,
        description="edgeai extension: escalation policy for this request (default: the server's)",
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send a last chunk with token usage")


class ContentPart(_Request):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


FunctionName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and -")
]


class FunctionCall(_Request):
    name: FunctionName
    arguments: str = Field(description="the arguments, a JSON object as a string")


class ToolCall(_Request):
    id: str = Field(max_length=256, description="the call's id (a tool message answers by it)")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="who wrote the message"
    )
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None,
        description="the text, or a list of text parts (absent or null only for an "
        "assistant message with tool_calls)",
    )
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=64)] | None = Field(
        None, description="calls an assistant message made (role assistant)"
    )
    tool_call_id: str | None = Field(
        None, max_length=256, description="the call a tool message answers (role tool)"
    )
    name: str | None = Field(None, max_length=64, description="ignored")


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema of the arguments object (default: any object)"
    )
    strict: bool | None = Field(None, description="ignored: a forced call follows the schema")


class Tool(_Request):
    type: Literal["function"] = Field(description="only function tools are supported")
    function: FunctionDefinition


class NamedToolChoice(_Request):
    class Function(_Request):
        name: FunctionName

    type: Literal["function"]
    function: Function


ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice | None,
    Field(
        None,
        description='"auto" (default with tools): the model may call a tool; "none": '
        'it may not; "required" or {"type": "function", "function": '
        '{"name": ...}}: decoding is constrained to one well-formed call',
    ),
]


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the schema's name")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="the JSON Schema the answer validates against"
    )
    strict: bool | None = Field(None, description="ignored: the answer always follows the schema")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description=(
            '"json_object": the answer is one JSON object; "json_schema": it validates against '
            "json_schema.schema (decoding is constrained; unsupported schema features are a 400)"
        )
    )
    json_schema: JsonSchemaFormat | None = Field(
        None, description='required with type "json_schema"'
    )


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
    adapter: str | None = Field(
        None,
        min_length=1,
        description=(
            "edgeai extension: a stored LoRA adapter (`edgeai adapter list`) "
            "applied to this request only"
        ),
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="penalty for tokens already present"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="penalty by how often a token appeared"
    )
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                Annotated[float, Field(ge=-100.0, le=100.0)],
            ],
            Field(max_length=1024),
        ]
        | None
    ) = Field(None, description="token id → bias added to its logit (-100 bans it, 100 forces it)")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="the conversation so far"
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="functions the model may call (rendered by the model's chat template)"
    )
    tool_choice: ToolChoice
    parallel_tool_calls: bool | None = Field(
        None, description="ignored: a forced call is a single call"
    )
    response_format: ResponseFormat | None = None
    max_completion_tokens: MaxTokens
    logprobs: bool = Field(False, description="return log-probabilities of the output tokens")
    top_logprobs: TopLogprobs


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[
            list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)
        ]
    ) = Field(description="the text to continue (one string, or token ids)")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="return this many alternatives per token (with the token's own logprob)"
    )
    echo: Literal[False] = Field(False, description="echoing the prompt is not supported")


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: (
        Annotated[str, Field(max_length=100_000)]
        | Annotated[
            list[Annotated[str, Field(max_length=100_000)]], Field(min_length=1, max_length=256)
        ]
    )
    encoding_format: Literal["float"] = "float"


# -- responses ---------------------------------------------------------------------------


class EdgeaiInfo(BaseModel):
    """Which tier answered and how sure the local model was (ignored by OpenAI clients)."""

    tier: str = Field(description='"local" or the remote tier that answered')
    confidence: float | None = Field(
        None, description="calibrated P(correct) of the local answer, when scored"
    )
    threshold: float | None = None
    route: str | None = None
    policy: str | None = None
    reasons: list[str] = Field(default_factory=list)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0, description="prompt tokens taken from the prompt cache, not prefilled"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class OutFunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class OutToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OutFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[OutToolCall] | None = None


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


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: OutFunctionCall | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
