"""Who is right when edgeai and llama.cpp disagree: both against the GGUF's exact numbers.

The reference is the model computed in float32 from the file's weights dequantized by the
gguf package (llama.cpp's own numpy decoder), all positions in one pass. edgeai (custom
kernels, accurate precision, one token at a time) and llama.cpp (llama-cpp-python, one token
at a time) are each compared with it and with each other: next-token top-1 agreement and
mean KL, with and without position 0 (a first token with no context, whose activations are
extreme in Qwen2 models and which llama.cpp's 8-bit activation rounding moves most).

    python benchmarks/float_reference.py MODEL FILE.gguf [--tokens 120] [--threads 2]

MODEL is an installed store name made from FILE.gguf (`edgeai pull` / `edgeai import`).
The model code is mlx-lm's, as in edgeai: a misreading of the architecture shared by both
would not show here. `agreement.py --reference hf --llama-f32` checks against Hugging Face
transformers and llama.cpp's own float graph instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agreement import TEXT, llama_cpp_logits, log_softmax, mlx_logits  # noqa: E402


def float_logits(model_dir: Path, gguf: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    from gguf import quants
    from mlx_lm.utils import _get_classes

    from edgeai.store import gguf as eg
    from edgeai.store.gguf_file import GGUFFile

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization", None)
    gf = GGUFFile(gguf)
    arch = gf.fields["general.architecture"]
    weights = {}
    for t in gf.tensors:
        name = eg._hf_name(t.name, arch)
        if name is None:
            continue
        rows = t.shape[0] if len(t.shape) == 2 else 1
        w = quants.dequantize(np.array(gf.raw(t)).reshape(rows, -1), t.qtype).reshape(t.shape)
        weights[name] = mx.array(eg._fix_layout(w.astype(np.float32), t.name, arch, cfg))
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def compare(a: np.ndarray, b: np.ndarray) -> str:
    la, lb = log_softmax(a), log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return (
        f"top-1 {(a.argmax(-1) == b.argmax(-1)).mean():.3f} | mean KL {kl.mean():.4f} | "
        f"without position 0: {kl[1:].mean():.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ["EDGEAI_THREADS"] = str(args.threads)

    from mlx_lm.utils import load_tokenizer

    from edgeai import store
    from edgeai.engine import Engine

    path = store.resolve(args.model)
    ids = list(load_tokenizer(path).encode(TEXT))[: args.tokens]
    ref = float_logits(path, args.gguf, ids)
    llama = llama_cpp_logits(args.gguf, args.threads, len(ids) + 8)(ids)
    eng = Engine.load(path, kernel="custom", precision="accurate")
    ours = mlx_logits(eng.model, eng.hooks.make_cache)(ids)
    print(f"{args.model}, {len(ids)} positions")
    print(f"| float reference vs edgeai    | {compare(ref, ours)} |")
    print(f"| float reference vs llama.cpp | {compare(ref, llama)} |")
    print(f"| llama.cpp vs edgeai          | {compare(llama, ours)} |")


if __name__ == "__main__":
    main()
