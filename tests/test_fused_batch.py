"""The fused llama layer on a batch of left-padded rows (mlx-lm's BatchKVCache, what the
server's batches decode with): each row at its own positions, attending to its own keys."""

from __future__ import annotations

import mlx.core as mx
import pytest

from edgeai import kernels

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    kc.extension()
except kc.KernelUnavailable:
    pytest.skip("C++ kernels not built", allow_module_level=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))


TOL = 1e-4  # float32 rounding (summation orders differ by instruction set); a wrong row is O(1)


def rel_err(y: mx.array, ref: mx.array) -> float:
    return (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()


def _prompts(lengths: tuple[int, ...]) -> list[list[int]]:
    return [
        mx.random.randint(3, 200, (n,), key=mx.random.key(30 + i)).tolist()
        for i, n in enumerate(lengths)
    ]


def _batched(model, prompts: list[list[int]], steps: int) -> tuple[mx.array, list]:
    """Logits [steps + 1, rows, vocab] of a left-padded batch decoded greedily, and its cache."""
    from mlx_lm.models.cache import BatchKVCache

    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    cache = [BatchKVCache(pads) for _ in model.layers]
    tokens = mx.array([[0] * n + p for n, p in zip(pads, prompts)])
    out = [model(tokens, cache=cache)[:, -1]]
    for _ in range(steps):
        out.append(model(mx.argmax(out[-1], axis=-1)[:, None], cache=cache)[:, -1])
    return mx.stack(out), cache


def _solo(engine, prompt: list[int], steps: int) -> tuple[mx.array, list]:
    m, cache = engine.model, engine.hooks.make_cache(engine.model)
    out = [m(mx.array([prompt]), cache=cache)[:, -1]]
    for _ in range(steps):
        out.append(m(mx.argmax(out[-1], axis=-1)[:, None], cache=cache)[:, -1])
    return mx.concatenate(out), cache


def _unfused(model):
    """The model's layers with mlx-lm's own class (edgeai's per-op kernels) until restored."""
    fused = type(model.layers[0])
    for b in model.layers:
        b.__class__ = fused.__mro__[1]
    return fused


# 250 + 12: one row's buffer crosses the cache's 256-position growth step while decoding
@pytest.mark.parametrize("lengths", [(5, 2, 9), (250, 3)])
def test_fused_batch_matches_per_op_path_and_solo(tiny_model, monkeypatch, lengths):
    from mlx_lm.models import llama

    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision="accurate")
    prompts, steps = _prompts(lengths), 12
    calls = []
    per_op_call = llama.TransformerBlock.__call__
    monkeypatch.setattr(
        llama.TransformerBlock,
        "__call__",
        lambda self, *a, **k: calls.append(1) or per_op_call(self, *a, **k),
    )
    fused, cache = _batched(eng.model, prompts, steps)
    assert calls == []  # every layer of every step took the fused nodes
    cls = _unfused(eng.model)
    try:
        per_op, _ = _batched(eng.model, prompts, steps)
    finally:
        for b in eng.model.layers:
            b.__class__ = cls
    assert calls and rel_err(fused, per_op) < TOL
    for i, p in enumerate(prompts):  # each row is its own single-stream run, cache included
        logits, solo_cache = _solo(eng, p, steps)
        assert rel_err(fused[:, i], logits) < TOL
        # keys at each row's own positions (RoPE): what the prompt cache hands a later request
        for c, s in zip(cache, solo_cache):
            row = c.extract(i)
            assert row.offset == s.offset == len(p) + steps
            assert rel_err(row.keys, s.keys[..., : s.offset, :]) < TOL
            assert rel_err(row.values, s.values[..., : s.offset, :]) < TOL


def test_verification_refuses_a_batch_path_that_ignores_padding(tiny_model, monkeypatch):
    """A fused layer that puts every batch row at the same positions fails its check."""
    from mlx_lm.utils import load

    real = kc._llama_block_class

    def unpadded(base=None):
        cls = real(base)

        class Wrong(cls):
            def _batch_call(self, x, mask, cache):
                pad = cache.left_padding
                cache.left_padding = mx.zeros_like(pad)
                try:
                    return super()._batch_call(x, mask, cache)
                finally:
                    cache.left_padding = pad

        return Wrong

    monkeypatch.setattr(kc, "_llama_block_class", unpadded)
    model, _ = load(str(tiny_model))
    rep = kernels.apply(model, "custom", "accurate")
    assert rep.name == "edgeai-cpu" and "fused" not in rep.attention


def test_batch_padding_is_checked():
    ext = kc.extension()
    w, s, b = mx.quantize(mx.random.normal((64, 64), key=mx.random.key(40)) * 0.2, 32, 4)
    x = mx.random.normal((2, 1, 64), key=mx.random.key(41))
    args = (x, mx.ones((64,)), 1e-5, [w, s, b] * 3, 4, 4, 16, False, 1e4, 1.0, 0, 32, 4, False)
    with pytest.raises(ValueError, match="left padding"):
        ext.norm_qkv(*args, [], [], mx.array([0, 0, 0]))
    q, k, v = ext.norm_qkv(*args, [], [], mx.array([0, 0]))
    with pytest.raises(ValueError, match="left padding"):
        ext.attn_out(q, k, v, x, [w, s, b], 0.25, True, 32, 4, False, -1, mx.array([0.5, 0.0]))
