"""Convert a GGUF file (llama, qwen2, gemma3; K-quants and the classic types) into an MLX model.

Every tensor becomes MLX's affine quantized layout with group size 32 (see `gguf_quants`):
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 exactly, Q4_K/Q5_K with their scales d·sc rounded to float16, and
Q6_K re-quantized to 6 bits; F16/BF16/F32 tensors stay float. One file mixes types freely,
so the config names each layer's bits (mlx-lm's per-layer quantization). The tokenizer is
rebuilt from the GGUF vocabulary as a Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.store import gguf_quants
from edgeai.store.gguf_file import GGUFFile, MalformedGGUF, TensorInfo

SUPPORTED_TYPES = gguf_quants.SUPPORTED
SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")

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
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the HF tokenizers' own regexes).
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_PATTERNS = {
    "gpt-2": [_GPT2_PAT],
    "default": [_GPT2_PAT],
    "smollm": [r"\p{N}", _GPT2_PAT],
    "llama-bpe": [_LLAMA3_PAT],
    "llama3": [_LLAMA3_PAT],
    "qwen2": [_QWEN2_PAT],
}


def _open(src: Path) -> GGUFFile:
    if not src.is_file():
        raise InvalidInput(f"{src} does not exist or is not a file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InvalidInput(
                f"{src} is not a GGUF file (bad magic bytes)", "give a .gguf model file"
            )
    try:
        return GGUFFile(src)
    except MalformedGGUF as e:
        raise InvalidInput(
            f"{src.name} is a damaged GGUF file: {e}", "download the file again"
        ) from e


def inspect(src: str | Path) -> dict[str, Any]:
    """Check that `src` is a GGUF file edgeai can convert; return what converting it makes.

    Returns:
        architecture, tensor_types, tensors, and converted_bytes (the MLX model's size).

    Raises:
        InvalidInput: not a readable GGUF file, or one missing required metadata.
        UnsupportedModel: unsupported architecture, tokenizer or tensor type.
    """
    src = Path(src)
    return _check(_open(src), src)[0]


def _check(gf: GGUFFile, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refuse what cannot be converted; return the summary and the model's config."""
    meta = gf.fields
    arch = meta.get("general.architecture")
    types = sorted({t.type_name for t in gf.tensors})
    bad = [t for t in types if t not in SUPPORTED_TYPES]
    if bad:
        raise UnsupportedModel(
            f"{src.name} uses tensor type(s) {', '.join(bad)}; "
            f"edgeai imports {', '.join(SUPPORTED_TYPES)}",
            "use a Q4_K_M, Q4_0 or Q8_0 GGUF of this model, or pull the MLX 4-bit model instead",
        )
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"{src.name} is a '{arch}' model; "
            f"edgeai imports {', '.join(SUPPORTED_ARCHS)} architectures"
        )
    tok_model = meta.get("tokenizer.ggml.model")
    if tok_model not in ("gpt2", "llama"):
        raise UnsupportedModel(
            f"{src.name} has a '{tok_model}' tokenizer; "
            "edgeai imports byte-level BPE ('gpt2': SmolLM2, "
            "Qwen2.5, Llama 3) and SentencePiece ('llama': Llama 2, Mistral, Gemma) tokenizers"
        )
    try:
        config = _config(gf, arch, src.name)  # required metadata present and readable
    except (TypeError, ValueError) as e:  # e.g. a list where a number belongs
        raise InvalidInput(
            f"{src.name} has metadata edgeai cannot read: {e}",
            "the file was not written by llama.cpp's converter",
        ) from e
    _check_tensors(gf, src, arch, config)
    info = {
        "architecture": arch,
        "tensor_types": types,
        "tensors": len(gf.tensors),
        "converted_bytes": sum(_converted_bytes(t, arch) for t in gf.tensors),
    }
    return info, config


def _check_tensors(gf: GGUFFile, src: Path, arch: str, config: dict) -> None:
    """Every tensor is one the model uses, shaped as the metadata says; none is missing."""
    expected = _expected_shapes(config)
    seen = set()
    for t in gf.tensors:
        name = _hf_name(t.name, arch)
        if name is None:
            continue
        if name not in expected:
            raise UnsupportedModel(
                f"{src.name} has a tensor '{t.name}' that a {arch} model does not use"
            )
        if tuple(t.shape) != expected[name]:
            raise InvalidInput(
                f"{src.name}: tensor '{t.name}' has shape {tuple(t.shape)} but the file's metadata "
                f"implies {expected[name]}",
                "download the file again, or report a converter bug",
            )
        seen.add(name)
    missing = sorted(k for k in expected if k not in seen and not k.startswith("lm_head."))
    if missing:
        raise InvalidInput(
            f"{src.name} lacks tensor(s) {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
            "download the file again",
        )


def _converted_bytes(t: TensorInfo, arch: str) -> int:
    n = int(np.prod(t.shape, dtype=np.int64))
    if t.qtype in gguf_quants.BLOCKS and len(t.shape) == 2:
        bits = gguf_quants.BLOCKS[t.qtype][2]
        wide = arch == "gemma3" and t.name == "token_embd.weight"  # float32 scales: _fix_layout
        per_group = 8 if wide else 4  # a scale and a bias
        return n * bits // 8 + n // gguf_quants.GROUP * per_group
    return n * (2 if t.type_name in ("F16", "BF16") else 4)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    scale_dtype=np.float16,
    q6_bits: int = gguf_quants.Q6_BITS,
) -> dict[str, Any]:
    """Write an MLX model directory for the GGUF file `src` into `dst` (created).

    Args:
        scale_dtype: dtype of the quantization scales and biases (float16; float32 to measure).
        q6_bits: bits Q6_K tensors are re-quantized to (6; 8 to measure: see gguf_quants).

    Returns:
        A summary: architecture, tensor types, parameter count, name from the metadata.
    """
    src = Path(src)
    gf = _open(src)
    info, config = _check(gf, src)
    arch = info["architecture"]
    weights: dict[str, mx.array] = {}
    for t in gf.tensors:
        name = _hf_name(t.name, arch)
        if name is None:
            continue
        value = gguf_quants.decode(
            gf.raw(t), t.qtype, tuple(t.shape), scale_dtype=scale_dtype, q6_bits=q6_bits
        )
        value = _fix_layout(value, t.name, arch, config)
        _put(weights, name, value, bf16=t.type_name == "BF16")
    config["quantization"] = _quantization(weights)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(gf.fields, dst)
    info.update(
        name=gf.fields.get("general.name"),
        parameters=_param_count(weights, config["quantization"]),
        context_length=config["max_position_embeddings"],
    )
    return info


def _hf_name(gguf_name: str, arch: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem == "rope_freqs":
        return None  # folded into the config's rope_scaling
    names = _GEMMA3_NAMES if arch == "gemma3" else _LAYER_NAMES
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise UnsupportedModel(
        f"unexpected tensor '{gguf_name}' in the GGUF file",
        f"edgeai imports {', '.join(SUPPORTED_ARCHS)} models as llama.cpp writes them",
    )


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Float parameter shapes of the mlx-lm model the config describes (built lazily: no memory)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _fix_layout(value, gguf_name: str, arch: str, config: dict):
    kind = gguf_name.split(".")[-2]
    # llama.cpp stores Q/K rows permuted for interleaved RoPE; undo it so the model uses
    # the Hugging Face layout (and adapters trained on HF weights line up).
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if kind == "attn_q" else config["num_key_value_heads"]
        if isinstance(value, gguf_quants.Quantized):
            for f in ("weight", "scales", "biases"):
                setattr(value, f, _unpermute(getattr(value, f), heads))
        else:
            value = _unpermute(value, heads)
    # llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w; mlx-lm adds the 1 itself.
    if arch == "gemma3" and kind.endswith("norm") and not isinstance(value, gguf_quants.Quantized):
        value = value.astype(np.float32) - 1.0
    # The embedding's dtype sets the activations' dtype. Gemma's activations outgrow float16
    # (on Gemma 3 270M, float16 moves the next-token distribution by a mean KL of 0.38 nats
    # vs float32's 7e-5), so its embedding keeps float32 scales: activations run in float32.
    if arch == "gemma3" and gguf_name == "token_embd.weight":
        if isinstance(value, gguf_quants.Quantized):
            value.scales = value.scales.astype(np.float32)
            value.biases = value.biases.astype(np.float32)
        else:
            value = value.astype(np.float32)
    return value


def _put(weights: dict[str, mx.array], name: str, value, bf16: bool) -> None:
    stem = name[: -len(".weight")] if name.endswith(".weight") else None
    if isinstance(value, gguf_quants.Quantized):
        weights[name] = mx.array(value.weight)
        weights[f"{stem}.scales"] = mx.array(value.scales)
        weights[f"{stem}.biases"] = mx.array(value.biases)
    else:
        arr = mx.array(np.ascontiguousarray(value))
        weights[name] = arr.astype(mx.bfloat16) if bf16 else arr


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _config(gf: GGUFFile, arch: str, file_name: str) -> dict[str, Any]:
    meta = gf.fields
    tensors = {t.name: t for t in gf.tensors}

    def g(key, default=None, required=False):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise InvalidInput(
                f"{file_name} lacks the metadata key '{arch}.{key}'",
                "the file is incomplete or was not written by llama.cpp's converter",
            )
        return v

    n_heads = int(g("attention.head_count", required=True))
    hidden = int(g("embedding_length", required=True))
    if "tokenizer.ggml.tokens" not in meta:
        raise InvalidInput(f"{file_name} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count", required=True)),
        "intermediate_size": int(g("feed_forward_length", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    head_dim = g("attention.key_length")
    if arch == "gemma3":
        head_dim = int(head_dim or 256)
        config["head_dim"] = head_dim
        # llama.cpp's gemma3: local layers use RoPE base 10000 and 5 of every 6 layers slide;
        # the 27B (62 layers) scales queries by hidden/heads, the others by head_dim.
        config["rope_local_base_freq"] = 10000.0
        config["sliding_window"] = int(g("attention.sliding_window", 512))
        pattern = g("attention.sliding_window_pattern", 6)
        config["sliding_window_pattern"] = int(pattern) if np.ndim(pattern) == 0 else 6
        n_layers = config["num_hidden_layers"]
        config["query_pre_attn_scalar"] = hidden // n_heads if n_layers == 62 else head_dim
        if g("rope.scaling.type") == "linear" and g("rope.scaling.factor"):
            factor = float(g("rope.scaling.factor"))
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        return config
    if head_dim and int(head_dim) != hidden // n_heads:
        if arch == "qwen2":  # mlx-lm's qwen2 has no head_dim setting: the model would not load
            raise UnsupportedModel(
                f"this qwen2 file has attention heads of {int(head_dim)} (not hidden size / "
                f"heads = {hidden // n_heads}); edgeai's qwen2 model cannot run it"
            )
        config["head_dim"] = int(head_dim)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None and freqs.type_name == "F32":
        # Llama 3.x bakes its RoPE scaling into per-dimension divisors; the largest is the factor.
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(gf.raw(freqs).view(np.float32).max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return config


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """Per-layer quantization settings: GGUF files mix 4, 5 and 8-bit layers and float ones."""
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
    patterns = _PRE_PATTERNS.get(
        meta.get("tokenizer.ggml.pre", "default"), _PRE_PATTERNS["default"]
    )
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
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            byte_fallback=True,
            fuse_unk=True,
            unk_token=tokens[int(unk)] if unk is not None else None,
        )
    )
    prefix = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prefix, split=False
    )
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
