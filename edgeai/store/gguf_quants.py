"""Turn GGUF tensor blocks into MLX's affine quantized layout, with vectorized numpy.

MLX stores a quantized matrix as w = scale·q + bias per group of 32 (here), q unsigned and
packed little-endian into uint32 words. Most GGUF block types are that form already:

    Q4_0  w = d·(q−8)           → 4-bit, scale d, bias −8d          (exact)
    Q4_1  w = d·q + m           → 4-bit, scale d, bias m            (exact)
    Q5_0  w = d·(q−16)          → 5-bit, scale d, bias −16d         (exact)
    Q5_1  w = d·q + m           → 5-bit, scale d, bias m            (exact)
    Q8_0  w = d·q, q signed     → 8-bit, scale d, bias −128d        (exact)
    Q4_K  w = d·sc·q − dmin·m   → 4-bit, scale d·sc, bias −dmin·m   (rounded to fp16)
    Q5_K  the same, 5-bit q     → 5-bit                             (rounded to fp16)

d, m, dmin are float16 in the file, so the first five are exact in float16 scales. For the
K-quants, d·sc (sc 6-bit) is rounded to float16: ≤ 2^-11 relative on a scale.

Q6_K has 16-wide sub-blocks (w = d·sc·(q−32), sc signed int8) that no MLX group holds. Each
32-group takes two of them; the group is re-quantized to 6 bits (by default; 8 on request)
with its scale anchored on the larger sub-block's step s (6-bit: t = s, bias −32t; 8-bit:
t = s/4, bias −128t): that sub-block is exact, the other is rounded to t (≤ s/2, or ≤ s/8 at
8 bits). See `requantize_q6_k`.

Why 6 bits: decode reads every weight once per token and is memory-bound, and on a Q4_K_M
file Q6_K holds a quarter of the weights (the 1.5B: LM head, half the down projections, the
v projections; 432M of 1.78G). At 6 bits (7 per weight with the float16 scale and bias) the
1.5B reads 1.07 GB per token instead of 1.18 GB: tg128 +8-10% measured (interleaved, same
machine). The added error, 0.17 of the Q6_K step on average, is a sixth of what Q4_K's own
rounding leaves on the other three quarters (a Q4_K step is ~4 Q6_K steps; rounding leaves
~1/4 step); teacher-forced vs llama.cpp on the 1.5B (300 positions, accurate / fast): 8-bit
top-1 0.977 / 0.980, mean KL 0.0217 / 0.0167, p99 KL 0.0067 / 0.0089; 6-bit 0.980 / 0.967,
0.0223 / 0.0172, 0.0111 / 0.0124.

Measured (benchmarks/gguf_fidelity.py) on Qwen2.5-Coder-0.5B/1.5B and Gemma 3 270M Q4_K_M,
weight error vs gguf.quants.dequantize, mean |err| / mean |w| (and mean err / own step):
    Q4_K float16 scales   6.6e-4 (0.0018 step)     float32: 0 (exact), +17% model bytes
    Q6_K 8-bit g32        3.0e-3 (0.042 step; max 0.126 of the larger step)
    Q6_K 6-bit g32        1.2e-2 (0.17 step; max 0.51)                 −8% model bytes
    Q4_0 Q4_1 Q5_0 Q5_1 Q8_0: 0.
Model level, Qwen2.5-Coder-1.5B, 124 tokens teacher-forced vs the file's weights in float32
(activations float32): mean KL 2.66e-5 (float16 scales, Q6_K 8-bit), 2.60e-5 (float32
scales), 3.87e-4 (Q6_K 6-bit); top-1 agreement 0.992 in all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

GROUP = 32
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}
# qtype → (block width, bytes per block, MLX bits)
BLOCKS = {
    T.Q4_0: (32, 18, 4),
    T.Q4_1: (32, 20, 4),
    T.Q5_0: (32, 22, 5),
    T.Q5_1: (32, 24, 5),
    T.Q8_0: (32, 34, 8),
    T.Q4_K: (256, 144, 4),
    T.Q5_K: (256, 176, 5),
    T.Q6_K: (256, 210, 6),  # re-quantized: Q6_BITS by default
}
SUPPORTED = tuple(t.name for t in (*BLOCKS, T.F16, T.BF16, T.F32))
Q6_BITS = 6  # bits Q6_K is re-quantized to by default (see above; 8: smaller error, +9% bytes)
_CHUNK = 1 << 22  # values decoded at a time: bounds the float temporaries to tens of MB


@dataclass
class Quantized:
    """One matrix in MLX's affine layout (uint32 words; scales and biases per group)."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int = GROUP

    def dequantize(self) -> np.ndarray:
        q = unpack(self.weight, self.bits).astype(np.float32)
        q = q.reshape(*self.scales.shape, self.group_size)
        s, b = (a.astype(np.float32)[..., None] for a in (self.scales, self.biases))
        return (q * s + b).reshape(self.weight.shape[0], -1)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values (rows, cols) little-endian into uint32 (MLX's layout)."""
    rows = q.shape[0]
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        q = q.astype(np.uint8)
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    # 3/5/6 bits: every 8 values fill `bits` bytes of a little-endian bit stream.
    g = q.reshape(rows, -1, 8).astype(np.uint64)
    word = np.zeros(g.shape[:2], dtype=np.uint64)
    for j in range(8):
        word |= g[..., j] << np.uint64(bits * j)
    b = word.view(np.uint8).reshape(rows, -1, 8)[..., :bits]
    return np.ascontiguousarray(b).reshape(rows, -1).view(np.uint32)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: uint8 values (rows, cols)."""
    rows = w.shape[0]
    b = np.ascontiguousarray(w).view(np.uint8).reshape(rows, -1, bits)
    word = np.zeros((rows, b.shape[1]), dtype=np.uint64)
    for j in range(bits):
        word |= b[..., j].astype(np.uint64) << np.uint64(8 * j)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    q = (word[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return q.astype(np.uint8).reshape(rows, -1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles of each byte row: ggml's order within a 32-block."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """Bit j of the little-endian bit field `qh` (uint8 rows) for j < n."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :n]


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4: eight 6-bit scales and mins packed in 12 bytes."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def affine_parts(blocks: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks (n, bytes) of an exact type → q (n, width) uint8, scale and bias (n, width/32)."""
    n = blocks.shape[0]
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        d = _f16(blocks[:, 0:2])
        if qtype == T.Q8_0:
            q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            return q, d, -128 * d
        has_min = qtype in (T.Q4_1, T.Q5_1)
        off = 4 if has_min else 2
        if qtype in (T.Q5_0, T.Q5_1):
            q = _nibbles(blocks[:, off + 4 :]) | (_high_bits(blocks[:, off : off + 4], 32) << 4)
            zero = 16
        else:
            q = _nibbles(blocks[:, off:])
            zero = 8
        return q, d, (_f16(blocks[:, 2:4]) if has_min else -zero * d)
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = k_scale_min(blocks[:, 4:16])
        qs = blocks[:, -128:].reshape(n, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-blocks 2j, 2j+1
        if qtype == T.Q5_K:
            hi = _high_bits(blocks[:, 16:48].reshape(n, 32, 1), 8)  # (n, 32 values, 8 sub-blocks)
            q = q | (hi.transpose(0, 2, 1) << 4)
        return q.reshape(n, 256), d * sc, -(dmin * mn)
    raise ValueError(f"{qtype.name} is not an exact affine type")


def q6_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks → signed q in [-32, 31] (n, 256) int8 and the 16 sub-block steps d·sc."""
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts
    q = (ql | ((qh & 3) << 4)).astype(np.int8) - 32
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return q.reshape(n, 256), _f16(blocks[:, 208:210]) * sc


def requantize_q6_k(q6: np.ndarray, steps: np.ndarray, bits: int, scale_dtype=np.float16):
    """Q6_K values → MLX affine `bits` (8 or 6), group 32: q (n, 256), scales, biases (n, 8).

    The group's scale is the larger sub-block's step divided by 4 (8-bit) or 1 (6-bit), so
    that sub-block's values land on the grid exactly; the other sub-block is rounded (≤ an
    eighth of the larger step at 8 bits). A group whose two steps are equal and opposite
    spans one level more than the grid holds; it is spread evenly instead (≤ 32/255 step).
    """
    n = q6.shape[0]
    top = (1 << bits) - 1
    pair = steps.reshape(n, 8, 2)
    anchor = np.where(np.abs(pair[..., 0]) >= np.abs(pair[..., 1]), pair[..., 0], pair[..., 1])
    w = q6.reshape(n, 8, 2, 16).astype(np.float32) * pair[..., None]
    zero = 1 << (bits - 1)
    t = (anchor / (4 if bits == 8 else 1)).astype(scale_dtype).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(t[..., None, None] == 0, 0, np.rint(w / t[..., None, None])) + zero
    spill = ((level < 0) | (level > top)).any(axis=(2, 3))
    t = np.where(spill, 64 * np.abs(anchor) / top, t).astype(scale_dtype)
    bias = np.where(spill, -(top / 2) * t.astype(np.float32), -zero * t.astype(np.float32))
    bias = bias.astype(scale_dtype)
    tf, bf = t.astype(np.float32)[..., None, None], bias.astype(np.float32)[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(tf == 0, 0, np.rint((w - bf) / tf))
    return np.clip(q, 0, top).astype(np.uint8).reshape(n, 256), t, bias


def dequantize_blocks(blocks: np.ndarray, qtype: T) -> np.ndarray:
    """Float32 values of GGUF blocks (n, bytes) of a supported quantized type: (n, width)."""
    n = blocks.shape[0]
    if qtype == T.Q6_K:
        q6, steps = q6_k_parts(blocks)
        return (q6.reshape(n, 16, 16) * steps[..., None]).reshape(n, 256)
    q, s, b = affine_parts(blocks, qtype)
    g = q.reshape(n, -1, GROUP).astype(np.float32)
    return (g * s[..., None] + b[..., None]).reshape(n, -1)


def decode(
    raw: np.ndarray,
    qtype: T,
    shape: tuple[int, ...],
    *,
    scale_dtype=np.float16,
    q6_bits: int = Q6_BITS,
) -> np.ndarray | Quantized:
    """One GGUF tensor's raw data → a float array or, for 2-D quantized ones, `Quantized`.

    `shape` is numpy order (rows, cols). float16 scales are widened to float32 for a tensor
    whose scales would not fit float16.
    """
    if qtype in FLOAT_TYPES:
        return np.ascontiguousarray(raw).view(FLOAT_TYPES[qtype]).reshape(shape)
    if qtype == T.BF16:
        bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)  # caller stores it as bfloat16
    width, size, bits = BLOCKS[qtype]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)
    if len(shape) != 2:  # never a matrix: hand back floats
        return dequantize_blocks(blocks, qtype).reshape(shape)
    rows, cols = shape
    per_row = cols // width
    step = max(1, _CHUNK // cols)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for r in range(0, rows, step):
        b = blocks[r * per_row : min(rows, r + step) * per_row]
        if qtype == T.Q6_K:
            bits = q6_bits
            q, s, z = requantize_q6_k(*q6_k_parts(b), bits, scale_dtype)
        else:
            q, s, z = affine_parts(b, qtype)
        nr = b.shape[0] // per_row
        parts.append((pack(q.reshape(nr, cols), bits), s.reshape(nr, -1), z.reshape(nr, -1)))
    w = np.concatenate([p[0] for p in parts])
    s = np.concatenate([p[1] for p in parts])
    z = np.concatenate([p[2] for p in parts])
    dtype = scale_dtype
    if dtype == np.float16 and max(np.abs(s).max(), np.abs(z).max()) > 65504:
        dtype = np.float32  # exceeds float16: keep this tensor's scales in float32
    return Quantized(w, s.astype(dtype), z.astype(dtype), bits)
