"""Load a model once and generate token events with log-probabilities.

The engine is the only code that runs a local model. It yields `Event`s; everything above
it (confidence, router, server, CLI) consumes those.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.options import GenerationOptions, Message
from edgeai.types import Event, Stats

Prompt = str | Sequence[int] | Sequence[Message] | Sequence[dict]


class Engine:
    """A loaded model with its tokenizer.

    Attributes:
        name: the store name (or the directory name).
        path: the MLX model directory.
        model: the mlx-lm model (quantized layers possibly swapped for our kernels).
        tokenizer: mlx-lm's TokenizerWrapper.
        context_length: the most tokens (prompt + answer) the model accepts.
        kernel: which matmul kernel is active and why.
    """

    def __init__(self, model: nn.Module, tokenizer, path: Path, name: str | None = None, config: dict | None = None):
        from edgeai import kernels

        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.name = name or self.path.name
        self.config = config or {}
        self.context_length = int(self.config.get("max_position_embeddings") or 4096)
        self.kernel = kernels.KernelReport("builtin", "not applied")
        # One generation at a time per model: MLX models are not re-entrant across threads.
        self.lock = threading.Lock()
        from edgeai.lora import store_set

        # LoRA adapters hot-swapped per generation over these base weights (edgeai/lora.py).
        self.adapters = store_set(model, self.name, self.path)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, kernel: str | None = None,
             precision: str | None = None) -> "Engine":
        """Load an MLX model directory (config.json, safetensors, tokenizer files).

        Args:
            path: the model directory.
            name: the name to report (defaults to the directory name).
            kernel: "auto", "builtin" or "custom" (defaults to $EDGEAI_KERNEL or auto).
            precision: the CPU kernel's "fast" or "accurate" mode (defaults to
                $EDGEAI_KERNEL_PRECISION or fast; see edgeai/kernels.py).
        """
        import os

        from mlx_lm.utils import load as mlx_load

        from edgeai import kernels

        path = Path(path)
        if not (path / "config.json").exists():
            raise UnsupportedModel(f"{path} is not an MLX model directory (no config.json)")
        try:
            model, tokenizer = mlx_load(str(path))
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise UnsupportedModel(f"could not load the model in {path}: {e}", "re-import or re-pull it") from e
        config = json.loads((path / "config.json").read_text())
        eng = cls(model, tokenizer, path, name, config)
        eng.kernel = kernels.apply(model, kernel or os.environ.get("EDGEAI_KERNEL", "auto"), precision)
        return eng

    # -- prompts -------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a raw string, a message list (chat template applied) or ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        prompt = list(prompt)
        if not prompt:
            raise InvalidInput("the prompt is empty", "give a prompt, or pipe text on stdin")
        if isinstance(prompt[0], int):
            return [int(t) for t in prompt]
        messages = [m.model_dump() if isinstance(m, Message) else dict(m) for m in prompt]
        if getattr(self.tokenizer, "has_chat_template", False):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return list(ids)
        # Models without a template: plain transcript, answer cue at the end.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(self.tokenizer.encode(text))

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
        adapter: str | None = None,
    ) -> Iterator[Event]:
        """Stream the answer to `prompt` as token events.

        Args:
            prompt: text, token ids, or chat messages (the chat template is applied).
            options: sampling and stopping options.
            cancel: set it from another thread to stop after the current step.
            adapter: a stored LoRA adapter to apply for this generation only (None: base).

        Yields:
            One Event per token (text may be held back while it could start a stop
            string); the last carries finish_reason and stats.
        """
        options = options or GenerationOptions()
        ids = self.encode(prompt)
        if not ids:
            raise InvalidInput("the prompt is empty", "give a prompt, or pipe text on stdin")
        if len(ids) >= self.context_length:
            raise InvalidInput(
                f"the prompt is {len(ids)} tokens; {self.name} accepts at most {self.context_length}",
                "shorten the prompt or the piped input",
            )
        max_tokens = min(options.max_tokens, self.context_length - len(ids))
        # The adapter is selected inside the lock, so it is scoped to this generation alone.
        with self.lock, self.adapters.use(adapter):
            yield from self._generate(ids, options, max_tokens, cancel)

    def _generate(self, ids: list[int], options: GenerationOptions, max_tokens: int, cancel) -> Iterator[Event]:
        from mlx_lm.sample_utils import make_sampler

        if options.seed is not None:
            mx.random.seed(options.seed)
        sampler = make_sampler(
            temp=options.temperature,
            top_p=options.top_p if options.top_p < 1.0 else 0.0,
            min_p=options.min_p,
            top_k=options.top_k,
        )
        eos = set(self.tokenizer.eos_token_ids)
        detok = self.tokenizer.detokenizer
        detok.reset()
        stops = _StopMatcher(options.stop)
        stats = Stats(prompt_tokens=len(ids))
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        t_first = t0
        finish = "length"
        steps = decode_steps(self.model, mx.array(ids), sampler, max_tokens, options.top_logprobs)
        try:
            for n, (token, lp, ent, top) in enumerate(steps):
                if n == 0:
                    t_first = time.perf_counter()
                    stats.prompt_seconds = stats.ttft_seconds = t_first - t0
                stats.generation_tokens = n + 1
                if token in eos:
                    finish = "stop"
                    detok.finalize()
                    text, _ = stops.feed(detok.last_segment)
                    yield Event(text=text + stops.flush(), token=token, logprob=lp, entropy=ent, top_logprobs=top)
                    break
                detok.add_token(token)
                text, hit = stops.feed(detok.last_segment)
                yield Event(text=text, token=token, logprob=lp, entropy=ent, top_logprobs=top)
                if hit:
                    finish = "stop"
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
            else:
                detok.finalize()
                text, _ = stops.feed(detok.last_segment)
                if text:
                    yield Event(text=text)
        finally:
            steps.close()
        if finish == "length":
            tail = stops.flush()
            if tail:
                yield Event(text=tail)
        stats.generation_seconds = time.perf_counter() - t_first
        stats.peak_memory_bytes = int(mx.get_peak_memory())
        yield Event(finish_reason=finish, stats=stats)


def decode_steps(model: nn.Module, prompt: mx.array, sampler: Callable[[mx.array], mx.array],
                 max_tokens: int, top_n: int = 0, prefill_step: int = 512) -> Iterator[tuple[int, float, float, tuple]]:
    """Prefill `prompt`, then yield (token, logprob, entropy, top alternatives) per step.

    The signals are part of each step's graph, evaluated asynchronously with the token, so
    Python builds step n+1 while step n computes (a separate eval would stall the pipeline).
    """
    from mlx_lm.models.cache import make_prompt_cache

    # edgeai's fused CPU layers bring a cache they write in place (kernels_cpu.make_cache).
    cache = getattr(model, "_edgeai_make_cache", make_prompt_cache)(model)
    # One fused node (edgeai's CPU kernels, when in use) or MLX's ops: (log-probabilities, entropy).
    log_softmax = getattr(model, "_edgeai_log_softmax", None) or _log_softmax

    def step(tokens: mx.array) -> list[mx.array]:
        logits = model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
        logprobs, entropy = log_softmax(logits)
        tok = sampler(logprobs)
        outs = [tok, mx.take_along_axis(logprobs, tok[:, None], axis=-1), entropy.sum()]
        if top_n:
            idx = mx.argpartition(-logprobs[0], top_n - 1)[:top_n]
            outs += [idx, logprobs[0][idx]]
        return outs

    # All but the last prompt token only fill the cache (in chunks, to bound the activations'
    # memory): their logits are never evaluated, which skips the LM head, a fifth of a
    # 512-token prefill. The last token then gives the first generated one. The prompt runs
    # in float32 even where decoding uses int8 activations (kernels_cpu.full_precision): it
    # is computed once, and the first token, which sets the answer's course, keeps float32's.
    with getattr(model, "_edgeai_full_precision", contextlib.nullcontext)():
        while prompt.size > 1:
            n = min(prefill_step, prompt.size - 1)
            model(prompt[None, :n], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[n:]
        outs = step(prompt[None])
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
        yield int(outs[0].item()), float(outs[1].item()), float(outs[2].item()), top
        outs = nxt


def _log_softmax(logits: mx.array) -> tuple[mx.array, mx.array]:
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logprobs, -(mx.exp(logprobs) * logprobs).sum(axis=-1)


def token_signals_batch(logprobs: mx.array | Sequence[mx.array], tokens: Sequence[int],
                        top_n: int | Sequence[int]) -> list[tuple[float, float, tuple]]:
    """Logprob of the sampled token, entropy and top alternatives of every row of a batch,
    with one evaluation (the server's batches; single streams get them from `decode_steps`).

    Args:
        logprobs: (batch, vocab) log-probabilities, or one row per sequence.
        tokens: the sampled token of each row.
        top_n: alternatives to report, for all rows or per row.
    """
    rows = logprobs if isinstance(logprobs, mx.array) else mx.stack([r.reshape(-1) for r in logprobs])
    rows = rows.reshape(len(tokens), -1).astype(mx.float32)
    ns = [top_n] * len(tokens) if isinstance(top_n, int) else list(top_n)
    k = max(ns, default=0)
    lp = mx.take_along_axis(rows, mx.array(list(tokens))[:, None], axis=1)[:, 0]
    ent = -(mx.exp(rows) * rows).sum(axis=1)
    if k:
        idx = mx.argpartition(-rows, k - 1, axis=1)[:, :k]
        vals = mx.take_along_axis(rows, idx, axis=1)
        mx.eval(lp, ent, idx, vals)
        alts = [sorted(zip(i, v), key=lambda p: -p[1]) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        mx.eval(lp, ent)
        alts = [[] for _ in ns]
    return [(float(a), float(e), tuple((int(i), float(v)) for i, v in pairs[:n]))
            for a, e, pairs, n in zip(lp.tolist(), ent.tolist(), alts, ns)]


class _StopMatcher:
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
