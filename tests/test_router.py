"""Sentence encoder, router, policy and the respond() pipeline (tiny model + loopback stand-ins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakeproviders import FakeProvider  # noqa: E402

from edgeai.options import GenerationOptions  # noqa: E402
from edgeai.routing import confidence  # noqa: E402
from edgeai.routing.respond import respond  # noqa: E402
from edgeai.routing.router import Router, routes_from_config, should_escalate  # noqa: E402

KEY = "sk-router-test-9d8e7f6a5b"
CHAT = "Hello there, how's your day going?"
OPEN = "Who painted the ceiling of the Sistine Chapel?"  # no route claims it: the score decides


@pytest.fixture(scope="module")
def encoder():
    from edgeai.routing.embed import Encoder

    return Encoder.load()


@pytest.fixture(scope="module")
def router(encoder, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the example-embedding cache goes to a temp home
        mp.setenv("EDGEAI_HOME", str(tmp_path_factory.mktemp("home")))
        yield Router.from_config({}, encoder=encoder)


def test_minilm_matches_sentence_transformers_reference(encoder):
    # The similarity matrix printed in sentence-transformers' quickstart for all-MiniLM-L6-v2.
    v = np.asarray(
        encoder.encode(
            ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
        )
    )
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    expected = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert np.abs(v @ v.T - expected).max() < 2e-3
    # Padding in a batch must not change an embedding.
    single = np.asarray(encoder.encode(["He drove to the stadium."]))[0]
    assert np.allclose(single, v[2], atol=1e-5)


# Paraphrases written for this test; none is among the shipped examples.
HELD_OUT = [
    ("If 4 workers build a wall in 6 days, how long would 3 workers take?", "math"),
    ("What's 12 percent of 850?", "math"),
    ("Write me a Python function that checks whether a string is a palindrome.", "code"),
    ("My Java program crashes with a NullPointerException, how do I fix it?", "code"),
    ("What's the temperature in Paris at the moment?", "current"),
    ("Any breaking news today?", "current"),
    ("Hey! How's it going?", "chitchat"),
    ("Could you tell me something funny?", "chitchat"),
    ("Please rephrase this so it sounds more polite: give me the report now.", "rewrite"),
    ("Summarise the following paragraph in two lines.", "rewrite"),
    ("Get all the phone numbers out of this text.", "extract"),
    ("Which people are named in the following news story?", "extract"),
]


@pytest.mark.parametrize("text,route", HELD_OUT)
def test_router_picks_expected_route_for_paraphrases(router, text, route):
    got, sim, per = router.match(text)
    assert got == route, f"{text!r} → {got} ({sim:.2f}); per route {per}"
    assert text not in router.routes[route].examples


def test_policies(router):
    assert (
        router.decide("What's 12 percent of 850?", "auto").tier == "local"
    )  # no remote configured
    r = Router(router.routes, "cloud", router.min_similarity, encoder=router.encoder)
    d = r.decide("What's 12 percent of 850?", "auto")
    assert (d.tier, d.route, d.gate) == ("cloud", "math", False)
    d = r.decide(CHAT, "auto")
    assert (d.tier, d.route, d.gate, d.remote) == ("local", "chitchat", True, "cloud")
    assert r.decide(CHAT, "remote").tier == "cloud"
    assert r.decide("What's 12 percent of 850?", "local-only").tier == "local"
    # A local route is trusted: a low score alone does not escalate it, a hard flag does.
    assert (
        not should_escalate(d, 0.1, 0.5, [])[0] and should_escalate(d, 0.9, 0.5, ["truncated"])[0]
    )
    o = r.decide(OPEN, "auto")
    assert (o.tier, o.route, o.gate) == ("local", None, True)
    assert should_escalate(o, 0.3, 0.5, [])[0] and not should_escalate(o, 0.7, 0.5, [])[0]
    assert should_escalate(o, 0.9, 0.5, ["repetition"])[0]


def test_config_routes_override_and_extend():
    routes, _ = routes_from_config(
        {
            "routes": {
                "legal": {"tier": "remote", "examples": ["Is this contract clause legal?"]},
                "math": {"tier": "local", "examples": ["2+2"]},
            }
        }
    )
    assert routes["legal"].tier == "remote" and routes["math"].tier == "local" and "code" in routes


# -- respond(): escalation, fallback, remote routes ----------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model):
    from edgeai.engine import Engine

    return Engine.load(tiny_model)


def stopping_options(engine, prompt: str) -> GenerationOptions:
    """Options under which the tiny model's greedy answer to `prompt` ends by a stop string
    (taken from that answer, first seen after some text) rather than at max tokens."""
    evs = list(
        engine.generate([{"role": "user", "content": prompt}], GenerationOptions(max_tokens=16))
    )
    text = "".join(e.text for e in evs)
    k = next(
        k
        for k in range(3, len(text) - 1)
        if text.find(text[k : k + 2]) == k and text[k : k + 2].strip()
    )
    return GenerationOptions(max_tokens=24, stop=[text[k : k + 2]])


@pytest.fixture(scope="module")
def gated_options(engine):
    return stopping_options(engine, OPEN)


def _cfg(fp: FakeProvider) -> dict:
    return {
        "tiers": {
            "cloud": {
                "kind": fp.kind,
                "base_url": fp.base_url,
                "model": "big",
                "api_key_env": "EDGEAI_RT_KEY",
                "retries": 1,
                "backoff": 0.01,
                "timeout": 5,
            }
        },
        "policy": {"remote_tier": "cloud"},
    }


@pytest.fixture(params=["openai", "anthropic"])
def fake(request, monkeypatch):
    monkeypatch.setenv("EDGEAI_RT_KEY", KEY)
    with FakeProvider(request.param) as fp:
        yield fp


def _local_score(engine, router, opts, cfg) -> float:
    resp = respond(OPEN, opts, policy="local-only", engine=engine, config=cfg, router=router)
    ans = resp.result()
    assert ans.finish_reason == "stop" and not confidence.hard_flags(ans.signals)
    return ans.confidence


def test_escalates_below_threshold_not_above(engine, router, gated_options, fake):
    cfg = _cfg(fake)
    r = Router.from_config(cfg, encoder=router.encoder)
    score = _local_score(engine, r, gated_options, cfg)

    above = respond(
        OPEN,
        gated_options,
        policy="auto",
        engine=engine,
        config=cfg,
        router=r,
        threshold=score - 0.01,
    )
    events = list(above)
    ans = above.result()
    assert ans.tier == "local" and ans.decision == "kept-local" and fake.requests == []
    assert all(e.tier == "local" for e in events) and ans.route is None
    assert ans.confidence == pytest.approx(score) and ans.threshold == pytest.approx(score - 0.01)

    below = respond(
        OPEN,
        gated_options,
        policy="auto",
        engine=engine,
        config=cfg,
        router=r,
        threshold=score + 0.01,
    )
    events = list(below)
    ans = below.result()
    assert ans.tier == "cloud" and ans.decision == "escalated" and len(fake.requests) == 1
    assert ans.text == fake.reply and all(e.tier == "cloud" for e in events)
    assert not any(e.tier == "local" and e.text for e in events), (
        "the distrusted local answer must not be shown"
    )
    assert ans.confidence == pytest.approx(score) and any("escalated" in r for r in ans.reasons)


def test_local_route_is_trusted_whatever_the_score(engine, router, fake):
    cfg = _cfg(fake)
    r = Router.from_config(cfg, encoder=router.encoder)
    resp = respond(
        CHAT,
        stopping_options(engine, CHAT),
        policy="auto",
        engine=engine,
        config=cfg,
        router=r,
        threshold=1.01,
    )
    ans = resp.result()
    assert (
        ans.route == "chitchat"
        and ans.tier == "local"
        and ans.decision == "kept-local"
        and fake.requests == []
    )
    assert ans.confidence < ans.threshold and any("trusted" in x for x in ans.reasons)


def test_remote_failure_returns_flagged_local_answer(engine, router, gated_options, fake):
    fake.status = 500
    cfg = _cfg(fake)
    r = Router.from_config(cfg, encoder=router.encoder)
    resp = respond(
        OPEN, gated_options, policy="auto", engine=engine, config=cfg, router=r, threshold=1.01
    )
    events = list(resp)
    ans = resp.result()
    assert len(fake.requests) == 2  # one retry, then give up
    assert ans.tier == "local" and ans.decision == "fallback-local" and ans.text
    assert "".join(e.text for e in events) == ans.text
    assert ans.confidence < ans.threshold and any(
        "failed" in x and "low confidence" in x for x in ans.reasons
    )
    assert KEY not in json.dumps(ans.to_dict())


def test_remote_route_streams_remote_and_never_loads_local(router, fake):
    cfg = _cfg(fake)
    r = Router.from_config(cfg, encoder=router.encoder)

    def no_engine():
        raise AssertionError("a remote-routed prompt must not load the local model")

    resp = respond(
        "Write a Python function that merges two sorted lists.",
        policy="auto",
        engine=no_engine,
        config=cfg,
        router=r,
    )
    events = list(resp)
    ans = resp.result()
    assert (
        ans.tier == "cloud" and ans.route == "code" and ans.decision == "remote" and len(events) > 3
    )


# -- local-only sends nothing; keys never appear ---------------------------------------------

GUARD = textwrap.dedent("""
    import os, socket, sys
    def _hook(event, args):
        # Any network connection or name lookup from this process is a failure (exit 97).
        if event == "socket.connect" and args[0].family != socket.AF_UNIX:
            os.write(2, b"OUTBOUND CONNECTION " + repr(args[1]).encode() + b"\\n"); os._exit(97)
        if event in ("socket.getaddrinfo", "socket.gethostbyname"):
            os.write(2, b"NAME LOOKUP " + repr(args[0]).encode() + b"\\n"); os._exit(97)
    sys.addaudithook(_hook)
""")


def _cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "edgeai", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One EDGEAI_HOME for the CLI runs here, so the route examples are embedded once."""
    return str(tmp_path_factory.mktemp("cli-home"))


def _guarded(tmp_path, tiny_model, policy, cfg_text, home):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD)
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.toml").write_text(cfg_text)
    env = dict(
        os.environ,
        PYTHONPATH=f"{site}{os.pathsep}{Path(__file__).parents[1]}",
        EDGEAI_CONFIG_DIR=str(tmp_path / "config"),
        EDGEAI_HOME=home,
        EDGEAI_RT_KEY=KEY,
    )
    return _cli(
        [
            "-m",
            str(tiny_model),
            "-n",
            "8",
            "--json",
            "--policy",
            policy,
            "What's 12 percent of 850?",
        ],
        env,
    )


def test_local_only_sends_zero_bytes(tmp_path, tiny_model, shared_home):
    with FakeProvider("openai") as fp:
        cfg = (
            f'[tiers.cloud]\nkind = "openai"\nbase_url = "{fp.base_url}"\nmodel = "big"\n'
            'api_key_env = "EDGEAI_RT_KEY"\nretries = 0\n'
            '[policy]\nremote_tier = "cloud"\nthreshold = 1.0\n'
        )
        ok = _guarded(tmp_path, tiny_model, "local-only", cfg, shared_home)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["tier"] == "local"
        assert fp.requests == []
        # The guard is real: the same run under policy remote is stopped at its first connection.
        bad = _guarded(tmp_path, tiny_model, "remote", cfg, shared_home)
        assert bad.returncode == 97 and (
            "OUTBOUND CONNECTION" in bad.stderr or "NAME LOOKUP" in bad.stderr
        )


@pytest.mark.parametrize("status", [200, 401])
def test_cli_keys_never_in_output_and_tier_is_shown(tmp_path, tiny_model, status, shared_home):
    with FakeProvider("anthropic") as fp:
        fp.status = status  # on failure the stand-in echoes the key in its error body
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.toml").write_text(
            f'[tiers.cloud]\nkind = "anthropic"\nbase_url = "{fp.base_url}"\nmodel = "big"\n'
            'api_key_env = "EDGEAI_RT_KEY"\nretries = 0\n'
            '[policy]\nremote_tier = "cloud"\nthreshold = 1.01\n'
        )
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(__file__).parents[1]),
            EDGEAI_CONFIG_DIR=str(tmp_path / "config"),
            EDGEAI_HOME=shared_home,
            EDGEAI_RT_KEY=KEY,
            NO_COLOR="1",
        )
        base = ["-m", str(tiny_model), "-n", "6", OPEN]  # no route, gated, below threshold 1.01
        js = _cli(base + ["--json"], env)
        plain = _cli(base + ["--explain"], env)
    for p in (js, plain):
        assert p.returncode == 0, p.stderr
        assert KEY not in p.stdout and KEY not in p.stderr
    d = json.loads(js.stdout)
    assert {"route", "signals", "confidence", "threshold", "decision", "reasons"} <= set(d)
    assert d["route"] is None and d["threshold"] == 1.01
    if status == 200:
        assert d["tier"] == "cloud" and d["decision"] == "escalated" and d["text"] == fp.reply
        assert "answered by cloud" in plain.stderr and plain.stdout.strip() == fp.reply
    else:
        assert (
            d["tier"] == "local"
            and d["decision"] == "fallback-local"
            and any("401" in r for r in d["reasons"])
        )
        assert "answered by local (fallback-local)" in plain.stderr
    assert (
        "route" in plain.stderr and "signals" in plain.stderr and "threshold 1.01" in plain.stderr
    )
    assert fp.requests[0]["headers"]["x-api-key"] == KEY  # it was really sent
