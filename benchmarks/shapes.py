"""Sweep edgeai's CPU kernel against mx.quantized_matmul over SmolLM2-135M's matrices.

For each weight matrix shape of the model (N x K, bits, group 32) and M = 1 ... 512 rows,
prints the median time of edgeai's kernel (float32 "accurate", and the int8-activation "fast"
path where it applies: M <= 3), of MLX's kernel as the stock model runs it
(float16 activations and scales) and of MLX's kernel in float32 (its fastest CPU setting),
and the speed-ups. MLX's float16 path is very slow on x86 (software half-precision), so a
case whose estimated time exceeds --budget seconds is skipped and shown as "-".

    python benchmarks/shapes.py [--threads 2] [--m 1,4,16,64,512] [--budget 2]
"""

from __future__ import annotations

import argparse
import os
import time

SHAPES = [  # (name, N, K, bits) of SmolLM2-135M (Q4_1 GGUF; the tied embedding is Q8_0)
    ("k/v_proj", 192, 576, 4),
    ("q/o_proj", 576, 576, 4),
    ("gate/up_proj", 1536, 576, 4),
    ("down_proj", 576, 1536, 4),
    ("lm_head", 49152, 576, 8),
]


def median_time(fn, budget: float, estimate: float | None = None) -> float | None:
    """Median seconds of fn (evaluated), or None when it would take longer than budget."""
    import mlx.core as mx

    if estimate is not None and estimate > budget:
        return None
    t = time.perf_counter()
    mx.eval(fn())
    first = time.perf_counter() - t
    if first > budget:  # one sample is all a slow case gets
        return first
    reps = max(3, min(50, int(budget / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--m", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per case at most")
    args = ap.parse_args()
    os.environ["EDGEAI_THREADS"] = str(args.threads)

    import mlx.core as mx

    from edgeai.kernels import cpu as kernels_cpu

    ext = kernels_cpu.extension()
    print(
        f"edgeai kernel: {ext.isa()}, {ext.threads()} threads; "
        f"MLX {mx.__version__} (its CPU kernel: 1 thread)"
    )
    print()
    print(
        "| matrix | N x K | bits | M | edgeai ms | edgeai fast ms | MLX fp16 ms | MLX fp32 ms "
        "| vs fp16 | vs fp32 "
        "| edgeai GMAC/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, k, bits in SHAPES:
        w = mx.random.normal((n, k), key=mx.random.key(0))
        wq, s32, b32 = mx.quantize(w, 32, bits)
        s16, b16 = s32.astype(mx.float16), b32.astype(mx.float16)
        mx.eval(wq, s16, b16)
        last: dict[
            str, tuple[float, int]
        ] = {}  # impl -> (seconds, M) of the previous M, to skip hopeless cases

        def timed(impl, fn, m):
            est = last[impl][0] * m / last[impl][1] if impl in last and impl != "ours" else None
            t = median_time(fn, args.budget, est)
            if t is not None:
                last[impl] = (t, m)
            else:
                last[impl] = (float("inf"), 1)
            return t

        for m in (int(v) for v in args.m.split(",")):
            x32 = mx.random.normal((m, k), key=mx.random.key(1))
            x16 = x32.astype(mx.float16)
            mx.eval(x32, x16)
            ours = timed("ours", lambda: ext.quantized_matmul(x32, wq, s16, b16, 32, bits), m)
            fast = (
                timed("ours", lambda: ext.quantized_matmul(x32, wq, s16, b16, 32, bits, True), m)
                if m <= 3
                else None
            )
            f16 = timed("f16", lambda: mx.quantized_matmul(x16, wq, s16, b16, True, 32, bits), m)
            f32 = timed("f32", lambda: mx.quantized_matmul(x32, wq, s32, b32, True, 32, bits), m)

            def ms(t):
                return f"{t * 1e3:.3f}" if t is not None else "-"

            def ratio(t):
                return f"{t / ours:.1f}×" if t is not None and ours else "-"

            gmac = f"{m * n * k / ours / 1e9:.1f}" if ours else "-"
            print(
                f"| {name} | {n}x{k} | {bits} | {m} | {ms(ours)} | {ms(fast)} | {ms(f16)} "
                f"| {ms(f32)} | {ratio(f16)} "
                f"| {ratio(f32)} | {gmac} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
