"""`edgeai serve` end to end: the openai SDK over the Unix socket, and bad input.

One real server subprocess (tiny model) serves the whole module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serverproc import start_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = start_server(tiny_model, tmp_path_factory.mktemp("srv"), "--name", "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def letters(tiny_model) -> dict[str, int]:
    """A logit_bias that keeps the tiny model's every token among "a", "b", "c", "d"."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    return {str(tok.token_to_id(ch)): 100 for ch in "abcd"}


@pytest.fixture
def sdk(server):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.socket)), timeout=60)
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0
    )
    yield client
    client.close()


def test_sdk_chat_non_streaming(sdk):
    r = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 6
    assert r.usage.prompt_tokens > 0
    for tok in choice.logprobs.content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[-1].logprob
    extra = r.model_extra["edgeai"]
    assert (
        extra["tier"] == "local"
        and 0.0 <= extra["confidence"] <= 1.0
        and extra["policy"] == "local-only"
    )


def test_sdk_chat_streaming_matches_non_streaming(sdk):
    args = dict(
        model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=12, temperature=0
    )
    whole = sdk.chat.completions.create(**args).choices[0].message.content
    chunks = list(
        sdk.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1


def test_sdk_completions_and_models(sdk):
    ids = [m.id for m in sdk.models.list()]
    assert "tiny" in ids
    r = sdk.completions.create(model="tiny", prompt="The cat", max_tokens=5, logprobs=2)
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.tokens)
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(model="tiny", prompt="The cat", max_tokens=5, stream=True)
    )
    assert streamed == r.choices[0].text


def test_seed_reproducible_and_stop(sdk, letters):
    args = dict(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=10,
        temperature=1.0,
        seed=7,
    )
    a = sdk.chat.completions.create(**args).choices[0].message.content
    b = sdk.chat.completions.create(**args).choices[0].message.content
    assert a == b
    # logit_bias keeps every token among a, b, c, d (one character each): 10 tokens, 10 letters
    forced = dict(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10, logit_bias=letters
    )
    greedy = sdk.chat.completions.create(**forced).choices[0]
    text = greedy.message.content
    assert greedy.finish_reason == "length" and len(text) == 10 and set(text) <= set("abcd")
    stop = text[5:8]
    cut = sdk.chat.completions.create(**forced, stop=["zz", stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[: text.find(stop)]
    streamed = sdk.chat.completions.create(**forced, stop=[stop], stream=True)
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert streamed_text == text[: text.find(stop)]
    never = sdk.chat.completions.create(**forced, stop=["zz"]).choices[0]
    assert never.finish_reason == "length" and never.message.content == text


def test_health_metrics_openapi(server):
    with server.client() as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["max_batch"] == 16
        c.post("/v1/chat/completions", json=CHAT).raise_for_status()
        metrics = c.get("/metrics").text
        for name in (
            "edgeai_requests_total",
            "edgeai_generation_tokens_total",
            "edgeai_queue_depth",
            "edgeai_tokens_per_second",
            "edgeai_escalations_total",
        ):
            assert name in metrics
        assert server.metric("edgeai_generation_tokens_total") > 0
        spec = c.get("/openapi.json").json()
        assert {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/health",
            "/metrics",
        } <= set(spec["paths"])
        ps = c.get("/api/ps").json()
        assert ps["models"][0]["name"] == "tiny"


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe\x00garbage", 400, "invalid_utf8"),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "invalid_unicode",
    ),
    (b"[1, 2]", 400, "invalid_json"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "max_tokens": -1}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "max_tokens": 10**12}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "temperature": "hot"}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "messages": []}).encode(), 400, "invalid_value"),
    (
        json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
        "invalid_value",
    ),
    (json.dumps({**CHAT, "temperature": float("nan")}).encode(), 400, "invalid_json"),
    (json.dumps({**CHAT, "policy": "yolo"}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "temperature": 0.7, "seed": 2**64}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "temperature": 0.7, "seed": 10**40}).encode(), 400, "invalid_value"),
    (json.dumps({**CHAT, "model": "no-such-model"}).encode(), 404, "model_not_found"),
    (json.dumps({**CHAT, "model": "/etc"}).encode(), 404, "model_not_found"),
    (
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
        400,
        "context_length_exceeded",
    ),
    (b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}', 413, "body_too_large"),
    # Item 12 of issue 11: 100k tiny messages took seconds of the model's thread to tokenize.
    (
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "x"}] * 100_000}).encode(),
        400,
        "invalid_value",
    ),
    (
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "x"}] * 4097}).encode(),
        400,
        "invalid_value",
    ),
    (
        json.dumps(
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 4097}],
            }
        ).encode(),
        400,
        "invalid_value",
    ),
    (json.dumps({"model": "tiny", "prompt": [1] * 131073}).encode(), 400, "invalid_value"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_error_object(server, body, status, code):
    with server.client() as c:
        path = "/v1/completions" if b'"prompt"' in body[:40] else "/v1/chat/completions"
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"]
        # ...and the server keeps serving.
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_route_and_method(server):
    with server.client() as c:
        assert c.get("/v1/nope").json()["error"]["code"] == "not_found"
        assert c.get("/v1/chat/completions").status_code == 405


def test_embeddings_match_the_router_encoder(server):
    with server.client() as c:
        texts = ["a cat", "a dog sleeps on the sofa"]
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts})
        assert r.status_code == 200, r.text  # the encoder is here (conftest fetched it)
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and r.json()["usage"]["prompt_tokens"] > 0
        # what the router's own encoder gives for the same texts
        from edgeai.routing.embed import Encoder

        want = np.asarray(Encoder.load().encode(texts))
        assert np.abs(np.array([d["embedding"] for d in data]) - want).max() < 1e-5
        assert c.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_ps_command_shows_the_loaded_model(server):
    import subprocess
    import sys

    with server.client() as c:
        c.post("/v1/chat/completions", json=CHAT).raise_for_status()
    r = subprocess.run(
        [sys.executable, "-m", "edgeai", "ps", "--socket", str(server.socket), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["models"][0]["name"] == "tiny" and status["models"][0]["expires_in_seconds"] > 0
    r = subprocess.run(
        [sys.executable, "-m", "edgeai", "ps", "--socket", str(server.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0 and "tiny" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "edgeai", "ps", "--socket", str(server.socket) + ".none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "no server socket" in r.stderr and "Traceback" not in r.stderr


def test_escalation_tier_and_confidence_reported(tiny_model, tmp_path):
    from fakeproviders import FakeProvider

    with FakeProvider("openai") as remote:
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.toml").write_text(
            f'[tiers.cloud]\nkind = "openai"\nbase_url = "{remote.base_url}"\nmodel = "big"\n'
            '[policy]\nremote_tier = "cloud"\nthreshold = 0.99\n'
        )
        # The router embeds its route examples once and caches them under $EDGEAI_HOME: keep
        # that cache between runs (it is keyed by content).
        home = (
            Path(os.environ.get("EDGEAI_TEST_CACHE", Path.home() / ".cache" / "edgeai-tests"))
            / "server-home"
        )
        srv = start_server(tiny_model, tmp_path, "--name", "tiny", home=home)
        try:
            # a question no route claims: under "auto" the local answer is scored, then gated
            question = "Who painted the ceiling of the Sistine Chapel?"
            ask = {
                "model": "tiny",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 8,
            }
            with srv.client() as c:
                local = c.post(
                    "/v1/chat/completions", json=ask
                ).json()  # server default: local-only
                assert (
                    local["edgeai"]["tier"] == "local" and local["edgeai"]["policy"] == "local-only"
                )
                assert not remote.requests
                gated = c.post("/v1/chat/completions", json={**ask, "policy": "auto"}).json()
                assert gated["edgeai"]["tier"] == "cloud", gated["edgeai"]
                assert gated["choices"][0]["message"]["content"] == remote.reply
                info = gated["edgeai"]
                assert info["route"] is None and info["threshold"] == 0.99
                assert info["confidence"] is not None  # scored: the gate decided
                assert any(r.endswith("→ escalated to cloud") for r in info["reasons"]), info
                assert len(remote.requests) == 1
                streamed = c.post(
                    "/v1/chat/completions", json={**ask, "policy": "remote", "stream": True}
                ).text
                assert '"tier": "cloud"' in streamed and streamed.rstrip().endswith("data: [DONE]")
            assert srv.metric('edgeai_escalations_total{tier="cloud"}') == 2
        finally:
            assert srv.stop() == 0, srv.output()


def test_logit_bias_and_penalties(sdk, letters):
    forced = sdk.completions.create(
        model="tiny", prompt="abc", max_tokens=6, logprobs=0, logit_bias={"70": 100}
    )
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 6 and len(set(tokens)) == 1

    # Among four letters (one token each) the greedy text repeats itself; penalties must move it.
    def text(**penalty) -> str:
        return (
            sdk.completions.create(
                model="tiny", prompt="abc", max_tokens=16, logit_bias=letters, **penalty
            )
            .choices[0]
            .text
        )

    def most(t: str) -> int:
        return max(t.count(ch) for ch in t)

    plain = text()
    assert len(plain) == 16 and set(plain) <= set("abcd") and len(set(plain)) < 4
    spread = text(frequency_penalty=2.0)
    assert len(set(spread)) > len(set(plain)) and most(spread) < most(plain)
    assert len(set(text(presence_penalty=2.0))) > len(set(plain))
    assert most(text(frequency_penalty=-2.0)) > most(plain)  # a negative penalty rewards repeats
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        sdk.completions.create(model="tiny", prompt="abc", max_tokens=2, logit_bias={"99999999": 1})


def test_token_ids_outside_the_vocabulary_are_400_before_the_model(server, tiny_model):
    """Ids index the embedding table: one past its end must never reach the model (a crash,
    or text computed from memory outside the table). The tiny model's vocabulary stands in
    for SmolLM2's 49152."""
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    with server.client() as c:
        for ids in ([100_000_000], [vocab], [5, vocab + 3, 6], [-1], [2**64]):
            for stream in (False, True):
                r = c.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": ids, "max_tokens": 1, "stream": stream},
                )
                assert r.status_code == 400, (ids, stream, r.text)
                assert r.json()["error"]["message"]
        ok = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": [vocab - 1], "max_tokens": 1}
        )
        assert ok.status_code == 200, ok.text
        # Every other place an id enters: logit_bias keys, top_logprobs.
        for extra in (
            {"logit_bias": {str(vocab): 1}},
            {"logit_bias": {"-1": 1}},
            {"logit_bias": {"1" * 30: 1}},
            {"logprobs": 21},
            {"logprobs": -1},
        ):
            r = c.post(
                "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1, **extra}
            )
            assert r.status_code == 400, (extra, r.text)
        r = c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21})
        assert r.status_code == 400, r.text
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert server.proc.poll() is None
