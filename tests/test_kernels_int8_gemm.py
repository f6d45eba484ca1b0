"""The int8 GEMM of fast-mode prompt fills (kernels/cpu/qmm_gemm_q8.cpp, AVX-512 VNNI): exact
int8 arithmetic against a numpy emulation of it, at shapes that hit every tail of its tiling
(6-row micro-kernel, 32-row weight panels, K chunks of 512, 256-row tasks). Skipped where the
CPU has no AVX-512 VNNI; there fast rows past 3 run in float32 (tests/test_kernels.py), and
batches on AVX2 read panels (tests/test_kernels_panels.py, which reuses `exact_case`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from edgeai import kernels

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable:
    EXT = None
AVAILABLE = EXT.available_isas() if EXT is not None else []
ISAS = [i for i in AVAILABLE if i == "avx512vnni"]  # int8 GEMM for prompts
PANEL_ISAS = [i for i in AVAILABLE if i in ("avx512vnni", "avx512", "avx2")]  # and for batches
pytestmark = [
    pytest.mark.skipif(EXT is None, reason="C++ kernels not built"),
    pytest.mark.skipif(EXT is not None and not ISAS, reason="no AVX-512 VNNI: no int8 GEMM"),
]


@pytest.fixture(autouse=True)
def _vnni():
    EXT.set_isa("avx512vnni")
    assert EXT.int8_gemm()
    yield
    EXT.set_isa("auto")


def _operands(n: int, k: int, gs: int, bits: int, half: bool, seed: int):
    """Random packed words (every quantized value occurs), scales and biases."""
    rng = np.random.default_rng(seed)
    wq = mx.array(rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32))
    s = rng.uniform(0.005, 0.05, (n, k // gs)).astype(np.float32)
    b = rng.uniform(-0.2, 0.2, (n, k // gs)).astype(np.float32)
    dt = np.float16 if half else np.float32
    return wq, mx.array(s.astype(dt)), mx.array(b.astype(dt))


def _emulated(x: np.ndarray, wq, s, b, gs: int, bits: int) -> np.ndarray:
    """What the int8 path computes, in float64: x rounded to int8 per block of 32 (half away
    from zero, float32 arithmetic as the kernel), exact integer dot products per block, then
    scale * xd * dot + bias * xd * sum(xq)."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    r = (xb * inv).astype(np.float32)
    xq = np.trunc(r + np.where(r >= 0, 0.5, -0.5).astype(np.float32)).astype(np.int64)
    xd = (amax / np.float32(127)).astype(np.float64)[..., 0]  # (m, blocks)
    q = np.array(mx.dequantize(wq, mx.ones(s.shape), mx.zeros(s.shape), gs, bits))  # levels
    q = q.astype(np.int64).reshape(-1, k // 32, 32)  # (n, blocks, 32)
    dots = np.einsum("mbi,nbi->mnb", xq, q).astype(np.float64)
    per = gs // 32
    sb = np.repeat(np.array(s.astype(mx.float32), np.float64), per, axis=1)  # (n, blocks)
    bb = np.repeat(np.array(b.astype(mx.float32), np.float64), per, axis=1)
    sums = xq.sum(axis=-1) * xd  # (m, blocks)
    return np.einsum("mnb,nb,mb->mn", dots, sb, xd) + sums @ bb.T


CASES = [
    # (m, n, k, gs): 6-row micro-kernel tails, panel tails (n % 32), a lone 32 past 64 in K,
    # two K chunks (640 = 512 + 128; 1056 = 2 x 512 + 32), two 256-row tasks (300)
    (4, 32, 64, 32),
    (7, 33, 96, 32),
    (11, 76, 352, 32),
    (41, 45, 576, 64),
    (17, 96, 640, 128),
    (6, 20, 1056, 32),
    (300, 70, 384, 128),
]


def exact_case(m: int, n: int, k: int, gs: int, bits: int, half: bool, packed: bool = False):
    """Run the int8 GEMM (on weights repacked into panels when `packed`, as a batch's decode
    step: m rows of one token) on random operands with an outlier block, check it against
    `_emulated`; returns (x, y, (wq, s, b))."""
    wq, s, b = _operands(n, k, gs, bits, half, seed=m * n + k + bits)
    x = np.random.default_rng(m + k).standard_normal((m, k)).astype(np.float32)
    x[:, :32] *= 20  # an outlier block, as real activations have
    panels = [EXT.pack_q8(wq, s, b, gs, bits)] if packed else []
    xs = mx.array(x[:, None] if packed else x)
    y = np.array(EXT.quantized_matmul(xs, wq, s, b, gs, bits, True, *panels), np.float64)
    y = y.reshape(m, n)
    ref = _emulated(x, wq, s, b, gs, bits)
    assert y.shape == (m, n)
    # float32 accumulation of exact integer dot products: only rounding differs
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-6
    return x, y, (wq, s, b)


def rows_alone_equal_the_whole(x, ops, spans, *panels) -> None:
    """Each row is quantized on its own and each output sums its blocks in one order: rows
    computed apart equal the same rows computed in one call, bit for bit (x: (rows, K), or
    (rows, 1, K) for a decode step)."""
    whole = EXT.quantized_matmul(x, *ops, 32, 4, True, *panels)
    for lo, hi in spans:
        assert mx.array_equal(
            EXT.quantized_matmul(x[lo:hi], *ops, 32, 4, True, *panels), whole[lo:hi]
        )


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("m, n, k, gs", CASES)
def test_int8_gemm_is_the_exact_int8_arithmetic(bits, half, m, n, k, gs):
    x, y, (wq, s, b) = exact_case(m, n, k, gs, bits, half)
    # and it is the int8 path (the float32 one is ~1e-4 away from this emulation)
    w = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), gs, bits))
    f32 = x.astype(np.float64) @ w.T.astype(np.float64)
    nmse = ((y - f32) ** 2).mean() / (f32**2).mean()
    assert 1e-8 < nmse < kernels.FAST_NMSE_TOL


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """So a batch of prompts fills each row's cache as that prompt alone would."""
    ops = _operands(100, 640, 32, 4, True, seed=5)
    x = mx.random.normal((300, 640), key=mx.random.key(5))
    rows_alone_equal_the_whole(x, ops, ((0, 4), (5, 12), (250, 300), (37, 291)))


def test_thread_count_does_not_change_a_bit():
    before = EXT.threads()
    wq, s, b = _operands(200, 1536, 32, 8, True, seed=6)
    x = mx.random.normal((70, 1536), key=mx.random.key(6))
    try:
        EXT.set_threads(1)
        one = EXT.quantized_matmul(x, wq, s, b, 32, 8, True)
        EXT.set_threads(2)
        assert mx.array_equal(EXT.quantized_matmul(x, wq, s, b, 32, 8, True), one)
    finally:
        EXT.set_threads(before)
