"""A tiny random-weight llama model with a real byte-level BPE tokenizer, made on the spot.

Small enough to load and generate in well under a second, real enough to go through the
same loading, chat-template, kernel and generation code as a downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's template, tools section included (its default system line shortened).
TOOLS_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}\
{%- else %}{{- 'You are helpful.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions \
to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, \
return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n\
{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}\
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + \
'<|im_end|>\\n' }}\
{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def make_tokenizer(out: Path, template: str = CHAT_TEMPLATE) -> int:
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
    fast.chat_template = template
    fast.save_pretrained(str(out))
    return len(vocab)


def make_tiny_model(
    out: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    quantize: bool = True,
    tie: bool = True,
    layer_quant: dict | None = None,
    arch: str = "llama",
    template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a random llama model directory loadable by mlx_lm.load and edgeai.

    layer_quant: per-layer formats over the 4-bit group-32 default, e.g.
    {"model.layers.0.mlp.down_proj": {"bits": 6}} (mlx-lm's per-layer `quantization` config).
    arch: "llama", or "qwen2" (the same layers with biases on the q, k, v projections).
    template: its chat template, e.g. TOOLS_TEMPLATE for a model that renders tools.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = make_tokenizer(out, template)
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


# A tool with a bounded string and an enum, for the tool-call tests.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
