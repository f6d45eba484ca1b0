"""A tiny random-weight llama model with a real byte-level BPE tokenizer, made on the spot.

Small enough to load and generate in well under a second, real enough to go through the
same loading, chat-template, kernel and generation code as a downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path) -> int:
    """Write tokenizer.json/tokenizer_config.json; return the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    while len(vocab) % 8:
        vocab[f"<|pad{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(vocab)


def make_tiny_model(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    quantize: bool = True, tie: bool = True, layer_quant: dict | None = None,
                    arch: str = "llama") -> Path:
    """Write a random llama model directory loadable by mlx_lm.load and edgeai.

    layer_quant: per-layer formats over the 4-bit group-32 default, e.g.
    {"model.layers.0.mlp.down_proj": {"bits": 6}} (mlx-lm's per-layer `quantization` config).
    arch: "llama", or "qwen2" (the same layers with biases on the q, k, v projections).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = make_tokenizer(out)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
    }
    mx.random.seed(seed)
    arch_module = {"llama": llama, "qwen2": qwen2}[arch]
    model = arch_module.Model(arch_module.ModelArgs.from_dict(config))
    # Larger-than-default init so the random model's distribution is not flat.
    model.update(
        __import__("mlx.utils", fromlist=["tree_map"]).tree_map(
            lambda p: mx.random.normal(p.shape) * 0.5 if p.ndim > 1 else p, model.parameters()
        )
    )
    if quantize:
        default = {"group_size": 32, "bits": 4, "mode": "affine"}
        config["quantization"] = dict(default)

        def predicate(path: str, m) -> bool | dict:
            if path in (layer_quant or {}):
                config["quantization"][path] = {**default, **layer_quant[path]}
                return config["quantization"][path]
            return hasattr(m, "to_quantized")

        nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
