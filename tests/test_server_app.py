"""The ASGI app in-process: a fuzz run of its OpenAPI document, and a fault in one generation.

A real tiny model on the real scheduler; only the fault test swaps in a decoder that fails
for one marked request.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from tinymodel import make_tiny_model

from edgeai.engine.decode import SequenceDecoder
from edgeai.server import scheduler as sched_mod
from edgeai.server.app import Settings, build_app
from edgeai.server.models import ModelRegistry
from edgeai.server.scheduler import Scheduler


@pytest.fixture(scope="module")
def api_app(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("apphome")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEAI_HOME", str(home / "home"))
    mp.setenv("EDGEAI_CONFIG_DIR", str(home / "config"))
    scheduler = Scheduler(max_batch=4, max_queue=8, keep_alive=-1)
    other = make_tiny_model(home / "tiny2", seed=1)
    app = build_app(
        scheduler,
        ModelRegistry({"tiny": tiny_model, "tiny2": other}, use_store=False),
        settings=Settings(max_body=64 << 10, policy="local-only"),
        manage_scheduler=False,
    )
    scheduler.start()
    yield app
    scheduler.stop()
    mp.undo()


@pytest.fixture(scope="module")
def api_schema(api_app):
    return schemathesis.openapi.from_asgi("/openapi.json", api_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_openapi_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])


def test_openapi_policies_match_router():
    from edgeai.routing.router import POLICIES
    from edgeai.server.schemas import POLICIES as served

    assert tuple(served) == tuple(POLICIES)


class _FailingDecoder(SequenceDecoder):
    """Fails on the third token of requests that carry the marker stop string."""

    def __init__(self, tokenizer, options, prompt_tokens):
        super().__init__(tokenizer, options, prompt_tokens)
        self.boom = "BOOM" in options.stop

    def step(self, token, signals, last):
        if self.boom and self.stats.generation_tokens >= 2:
            raise RuntimeError("injected fault")
        return super().step(token, signals, last)


def test_exception_in_generation_fails_that_request_alone(api_app, monkeypatch):
    monkeypatch.setattr(sched_mod, "SequenceDecoder", _FailingDecoder)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}

    async def go():
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=60
        ) as c:
            bad = c.post("/v1/chat/completions", json={**body, "stop": ["BOOM"]})
            good = [c.post("/v1/chat/completions", json=body) for _ in range(3)]
            streamed = c.post(
                "/v1/chat/completions", json={**body, "stop": ["BOOM"], "stream": True}
            )
            results = await asyncio.gather(bad, *good, streamed)
            after = await c.post("/v1/chat/completions", json=body)
            return results, after

    (bad, *good, streamed), after = asyncio.run(go())
    assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 2 for r in good)
    assert (
        '"error"' in streamed.text and "injected fault" in streamed.text
    )  # in-band, after the headers
    assert after.status_code == 200


def test_two_models_take_turns_without_mixing(api_app):
    def body(model, n):
        return {
            "model": model,
            "messages": [{"role": "user", "content": f"q{n}"}],
            "max_tokens": 12,
        }

    async def go():
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=60
        ) as c:
            alone = [
                await c.post("/v1/chat/completions", json=body(m, n))
                for m in ("tiny", "tiny2")
                for n in (1, 2)
            ]
            mixed = await asyncio.gather(
                *[
                    c.post("/v1/chat/completions", json=body(m, n))
                    for n in (1, 2)
                    for m in ("tiny2", "tiny")
                ]
            )
            return alone, mixed

    alone, mixed = asyncio.run(go())
    text = {
        (r.json()["model"], i % 2): r.json()["choices"][0]["message"]["content"]
        for i, r in enumerate(alone)
    }
    for i, r in enumerate(mixed):
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["choices"][0]["message"]["content"] == text[(d["model"], i // 2)]


def test_embeddings_without_encoder_is_501(api_app, monkeypatch, tmp_path):
    from edgeai.routing import embed

    monkeypatch.setenv("EDGEAI_EMBED_MODEL", str(tmp_path / "missing"))
    # Bypass the process-wide cache: another test may have loaded the real encoder already.
    monkeypatch.setattr(embed, "default_encoder", lambda: embed.Encoder.load())

    async def go():
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=60
        ) as c:
            return await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})

    r = asyncio.run(go())
    assert r.status_code == 501 and r.json()["error"]["code"] == "embeddings_unavailable"


def test_a_model_that_computes_nan_still_answers_valid_json(api_app, tmp_path):
    """NaN logits (a broken model or adapter) made non-streamed answers 500 and streamed chunks
    carry `NaN`, which is not JSON: scores and logprobs that are not finite are rendered as
    null (confidence) or -9999.0 (a logprob, as OpenAI renders -inf)."""
    import json

    import mlx.core as mx

    path = make_tiny_model(tmp_path / "nan-model", seed=2, quantize=False)
    weights = mx.load(str(path / "model.safetensors"))
    weights["model.norm.weight"] = mx.full(weights["model.norm.weight"].shape, float("nan"))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    api_app.state.server.registry.served["nan"] = path

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text[:200]}"))

    async def go():
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=60
        ) as c:
            chat = {
                "model": "nan",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "logprobs": True,
                "top_logprobs": 2,
            }
            done = await c.post("/v1/chat/completions", json=chat)
            streamed = await c.post("/v1/chat/completions", json={**chat, "stream": True})
            comp = await c.post(
                "/v1/completions",
                json={
                    "model": "nan",
                    "prompt": "hi",
                    "max_tokens": 3,
                    "logprobs": 2,
                    "stream": True,
                },
            )
            return done, streamed, comp

    try:
        done, streamed, comp = asyncio.run(go())
    finally:
        del api_app.state.server.registry.served["nan"]
    assert done.status_code == 200, done.text
    strict(done.text)
    for r in (streamed, comp):
        assert r.status_code == 200
        lines = [
            ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"
        ]
        assert lines and all(strict(ln) for ln in lines)


def test_a_long_embeddings_request_does_not_stall_generation(api_app):
    """The encoder runs on the model's thread: a request of many long inputs ran there in one
    go (256 of them took minutes on 2 cores) while every stream waited. It now runs in chunks
    with decoding steps in between, so a short chat sent meanwhile finishes first."""
    import time

    long = ["word " * 400] * 6  # ~2 s each here: one chunk each
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    done: dict[str, float] = {}

    async def timed(name, coro):
        r = await coro
        done[name] = time.monotonic()
        return r

    async def go():
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=300
        ) as c:
            await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "warm up"})
            await c.post("/v1/chat/completions", json=chat)  # both models loaded before timing
            emb = asyncio.create_task(
                timed(
                    "embeddings",
                    c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": long}),
                )
            )
            await asyncio.sleep(1.0)
            answer = await timed("chat", c.post("/v1/chat/completions", json=chat))
            return await emb, answer

    emb, answer = asyncio.run(go())
    if emb.status_code == 501:
        pytest.skip("the sentence encoder is not installed here")
    assert emb.status_code == 200 and len(emb.json()["data"]) == 6
    assert answer.status_code == 200
    assert done["chat"] < done["embeddings"], done


def test_a_stream_sends_the_tokens_that_arrived_together_as_one_chunk():
    """Run.groups (what the SSE writer reads): every Event already queued comes at once, in
    order; an error after some Events comes after them."""
    import threading

    from edgeai.server.escalation import _END, Run
    from edgeai.types import Event

    async def read(items: list) -> list:
        run = Run(engine=None, cancel=threading.Event())
        for it in items[:2]:
            run._q.put_nowait(it)

        async def later() -> None:
            await asyncio.sleep(0.01)
            for it in items[2:]:
                run._q.put_nowait(it)

        task = asyncio.create_task(later())
        got = []
        try:
            async for group in run.groups():
                got.append("".join(ev.text for ev in group))
        except ValueError as e:
            got.append(f"error {e}")
        await task
        return got

    abc = [Event(text=c, token=i) for i, c in enumerate("abc")]
    assert asyncio.run(read([*abc, _END])) == ["ab", "c"]
    assert asyncio.run(read([abc[0], ValueError("boom"), _END])) == ["a", "error boom"]
