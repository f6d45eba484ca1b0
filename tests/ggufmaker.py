"""Write small GGUF files the way llama.cpp's converter does, with known weights.

Returns the float weights each quantized tensor really holds (dequantized by the `gguf`
package, llama.cpp's own Python library), in the Hugging Face layout, so a test can build a
reference model and compare it with what edgeai's importer produced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants

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


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "ll", "▁he", "llo", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world", "▁the"]


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
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(path: Path, *, arch: str = "llama", qtype: T = T.Q4_0, hidden: int = 64,
              layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
              spm: bool = False) -> dict[str, np.ndarray]:
    """Write a tiny model to `path`; return {hf_name: float32 weights as stored}."""
    rng = np.random.default_rng(seed)
    if spm:
        tokens, scores, types = _spm_vocab()
    else:
        tokens, merges, types = _vocab()
    vocab, ffn, head_dim = len(tokens), hidden * 2, hidden // heads
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)

    ref: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, arr: np.ndarray, quantize: bool, permute_heads: int = 0):
        arr = arr.astype(np.float32)
        stored = _permute(arr, permute_heads) if permute_heads else arr
        if quantize and qtype not in (T.F32, T.F16):
            data = quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
            back = quants.dequantize(data, qtype).reshape(arr.shape)
        elif quantize and qtype == T.F16:
            data = stored.astype(np.float16)
            w.add_tensor(gguf_name, data)
            back = data.astype(np.float32)
        else:
            w.add_tensor(gguf_name, stored)
            back = stored
        if permute_heads:  # undo for the HF-layout reference
            back = back.reshape(permute_heads, back.shape[0] // permute_heads // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
        ref[hf_name] = back

    def rnd(*shape):
        return rng.normal(0, 0.5, size=shape)

    put("token_embd.weight", "model.embed_tokens.weight", rnd(vocab, hidden), True)
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rnd(hidden), False)
    for i in range(layers):
        p, b = f"blk.{i}", f"model.layers.{i}"
        permute = arch == "llama"
        put(f"{p}.attn_q.weight", f"{b}.self_attn.q_proj.weight", rnd(hidden, hidden), True, heads if permute else 0)
        put(f"{p}.attn_k.weight", f"{b}.self_attn.k_proj.weight", rnd(kv_heads * head_dim, hidden), True, kv_heads if permute else 0)
        put(f"{p}.attn_v.weight", f"{b}.self_attn.v_proj.weight", rnd(kv_heads * head_dim, hidden), True)
        put(f"{p}.attn_output.weight", f"{b}.self_attn.o_proj.weight", rnd(hidden, hidden), True)
        if arch == "qwen2":
            put(f"{p}.attn_q.bias", f"{b}.self_attn.q_proj.bias", rnd(hidden), False)
            put(f"{p}.attn_k.bias", f"{b}.self_attn.k_proj.bias", rnd(kv_heads * head_dim), False)
            put(f"{p}.attn_v.bias", f"{b}.self_attn.v_proj.bias", rnd(kv_heads * head_dim), False)
        put(f"{p}.ffn_gate.weight", f"{b}.mlp.gate_proj.weight", rnd(ffn, hidden), True)
        put(f"{p}.ffn_up.weight", f"{b}.mlp.up_proj.weight", rnd(ffn, hidden), True)
        put(f"{p}.ffn_down.weight", f"{b}.mlp.down_proj.weight", rnd(hidden, ffn), True)
        put(f"{p}.attn_norm.weight", f"{b}.input_layernorm.weight", 1 + 0.1 * rnd(hidden), False)
        put(f"{p}.ffn_norm.weight", f"{b}.post_attention_layernorm.weight", 1 + 0.1 * rnd(hidden), False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def make_q4k_gguf(path: Path) -> None:
    """A GGUF holding one Q4_K tensor (a type edgeai does not import)."""
    tokens, merges, types = _vocab()
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    raw = np.zeros((8, 144), dtype=np.uint8)  # 8 rows × one 256-wide Q4_K block (144 bytes)
    w.add_tensor("token_embd.weight", raw, raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
