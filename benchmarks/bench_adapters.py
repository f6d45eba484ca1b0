"""Adapter switch time vs a full model reload, measured in the same run.

What a request for another adapter costs:
  * edgeai, adapter in memory (LRU hit): select it — a pointer change;
  * edgeai, adapter not in memory: read its safetensors, check it, install it;
  * reload: what a runtime that fixes the adapter at load time pays — `Engine.load` of the
    base model, and stock mlx-lm's `load(path, adapter_path=...)` (what `mlx_lm.server`
    does when the adapter changes).
Also: decode tokens/s with and without an adapter active (the LoRA delta's overhead).

Usage:
    python benchmarks/bench_adapters.py [--model DIR] [--rank 8] [--repeats 5] [--json]
Without --model it uses /tmp/smollm2-mlx when present, else a tiny random model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def write_random_adapter(base: Path, out: Path, seed: int, rank: int, num_layers: int) -> Path:
    """An mlx-lm LoRA adapter (mlx-lm's own layer choice and names) with random weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(base, lazy=True)
    model.freeze()
    params = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {
        k: mx.random.normal(v.shape) * 0.01 for k, v in tree_flatten(model.trainable_parameters())
    }
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "model": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_tps(engine, adapter: str | None, n: int = 32) -> float:
    from edgeai.options import GenerationOptions

    events = list(
        engine.generate("Tell me about the sea.", GenerationOptions(max_tokens=n), adapter=adapter)
    )
    s = events[-1].stats
    return s.generation_tokens / s.generation_seconds if s.generation_seconds else 0.0


def run(model_dir: Path, rank: int, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from edgeai.engine import Engine
    from edgeai.store import adapters

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    os.environ["EDGEAI_HOME"] = str(work / "home")
    import json as _json

    layers = _json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    srcs = [
        write_random_adapter(model_dir, work / f"src{i}", seed=i, rank=rank, num_layers=layers)
        for i in (1, 2)
    ]
    infos = [adapters.add(s, str(model_dir), name=f"bench-{i}") for i, s in enumerate(srcs)]
    names = [i.name for i in infos]

    reload_s = timed(
        lambda: Engine.load(model_dir, kernel=os.environ.get("EDGEAI_KERNEL")), repeats
    )
    mlx_lm_s = timed(
        lambda: mx.eval(mlx_load(str(model_dir), adapter_path=str(srcs[0]))[0].parameters()),
        repeats,
    )

    eng = Engine.load(model_dir)
    t = time.perf_counter()
    eng.adapters.get(
        names[0]
    )  # the first adapter also wraps the layers; later ones only read weights
    first_s = time.perf_counter() - t

    def cold() -> None:
        eng.adapters.drop(names[0])
        eng.adapters.get(names[0])

    cold_s = timed(cold, repeats)
    for n in names:
        eng.adapters.get(n)
    flips = 2000

    def warm() -> None:
        for i in range(flips):
            with eng.lock, eng.adapters.use(names[i % 2]):
                pass

    warm_s = timed(warm, repeats) / flips
    tps_base, tps_adapter = decode_tps(eng, None), decode_tps(eng, names[0])
    return {
        "model": str(model_dir),
        "kernel": eng.kernel.name,
        "adapter_rank": rank,
        "adapter_layers": infos[0].layers,
        "adapter_bytes": infos[0].size_bytes,
        "reload_engine_s": reload_s,
        "reload_mlx_lm_with_adapter_s": mlx_lm_s,
        "first_adapter_s": first_s,
        "switch_cold_s": cold_s,
        "switch_warm_s": warm_s,
        "reload_over_cold_switch": reload_s / cold_s,
        "reload_over_warm_switch": reload_s / warm_s,
        "decode_tps_base": tps_base,
        "decode_tps_adapter": tps_adapter,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="MLX model directory")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = Path("/tmp/smollm2-mlx")
        if not (model / "config.json").exists():
            from tinymodel import make_tiny_model

            model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    r = run(model, args.rank, args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    ms = lambda s: f"{s * 1e3:9.3f} ms"  # noqa: E731
    print(
        f"model {r['model']} (kernel {r['kernel']}); adapter rank {r['adapter_rank']}, "
        f"{r['adapter_layers']} layers, {r['adapter_bytes'] / 1e6:.1f} MB"
    )
    print(f"  full reload, Engine.load             {ms(r['reload_engine_s'])}")
    print(f"  full reload, mlx-lm load + adapter   {ms(r['reload_mlx_lm_with_adapter_s'])}")
    print(f"  first adapter (wraps the layers)     {ms(r['first_adapter_s'])}")
    print(
        f"  switch, adapter read from disk       {ms(r['switch_cold_s'])}   "
        f"reload / switch = {r['reload_over_cold_switch']:,.0f}x"
    )
    print(
        f"  switch, adapter in memory (LRU)      {ms(r['switch_warm_s'])}   "
        f"reload / switch = {r['reload_over_warm_switch']:,.0f}x"
    )
    print(
        f"  decode tok/s: base {r['decode_tps_base']:.1f}, "
        f"with adapter {r['decode_tps_adapter']:.1f}"
    )


if __name__ == "__main__":
    main()
