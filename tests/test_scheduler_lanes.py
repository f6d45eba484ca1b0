"""The server's two lanes give a request the tokens it gets from `edgeai run`.

A request that arrives when nothing runs decodes alone, through the engine's own loop; ones
that arrive meanwhile join mlx-lm's batches. Real tiny model, real scheduler thread.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from edgeai.engine import Engine
from edgeai.options import GenerationOptions
from edgeai.server.scheduler import ADMITTED, Scheduler
from edgeai.types import Answer, Event

PROMPTS = ("the cat sat on", "a dog ran to the", "in the house the")


@pytest.fixture(scope="module")
def sched():
    s = Scheduler(max_batch=4, max_queue=8, keep_alive=-1)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(tiny_model)


def _submit(sched: Scheduler, path, prompt, options, logits=None, cancel=None) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    sched.submit(prompt, options, "tiny", path, q.put, logits=logits, cancel=cancel)
    return q


def _no_eos(engine: Engine) -> dict:
    return {"logit_bias": {int(t): -100.0 for t in engine.tokenizer.eos_token_ids}}


def _start_blocker(
    sched: Scheduler, engine, path, before: dict
) -> tuple[queue.Queue, threading.Event]:
    """A long request decoding alone until cancelled, so that others are batched."""
    stop = threading.Event()
    q = _submit(
        sched, path, PROMPTS[0], GenerationOptions(max_tokens=1500), _no_eos(engine), cancel=stop
    )
    while _lanes(sched)["alone"] == before["alone"]:
        time.sleep(0.005)
    return q, stop


def _answer(q: queue.Queue) -> Answer:
    events: list[Event] = []
    while True:
        item = q.get(timeout=120)
        if item is ADMITTED:
            continue
        if isinstance(item, Exception):
            raise item
        events.append(item)
        if item.finish_reason is not None:
            return Answer.from_events(events, "tiny")


def _lanes(sched: Scheduler) -> dict:
    return dict(sched.status()["lanes"])


def test_a_lone_request_decodes_alone_with_run_tokens(sched, engine, tiny_model):
    opts = GenerationOptions(max_tokens=12, top_logprobs=2)
    before = _lanes(sched)
    got = _answer(_submit(sched, tiny_model, PROMPTS[0], opts))
    want = Answer.from_events(engine.generate(PROMPTS[0], opts), "tiny")
    assert got.tokens == want.tokens and got.text == want.text
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert (
        _lanes(sched)["alone"] == before["alone"] + 1
        and _lanes(sched)["batched"] == before["batched"]
    )


def test_requests_joining_a_lone_one_are_batched_and_all_get_their_own_tokens(
    sched, engine, tiny_model
):
    short = GenerationOptions(max_tokens=10)
    before = _lanes(sched)
    first, stop = _start_blocker(sched, engine, tiny_model, before)
    others = [_submit(sched, tiny_model, p, short) for p in PROMPTS[1:]]
    answers = [_answer(q) for q in others]
    stop.set()
    lone = _answer(first)
    assert lone.finish_reason == "cancelled" and len(lone.tokens) > 10
    alone = _answer(
        _submit(
            sched,
            tiny_model,
            PROMPTS[0],
            GenerationOptions(max_tokens=len(lone.tokens)),
            _no_eos(engine),
        )
    )
    assert lone.tokens == alone.tokens
    for prompt, ans in zip(PROMPTS[1:], answers):
        assert ans.tokens == Answer.from_events(engine.generate(prompt, short), "tiny").tokens
    after = _lanes(sched)
    assert after["alone"] == before["alone"] + 2 and after["batched"] == before["batched"] + 2


def test_penalties_give_the_same_tokens_alone_and_batched(sched, engine, tiny_model):
    opts = GenerationOptions(max_tokens=16)
    logits = {"frequency_penalty": 1.5, "logit_bias": {5: 3.0}}
    before = _lanes(sched)
    alone = _answer(_submit(sched, tiny_model, PROMPTS[1], opts, logits))
    assert _lanes(sched)["alone"] == before["alone"] + 1
    blocker, stop = _start_blocker(sched, engine, tiny_model, _lanes(sched))
    batched = _answer(_submit(sched, tiny_model, PROMPTS[1], opts, logits))
    stop.set()
    _answer(blocker)
    assert _lanes(sched)["batched"] == before["batched"] + 1
    plain = _answer(_submit(sched, tiny_model, PROMPTS[1], opts))
    assert batched.tokens == alone.tokens != plain.tokens


def test_batched_turns_reuse_the_prompt_cache_and_answer_as_without(sched, engine, tiny_model):
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    turn1 = [system, {"role": "user", "content": "the cat sat on"}]
    opts = GenerationOptions(max_tokens=8)
    blocker, stop = _start_blocker(sched, engine, tiny_model, _lanes(sched))
    before = _lanes(sched)
    first = _answer(_submit(sched, tiny_model, turn1, opts))
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    second = _answer(_submit(sched, tiny_model, turn2, opts))
    stop.set()
    _answer(blocker)
    assert _lanes(sched)["batched"] == before["batched"] + 2
    assert second.stats.cached_tokens >= len(engine.encode([system])) // 2
    engine.prompt_cache.clear()
    fresh = Answer.from_events(engine.generate(turn2, opts), "tiny")
    assert fresh.stats.cached_tokens == 0 and second.tokens == fresh.tokens
    # The batch's kept prompt serves the same conversation decoding alone, too.
    alone = _answer(_submit(sched, tiny_model, turn2, opts))
    assert (
        alone.stats.cached_tokens == len(engine.encode(turn2)) - 1 and alone.tokens == fresh.tokens
    )


def test_batched_reuse_keeps_the_whole_prompt_in_the_penalties(sched, engine, tiny_model):
    head = [(3 * i + 9) % 200 for i in range(28)]
    likely = Answer.from_events(
        engine.generate(head, GenerationOptions(max_tokens=10)), "tiny"
    ).tokens
    ids = head + (likely * 20)[:20]  # penalties on the prompt's tail steer the answer
    opts = GenerationOptions(max_tokens=10)
    logits = {"frequency_penalty": 2.0, "presence_penalty": 2.0}
    alone = _answer(_submit(sched, tiny_model, ids, opts, logits))
    blocker, stop = _start_blocker(sched, engine, tiny_model, _lanes(sched))
    batched = _answer(_submit(sched, tiny_model, ids, opts, logits))
    stop.set()
    _answer(blocker)
    assert batched.stats.cached_tokens == len(ids) - 1  # the lone run's prompt, reused
    assert batched.tokens == alone.tokens
