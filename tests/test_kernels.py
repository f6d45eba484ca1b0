"""edgeai's quantized-matmul kernels: agreement with the float32 reference, selection, trust."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from edgeai import kernels
from edgeai.errors import InvalidInput

PRECISIONS = ("fast", "accurate")

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable as e:  # the install had no compiler: only the fallback tests apply
    EXT = None
    REASON = str(e)

needs_ext = pytest.mark.skipif(EXT is None, reason="C++ kernels not built")
ISAS = EXT.available_isas() if EXT is not None else []


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    yield
    if EXT is not None:
        EXT.set_isa("auto")


def reference(x, wq, s, b, gs, bits):
    return x.astype(mx.float32) @ mx.dequantize(wq, s, b, gs, bits).T


def quantized(n, k, gs, bits, seed=0):
    w = mx.random.normal((n, k), key=mx.random.key(seed))
    return mx.quantize(w, gs, bits)


def nmse(y, r):
    e = y.astype(mx.float32) - r
    return (mx.mean(e * e) / mx.mean(r * r)).item()


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
# 70, 140 and 300 rows: the panel GEMM of prompts (256 rows a task; 44 left: the GEMM again)
@pytest.mark.parametrize("m", [1, 3, 4, 9, 70, 140, 300])
def test_matches_float32_reference(isa, bits, gs, m):
    EXT.set_isa(isa)
    n, k = 76, 384  # N not a multiple of 8 on purpose: the kernel has no such limit
    wq, s, b = quantized(n, k, gs, bits)
    x = mx.random.normal((m, k), key=mx.random.key(1))
    y = EXT.quantized_matmul(x, wq, s, b, gs, bits)
    assert y.shape == (m, n) and y.dtype == mx.float32
    assert nmse(y, reference(x, wq, s, b, gs, bits)) < 1e-10


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m, half", [(1, False), (2, True), (3, False)])
# blocks of 32 per row: 8 (no tail), 11 (a lone last block), 12, 18 (SmolLM2's K = 576)
@pytest.mark.parametrize(
    "gs, k", [(gs, k) for gs in (32, 64, 128) for k in (256, 352, 384, 576) if k % gs == 0]
)
def test_fast_path_within_int8_tolerance(isa, bits, gs, m, half, k):
    EXT.set_isa(isa)
    wq, s, b = quantized(76, k, gs, bits)
    if half:
        s, b = s.astype(mx.float16), b.astype(mx.float16)
    x = mx.random.normal((m, k), key=mx.random.key(11))
    ref = reference(x, wq, s.astype(mx.float32), b.astype(mx.float32), gs, bits)
    err = nmse(EXT.quantized_matmul(x, wq, s, b, gs, bits, True), ref)
    # above float32 rounding (so the int8 path really ran), well inside the stated tolerance
    assert 1e-8 < err < kernels.FAST_NMSE_TOL / 5


def random_words(n, k, gs, bits, half, seed=0):
    """Packed rows of random words (every bit pattern occurs, values straddle bytes and words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    wq = mx.array(rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32))
    s = mx.array(rng.uniform(0.005, 0.05, (n, k // gs)).astype(np.float32))
    b = mx.array(rng.uniform(-0.2, 0.2, (n, k // gs)).astype(np.float32))
    dt = mx.float16 if half else mx.float32
    return wq, s.astype(dt), b.astype(dt)


# K-quant GGUFs import as 5-bit (Q5_0/Q5_1/Q5_K) and possibly 6-bit (Q6_K) layers.
@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("half", [False, True])
# 8, 11 (a lone last block), 18 (SmolLM2) and 28 blocks of 32 per row
@pytest.mark.parametrize(
    "gs, k", [(g, k) for g in (32, 64, 128) for k in (256, 352, 576, 896) if k % g == 0]
)
def test_5_and_6_bit_match_float32_reference(isa, bits, half, gs, k):
    EXT.set_isa(isa)
    n = 44  # not a multiple of 8 or of the 4-row kernel
    wq, s, b = random_words(n, k, gs, bits, half, seed=bits * k + gs)
    ref_w = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), gs, bits).T
    qw, qs, qb = quantized(n, k, gs, bits, seed=k)  # realistic weights for the int8 tolerance
    if half:
        qs, qb = qs.astype(mx.float16), qb.astype(mx.float16)
    qref_w = mx.dequantize(qw, qs.astype(mx.float32), qb.astype(mx.float32), gs, bits).T
    for m in (1, 2, 3, 8, 130):
        x = mx.random.normal((m, k), key=mx.random.key(m))
        y = EXT.quantized_matmul(x, wq, s, b, gs, bits)  # accurate: float32 everywhere
        assert y.shape == (m, n) and nmse(y, x @ ref_w) < 1e-10
        err = nmse(EXT.quantized_matmul(x, qw, qs, qb, gs, bits, True), x @ qref_w)
        if m <= 3 or EXT.int8_gemm():  # int8: above float32 rounding, well inside the tolerance
            assert 1e-8 < err < kernels.FAST_NMSE_TOL / 5
        else:  # more rows than the int8 tile takes, and no int8 GEMM: float32
            assert err < 1e-10


@needs_ext
@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_verification_passes_on_model_shapes(bits):
    cand = kernels._candidate("cpu")
    shapes = [
        (bits, 32, 576, 576, "float16"),
        (bits, 32, 1536, 576, "float32"),
        (bits, 64, 576, 1536, "float16"),
    ]
    for fast in (False, True):
        v = kernels.verify(cand, shapes, fast=fast)
        assert v["ok"], v
    assert kc.supports(bits, 32, 576) and not kc.supports(3, 32, 576)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = (line for line in f if line.startswith("flags"))
            return next((set(line.split(":", 1)[1].split()) for line in lines), set())
    except OSError:
        return set()


@needs_ext
def test_vnni_int8_tile_is_picked_where_the_cpu_has_it():
    """The VNNI tile runs in every ISA-parametrized test above where the CPU has it; elsewhere
    it must not be offered (this test then skips: CI machines may be AVX2-only)."""
    needed = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"}
    if not needed <= _cpu_flags():
        assert "avx512vnni" not in ISAS
        pytest.skip("this CPU has no AVX-512 VNNI + VBMI")
    assert ISAS[0] == "avx512vnni"
    EXT.set_isa("auto")
    assert EXT.isa() == "avx512vnni"


@needs_ext
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_fast_path_rows_do_not_depend_on_the_batch(bits):
    """Up to the tile's limit (3 rows beside an int8 GEMM, 31 on AVX2): a batched decode row
    (one token of its sequence) gets its single-stream answer."""
    wq, s, b = quantized(96, 256, 32, bits)
    m = EXT.int8_rows()
    x = mx.random.normal((m, 1, 256), key=mx.random.key(12))
    together = EXT.quantized_matmul(x, wq, s, b, 32, bits, True)
    assert nmse(together, reference(x, wq, s, b, 32, bits)) > 1e-8  # the int8 path ran
    for i in range(m):  # each row is quantized on its own: the same bits alone or in a batch
        assert mx.array_equal(
            EXT.quantized_matmul(x[i : i + 1], wq, s, b, 32, bits, True), together[i : i + 1]
        )


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_fast_flag_past_the_int8_tile_is_the_int8_gemm_or_float32(isa):
    EXT.set_isa(isa)
    assert EXT.int8_gemm() == (isa == "avx512vnni")
    # panels for batches: every x86 instruction set (AVX2: maddubs; VNNI: vpdpbusd)
    assert EXT.int8_panels() == (isa != "generic")
    # the tile's row limit: 3, and for a decode step without panels 31 but on VNNI, whose
    # GEMM beats the tile even unpacking the weights every step
    assert EXT.int8_rows(decode=False) == 3
    assert EXT.int8_rows() == (3 if isa == "avx512vnni" else 31)
    wq, s, b = quantized(64, 256, 32, 4)

    def err(shape: tuple[int, ...], seed: int) -> float:
        x = mx.random.normal((*shape, 256), key=mx.random.key(seed))
        return nmse(EXT.quantized_matmul(x, wq, s, b, 32, 4, True), reference(x, wq, s, b, 32, 4))

    # a prompt's 4 tokens (2-D, or one sequence); a batch's step one past the tile's limit
    for shape in ((4,), (1, 4), (EXT.int8_rows() + 1, 1)):
        if EXT.int8_gemm():
            assert 1e-8 < err(shape, 13) < kernels.FAST_NMSE_TOL / 5
        else:
            assert err(shape, 13) < 1e-10
    assert 1e-8 < err((EXT.int8_rows(), 1), 14) < kernels.FAST_NMSE_TOL / 5  # the tile's last


@needs_ext
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_fast_path_isas_agree(bits):
    wq, s, b = quantized(64, 512, 64, bits)
    x = mx.random.normal((2, 512), key=mx.random.key(14))
    outs = []
    for isa in ISAS:
        EXT.set_isa(isa)
        outs.append(EXT.quantized_matmul(x, wq, s, b, 64, bits, True))
    for y in outs[1:]:  # same integer dot products; only the float summation order differs
        assert nmse(y, outs[0]) < 1e-10


@needs_ext
def test_fast_precision_is_reported_and_close_to_builtin(tiny_model):
    builtin, fast = _engines(tiny_model, precision="fast")
    rep = fast.kernel
    assert rep.precision == "fast" and "int8" in rep.accuracy
    assert all(
        m.fast for _, m in fast.model.named_modules() if isinstance(m, kc.CpuQuantizedLinear)
    )
    tokens = mx.array([[5, 9, 33]])  # at most 3 rows (kMaxQ8Rows): int8, not the float32 tile
    assert 1e-9 < nmse(fast.model(tokens), builtin.model(tokens).astype(mx.float32)) < 1e-3


@needs_ext
def test_fast_mode_fills_the_prompt_in_int8_and_runs_its_last_token_in_float32(tiny_model):
    import contextlib
    import dataclasses

    from edgeai.engine import Engine
    from edgeai.engine.decode import decode_steps

    engines = {p: Engine.load(tiny_model, kernel="custom", precision=p) for p in PRECISIONS}

    def first(precision: str, prompt_len: int, float32_step: bool = True) -> float:
        eng = engines[precision]
        hooks = eng.hooks
        if not float32_step:  # the first token's own step in int8 too
            hooks = dataclasses.replace(hooks, prompt_context=contextlib.nullcontext)
        prompt = mx.array([(7 * i + 3) % 200 for i in range(prompt_len)])
        greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
        return next(decode_steps(eng.model, prompt, greedy, 1, hooks=hooks))[1]

    # 1: nothing to fill; 3: two rows (the int8 tile); 40: the int8 GEMM (float32 without one)
    for prompt_len in (1, 3, 40):
        fast, accurate = first("fast", prompt_len), first("accurate", prompt_len)
        filled_int8 = prompt_len > 1 and (prompt_len - 1 <= 3 or EXT.int8_gemm())
        if filled_int8:  # the cache holds int8-computed keys and values: close, not equal
            assert fast != accurate and abs(fast - accurate) < 0.5  # the tiny model: ~0.1
        else:
            assert fast == accurate  # bit for bit: the last token's step in float32
        assert fast != first("fast", prompt_len, float32_step=False)


@needs_ext
def test_full_precision_context_turns_fast_layers_float32():
    wq, s, b = quantized(64, 256, 32, 4)
    fast = kc.CpuQuantizedLinear(wq, s, b, 32, 4, fast=True)
    accurate = kc.CpuQuantizedLinear(wq, s, b, 32, 4, fast=False)
    x = mx.random.normal((1, 256), key=mx.random.key(15))
    assert not mx.array_equal(fast(x), accurate(x))
    with kc.full_precision():
        y = fast(x)
    assert mx.array_equal(y, accurate(x))
    assert not mx.array_equal(fast(x), y)  # the context ends with its block


@needs_ext
def test_fast_path_failing_verification_keeps_float32(tiny_model, monkeypatch, caplog):
    from mlx_lm.utils import load

    real = kernels._candidate

    def with_wrong_fast(be):
        cand = real(be)
        cand.fast_matmul = lambda x, w, s, b, gs, bits: cand.matmul(x, w, s, b, gs, bits) * 1.1
        return cand

    monkeypatch.setattr(kernels, "_candidate", with_wrong_fast)
    model, _ = load(str(tiny_model))
    rep = kernels.apply(model, "custom", "fast")
    assert (
        rep.name == "edgeai-cpu"
        and rep.precision == "accurate"
        and rep.accuracy == "float32 accumulation"
    )
    assert not any(m.fast for _, m in model.named_modules() if isinstance(m, kc.CpuQuantizedLinear))
    assert "fast (int8) path failed verification" in caplog.text


def test_unknown_precision_is_a_user_error(tiny_model):
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model))
    with pytest.raises(InvalidInput, match="precision"):
        kernels.apply(model, "custom", "fastest")


@needs_ext
def test_model_shapes_multithreaded():
    # SmolLM2-135M's widest matrices; big enough that the thread pool splits the work.
    for n, k, m in [(1536, 576, 1), (576, 1536, 1), (576, 1536, 37)]:
        wq, s, b = quantized(n, k, 32, 4)
        x = mx.random.normal((m, k), key=mx.random.key(2))
        assert nmse(EXT.quantized_matmul(x, wq, s, b, 32, 4), reference(x, wq, s, b, 32, 4)) < 1e-10


@needs_ext
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_inputs_keep_their_dtype(dtype):
    wq, s, b = quantized(64, 256, 64, 4)
    x = mx.random.normal((2, 3, 256), key=mx.random.key(3)).astype(dtype)
    y = EXT.quantized_matmul(x, wq, s, b, 64, 4)
    assert y.dtype == dtype and y.shape == (2, 3, 64)
    assert nmse(y, reference(x, wq, s, b, 64, 4)) < 1e-4  # rounding of the output only


@needs_ext
def test_strided_input_and_compile():
    wq, s, b = quantized(64, 128, 32, 4)
    xt = mx.random.normal((128, 5), key=mx.random.key(4)).T  # not row-contiguous
    assert nmse(EXT.quantized_matmul(xt, wq, s, b, 32, 4), reference(xt, wq, s, b, 32, 4)) < 1e-10
    f = mx.compile(lambda x: EXT.quantized_matmul(x, wq, s, b, 32, 4) * 2.0)
    x = mx.random.normal((3, 128), key=mx.random.key(5))
    assert nmse(f(x), 2.0 * reference(x, wq, s, b, 32, 4)) < 1e-10


@needs_ext
@pytest.mark.parametrize(
    "k, gs, bits, match",
    [
        (100, 32, 4, "multiple of the group size"),
        (128, 16, 4, "group_size"),
        (128, 32, 3, "bits"),
        (128, 32, 2, "bits"),
    ],
)
def test_unsupported_shapes_raise_clearly(k, gs, bits, match):
    x = mx.ones((1, k))
    w = mx.zeros((8, max(1, k * max(bits, 4) // 32)), dtype=mx.uint32)
    s = mx.ones((8, max(1, k // gs)))
    with pytest.raises(ValueError, match=match):
        EXT.quantized_matmul(x, w, s, s, gs, bits)


@needs_ext
def test_mixed_scale_dtypes_are_rejected_not_misread():
    wq, s, b = quantized(16, 64, 32, 4)
    with pytest.raises(ValueError, match="float32"):
        EXT.quantized_matmul(mx.ones((1, 64)), wq, s.astype(mx.float16), b, 32, 4)  # b is float32


def _engines(path, precision="accurate"):
    from edgeai.engine import Engine

    return Engine.load(path, kernel="builtin"), Engine.load(
        path, kernel="custom", precision=precision
    )


@needs_ext
def test_swaps_layers_and_tied_head(tiny_model):
    builtin, custom = _engines(tiny_model)
    assert builtin.kernel.name == "builtin"
    rep = custom.kernel
    assert rep.name == "edgeai-cpu" and rep.isa in ISAS and rep.nmse < kernels.NMSE_TOL
    assert rep.attention == (
        "attention 2 layers (+RoPE), rms_norm 5, fused layers 2, log_softmax, top_k"
    )
    assert rep.precision == "accurate" and rep.accuracy == "float32 accumulation"
    mods = [m for _, m in custom.model.named_modules()]
    assert not any(type(m) in (nn.QuantizedLinear, nn.QuantizedEmbedding) for m in mods)
    assert any(isinstance(m, kc.CpuQuantizedEmbedding) for m in mods)
    # every quantized layer of the builtin model, embedding/LM head included
    n_q = sum(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for _, m in builtin.model.named_modules()
    )
    assert rep.layers == n_q


@needs_ext
def test_greedy_generation_identical_to_builtin(tiny_model):
    from edgeai.options import GenerationOptions

    builtin, custom = _engines(tiny_model)
    opts = GenerationOptions(max_tokens=24, temperature=0.0)
    for prompt in ["the theme", [{"role": "user", "content": "hello there"}]]:
        a = [e.token for e in builtin.generate(prompt, opts) if e.token is not None]
        b = [e.token for e in custom.generate(prompt, opts) if e.token is not None]
        assert a == b and len(a) > 0


def _broken(kind: str) -> kernels.Candidate:
    """A real kernel made wrong on purpose (drops the bias term), or one that crashes."""

    def wrong(x, w, s, b, gs, bits):
        return mx.quantized_matmul(
            x, w, s, mx.zeros_like(b), transpose=True, group_size=gs, bits=bits
        )

    def crash(*a):
        raise RuntimeError("kernel exploded")

    return kernels.Candidate(
        "broken", wrong if kind == "wrong" else crash, lambda m, fast: m, kc.supports, build_id=kind
    )


@pytest.mark.parametrize("kind", ["wrong", "crash"])
def test_kernel_failing_verification_is_not_used(tiny_model, monkeypatch, kind):
    from mlx_lm.utils import load

    monkeypatch.setattr(kernels, "_candidate", lambda be: _broken(kind))
    model, _ = load(str(tiny_model))
    rep = kernels.apply(model, "auto")
    assert rep.name == "builtin" and "failed verification" in rep.reason
    assert all(type(m) is not kc.CpuQuantizedLinear for _, m in model.named_modules())
    with pytest.raises(kernels.KernelError):
        kernels.apply(model, "custom")


@needs_ext
def test_verdict_is_cached(tiny_model):
    cand = kernels._candidate("cpu")
    shapes = [(4, 32, 64, 64)]
    first = kernels.verify(cand, shapes)
    second = kernels.verify(cand, shapes)
    assert first["ok"] and not first["cached"] and second["cached"]
    assert kernels._cache_path().exists()


def test_unknown_mode_is_a_user_error(tiny_model):
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model))
    with pytest.raises(InvalidInput):
        kernels.apply(model, "fastest")


def test_missing_extension_falls_back_with_one_warning(tiny_model, tmp_path):
    # A real CLI process in which the extension cannot be imported (as after a failed build).
    code = (
        "import sys; sys.modules['edgeai._edgeai_kernels'] = None\n"
        "from edgeai.cli import main\n"
        f"sys.argv = ['edgeai', 'run', '--json', '-n', '2', '-m', {str(tiny_model)!r}, 'hi']\n"
        "main()\n"
    )
    env = {**__import__("os").environ, "EDGEAI_HOME": str(tmp_path), "COLUMNS": "300"}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["finish_reason"] in ("length", "stop")  # answered, on MLX's kernel
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not built" in warnings[0]


@pytest.mark.skipif(
    not mx.metal.is_available(), reason="no Metal device (the Metal kernel never ran here)"
)
@pytest.mark.parametrize("bits", [4, 8])
def test_metal_kernel_matches_reference(bits):
    from edgeai.kernels import metal as kernels_metal

    wq, s, b = quantized(128, 256, 64, bits)
    x = mx.random.normal((1, 256), key=mx.random.key(6))
    assert (
        nmse(
            kernels_metal.quantized_matmul(x, wq, s, b, 64, bits), reference(x, wq, s, b, 64, bits)
        )
        < 1e-8
    )


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_float16_scales_match_reference(isa, bits):
    EXT.set_isa(isa)
    wq, s, b = quantized(40, 256, 64, bits)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    for m in (1, 6):
        x = mx.random.normal((m, 256), key=mx.random.key(7))
        ref = reference(x, wq, s.astype(mx.float32), b.astype(mx.float32), 64, bits)
        assert nmse(EXT.quantized_matmul(x, wq, s, b, 64, bits), ref) < 1e-10


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
# one query row: keys in chunks of 128 (one, exactly one, one and a bit, several), merged
@pytest.mark.parametrize(
    "n, s", [(1, 1), (1, 37), (1, 128), (1, 129), (1, 700), (7, 7), (19, 40), (70, 70)]
)
def test_attention_matches_mlx(isa, n, s):
    EXT.set_isa(isa)
    err = kernels.check_attention(kc.attention, 6, 2, 32, n, s, seed=n)
    assert err < kernels.ATTN_TOL


@needs_ext
def test_attention_reads_strided_cache_views():
    big = mx.random.normal((1, 2, 64, 32), key=mx.random.key(8))
    k = big[:, :, :23, :]  # how mlx-lm's KV cache hands out keys: a view of a larger buffer
    q = mx.random.normal((1, 1, 4, 32), key=mx.random.key(9)).transpose(0, 2, 1, 3)
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.2, mask=None).transpose(0, 2, 1, 3)
    assert mx.abs(kc.attention(q, k, k, 0.2, False) - ref).max().item() < 1e-5


@needs_ext
def test_attention_rejects_bad_input():
    q = mx.zeros((1, 3, 2, 32))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kc.attention(q, mx.zeros((1, 2, 2, 32)), mx.zeros((1, 2, 2, 32)), 1.0, True)
    with pytest.raises(ValueError, match="float32"):
        kc.attention(
            q.astype(mx.float16), mx.zeros((1, 3, 2, 32)), mx.zeros((1, 3, 2, 32)), 1.0, True
        )


@needs_ext
@pytest.mark.parametrize("bits, gs", [(8, 64), (4, 128)])
def test_model_logits_match_builtin_for_other_formats(tmp_path, bits, gs):
    import copy

    from mlx_lm.utils import load
    from tinymodel import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny-f32", hidden=128, quantize=False)
    base, _ = load(str(path))
    nn.quantize(base, group_size=gs, bits=bits)
    custom = copy.deepcopy(base)
    rep = kernels.apply(custom, "custom", "accurate")
    assert rep.name == "edgeai-cpu" and rep.layers > 0
    tokens = mx.array([[5, 9, 33, 7, 2, 81]])
    ref, got = base(tokens), custom(tokens)
    assert nmse(got, ref.astype(mx.float32)) < 1e-8


# Formats of a K-quant import (Q4_K_M: Q4_K with Q6_K, Q5_0, Q8_0) as mlx-lm per-layer
# quantization: the projections of one layer differ in bits and group size.
MIXED = {
    "model.embed_tokens": {"bits": 6},
    "model.layers.0.self_attn.q_proj": {"bits": 5},
    "model.layers.0.self_attn.v_proj": {"bits": 8},
    "model.layers.0.self_attn.o_proj": {"bits": 6, "group_size": 64},
    "model.layers.0.mlp.gate_proj": {"bits": 5},
    "model.layers.0.mlp.up_proj": {"group_size": 64},
    "model.layers.0.mlp.down_proj": {"bits": 8},
    **{
        f"model.layers.1.{p}": {"bits": 5}
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    },
}


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    from tinymodel import make_tiny_model

    out = tmp_path_factory.mktemp("mixed") / "tiny-mixed"
    return make_tiny_model(out, hidden=128, layer_quant=MIXED)


@needs_ext
def test_mixed_bit_model_greedy_identical_to_builtin(mixed_model):
    from edgeai.options import GenerationOptions

    builtin, custom = _engines(mixed_model)
    quantized_types = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    bits = {m.bits for _, m in builtin.model.named_modules() if isinstance(m, quantized_types)}
    assert bits == {4, 5, 6, 8}
    rep = custom.kernel
    assert rep.name == "edgeai-cpu" and rep.precision == "accurate"
    assert {s.split("-bit")[0] for s in rep.shapes} == {"4", "5", "6", "8"}
    assert "fused layers 2" in rep.attention  # each mix of formats checked, then fused
    mods = [m for _, m in custom.model.named_modules()]
    assert not any(type(m) in quantized_types for m in mods)
    opts = GenerationOptions(max_tokens=24, temperature=0.0)
    for prompt in ["the theme", [{"role": "user", "content": "hello there"}]]:
        a = [e.token for e in builtin.generate(prompt, opts) if e.token is not None]
        b = [e.token for e in custom.generate(prompt, opts) if e.token is not None]
        assert a == b and len(a) > 0
    tokens = mx.array([[5, 9, 33, 7, 2, 81]])
    assert nmse(custom.model(tokens), builtin.model(tokens).astype(mx.float32)) < 1e-8


@needs_ext
def test_mixed_bit_model_fast_mode_close_to_builtin(mixed_model):
    builtin, fast = _engines(mixed_model, precision="fast")
    assert fast.kernel.precision == "fast" and "fused layers 2" in fast.kernel.attention
    x = mx.random.normal((1, 1, 128), key=mx.random.key(5))
    for a, b in zip(builtin.model.model.layers, fast.model.model.layers):  # decode steps, int8 path
        assert nmse(b(x), a(x).astype(mx.float32)) < 1e-3
