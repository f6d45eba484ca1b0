"""Remote providers against stand-in OpenAI-compatible and Anthropic servers on loopback."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakeproviders import FakeProvider  # noqa: E402

from edgeai.options import GenerationOptions  # noqa: E402
from edgeai.routing import cloud  # noqa: E402
from edgeai.types import Answer  # noqa: E402

KEY = "sk-test-SECRET-4f1d2c9a"
MSGS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "capital of France?"},
]


@pytest.fixture(params=["openai", "anthropic"])
def fake(request):
    with FakeProvider(request.param) as fp:
        yield fp


def tier_for(fp: FakeProvider, **kw) -> cloud.Tier:
    return cloud.Tier(
        name="cloud",
        kind=fp.kind,
        base_url=fp.base_url,
        model="big-model",
        api_key_env="EDGEAI_TEST_KEY",
        timeout=kw.pop("timeout", 5),
        retries=kw.pop("retries", 2),
        backoff=0.01,
        **kw,
    )


def test_streams_events_with_tier_and_finish(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    events = list(cloud.stream(tier_for(fake), MSGS, GenerationOptions(max_tokens=50)))
    assert len(events) > 3, "the answer must arrive in several streamed chunks"
    ans = Answer.from_events(events, "big-model")
    assert ans.text == fake.reply
    assert ans.tier == "cloud" and all(e.tier == "cloud" for e in events)
    assert ans.finish_reason == "stop" and events[-1].stats is not None
    req = fake.requests[-1]
    if fake.kind == "anthropic":
        assert req["headers"]["x-api-key"] == KEY and req["body"]["system"] == "be brief"
        assert all(m["role"] != "system" for m in req["body"]["messages"])
    else:
        assert req["headers"]["authorization"] == f"Bearer {KEY}"
        assert req["body"]["messages"][0]["role"] == "system"
    assert req["body"]["stream"] is True and req["body"]["max_tokens"] == 50


def test_retries_then_succeeds(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.fail_first = 2
    ans = Answer.from_events(
        cloud.stream(tier_for(fake, retries=2), MSGS, GenerationOptions()), "m"
    )
    assert ans.text == fake.reply and len(fake.requests) == 3


def test_retries_are_bounded_and_error_is_scrubbed(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.fail_first = 10
    with pytest.raises(cloud.RemoteError) as ei:
        list(cloud.stream(tier_for(fake, retries=1), MSGS, GenerationOptions()))
    assert len(fake.requests) == 2
    assert "503" in str(ei.value)
    assert KEY not in str(ei.value) and KEY not in repr(ei.value)


def test_auth_error_not_retried_and_key_not_echoed(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.status = 401
    with pytest.raises(cloud.RemoteError) as ei:
        list(cloud.stream(tier_for(fake), MSGS, GenerationOptions()))
    assert len(fake.requests) == 1
    # The stand-in echoes the key in its error body, as real providers do; we must not.
    assert "401" in str(ei.value) and "***" in str(ei.value)
    assert KEY not in str(ei.value)


def test_missing_key_env_is_a_clear_error(fake, monkeypatch):
    monkeypatch.delenv("EDGEAI_TEST_KEY", raising=False)
    with pytest.raises(cloud.RemoteError, match="EDGEAI_TEST_KEY is not set"):
        list(cloud.stream(tier_for(fake), MSGS, GenerationOptions()))
    assert fake.requests == []


def test_broken_stream_raises(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.break_after = 2
    with pytest.raises(cloud.RemoteError):
        list(cloud.stream(tier_for(fake), MSGS, GenerationOptions()))


def test_connection_refused():
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = cloud.Tier(
        "dead", "openai", f"http://127.0.0.1:{port}/v1", "m", timeout=1, retries=1, backoff=0.01
    )
    with pytest.raises(cloud.RemoteError, match="ConnectError"):
        list(cloud.stream(t, MSGS, GenerationOptions()))


def test_tiers_from_config():
    cfg = {
        "tiers": {
            "cloud": {
                "kind": "anthropic",
                "base_url": "http://127.0.0.1:1/",
                "model": "m",
                "api_key_env": "K",
                "retries": 1,
            }
        }
    }
    t = cloud.tiers_from_config(cfg)["cloud"]
    assert t.kind == "anthropic" and t.base_url == "http://127.0.0.1:1" and t.retries == 1
    with pytest.raises(cloud.EdgeAIError):
        cloud.tiers_from_config({"tiers": {"x": {"kind": "grpc", "base_url": "u", "model": "m"}}})


def test_a_server_slower_than_the_timeout_is_retried_then_reported(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.delay = 2.0  # each attempt waits past the tier's 0.3 s timeout
    t0 = time.monotonic()
    with pytest.raises(cloud.RemoteError, match="ReadTimeout") as e:
        list(cloud.stream(tier_for(fake, retries=1, timeout=0.3), MSGS, GenerationOptions()))
    assert time.monotonic() - t0 < 1.5  # gave up at the timeout, not when the server answered
    assert len(fake.requests) == 2 and KEY not in str(e.value)


def test_a_stream_that_stalls_past_the_timeout_is_not_retried(fake, monkeypatch):
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    fake.stall_after, fake.stall = 2, 2.0
    events: list = []
    t0 = time.monotonic()
    with pytest.raises(cloud.RemoteError, match="stream broke after 2 chunks: ReadTimeout"):
        for ev in cloud.stream(tier_for(fake, retries=2, timeout=0.3), MSGS, GenerationOptions()):
            events.append(ev)
    assert time.monotonic() - t0 < 1.5
    assert "".join(e.text for e in events) == "Remote says: " and len(fake.requests) == 1


@pytest.mark.parametrize("raw", [KEY + "\r", KEY + "\n", f"  {KEY}\r\n", "\t" + KEY])
def test_key_with_surrounding_whitespace_is_stripped(fake, monkeypatch, raw):
    """A key read from a CRLF .env file used to make httpx raise `Illegal header value
    b'Bearer sk-…\\r'`, which carried the key into error text."""
    monkeypatch.setenv("EDGEAI_TEST_KEY", raw)
    ans = Answer.from_events(cloud.stream(tier_for(fake), MSGS, GenerationOptions()), "m")
    assert ans.text == fake.reply
    sent = fake.requests[-1]["headers"]
    assert (sent.get("x-api-key") or sent["authorization"]) in (KEY, f"Bearer {KEY}")


def _renderings(key: str) -> list[str]:
    import json

    return [
        key,
        repr(key),
        repr(key)[1:-1],
        json.dumps(key)[1:-1],
        str(key.encode("utf-8", "backslashreplace")),
        key.encode("unicode_escape").decode(),
        key.strip(),
        key[:-1],
    ]


@pytest.mark.parametrize(
    "raw",
    [
        KEY[:8] + "\r\n" + KEY[8:],
        KEY[:8] + "\x1b" + KEY[8:],
        KEY + "\x7f",
        KEY[:8] + "é" + KEY[8:],
        KEY[:8] + "\u2028" + KEY[8:],
    ],
)
def test_key_with_control_or_non_ascii_characters_is_refused_by_name(fake, monkeypatch, raw):
    monkeypatch.setenv("EDGEAI_TEST_KEY", raw)
    with pytest.raises(cloud.RemoteError) as ei:
        list(cloud.stream(tier_for(fake), MSGS, GenerationOptions()))
    text = str(ei.value) + repr(ei.value)
    assert "EDGEAI_TEST_KEY" in text
    assert not any(r in text for r in _renderings(raw)), text
    assert KEY[8:] not in text and fake.requests == []


def test_every_rendering_of_a_key_is_scrubbed():
    from edgeai.keys import scrub

    key = "sk-a\\b\"c'd-0123456789"  # printable, yet escaped differently by repr and JSON
    import json

    for text in (
        f"echo {key} done",
        f"header {key.encode()!r}",
        f"json {json.dumps(key)}",
        f"repr {key!r}",
        f"quoted {__import__('urllib.parse').parse.quote(key)}",
    ):
        out = scrub(text, key)
        assert "0123456789" not in out and "***" in out, (text, out)
    assert scrub("nothing here", key) == "nothing here"


def test_key_never_reaches_run_json_or_reasons(tiny_model, edgeai_env, monkeypatch):
    """End to end: `run --json` with a broken key falls back to the local answer, and neither
    its JSON nor its stderr holds any part of the key."""
    from conftest import run_cli

    with FakeProvider("openai") as remote:
        cfg = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "config.toml").write_text(
            f'[tiers.cloud]\nkind = "openai"\nbase_url = "{remote.base_url}"\n'
            'model = "big"\napi_key_env = "EDGEAI_TEST_KEY"\nretries = 0\n'
        )
        for raw in (KEY + "\r", KEY[:8] + "\r" + KEY[8:], KEY[:8] + "é" + KEY[8:]):
            env = {**edgeai_env, "EDGEAI_TEST_KEY": raw}
            r = run_cli(
                ["run", "-m", str(tiny_model), "--policy", "remote", "--json", "-n", "4", "hi"], env
            )
            assert r.returncode == 0, r.stderr
            assert "Traceback" not in r.stderr
            assert KEY[8:] not in r.stdout + r.stderr, (raw, r.stdout, r.stderr)
        assert all(req["headers"]["authorization"] == f"Bearer {KEY}" for req in remote.requests)
        assert len(remote.requests) == 1  # only the stripped key was sent


def test_negative_retries_refused_in_config_and_still_one_attempt(fake, monkeypatch):
    """`retries = -1` skipped the remote call: an empty answer with exit 0."""
    tier = {"kind": fake.kind, "base_url": fake.base_url, "model": "m", "retries": -1}
    with pytest.raises(cloud.EdgeAIError, match="tiers.cloud.retries"):
        cloud.tiers_from_config({"tiers": {"cloud": tier}})
    monkeypatch.setenv("EDGEAI_TEST_KEY", KEY)
    ans = Answer.from_events(
        cloud.stream(tier_for(fake, retries=-1), MSGS, GenerationOptions()), "m"
    )
    assert ans.text == fake.reply and len(fake.requests) == 1
