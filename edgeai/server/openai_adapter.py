"""OpenAI request shapes → the native request; Events and Answers → OpenAI bodies and chunks.

One handler serves both endpoints: they differ only in how the prompt is built and how a
token is rendered, which is all this module knows.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from edgeai.engine import constrain, tools
from edgeai.errors import InvalidInput
from edgeai.options import GenerationOptions, Message
from edgeai.server import schemas as s
from edgeai.types import Answer, Event


@dataclass
class NativeRequest:
    """What the engine needs, whatever API shape the request came in."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: Any  # list[Message] | str | list[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool
    policy: str | None
    logprobs: int | None  # None: off; n >= 0: report logprobs with n alternatives
    logits: dict = field(default_factory=dict)  # logit_bias / penalties, for the logits processors
    adapter: str | None = None  # a stored LoRA adapter for this request only (edgeai.engine.lora)
    constraint: constrain.Constraint | None = None  # a grammar for the answer (JSON, a tool call)
    tool_calls: bool = False  # parse the answer's tool calls into message.tool_calls
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _options(req: s._Sampling, max_tokens: int | None, top_logprobs: int) -> GenerationOptions:
    fields = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed")}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if req.stop is not None:
        fields["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    # The confidence score wants the top-2 margin, whatever the client asked to see.
    fields["top_logprobs"] = max(top_logprobs, 2)
    return GenerationOptions(**{k: v for k, v in fields.items() if v is not None})


def _logits(req: s._Sampling) -> dict:
    """The logits-processor settings a request asked for (mlx-lm's make_logits_processors)."""
    out: dict = {}
    if req.logit_bias:
        out["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
    for k in ("presence_penalty", "frequency_penalty"):
        if getattr(req, k):
            out[k] = getattr(req, k)
    return out


def _text(content: str | list[s.ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _message(m: s.ChatMessage, i: int) -> dict:
    """One message in Hugging Face's chat-template shape (tool calls' arguments as objects)."""
    if m.content is None and not m.tool_calls:
        raise InvalidInput(
            f"messages[{i}]: content is missing",
            "only an assistant message with tool_calls may have null content",
        )
    if m.tool_calls and m.role != "assistant":
        raise InvalidInput(f"messages[{i}]: only assistant messages carry tool_calls", "")
    out: dict = {
        "role": "system" if m.role == "developer" else m.role,
        "content": _text(m.content) if m.content is not None else "",
    }
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                raise InvalidInput(
                    f"messages[{i}]: the arguments of tool call {c.id!r} are not JSON",
                    "send arguments as a JSON object in a string",
                ) from None
            calls.append(
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": args},
                }
            )
        out["tool_calls"] = calls
    if m.role == "tool" and m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tools(req: s.ChatCompletionRequest) -> tuple[list[dict], constrain.Constraint | None]:
    """The tools to render and the forced call's grammar (None unless required or named)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidInput(
                "tool_choice is set but no tools are given", "send tools, or drop tool_choice"
            )
        return [], None
    defs = [t.model_dump(exclude_none=True) for t in req.tools]
    tools.check_tools(defs)
    if choice == "none":
        return [], None
    if isinstance(choice, s.NamedToolChoice):
        name = choice.function.name
        if name not in {d["function"]["name"] for d in defs}:
            raise InvalidInput(
                f"tool_choice names {name!r}, which is not among the tools",
                "name one of the functions in tools",
            )
        return defs, tools.call_constraint(defs, name)
    return defs, tools.call_constraint(defs) if choice == "required" else None


def _format(fmt: s.ResponseFormat | None) -> constrain.Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return constrain.json_object()
    if fmt.json_schema is None:
        raise InvalidInput(
            'response_format.json_schema is required with type "json_schema"',
            'send {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
        )
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return constrain.json_schema(schema, "response_format.json_schema.schema")


def from_chat(req: s.ChatCompletionRequest) -> NativeRequest:
    """A chat request as the native request (developer messages count as system).

    Plain conversations are Message lists (routed, maybe escalated); ones with tools or tool
    messages are a `tools.ToolChat` for the model's own template.
    """
    defs, forced = _tools(req)
    fmt = _format(req.response_format)
    rich = [_message(m, i) for i, m in enumerate(req.messages)]
    prompt: Any
    if defs or any(m.role == "tool" or m.tool_calls for m in req.messages):
        prompt = tools.ToolChat(rich, defs)
    else:
        prompt = [Message(role=m["role"], content=m["content"]) for m in rich]
    top = (req.top_logprobs or 0) if req.logprobs else 0
    opts = _options(req, req.max_completion_tokens or req.max_tokens, top)
    return NativeRequest(
        "chat",
        req.model,
        prompt,
        opts,
        req.stream,
        bool(req.stream_options and req.stream_options.include_usage),
        req.policy,
        top if req.logprobs else None,
        _logits(req),
        adapter=req.adapter,
        constraint=forced or fmt,
        tool_calls=bool(defs),
    )


def from_completion(req: s.CompletionRequest) -> NativeRequest:
    prompt: Any = (
        req.prompt[0]
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], str)
        else req.prompt
    )
    opts = _options(req, req.max_tokens, req.logprobs or 0)
    return NativeRequest(
        "completion",
        req.model,
        prompt,
        opts,
        req.stream,
        bool(req.stream_options and req.stream_options.include_usage),
        req.policy,
        req.logprobs,
        _logits(req),
        adapter=req.adapter,
    )


# -- rendering ---------------------------------------------------------------------------


def _logprob(x: float) -> float:
    """A logprob JSON can carry: OpenAI renders -inf as -9999.0; NaN (a broken model) too."""
    return x if math.isfinite(x) else -9999.0


def _score(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@lru_cache(maxsize=65536)
def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "cancelled" else reason)


def usage(ans: Answer) -> s.Usage:
    p, c = ans.stats.prompt_tokens, ans.stats.generation_tokens
    return s.Usage(
        prompt_tokens=p,
        completion_tokens=c,
        total_tokens=p + c,
        prompt_tokens_details=s.PromptTokensDetails(cached_tokens=ans.stats.cached_tokens),
    )


def info(ans: Answer, policy: str | None) -> s.EdgeaiInfo:
    return s.EdgeaiInfo(
        tier=ans.tier,
        confidence=_score(ans.confidence),
        threshold=_score(ans.threshold),
        route=ans.route,
        policy=policy,
        reasons=list(ans.reasons),
    )


def chat_logprobs(events: list[Event], tokenizer: Any, top_n: int) -> s.ChoiceLogprobs:
    out = []
    for ev in events:
        if ev.token is None or ev.logprob is None or tokenizer is None:
            continue
        text = _piece(tokenizer, ev.token)
        alts = [
            s.TopLogprob(
                token=_piece(tokenizer, t),
                logprob=_logprob(lp),
                bytes=list(_piece(tokenizer, t).encode()),
            )
            for t, lp in ev.top_logprobs[:top_n]
        ]
        out.append(
            s.TokenLogprob(
                token=text,
                logprob=_logprob(ev.logprob),
                bytes=list(text.encode()),
                top_logprobs=alts,
            )
        )
    return s.ChoiceLogprobs(content=out)


def completion_logprobs(
    events: list[Event], tokenizer: Any, top_n: int, offset: int = 0
) -> s.CompletionLogprobs:
    lp = s.CompletionLogprobs()
    for ev in events:
        if ev.token is None or ev.logprob is None or tokenizer is None:
            continue
        text = _piece(tokenizer, ev.token)
        lp.tokens.append(text)
        lp.token_logprobs.append(_logprob(ev.logprob))
        lp.top_logprobs.append(
            {_piece(tokenizer, t): _logprob(v) for t, v in ev.top_logprobs[:top_n]}
        )
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def body(nreq: NativeRequest, ans: Answer, events: list[Event], tokenizer: Any) -> dict:
    """The one JSON body of a non-streamed response."""
    finish = _finish(ans.finish_reason) or "stop"
    if nreq.kind == "chat":
        lp = chat_logprobs(events, tokenizer, nreq.logprobs) if nreq.logprobs is not None else None
        content, calls = tools.parse(ans.text) if nreq.tool_calls else (ans.text, [])
        if calls and finish == "stop":
            finish = "tool_calls"
        out_calls = [s.OutToolCall(**c) for c in calls] or None
        msg = s.AssistantMessage(content=content, tool_calls=out_calls)
        obj: Any = s.ChatCompletion(
            id=f"chatcmpl-{nreq.id}",
            created=nreq.created,
            model=nreq.model,
            choices=[s.ChatChoice(message=msg, logprobs=lp, finish_reason=finish)],
            usage=usage(ans),
            edgeai=info(ans, nreq.policy),
        )
    else:
        lp = (
            completion_logprobs(events, tokenizer, nreq.logprobs)
            if nreq.logprobs is not None
            else None
        )
        obj = s.Completion(
            id=f"cmpl-{nreq.id}",
            created=nreq.created,
            model=nreq.model,
            choices=[s.CompletionChoice(text=ans.text, logprobs=lp, finish_reason=finish)],
            usage=usage(ans),
            edgeai=info(ans, nreq.policy),
        )
    return obj.model_dump(exclude_none=False)


def sse(obj: Any) -> bytes:
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chunk(
    nreq: NativeRequest,
    ev: Event | list[Event] | None,
    tokenizer: Any,
    *,
    first: bool = False,
    finish: str | None = None,
    ans: Answer | None = None,
) -> bytes:
    """One streamed chunk: the text of a token, or of several in a row (and their logprobs when
    asked for), or the role on the first, or the finish."""
    events = ev if isinstance(ev, list) else [ev] if ev is not None else []
    text = "".join(e.text for e in events if e.text)
    extra = info(ans, nreq.policy) if ans is not None else None
    if nreq.kind == "chat":
        lp = (
            chat_logprobs(events, tokenizer, nreq.logprobs)
            if nreq.logprobs is not None and events
            else None
        )
        delta = s.Delta(
            role="assistant" if first else None, content=text if (text or first) else None
        )
        if finish is not None:
            delta = s.Delta()
        obj: Any = s.ChatCompletionChunk(
            id=f"chatcmpl-{nreq.id}",
            created=nreq.created,
            model=nreq.model,
            edgeai=extra,
            choices=[s.ChunkChoice(delta=delta, logprobs=lp, finish_reason=_finish(finish))],
        )
    else:
        lp = (
            completion_logprobs(events, tokenizer, nreq.logprobs)
            if nreq.logprobs is not None and events
            else None
        )
        obj = s.Completion(
            id=f"cmpl-{nreq.id}",
            created=nreq.created,
            model=nreq.model,
            edgeai=extra,
            choices=[s.CompletionChoice(text=text, logprobs=lp, finish_reason=_finish(finish))],
        )
    return sse(obj)


def tool_call_chunk(nreq: NativeRequest, call: dict, index: int) -> bytes:
    """A streamed chunk carrying one whole tool call (`delta.tool_calls`)."""
    delta = s.Delta(
        tool_calls=[
            s.DeltaToolCall(
                index=index,
                id=call["id"],
                type="function",
                function=s.OutFunctionCall(**call["function"]),
            )
        ]
    )
    return sse(
        s.ChatCompletionChunk(
            id=f"chatcmpl-{nreq.id}",
            created=nreq.created,
            model=nreq.model,
            choices=[s.ChunkChoice(delta=delta)],
        )
    )


def text_chunk(nreq: NativeRequest, text: str) -> bytes:
    """A streamed chunk of content text alone (the text around tool calls)."""
    return chunk(nreq, Event(text=text), None)


def usage_chunk(nreq: NativeRequest, ans: Answer) -> bytes:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    cls: Any = s.ChatCompletionChunk if nreq.kind == "chat" else s.Completion
    prefix = "chatcmpl-" if nreq.kind == "chat" else "cmpl-"
    return sse(
        cls(
            id=prefix + nreq.id,
            created=nreq.created,
            model=nreq.model,
            choices=[],
            usage=usage(ans),
            edgeai=info(ans, nreq.policy),
        )
    )
