"""Prompt-cache reuse: a prompt that starts like an earlier one prefills only the rest, and
its answer is the answer without reuse, token for token (greedy)."""

from __future__ import annotations

import pytest

from edgeai.engine import Engine
from edgeai.engine.prompt_cache import PromptCache
from edgeai.options import GenerationOptions
from edgeai.types import Answer

GREEDY = GenerationOptions(max_tokens=10)
SYSTEM = "You are a careful assistant. " * 12


def _answer(engine: Engine, prompt, adapter: str | None = None) -> Answer:
    return Answer.from_events(engine.generate(prompt, GREEDY, adapter=adapter), engine.name)


def _conversation(engine: Engine) -> tuple[list[dict], Answer]:
    """Turn one of a chat; returns turn two's messages and turn one's answer."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the cat sat on"}]
    first = _answer(engine, msgs)
    msgs = msgs + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    return msgs, first


def _kernels_built() -> bool:
    from edgeai import kernels

    return bool(kernels.status().get("available"))


@pytest.mark.parametrize(
    "kernel,precision", [("builtin", None), ("custom", "fast"), ("custom", "accurate")]
)
def test_next_turn_reuses_the_prompt_and_answers_the_same(tiny_model, kernel, precision):
    if kernel == "custom" and not _kernels_built():
        pytest.skip("custom kernels are not built here")
    engine = Engine.load(tiny_model, kernel=kernel, precision=precision)
    turn2, first = _conversation(engine)
    assert first.stats.cached_tokens == 0
    reused = _answer(engine, turn2)
    assert (
        reused.stats.cached_tokens >= len(engine.encode(SYSTEM)) // 2
    )  # the system prompt at least
    engine.prompt_cache.clear()
    fresh = _answer(engine, turn2)
    assert fresh.stats.cached_tokens == 0
    assert reused.tokens == fresh.tokens and reused.text == fresh.text
    assert reused.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)


def test_a_prompt_that_diverges_midway_reuses_only_the_shared_part(tiny_model):
    engine = Engine.load(tiny_model, kernel="builtin")
    a = [(5 * i + 1) % 200 for i in range(60)]
    b = a[:25] + [(7 * i + 3) % 200 for i in range(30)]
    _answer(engine, a)
    reused = _answer(engine, b)
    assert reused.stats.cached_tokens == 25
    engine.prompt_cache.clear()
    assert _answer(engine, b).tokens == reused.tokens
    # the same prompt again reuses all of it but its last position (which gives the first token)
    again = _answer(engine, b)
    assert again.stats.cached_tokens == len(b) - 1 and again.tokens == reused.tokens


def test_caches_are_kept_apart_by_scope_and_bounded_by_bytes(tiny_model):
    engine = Engine.load(tiny_model, kernel="builtin")
    ids = [(3 * i + 2) % 200 for i in range(40)]
    gen = engine.generation(ids, GREEDY, scope="a")
    while gen.finish is None:
        gen.advance()
    other = engine.generation(ids, GREEDY, scope="b")
    assert other.reused == 0
    same = engine.generation(ids, GREEDY, scope="a")
    assert same.reused == len(ids) - 1
    stats = engine.prompt_cache.stats()
    assert stats["hits"] >= 1 and stats["reused_tokens"] >= len(ids) - 1

    small = PromptCache(max_bytes=1)  # nothing fits: every entry is dropped at once
    engine.prompt_cache = small
    gen = engine.generation(ids, GREEDY)
    while gen.finish is None:
        gen.advance()
    assert small.stats()["entries"] == 0
    engine.prompt_cache = PromptCache(max_bytes=0)  # disabled
    assert engine.generation(ids, GREEDY).reused == 0


def test_adapter_switch_never_reuses_another_adapters_cache(tmp_path, monkeypatch):
    from test_adapters import make_adapter
    from tinymodel import make_tiny_model

    from edgeai.store import adapters

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    base = make_tiny_model(tmp_path / "tiny")
    adapters.add(make_adapter(base, tmp_path / "a", seed=1), str(base), name="ad-a")
    engine = Engine.load(base, name="tiny", kernel="builtin")
    prompt = "the cat sat on the mat and then " * 4
    base_ans = _answer(engine, prompt)
    with_a = _answer(engine, prompt, adapter="ad-a")
    assert with_a.stats.cached_tokens == 0  # the base model's cache is not the adapter's
    assert with_a.tokens != base_ans.tokens
    again = _answer(engine, prompt, adapter="ad-a")
    assert again.stats.cached_tokens > 0 and again.tokens == with_a.tokens
    assert _answer(engine, prompt).tokens == base_ans.tokens


def test_penalties_see_the_whole_prompt_when_part_of_it_is_reused(tiny_model):
    from edgeai.engine.decode import make_processors

    engine = Engine.load(tiny_model, kernel="builtin")
    head = [(3 * i + 9) % 200 for i in range(28)]
    likely = Answer.from_events(engine.generate(head, GREEDY), engine.name).tokens
    # The prompt ends with what the model would say next: penalties on the prompt's last
    # 20 tokens (mlx-lm's context) must steer away from it, with reuse as without.
    ids = head + (likely * 20)[:20]
    engine.prompt_cache.clear()

    def procs() -> list:
        return make_processors(
            {"frequency_penalty": 2.0, "presence_penalty": 2.0}, engine.vocab_size, engine.name
        )

    def tokens() -> tuple[list[int], int]:
        gen = engine.generation(ids, GREEDY, processors=procs())
        out = []
        while gen.finish is None:
            out += [e.token for e in gen.advance() if e.token is not None]
        return out, gen.reused

    fresh, reused_first = tokens()
    again, reused_second = tokens()
    assert reused_first == 0 and reused_second == len(ids) - 1
    assert again == fresh
    plain = Answer.from_events(engine.generate(ids, GREEDY), engine.name).tokens
    assert plain != fresh  # the penalties did change the answer


@pytest.mark.parametrize("raw", ["abc", "-1", "1e99", "nan"])
def test_a_bad_cache_size_is_one_line_naming_the_variable(tiny_model, monkeypatch, raw):
    from edgeai.errors import EdgeAIError

    monkeypatch.setenv("EDGEAI_PROMPT_CACHE_MB", raw)
    with pytest.raises(EdgeAIError, match=r"\$EDGEAI_PROMPT_CACHE_MB is .* whole number from 0"):
        Engine.load(tiny_model, kernel="builtin")
    monkeypatch.setenv("EDGEAI_PROMPT_CACHE_MB", "3")
    assert Engine.load(tiny_model, kernel="builtin").prompt_cache.max_bytes == 3 << 20
