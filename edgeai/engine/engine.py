"""Load a model once and generate token events with log-probabilities.

The engine is the only code that runs a local model. It yields `Event`s; everything above
it (confidence, router, server, CLI) consumes those.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from edgeai import kernels
from edgeai.config import env_number
from edgeai.engine.decode import Generation, check_prompt
from edgeai.engine.hidden import HiddenTap, decoder_layers
from edgeai.engine.lora import store_set
from edgeai.engine.prompt_cache import DEFAULT_BYTES, PromptCache
from edgeai.engine.tools import ToolChat
from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.options import GenerationOptions, Message
from edgeai.types import Event

Prompt = str | Sequence[int] | Sequence[Message] | Sequence[dict] | ToolChat


class Engine:
    """A loaded model with its tokenizer.

    Attributes:
        name: the store name (or the directory name).
        path: the MLX model directory.
        model: the mlx-lm model (quantized layers possibly swapped for our kernels).
        tokenizer: mlx-lm's TokenizerWrapper.
        context_length: the most tokens (prompt + answer) the model accepts.
        vocab_size: rows of the embedding table: token ids must be below it.
        kernel: which matmul kernel is active and why; its `hooks` are what the decode loop
            uses with this model.
        tap: the hidden-state tap a confidence probe reads (`tap_hidden`), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        path: Path,
        name: str | None = None,
        config: dict | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.name = name or self.path.name
        self.config = config or {}
        self.context_length = int(self.config.get("max_position_embeddings") or 4096)
        self.vocab_size = _vocab_size(model, self.config)
        self.kernel = kernels.KernelReport("builtin", "not applied")
        # One generation at a time per model: MLX models are not re-entrant across threads.
        self.lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        # Recent prompts' KV caches, reused by prompts that start the same way.
        mb = env_number(
            "EDGEAI_PROMPT_CACHE_MB", DEFAULT_BYTES >> 20, low=0, high=1 << 20, kind=int
        )
        self.prompt_cache = PromptCache(int(mb) << 20)
        # LoRA adapters hot-swapped per generation over these base weights (engine/lora.py).
        self.adapters = store_set(model, self.name, self.path)
        self.tap: HiddenTap | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        name: str | None = None,
        kernel: str | None = None,
        precision: str | None = None,
    ) -> Engine:
        """Load an MLX model directory (config.json, safetensors, tokenizer files).

        Args:
            path: the model directory.
            name: the name to report (defaults to the directory name).
            kernel: "auto", "builtin" or "custom" (defaults to $EDGEAI_KERNEL or auto).
            precision: the CPU kernel's "fast" or "accurate" mode (defaults to
                $EDGEAI_KERNEL_PRECISION or fast; see edgeai/kernels).
        """
        from mlx_lm.utils import load as mlx_load

        path = Path(path)
        if not (path / "config.json").exists():
            raise UnsupportedModel(f"{path} is not an MLX model directory (no config.json)")
        try:
            model, tokenizer = mlx_load(str(path))
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise UnsupportedModel(
                f"could not load the model in {path}: {e}", "re-import or re-pull it"
            ) from e
        config = json.loads((path / "config.json").read_text())
        eng = cls(model, tokenizer, path, name, config)
        eng.kernel = kernels.apply(
            model, kernel or os.environ.get("EDGEAI_KERNEL", "auto"), precision
        )
        return eng

    @property
    def hooks(self) -> kernels.Hooks:
        return self.kernel.hooks

    def tap_hidden(self, layers: Sequence[int]) -> HiddenTap:
        """Make every later generation carry these decoder layers' hidden states on its
        finishing Event (a confidence probe's input; a slice per step, no extra pass)."""
        wanted = sorted({i % self.layer_count for i in layers})
        if self.tap is None or self.tap.layers != wanted:
            self.tap = HiddenTap(self.model, wanted)
        return self.tap

    @property
    def layer_count(self) -> int:
        return len(decoder_layers(self.model))

    # -- prompts -------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a raw string, a message list (chat template applied) or ids.

        Safe from any thread: a Hugging Face fast tokenizer may refuse concurrent calls
        ("Already borrowed"), so they take turns.
        """
        with self._tokenizer_lock:
            return self._encode(prompt)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, ToolChat):  # tools and tool messages: the template's own rendering
            return prompt.encode(self.tokenizer)
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
        ids = self.prompt_ids(prompt)
        # The adapter is selected inside the lock, so it is scoped to this generation alone.
        with self.lock, self.adapters.use(adapter) as ad:
            yield from self.stream(ids, options, cancel, scope=cache_scope(ad))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """`encode(prompt)`, checked: not empty, shorter than the context, ids in the vocabulary."""
        ids = self.encode(prompt)
        check_prompt(ids, self.context_length, self.vocab_size, self.name)
        return ids

    def max_new_tokens(self, ids: Sequence[int], options: GenerationOptions) -> int:
        return min(options.max_tokens, self.context_length - len(ids))

    def stream(
        self,
        ids: list[int],
        options: GenerationOptions,
        cancel: threading.Event | None = None,
        model: Callable | None = None,
        scope: Hashable = None,
    ) -> Iterator[Event]:
        """Events for checked prompt ids (`prompt_ids`), through the one decode loop.

        The caller holds the model (the lock, or the server's MLX thread) and has chosen
        its adapter; `model` replaces `self.model` for the calls (a LoRA-routing wrapper),
        and `scope` names those weights for the prompt cache (`cache_scope`).
        """
        mx.reset_peak_memory()
        gen = self.generation(ids, options, model=model, scope=scope)
        try:
            while gen.finish is None:
                if cancel is not None and cancel.is_set():
                    yield gen.end("cancelled")
                    break
                yield from gen.advance()
        finally:
            if gen.finish is None:  # the consumer stopped early
                gen.end("cancelled")

    def generation(
        self,
        ids: list[int],
        options: GenerationOptions,
        *,
        model: Callable | None = None,
        processors: Sequence[Callable] = (),
        scope: Hashable = None,
    ) -> Generation:
        """A `Generation` of this model for checked prompt ids (the caller holds the model),
        continuing from the prompt cache within `scope` (`cache_scope` of its adapter)."""
        reuse = (self.prompt_cache, scope) if self.prompt_cache.max_bytes > 0 else None
        return Generation(
            model or self.model,
            ids,
            options,
            self.tokenizer,
            self.max_new_tokens(ids, options),
            self.vocab_size,
            self.hooks,
            processors,
            reuse,
            self.tap,
        )


def cache_scope(adapter: Any) -> Hashable:
    """What a prompt's KV depends on besides its tokens: the LoRA adapter (and its version)."""
    return None if adapter is None else (adapter.name, adapter.version)


def _vocab_size(model: nn.Module, config: dict) -> int:
    """Rows of the model's input embedding (the config can disagree with the weights)."""
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    weight = getattr(emb, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(config.get("vocab_size") or 0) or 1 << 31
