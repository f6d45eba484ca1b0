"""Structured output and tool calls through `edgeai serve`, with the official openai SDK over
the Unix socket, unchanged.

One real server subprocess serves a tiny random model whose chat template is Qwen2.5's
(tools section included): the model knows nothing, so every well-formed answer is the
grammar's doing.
"""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serverproc import start_server
from tinymodel import TOOLS_TEMPLATE, WEATHER, make_tiny_model

ASK = [{"role": "user", "content": "weather in Paris?"}]


class Reading(BaseModel):
    city: Annotated[str, Field(max_length=12)]  # a random model's free string would not end
    degrees: int
    rain: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_model(
        tmp_path_factory.mktemp("toolsmodel") / "tiny-tools", template=TOOLS_TEMPLATE
    )
    srv = start_server(model, tmp_path_factory.mktemp("srv"), "--name", "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture
def sdk(server):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.socket)), timeout=120)
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0
    )
    yield client
    client.close()


def test_sdk_parse_with_a_pydantic_model(sdk):
    """`chat.completions.parse` sends a strict json_schema and parses the answer into the model."""
    for seed in range(3):
        r = sdk.chat.completions.parse(
            model="tiny",
            messages=ASK,
            response_format=Reading,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Reading)


def test_sdk_json_schema_streamed_equals_whole(sdk):
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "ok": {"type": "boolean"},
            "xs": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 4},
        },
        "required": ["n", "ok", "xs"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    args = dict(model="tiny", messages=ASK, response_format=fmt, max_tokens=100, temperature=0)
    whole = sdk.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), schema)
    chunks = list(sdk.chat.completions.create(**args, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    obj = sdk.chat.completions.create(
        model="tiny",
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
    ).choices[0]
    assert obj.message.content.startswith("{")


def test_sdk_tool_calls_whole_and_streamed(sdk):
    args = dict(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=200,
        temperature=1.0,
        seed=4,
    )
    choice = sdk.chat.completions.create(**args).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    args_obj = json.loads(call.function.arguments)
    jsonschema.validate(args_obj, WEATHER["function"]["parameters"])

    chunks = list(sdk.chat.completions.create(**args, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == args_obj  # same seed, same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        "tool_calls"
    ]

    # The call and its result go back in the next turn, as an app sends them.
    follow = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"},
    ]
    again = sdk.chat.completions.create(
        model="tiny", messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert again.choices[0].message.tool_calls is None
    assert again.usage.prompt_tokens > 40


def test_sdk_bad_schema_and_tools_are_400(sdk):
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys"):
        sdk.chat.completions.create(
            model="tiny",
            messages=ASK,
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
            },
        )
    bad_tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "string", "pattern": "(?=a)"}},
            },
        },
    }
    with pytest.raises(openai.BadRequestError, match="look-around"):
        sdk.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, tools=[bad_tool])


def test_openapi_documents_structured_output_and_tools(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    req = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"response_format", "tools", "tool_choice"} <= set(req)
    roles = spec["components"]["schemas"]["ChatMessage"]["properties"]["role"]["enum"]
    assert "tool" in roles
    assert "tool_calls" in spec["components"]["schemas"]["AssistantMessage"]["properties"]
