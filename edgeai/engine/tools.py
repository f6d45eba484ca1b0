"""Tool calls: a conversation with tools rendered by the model's own chat template, the
grammar of a forced call, and the calls parsed back out of the answer.

The call format is Qwen2.5's (also Hermes' and many fine-tunes'): each call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the answer's text.
Templates are asked to render tools with `apply_chat_template(messages, tools=...)`; a
template that never mentions `tools` would drop them silently, so that is refused instead.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgeai.engine import constrain
from edgeai.errors import InvalidInput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NO_TOOLS = "this model's chat template has no tool support"


@dataclass(frozen=True)
class ToolChat:
    """Chat messages (dicts in Hugging Face's chat-template shape, which may carry
    `tool_calls` or role "tool") and the tools to offer (OpenAI's function definitions)."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)

    def encode(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids through the model's template (the engine's tokenizer lock held).

        Raises:
            InvalidInput: the model's template cannot render tools or tool messages.
        """
        if not supports_tools(tokenizer):
            raise InvalidInput(
                NO_TOOLS,
                "use a model whose template renders tools (e.g. Qwen2.5), "
                "or send the request without tools",
            )
        try:
            ids = tokenizer.apply_chat_template(
                self.messages, tools=self.tools or None, add_generation_prompt=True
            )
        except Exception as e:  # a template's own raise_exception (e.g. bad role order)
            raise InvalidInput(
                f"the chat template refused the conversation: {e}",
                "check the roles and the order of the messages",
            ) from None
        return list(ids)


def supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders a `tools` list."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the "tool_use" one, or any
        template = template.get("tool_use") or " ".join(str(t) for t in template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def call_schema(tool: dict) -> dict:
    """JSON schema of one call of `tool` ({"name": ..., "arguments": {...}})."""
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_constraint(tools: list[dict], name: str | None = None) -> constrain.Constraint:
    """The grammar of one well-formed call: of the tool `name`, or of any of `tools`.

    Raises:
        InvalidInput: a tool's parameters are a schema the grammar cannot enforce.
    """
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    schemas = [call_schema(t) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": constrain.JSON_STYLE}
    grammar = (
        f'start: {json.dumps(OPEN)} "\\n" call "\\n" {json.dumps(CLOSE)}\n'
        f"call: %json {json.dumps(schema)}"
    )
    return constrain.lark(grammar, "tool_call", "a tool's parameters schema", (OPEN, CLOSE))


def check_tools(tools: list[dict]) -> None:
    """Refuse duplicate names and parameter schemas that cannot be enforced (400s)."""
    seen: set[str] = set()
    for i, t in enumerate(tools):
        name = t["function"]["name"]
        if name in seen:
            raise InvalidInput(
                f"tools[{i}]: the name {name!r} is used twice", "give each tool its own name"
            )
        seen.add(name)
        params = t["function"].get("parameters")
        if params is not None:  # the schema alone first: its message names the feature
            constrain.json_schema(params, f"tools[{i}].function.parameters ({name})")
            if params.get("type", "object") != "object":
                raise InvalidInput(
                    f"tools[{i}].function.parameters ({name}) must describe an object",
                    'use {"type": "object", "properties": {...}}',
                )
        call_constraint([t])


def _call(payload: str) -> dict | None:
    """An OpenAI tool call from the JSON between the tags, or None if it is not one."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": args},
    }


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content outside the calls or None, tool calls) of a whole answer; a malformed block
    stays in the content."""
    stream = CallStream()
    items = stream.feed(text) + stream.flush()
    calls = [v for kind, v in items if kind == "call"]
    if not calls:
        # Some models (Qwen2.5-Coder) answer a tool request with the bare call object.
        stripped = text.strip()
        bare = (
            _call(stripped)
            if stripped.startswith("{") and _object_end(stripped) == len(stripped)
            else None
        )
        if bare is not None and "arguments" in json.loads(stripped):
            return None, [bare]
        return text, []
    rest = "".join(v for kind, v in items if kind == "content").strip()
    return rest or None, calls


def _object_end(s: str) -> int | None:
    """Index just past the JSON object or array `s` starts with; None while it is unclosed.

    Strings are skipped, so a value holding "</tool_call>" does not end the call."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class CallStream:
    """Splits streamed text into content and tool calls as it arrives.

    `feed` returns ("content", text) and ("call", call) items; text that could start a
    call is held back until it does or cannot. A call's JSON is read to its closing brace
    (strings skipped) before the closing tag is looked for. `flush` returns what is left at
    the end (an unfinished call comes back as content).
    """

    def __init__(self) -> None:
        self.buf = ""
        self.inside = False
        self.calls = 0

    def _block(self) -> tuple[int, dict | None] | None:
        """(length, call or None if malformed) of the block `buf` starts with; None: wait."""
        body = self.buf[len(OPEN) :]
        payload = body.lstrip()
        if not payload:
            return None
        skip = len(OPEN) + len(body) - len(payload)
        if payload[0] == "{":
            end = _object_end(payload)
            if end is None:
                return None
            after = payload[end:]
            tail = after.lstrip()
            if len(tail) < len(CLOSE) and CLOSE.startswith(tail):
                return None
            if tail.startswith(CLOSE):
                size = skip + end + (len(after) - len(tail)) + len(CLOSE)
                return size, _call(payload[:end])
        close = self.buf.find(CLOSE)  # malformed: the block ends at the next closing tag
        return None if close < 0 else (close + len(CLOSE), None)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        out: list[tuple[str, Any]] = []
        while self.buf:
            if self.inside:
                block = self._block()
                if block is None:
                    break
                size, call = block
                if call is not None:
                    self.calls += 1
                    out.append(("call", call))
                else:
                    out.append(("content", self.buf[:size]))
                self.buf, self.inside = self.buf[size:], False
                continue
            start = self.buf.find(OPEN)
            if start >= 0:
                if start:
                    out.append(("content", self.buf[:start]))
                self.buf, self.inside = self.buf[start:], True
                continue
            keep = next(
                (
                    k
                    for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                    if self.buf.endswith(OPEN[:k])
                ),
                0,
            )
            emit, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            if emit:
                out.append(("content", emit))
            break
        return out

    def flush(self) -> list[tuple[str, Any]]:
        rest, self.buf, self.inside = self.buf, "", False
        return [("content", rest)] if rest else []
