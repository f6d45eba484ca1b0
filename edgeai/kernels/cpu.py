"""The C++ CPU kernel (kernels/cpu): loading the extension and the layers that use it.

`CpuQuantizedLinear` / `CpuQuantizedEmbedding` are drop-in subclasses of MLX's quantized
layers (same parameter names, so LoRA wrappers and isinstance checks keep working) whose
matmul is edgeai's multi-threaded SIMD kernel. Scales and biases are held in float32
(converted once at load): float16 arithmetic is emulated in software on x86 CPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache, lru_cache
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn


class KernelUnavailable(RuntimeError):
    """The extension is missing, failed to load, or does not match mlx.core's ABI."""


@lru_cache(maxsize=1)
def extension() -> ModuleType:
    """Import the compiled extension and probe that mx.array crosses the binding.

    Raises:
        KernelUnavailable: with a one-line reason.
    """
    try:
        from edgeai import _edgeai_kernels as ext  # built by setup.py from kernels/cpu
    except ImportError as e:
        raise KernelUnavailable(
            f"C++ kernels not built ({e}); reinstall with a compiler and CMake"
        ) from e
    try:  # an ABI mismatch surfaces as "incompatible function arguments" on every mx.array
        w, s, b = mx.quantize(mx.ones((8, 32)), 32, 4)
        y = ext.quantized_matmul(mx.ones((1, 32)), w, s, b, 32, 4)
        mx.eval(y)
    except TypeError as e:
        raise KernelUnavailable(
            f"C++ kernels do not match this mlx ({mx.__version__}): rebuild them"
        ) from e
    except Exception as e:  # noqa: BLE001 - any probe failure means "do not use it"
        raise KernelUnavailable(f"C++ kernels failed their load probe: {e}") from e
    return ext


BITS = (4, 5, 6, 8)  # MLX affine bit widths the kernel unpacks (2 and 3 keep MLX's kernel)


def supports(bits: int, group_size: int, in_dims: int, mode: str = "affine") -> bool:
    """Whether the kernel handles this layer (others keep MLX's kernel)."""
    return (
        mode == "affine"
        and bits in BITS
        and group_size in (32, 64, 128)
        and in_dims % group_size == 0
    )


# Set while a graph is built that must not use the int8 (fast) path: see full_precision.
_FULL_PRECISION: ContextVar[bool] = ContextVar("edgeai_full_precision", default=False)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Build graphs with float32 activations even where the layers are in fast mode.

    The engine (and the server's prompt batches, server.batching) builds the step of a
    prompt's first generated token under it: one row per prompt, so the fidelity costs about
    one step, and that step's own activations stay float32 (with int8 activations
    throughout, SmolLM2 opens "What is the capital of France?" with "L'", as llama.cpp does,
    where float32 says "The", 0.09 nats ahead). The prompt tokens before it fill the KV cache
    in the layers' own precision: in fast mode the int8 GEMM, ~2.3x the float32 GEMM's speed.
    """
    token = _FULL_PRECISION.set(True)
    try:
        yield
    finally:
        _FULL_PRECISION.reset(token)


def scale_dtype(a: mx.array) -> mx.Dtype:
    """The dtype the kernel keeps scales/biases in."""
    return a.dtype if a.dtype in (mx.float16, mx.float32) else mx.float32


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul runs edgeai's CPU kernel."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array,
        biases: mx.array,
        group_size: int,
        bits: int,
        bias: mx.array | None = None,
        fast: bool = False,
    ):
        nn.Module.__init__(self)  # skip QuantizedLinear.__init__: it would quantize random weights
        self.group_size, self.bits, self.mode, self.fast = group_size, bits, "affine", fast
        self.weight = weight
        self.scales = scales.astype(scale_dtype(scales))
        self.biases = biases.astype(scale_dtype(scales))
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self._qmm = extension().quantized_matmul
        self.freeze()

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear, fast: bool = False) -> CpuQuantizedLinear:
        return cls(
            layer.weight,
            layer.scales,
            layer.biases,
            layer.group_size,
            layer.bits,
            layer.get("bias"),
            fast,
        )

    def __call__(self, x: mx.array) -> mx.array:
        fast = self.fast and not _FULL_PRECISION.get()
        w = self["weight"]
        s, b = self["scales"], self["biases"]
        y = self._qmm(x, w, s, b, self.group_size, self.bits, fast, panels_of(self, w))
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (tied LM head) runs edgeai's CPU kernel.

    Lookups return float32 rows, which keeps the whole forward pass in float32.
    """

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array,
        biases: mx.array,
        group_size: int,
        bits: int,
        fast: bool = False,
    ):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode, self.fast = group_size, bits, "affine", fast
        self.weight = weight
        self.scales = scales.astype(scale_dtype(scales))
        self.biases = biases.astype(scale_dtype(scales))
        self.num_embeddings = weight.shape[0]
        self.dims = weight.shape[1] * 32 // bits
        self._qmm = extension().quantized_matmul
        self.freeze()

    @classmethod
    def from_quantized(
        cls, layer: nn.QuantizedEmbedding, fast: bool = False
    ) -> CpuQuantizedEmbedding:
        return cls(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, fast)

    def __call__(self, x: mx.array) -> mx.array:
        rows = mx.dequantize(
            self["weight"][x], self["scales"][x], self["biases"][x], self.group_size, self.bits
        )
        return rows.astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        fast = self.fast and not _FULL_PRECISION.get()
        w = self["weight"]
        s, b = self["scales"], self["biases"]
        return self._qmm(x, w, s, b, self.group_size, self.bits, fast, panels_of(self, w))


def panels_of(layer: nn.Module, weight: mx.array) -> list[mx.array]:
    """The layer's weights repacked for batched decoding (`pack_panels`), or [] when it has none
    or its weight array was swapped since (an adapter, a weight update)."""
    packed = layer.__dict__.get("_panels")
    return packed[1] if packed is not None and packed[0] is weight else []


# How long the kernel's idle workers spin before sleeping (kernels/cpu/pool.cpp): one stream
# wants them at hand; batch steps spend longer in Python between kernel calls, and on 2 cores
# a spinning worker takes the core that Python needs.
SPIN_US = {False: 200, True: 30}


def batch_mode(on: bool) -> None:
    """Tune the kernel's thread pool for batched decoding (on) or a single stream (off)."""
    extension().set_pool_spin(SPIN_US[on])


def pack_panels(model: nn.Module) -> int:
    """Repack the weights of every fast-mode kernel layer into the int8 GEMM's panels, which
    batched decoding (from 4 rows) then reads without unpacking anything per step (SmolLM2-135M,
    CPU ms a step: 4 rows 29 -> 12, 16 rows 43 -> 29). The panels take the weights' size again
    (8 bits a value for 5 and 6-bit layers), so only the server, whose batches use them, packs.
    Returns how many layers were packed (0 where the CPU has no int8 GEMM on panels)."""
    ext = extension()
    if not ext.int8_panels():
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) in (CpuQuantizedLinear, CpuQuantizedEmbedding) and m.fast:
            w = m["weight"]
            panels = ext.pack_q8(w, m["scales"], m["biases"], m.group_size, m.bits)
            object.__setattr__(m, "_panels", (w, panels))
            n += 1
    for blk in llama_blocks(model):  # fused layers built before this take the panels now
        blk.__dict__.pop("_fused", None)
    for blk in gemma_blocks(model):
        blk.__dict__.pop("_fused_mlp", None)
    return n


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """softmax(q k^T * scale [+ causal mask aligned to the end]) v, float32, grouped-query heads.

    q is [B, Hq, L, D], k and v [B, Hkv, S, D]; the result is [B, L, Hq, D] (the layout the
    output projection reads), not [B, Hq, L, D] as mx.fast.scaled_dot_product_attention.
    """
    return extension().attention(q, k, v, scale, causal)


def _attention_bases() -> list[type]:
    """mlx-lm attention modules of the llama layout: llama's, qwen2's (the same call; its
    q, k, v projections carry their biases themselves) and gemma3's (an RMSNorm of each head's
    queries and keys before RoPE)."""
    try:
        from mlx_lm.models import gemma3_text, llama, qwen2
    except ImportError:
        return []
    return [llama.Attention, qwen2.Attention, gemma3_text.Attention]


def _llama_attention_class(attention: type | None = None):
    from mlx_lm.models import base, llama

    class CpuLlamaAttention(attention or llama.Attention):
        """mlx-lm's llama, qwen2 or gemma3 attention with edgeai's CPU attention kernel.

        Installed by swapping the instance's class, so parameters (and any LoRA wrapping of
        the projections) are untouched. Masks other than causal (gemma3's sliding window past
        its width, a batch's padding), non-float32 activations and quantized KV caches go
        through mlx-lm's own path.
        """

        def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
            b, n, _ = x.shape
            q = self.q_proj(x).reshape(b, n, self.n_heads, -1).transpose(0, 2, 1, 3)
            k = self.k_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            if "q_norm" in self:  # gemma3
                q, k = self["q_norm"](q), self["k_norm"](k)
            offset = cache.offset if cache is not None else 0
            r = self.rope
            # Batched decoding passes per-row offsets (an array): mlx-lm's RoPE handles those.
            if (
                type(r) is nn.RoPE
                and q.dtype == mx.float32
                and self._rope is not None
                and isinstance(offset, int)
            ):
                q = self._rope(q, r.dims, r.traditional, r.base, r.scale, offset)
                k = self._rope(k, r.dims, r.traditional, r.base, r.scale, offset)
            else:
                q, k = r(q, offset=offset), r(k, offset=offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            fast = (
                q.dtype == k.dtype == v.dtype == mx.float32
                and q.shape[-1] % 16 == 0
                and not hasattr(cache, "bits")
                and (mask is None or (isinstance(mask, str) and mask == "causal"))
            )
            if fast:  # already [B, L, H, D]
                out = self._attend(q, k, v, self.scale, mask is not None)
            else:
                out = base.scaled_dot_product_attention(
                    q, k, v, cache=cache, scale=self.scale, mask=mask
                )
                out = out.transpose(0, 2, 1, 3)
            return self.o_proj(out.reshape(b, n, -1))

    CpuLlamaAttention._attend = staticmethod(extension().attention)
    CpuLlamaAttention._rope = None
    return CpuLlamaAttention


def _plain_linear(m: nn.Module, fast: bool, bias: bool = False) -> bool:
    """An unwrapped kernel-backed linear in the given precision, with a float32 bias exactly
    when `bias` (any bits and group size the kernel takes: the fused layer reads each
    projection's format from its shapes)."""
    return (
        type(m) is CpuQuantizedLinear
        and m.fast == fast
        and ("bias" in m) == bias
        and (not bias or (m["bias"].dtype == mx.float32 and m["bias"].ndim == 1))
    )


def formats(*projections: nn.Module) -> tuple:
    """(bits, group_size) of each projection (None: not quantized)."""
    return tuple((p.bits, p.group_size) if hasattr(p, "bits") else None for p in projections)


def block_formats(block: nn.Module) -> tuple:
    """formats() of a llama layer's seven projections."""
    a, m = block.self_attn, block.mlp
    return formats(a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def _triples(*layers: nn.Module) -> list[mx.array]:
    return [a for m in layers for a in (m["weight"], m["scales"], m["biases"])]


def _block_bases() -> list[type]:
    """mlx-lm decoder layers of the llama layout the fused layer takes: llama, and qwen2
    (the same layer with biases on the q, k, v projections)."""
    try:
        from mlx_lm.models import llama, qwen2
    except ImportError:
        return []
    return [llama.TransformerBlock, qwen2.TransformerBlock]


def _llama_block_class(base: type | None = None):
    """The fused form of `base` (one of _block_bases(); default: llama's layer)."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import BatchKVCache, KVCache

    ext = extension()
    base = base or llama.TransformerBlock

    class CpuLlamaBlock(base):
        """mlx-lm's llama (or qwen2) decoder layer as three C++ graph nodes instead of ~28.

        norm_qkv (RMSNorm, q/k/v projections, RoPE; with a FusedKVCache it also writes k, v
        into the cache, otherwise mlx-lm's KVCache update follows), attn_out (attention,
        o_proj, residual) and norm_mlp (RMSNorm, SwiGLU MLP, residual). A batch of left-padded
        rows (mlx-lm's BatchKVCache, as the server's batches decode) takes the same three nodes,
        each row at its own positions and attending to its own keys only. Any call that is not
        the plain case (LoRA-wrapped projections, masks other than causal or the batch cache's
        own, quantized or rotating caches, non-float32 activations) runs mlx-lm's code with
        edgeai's per-op kernels instead.
        """

        def _layer(self):
            """The C++ layer for the current modules, weights and precision, or None if they are
            not plain.

            Built once and reused while the same weight arrays are in place (an adapter or a
            weight update swaps them, which rebuilds or disables it).
            """
            # Plain dict lookups (modules are dicts): nn.Module.__getattr__ is the slow path, and
            # this check runs for every layer of every decoded token.
            a, m = self["self_attn"], self["mlp"]
            mods = (
                a["q_proj"],
                a["k_proj"],
                a["v_proj"],
                a["o_proj"],
                m["gate_proj"],
                m["up_proj"],
                m["down_proj"],
                self["input_layernorm"],
                self["post_attention_layernorm"],
            )
            key = (tuple([id(p.get("weight")) for p in mods]), _FULL_PRECISION.get())
            layers = self.__dict__.get("_fused")  # plain attribute, not a module parameter
            if layers is None or layers[0] != key[0]:
                layers = (key[0], {})
                object.__setattr__(self, "_fused", layers)
            if key[1] not in layers[1]:
                layers[1][key[1]] = self._build(mods, a, full=key[1])
            return layers[1][key[1]]

        def _build(self, mods: tuple, a: nn.Module, full: bool):
            q = a.q_proj
            fast = q.fast if type(q) is CpuQuantizedLinear else None
            bias = "bias" in q  # qwen2: q, k, v have biases (all three or none)
            if not (
                fast is not None
                and type(a.rope) is nn.RoPE
                and q.weight.shape[0] // a.n_heads % 16 == 0
                and all(_plain_linear(p, fast, bias) for p in mods[:3])
                and all(_plain_linear(p, fast) for p in mods[3:7])
                and all(
                    type(n) in (nn.RMSNorm, CpuRMSNorm) and n["weight"].dtype == mx.float32
                    for n in mods[7:]
                )
            ):
                return None
            r, n1, n2 = a.rope, self.input_layernorm, self.post_attention_layernorm
            object.__setattr__(self, "_head_dim", q.weight.shape[0] // a.n_heads)
            panels = [panels_of(p, p["weight"]) for p in mods[:7]]
            return ext.FusedLlamaLayer(
                n1["weight"],
                _triples(*mods[:3]),
                _triples(a.o_proj),
                n2["weight"],
                _triples(*mods[4:7]),
                n1.eps,
                n2.eps,
                a.n_heads,
                a.n_kv_heads,
                r.dims,
                bool(r.traditional),
                float(r.base),
                float(r.scale),
                0,
                0,
                fast and not full,  # 0, 0: each projection's own format
                [p["bias"] for p in mods[:3]] if bias else [],
                [a for p in panels for a in p] if fast and not full and all(panels) else [],
            )

        def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
            if type(cache) is BatchKVCache:
                return self._batch_call(x, mask, cache)
            layer = self._layer()
            if (
                layer is None
                or x.dtype != mx.float32
                or x.ndim != 3
                or not (mask is None or (isinstance(mask, str) and mask == "causal"))
                or not (
                    cache is None
                    or (type(cache) in (KVCache, FusedKVCache) and isinstance(cache.offset, int))
                )
            ):
                return super().__call__(x, mask, cache)
            a = self["self_attn"]
            causal, scale = mask is not None, a.scale
            if type(cache) is FusedKVCache:  # k, v written straight into the cache's buffers
                cache.reserve(x.shape[0], a.n_kv_heads, x.shape[1], self.__dict__["_head_dim"])
                q, cache.keys, cache.values = layer.qkv(x, cache.offset, [cache.keys, cache.values])
                cache.offset += x.shape[1]
                return layer.mlp(
                    layer.attend(q, cache.keys, cache.values, x, scale, causal, cache.offset)
                )
            q, k, v = layer.qkv(x, cache.offset if cache is not None else 0)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            return layer.mlp(layer.attend(q, k, v, x, scale, causal))

        def _batch_call(self, x: mx.array, mask, cache) -> mx.array:
            """Rows left-padded in a BatchKVCache: row b's token l sits at buffer position
            cache._idx + l and model position cache._idx + l - left_padding[b], and sees the
            keys from left_padding[b] to its own position, which is exactly the mask mlx-lm's
            model makes from this cache (`mask`, not read), so any mask is taken as that one.
            k and v are written into the cache's buffers in place, as update_and_fetch would."""
            layer = self._layer()
            if (
                layer is None
                or x.dtype != mx.float32
                or x.ndim != 3
                or getattr(self, "use_sliding", False)
                or (cache.keys is not None and cache.keys.dtype != mx.float32)
            ):
                return super().__call__(x, mask, cache)
            a, n = self["self_attn"], x.shape[1]
            _reserve_batch(cache, x.shape[0], a.n_kv_heads, n, self.__dict__["_head_dim"])
            pad = cache.left_padding
            q, cache.keys, cache.values = layer.qkv(x, cache._idx, [cache.keys, cache.values], pad)
            cache.offset = cache.offset + n
            cache._idx += n
            h = layer.attend(q, cache.keys, cache.values, x, a.scale, True, cache._idx, pad)
            return layer.mlp(h)

    if base is not llama.TransformerBlock:
        name = f"Cpu{base.__module__.rsplit('.', 1)[-1].title()}Block"  # CpuQwen2Block
        CpuLlamaBlock.__name__ = CpuLlamaBlock.__qualname__ = name
    return CpuLlamaBlock


def _fused_kv_cache_class():
    from mlx_lm.models.cache import KVCache

    class FusedKVCache(KVCache):
        """mlx-lm's KVCache whose buffers edgeai's fused layers write into in place.

        One graph node per layer and step instead of KVCache.update_and_fetch's four (two
        slice updates, two slices), and no Python work beyond `reserve`. Anything else
        (mlx-lm's own layers, trimming, saving) sees an ordinary KVCache.
        """

        def reserve(self, batch: int, heads: int, length: int, head_dim: int) -> None:
            """Make room for `length` more positions, growing as KVCache does (steps of 256)."""
            _grow(self, self.offset, batch, heads, length, head_dim)

    return FusedKVCache


FusedKVCache = _fused_kv_cache_class()


def _reserve_batch(cache, batch: int, heads: int, length: int, head_dim: int) -> None:
    """Grow a BatchKVCache's buffers for `length` more positions as its update_and_fetch
    does, without writing them."""
    _grow(cache, cache._idx, batch, heads, length, head_dim)


def _grow(cache, prev: int, batch: int, heads: int, length: int, head_dim: int) -> None:
    """Grow a cache's float32 k/v buffers, holding `prev` positions, for `length` more, as
    mlx-lm's caches grow theirs in update_and_fetch: steps of `cache.step`, the unused tail
    dropped first unless `prev` ends on a step."""
    if cache.keys is not None and prev + length <= cache.keys.shape[2]:
        return
    steps = (cache.step + length - 1) // cache.step
    shape = (batch, heads, steps * cache.step, head_dim)
    new_k, new_v = mx.zeros(shape, mx.float32), mx.zeros(shape, mx.float32)
    if cache.keys is None:
        cache.keys, cache.values = new_k, new_v
        return
    if prev % cache.step != 0:
        cache.keys, cache.values = cache.keys[..., :prev, :], cache.values[..., :prev, :]
    cache.keys = mx.concatenate([cache.keys, new_k], axis=2)
    cache.values = mx.concatenate([cache.values, new_v], axis=2)


def make_cache(model: nn.Module) -> list:
    """mlx-lm's prompt cache for `model`, with FusedKVCache in place of each plain KVCache."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return [FusedKVCache() if type(c) is KVCache else c for c in make_prompt_cache(model)]


def swap_blocks(model: nn.Module) -> int:
    """Give mlx-lm llama and qwen2 decoder layers edgeai's fused three-node form; returns how
    many."""
    return sum(_swap_class(model, base, _llama_block_class(base)) for base in _block_bases())


def llama_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers of the llama layout (llama, qwen2), fused or not."""
    bases = tuple(_block_bases())
    return [m for _, m in model.named_modules() if bases and isinstance(m, bases)]


class CpuRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as one graph node on the CPU (MLX runs mx.fast.rms_norm as ~10 nodes there)."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if x.dtype == mx.float32 and w.dtype == mx.float32:
            return self._norm(x, w, self.eps)
        return mx.fast.rms_norm(x, w, self.eps)


def _gemma_norm_base() -> type | None:
    try:
        from mlx_lm.models import gemma3_text
    except ImportError:
        return None
    return gemma3_text.RMSNorm


@cache
def _gemma_norm_class(base: type):
    class CpuGemmaRMSNorm(base):
        """gemma3's RMSNorm (weights stored as offsets from 1) as one graph node: the 1 + w
        that mlx-lm adds on every call (a node of its own) is made once per weight array."""

        def __call__(self, x: mx.array) -> mx.array:
            if x.dtype != mx.float32:
                return super().__call__(x)
            return self._norm(x, self.scale(), self.eps)

        def scale(self) -> mx.array:
            """1 + weight in float32, made once per weight array (an update swaps the array)."""
            w = self["weight"]
            scale = self.__dict__.get("_scale")
            if scale is None or scale[0] is not w:
                scale = (w, (1.0 + w).astype(mx.float32))
                object.__setattr__(self, "_scale", scale)
            return scale[1]

    return CpuGemmaRMSNorm


def _gemma_block_class():
    """gemma3's decoder layer whose MLP half (pre-norm, GELU MLP, post-norm, residual) is one
    C++ node (`norm_mlp` with gelu and post_norm) instead of ~14; the attention half stays
    mlx-lm's, on edgeai's attention, RoPE and norm kernels."""
    from mlx_lm.models import gemma3_text

    ext = extension()

    class CpuGemmaBlock(gemma3_text.TransformerBlock):
        def _mlp(self):
            """(norm_mlp's arguments but h) for the current weights and precision, or None when
            the MLP is not plain (LoRA-wrapped, other norms, non-float32 norms)."""
            m = self["mlp"]
            mods = (
                m["gate_proj"],
                m["up_proj"],
                m["down_proj"],
                self["pre_feedforward_layernorm"],
                self["post_feedforward_layernorm"],
            )
            key = (tuple([id(p.get("weight")) for p in mods]), _FULL_PRECISION.get())
            built = self.__dict__.get("_fused_mlp")
            if built is None or built[0] != key:
                built = (key, self._build(mods, full=key[1]))
                object.__setattr__(self, "_fused_mlp", built)
            return built[1]

        def _build(self, mods: tuple, full: bool):
            g = mods[0]
            fast = g.fast if type(g) is CpuQuantizedLinear else None
            if not (
                fast is not None
                and all(_plain_linear(p, fast) for p in mods[:3])
                and all(type(n) is _gemma_norm_class(_gemma_norm_base()) for n in mods[3:])
            ):
                return None
            pre, post = mods[3], mods[4]
            panels = [panels_of(p, p["weight"]) for p in mods[:3]]
            return (
                pre.scale(),
                pre.eps,
                _triples(*mods[:3]),
                0,
                0,
                fast and not full,
                [a for p in panels for a in p] if fast and not full and all(panels) else [],
                True,
                post.scale(),
                post.eps,
            )

        def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
            mlp = self._mlp()
            if mlp is None or x.dtype != mx.float32:
                return super().__call__(x, mask, cache)
            r = self.self_attn(self.input_layernorm(x), mask, cache)
            h = x + self.post_attention_layernorm(r)  # clip_residual's float32 case
            return ext.norm_mlp(h, mlp[0], mlp[1], *mlp[2:])

    return CpuGemmaBlock


def gemma_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's gemma3 decoder layers, fused or not."""
    try:
        from mlx_lm.models import gemma3_text
    except ImportError:
        return []
    return [m for _, m in model.named_modules() if isinstance(m, gemma3_text.TransformerBlock)]


def swap_attention(model: nn.Module, rope: bool = True) -> int:
    """Give mlx-lm llama, qwen2 and gemma3 attention modules edgeai's attention (and RoPE)
    kernels; returns how many."""
    n = 0
    for attention in _attention_bases():
        cls = _llama_attention_class(attention)
        if rope:
            cls._rope = staticmethod(extension().rope)
        n += _swap_class(model, attention, cls)
    return n


def swap_norms(model: nn.Module) -> int:
    """Give nn.RMSNorm (and gemma3's RMSNorm) modules edgeai's one-node RMSNorm; returns how
    many."""
    CpuRMSNorm._norm = staticmethod(extension().rms_norm)
    n = _swap_class(model, nn.RMSNorm, CpuRMSNorm)
    gemma = _gemma_norm_base()
    if gemma is not None:
        cls = _gemma_norm_class(gemma)
        cls._norm = staticmethod(extension().rms_norm)
        n += _swap_class(model, gemma, cls)
    return n


def _swap_class(model: nn.Module, old: type, new: type) -> int:
    """Give every module of exactly type `old` the class `new` (parameters untouched)."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is old:
            m.__class__ = new
            n += 1
    return n


def norm_dims(model: nn.Module) -> set[int]:
    kinds = (nn.RMSNorm, _gemma_norm_base())
    return {m.weight.shape[0] for _, m in model.named_modules() if type(m) in kinds}


def rope_configs(model: nn.Module) -> set[tuple]:
    """(dims, traditional, base, scale, head_dim) of plain nn.RoPE in llama / qwen2 attention."""
    bases = tuple(_attention_bases())
    out = set()
    for _, m in model.named_modules():
        if type(m) in bases and type(m.rope) is nn.RoPE:
            r, hd = m.rope, m.q_proj.weight.shape[0] // m.n_heads
            out.add((r.dims, bool(r.traditional), float(r.base), float(r.scale), hd))
    return out


def attention_heads(model: nn.Module) -> set[tuple[int, int, int]]:
    """(query heads, kv heads, head dim) of the llama / qwen2 attention modules in `model`."""
    bases = tuple(_attention_bases())
    return {
        (m.n_heads, m.n_kv_heads, m.q_proj.weight.shape[0] // m.n_heads)
        for _, m in model.named_modules()
        if type(m) in bases
    }
