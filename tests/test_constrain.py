"""Constrained decoding (engine/constrain.py) and tool calls (engine/tools.py) on real models.

The grammar's processor runs in both decoding lanes: a request alone (`Engine.generation`,
as `edgeai run`) and requests batched together in mlx-lm's BatchGenerator, where every row
keeps its own matcher. A random tiny model writes garbage when free, so an answer that
parses and validates shows the mask did the work.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from tinymodel import TOOLS_TEMPLATE, WEATHER, make_tiny_model

from edgeai.engine import constrain, tools
from edgeai.engine.tools import CallStream, ToolChat
from edgeai.errors import InvalidInput
from edgeai.options import GenerationOptions
from edgeai.server.app import Settings, build_app
from edgeai.server.models import ModelRegistry
from edgeai.server.scheduler import Scheduler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "score", "color", "tags"],
    "additionalProperties": False,
}


def _answer(engine, constraint, seed: int, max_tokens: int = 400) -> tuple[str, str]:
    events = list(
        constrain.generate(
            engine,
            [{"role": "user", "content": "a person"}],
            GenerationOptions(max_tokens=max_tokens, temperature=1.0, seed=seed),
            constraint,
        )
    )
    return "".join(e.text for e in events if e.text), events[-1].finish_reason


def test_schema_answers_parse_and_validate_alone(tiny_engine):
    c = constrain.json_schema(SCHEMA)
    for seed in range(5):
        text, finish = _answer(tiny_engine, c, seed)
        assert finish == "stop", text  # the grammar completed and forced the end
        jsonschema.validate(json.loads(text), SCHEMA)
    free = "".join(
        e.text
        for e in tiny_engine.generate(
            "a person", GenerationOptions(max_tokens=30, seed=0, temperature=1.0)
        )
    )
    with pytest.raises(ValueError):  # without the mask the random model writes no JSON
        json.loads(free)


def test_json_object_is_an_object(tiny_engine):
    text, finish = _answer(tiny_engine, constrain.json_object(), 3, max_tokens=300)
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_digit_runs_are_cut_where_the_grammar_allows(tiny_engine, monkeypatch):
    """A long run of digit tokens ends where the grammar allows another token; a pattern
    that requires the digits still gets them."""
    numbers = constrain.json_schema({"type": "array", "items": {"type": "number"}, "maxItems": 4})

    def longest_run(constraint, seed):
        text, finish = _answer(tiny_engine, constraint, seed)
        assert finish == "stop"
        return max((len(m) for m in re.findall(r"[0-9]+", text)), default=0), text

    free = [longest_run(numbers, seed)[0] for seed in range(12)]
    assert max(free) > 6  # seed 8: 6.51514e3144335551618706
    monkeypatch.setattr(constrain, "MAX_DIGIT_RUN", 3)
    assert all(longest_run(numbers, seed)[0] <= 3 for seed in range(12))
    code = constrain.json_schema({"type": "string", "pattern": "^[0-9]{12}$"})
    run, text = longest_run(code, 0)
    assert run == 12 and re.fullmatch(r'"[0-9]{12}"', text)


@pytest.mark.parametrize(
    "schema,named",
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "strin"}, "strin"),
        ({"type": "string", "pattern": "(?=x)"}, "look-around"),
        ({"$ref": "#/nowhere"}, "nowhere"),
        ([1, 2], "list"),
    ],
)
def test_unsupported_schemas_are_named(schema, named):
    with pytest.raises(InvalidInput) as e:
        constrain.json_schema(schema)
    assert named in e.value.message


def test_tool_call_stream_splits_text_and_calls():
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    text = "Let me check. " + call + " done"
    for size in (1, 3, 7, len(text)):
        s = CallStream()
        items = [
            i for k in range(0, len(text), size) for i in s.feed(text[k : k + size])
        ] + s.flush()
        content = "".join(v for kind, v in items if kind == "content")
        calls = [v for kind, v in items if kind == "call"]
        assert content == "Let me check.  done"
        assert len(calls) == 1 and calls[0]["function"]["name"] == "f"
        assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    content, calls = tools.parse(text)
    assert content == "Let me check.  done" and len(calls) == 1
    # A value holding the closing tag (seen from SmolLM2 under the grammar) stays in the value.
    tricky = '<tool_call>\n{"name": "f", "arguments": {"s": "a}}</tool_call> b"}}\n</tool_call>'
    for size in (1, 5, len(tricky)):
        s = CallStream()
        items = [i for k in range(0, len(tricky), size) for i in s.feed(tricky[k : k + size])]
        assert [kind for kind, _ in items + s.flush()] == ["call"]
        assert json.loads(items[0][1]["function"]["arguments"]) == {"s": "a}}</tool_call> b"}
    broken = "<tool_call>{not json}</tool_call>"
    assert tools.parse(broken) == (broken, [])
    s = CallStream()
    assert s.feed("<tool_call>{half") == [] and s.flush() == [("content", "<tool_call>{half")]


def test_bad_tools_are_refused():
    with pytest.raises(InvalidInput, match="used twice"):
        tools.check_tools([WEATHER, WEATHER])
    bad = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"not": {}}}},
        },
    }
    with pytest.raises(InvalidInput, match="not"):
        tools.check_tools([bad])
    with pytest.raises(InvalidInput, match="object"):
        tools.check_tools(
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
        )


def test_template_without_tools_is_refused(tiny_engine):
    with pytest.raises(InvalidInput, match="no tool support"):
        tiny_engine.encode(ToolChat([{"role": "user", "content": "hi"}], [WEATHER]))


@pytest.fixture(scope="module")
def tools_app(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("constrainhome")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEAI_HOME", str(home / "home"))
    mp.setenv("EDGEAI_CONFIG_DIR", str(home / "config"))
    scheduler = Scheduler(max_batch=8, max_queue=16, keep_alive=-1)
    qwenish = make_tiny_model(home / "tiny-tools", template=TOOLS_TEMPLATE)
    app = build_app(
        scheduler,
        ModelRegistry({"tiny": tiny_model, "tools": qwenish}, use_store=False),
        settings=Settings(policy="local-only"),
        manage_scheduler=False,
    )
    scheduler.start()
    yield app, scheduler
    scheduler.stop()
    mp.undo()


def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=120
        ) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=b) for b in bodies])

    return asyncio.run(go())


def test_batched_requests_each_follow_their_own_schema(tools_app):
    """Six constrained requests (each requires its own key) and two free ones share batches."""
    app, scheduler = tools_app
    before = scheduler.lanes["batched"]

    def schema(i: int) -> dict:
        return {
            **SCHEMA,
            "properties": {**SCHEMA["properties"], f"k{i}": {"enum": [i]}},
            "required": [*SCHEMA["required"], f"k{i}"],
        }

    base = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,  # a random model may write long numbers before the grammar ends
        "temperature": 1.0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    bodies = [
        {
            **base,
            "seed": i,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schema(i)},
            },
        }
        for i in range(6)
    ] + [{**base, "seed": 9, "max_tokens": 16}] * 2
    rs = _post_all(app, bodies)
    assert scheduler.lanes["batched"] > before
    for i, r in enumerate(rs[:6]):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema(i))
    # The two free requests, one seed, sample the same answer beside the constrained rows. Kept
    # short: requests admitted a step apart fill their prompts in batches of other sizes (the
    # float32 GEMM from 32 rows, the tile below), and a long sample from this random model
    # eventually meets a near-tie that the other rounding tips (seen after ~40 tokens).
    assert (
        rs[6].json()["choices"][0]["message"]["content"]
        == rs[7].json()["choices"][0]["message"]["content"]
    )


def test_forced_tool_calls_alone_and_batched(tools_app):
    app, _ = tools_app
    body = {
        "model": "tools",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "max_tokens": 200,
        "temperature": 1.0,
        "tools": [WEATHER],
    }
    rs = _post_all(app, [{**body, "seed": 1, "tool_choice": "required"}])
    rs += _post_all(
        app,
        [
            {
                **body,
                "seed": i,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            }
            for i in range(4)
        ],
    )
    for r in rs:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"]
        )


@pytest.mark.parametrize(
    "extra,status,says",
    [
        ({"model": "tiny", "tools": [WEATHER]}, 400, "no tool support"),
        ({"tools": [WEATHER, WEATHER]}, 400, "used twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            400,
            "not",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            400,
            "tools.0.function.name",
        ),
        ({"tool_choice": "required"}, 400, "no tools"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "other"}},
            },
            400,
            "other",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {}}},
                }
            },
            400,
            "Unimplemented keys",
        ),
        ({"response_format": {"type": "json_schema"}}, 400, "json_schema is required"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#"}},
                }
            },
            400,
            "admits no answer",
        ),
        ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
        ({"messages": [{"role": "assistant", "content": None}]}, 400, "content is missing"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{x"},
                            }
                        ],
                    }
                ]
            },
            400,
            "not JSON",
        ),
    ],
)
def test_bad_structured_requests_are_400(tools_app, extra, status, says):
    app, _ = tools_app
    body = {
        "model": "tools",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }
    (r,) = _post_all(app, [body])
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_tool_messages_are_rendered_and_accepted(tools_app):
    app, _ = tools_app
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    (r,) = _post_all(
        app, [{"model": "tools", "messages": messages, "tools": [WEATHER], "max_tokens": 5}]
    )
    assert r.status_code == 200, r.text
    with_history = r.json()["usage"]["prompt_tokens"]
    (short,) = _post_all(
        app, [{"model": "tools", "messages": messages[:1], "tools": [WEATHER], "max_tokens": 5}]
    )
    shown = short.json()["usage"]["prompt_tokens"]
    assert with_history > shown + 20  # the call and result are in the prompt
    (hidden,) = _post_all(
        app,
        [
            {
                "model": "tools",
                "messages": messages[:1],
                "tools": [WEATHER],
                "tool_choice": "none",
                "max_tokens": 5,
            }
        ],
    )
    assert hidden.json()["usage"]["prompt_tokens"] < shown - 50  # "none": tools are not shown


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from edgeai.engine import Engine

    return Engine.load(tiny_model, name="tiny")


@pytest.mark.slow
def test_smollm_schema_answers_validate(smollm_engine):
    """Ten sampled answers of the real 135M model under a schema all parse and validate."""
    c = constrain.json_schema(SCHEMA)
    for seed in range(10):
        text, finish = _answer(smollm_engine, c, seed, max_tokens=200)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_tag_the_vocabulary_holds_as_one_token_is_matched_as_that_token():
    """Qwen2.5 writes <tool_call> as token 151657: the forced-call grammar must take it."""
    from edgeai.engine import tools as tl

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    c = tl.call_constraint([tool])

    class Vocab:  # what a Hugging Face tokenizer says of its added tokens
        def __init__(self, added: dict) -> None:
            self.added = added

        def get_added_vocab(self) -> dict:
            return self.added

    assert c.for_tokenizer(Vocab({})) == c.grammar  # tags spelled out as text
    rewritten = c.for_tokenizer(Vocab({"<tool_call>": 151657, "</tool_call>": 151658}))
    assert rewritten != c.grammar and "151657" in rewritten and "151658" in rewritten


def test_a_bare_call_object_is_a_tool_call():
    """Qwen2.5-Coder answers a tool request with the call object alone, without the tags."""
    from edgeai.engine import tools as tl

    content, calls = tl.parse('{"name": "get_weather", "arguments": {"city": "Paris"}}\n')
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    for text in ('{"name": "x"}', '{"name": "x", "arguments": {}} and more', "plain text"):
        assert tl.parse(text) == (text, [])
