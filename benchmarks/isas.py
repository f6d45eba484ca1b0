"""Compare edgeai's instruction-set variants on real models' matrices, interleaved.

For each matrix (N x K) and bit width, the variants take turns call by call (so a shared
machine's slow minutes hit all of them alike); prints each one's median time of a batch of
calls and the ratio to the first variant. Default: the int8 (fast) path at M = 1, the
AVX2 int8 tile (ISA "avx512") against the AVX-512 VNNI one ("avx512vnni").

    python benchmarks/isas.py [--isas avx512,avx512vnni] [--bits 4,5,6,8] [--m 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

MODELS = {  # name -> [(matrix, N, K)]
    "smollm2-135m": [
        ("q/o", 576, 576),
        ("k/v", 192, 576),
        ("gate/up", 1536, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ],
    "qwen2.5-1.5b": [
        ("q/o", 1536, 1536),
        ("k/v", 256, 1536),
        ("gate/up", 8960, 1536),
        ("down", 1536, 8960),
        ("lm_head", 151936, 1536),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", default="avx512,avx512vnni")
    ap.add_argument("--bits", default="4,5,6,8")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--gs", type=int, default=32)
    ap.add_argument("--accurate", action="store_true", help="time the float32 path instead of int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    os.environ["EDGEAI_THREADS"] = str(args.threads)

    import mlx.core as mx
    import numpy as np

    from edgeai.kernels import cpu as kernels_cpu

    ext = kernels_cpu.extension()
    isas = [i for i in args.isas.split(",") if i in ext.available_isas()]
    if len(isas) < 2:
        raise SystemExit(f"need two of {args.isas} on this CPU; it has {ext.available_isas()}")
    fast = not args.accurate
    path = "int8" if fast else "float32"
    print(f"{ext.threads()} threads, M = {args.m}, group {args.gs}, fp16 scales, {path} path")
    print(
        "| model | matrix | N x K | bits | "
        + " | ".join(f"{i} ms" for i in isas)
        + " | "
        + " | ".join(f"{i} speed-up" for i in isas[1:])
        + " |"
    )
    print("|---|---|---|---:|" + "---:|" * (2 * len(isas) - 1))
    rng = np.random.default_rng(0)
    for model in args.models.split(","):
        for name, n, k in MODELS[model]:
            for bits in (int(b) for b in args.bits.split(",")):
                wq = mx.array(rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32))
                s = mx.array(rng.uniform(0.005, 0.05, (n, k // args.gs)).astype(np.float16))
                b = mx.array(rng.uniform(-0.2, 0.2, (n, k // args.gs)).astype(np.float16))
                # enough calls per timing that graph dispatch is not what is measured
                calls = max(1, min(64, int(2e8 / (n * k * bits / 8 + 1))))
                xs = [mx.random.normal((args.m, k), key=mx.random.key(i)) for i in range(calls)]
                mx.eval(wq, s, b, *xs)
                times: dict[str, list[float]] = {i: [] for i in isas}
                for r in range(args.rounds + 1):
                    for isa in isas if r % 2 else reversed(isas):
                        ext.set_isa(isa)
                        t = time.perf_counter()
                        mx.eval(
                            [ext.quantized_matmul(x, wq, s, b, args.gs, bits, fast) for x in xs]
                        )
                        if r:  # the first round warms caches and the pool
                            times[isa].append((time.perf_counter() - t) / calls)
                med = {i: statistics.median(v) for i, v in times.items()}
                ms = " | ".join(f"{med[i] * 1e3:.4f}" for i in isas)
                up = " | ".join(f"{med[isas[0]] / med[i]:.2f}×" for i in isas[1:])
                print(f"| {model} | {name} | {n}x{k} | {bits} | {ms} | {up} |", flush=True)
                del wq, s, b, xs
    ext.set_isa("auto")


if __name__ == "__main__":
    main()
