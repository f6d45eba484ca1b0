"""Checks that a custom kernel computes what MLX computes, before it is used, and their
cached verdicts.

Each check runs the kernel and a float32 reference (`mx.dequantize` + matmul, or MLX's own
layer) on random data of the loaded model's shapes and returns an error; `_verdict` caches
the pass/fail per kernel build, instruction set and shape under `config.cache_dir()`, so a
machine pays for a check once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from edgeai import config
from edgeai.kernels import cpu as kc

if TYPE_CHECKING:
    from edgeai.kernels import Candidate

log = logging.getLogger("edgeai.kernels")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


NMSE_TOL = 1e-7  # float32 accumulation: anything above this is a wrong answer, not rounding
MAX_REL_TOL = 1e-3
FAST_NMSE_TOL = 5e-4  # int8 activations: rounding error ~5e-5; a wrong kernel is far above
FAST_MAX_REL_TOL = 5e-2
FAST_ROWS = (1, 3, 41)  # the int8 decode tile; a prompt chunk (int8 GEMM, 6 x 6 + 5 rows)
# Batched decoding on repacked weights (`kernels.cpu.pack_panels`): its fewest rows, a batch
# of 16 (micro-kernel 6 + 6 + 4), and 6 x 6 + 5.
PACKED_ROWS = (4, 16, 41)
VERIFY_ROWS = (1, 7)  # decode path and prefill (tiled) path with a ragged tail


def check_log_softmax() -> float:
    """Max error of the CPU log_softmax (log-probabilities and entropy) vs MLX's, relative to
    the largest |log-probability|, on vocabulary-sized rows with a masked (-inf) entry."""
    x = mx.random.normal((2, 49157), key=mx.random.key(3)) * 4.0
    x[0, 7] = -float("inf")
    lp, ent = kc.extension().log_softmax(x)
    ref = x - mx.logsumexp(x, axis=-1, keepdims=True)
    p = mx.exp(ref)
    ref_ent = -mx.where(p > 0, p * ref, 0.0).sum(axis=-1)
    finite = mx.isfinite(ref)
    if not mx.array_equal(finite, mx.isfinite(lp)).item():
        return float("inf")
    scale = mx.max(mx.where(finite, mx.abs(ref), 0.0))
    err = mx.maximum(mx.max(mx.where(finite, mx.abs(lp - ref), 0.0)), mx.max(mx.abs(ent - ref_ent)))
    return float((err / scale).item())


def check_top_k() -> float:
    """0 when the CPU top_k names the same entries as a full sort on vocabulary-sized rows
    with ties and -inf entries (largest first, the lower index first among equals), else
    the largest difference of the values (inf where the indices differ)."""
    x = mx.round(mx.random.normal((2, 49157), key=mx.random.key(5)) * 8.0)  # many ties
    x[1, :40000] = -float("inf")
    worst = 0.0
    for k in (1, 2, 20):
        idx, vals = kc.extension().top_k(x, k)
        # a stable sort of -x puts the lower index first among equals
        ref = mx.argsort(-x, axis=-1, stream=mx.cpu)[:, :k].astype(mx.int32)
        if not mx.array_equal(idx, ref).item():
            return float("inf")
        worst = max(worst, mx.max(mx.abs(vals - mx.take_along_axis(x, ref, -1))).item())
    return worst


def check_block(block: nn.Module, fused_cls: type) -> float:
    """Max relative error of a decoder layer run as `fused_cls` vs its own class: a 5-token
    causal prefill, then one decode step, each on a fresh KV cache of its own; and the same
    for a batch of two rows, one left-padded by 3 (mlx-lm's BatchKVCache, as the server's
    batches run: each row at its own positions)."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import BatchKVCache, KVCache

    dims = block.hidden_size
    kx, ky, kb = mx.random.split(mx.random.key(dims), 3)
    xs = (mx.random.normal((1, 5, dims), key=kx), mx.random.normal((1, 1, dims), key=ky))
    xb = mx.random.normal((2, 6, dims), key=kb)

    def run() -> list[mx.array]:
        cache = KVCache()
        out = [block(xs[0], "causal", cache), block(xs[1], None, cache)]
        batch = BatchKVCache([3, 0])
        for x in (xb[:, :5], xb[:, 5:]):  # as mlx-lm's model calls it, with the cache's mask
            y = block(x, create_attention_mask(x, batch), batch)
            # the padded row's first 3 prompt positions are padding: their output is unused
            out += [y[1:], y[:1, 3:]] if x.shape[1] == 5 else [y]
        return out

    own = block.__class__
    ref = run()
    block.__class__ = fused_cls
    try:
        got = run()
    finally:
        block.__class__ = own
    return max(
        float((mx.max(mx.abs(g - r)) / mx.maximum(mx.max(mx.abs(r)), 1e-30)).item())
        for g, r in zip(got, ref)
    )


def _verdict(key: str, fn: Callable[[], float], tol: float | None = None) -> bool:
    """Cached pass/fail of a layer kernel's check (max relative error <= tol, default ATTN_TOL)."""
    key = f"{key}|{mx.__version__}|{_machine_id()}"
    cache = _read_cache()
    if key not in cache:
        try:
            err = fn()
            cache[key] = {"ok": err <= (ATTN_TOL if tol is None else tol), "max_rel": err}
        except Exception as e:  # noqa: BLE001 - a kernel that crashes is a failed kernel
            cache[key] = {"ok": False, "error": str(e).splitlines()[0][:200]}
        _write_cache(cache)
    v = cache[key]
    if not v["ok"]:
        _warn_once(f"edgeai {key.split('|')[0]} kernel failed verification ({v}); using MLX's")
    return bool(v["ok"])


ATTN_TOL = 1e-4  # max abs error relative to max |reference|; float32 softmax rounding is ~1e-6
# A fused layer vs the same layer unfused, in fast mode: its int8 activation rounding can
# land on the other side of a rounding boundary (~1e-3); a wrong kernel is off by O(1).
FUSED_FAST_TOL = 1e-2


def check_rope(
    rope: Callable,
    dims: int,
    traditional: bool,
    base: float,
    scale: float,
    head_dim: int,
    offset: int,
) -> float:
    """Max relative error of `rope` vs mx.fast.rope on a strided [B, H, L, D] input."""
    x = mx.random.normal((1, 11, 3, head_dim), key=mx.random.key(dims + offset)).transpose(
        0, 2, 1, 3
    )
    ref = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
    y = rope(x, dims, traditional, base, scale, offset)
    return float((mx.max(mx.abs(y - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-30)).item())


def check_rms_norm(norm: Callable, dims: int) -> float:
    """Max relative error of `norm` vs mx.fast.rms_norm."""
    kx, kw = mx.random.split(mx.random.key(dims))
    x, w = mx.random.normal((5, dims), key=kx), mx.random.normal((dims,), key=kw)
    ref = mx.fast.rms_norm(x, w, 1e-5)
    return float(
        (mx.max(mx.abs(norm(x, w, 1e-5) - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-30)).item()
    )


def check_attention(
    attend: Callable, hq: int, hkv: int, d: int, n: int, s: int, seed: int = 0
) -> float:
    """Max relative error of `attend` vs MLX's float32 attention (causal when n > 1)."""
    kq, kk, kv = mx.random.split(mx.random.key(seed + hq + d), 3)
    q = mx.random.normal((1, hq, n, d), key=kq)
    k = mx.random.normal((1, hkv, s, d), key=kk)
    v = mx.random.normal((1, hkv, s, d), key=kv)
    mask = "causal" if n > 1 else None
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask).transpose(
        0, 2, 1, 3
    )
    y = attend(q, k, v, d**-0.5, n > 1)  # [B, L, H, D]
    return float((mx.max(mx.abs(y - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-30)).item())


def _file_id(path: str) -> str:
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}:{int(st.st_mtime)}"


def _machine_id() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
    except OSError:
        pass
    return hashlib.sha256(cpu.encode()).hexdigest()[:16]


def _cache_path() -> Path:
    return config.cache_dir() / "kernel-verdicts.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    p = _cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(p)
    except OSError:
        pass  # a read-only cache only costs a re-verification next time


def check(
    matmul: Callable,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    rows: tuple[int, ...] = VERIFY_ROWS,
    sdtype: str = "float32",
    seed: int = 0,
) -> tuple[float, float]:
    """Worst normalized MSE and max relative error of `matmul` vs the float32 reference.

    Random packed words (every quantized value occurs), scales and biases of the model's
    shape; numpy draws them because MLX's CPU random generator is slow at this size.
    """
    rng = np.random.default_rng(seed + n * 7 + k)
    wq = mx.array(rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32))
    s = mx.array(rng.uniform(0.005, 0.05, (n, k // group_size)).astype(np.float32))
    b = mx.array(rng.uniform(-0.2, 0.2, (n, k // group_size)).astype(np.float32))
    if sdtype == "float16":  # as the model stores them; the reference uses the very same values
        s, b = s.astype(mx.float16), b.astype(mx.float16)
    w_ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size, bits).T
    worst = (0.0, 0.0)
    for m in rows:
        x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
        ref = x @ w_ref
        err = matmul(x, wq, s, b, group_size, bits).astype(mx.float32) - ref
        nmse = (mx.mean(err * err) / mx.maximum(mx.mean(ref * ref), 1e-30)).item()
        max_rel = (mx.max(mx.abs(err)) / mx.maximum(mx.max(mx.abs(ref)), 1e-30)).item()
        if nmse != nmse or max_rel != max_rel:  # NaN: a broken kernel
            return float("inf"), float("inf")
        worst = (max(worst[0], nmse), max(worst[1], max_rel))
    return worst


def verify(cand: Candidate, shapes: list[tuple], fast: bool = False, packed: bool = False) -> dict:
    """Check every (bits, group_size, N, K[, scale dtype]) for M in VERIFY_ROWS, using cached
    verdicts.

    fast: check the candidate's int8-activation path (decode rows and a prompt chunk, `FAST_*`
        tolerances) instead.
    packed: with fast, that path on weights repacked for batches (`cand.packed_matmul`, at
        `PACKED_ROWS`).
    """
    cache = _read_cache()
    prefix = (
        f"{cand.name}|{cand.build_id}|{cand.isa()}|{mx.__version__}|{_machine_id()}"
        + ("|fast" if fast else "")
        + ("|packed" if packed else "")
    )
    matmul, rows = (cand.fast_matmul, FAST_ROWS) if fast else (cand.matmul, VERIFY_ROWS)
    if packed:
        matmul, rows = cand.packed_matmul, PACKED_ROWS
    nmse_tol, rel_tol = (FAST_NMSE_TOL, FAST_MAX_REL_TOL) if fast else (NMSE_TOL, MAX_REL_TOL)
    worst, cached = 0.0, True
    for bits, gs, n, k, *rest in shapes:
        sdtype = rest[0] if rest else "float32"
        key = f"{prefix}|{bits}|{gs}|{n}x{k}|{sdtype}"
        v = cache.get(key)
        if v is None:
            cached = False
            try:
                nmse, max_rel = check(matmul, bits, gs, n, k, rows, sdtype)
                ok = nmse <= nmse_tol and max_rel <= rel_tol  # NaN fails both
                v = {"ok": ok, "nmse": nmse, "max_rel": max_rel, "checked": int(time.time())}
            except Exception as e:  # noqa: BLE001 - a kernel that crashes is a failed kernel
                v = {
                    "ok": False,
                    "error": str(e).splitlines()[0][:200],
                    "checked": int(time.time()),
                }
            cache[key] = v
            _write_cache(cache)
        if not v["ok"]:
            detail = (
                v.get("error") or f"normalized MSE {v['nmse']:.2e} (max rel {v['max_rel']:.2e})"
            )
            return {"ok": False, "detail": f"{bits}-bit g{gs} {n}x{k}: {detail}"}
        worst = max(worst, v["nmse"])
    return {"ok": True, "nmse": worst, "cached": cached}
