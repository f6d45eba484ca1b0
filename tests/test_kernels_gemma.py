"""Gemma 3 on edgeai's CPU layer kernels: attention (with its per-head query/key RMSNorm), RoPE,
its offset-from-1 RMSNorm and the MLP half of each layer as one node (`norm_mlp` with GELU and
the post-norm), against mlx-lm's own layers on a tiny imported Gemma whose
sliding window (4 positions) is shorter than the prompt, so local layers see both the kernel
("causal" masks, single-token steps) and mlx-lm's path (window masks)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from gguf import GGMLQuantizationType as T
from ggufmaker import make_gguf

from edgeai.engine import Engine
from edgeai.store.gguf import convert

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    kc.extension()
    BUILT = True
except kc.KernelUnavailable:
    BUILT = False
pytestmark = pytest.mark.skipif(not BUILT, reason="C++ kernels not built")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma")
    src, out = d / "g.gguf", d / "model"
    make_gguf(src, arch="gemma3", qtype=T.Q8_0, hidden=256, layers=6, heads=4, kv_heads=1)
    convert(src, out)
    return out


def _greedy_logits(model, prompt: list[int], steps: int) -> mx.array:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)[:, -1]]
    for _ in range(steps):
        out.append(model(mx.argmax(out[-1], axis=-1)[:, None], cache=cache)[:, -1])
    return mx.concatenate(out).astype(mx.float32)


@pytest.mark.parametrize("precision", ["accurate", "fast"])
@pytest.mark.parametrize("length", [3, 11])  # within the window, and past it
def test_gemma_layers_on_the_kernels_match_mlx_lm(tiny_gemma, length, precision):
    ours = Engine.load(tiny_gemma, kernel="custom", precision=precision)
    theirs = Engine.load(tiny_gemma, kernel="builtin")
    assert type(ours.model.layers[0]).__name__ == "CpuGemmaBlock"
    attn = ours.model.layers[0].self_attn
    assert type(attn).__name__.startswith("Cpu") and "q_norm" in attn
    assert type(ours.model.layers[0].input_layernorm).__name__ == "CpuGemmaRMSNorm"
    assert type(attn.q_norm).__name__ == "CpuGemmaRMSNorm"
    prompt = mx.random.randint(3, 200, (length,), key=mx.random.key(length)).tolist()
    # 9 steps: the local layers' rotating caches (4 positions) wrap around
    a, b = _greedy_logits(ours.model, prompt, 9), _greedy_logits(theirs.model, prompt, 9)
    err = mx.abs(a - b).max().item() / mx.abs(b).max().item()
    if precision == "accurate":
        assert mx.array_equal(mx.argmax(a, axis=-1), mx.argmax(b, axis=-1))
        assert err < 1e-4
    else:  # int8 activations (greedy paths may part at a near-tie, so logits only)
        assert 1e-7 < err < 5e-2


def test_gemma_norm_follows_a_weight_update(tiny_gemma):
    eng = Engine.load(tiny_gemma, kernel="custom", precision="accurate")
    norm = eng.model.layers[0].input_layernorm
    x = mx.random.normal((1, 2, 256), key=mx.random.key(1))
    before = norm(x)
    norm.weight = norm.weight + 0.5
    after = norm(x)
    want = mx.fast.rms_norm(x, 1.0 + norm.weight, norm.eps)
    assert not mx.allclose(before, after) and mx.allclose(after, want, atol=1e-5)


def test_gemma_mlps_take_the_panels_once_packed(tiny_gemma):
    """The server packs weights when its batches reach 4 rows: MLP nodes built before that read
    the panels from then on."""
    if not kc.extension().int8_panels():
        pytest.skip("no int8 GEMM on panels on this CPU")
    eng = Engine.load(tiny_gemma, kernel="custom", precision="fast")
    blk = eng.model.layers[0]
    assert blk._mlp()[6] == []  # norm_mlp's panels argument: none yet
    assert eng.hooks.prepare_batches(eng.model) > 0
    assert len(blk._mlp()[6]) == 9  # gate, up and down's (weights, scales, biases)
