"""Batched decoding on weights repacked once into the int8 GEMM's panels (`pack_q8`,
kernels/cpu/qmm_gemm_q8.cpp and qmm_gemm_q8_avx2.cpp; the server packs with
`Hooks.prepare_batches`): exact int8 arithmetic against the numpy emulation at every tiling
tail, the same bits as the unpacking GEMM, and the fused layers' batches reading each
projection's own panels, on every instruction set of this CPU with an int8 GEMM. Skipped where
none has (no AVX2: nothing is packed there)."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from test_kernels_int8_gemm import PANEL_ISAS, _operands, exact_case, rows_alone_equal_the_whole

from edgeai import kernels

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable:
    EXT = None
pytestmark = [
    pytest.mark.skipif(EXT is None, reason="C++ kernels not built"),
    pytest.mark.skipif(EXT is not None and not PANEL_ISAS, reason="no AVX2 on this CPU: no panels"),
]


@pytest.fixture(autouse=True, params=PANEL_ISAS or ["none"])
def gemm_isa(request):
    EXT.set_isa(request.param)
    yield request.param
    EXT.set_isa("auto")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))


CASES = [
    # (m, n, k, gs): the fewest rows (4, the micro-kernel's 4-row tail) and 5, the 6-row
    # micro-kernel's tails (16 = 6 + 6 + 4, 41 = 6 x 6 + 5), panel tails (n % 32), K not a
    # multiple of 64, several blocks per group (64, 128), K past the unpacking GEMM's chunk
    (4, 33, 96, 32),
    (5, 32, 64, 32),
    (16, 76, 352, 32),
    (41, 45, 576, 64),
    (6, 96, 640, 128),
    (7, 20, 1056, 32),
]


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("m, n, k, gs", CASES)
def test_panel_gemm_is_the_exact_int8_arithmetic(bits, half, m, n, k, gs):
    exact_case(m, n, k, gs, bits, half, packed=True)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_panels_give_the_unpacking_gemms_bits(bits):
    """One K chunk (K <= 512): the same products summed in the same order, bit for bit (where
    prompts have an unpacking int8 GEMM: AVX-512 VNNI)."""
    if not EXT.int8_gemm():
        pytest.skip(f"{EXT.isa()}: no unpacking int8 GEMM")
    wq, s, b = _operands(70, 352, 32, bits, True, seed=bits)
    x = mx.random.normal((16, 352), key=mx.random.key(bits))
    panels = EXT.pack_q8(wq, s, b, 32, bits)
    got = EXT.quantized_matmul(x, wq, s, b, 32, bits, True, panels)
    assert mx.array_equal(got, EXT.quantized_matmul(x, wq, s, b, 32, bits, True))


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """A request's tokens do not depend on its batch."""
    ops = _operands(100, 640, 32, 4, True, seed=5)
    x = mx.random.normal((40, 1, 640), key=mx.random.key(5))  # a decode step of 40 rows
    spans = ((0, 4), (5, 12), (20, 40), (3, 37))
    rows_alone_equal_the_whole(x, ops, spans, EXT.pack_q8(*ops, 32, 4))


def test_panels_of_another_layer_are_refused():
    wq, s, b = _operands(64, 128, 32, 4, False, seed=1)
    other = _operands(32, 128, 32, 4, False, seed=2)
    with pytest.raises(ValueError, match="panels do not belong"):
        EXT.quantized_matmul(mx.ones((4, 128)), wq, s, b, 32, 4, True, EXT.pack_q8(*other, 32, 4))


def test_verification_checks_the_panel_path():
    cand = kernels._candidate("cpu")
    shapes = [(4, 32, 96, 64), (8, 32, 64, 128, "float16")]
    assert kernels.verify(cand, shapes, fast=True, packed=True)["ok"]

    def wrong(x, w, s, b, gs, bits):  # the panels of another layer of the same shape
        other = EXT.pack_q8(mx.array(np.asarray(w)[::-1].copy()), s, b, gs, bits)
        return EXT.quantized_matmul(x[:, None], w, s, b, gs, bits, True, other)[:, 0]

    broken = dataclasses.replace(cand, packed_matmul=wrong, build_id="broken")
    assert not kernels.verify(broken, shapes, fast=True, packed=True)["ok"]


def _batch_logits(model, prompts: list[list[int]], steps: int) -> mx.array:
    from mlx_lm.models.cache import BatchKVCache

    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    cache = [BatchKVCache(pads) for _ in model.layers]
    out = [model(mx.array([[0] * n + p for n, p in zip(pads, prompts)]), cache=cache)[:, -1]]
    for _ in range(steps):
        out.append(model(mx.argmax(out[-1], axis=-1)[:, None], cache=cache)[:, -1])
    return mx.stack(out)


def test_fused_batches_read_each_projections_own_panels(tiny_model):
    """A 5-row batch of the tiny model (K <= 512) after `prepare_batches` gives the unpacked
    batch's logits: every projection and the LM head got their own panels. Bit for bit where
    unpacked decode steps run the unpacking GEMM (VNNI); where they run the per-row tile
    (AVX2: `int8_rows()` is 31) the prompt step's bits, then the same int8 arithmetic summed in
    another order."""
    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision="fast")
    prompts = [
        mx.random.randint(3, 200, (n,), key=mx.random.key(50 + i)).tolist()
        for i, n in enumerate((5, 2, 9, 4, 7))
    ]
    before = _batch_logits(eng.model, prompts, 6)
    assert eng.hooks.prepare_batches(eng.model) == 2 * 7 + 1  # 7 projections a layer, LM head
    after = _batch_logits(eng.model, prompts, 6)
    if EXT.int8_rows() < len(prompts):
        assert mx.array_equal(after, before)
    else:
        assert mx.array_equal(after[0], before[0])
        assert mx.allclose(after, before, rtol=0, atol=1e-4 * mx.abs(before).max().item())
        assert not mx.array_equal(after, before)  # the decode steps did read the panels
    # and they are read: zeroed weight panels change the answer
    for _, m in eng.model.named_modules():
        if "_panels" in m.__dict__:
            w, (wp, sp, bp) = m.__dict__["_panels"]
            m.__dict__["_panels"] = (w, [mx.zeros_like(wp), sp, bp])
    for b in eng.model.layers:
        b.__dict__.pop("_fused", None)
    assert not mx.allclose(_batch_logits(eng.model, prompts, 6), before)
