"""Per-sequence pieces of batched generation: the sampler and the token → Event step.

`SequenceDecoder` does for one sequence of a batch what `Engine._generate` does inside
its loop (detokenize, hold back possible stop strings), with logprob/entropy computed for
the whole batch at once by the engine's `token_signals_batch`, so a batched token and a
single-stream token carry the same Event fields.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx

from edgeai.engine import _StopMatcher
from edgeai.options import GenerationOptions
from edgeai.types import Event, Stats


def make_sampler(options: GenerationOptions, engine: Any) -> Callable[[mx.array], mx.array]:
    """A sampler for one request that may share a batch with others.

    Greedy requests share mlx-lm's one `greedy_sampler`, so a batch of them samples in one
    call. A seeded request draws from its own PRNG key, so its output does not depend on
    which other requests happen to share the batch.
    """
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if options.temperature == 0:
        return greedy_sampler
    vocab = int(engine.config.get("vocab_size") or 0)
    filters: list[Callable[[mx.array], mx.array]] = []
    if options.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, options.top_p))
    if options.min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, options.min_p))
    if 0 < options.top_k and (not vocab or options.top_k < vocab):
        filters.append(lambda x: apply_top_k(x, options.top_k))
    inv_temp = 1.0 / options.temperature
    key = [mx.random.key(options.seed)] if options.seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def make_processors(logits: dict, engine: Any) -> list:
    """mlx-lm logits processors for a request's logit_bias and penalties ([] when none)."""
    if not logits:
        return []
    from mlx_lm.sample_utils import make_logits_processors

    from edgeai.errors import InvalidInput

    vocab = int(engine.config.get("vocab_size") or 0)
    bad = [t for t in logits.get("logit_bias", {}) if vocab and t >= vocab]
    if bad:
        raise InvalidInput(f"logit_bias names token {bad[0]}, but {engine.name} has {vocab} tokens",
                           "use token ids from this model's tokenizer")
    return make_logits_processors(**logits)


class SequenceDecoder:
    """Turns one sequence's sampled tokens into Events.

    Args:
        tokenizer: the engine's TokenizerWrapper (a fresh streaming detokenizer is taken).
        options: the request's options (stop strings, top_logprobs).
        prompt_tokens: prompt length, for the stats.
    """

    def __init__(self, tokenizer: Any, options: GenerationOptions, prompt_tokens: int):
        self.detok = tokenizer.detokenizer
        self.eos = set(tokenizer.eos_token_ids)
        self.stops = _StopMatcher(options.stop)
        self.top_n = options.top_logprobs
        self.stats = Stats(prompt_tokens=prompt_tokens)
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def step(self, token: int, signals: tuple[float, float, tuple], batch_finish: str | None
             ) -> tuple[list[Event], str | None]:
        """Events for one sampled token, and the finish reason if the sequence ends here.

        Args:
            token: the sampled token id.
            signals: (logprob, entropy, top alternatives) from `token_signals_batch`.
            batch_finish: the batch's own finish reason for it ("length", "stop" or None).
        """
        token = int(token)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.stats.prompt_seconds = self.stats.ttft_seconds = self.t_first - self.t0
        self.stats.generation_tokens += 1
        lp, ent, top = signals
        if token in self.eos:
            return [Event(text=self.stops.flush(), token=token, logprob=lp, entropy=ent, top_logprobs=top)], "stop"
        self.detok.add_token(token)
        text, hit = self.stops.feed(self.detok.last_segment)
        events = [Event(text=text, token=token, logprob=lp, entropy=ent, top_logprobs=top)]
        if hit:
            return events, "stop"
        if batch_finish is not None:  # max tokens reached: flush what was held back
            self.detok.finalize()
            text, hit = self.stops.feed(self.detok.last_segment)
            tail = text if hit else text + self.stops.flush()
            if tail:
                events.append(Event(text=tail))
            return events, "stop" if hit else "length"
        return events, None

    def finish(self, reason: str) -> Event:
        """The last Event of the sequence, with its finish reason and stats."""
        now = time.perf_counter()
        self.stats.generation_seconds = now - (self.t_first or now)
        self.stats.peak_memory_bytes = int(mx.get_peak_memory())
        return Event(finish_reason=reason, stats=self.stats)
