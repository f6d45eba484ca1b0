"""How faithfully edgeai's GGUF import keeps a file's weights, per tensor type and choice.

Weights: every quantized tensor (first 4096 rows) decoded by edgeai vs `gguf.quants.dequantize`
(llama.cpp's numpy reference), for float16 and float32 scales, and Q6_K re-quantized to 8 and
6 bits. Errors relative to the largest / mean |weight|, and to the block's own step (d·sc).

    python benchmarks/gguf_fidelity.py FILE.gguf [FILE.gguf ...]

Numbers from Qwen2.5-Coder-0.5B/1.5B and Gemma 3 270M Q4_K_M are in edgeai/store/gguf_quants.py.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from edgeai.store import gguf_quants as gq
from edgeai.store.gguf_file import GGUFFile

ROWS = 4096


def tensor_stats(raw: np.ndarray, qtype: T, shape: tuple[int, int]):
    """(label, stats) for each representation choice of one tensor."""
    ref = quants.dequantize(raw, qtype).reshape(shape)
    blocks = raw.reshape(-1, gq.BLOCKS[qtype][1])
    if qtype == T.Q6_K:
        steps = np.abs(gq.q6_k_parts(blocks)[1])
        own = np.repeat(steps, 16, axis=1).reshape(shape)
        larger = np.repeat(steps.reshape(-1, 8, 2).max(-1), 32, axis=1).reshape(shape)
        choices = [
            (f"{b}-bit {np.dtype(d).name}", b, d) for b in (8, 6) for d in (np.float16, np.float32)
        ]
    else:
        own = larger = np.repeat(np.abs(gq.affine_parts(blocks, qtype)[1]), 32, axis=1).reshape(
            shape
        )
        choices = [(np.dtype(d).name, 8, d) for d in (np.float16, np.float32)]
    for label, bits, dtype in choices:
        err = np.abs(
            gq.decode(raw, qtype, shape, scale_dtype=dtype, q6_bits=bits).dequantize() - ref
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            per_own = np.where(own > 0, err / own, 0)
            per_larger = np.where(larger > 0, err / larger, 0)
        yield (
            label,
            {
                "max/max|w|": err.max() / np.abs(ref).max(),
                "mean/mean|w|": err.mean() / np.abs(ref).mean(),
                "rms/rms(w)": np.sqrt((err**2).mean() / (ref**2).mean()),
                "mean/own step": per_own.mean(),
                "max/larger step": per_larger.max(),
            },
            err.size,
        )


def main(paths: list[str]) -> None:
    table: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in paths:
        gf = GGUFFile(path)
        for t in gf.tensors:
            if t.qtype not in gq.BLOCKS or len(t.shape) != 2:
                continue
            rows = min(t.shape[0], ROWS)
            raw = gf.raw(t).reshape(t.shape[0], -1)[:rows]
            for label, stats, n in tensor_stats(raw, t.qtype, (rows, t.shape[1])):
                for k, v in stats.items():
                    table[(t.qtype.name, label)][k].append((float(v), n))
    for (qtype, label), cols in sorted(table.items()):
        parts = [f"{qtype:5} {label:14}"]
        for k, vals in cols.items():
            v = [x for x, _ in vals]
            agg = max(v) if k.startswith("max") else np.average(v, weights=[n for _, n in vals])
            parts.append(f"{k} {agg:.3g}")
        print("  ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
