"""Convert a GGUF file (Q4_0, Q4_1, Q8_0, F16, F32; llama and qwen2) into an MLX model directory.

MLX reads GGUF tensors of these types straight into its own affine format (uint32-packed
weights, float16 scales and biases, group size 32), so no weight is re-quantized: the
converted model computes with exactly the numbers the GGUF file holds. The tokenizer is
rebuilt from the GGUF vocabulary and merges as a Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from edgeai.errors import InvalidInput, UnsupportedModel

SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32")
SUPPORTED_ARCHS = ("llama", "qwen2")

# GGUF tensor names → Hugging Face names used by mlx-lm's model code.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the HF tokenizers' own regexes).
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_PATTERNS = {
    "gpt-2": [_GPT2_PAT],
    "default": [_GPT2_PAT],
    "smollm": [r"\p{N}", _GPT2_PAT],
    "llama-bpe": [_LLAMA3_PAT],
    "llama3": [_LLAMA3_PAT],
    "qwen2": [_QWEN2_PAT],
}


def inspect(src: str | Path) -> dict[str, Any]:
    """Check that `src` is a GGUF file edgeai can convert; return its architecture and types.

    Raises:
        InvalidInput: not a readable GGUF file.
        UnsupportedModel: unsupported architecture, tokenizer or tensor type.
    """
    from gguf import GGUFReader

    src = Path(src)
    if not src.is_file():
        raise InvalidInput(f"{src} does not exist or is not a file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InvalidInput(f"{src} is not a GGUF file (bad magic bytes)", "give a .gguf model file")
    try:
        reader = GGUFReader(str(src))
    except Exception as e:  # truncated or corrupt headers surface as assorted errors
        raise InvalidInput(f"{src} is a damaged GGUF file: {e}", "download the file again") from e
    arch = _field(reader, "general.architecture")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in SUPPORTED_TYPES]
    if bad:
        raise UnsupportedModel(
            f"{src.name} uses tensor type(s) {', '.join(bad)}; edgeai imports {', '.join(SUPPORTED_TYPES)}",
            "use a Q4_0, Q4_1 or Q8_0 GGUF of this model, or pull the MLX 4-bit model instead",
        )
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"{src.name} is a '{arch}' model; edgeai imports {', '.join(SUPPORTED_ARCHS)} architectures"
        )
    tok_model = _field(reader, "tokenizer.ggml.model")
    if tok_model not in ("gpt2", "llama"):
        raise UnsupportedModel(
            f"{src.name} has a '{tok_model}' tokenizer; edgeai imports byte-level BPE ('gpt2': SmolLM2, "
            "Qwen2.5, Llama 3) and SentencePiece ('llama': Llama 2, Mistral, TinyLlama) tokenizers"
        )
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors)}


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def convert(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write an MLX model directory for the GGUF file `src` into `dst` (created).

    Returns:
        A summary: architecture, tensor types, parameter count, name from the metadata.
    """
    info = inspect(src)
    try:
        weights, meta = mx.load(str(src), return_metadata=True)
    except Exception as e:
        raise InvalidInput(f"{Path(src).name} could not be read: {e}", "download the file again") from e
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in meta.items()}
    arch = info["architecture"]
    config = _config(meta, arch, weights)
    weights = _rename(weights, arch, config)
    config["quantization"] = _quantization(weights)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, dst)
    info.update(
        name=meta.get("general.name"),
        parameters=_param_count(weights, config["quantization"]),
        context_length=config["max_position_embeddings"],
    )
    return info


def _config(meta: dict, arch: str, weights: dict) -> dict[str, Any]:
    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in weights,
    }
    head_dim = g("attention.key_length")
    if head_dim and int(head_dim) != hidden // n_heads:
        if arch == "qwen2":  # mlx-lm's qwen2 has no head_dim setting: the model would not load
            raise UnsupportedModel(f"this qwen2 file has attention heads of {int(head_dim)} (not hidden size / "
                                   f"heads = {hidden // n_heads}); edgeai's qwen2 model cannot run it")
        config["head_dim"] = int(head_dim)
    if "rope_freqs.weight" in weights:
        # Llama 3.x bakes its RoPE scaling into per-dimension divisors; the largest is the factor.
        factor = float(mx.max(weights["rope_freqs.weight"]).item())
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return config


def _rename(weights: dict[str, mx.array], arch: str, config: dict) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for key, w in weights.items():
        stem, _, suffix = key.rpartition(".")
        if stem == "rope_freqs":
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if m:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
            kind = m.group(2)
        elif stem in _TOP_NAMES:
            name, kind = _TOP_NAMES[stem], stem
        else:
            raise UnsupportedModel(f"unexpected tensor '{key}' in the GGUF file")
        # llama.cpp stores Q/K rows permuted for interleaved RoPE; undo it so the model uses
        # the Hugging Face layout (and adapters trained on HF weights line up).
        if arch == "llama" and kind in ("attn_q", "attn_k") and suffix in ("weight", "scales", "biases"):
            heads = config["num_attention_heads"] if kind == "attn_q" else config["num_key_value_heads"]
            w = _unpermute(w, heads)
        out[f"{name}.{suffix}"] = w
    return out


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """Per-layer quantization settings: GGUF files mix Q4 layers with Q8 or float ones."""
    quant: dict[str, Any] = {"group_size": 32, "bits": 4, "mode": "affine"}
    for key, w in weights.items():
        if not key.endswith(".weight"):
            continue
        layer = key[: -len(".weight")]
        scales = weights.get(f"{layer}.scales")
        if scales is None:
            if w.ndim == 2:
                quant[layer] = False
            continue
        bits = w.shape[-1] * 32 // (scales.shape[-1] * 32)
        quant[layer] = {"group_size": 32, "bits": int(bits)}
    return quant


def _param_count(weights: dict[str, mx.array], quant: dict[str, Any]) -> int:
    n = 0
    for key, w in weights.items():
        if key.endswith((".scales", ".biases")) and f"{key.rpartition('.')[0]}.weight" in weights:
            if weights[f"{key.rpartition('.')[0]}.weight"].dtype == mx.uint32:
                continue
        if w.dtype == mx.uint32:
            n += w.size * 32 // quant[key[: -len(".weight")]]["bits"]
        else:
            n += w.size
    return n


def _bpe_tokenizer(meta: dict, tokens: list[str]):
    """Byte-level BPE (GPT-2 style) from the GGUF vocabulary and merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    patterns = _PRE_PATTERNS.get(meta.get("tokenizer.ggml.pre", "default"), _PRE_PATTERNS["default"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(meta: dict, tokens: list[str], types: np.ndarray):
    """SentencePiece BPE with byte fallback, merges recovered from the piece scores.

    GGUF keeps SentencePiece's scores, not its merges: a piece that splits into two known
    pieces is a merge, ranked by the merged piece's score (how SentencePiece itself merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = list(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                               unk_token=tokens[int(unk)] if unk is not None else None))
    prefix = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix == "first" else [])
    )
    return tok


def _write_tokenizer(meta: dict, dst: Path) -> None:
    from tokenizers import AddedToken, processors

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = np.array(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))), dtype=np.int32)
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.model") == "llama":
        tok = _spm_tokenizer(meta, tokens, types)
    else:
        tok = _bpe_tokenizer(meta, tokens)
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    added = [
        AddedToken(tokens[i], special=bool(types[i] == 3), normalized=False)
        for i in np.where((types == 3) | (types == 4))[0]
    ]
    tok.add_tokens(added)

    def tok_name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    bos = tok_name("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok.save(str(dst / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": tok_name("eos"),
        "unk_token": tok_name("unknown"),
        "pad_token": tok_name("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
