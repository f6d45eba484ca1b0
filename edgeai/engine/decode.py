"""The one per-token path, shared by `Engine.generate` (one stream) and the server's batches.

- `check_prompt`: the one prompt check (empty, longer than the context, ids outside the
  vocabulary), wherever ids enter;
- `make_sampler` / `make_processors`: one request's sampler and logits processors;
- `decode_steps`: the single-stream loop (prefill, then one step per token with the token's
  signals in the same asynchronous graph);
- `token_signals_batch`: the same signals for every row of a batch, without waiting on MLX;
- `SequenceDecoder`: sampled token -> `Event`s (detokenizer, stop strings, finish reason,
  stats) for one sequence, whichever loop produced the token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from edgeai.engine.hidden import Capture, HiddenTap
from edgeai.engine.prompt_cache import PromptCache
from edgeai.errors import InvalidInput
from edgeai.kernels import Hooks
from edgeai.options import GenerationOptions
from edgeai.types import Event, Stats

Sampler = Callable[[mx.array], mx.array]
Signals = tuple[float, float, tuple]  # (logprob of the token, entropy, top alternatives)


def check_prompt(ids: Sequence[int], context_length: int, vocab_size: int, model: str) -> None:
    """Refuse a prompt the model cannot take, with a message that says why.

    Args:
        ids: the prompt's token ids.
        context_length: the most tokens (prompt + answer) the model accepts; a prompt needs
            room for at least one generated token.
        vocab_size: rows of the embedding table (ids must index it).
        model: the model's name, for the message.
    """
    if not ids:
        raise InvalidInput("the prompt is empty", "give a prompt, or pipe text on stdin")
    if len(ids) >= context_length:
        raise InvalidInput(
            f"the prompt is {len(ids)} tokens; {model} accepts at most {context_length - 1}",
            "shorten the prompt or the piped input",
        )
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidInput(
            f"token id {bad} is outside {model}'s vocabulary (0–{vocab_size - 1})",
            "use token ids from this model's tokenizer",
        )


def make_sampler(options: GenerationOptions, vocab_size: int = 0) -> Sampler:
    """A sampler for one request, alone or sharing a batch with others.

    Greedy requests share mlx-lm's one `greedy_sampler`, so a batch of them samples in one
    call. A seeded request draws from its own PRNG key, so its tokens depend neither on the
    other rows of its batch nor on whether it was batched at all.
    """
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if options.temperature == 0:
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if options.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, options.top_p))
    if options.min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, options.min_p))
    if 0 < options.top_k and (not vocab_size or options.top_k < vocab_size):
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


def make_processors(logits: dict, vocab_size: int, model: str) -> list:
    """mlx-lm logits processors for a request's logit_bias and penalties ([] when none)."""
    if not logits:
        return []
    from mlx_lm.sample_utils import make_logits_processors

    bad = [t for t in logits.get("logit_bias", {}) if vocab_size and t >= vocab_size]
    if bad:
        raise InvalidInput(
            f"logit_bias names token {bad[0]}, but {model} has {vocab_size} tokens",
            "use token ids from this model's tokenizer",
        )
    return make_logits_processors(**logits)


def decode_steps(
    model: nn.Module,
    prompt: mx.array,
    sampler: Sampler,
    max_tokens: int,
    top_n: int = 0,
    hooks: Hooks | None = None,
    prefill_step: int = 512,
    processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = (),
    cache: list | None = None,
    history: Sequence[int] = (),
    hidden: Capture | None = None,
) -> Iterator[tuple[int, float, float, tuple]]:
    """Prefill `prompt`, then yield (token, logprob, entropy, top alternatives) per step.

    The signals are part of each step's graph, evaluated asynchronously with the token, so
    Python builds step n+1 while step n computes (a separate eval would stall the pipeline).

    Args:
        model: the model to call (or a wrapper with the same signature).
        prompt: the prompt's token ids, 1-D.
        sampler: log-probabilities (1, vocab) -> token (1,).
        max_tokens: the most tokens to generate.
        top_n: alternatives to report per token.
        hooks: what the model's kernels need (`edgeai.kernels.Hooks`; MLX's defaults if None).
        prefill_step: prompt tokens per prefill chunk (bounds the activations' memory).
        processors: mlx-lm logits processors, (tokens so far, logits) -> logits (penalties,
            logit_bias); the logprobs reported are the processed ones, as in a batch.
        cache: a KV cache to continue (it already holds the positions before `prompt`);
            default: a new one.
        history: the tokens already in `cache`, which processors see before `prompt`.
        hidden: where to keep the hidden states of a `HiddenTap` on the model: each step's
            joins the step's graph, and the first and latest yielded token's are kept.
    """
    hooks = hooks or Hooks()
    if cache is None:
        cache = hooks.make_cache(model)
    context = [
        mx.concatenate([mx.array(list(history), dtype=prompt.dtype), prompt]) if history else prompt
    ]

    def step(tokens: mx.array, generated: bool = True) -> list[mx.array]:
        logits = model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
        if processors:
            if generated:  # a sampled token joins the context (the prompt is in it already)
                context.append(tokens.reshape(-1))
            seen = mx.concatenate(context) if len(context) > 1 else context[0]
            for proc in processors:
                logits = proc(seen, logits)
        logprobs, entropy = hooks.log_softmax(logits)
        tok = sampler(logprobs)
        outs = [tok, mx.take_along_axis(logprobs, tok[:, None], axis=-1), entropy.sum()]
        if top_n:
            outs += [a[0] for a in hooks.top_k(logprobs, top_n)]
        if hidden is not None:
            outs.append(hidden.tap.read())
        return outs

    # All but the last prompt token only fill the cache (in chunks): their logits are never
    # evaluated, which skips the LM head, a fifth of a 512-token prefill. They run in the
    # layers' own precision (fast mode: int8 activations, the int8 GEMM). The last token then
    # gives the first generated one under the kernels' prompt context (float32 even where
    # decoding uses int8 activations): one row, and the first token sets the answer's course.
    while prompt.size > 1:
        n = min(prefill_step, prompt.size - 1)
        model(prompt[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
    with hooks.prompt_context():
        outs = step(prompt[None], generated=False)
    mx.async_eval(outs)
    for n in range(max_tokens):
        nxt = None
        if n + 1 < max_tokens:
            nxt = step(outs[0][:, None])
            mx.async_eval(nxt)
        top = ()
        if top_n:
            pairs = sorted(zip(outs[3].tolist(), outs[4].tolist()), key=lambda p: -p[1])
            top = tuple((int(i), float(v)) for i, v in pairs)
        if hidden is not None:
            hidden.keep(n, outs[-1])
        yield int(outs[0].item()), float(outs[1].item()), float(outs[2].item()), top
        outs = nxt


class Generation:
    """One sequence through `decode_steps` and a `SequenceDecoder`, a token at a time.

    `advance()` returns the events of one more token; the sequence's last events end with
    the finishing Event (finish reason and stats), after which `finish` is set. The caller
    holds the model while it advances (the engine's lock, or the server's MLX thread).

    Args:
        model: the model to call (or a wrapper with the same signature, e.g. a LoRA one).
        ids: the checked prompt ids.
        options: the request's options.
        tokenizer: the engine's TokenizerWrapper.
        max_tokens: the most tokens to generate (already bounded by the context).
        vocab_size: the model's vocabulary size (top_k bound).
        hooks: the model's kernel hooks.
        processors: mlx-lm logits processors (penalties, logit_bias).
        reuse: (prompt cache, scope): start from the cached prompt that shares the longest
            beginning with `ids` (prefilling only the rest), and keep this prompt's cache
            there when the sequence ends. The scope keeps caches of different weights (LoRA
            adapters) apart.
        tap: the model's `HiddenTap`, if a confidence probe reads hidden states: the
            finishing Event carries them (`Event.hidden`).
    """

    def __init__(
        self,
        model: Callable,
        ids: Sequence[int],
        options: GenerationOptions,
        tokenizer: Any,
        max_tokens: int,
        vocab_size: int = 0,
        hooks: Hooks | None = None,
        processors: Sequence[Callable] = (),
        reuse: tuple[PromptCache, Hashable] | None = None,
        tap: HiddenTap | None = None,
    ):
        hooks = hooks or Hooks()
        self.hidden = Capture(tap) if tap is not None else None
        self.decoder = SequenceDecoder(tokenizer, options, len(ids))
        self.max_tokens = max_tokens
        self.finish: str | None = None
        self._n = 0
        self._ids = list(ids)
        self._reuse = reuse
        cache, self.reused = reuse[0].take(reuse[1], self._ids) if reuse else (None, 0)
        self._cache = hooks.make_cache(model)
        if cache is not None and not _continue_from(self._cache, cache):
            self.reused = 0  # a cache kind that cannot be carried over: prefill it all
        self.decoder.stats.cached_tokens = self.reused
        self._steps = decode_steps(
            model,
            mx.array(self._ids[self.reused :]),
            make_sampler(options, vocab_size),
            max_tokens,
            options.top_logprobs,
            hooks,
            processors=processors,
            cache=self._cache,
            history=self._ids[: self.reused],
            hidden=self.hidden,
        )

    def advance(self) -> list[Event]:
        """The events of the next token (the first call also processes the prompt)."""
        if self.finish is not None:
            return []
        token, lp, ent, top = next(self._steps)
        self._n += 1
        events, end = self.decoder.step(token, (lp, ent, top), last=self._n >= self.max_tokens)
        if end is not None:
            events.append(self.end(end))
        return events

    def end(self, reason: str) -> Event:
        """Stop here; the finishing Event."""
        self._steps.close()
        self.finish = reason
        if self._reuse is not None:
            cached = max((getattr(c, "offset", 0) for c in self._cache), default=0)
            self._reuse[0].put(self._reuse[1], self._ids, self._cache, cached)
        event = self.decoder.finish(reason)
        if self.hidden is not None:
            event.hidden = self.hidden.states()
        return event


def _continue_from(fresh: list, kept: list) -> bool:
    """Give the kernels' own cache (`fresh`, e.g. fused layers' in-place one) the positions
    of a kept one, which may be another KVCache (one cut out of a server batch). False, and
    nothing changed, unless every layer's cache is a plain (growing) KVCache."""
    from mlx_lm.models.cache import KVCache

    if len(fresh) != len(kept) or not all(isinstance(c, KVCache) for c in (*fresh, *kept)):
        return False
    for f, k in zip(fresh, kept):
        f.keys, f.values, f.offset = k.keys, k.values, k.offset
    return True


def token_signals_batch(
    logprobs: mx.array | Sequence[mx.array],
    tokens: Sequence[int],
    top_n: int | Sequence[int],
    entropy: Sequence[float | None] | None = None,
) -> list[Signals]:
    """Logprob of the sampled token, entropy and top alternatives of every row of a batch
    (the server's batches; single streams get them from `decode_steps`).

    Computed in numpy on the rows' evaluated buffers: mlx-lm has already started the batch's
    next step when its tokens come back, and any MLX op here would queue behind that whole
    step on the stream (measured: 19 ms a 16-row step of SmolLM2-135M waiting, then the
    entropy of 16 x 49152 values, while nothing else ran).

    Args:
        logprobs: (batch, vocab) log-probabilities, or one row per sequence (evaluated).
        tokens: the sampled token of each row.
        top_n: alternatives to report, for all rows or per row.
        entropy: each row's entropy where already known (the kernels' log-softmax makes it in
            the same pass), None where it must be computed here.
    """
    parts = [logprobs] if isinstance(logprobs, mx.array) else list(logprobs)
    flat = [np.asarray(p if p.dtype == mx.float32 else p.astype(mx.float32)) for p in parts]
    rows = np.concatenate([f.reshape(-1) for f in flat]).reshape(len(tokens), -1)
    ns = [top_n] * len(tokens) if isinstance(top_n, int) else list(top_n)
    k = max(ns, default=0)
    lp = rows[np.arange(len(tokens)), np.asarray(tokens, dtype=np.int64)].tolist()
    ent = list(entropy) if entropy is not None else [None] * len(tokens)
    todo = [i for i, e in enumerate(ent) if e is None]
    if todo:  # exp of the whole row: 2.5 ms for 16 x 49152 values, so only where not given
        sub = rows[todo]
        for i, e in zip(todo, (-(np.exp(sub) * sub).sum(axis=1)).tolist()):
            ent[i] = e
    alts: list = [[] for _ in ns]
    if k:
        idx, vals = _top_k(rows, k)
        alts = [sorted(zip(i, v), key=lambda p: -p[1]) for i, v in zip(idx.tolist(), vals.tolist())]
    return [
        (float(a), float(e), tuple((int(i), float(v)) for i, v in pairs[:n]))
        for a, e, pairs, n in zip(lp, ent, alts, ns)
    ]


def _top_k(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of each row's k largest entries (any order); `rows` is scratch.

    A few alternatives (the gate asks for 2) by repeated argmax: 0.2 ms for 16 x 49152
    values, where argpartition takes 4 ms."""
    if k > 4:
        idx = np.argpartition(-rows, k - 1, axis=1)[:, :k]
        return idx, np.take_along_axis(rows, idx, axis=1)
    at = np.arange(rows.shape[0])
    idx = np.empty((rows.shape[0], k), dtype=np.int64)
    vals = np.empty((rows.shape[0], k), dtype=rows.dtype)
    for j in range(k):
        idx[:, j] = rows.argmax(axis=1)
        vals[:, j] = rows[at, idx[:, j]]
        rows[at, idx[:, j]] = -np.inf
    return idx, vals


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out = self.pending[:i]
                self.pending = ""
                return out, True
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class SequenceDecoder:
    """Turns one sequence's sampled tokens into Events, whichever loop sampled them.

    Args:
        tokenizer: the engine's TokenizerWrapper (a fresh streaming detokenizer is taken).
        options: the request's options (stop strings, top_logprobs).
        prompt_tokens: prompt length, for the stats.
    """

    def __init__(self, tokenizer: Any, options: GenerationOptions, prompt_tokens: int):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.stops = StopMatcher(options.stop)
        self.top_n = options.top_logprobs
        self.stats = Stats(prompt_tokens=prompt_tokens)
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def step(self, token: int, signals: Signals, last: bool) -> tuple[list[Event], str | None]:
        """Events for one sampled token, and the finish reason if the sequence ends here.

        Args:
            token: the sampled token id.
            signals: (logprob, entropy, top alternatives) of the token.
            last: no more tokens will be generated (max tokens reached).
        """
        token = int(token)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.stats.prompt_seconds = self.stats.ttft_seconds = self.t_first - self.t0
        self.stats.generation_tokens += 1
        lp, ent, top = signals
        if token in self.eos:
            self.detok.finalize()
            text, _ = self.stops.feed(self.detok.last_segment)
            return [
                Event(
                    text=text + self.stops.flush(),
                    token=token,
                    logprob=lp,
                    entropy=ent,
                    top_logprobs=top,
                )
            ], "stop"
        self.detok.add_token(token)
        text, hit = self.stops.feed(self.detok.last_segment)
        events = [Event(text=text, token=token, logprob=lp, entropy=ent, top_logprobs=top)]
        if hit:
            return events, "stop"
        if last:  # flush what the detokenizer and the stop matcher held back
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
