"""mlx-lm's BatchGenerator as the server uses it: the one module that relies on its internals.

Everything here depends on mlx-lm 0.32.2 (pinned in pyproject.toml) beyond its public API,
and `tests/test_batching.py::test_mlx_lm_contract` fails if a new mlx-lm breaks it:

- prompts (and each prompt's first generated token) are computed by a `PromptProcessingBatch`
  (`BatchGenerator._prompt_batch`, new ones made by `_make_batch`) and handed to the
  running `GenerationBatch` afterwards; both call `self.model(inputs, cache=...)` with the
  rows in the order of their `uids` list.

Every `GenerationBatch` call yields one token per row (its first call for a row runs the
prompt's last token), which is how `RowStates` matches hidden states to tokens.

The running batch's step (`GenerationBatch._step`, copied from mlx-lm 0.32.2 in `_step`
below; the contract test pins its source) normalizes the logits with the kernels'
log-softmax instead of `mx.logsumexp`: MLX's CPU exp is scalar on x86, and 16 rows x 49152
logits were ~11% of a 16-client server's CPU time. The entropy that log-softmax computes in the
same pass is kept per row (`entropies`), so the server's token signals do not exp the logits
a second time.

Here each prompt's first generation step calls the model under the kernels' prompt context
(float32 where decoding uses int8 activations), and the prompt tokens before it fill the cache
in the layers' own precision, as `Engine.generate` runs a prompt, so a batched answer starts
with the same token as the single-stream one; and every call gets each row's LoRA adapter from
the uids of the batch object that makes it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import mlx.core as mx

from edgeai.engine.hidden import RowStates

CONTRACT = {  # what this module reads or overrides in mlx_lm.generate (checked by the test)
    "BatchGenerator": ("_prompt_batch", "_make_batch", "_generation_batch", "insert", "remove"),
    "PromptProcessingBatch": ("uids", "model"),
    "GenerationBatch": ("uids", "model", "_step"),
}
# sha256 of mlx-lm's GenerationBatch._step source, which `_step` below copies (and the test
# compares): a new mlx-lm must be read again before this module runs on it.
STEP_SOURCE_SHA256 = "d7513c5031029194ca3820ae81d8966b792e66a90c39c1d7ad61d30bc9e8c5ad"


def for_engine(
    engine: Any,
    adapter_of: Callable[[int], Any],
    states: RowStates | None = None,
    **kwargs: Any,
) -> Any:
    """The server's BatchGenerator for an Engine.

    Args:
        engine: an edgeai Engine.
        adapter_of: a batch uid -> its adapter (a LoadedAdapter, or None).
        states: where each decoding call's hidden states go (when the engine has a tap).
        kwargs: BatchGenerator's keyword arguments.
    """

    def rows(n: int) -> list:
        return [adapter_of(u) for u in calling_batch(n)[1]]

    hooks = engine.hooks

    def first_step_context() -> AbstractContextManager:
        # As decode_steps: prompt tokens fill the cache in the layers' own precision, the
        # step that yields each row's first token runs under the prompt context.
        return nullcontext() if _filling_prompt() else hooks.prompt_context()

    model = engine.adapters.routed(rows)
    prompt_model = engine.adapters.routed(rows, first_step_context) if hooks.int8_decode else model
    if states is not None:
        model, prompt_model = _Recording(model, states), _Recording(prompt_model, states)
    return batch_generator(model, prompt_model, hooks.log_softmax, **kwargs)


class _Recording:
    """The model, queueing each decoding call's hidden states per row (`RowStates`)."""

    def __init__(self, model: Callable, states: RowStates):
        self._model, self._states = model, states

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._model(inputs, *args, **kwargs)
        if self._states.active:  # no probe, no frame walk on the decode path
            kind, uids = calling_batch(inputs.shape[0])
            if kind == "GenerationBatch":  # prompt batches only fill caches; yield no token
                self._states.record(uids)
        return out


def _filling_prompt() -> bool:
    """Whether the model call under way is a PromptProcessingBatch filling its cache with
    prompt tokens (rather than a batch's generation step)."""
    owner = _batch_owner(sys._getframe(1))
    return type(owner).__name__ == "PromptProcessingBatch"


def _batch_owner(frame: Any) -> Any:
    """The nearest mlx-lm batch object up the stack from `frame` (None if there is none)."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ in ("PromptProcessingBatch", "GenerationBatch"):
            return owner
        frame = frame.f_back
    return None


def calling_batch(n: int) -> tuple[str, list[int]]:
    """The kind and the request uids (in row order) of the mlx-lm batch object whose call is
    under way: ("PromptProcessingBatch" or "GenerationBatch", uids).

    mlx-lm passes no request ids to the model: the batch (`self` of the frame that called
    the model) holds them in `uids`. Raises if that is not what is found.
    """
    owner = _batch_owner(sys._getframe(1))
    uids = getattr(owner, "uids", None)
    if isinstance(uids, list) and len(uids) == n:
        return type(owner).__name__, uids
    raise RuntimeError("cannot tell which request each batch row belongs to (mlx-lm changed?)")


def batch_generator(
    model: Callable, prompt_model: Callable, log_softmax: Callable | None = None, **kwargs: Any
) -> Any:
    """A `mlx_lm.generate.BatchGenerator` over `model` whose prompts run through `prompt_model`.

    Args:
        model: what decoding steps call (the model, or a wrapper such as lora.RoutedModel).
        prompt_model: what prompt processing and each prompt's first step call.
        log_softmax: (rows, vocab) logits -> (log-probabilities, entropy) for the running
            batch's steps (`kernels.Hooks.log_softmax`); None: mlx-lm's own.
        kwargs: BatchGenerator's keyword arguments.
    """
    return _generator_class()(model, prompt_model, log_softmax, **kwargs)


def entropies(generator: Any, uids: list[int]) -> list[float | None]:
    """The entropy of each row's token from the running batch's last step, as the kernels'
    log-softmax computed it, or None where it did not (MLX's own, or a row's first token)."""
    known = getattr(generator._generation_batch, "entropy", {})
    return [known.get(u) for u in uids]


def _generator_class() -> type:
    import importlib

    g = importlib.import_module("mlx_lm.generate")  # the attribute `generate` is a function

    class GenerationBatch(g.GenerationBatch):  # the name the row lookups above look for
        """mlx-lm's running batch, its logits normalized by `self.log_softmax`."""

        log_softmax: Callable = staticmethod(lambda x: (x - mx.logsumexp(x, -1, True), None))
        # (uids, entropies) of the step in flight; uid -> entropy of the tokens just returned.
        # Keyed by uid: rows may leave or join (`filter`, `extend`) between two steps.
        _next_entropy: tuple[list[int], mx.array] | None = None
        entropy: dict[int, float] = {}

        def _step(self) -> tuple[list[int], list[mx.array]]:
            # mlx-lm 0.32.2's GenerationBatch._step; only the normalization differs, and the
            # log-softmax's entropies are kept per row (`entropy`).
            pending = self._next_entropy
            self._current_tokens = self._next_tokens
            self._current_logprobs = self._next_logprobs
            inputs = self._current_tokens
            logits = self.model(inputs[:, None], cache=self.prompt_cache)
            logits = logits[:, -1, :]
            token_context = []
            if any(self.logits_processors):
                processed_logits = []
                for e in range(len(self.uids)):
                    sample_logits = logits[e : e + 1]
                    processors = self.logits_processors[e] or ()
                    if processors:
                        context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                        token_context.append(context)
                        for processor in processors:
                            sample_logits = processor(context, sample_logits)
                    processed_logits.append(sample_logits)
                logits = mx.concatenate(processed_logits, axis=0)
            logprobs, entropy = self.log_softmax(logits.astype(mx.float32))
            samplers = [
                self.fallback_sampler if s is None else s
                for s in (self.samplers or [None] * len(self.uids))
            ]
            if not samplers or all(s is samplers[0] for s in samplers):
                sampled = (samplers[0] if samplers else self.fallback_sampler)(logprobs)
            else:
                sampled = mx.concatenate(
                    [s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0
                )
            self._next_tokens = sampled
            self._next_logprobs = list(logprobs)
            self._next_entropy = (list(self.uids), entropy) if entropy is not None else None
            mx.async_eval(self._next_tokens, self._next_logprobs, token_context, entropy)
            mx.eval(inputs, self._current_logprobs, pending[1] if pending else [])
            self.entropy = dict(zip(pending[0], pending[1].tolist())) if pending else {}
            inputs = inputs.tolist()
            for sti, ti in zip(self.tokens, inputs):
                sti.append(ti)
            return inputs, self._current_logprobs

    class PromptModelBatchGenerator(g.BatchGenerator):
        def __init__(
            self,
            model: Callable,
            prompt_model: Callable,
            log_softmax: Callable | None = None,
            **kwargs: Any,
        ):
            super().__init__(model, **kwargs)
            self._prompt_model = prompt_model
            # New prompts join this batch (`extend` keeps its model); `split` copies it, and
            # the split-off part makes the rows' first generation step with it.
            self._prompt_batch.model = prompt_model
            # Every row decodes in this batch once its first step is made (`extend` moves
            # the rows in): its steps are the ones worth the kernels' log-softmax.
            self._generation_batch.__class__ = GenerationBatch
            if log_softmax is not None:
                self._generation_batch.log_softmax = log_softmax

        def _make_batch(self, n: int):
            batch = super()._make_batch(n)
            batch.model = self._prompt_model
            return batch

    return PromptModelBatchGenerator
