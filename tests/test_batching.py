"""Batched decoding (what `edgeai serve` runs) gives each row exactly its single-stream answer.

Exactly, token for token, with float32 kernels (builtin, or custom "accurate"). The custom
kernel's default "fast" mode rounds activations to int8 at decode (at most 3 rows) but
not in prompt processing, and a batch computes a prompt's last token in its first (int8)
decode step where a single stream computes it in float32 with the prompt
(kernels_cpu.full_precision): at a near-tie the first token can differ (SmolLM2-135M on "What is the capital of France?": "The" -1.88 vs "L" -1.97 in
float32, -2.11 vs -1.83 with int8 activations).
"""

from __future__ import annotations

import pytest
from mlx_lm.generate import BatchGenerator

from edgeai.engine import Engine
from edgeai.options import GenerationOptions
from edgeai.types import Answer

QUESTIONS = ("What is the capital of France?", "hi", "Name three colors please, in a list")


def _batched_equals_single(engine: Engine, n: int = 12) -> None:
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    single = [Answer.from_events(engine.generate(p, GenerationOptions(max_tokens=n)), "m").tokens for p in prompts]
    gen = BatchGenerator(engine.model, stop_tokens=[[int(t)] for t in engine.tokenizer.eos_token_ids],
                         completion_batch_size=4, prefill_batch_size=4)
    uids = gen.insert(prompts, max_tokens=[n] * len(prompts))
    got: dict[int, list[int]] = {u: [] for u in uids}
    for _ in range(10 * n):
        _, responses = gen.next()
        for r in responses:
            got[r.uid].append(r.token)
        if all(len(got[u]) >= len(s) for u, s in zip(uids, single)):
            break
    assert [got[u][: len(s)] for u, s in zip(uids, single)] == single


@pytest.mark.parametrize("kernel", ["builtin", "custom"])
def test_tiny_model_batched_equals_single(tiny_model, kernel):
    from edgeai import kernels

    if kernel == "custom" and not kernels.status().get("available"):
        pytest.skip("custom kernels are not built on this machine")
    _batched_equals_single(Engine.load(tiny_model, kernel=kernel, precision="accurate"))


@pytest.mark.slow
def test_real_model_batched_equals_single(smollm_dir):
    _batched_equals_single(Engine.load(smollm_dir, precision="accurate"))
