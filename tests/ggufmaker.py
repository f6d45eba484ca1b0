"""Write small GGUF files the way llama.cpp's converter does, with known weights.

Returns the float weights each quantized tensor really holds (dequantized by the `gguf`
package, llama.cpp's own Python library), in the Hugging Face layout, so a test can build a
reference model and compare it with what edgeai's importer produced. The `gguf` package
cannot quantize to K-quants, so those tensors are random valid blocks (random codes and
sub-block scales under float16 super-block scales sized for weights of about ±0.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as T
from tinymodel import CHAT_TEMPLATE, SPECIALS


def _vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers import pre_tokenizers

    tokens = list(SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    tokens += [m.replace(" ", "") for m in merges]
    while len(tokens) % 32:
        tokens.append(f"<|pad{len(tokens)}|>")
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, merges, types


SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "▁h",
    "el",
    "ll",
    "▁he",
    "llo",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "▁the",
]


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: specials, 256 byte pieces, then pieces scored so longer merge first."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-100.0 + len(p) * 10 for p in SPM_PIECES]
    while len(tokens) % 32:
        tokens.append(f"<pad{len(tokens)}>")
        types.append(4)
        scores.append(0.0)
    return tokens, scores, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row permutation of Q/K for interleaved RoPE."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


# K-quant block: byte offsets of its float16 fields, and d (then dmin) for |w| around 0.5.
_K_FIELDS = {
    T.Q4_K: ((0, 1 / 465), (2, 7.5 / 465)),
    T.Q5_K: ((0, 1 / 960), (2, 15.5 / 960)),
    T.Q6_K: ((208, 1 / 1024),),
}


def random_k_blocks(
    qtype: T, rows: int, cols: int, rng: np.random.Generator, size: float = 0.5
) -> np.ndarray:
    """Random valid K-quant data (rows, bytes per row), weights of about ±`size`."""
    _, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // 256, nbytes), dtype=np.uint8)
    for off, mean in _K_FIELDS[qtype]:
        d = (2 * size * mean * rng.uniform(0.5, 1.5, (raw.shape[0], 1))).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8)
    return raw.reshape(rows, -1)


TensorTypes = T | Mapping[str, T]


def make_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: TensorTypes = T.Q4_0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    spm: bool = False,
    tied: bool = True,
    ffn: int | None = None,
    skip: tuple[str, ...] = (),
    meta: Mapping[str, Any] | None = None,
    raw_out: dict | None = None,
    extra_tensor: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny model to `path`; return {hf_name: float32 weights as stored}.

    `qtype` is one type for every matrix, or {GGUF tensor kind: type} ("token_embd",
    "output", "attn_q", ..., "ffn_down"; missing kinds are F32). `tied=False` adds an output
    matrix. `skip` leaves out metadata keys; `meta` adds or overrides ones, `extra_tensor`
    adds a tensor of that name (for bad files). `raw_out` receives {hf_name: (type, data as
    stored, heads its rows were permuted over or 0)}.
    """
    rng = np.random.default_rng(seed)
    if spm or arch == "gemma3":
        tokens, scores, types = _spm_vocab()
    else:
        tokens, merges, types = _vocab()
    vocab, head_dim = len(tokens), hidden // heads
    ffn = ffn or hidden * 2
    w = GGUFWriter(str(path), arch)
    kv = {
        "general.name": f"tiny-{arch}",
        f"{arch}.block_count": layers,
        f"{arch}.context_length": 512,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
    }
    if arch == "gemma3":
        kv.update(
            {
                f"{arch}.attention.key_length": head_dim,
                f"{arch}.attention.value_length": head_dim,
                f"{arch}.attention.sliding_window": 4,
                f"{arch}.rope.freq_base": 1e6,
            }
        )
    kv.update(meta or {})
    for key, value in kv.items():
        if key in skip:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm or arch == "gemma3":
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        if arch == "gemma3":
            w.add_add_space_prefix(False)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)

    ref: dict[str, np.ndarray] = {}

    def put(
        gguf_name: str, hf_name: str, arr: np.ndarray, permute_heads: int = 0, norm: bool = False
    ):
        kind = gguf_name.split(".")[-2]
        qt = (
            (qtype.get(kind, T.F32) if isinstance(qtype, Mapping) else qtype)
            if arr.ndim == 2
            else T.F32
        )
        arr = arr.astype(np.float32)
        if norm and arch == "gemma3":
            arr = arr - 1  # HF Gemma RMSNorm weights are offsets from 1; llama.cpp stores 1 + w
        stored = _permute(arr, permute_heads) if permute_heads else arr
        if norm and arch == "gemma3":
            stored = stored + 1
        if qt in _K_FIELDS:
            data = random_k_blocks(qt, *arr.shape, rng, sigma)
            w.add_tensor(gguf_name, data, raw_dtype=qt)
            back = quants.dequantize(data, qt).reshape(arr.shape)
        elif qt in (T.F32, T.F16):
            data = stored.astype(np.float16 if qt == T.F16 else np.float32)
            w.add_tensor(gguf_name, data)
            back = data.astype(np.float32)
        else:
            data = quants.quantize(stored, qt)
            w.add_tensor(gguf_name, data, raw_dtype=qt)
            back = quants.dequantize(data, qt).reshape(arr.shape)
        if norm and arch == "gemma3":
            back = back - 1
        if raw_out is not None:
            raw_out[hf_name] = (qt, data, permute_heads)
        ref[hf_name] = unpermute(back, permute_heads) if permute_heads else back

    sigma = 0.5 * (64 / hidden) ** 0.5  # wider models get smaller weights: sane activations

    def rnd(*shape):
        return rng.normal(0, sigma, size=shape)

    put("token_embd.weight", "model.embed_tokens.weight", rnd(vocab, hidden))
    if not tied:
        put("output.weight", "lm_head.weight", rnd(vocab, hidden))
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rnd(hidden), norm=True)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p, b = f"blk.{i}", f"model.layers.{i}"
        permute = arch == "llama"
        put(
            f"{p}.attn_q.weight",
            f"{b}.self_attn.q_proj.weight",
            rnd(q_rows, hidden),
            heads if permute else 0,
        )
        put(
            f"{p}.attn_k.weight",
            f"{b}.self_attn.k_proj.weight",
            rnd(kv_rows, hidden),
            kv_heads if permute else 0,
        )
        put(f"{p}.attn_v.weight", f"{b}.self_attn.v_proj.weight", rnd(kv_rows, hidden))
        put(f"{p}.attn_output.weight", f"{b}.self_attn.o_proj.weight", rnd(hidden, q_rows))
        if arch == "qwen2":
            put(f"{p}.attn_q.bias", f"{b}.self_attn.q_proj.bias", rnd(q_rows))
            put(f"{p}.attn_k.bias", f"{b}.self_attn.k_proj.bias", rnd(kv_rows))
            put(f"{p}.attn_v.bias", f"{b}.self_attn.v_proj.bias", rnd(kv_rows))
        put(f"{p}.ffn_gate.weight", f"{b}.mlp.gate_proj.weight", rnd(ffn, hidden))
        put(f"{p}.ffn_up.weight", f"{b}.mlp.up_proj.weight", rnd(ffn, hidden))
        put(f"{p}.ffn_down.weight", f"{b}.mlp.down_proj.weight", rnd(hidden, ffn))
        put(
            f"{p}.attn_norm.weight", f"{b}.input_layernorm.weight", 1 + 0.1 * rnd(hidden), norm=True
        )
        if arch == "gemma3":
            put(
                f"{p}.attn_q_norm.weight",
                f"{b}.self_attn.q_norm.weight",
                1 + 0.1 * rnd(head_dim),
                norm=True,
            )
            put(
                f"{p}.attn_k_norm.weight",
                f"{b}.self_attn.k_norm.weight",
                1 + 0.1 * rnd(head_dim),
                norm=True,
            )
            put(
                f"{p}.post_attention_norm.weight",
                f"{b}.post_attention_layernorm.weight",
                1 + 0.1 * rnd(hidden),
                norm=True,
            )
            put(
                f"{p}.ffn_norm.weight",
                f"{b}.pre_feedforward_layernorm.weight",
                1 + 0.1 * rnd(hidden),
                norm=True,
            )
            put(
                f"{p}.post_ffw_norm.weight",
                f"{b}.post_feedforward_layernorm.weight",
                1 + 0.1 * rnd(hidden),
                norm=True,
            )
        else:
            put(
                f"{p}.ffn_norm.weight",
                f"{b}.post_attention_layernorm.weight",
                1 + 0.1 * rnd(hidden),
            )
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def set_tensor_offset(path: Path, name: str, offset: int) -> None:
    """Rewrite tensor `name`'s data offset (relative to the data section) in the header."""
    data = bytearray(Path(path).read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims + 4
    data[at : at + 8] = offset.to_bytes(8, "little")
    Path(path).write_bytes(bytes(data))


def tensor_offset(path: Path, name: str) -> int:
    data = Path(path).read_bytes()
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims + 4
    return int.from_bytes(data[at : at + 8], "little")


def make_refused_gguf(path: Path, qtype: T = T.Q2_K) -> None:
    """A GGUF holding one tensor of a type edgeai does not import (random blocks)."""
    tokens, merges, types = _vocab()
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((8, size), dtype=np.uint8)  # 8 rows × one 256-wide block
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
