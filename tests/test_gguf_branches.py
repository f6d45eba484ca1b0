"""GGUF import, branch by branch: each tensor type gives exactly the file's numbers, and each
variation real files have (untied head, Llama 3 rope_freqs, head size, pre-tokenizer, mixed
types) or that edgeai refuses (architecture, tokenizer) — against an independent reference."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from ggufvariants import make_variant

from edgeai.errors import UnsupportedModel
from edgeai.store.gguf import convert

TEXT = "the cat sat in the hat"


def imported(src, out) -> tuple[dict, dict[str, np.ndarray]]:
    """Convert `src`; return its config and its float32 weights (quantized ones dequantized)."""
    convert(src, out)
    config = json.loads((out / "config.json").read_text())
    raw = mx.load(str(out / "model.safetensors"))
    weights = {}
    for key, w in raw.items():
        layer, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases") and raw.get(f"{layer}.weight", w).dtype == mx.uint32:
            continue  # part of a quantized weight, dequantized with it
        if w.dtype == mx.uint32:
            q = config["quantization"][layer]
            # float32 scales: MLX dequantizes in float16 when the scales are, which rounds
            s, b = (raw[f"{layer}.{part}"].astype(mx.float32) for part in ("scales", "biases"))
            w = mx.dequantize(w, s, b, q["group_size"], q["bits"])
        weights[key] = np.array(w.astype(mx.float32))
    return config, weights


def reference_logits(ref: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """Logits of mlx-lm's own float32 model holding the file's numbers (HF layout)."""
    from mlx_lm.models import llama, qwen2

    module = {"llama": llama, "qwen2": qwen2}[config["model_type"]]
    model = module.Model(
        module.ModelArgs.from_dict({k: v for k, v in config.items() if k != "quantization"})
    )
    model.load_weights([(k, mx.array(v)) for k, v in ref.items() if k != "rope_freqs"], strict=True)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def logits(out) -> tuple[np.ndarray, list[int], object]:
    from mlx_lm.utils import load

    model, tok = load(str(out))
    ids = tok.encode(TEXT)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32)), ids, model


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_weights(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    for name, want in ref.items():
        if name != "rope_freqs":
            assert np.array_equal(got[name], want), name
    assert set(got) == set(ref) - {"rope_freqs"}


# Weights are bit for bit the file's. Logits then differ from mlx-lm's float32 model only by
# how they are computed: float tensors the same way (0 measured); quantized ones through MLX's
# quantized matmul, which dequantizes with the float16 scales in float16 (2e-3 to 3.5e-3).
TYPE_BOUNDS = {T.F32: 1e-6, T.F16: 1e-6, T.Q8_0: 5e-3, T.Q4_0: 5e-3, T.Q4_1: 5e-3}


@pytest.mark.parametrize("qtype", list(TYPE_BOUNDS), ids=lambda t: t.name)
def test_each_type_imports_exactly_the_files_numbers(tmp_path, qtype):
    ref = make_variant(tmp_path / "m.gguf", qtype=qtype)
    config, got = imported(tmp_path / "m.gguf", tmp_path / "out")
    assert_same_weights(got, ref)
    layer = config["quantization"]["model.layers.0.mlp.up_proj"]
    assert (
        layer is False
        if qtype in (T.F32, T.F16)
        else layer == {"group_size": 32, "bits": 8 if qtype == T.Q8_0 else 4}
    )
    got_logits, ids, _ = logits(tmp_path / "out")
    assert rel(got_logits, reference_logits(ref, config, ids)) < TYPE_BOUNDS[qtype]


def test_untied_output_weight_is_the_lm_head(tmp_path):
    ref = make_variant(tmp_path / "m.gguf", untied=True)
    config, got = imported(tmp_path / "m.gguf", tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    assert_same_weights(got, ref)  # lm_head.weight among them, not the embedding again
    got_logits, ids, _ = logits(tmp_path / "out")
    assert rel(got_logits, reference_logits(ref, config, ids)) < TYPE_BOUNDS[T.Q8_0]
    tied = {
        k: v for k, v in ref.items() if k != "lm_head.weight"
    }  # what a tied import would compute
    assert (
        rel(got_logits, reference_logits(tied, {**config, "tie_word_embeddings": True}, ids)) > 0.5
    )


def test_llama3_rope_freqs_become_llama3_rope_scaling(tmp_path):
    base, hd = 500000.0, 64
    ref = make_variant(tmp_path / "m.gguf", rope_freqs=True, rope_base=base, hidden=256)
    factors = ref["rope_freqs"]
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    config, got = imported(tmp_path / "m.gguf", tmp_path / "out")
    assert (
        config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8.0
    )
    assert "rope_freqs.weight" not in got
    _, _, model = logits(tmp_path / "out")
    rope = model.model.layers[0].self_attn.rope
    # mlx-lm's per-dimension periods are base^(2i/d) times exactly the file's divisors
    plain = base ** (np.arange(0, hd, 2) / hd)
    assert np.allclose(np.array(rope._freqs) / plain, factors, rtol=1e-5)


def test_head_dim_other_than_hidden_over_heads(tmp_path):
    ref = make_variant(tmp_path / "m.gguf", hidden=64, heads=4, head_dim=32)  # 4 x 32 != 64
    config, got = imported(tmp_path / "m.gguf", tmp_path / "out")
    assert config["head_dim"] == 32
    assert got["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert_same_weights(got, ref)
    got_logits, ids, _ = logits(tmp_path / "out")
    assert rel(got_logits, reference_logits(ref, config, ids)) < TYPE_BOUNDS[T.Q8_0]


def test_qwen2_with_another_head_dim_is_refused_at_import(tmp_path):
    make_variant(tmp_path / "m.gguf", arch="qwen2", hidden=64, heads=4, head_dim=32)
    with pytest.raises(
        UnsupportedModel, match="heads of 32"
    ):  # not a model that fails to load later
        convert(tmp_path / "m.gguf", tmp_path / "out")


# Merges chosen so the three split rules give three different token sequences:
# gpt-2 keeps a digit run whole ("1234" -> 12|34) and splits "." from letters; llama 3 splits
# digits in threes ("123", "4") and lets one punctuation mark lead a word (".hi");
# qwen2 splits every digit on its own.
MERGES = ["3 4", "1 2", "12 3", ". h"]
SPLITS = {
    "gpt-2": (["12", "34"], [".", "h", "i"]),
    "llama-bpe": (["123", "4"], [".h", "i"]),
    "qwen2": (["1", "2", "3", "4"], [".h", "i"]),
}


@pytest.mark.parametrize("pre", list(SPLITS))
def test_pre_tokenizer_regexes(tmp_path, pre):
    from transformers import PreTrainedTokenizerFast

    make_variant(tmp_path / "m.gguf", pre=pre, merges=MERGES)
    convert(tmp_path / "m.gguf", tmp_path / "out")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    digits, dotted = SPLITS[pre]
    assert tok.convert_ids_to_tokens(tok.encode("1234")) == digits
    assert tok.convert_ids_to_tokens(tok.encode(".hi")) == dotted
    for text in ("1234 .hi", "It'S 2024!\nnew line"):
        assert tok.decode(tok.encode(text)) == text


def test_unknown_architecture_is_refused(tmp_path):
    make_variant(tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(UnsupportedModel, match="'falcon' model; edgeai imports llama, qwen2"):
        convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_tokenizer_is_refused(tmp_path):
    make_variant(tmp_path / "m.gguf", tokenizer_model="bert")
    with pytest.raises(UnsupportedModel, match="'bert' tokenizer"):
        convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_file_mixing_types(tmp_path):
    """As llama.cpp's Q4 files are: Q4 layers, a Q8 or Q6 head, float16 / float32 elsewhere."""
    kinds = {
        "token_embd": T.Q4_1,
        "output": T.Q8_0,
        "attn_q": T.Q4_0,
        "attn_k": T.Q4_0,
        "attn_v": T.Q8_0,
        "attn_output": T.F16,
        "ffn_gate": T.Q4_1,
        "ffn_up": T.Q4_0,
        "ffn_down": T.F32,
    }

    def qtype_of(name: str) -> T:
        return kinds[name.split(".")[-2]]

    ref = make_variant(tmp_path / "m.gguf", qtype=qtype_of, untied=True, layers=2)
    config, got = imported(tmp_path / "m.gguf", tmp_path / "out")
    q = config["quantization"]
    assert q["model.embed_tokens"]["bits"] == 4 and q["lm_head"]["bits"] == 8
    assert (
        q["model.layers.1.self_attn.v_proj"]["bits"] == 8
        and q["model.layers.1.self_attn.q_proj"]["bits"] == 4
    )
    assert (
        q["model.layers.0.self_attn.o_proj"] is False and q["model.layers.0.mlp.down_proj"] is False
    )
    assert_same_weights(got, ref)
    got_logits, ids, _ = logits(tmp_path / "out")
    assert rel(got_logits, reference_logits(ref, config, ids)) < TYPE_BOUNDS[T.Q8_0]
