"""respond() when things go wrong: a remote route that fails, a remote stream that breaks
after the gate escalated, and a gated answer cancelled before the gate decides (tiny model,
real router, stand-in providers on loopback)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fakeproviders import FakeProvider

from edgeai.options import GenerationOptions
from edgeai.routing.respond import respond
from edgeai.routing.router import Router

OPEN = "Who painted the ceiling of the Sistine Chapel?"  # no route claims it: gated under auto
CODE = "Write a Python function that merges two sorted lists."  # the code route: remote
OPTS = GenerationOptions(max_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_model):
    from edgeai.engine import Engine

    return Engine.load(tiny_model)


def _cfg(base_url: str) -> dict:
    return {
        "tiers": {
            "cloud": {
                "kind": "openai",
                "base_url": base_url,
                "model": "big",
                "retries": 1,
                "backoff": 0.01,
                "timeout": 5,
            }
        },
        "policy": {"remote_tier": "cloud"},
    }


@pytest.fixture(scope="module")
def router():
    from edgeai.routing.embed import Encoder

    # The route examples' embeddings are cached under $EDGEAI_HOME, keyed by content: share
    # test_server_api's cache so they are embedded once per machine, not once per module.
    home = (
        Path(os.environ.get("EDGEAI_TEST_CACHE", Path.home() / ".cache" / "edgeai-tests"))
        / "server-home"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEAI_HOME", str(home))
        r = Router.from_config(_cfg("http://127.0.0.1:9"), encoder=Encoder.load())
        r.decide(OPEN, "auto")  # embeds (or reads) the examples now, under that home
        yield r


@pytest.fixture
def fake():
    with FakeProvider("openai") as fp:
        yield fp


def _local_text(engine, prompt: str) -> str:
    return "".join(e.text for e in engine.generate([{"role": "user", "content": prompt}], OPTS))


def test_failing_remote_route_falls_back_to_the_local_answer(engine, router, fake):
    fake.status = 503
    cfg = _cfg(fake.base_url)
    resp = respond(CODE, OPTS, policy="auto", engine=engine, config=cfg, router=router)
    assert resp.decision.tier == "cloud" and resp.decision.route == "code"
    events = list(resp)
    ans = resp.result()
    assert len(fake.requests) == 2  # one retry, then the local model answers
    assert ans.tier == "local" and ans.decision == "fallback-local" and ans.route == "code"
    assert all(e.tier == "local" for e in events) and "".join(e.text for e in events) == ans.text
    assert ans.text == _local_text(engine, CODE) and ans.confidence is not None
    assert any(r.startswith("remote tier cloud failed: ") and "HTTP 503" in r for r in ans.reasons)


def test_remote_stream_breaking_after_escalation_keeps_what_was_shown(engine, router, fake):
    fake.break_after = 2  # two chunks ("Remote ", "says: "), then the connection drops
    cfg = _cfg(fake.base_url)
    resp = respond(
        OPEN, OPTS, policy="auto", engine=engine, config=cfg, router=router, threshold=1.01
    )
    assert resp.decision.gate and resp.decision.route is None
    events = list(resp)
    ans = resp.result()
    assert len(fake.requests) == 1  # tokens were shown: no retry that could repeat them
    assert [e.text for e in events if e.text] == ["Remote ", "says: "]
    assert not any(e.tier == "local" and e.text for e in events), (
        "the distrusted local answer stays hidden"
    )
    assert events[-1].finish_reason == "error" and events[-1].tier == "cloud"
    assert ans.tier == "cloud" and ans.decision == "escalated" and ans.finish_reason == "error"
    assert ans.text == "Remote says: " and ans.confidence < ans.threshold == 1.01
    assert any("→ escalated to cloud" in r for r in ans.reasons)
    assert any(r.startswith("remote tier cloud failed: ") for r in ans.reasons)
    assert not any("returning the local answer" in r for r in ans.reasons)  # it did not


def test_cancelled_gated_answer_is_neither_escalated_nor_hidden(engine, router, fake):
    cfg = _cfg(fake.base_url)
    cancel = threading.Event()
    cancel.set()  # e.g. the client went away while the local answer was held for the gate
    resp = respond(
        OPEN,
        OPTS,
        policy="auto",
        engine=engine,
        config=cfg,
        router=router,
        threshold=1.01,
        cancel=cancel,
    )
    assert resp.decision.gate
    events = list(resp)
    ans = resp.result()
    assert fake.requests == []  # a score under any threshold, yet nothing goes out
    assert ans.tier == "local" and ans.finish_reason == "cancelled" and ans.decision == "kept-local"
    assert (
        ans.reasons[-1] == "cancelled" and ans.stats.generation_tokens == 0
    )  # set before the start
    assert all(e.tier == "local" for e in events) and events[-1].finish_reason == "cancelled"
    assert "".join(e.text for e in events) == ans.text
