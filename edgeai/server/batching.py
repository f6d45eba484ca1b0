"""mlx-lm's BatchGenerator with prompts computed by a model of their own.

mlx-lm computes each prompt (and, once it is done, the prompt's first generated token) in a
`PromptProcessingBatch` and hands the rows to the running `GenerationBatch` afterwards. Here
that prompt batch calls `prompt_model`: for edgeai's CPU kernels in fast mode, the same
model under the float32 context (the kernels' prompt context), as `Engine.generate` runs a
prompt. A batched answer then starts with the same token as the single-stream one.
"""

from __future__ import annotations

from typing import Any, Callable


def for_engine(engine: Any, adapter_of: Callable[[int], Any], **kwargs: Any) -> Any:
    """The server's BatchGenerator for an Engine: each row runs with its request's LoRA
    adapter (`adapter_of(uid)`, lora.RoutedModel), and prompts run in float32 where decoding
    uses int8 activations, as in Engine.generate.

    Args:
        engine: an edgeai Engine.
        adapter_of: a batch uid -> its adapter (or None).
        kwargs: BatchGenerator's keyword arguments.
    """
    model = engine.adapters.routed(adapter_of)
    hooks = engine.hooks
    prompt_model = engine.adapters.routed(adapter_of, hooks.prompt_context) if hooks.int8_decode else model
    return batch_generator(model, prompt_model, **kwargs)


def batch_generator(model: Callable, prompt_model: Callable, **kwargs: Any) -> Any:
    """A `mlx_lm.generate.BatchGenerator` over `model` whose prompts run through `prompt_model`.

    Args:
        model: what decoding steps call (the model, or a wrapper such as lora.RoutedModel).
        prompt_model: what prompt processing and each prompt's first step call.
        kwargs: BatchGenerator's keyword arguments.
    """
    return _generator_class()(model, prompt_model, **kwargs)


def _generator_class() -> type:
    from mlx_lm.generate import BatchGenerator

    class PromptModelBatchGenerator(BatchGenerator):
        def __init__(self, model: Callable, prompt_model: Callable, **kwargs: Any):
            super().__init__(model, **kwargs)
            self._prompt_model = prompt_model
            # New prompts join this batch (`extend` keeps its model); `split` copies it, and
            # the split-off part makes the rows' first generation step with it.
            self._prompt_batch.model = prompt_model

        def _make_batch(self, n: int):
            batch = super()._make_batch(n)
            batch.model = self._prompt_model
            return batch

    return PromptModelBatchGenerator
