"""Batched decoding (what `edgeai serve` runs) gives each row exactly its single-stream answer.

Exactly, token for token: with float32 kernels (builtin, or custom "accurate"), and with the custom
kernel's default "fast" mode while a batch has at most `int8_rows()` rows (int8 activations, each
row quantized on its own: 3 rows beside an int8 GEMM, 31 on AVX2). In both paths the prompt and its
first generated token run in float32 (the kernels' prompt context): with that step in int8,
SmolLM2-135M opens "What is the capital of France?" with "L" (-1.83 vs "The" -2.11) where float32
says "The" (-1.88 vs -1.97).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from edgeai.engine import Engine
from edgeai.options import GenerationOptions
from edgeai.server import batching
from edgeai.types import Answer

QUESTIONS = ("What is the capital of France?", "hi", "Name three colors please, in a list")


def _batched_equals_single(engine: Engine, n: int = 12) -> None:
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    single = [
        Answer.from_events(engine.generate(p, GenerationOptions(max_tokens=n)), "m").tokens
        for p in prompts
    ]
    # built as the server builds it (edgeai.server.scheduler)
    gen = batching.for_engine(
        engine,
        lambda uid: None,
        stop_tokens=[[int(t)] for t in engine.tokenizer.eos_token_ids],
        completion_batch_size=4,
        prefill_batch_size=4,
    )
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


@pytest.mark.slow
def test_real_model_batched_equals_single_in_fast_mode(smollm_dir):
    _batched_equals_single(Engine.load(smollm_dir, precision="fast"))


def test_mlx_lm_contract():
    """What edgeai.server.batching relies on in mlx-lm beyond its public API is still there."""
    import hashlib
    import importlib
    import inspect

    g = importlib.import_module("mlx_lm.generate")  # `mlx_lm.generate` the attribute is a function

    for cls, names in batching.CONTRACT.items():
        klass = getattr(g, cls)
        src = inspect.getsource(klass)
        for name in names:
            assert hasattr(klass, name) or f"self.{name} =" in src, (
                f"mlx_lm.generate.{cls}.{name} is gone"
            )
    # batching._step is a copy of this one: a changed original must be read again.
    step = inspect.getsource(g.GenerationBatch._step).encode()
    assert hashlib.sha256(step).hexdigest() == batching.STEP_SOURCE_SHA256
    # Both batch kinds call the model as `self.model(...)` (the row owner is `self`).
    for cls in ("PromptProcessingBatch", "GenerationBatch"):
        assert "self.model(" in inspect.getsource(getattr(g, cls))


def test_batched_entropies_are_each_rows_entropy(tiny_model):
    """The kernels' log-softmax entropies that the server's signals use belong to the row and
    the step of the token they come with: equal to the entropy of that token's logprobs."""
    import numpy as np

    from edgeai import kernels

    if not kernels.status().get("available"):
        pytest.skip("custom kernels are not built on this machine")
    engine = Engine.load(tiny_model, kernel="custom", precision="fast")
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    gen = batching.for_engine(engine, lambda uid: None, completion_batch_size=4)
    # different lengths: rows leave the batch while others go on
    uids = gen.insert(prompts, max_tokens=[3, 6, 9])
    checked, finished = 0, 0
    for _ in range(40):
        _, responses = gen.next()
        finished += sum(r.finish_reason is not None for r in responses)
        given = batching.entropies(gen, [r.uid for r in responses])
        for r, e in zip(responses, given):
            if e is None:  # a row's first token comes from the prompt step
                continue
            lp = np.asarray(r.logprobs.astype(mx.float32))
            assert e == pytest.approx(float(-(np.exp(lp) * lp).sum()), rel=1e-4, abs=1e-5)
            checked += 1
        if finished == len(uids):
            break
    assert checked == 3 + 6 + 9 - len(uids)


def test_token_signals_batch_takes_known_entropies_and_finds_the_top_tokens():
    import numpy as np

    from edgeai.engine.decode import token_signals_batch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 3
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    tokens = [int(t) for t in rng.integers(0, 300, size=5)]
    ent = -(np.exp(lp) * lp).sum(axis=1)
    for ns in ([2, 0, 1, 2, 1], [2, 0, 5, 1, 7]):  # a few alternatives, and more
        computed = token_signals_batch(mx.array(lp), tokens, ns)
        given = token_signals_batch(mx.array(lp), tokens, ns, [99.0, None] * 2 + [None])
        for i, (c, g, n) in enumerate(zip(computed, given, ns)):
            assert c[0] == pytest.approx(float(lp[i, tokens[i]]))
            assert c[1] == pytest.approx(float(ent[i]), rel=1e-5)
            assert g[1] == (99.0 if i in (0, 2) else pytest.approx(float(ent[i]), rel=1e-5))
            best = np.argsort(-lp[i])[:n]
            assert [t for t, _ in c[2]] == best.tolist() == [t for t, _ in g[2]]
            assert [v for _, v in c[2]] == pytest.approx(lp[i, best].tolist())
