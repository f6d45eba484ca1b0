"""GGUF files with the variations real models have: an untied output head, Llama 3's
`rope_freqs`, a head size other than hidden / heads, other pre-tokenizers, and a different
tensor type per tensor — written as llama.cpp's converter writes them (tests/ggufmaker.py
writes the plain case).

`make_variant` returns the float32 weights each tensor really holds (dequantized by the
`gguf` package, llama.cpp's own Python library) in the Hugging Face layout, plus the
`rope_freqs` it wrote (under that name), for an independent reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from ggufmaker import _permute
from tinymodel import CHAT_TEMPLATE, SPECIALS

QTypeOf = Callable[[str], T]  # GGUF tensor name -> the type it is stored in


def bpe_vocab(merges: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Specials, the 256 byte-level characters, then one token per merge."""
    from tokenizers import pre_tokenizers

    tokens = list(SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in merges if m.replace(" ", "") not in tokens]
    while len(tokens) % 32:
        tokens.append(f"<|pad{len(tokens)}|>")
    return tokens, merges, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def llama3_rope_factors(
    head_dim: int,
    base: float,
    factor: float = 8.0,
    low: float = 1.0,
    high: float = 4.0,
    old_context: int = 8192,
) -> np.ndarray:
    """The `rope_freqs` llama.cpp's convert_hf_to_gguf.py writes for Llama 3.1-style scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def make_variant(
    path: Path,
    *,
    arch: str = "llama",
    qtype: T | QTypeOf = T.Q8_0,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    layers: int = 1,
    untied: bool = False,
    rope_freqs: bool = False,
    rope_base: float = 10000.0,
    pre: str = "gpt-2",
    tokenizer_model: str = "gpt2",
    merges: list[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny model to `path`; return {hf_name: float32 weights as stored}."""
    rng = np.random.default_rng(seed)
    qtype_of: QTypeOf = qtype if callable(qtype) else (lambda name, t=qtype: t)
    tokens, merges, types = bpe_vocab(
        merges if merges is not None else ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    )
    hd = head_dim or hidden // heads
    vocab, ffn = len(tokens), hidden * 2
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(hd)
    if head_dim is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)

    ref: dict[str, np.ndarray] = {}

    def put(name: str, hf_name: str | None, arr: np.ndarray, permute_heads: int = 0) -> None:
        arr = arr.astype(np.float32)
        stored = _permute(arr, permute_heads) if permute_heads else arr
        t = qtype_of(name) if arr.ndim == 2 else T.F32  # llama.cpp keeps 1-D tensors in F32
        if t == T.F32:
            w.add_tensor(name, stored)
            back = stored
        elif t == T.F16:
            w.add_tensor(name, stored.astype(np.float16))
            back = stored.astype(np.float16).astype(np.float32)
        else:
            data = quants.quantize(stored, t)
            w.add_tensor(name, data, raw_dtype=t)
            back = quants.dequantize(data, t).reshape(arr.shape)
        if permute_heads:  # undo for the HF-layout reference
            back = back.reshape(permute_heads, back.shape[0] // permute_heads // 2, 2, -1).swapaxes(
                1, 2
            )
            back = back.reshape(arr.shape)
        ref[hf_name or name] = back

    def rnd(*shape):
        return rng.normal(0, 0.5, size=shape)

    put("token_embd.weight", "model.embed_tokens.weight", rnd(vocab, hidden))
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rnd(hidden))
    if untied:
        put("output.weight", "lm_head.weight", rnd(vocab, hidden))
    if rope_freqs:
        put("rope_freqs.weight", "rope_freqs", llama3_rope_factors(hd, rope_base))
    permute = arch == "llama"
    for i in range(layers):
        p, b = f"blk.{i}", f"model.layers.{i}"
        put(
            f"{p}.attn_q.weight",
            f"{b}.self_attn.q_proj.weight",
            rnd(heads * hd, hidden),
            heads if permute else 0,
        )
        put(
            f"{p}.attn_k.weight",
            f"{b}.self_attn.k_proj.weight",
            rnd(kv_heads * hd, hidden),
            kv_heads if permute else 0,
        )
        put(f"{p}.attn_v.weight", f"{b}.self_attn.v_proj.weight", rnd(kv_heads * hd, hidden))
        put(f"{p}.attn_output.weight", f"{b}.self_attn.o_proj.weight", rnd(hidden, heads * hd))
        if arch == "qwen2":
            put(f"{p}.attn_q.bias", f"{b}.self_attn.q_proj.bias", rnd(heads * hd))
            put(f"{p}.attn_k.bias", f"{b}.self_attn.k_proj.bias", rnd(kv_heads * hd))
            put(f"{p}.attn_v.bias", f"{b}.self_attn.v_proj.bias", rnd(kv_heads * hd))
        put(f"{p}.ffn_gate.weight", f"{b}.mlp.gate_proj.weight", rnd(ffn, hidden))
        put(f"{p}.ffn_up.weight", f"{b}.mlp.up_proj.weight", rnd(ffn, hidden))
        put(f"{p}.ffn_down.weight", f"{b}.mlp.down_proj.weight", rnd(hidden, ffn))
        put(f"{p}.attn_norm.weight", f"{b}.input_layernorm.weight", 1 + 0.1 * rnd(hidden))
        put(f"{p}.ffn_norm.weight", f"{b}.post_attention_layernorm.weight", 1 + 0.1 * rnd(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref
