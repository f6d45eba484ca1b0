"""Affine-quantized matmul for Apple GPUs through `mx.fast.metal_kernel` (kernels/metal).

Never run by its authors: it was written on Linux, where Metal is unavailable.
`edgeai.kernels` uses it only after it matches the float32 reference on the machine.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

_SOURCE = Path(__file__).resolve().parent / "qmv_affine.metal"


def _source() -> str:
    if not _SOURCE.exists():
        raise RuntimeError(f"Metal kernel source not found at {_SOURCE}")
    return _SOURCE.read_text()


SOURCE_ID = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12] if _SOURCE.exists() else "missing"


@lru_cache(maxsize=1)
def _kernel():
    if not mx.metal.is_available():
        raise RuntimeError("no Metal device")
    return mx.fast.metal_kernel(
        name="edgeai_qmv_affine",
        input_names=["x", "w", "scales", "biases"],
        output_names=["y"],
        source=_source(),
    )


def supports(bits: int, group_size: int, in_dims: int, mode: str = "affine") -> bool:
    return (
        mode == "affine"
        and bits in (4, 8)
        and group_size in (32, 64, 128)
        and in_dims % group_size == 0
    )


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """y = x @ dequantize(w).T on the GPU; output has x's dtype."""
    k = x.shape[-1]
    n = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    (y,) = _kernel()(
        inputs=[x2, w, scales, biases],
        template=[("BITS", bits), ("GS", group_size), ("K", k), ("N", n)],
        grid=(32 * n, m, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[mx.float32],
    )
    return y.astype(x.dtype).reshape(*lead, n)


class MetalQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul is edgeai's Metal kernel."""

    def __init__(self, layer: nn.QuantizedLinear):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, "affine"
        self.weight, self.scales, self.biases = layer.weight, layer.scales, layer.biases
        if "bias" in layer:
            self.bias = layer.bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits
        )
        return y + self["bias"] if "bias" in self else y


class MetalQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied LM head runs edgeai's Metal kernel."""

    def __init__(self, layer: nn.QuantizedEmbedding):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, "affine"
        self.weight, self.scales, self.biases = layer.weight, layer.scales, layer.biases
        self.num_embeddings, self.dims = layer.num_embeddings, layer.dims
        self.freeze()

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits
        )


def wrap(m: nn.Module) -> nn.Module:
    return (
        MetalQuantizedEmbedding(m)
        if isinstance(m, nn.QuantizedEmbedding)
        else MetalQuantizedLinear(m)
    )
