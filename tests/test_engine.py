"""The engine's token events: logprobs, entropy, alternatives, stops, cancellation, limits."""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import pytest

from edgeai.engine import Engine
from edgeai.engine.decode import StopMatcher
from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.options import GenerationOptions
from edgeai.types import Answer


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(tiny_model, kernel="builtin")


def test_events_carry_true_logprobs_and_entropy(engine):
    opts = GenerationOptions(max_tokens=6, top_logprobs=3)
    ans = Answer.from_events(engine.generate("hello", opts), engine.name)
    assert ans.finish_reason in ("length", "stop")
    assert len(ans.logprobs) == len(ans.tokens) == ans.stats.generation_tokens
    # Recompute the first step by hand: same prompt, one forward pass.
    ids = engine.encode("hello")
    logits = engine.model(mx.array([ids]))[0, -1].astype(mx.float32)
    lps = logits - mx.logsumexp(logits)
    first = ans.tokens[0]
    assert math.isclose(ans.logprobs[0], lps[first].item(), abs_tol=1e-3)
    ent = -(mx.exp(lps) * lps).sum().item()
    assert math.isclose(ans.entropies[0], ent, abs_tol=1e-3)
    # Greedy: the chosen token is the top alternative, and alternatives are sorted.
    top = ans.top_logprobs[0]
    assert len(top) == 3 and top[0][0] == first
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_prompt_in_chunks_matches_one_pass(engine):
    from edgeai.engine.decode import decode_steps

    prompt = mx.array([(11 * i + 5) % 200 for i in range(10)])
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    one = list(decode_steps(engine.model, prompt, greedy, 5, hooks=engine.hooks))
    chunked = list(
        decode_steps(engine.model, prompt, greedy, 5, hooks=engine.hooks, prefill_step=3)
    )  # 3 + 3 + 3, then the last
    assert [t for t, *_ in chunked] == [t for t, *_ in one]
    for (_, a, ea, _), (_, b, eb, _) in zip(chunked, one):
        assert math.isclose(a, b, abs_tol=1e-4) and math.isclose(ea, eb, abs_tol=1e-4)


def test_chat_messages_use_the_template(engine):
    ids = engine.encode([{"role": "user", "content": "hi"}])
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith(
        "<|im_start|>assistant\n"
    )


def test_cancel_stops_within_one_step(engine):
    cancel = threading.Event()
    events = []
    for ev in engine.generate(
        "tell me everything", GenerationOptions(max_tokens=500), cancel=cancel
    ):
        events.append(ev)
        if len(events) == 3:
            cancel.set()
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].stats.generation_tokens == 3


def test_max_tokens_and_context_limits(engine):
    ans = Answer.from_events(engine.generate("x", GenerationOptions(max_tokens=4)), engine.name)
    assert ans.stats.generation_tokens <= 4
    with pytest.raises(InvalidInput, match="accepts at most"):
        list(engine.generate("word " * 5000))
    with pytest.raises(InvalidInput, match="empty"):
        list(engine.generate([]))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(UnsupportedModel):
        Engine.load(tmp_path)


@pytest.mark.parametrize(
    "chunks, stops, want_text, want_hit",
    [
        (["Hel", "lo wor", "ld"], ["wor"], "Hello ", True),
        (["a", "b", "c"], ["bd"], "abc", False),  # a partial match is released once it fails
        (["x<", "/", "s>y"], ["</s>"], "x", True),
        (["one two"], [], "one two", False),
    ],
)
def test_stop_matcher(chunks, stops, want_text, want_hit):
    m = StopMatcher(stops)
    text, hit = "", False
    for c in chunks:
        t, hit = m.feed(c)
        text += t
        if hit:
            break
    if not hit:
        text += m.flush()
    assert (text, hit) == (want_text, want_hit)


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    vocab = engine.vocab_size
    for ids in ([vocab], [100_000_000], [1, vocab + 7, 2], [-1], [2**70]):
        with pytest.raises(InvalidInput, match="outside .* vocabulary"):
            next(engine.generate(ids, GenerationOptions(max_tokens=1)))
    # The last row of the embedding table is a valid id.
    ans = Answer.from_events(
        engine.generate([vocab - 1], GenerationOptions(max_tokens=1)), engine.name
    )
    assert ans.stats.prompt_tokens == 1
