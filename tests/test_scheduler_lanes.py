"""The server's two lanes give a request the tokens it gets from `edgeai run`.

A request that arrives when nothing runs decodes alone, through the engine's own loop; ones
that arrive meanwhile join mlx-lm's batches. Real tiny model, real scheduler thread.
"""

from __future__ import annotations

import queue
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


def _submit(sched: Scheduler, path, prompt, options, logits=None) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    sched.submit(prompt, options, "tiny", path, q.put, logits=logits)
    return q


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
    assert _lanes(sched)["alone"] == before["alone"] + 1 and _lanes(sched)["batched"] == before["batched"]


def test_requests_joining_a_lone_one_are_batched_and_all_get_their_own_tokens(sched, engine, tiny_model):
    long = GenerationOptions(max_tokens=60)
    short = GenerationOptions(max_tokens=10)
    before = _lanes(sched)
    first = _submit(sched, tiny_model, PROMPTS[0], long)
    while _lanes(sched)["alone"] == before["alone"]:  # the lone one is decoding now
        time.sleep(0.005)
    others = [_submit(sched, tiny_model, p, short) for p in PROMPTS[1:]]
    answers = [_answer(first)] + [_answer(q) for q in others]
    for prompt, opts, ans in zip(PROMPTS, (long, short, short), answers):
        assert ans.tokens == Answer.from_events(engine.generate(prompt, opts), "tiny").tokens
    after = _lanes(sched)
    assert after["alone"] == before["alone"] + 1 and after["batched"] == before["batched"] + 2


def test_penalties_give_the_same_tokens_alone_and_batched(sched, tiny_model):
    opts = GenerationOptions(max_tokens=16)
    logits = {"frequency_penalty": 1.5, "logit_bias": {5: 3.0}}
    before = _lanes(sched)
    alone = _answer(_submit(sched, tiny_model, PROMPTS[1], opts, logits))
    assert _lanes(sched)["alone"] == before["alone"] + 1
    blocker = _submit(sched, tiny_model, PROMPTS[0], GenerationOptions(max_tokens=80))
    while _lanes(sched)["alone"] == before["alone"] + 1:  # the blocker holds the lone lane now
        time.sleep(0.005)
    batched = _answer(_submit(sched, tiny_model, PROMPTS[1], opts, logits))
    _answer(blocker)
    assert _lanes(sched)["batched"] == before["batched"] + 1
    plain = _answer(_submit(sched, tiny_model, PROMPTS[1], opts))
    assert batched.tokens == alone.tokens != plain.tokens
