"""edgeai's fused llama-layer nodes (kernels/cpu/fused.cpp) against MLX compositions, and
how the runtime verifies, uses and refuses them."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from edgeai import kernels

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable:
    EXT = None
pytestmark = pytest.mark.skipif(EXT is None, reason="C++ kernels not built")

EPS = 1e-5


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))


def layer(n: int, k: int, seed: int, bits: int = 4, gs: int = 32):
    """A quantized layer as (weight, scales, biases) and its dequantized float32 matrix."""
    w, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(seed)) * 0.2, gs, bits)
    return [w, s, b], mx.dequantize(w, s, b, gs, bits)


def rel_err(y: mx.array, ref: mx.array) -> float:
    return (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()


def tol(fast: bool) -> float:
    return 2e-2 if fast else 1e-5


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_norm_mlp_matches_mlx(fast, bits):
    d, f = 64, 160
    h = mx.random.normal((2, 3, d), key=mx.random.key(1))
    nw = mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(2))
    (g, wg), (u, wu), (dn, wd) = layer(f, d, 3, bits), layer(f, d, 4, bits), layer(d, f, 5, bits)
    n = mx.fast.rms_norm(h, nw, EPS)
    ref = h + (nn.silu(n @ wg.T) * (n @ wu.T)) @ wd.T
    y = EXT.norm_mlp(h, nw, EPS, g + u + dn, 32, bits, fast)
    assert y.shape == h.shape and rel_err(y, ref) < tol(fast)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("traditional", [False, True])
def test_norm_qkv_matches_mlx(fast, traditional):
    b, seq, hq, hkv, hd = 2, 3, 4, 2, 16
    d, offset = hq * hd, 7
    x = mx.random.normal((b, seq, d), key=mx.random.key(6))
    nw = mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(7))
    (q, wq), (k, wk), (v, wv) = layer(hq * hd, d, 8), layer(hkv * hd, d, 9), layer(hkv * hd, d, 10)
    n = mx.fast.rms_norm(x, nw, EPS)

    def heads(y, h):
        return y.reshape(b, seq, h, hd).transpose(0, 2, 1, 3)

    def rope(t):
        return mx.fast.rope(t, 12, traditional=traditional, base=10000.0, scale=1.0, offset=offset)

    refs = (rope(heads(n @ wq.T, hq)), rope(heads(n @ wk.T, hkv)), heads(n @ wv.T, hkv))
    outs = EXT.norm_qkv(
        x, nw, EPS, q + k + v, hq, hkv, 12, traditional, 10000.0, 1.0, offset, 32, 4, fast
    )
    for y, ref in zip(outs, refs):
        assert y.shape == ref.shape and rel_err(y, ref) < tol(fast)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("seq, causal", [(1, False), (3, True)])
def test_attn_out_matches_mlx(fast, seq, causal):
    hq, hkv, hd, s = 4, 2, 16, 9
    d = hq * hd
    q = mx.random.normal((1, hq, seq, hd), key=mx.random.key(11))
    cache = mx.random.normal((1, hkv, 32, hd), key=mx.random.key(12))
    k, v = (
        cache[:, :, :s, :],
        cache[:, :, 3 : s + 3, :],
    )  # strided views, as mlx-lm's KV cache hands out
    x = mx.random.normal((1, seq, d), key=mx.random.key(13))
    o, wo = layer(d, d, 14)
    att = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=hd**-0.5, mask="causal" if causal else None
    )
    ref = x + att.transpose(0, 2, 1, 3).reshape(1, seq, d) @ wo.T
    y = EXT.attn_out(q, k, v, x, o, hd**-0.5, causal, 32, 4, fast)
    assert y.shape == x.shape and rel_err(y, ref) < tol(fast)


@pytest.mark.parametrize("fast", [False, True])
def test_fused_ops_take_each_layers_own_format(fast):
    """bits = group_size = 0: every projection keeps its own (a K-quant layer mixes them)."""
    b, seq, hq, hkv, hd = 1, 2, 4, 2, 32
    d, f = hq * hd, 192
    x = mx.random.normal((b, seq, d), key=mx.random.key(20))
    nw = mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(21))
    (q, wq), (k, wk) = layer(d, d, 22, 5), layer(hkv * hd, d, 23, 8, 64)
    v, wv = layer(hkv * hd, d, 24, 6)
    (g, wg), (u, wu), (dn, wd) = layer(f, d, 25, 4, 128), layer(f, d, 26, 5, 64), layer(d, f, 27, 6)
    n = mx.fast.rms_norm(x, nw, EPS)
    outs = EXT.norm_qkv(x, nw, EPS, q + k + v, hq, hkv, hd, False, 1e4, 1.0, 0, 0, 0, fast)

    def heads(y, h):
        return y.reshape(b, seq, h, hd).transpose(0, 2, 1, 3)

    rope = {"traditional": False, "base": 1e4, "scale": 1.0, "offset": 0}
    refs = [mx.fast.rope(heads(n @ w.T, h), hd, **rope) for w, h in ((wq, hq), (wk, hkv))]
    refs.append(heads(n @ wv.T, hkv))
    for y, ref in zip(outs, refs):
        assert rel_err(y, ref) < tol(fast)
    ref = x + (nn.silu(n @ wg.T) * (n @ wu.T)) @ wd.T
    assert rel_err(EXT.norm_mlp(x, nw, EPS, g + u + dn, 0, 0, fast), ref) < tol(fast)
    with pytest.raises(ValueError, match="bits are not 5"):  # a stated format is enforced
        EXT.norm_mlp(x, nw, EPS, g + u + dn, 0, 5, fast)
    with pytest.raises(ValueError, match="group_size"):
        EXT.norm_mlp(x, nw, EPS, g + u + dn, 32, 0, fast)


def test_fused_ops_reject_bad_input():
    (w, s, b), _ = layer(64, 64, 15)
    x, nw = mx.zeros((1, 1, 64)), mx.ones((64,))
    with pytest.raises(ValueError, match="triples"):
        EXT.norm_mlp(x, nw, EPS, [w, s, b, w, s], 32, 4, False)
    with pytest.raises(ValueError, match="float32"):
        EXT.norm_mlp(x.astype(mx.float16), nw, EPS, [w, s, b] * 3, 32, 4, False)
    with pytest.raises(ValueError, match="heads"):
        EXT.norm_qkv(x, nw, EPS, [w, s, b] * 3, 5, 1, 8, False, 1e4, 1.0, 0, 32, 4, False)
    with pytest.raises(ValueError, match="input size"):
        EXT.norm_qkv(
            mx.zeros((1, 1, 32)),
            mx.ones((32,)),
            EPS,
            [w, s, b] * 3,
            4,
            4,
            8,
            False,
            1e4,
            1.0,
            0,
            32,
            4,
            False,
        )
    q = mx.zeros((1, 3, 1, 16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        EXT.attn_out(
            q,
            mx.zeros((1, 2, 4, 16)),
            mx.zeros((1, 2, 4, 16)),
            mx.zeros((1, 1, 48)),
            [w, s, b],
            1.0,
            False,
            32,
            4,
            False,
        )


def _block_classes(model: nn.Module) -> set[str]:
    from mlx_lm.models import llama, qwen2

    blocks = (llama.TransformerBlock, qwen2.TransformerBlock)
    return {type(m).__name__ for _, m in model.named_modules() if isinstance(m, blocks)}


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_engine_uses_fused_layers_once_verified(tiny_model, precision):
    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision=precision)
    assert "fused layers 2" in eng.kernel.attention
    assert _block_classes(eng.model) == {"CpuLlamaBlock"}
    verdicts = [v for k, v in kernels._read_cache().items() if k.startswith("fused_block")]
    # fast layers are checked twice: as they decode, and in float32 (the first token's step)
    assert len(verdicts) == (2 if precision == "fast" else 1)
    assert all(v["ok"] and v["max_rel"] < kernels.ATTN_TOL for v in verdicts)


def test_wrong_fused_layer_is_refused(tiny_model, monkeypatch):
    from mlx_lm.utils import load

    real = kc._llama_block_class

    def off_by_one(base=None):
        cls = real(base)

        class Wrong(cls):
            def __call__(self, x, mask=None, cache=None):
                return super().__call__(x, mask, cache) + 1.0

        return Wrong

    monkeypatch.setattr(kc, "_llama_block_class", off_by_one)
    model, _ = load(str(tiny_model))
    rep = kernels.apply(model, "custom", "accurate")
    assert rep.name == "edgeai-cpu" and "fused" not in rep.attention
    assert _block_classes(model) == {"TransformerBlock"}


def test_fused_layer_defers_to_mlx_lm_for_wrapped_projections(tiny_model):
    """A projection that is not a plain kernel layer (as under LoRA) takes mlx-lm's path."""
    from mlx_lm.models.cache import KVCache

    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision="accurate")
    block = eng.model.model.layers[0]
    x = mx.random.normal((1, 4, block.hidden_size), key=mx.random.key(16))
    fused = block(x, "causal", KVCache())

    class Wrapped(nn.Module):  # a stand-in wrapper: same output, different type
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, t):
            return self.inner(t)

    inner = block.self_attn.v_proj
    assert block._layer() is not None
    block.self_attn.v_proj = Wrapped(inner)
    assert block._layer() is None  # noticed at once: the cached fused layer is not used
    unfused = block(x, "causal", KVCache())
    assert rel_err(unfused, fused) < 1e-5
    block.self_attn.v_proj = inner
    assert block._layer() is not None


def test_log_softmax_matches_mlx_and_is_what_decoding_uses(tiny_model):
    x = mx.random.normal((3, 1000), key=mx.random.key(17)) * 5.0
    x[1, 3] = -float("inf")
    lp, ent = EXT.log_softmax(x)
    ref = x - mx.logsumexp(x, axis=-1, keepdims=True)
    finite = mx.isfinite(ref)
    assert mx.array_equal(finite, mx.isfinite(lp)).item()
    assert mx.max(mx.where(finite, mx.abs(lp - ref), 0.0)).item() < 1e-4
    p = mx.exp(ref)
    assert mx.allclose(ent, -mx.where(p > 0, p * ref, 0.0).sum(axis=-1), atol=1e-4).item()
    assert kernels.check_log_softmax() < kernels.ATTN_TOL
    with pytest.raises(ValueError, match="float32"):
        EXT.log_softmax(x.astype(mx.float16))

    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom")
    assert "log_softmax" in eng.kernel.attention and eng.hooks.log_softmax is EXT.log_softmax
    assert Engine.load(tiny_model, kernel="builtin").hooks.log_softmax is not EXT.log_softmax


def _top_k_reference(x: np.ndarray, k: int) -> list[list[int]]:
    """Each row's k largest entries, largest first and the lower index first among equals,
    NaNs last (the order the kernel promises)."""
    return [sorted(range(len(r)), key=lambda j: (np.isnan(r[j]), -r[j], j))[:k] for r in x]


@pytest.mark.parametrize("vocab", [5, 4097, 49157])
def test_top_k_names_each_rows_largest_entries_and_is_what_decoding_uses(tiny_model, vocab):
    rng = np.random.default_rng(vocab)
    x = np.round(rng.normal(size=(3, vocab)) * 4, 1).astype(np.float32)  # many ties
    x[1, : vocab // 2] = -np.inf  # masked logits
    x[2, 1::2] = np.nan  # a broken row: NaNs are never chosen while numbers remain
    for k in sorted({1, 2, 5, min(20, vocab), vocab}):
        idx, vals = EXT.top_k(mx.array(x), k)
        assert np.array(idx).tolist() == _top_k_reference(x, k)
        want = np.take_along_axis(x, np.array(idx, dtype=np.int64), axis=1)
        np.testing.assert_array_equal(np.array(vals), want)
    # a batch of one-token rows, (B, 1, V), as the server's logits come
    idx, _ = EXT.top_k(mx.array(x[:, None, :]), 2)
    assert idx.shape == (3, 1, 2) and np.array(idx)[:, 0].tolist() == _top_k_reference(x, 2)
    for bad, k in ((mx.array(x).astype(mx.float16), 2), (mx.array(x), 0), (mx.array(x), vocab + 1)):
        with pytest.raises(ValueError, match="top_k"):
            EXT.top_k(bad, k)
    assert kernels.check_top_k() == 0.0

    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions
    from edgeai.types import Answer

    eng = Engine.load(tiny_model, kernel="custom", precision="accurate")
    assert eng.kernel.attention.endswith("top_k") and eng.hooks.top_k is EXT.top_k
    builtin = Engine.load(tiny_model, kernel="builtin")
    assert builtin.hooks.top_k is not EXT.top_k
    # the alternatives decoding reports are the top of the token's distribution, either way
    opts = GenerationOptions(max_tokens=4, top_logprobs=3)
    for e in (eng, builtin):
        ans = Answer.from_events(e.generate("hello", opts), e.name)
        logits = e.model(mx.array([e.encode("hello")]))[0, -1]
        lps = np.array(logits - mx.logsumexp(logits))
        first = [t for t, _ in ans.top_logprobs[0]]
        assert first == _top_k_reference(lps[None], 3)[0]


def test_custom_engine_events_carry_true_logprobs_and_entropy(tiny_model):
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions
    from edgeai.types import Answer

    eng = Engine.load(tiny_model, kernel="custom", precision="accurate")
    ans = Answer.from_events(eng.generate("hello", GenerationOptions(max_tokens=3)), eng.name)
    logits = eng.model(mx.array([eng.encode("hello")]))[0, -1]
    lps = logits - mx.logsumexp(logits)
    assert abs(ans.logprobs[0] - lps[ans.tokens[0]].item()) < 1e-4
    assert abs(ans.entropies[0] - (-(mx.exp(lps) * lps).sum().item())) < 1e-4


@pytest.mark.parametrize("prompt_len", [5, 250])  # 250 + 12 crosses the 256-position growth step
def test_fused_cache_matches_mlx_lm_cache(tiny_model, prompt_len):
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision="accurate")
    m = eng.model
    assert [type(c).__name__ for c in eng.hooks.make_cache(m)] == ["FusedKVCache"] * len(m.layers)
    prompt = mx.random.randint(0, 200, (1, prompt_len), key=mx.random.key(18))
    runs = []
    for cache in (eng.hooks.make_cache(m), make_prompt_cache(m)):
        logits, tok = [m(prompt, cache=cache)[:, -1]], None
        for _ in range(12):
            tok = mx.argmax(logits[-1], axis=-1)[:, None]
            logits.append(m(tok, cache=cache)[:, -1])
        runs.append((mx.concatenate(logits), cache))
    (fused, fc), (plain, pc) = runs
    assert type(pc[0]) is KVCache and rel_err(fused, plain) < 1e-5
    assert fc[0].offset == pc[0].offset == prompt_len + 12
    k1, v1 = fc[0].keys[..., : fc[0].offset, :], fc[0].values[..., : fc[0].offset, :]
    k2, v2 = pc[0].state[0][..., : pc[0].offset, :], pc[0].state[1][..., : pc[0].offset, :]
    assert rel_err(k1, k2) < 1e-5 and rel_err(v1, v2) < 1e-5


def test_cache_writes_are_checked():
    (w, s, b), _ = layer(64, 64, 19)
    x, nw = mx.random.normal((1, 2, 64), key=mx.random.key(20)), mx.ones((64,))
    full = [mx.zeros((1, 4, 8, 16)), mx.zeros((1, 4, 8, 16))]
    args = (x, nw, EPS, [w, s, b] * 3, 4, 4, 16, False, 1e4, 1.0)
    with pytest.raises(ValueError, match="no room"):
        EXT.norm_qkv(*args, 7, 32, 4, False, full)
    with pytest.raises(ValueError, match="capacity"):
        EXT.norm_qkv(*args, 0, 32, 4, False, [mx.zeros((1, 2, 8, 16))] * 2)
    q, k, v = EXT.norm_qkv(*args, 6, 32, 4, False, full)
    assert (
        k.shape == (1, 4, 8, 16) and mx.all(k[:, :, :6] == 0).item()
    )  # only positions 6 and 7 written
    assert mx.any(v[:, :, 6:] != 0).item()


def test_long_prompt_prefilled_in_chunks_matches_builtin(tiny_model):
    """A prompt longer than one 512-token prefill chunk goes through the fused cache in pieces."""
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions

    prompt = [int(t) for t in mx.random.randint(3, 200, (700,), key=mx.random.key(21)).tolist()]
    opts = GenerationOptions(max_tokens=8)
    runs = [
        [
            e.token
            for e in Engine.load(tiny_model, kernel=k, precision="accurate").generate(prompt, opts)
            if e.token is not None
        ]
        for k in ("builtin", "custom")
    ]
    assert runs[0] == runs[1] and len(runs[0]) > 0


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    from tinymodel import make_tiny_model

    # qwen2: biases on q, k, v; a K-quant-like mix of formats in one layer
    mix = {
        "model.layers.0.self_attn.k_proj": {"bits": 5},
        "model.layers.0.mlp.down_proj": {"bits": 8},
    }
    out = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    return make_tiny_model(out, arch="qwen2", layer_quant=mix)


@pytest.mark.parametrize("precision", ["accurate", "fast"])
def test_qwen2_layers_are_fused_with_their_biases(qwen2_model, precision):
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions

    builtin = Engine.load(qwen2_model, kernel="builtin")
    custom = Engine.load(qwen2_model, kernel="custom", precision=precision)
    assert "bias" in builtin.model.model.layers[0].self_attn.q_proj
    assert "attention 2 layers (+RoPE)" in custom.kernel.attention  # when a layer is not fused
    assert "fused layers 2" in custom.kernel.attention
    assert _block_classes(custom.model) == {"CpuQwen2Block"}
    opts = GenerationOptions(max_tokens=20, temperature=0.0)
    a = [e.token for e in builtin.generate("the theme", opts) if e.token is not None]
    b = [e.token for e in custom.generate("the theme", opts) if e.token is not None]
    if precision == "accurate":  # float32 throughout: MLX's tokens exactly
        assert a == b and len(a) > 0
    x = mx.random.normal((1, 3, 64), key=mx.random.key(9))
    with kc.full_precision():  # fast layers too: float32 here, as for a prompt
        for ref, got in zip(builtin.model.model.layers, custom.model.model.layers):
            assert rel_err(got(x, "causal"), ref(x, "causal")) < tol(False)
