"""Prompt-processing and generation speed, measured like llama-bench.

Two tests per kernel: `pp<N>` processes N random prompt tokens (time to first token);
`tg<N>` generates N tokens greedily from a one-token prompt. Each runs once to warm up,
then `reps` times; speeds are reported as mean ± standard deviation. Both go through
`engine.decode.decode_steps`, the same loop `Engine.generate` runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from edgeai import kernels
from edgeai.engine import Engine
from edgeai.engine.decode import decode_steps
from edgeai.hardware import human_bytes
from edgeai.kernels import Hooks

KERNELS = ("builtin", "custom")


@dataclass
class BenchRow:
    """One test (pp or tg) of one kernel."""

    model: str
    kernel: str  # the kernel asked for (builtin/custom)
    kernel_detail: str  # what ran: e.g. "edgeai-cpu avx512" or "builtin"
    test: str  # "pp512" / "tg128"
    tokens: int
    reps: int
    tok_s: float  # mean tokens per second
    tok_s_sd: float
    ttft_s: float | None  # mean time to first token (pp tests)
    peak_memory_bytes: int
    samples: list[float] = field(default_factory=list)  # tokens/s of each rep

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchHeader:
    machine: str
    backend: str
    threads: int
    model: str
    mlx: str

    def to_dict(self) -> dict:
        return asdict(self)


def machine() -> str:
    """CPU model name (or platform) for the header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores)".strip()


def header(model: str) -> BenchHeader:
    st = kernels.status()
    threads = st.get("threads") or os.cpu_count() or 1
    return BenchHeader(machine(), kernels.backend(), int(threads), model, mx.__version__)


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def prompt_time(model, tokens: mx.array, hooks: Hooks | None = None) -> float:
    """Seconds from the prompt to the first generated token (`hooks`: the model's kernels')."""
    t0 = time.perf_counter()
    for _ in decode_steps(model, tokens, _greedy, 1, hooks=hooks):
        pass
    return time.perf_counter() - t0


def gen_time(model, first: mx.array, n: int, hooks: Hooks | None = None) -> float:
    """Seconds to generate n tokens greedily after a one-token prompt."""
    t0 = time.perf_counter()
    count = sum(1 for _ in decode_steps(model, first, _greedy, n, hooks=hooks))
    assert count == n
    return time.perf_counter() - t0


def run_test(
    model,
    vocab: int,
    test: str,
    n: int,
    reps: int,
    seed: int = 0,
    on_rep: Callable[[], None] | None = None,
    warmup: int | None = None,
    hooks: Hooks | None = None,
) -> tuple[list[float], list[float], int]:
    """Warm up once, then time `reps` runs; returns (tok/s per rep, seconds per rep, peak bytes).

    Args:
        model: an mlx-lm model.
        vocab: vocabulary size (random tokens are drawn below it).
        test: "pp" (prompt of n tokens) or "tg" (n generated tokens).
        n: token count.
        reps: timed runs.
        seed: seed of the random tokens.
        on_rep: called after each timed run.
        warmup: tokens of the warm-up run (default n; a slow peer may warm up on fewer).
        hooks: the model's kernel hooks (`Engine.hooks`; None for a stock mlx-lm model).
    """
    key = mx.random.key(seed)
    tokens = mx.random.randint(0, vocab, (n if test == "pp" else 1,), key=key).astype(mx.int32)
    if test == "pp":
        timer = lambda: prompt_time(model, tokens, hooks)  # noqa: E731
    else:
        timer = lambda: gen_time(model, tokens, n, hooks)  # noqa: E731
    if warmup is None:
        timer()
    elif test == "pp":
        prompt_time(model, tokens[: max(1, warmup)], hooks)
    else:
        gen_time(model, tokens, max(1, warmup), hooks)
    mx.reset_peak_memory()
    secs = []
    for _ in range(reps):
        secs.append(timer())
        if on_rep:
            on_rep()
    return [n / s for s in secs], secs, int(mx.get_peak_memory())


def bench(
    model_path: Path,
    name: str,
    kernels: tuple[str, ...] = ("custom",),
    n_prompt: int = 512,
    n_gen: int = 128,
    reps: int = 5,
    on_rep: Callable[[], None] | None = None,
    precisions: tuple[str | None, ...] = (None,),
) -> Iterator[BenchRow]:
    """Yield one BenchRow per (kernel, precision, test), as each finishes.

    Args:
        model_path: MLX model directory.
        name: the model name to report.
        kernels: kernels to compare, each "builtin" or "custom" (or "auto").
        precisions: CPU-kernel precisions to measure for non-builtin kernels ("fast",
            "accurate"; None is the default, $EDGEAI_KERNEL_PRECISION or fast).
        n_prompt: prompt tokens for the pp test (0 skips it).
        n_gen: generated tokens for the tg test (0 skips it).
        reps: timed repetitions after one warm-up.
        on_rep: called after each timed repetition (progress bars).
    """
    runs = [(k, p) for k in kernels for p in ((None,) if k == "builtin" else precisions)]
    for kernel, precision in runs:
        eng = Engine.load(model_path, name=name, kernel=kernel, precision=precision)
        detail = " ".join(x for x in (eng.kernel.name, eng.kernel.isa, eng.kernel.precision) if x)
        vocab = eng.vocab_size
        for test, n in (("pp", n_prompt), ("tg", n_gen)):
            if n <= 0:
                continue
            rates, secs, peak = run_test(
                eng.model, vocab, test, n, reps, on_rep=on_rep, hooks=eng.hooks
            )
            yield BenchRow(
                model=name,
                kernel=kernel,
                kernel_detail=detail,
                test=f"{test}{n}",
                tokens=n,
                reps=reps,
                tok_s=statistics.fmean(rates),
                tok_s_sd=statistics.stdev(rates) if len(rates) > 1 else 0.0,
                ttft_s=statistics.fmean(secs) if test == "pp" else None,
                peak_memory_bytes=peak,
                samples=rates,
            )
        del eng
        mx.clear_cache()


def markdown(head: BenchHeader, rows: list[BenchRow]) -> str:
    """llama-bench-style markdown table with a header line."""
    lines = [
        f"machine: {head.machine} | backend: {head.backend} | threads: {head.threads} | "
        f"model: {head.model} | mlx {head.mlx}",
        "",
        "| model | kernel | test | t/s | TTFT | peak memory |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ttft = f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "-"
        lines.append(
            f"| {r.model} | {r.kernel_detail} | {r.test} "
            f"| {r.tok_s:.2f} ± {r.tok_s_sd:.2f} | {ttft} | "
            f"{human_bytes(r.peak_memory_bytes)} |"
        )
    return "\n".join(lines)


def verdict(rows: list[BenchRow]) -> dict[str, str]:
    """Per test measured with more than one kernel: the fastest, and its speed-up over MLX's
    own kernel ("builtin") when that ran too. On a Mac this is how a user learns whether
    edgeai's Metal kernel (opt-in: --kernel custom) beats MLX's."""
    out = {}
    for test in dict.fromkeys(r.test for r in rows):
        rs = [r for r in rows if r.test == test]
        if len(rs) < 2:
            continue
        best = max(rs, key=lambda r: r.tok_s)
        base = next((r for r in rs if r.kernel == "builtin"), None)
        text = f"{best.kernel_detail} ({best.tok_s:.1f} t/s"
        if base is not None and best is not base and base.tok_s > 0:
            text += f", {best.tok_s / base.tok_s:.2f}x MLX's kernel"
        out[test] = text + ")"
    return out


def csv_text(head: BenchHeader, rows: list[BenchRow]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = [
        "machine",
        "backend",
        "threads",
        "model",
        "kernel",
        "kernel_detail",
        "test",
        "tokens",
        "reps",
        "tok_s",
        "tok_s_sd",
        "ttft_s",
        "peak_memory_bytes",
    ]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**head.to_dict(), **r.to_dict()})
    return buf.getvalue()
