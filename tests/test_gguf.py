"""GGUF import: synthetic files of every supported type, and the real SmolLM2-135M."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgeai.errors import InvalidInput, UnsupportedModel
from edgeai.store.gguf import convert
from ggufmaker import make_gguf, make_q4k_gguf


def _reference_logits(ref: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """Logits of an mlx-lm model built from float weights in the Hugging Face layout."""
    from mlx_lm.models import llama, qwen2

    module = {"llama": llama, "qwen2": qwen2}[config["model_type"]]
    cfg = {k: v for k, v in config.items() if k != "quantization"}
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in ref.items()], strict=True)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.F16, T.F32])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_imported_model_computes_what_the_file_holds(tmp_path, qtype, arch):
    from mlx_lm.utils import load

    src = tmp_path / "m.gguf"
    ref = make_gguf(src, arch=arch, qtype=qtype)
    info = convert(src, tmp_path / "out")
    assert info["architecture"] == arch
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    model, tok = load(str(tmp_path / "out"))
    ids = tok.encode("the cat sat in the hat")
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    want = _reference_logits(ref, config, ids)
    # Same weights: float ones compute exactly as the reference (0 measured); quantized ones
    # differ by MLX dequantizing with float16 scales in float16 (test_gguf_branches: weights exact).
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < (1e-6 if qtype in (T.F32, T.F16) else 1e-2), rel


def test_sentencepiece_tokenizer_merges_and_byte_fallback(tmp_path):
    from mlx_lm.utils import load

    from ggufmaker import _spm_vocab

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


def test_q4k_is_refused_naming_supported_types(tmp_path):
    src = tmp_path / "k.gguf"
    make_q4k_gguf(src)
    with pytest.raises(UnsupportedModel) as e:
        convert(src, tmp_path / "out")
    assert "Q4_K" in str(e.value) and "Q4_0" in str(e.value)
    assert not (tmp_path / "out").exists()


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
    assert tok.encode("<|im_start|>user") [0] == tokens.index("<|im_start|>")
    rng = random.Random(0)
    sample = rng.sample(range(17, len(tokens)), 2000)
    same = sum(tok.encode(tok.decode([i])) == [i] for i in sample)
    assert same / len(sample) > 0.97
    for text in ["Hello, world!", "  indented\n\tcode = f(x) ** 2  # done", "Ünïcödé ✓ 日本語 🙂", "12345 + 678 = 13023"]:
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
