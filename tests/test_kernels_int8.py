"""The int8-activation ("fast") path, the default at decode: at least one row and at most 3
(`kMaxQ8Rows`; for a batch's decode step 31 where the CPU has no int8 GEMM), at the real model's
sizes and thread count, and how verification judges it right at its tolerances (`FAST_NMSE_TOL`,
`FAST_MAX_REL_TOL`)."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from edgeai import kernels

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable:
    EXT = None
pytestmark = pytest.mark.skipif(EXT is None, reason="C++ kernels not built")

# SmolLM2-135M's matrices (N, K): q/o, k/v, gate/up, down, and the tied 49152-token LM head.
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
FLOAT32_NMSE = 1e-10  # what the float32 tile reaches; the int8 path is ~1e-5 and never below 1e-8


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    yield
    if EXT is not None:
        EXT.set_isa("auto")


@pytest.fixture
def two_threads():
    before = EXT.threads()
    EXT.set_threads(2)
    yield
    EXT.set_threads(before)


def _fast(x, w, s, b, gs, bits):
    return EXT.quantized_matmul(x, w, s, b, gs, bits, True)


@pytest.mark.parametrize("sdtype", ["float32", "float16"])  # MLX 4-bit models / GGUF imports
@pytest.mark.parametrize("n, k", MODEL_SHAPES)
def test_int8_path_at_the_model_sizes_on_two_threads(two_threads, n, k, sdtype):
    assert EXT.threads() == 2
    nmse, max_rel = kernels.check(_fast, 4, 32, n, k, rows=(1, 2, 3), sdtype=sdtype)
    # above float32 rounding (the int8 path ran), well inside what verification allows
    assert 1e-8 < nmse < kernels.FAST_NMSE_TOL / 5
    assert max_rel < kernels.FAST_MAX_REL_TOL / 2
    # the thread split does not change a single bit: each output is one thread's dot product
    rng = np.random.default_rng(n + k)
    w, s, b = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32)), 32, 4)
    x = mx.array(rng.standard_normal((3, k)).astype(np.float32))
    two = _fast(x, w, s, b, 32, 4)
    for threads in (1, os.cpu_count() or 1):  # one, and every core (the default)
        EXT.set_threads(threads)
        assert mx.array_equal(_fast(x, w, s, b, 32, 4), two)


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_rows_stop_at_the_tiles_limit(bits):
    """Up to int8_rows() rows take the int8 tile; one more turns the same call into the int8
    GEMM, or float32 where the instruction set has no int8 GEMM."""
    rng = np.random.default_rng(bits)
    w, s, b = mx.quantize(mx.array(rng.standard_normal((256, 576)).astype(np.float32)), 32, bits)
    last = EXT.int8_rows()  # rows of one token each: a batch's decode step
    x = mx.array(rng.standard_normal((last + 1, 1, 576)).astype(np.float32))
    ref = x @ mx.dequantize(w, s, b, 32, bits).T

    def nmse(y, r):
        return (mx.mean((y - r) ** 2) / mx.mean(r * r)).item()

    for m in (1, 2, last):
        assert 1e-8 < nmse(_fast(x[:m], w, s, b, 32, bits), ref[:m]) < kernels.FAST_NMSE_TOL / 5
    past = nmse(_fast(x, w, s, b, 32, bits), ref)
    assert 1e-8 < past < kernels.FAST_NMSE_TOL / 5 if EXT.int8_gemm() else past < FLOAT32_NMSE


# -- verification at its tolerances -------------------------------------------------------------

SHAPES = [(4, 32, 1536, 576, "float32")]
_REAL_CANDIDATE = kernels._candidate  # tests below swap kernels._candidate for _perturbed


def _perturbed(kind: str, amount: float) -> kernels.Candidate:
    """The real CPU kernel whose fast path is wrong by a controlled amount.

    kind "noise": every output moves by +-a * rms(output) (normalized MSE grows by ~a**2, the
    largest error stays ~a * rms, far below FAST_MAX_REL_TOL); kind "spike": one output per
    row moves by a * max|output| (max relative error ~a, normalized MSE barely moves).
    """
    cand = _REAL_CANDIDATE("cpu")
    real = cand.fast_matmul

    def wrong(x, w, s, b, gs, bits):
        y = real(x, w, s, b, gs, bits)
        if kind == "noise":
            sign = mx.where(mx.random.bernoulli(0.5, y.shape, key=mx.random.key(5)), 1.0, -1.0)
            return y + amount * mx.sqrt(mx.mean(y * y)) * sign
        at = mx.argmax(mx.abs(y), axis=-1, keepdims=True)
        hit = mx.arange(y.shape[-1]) == at
        return y + mx.where(hit, amount * y, 0.0)

    cand.fast_matmul = wrong
    return cand


def _baseline_nmse() -> float:
    cand = kernels._candidate("cpu")
    return kernels.check(cand.fast_matmul, *SHAPES[0][:4], rows=kernels.FAST_ROWS)[0]


@pytest.mark.parametrize("target, ok", [(0.8, True), (1.25, False)])
def test_fast_verification_draws_the_line_at_fast_nmse_tol(target, ok):
    base = _baseline_nmse()
    assert base < kernels.FAST_NMSE_TOL / 5
    # noise that brings the normalized MSE to `target` x FAST_NMSE_TOL, the int8 error included
    cand = _perturbed("noise", float(np.sqrt(target * kernels.FAST_NMSE_TOL - base)))
    nmse, max_rel = kernels.check(cand.fast_matmul, *SHAPES[0][:4], rows=kernels.FAST_ROWS)
    assert nmse == pytest.approx(target * kernels.FAST_NMSE_TOL, rel=0.08)
    assert max_rel < kernels.FAST_MAX_REL_TOL / 2  # only the normalized MSE decides here
    v = kernels.verify(cand, SHAPES, fast=True)
    assert v["ok"] is ok
    if not ok:
        assert "normalized MSE" in v["detail"]


@pytest.mark.parametrize("amount, ok", [(0.5, True), (1.5, False)])
def test_fast_verification_draws_the_line_at_fast_max_rel_tol(amount, ok):
    cand = _perturbed("spike", amount * kernels.FAST_MAX_REL_TOL)
    nmse, max_rel = kernels.check(cand.fast_matmul, *SHAPES[0][:4], rows=kernels.FAST_ROWS)
    assert nmse < kernels.FAST_NMSE_TOL / 2  # only the largest error decides here
    assert max_rel == pytest.approx(amount * kernels.FAST_MAX_REL_TOL, rel=0.15)
    assert kernels.verify(cand, SHAPES, fast=True)["ok"] is ok


@pytest.mark.parametrize("target, precision", [(0.5, "fast"), (1.5, "accurate")])
def test_apply_keeps_int8_only_inside_the_tolerance(tiny_model, monkeypatch, target, precision):
    from mlx_lm.utils import load

    # the tiny model's own int8 error (K = 64: 2 blocks a row) is up to ~1.3e-4,
    # 0.26 x the tolerance
    amount = float(np.sqrt(target * kernels.FAST_NMSE_TOL))
    monkeypatch.setattr(kernels, "_candidate", lambda be: _perturbed("noise", amount))
    model, _ = load(str(tiny_model))
    rep = kernels.apply(model, "custom", "fast")
    assert rep.name == "edgeai-cpu" and rep.precision == precision
    assert all(
        m.fast == (precision == "fast")
        for _, m in model.named_modules()
        if isinstance(m, kc.CpuQuantizedLinear)
    )


# -- fused layers at decode rows ----------------------------------------------------------------

EPS = 1e-5


def _layer(n: int, k: int, seed: int, bits: int = 4):
    w, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(seed)) * 0.2, 32, bits)
    return [w, s, b], mx.dequantize(w, s, b, 32, bits)


def _rel(y: mx.array, ref: mx.array) -> float:
    return (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()


def _nmse(y: mx.array, ref: mx.array) -> float:
    return (mx.mean((y - ref) ** 2) / mx.mean(ref * ref)).item()


def _q8(bits: int):
    """The verified int8 matmul, one layer at a time: what a fused fast layer must compute."""
    return lambda x, t: EXT.quantized_matmul(x, *t, 32, bits, True)


# (batch, sequence): one decode row, three rows of a batch, a 3-token step; then 4 prompt rows
# and an 8-row decode step (the int8 GEMM where the instruction set has one; else float32, and
# the int8 tile for the step: see _int8)
ROWS = [((1, 1), True), ((3, 1), True), ((1, 3), True), ((2, 2), None), ((8, 1), None)]


def _int8(shape: tuple[int, int], expected: bool | None) -> bool:
    rows, seq = shape[0] * shape[1], shape[1]
    if expected is not None:
        return expected
    return EXT.int8_gemm() or rows <= EXT.int8_rows(decode=seq == 1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, int8", ROWS)
def test_fused_norm_mlp_int8_at_decode_rows(bits, shape, int8):
    d, f = 576, 1536  # SmolLM2-135M's MLP
    h = mx.random.normal((*shape, d), key=mx.random.key(1))
    nw = mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(2))
    (g, wg), (u, wu), (dn, wd) = _layer(f, d, 3, bits), _layer(f, d, 4, bits), _layer(d, f, 5, bits)
    n = mx.fast.rms_norm(h, nw, EPS)
    ref = h + (mx.sigmoid(n @ wg.T) * (n @ wg.T) * (n @ wu.T)) @ wd.T
    fast = EXT.norm_mlp(h, nw, EPS, g + u + dn, 32, bits, True)
    accurate = EXT.norm_mlp(h, nw, EPS, g + u + dn, 32, bits, False)
    assert _rel(accurate, ref) < 1e-5
    if _int8(shape, int8):
        q = _q8(bits)
        a, b = q(n, g), q(n, u)
        assert _rel(fast, h + q(a * mx.sigmoid(a) * b, dn)) < 1e-5
        assert 1e-8 < _nmse(fast, ref) < kernels.FAST_NMSE_TOL / 2
    else:
        assert mx.array_equal(fast, accurate)


@pytest.mark.parametrize("shape, int8", ROWS)
def test_fused_norm_qkv_int8_at_decode_rows(shape, int8):
    (b, seq), hq, hkv, hd = shape, 9, 3, 64  # SmolLM2-135M's attention
    d, offset = hq * hd, 7
    x = mx.random.normal((b, seq, d), key=mx.random.key(6))
    nw = mx.random.uniform(0.5, 1.5, (d,), key=mx.random.key(7))
    (q, wq), (k, wk), (v, wv) = (
        _layer(hq * hd, d, 8),
        _layer(hkv * hd, d, 9),
        _layer(hkv * hd, d, 10),
    )
    n = mx.fast.rms_norm(x, nw, EPS)

    def heads(y, h):
        return y.reshape(b, seq, h, hd).transpose(0, 2, 1, 3)

    def rope(t):
        return mx.fast.rope(t, hd, traditional=False, base=10000.0, scale=1.0, offset=offset)

    refs = (rope(heads(n @ wq.T, hq)), rope(heads(n @ wk.T, hkv)), heads(n @ wv.T, hkv))
    q8 = _q8(4)
    composed = (rope(heads(q8(n, q), hq)), rope(heads(q8(n, k), hkv)), heads(q8(n, v), hkv))
    args = (x, nw, EPS, q + k + v, hq, hkv, hd, False, 10000.0, 1.0, offset, 32, 4)
    fast, accurate = EXT.norm_qkv(*args, True), EXT.norm_qkv(*args, False)
    for y, y32, ref, comp in zip(fast, accurate, refs, composed):
        assert y.shape == ref.shape and _rel(y32, ref) < 1e-5
        if _int8(shape, int8):
            assert _rel(y, comp) < 1e-5
            assert 1e-8 < _nmse(y, ref) < kernels.FAST_NMSE_TOL / 2
        else:
            assert mx.array_equal(y, y32)


# -- fast mode end to end -----------------------------------------------------------------------


def test_tiny_model_batched_equals_single_in_fast_mode(tiny_model):
    from test_batching import _batched_equals_single

    from edgeai.engine import Engine

    eng = Engine.load(tiny_model, kernel="custom", precision="fast")
    assert eng.kernel.precision == "fast" and eng.hooks.int8_decode
    _batched_equals_single(eng)  # 3 rows: each row's int8 decoding is its single-stream one
