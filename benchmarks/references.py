"""Float references for benchmarks/agreement.py that share no code with edgeai.

- `hf_logits`: Hugging Face transformers on the GGUF (its own GGUF reader and config mapping,
  weights dequantized to float32 by the gguf package), all positions in one pass. An
  independent reading of the architecture: when edgeai and llama.cpp disagree, it says which
  one left the model. Needs `pip install "edgeai[bench-hf]"` (torch, transformers, accelerate;
  a CPU-only torch build is enough).
- `float_gguf`: a copy of the GGUF with every tensor dequantized to F32, so llama.cpp can run
  its own graph without its quantized matmuls (which round activations to 8 bits first).

Known gap: GGUF has no key for Gemma 3's query_pre_attn_scalar, so transformers' loader keeps
its default, 256. That is right for Gemma 3 files whose head_dim is 256 (270M to 12B), not
for the 27B.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def hf_logits(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    """(positions, vocab) float32 logits of transformers' model of `gguf`, fed `ids`."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"--reference hf needs {e.name}: pip install 'edgeai[bench-hf]'")
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if hasattr(gguf_utils, "tqdm"):  # its own per-tensor progress bar, on stderr
        gguf_utils.tqdm = lambda tensors, **_: tensors
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def float_gguf(src: Path, dst: Path) -> Path:
    """Write `src` to `dst` with every tensor dequantized to F32 (same metadata); 4 B/weight."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

    r = GGUFReader(src)
    w = GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer writes the header and architecture itself
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    w.add_file_type(LlamaFileType.ALL_F32)
    for t in r.tensors:
        w.add_tensor(t.name, quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
