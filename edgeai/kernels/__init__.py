"""Pick the quantized-matmul kernel for this machine, verify it on first use, fall back.

`apply(model, mode)` swaps a loaded model's quantized layers (and a tied embedding / LM
head) for kernel-backed ones and returns a `KernelReport` of what it chose and why, with
the `Hooks` the decode loop must use with that model (its KV cache, its log-softmax node,
the context its prompts run in).

Candidates per backend: CPU -> edgeai's C++ kernel (kernels/cpu, `edgeai.kernels.cpu`);
Metal -> edgeai's Metal kernel (kernels/metal, `edgeai.kernels.metal`, never run on
Apple hardware by its authors: `auto` never picks it, only `custom` does, and then only once
it passes verification there; on a Mac `auto` keeps MLX's tuned Metal kernels).
Before a kernel is used on a machine, it is checked against a float32 reference
(`mx.dequantize` + matmul) on random data of the model's shapes; the verdict is cached
under `config.cache_dir()`. Anything that fails to load or disagrees is not used:
MLX's `mx.quantized_matmul` runs instead, with a one-line warning.

Precision of the CPU kernel (`EDGEAI_KERNEL_PRECISION`, or `precision=`):
- "fast" (default): at decode (one stream, or a batch) layers quantize the activations to
  int8 per block of 32 and use integer dot products, as llama.cpp does; measured normalized
  MSE vs the float32 reference ~5e-5 (tolerance `FAST_NMSE_TOL`). A per-row tile takes up to
  3 rows; more rows (prompts, larger batches) run the int8 GEMM where the CPU has AVX-512
  VNNI. Without it (AVX2) the tile also takes a batch's decode step of up to 31 rows (the
  step rate at 16 rows nearly doubles over float32) and the rest runs in float32;
  batches read weights repacked for it when the caller prepared them (`Hooks.prepare_batches`,
  the server), verified on first use at `PACKED_ROWS`. Greedy text can differ from MLX's
  kernel at near-ties.
- "accurate": float32 activations and accumulation everywhere; NMSE ~1e-13 (tolerance
  `NMSE_TOL`), greedy generations identical to MLX's kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from edgeai.errors import EdgeAIError, InvalidInput
from edgeai.kernels.verify import (
    ATTN_TOL,
    FAST_MAX_REL_TOL,
    FAST_NMSE_TOL,
    FAST_ROWS,
    FUSED_FAST_TOL,
    MAX_REL_TOL,
    NMSE_TOL,
    PACKED_ROWS,
    VERIFY_ROWS,
    _cache_path,
    _file_id,
    _read_cache,
    _verdict,
    _warn_once,
    check,
    check_attention,
    check_block,
    check_log_softmax,
    check_rms_norm,
    check_rope,
    check_top_k,
    verify,
)

__all__ = [  # the public API; verification's names are re-exported from kernels.verify
    "ATTN_TOL",
    "FAST_MAX_REL_TOL",
    "FAST_NMSE_TOL",
    "FAST_ROWS",
    "PACKED_ROWS",
    "MAX_REL_TOL",
    "MODES",
    "NMSE_TOL",
    "PRECISIONS",
    "VERIFY_ROWS",
    "Candidate",
    "Hooks",
    "KernelError",
    "KernelReport",
    "apply",
    "backend",
    "check",
    "check_attention",
    "check_block",
    "check_log_softmax",
    "check_top_k",
    "default_precision",
    "status",
    "verify",
]
from edgeai.kernels import cpu as kc
from edgeai.kernels import metal as km

MODES = ("auto", "builtin", "custom")
PRECISIONS = ("fast", "accurate")


def _mlx_cache(model: nn.Module) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def _mlx_log_softmax(logits: mx.array) -> tuple[mx.array, mx.array]:
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logprobs, -(mx.exp(logprobs) * logprobs).sum(axis=-1)


def _mlx_top_k(x: mx.array, k: int) -> tuple[mx.array, mx.array]:
    idx = mx.argpartition(-x, k - 1, axis=-1)[..., :k]
    return idx, mx.take_along_axis(x, idx, axis=-1)


@dataclass(frozen=True)
class Hooks:
    """What the chosen kernels change about running a model; the decode loop reads these.

    Attributes:
        make_cache: model -> its KV cache (fused layers write theirs in place).
        log_softmax: (1, vocab) float32 logits -> (log-probabilities, entropy), as one node
            where a kernel fuses it.
        top_k: (..., vocab) float32 log-probabilities, k -> the indices and values of each
            row's k largest, in any order (the kernel's come largest first).
        prompt_context: a context manager that the step giving a prompt's first generated
            token runs under: float32 activations where decoding uses int8 ones (the prompt
            tokens before it fill the cache in the layers' own precision).
        prepare_batches: model -> None, called by whoever decodes batches of several rows
            (the server) before the first: the CPU kernel repacks the weights for its int8
            GEMM there (memory: the weights' size again).
        batching: on -> None, told whether the steps that follow decode a batch of several
            rows (True) or one stream (False): the CPU kernel's idle workers then spin less,
            leaving the core to the Python thread that builds each batch step.
    """

    make_cache: Callable[[nn.Module], list] = _mlx_cache
    log_softmax: Callable[[mx.array], tuple[mx.array, mx.array]] = _mlx_log_softmax
    top_k: Callable[[mx.array, int], tuple[mx.array, mx.array]] = _mlx_top_k
    prompt_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    prepare_batches: Callable[[nn.Module], object] = lambda model: None
    batching: Callable[[bool], None] = lambda on: None

    @property
    def int8_decode(self) -> bool:
        """Decoding uses int8 activations while prompts run in float32."""
        return self.prompt_context is not contextlib.nullcontext


@dataclass
class KernelReport:
    """Which matmul kernel a model uses and why."""

    name: str  # "builtin" (mx.quantized_matmul) or a custom kernel's name
    reason: str
    layers: int = 0  # layers swapped to the custom kernel
    backend: str = ""  # cpu / metal / cuda
    isa: str | None = None  # instruction set of the CPU kernel (avx512, avx2, generic)
    threads: int | None = None
    accuracy: str | None = None  # e.g. "float32 accumulation"
    precision: str | None = None  # "fast" or "accurate" (CPU kernel)
    nmse: float | None = None  # worst normalized MSE seen in verification
    shapes: list[str] = field(default_factory=list)
    attention: str | None = None  # other CPU layer kernels in use (attention, RoPE, RMSNorm)
    hooks: Hooks = field(default_factory=Hooks, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("hooks")
        return d


class KernelError(EdgeAIError):
    """`--kernel custom` was asked for but no verified custom kernel exists here."""


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def default_precision() -> str:
    return os.environ.get("EDGEAI_KERNEL_PRECISION") or "fast"


def apply(model: nn.Module, mode: str = "auto", precision: str | None = None) -> KernelReport:
    """Swap quantized layers for the best verified kernel.

    Args:
        model: a loaded mlx-lm model (modified in place).
        mode: "auto" (custom kernel when verified, else builtin with a warning),
            "builtin" (MLX's own), or "custom" (custom or raise KernelError).
        precision: "fast" or "accurate" for the CPU kernel (default: $EDGEAI_KERNEL_PRECISION,
            else fast).
    """
    if mode not in MODES:
        raise InvalidInput(f"unknown kernel mode {mode!r}", f"use one of: {', '.join(MODES)}")
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise InvalidInput(
            f"unknown kernel precision {precision!r}", f"use one of: {', '.join(PRECISIONS)}"
        )
    be = backend()
    if mode == "builtin":
        return KernelReport("builtin", "requested", backend=be)
    if be == "cuda" and mode == "auto":  # expected there: MLX's own CUDA kernels are the fast path
        return KernelReport(
            "builtin", "no custom kernel for CUDA; MLX's CUDA kernels are used", backend=be
        )
    if be == "metal" and mode == "auto":
        # edgeai's Metal kernel has never been timed against MLX's tuned one on a Mac: a
        # correctness check alone does not earn it the default. `--kernel custom` tries it.
        return KernelReport(
            "builtin", "MLX's Metal kernels (edgeai's is opt-in: --kernel custom)", backend=be
        )
    targets = _quantized_layers(model)
    if not targets:
        return KernelReport("builtin", "the model has no quantized layers", backend=be)
    try:
        cand = _candidate(be)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot load is simply not used
        return _fallback(mode, be, str(e))
    supported = [
        (p, m) for p, m in targets if cand.supports(m.bits, m.group_size, _in_dims(m), m.mode)
    ]
    if not supported:
        return _fallback(mode, be, f"no layer has a shape/format the {cand.name} kernel supports")
    shapes = sorted(
        {(m.bits, m.group_size, m.weight.shape[0], _in_dims(m), _sdtype(m)) for _, m in supported}
    )
    verdict = verify(cand, shapes)
    if not verdict["ok"]:
        return _fallback(mode, be, f"{cand.name} kernel failed verification: {verdict['detail']}")
    fast = precision == "fast" and cand.fast_matmul is not None
    accuracy = "float32 accumulation"
    batches = False  # batched decoding reads weights repacked for the int8 GEMM
    if fast:
        fv = verify(cand, shapes, fast=True)
        if fv["ok"]:
            if be == "cpu" and kc.extension().int8_gemm():
                rest = "and for prompt tokens (int8 GEMM), float32 for each prompt's last"
            elif be == "cpu":
                ext = kc.extension()
                rest = f"float32 for prompts over {ext.int8_rows(decode=False)} tokens" + (
                    ", int8 GEMM for the server's batches"
                    if ext.int8_panels()
                    else f" and batches over {ext.int8_rows()} rows"
                )
            else:
                rest = "float32 for prompts and batches over 3 rows"
            accuracy = f"int8 activations at decode (NMSE {fv['nmse']:.1e}) {rest}"
            if be == "cpu" and kc.extension().int8_panels():
                packed = verify(cand, shapes, fast=True, packed=True)
                batches = packed["ok"]
                if not batches:
                    _warn_once(
                        f"{cand.name} int8 GEMM on repacked weights failed verification: "
                        f"{packed['detail']}; batches unpack the weights at every step"
                    )
        else:  # the accurate kernel passed: keep it, say why the fast one is not used
            fast = False
            _warn_once(
                f"{cand.name} fast (int8) path failed verification: {fv['detail']}; "
                "using float32 accumulation"
            )
    layer_note = _cpu_layer_kernels(model, cand) if be == "cpu" else None
    swaps = [(p, cand.wrap(m, fast)) for p, m in supported]
    model.update_modules(tree_unflatten(swaps))
    hooks = Hooks()
    if be == "cpu":
        _float32_params(model)
        huge = _hugepages(model)
        if huge:
            layer_note = f"{layer_note}, huge pages {huge >> 20} MiB"
        hook: dict = {}
        fused = _fuse_blocks(model, cand, fast)
        if fused:  # fused layers write k/v into a cache of their own, in place
            layer_note = f"{layer_note}, fused layers {fused}"
            hook["make_cache"] = kc.make_cache
        fused_mlps = _fuse_gemma_mlps(model, cand, fast)
        if fused_mlps:
            layer_note = f"{layer_note}, fused MLPs {fused_mlps}"
        if fast:  # a prompt's first generated token is built in float32
            hook["prompt_context"] = kc.full_precision
        if fast and batches:
            hook["prepare_batches"] = kc.pack_panels
        hook["batching"] = kc.batch_mode
        if _verdict(f"log_softmax|{cand.build_id}|{cand.isa()}", check_log_softmax):
            hook["log_softmax"] = kc.extension().log_softmax
            layer_note = f"{layer_note}, log_softmax"
        if _verdict(f"top_k|{cand.build_id}|{cand.isa()}", check_top_k, tol=0.0):
            hook["top_k"] = kc.extension().top_k
            layer_note = f"{layer_note}, top_k"
        hooks = Hooks(**hook)
    return KernelReport(
        cand.name,
        "verified against the float32 reference"
        + (" (cached verdict)" if verdict.get("cached") else ""),
        layers=len(swaps),
        backend=be,
        isa=cand.isa(),
        threads=cand.threads(),
        accuracy=accuracy,
        precision=("fast" if fast else "accurate") if be == "cpu" else None,
        nmse=verdict["nmse"],
        shapes=[f"{b}-bit g{g} {n}x{k} {d} scales" for b, g, n, k, d in shapes],
        attention=layer_note,
        hooks=hooks,
    )


def status() -> dict:
    """What `edgeai doctor` shows: backend, candidate kernel, and why it is or is not usable."""
    be = backend()
    try:
        cand = _candidate(be)
        verdicts = _read_cache().values()
        return {
            "backend": be,
            "kernel": cand.name,
            "available": True,
            "isa": cand.isa(),
            "threads": cand.threads(),
            "precision": default_precision() if cand.fast_matmul else None,
            "verified_ok": sum(bool(v.get("ok")) for v in verdicts),
            "verified_failed": sum(not v.get("ok") for v in verdicts),
            "verdict_cache": str(_cache_path()),
        }
    except Exception as e:  # noqa: BLE001
        return {"backend": be, "kernel": "builtin", "available": False, "reason": str(e)}


# -- candidates ------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A custom kernel: how to call it on raw quantized arrays and how to wrap a layer."""

    name: str
    matmul: Callable  # (x, w, scales, biases, group_size, bits) -> y, scales/biases as given
    wrap: Callable[[nn.Module, bool], nn.Module]  # (layer, fast) -> kernel-backed layer
    supports: Callable[..., bool]
    isa: Callable[[], str | None] = lambda: None
    threads: Callable[[], int | None] = lambda: None
    build_id: str = ""
    fast_matmul: Callable | None = None  # the int8-activation path, where the kernel has one
    packed_matmul: Callable | None = None  # the same on weights repacked for batches (CPU)


def _candidate(be: str) -> Candidate:
    if be == "cpu":
        ext = kc.extension()  # raises KernelUnavailable with its reason

        def wrap(m: nn.Module, fast: bool) -> nn.Module:
            cls = (
                kc.CpuQuantizedEmbedding
                if isinstance(m, nn.QuantizedEmbedding)
                else kc.CpuQuantizedLinear
            )
            return cls.from_quantized(m, fast)

        def matmul(x, w, s, b, gs, bits, fast=False, packed=False):
            s, b = s.astype(kc.scale_dtype(s)), b.astype(kc.scale_dtype(s))
            panels = ext.pack_q8(w, s, b, gs, bits) if packed else []
            return ext.quantized_matmul(x, w, s, b, gs, bits, fast, panels)

        return Candidate(
            "edgeai-cpu",
            matmul,
            wrap,
            kc.supports,
            ext.isa,
            ext.threads,
            _file_id(ext.__file__),
            fast_matmul=lambda *a: matmul(*a, fast=True),
            # as batches use them: decode steps, one token a row
            packed_matmul=lambda x, *a: matmul(x[:, None], *a, fast=True, packed=True)[:, 0],
        )
    if be == "metal":
        return Candidate(
            "edgeai-metal",
            km.quantized_matmul,
            lambda m, fast: km.wrap(m),
            km.supports,
            build_id=km.SOURCE_ID,
        )
    raise RuntimeError(f"no custom kernel for the {be} backend")


def _fallback(mode: str, be: str, reason: str) -> KernelReport:
    if mode == "custom":
        raise KernelError(
            f"custom kernel unavailable: {reason}", "use --kernel builtin (or auto) on this machine"
        )
    _warn_once(f"{reason}; using MLX's built-in quantized matmul")
    return KernelReport("builtin", reason, backend=be)


# -- model surgery ---------------------------------------------------------------------------


def _sdtype(m: nn.Module) -> str:
    return "float16" if m.scales.dtype == mx.float16 else "float32"


def _in_dims(m: nn.Module) -> int:
    return m.weight.shape[1] * 32 // m.bits


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every MLX quantized linear / embedding not already swapped."""
    own = (
        kc.CpuQuantizedLinear,
        kc.CpuQuantizedEmbedding,
        km.MetalQuantizedLinear,
        km.MetalQuantizedEmbedding,
    )
    out = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not isinstance(m, own):
            if m.get("biases") is not None:
                out.append((path, m))
    return out


def _float32_params(model: nn.Module) -> None:
    """Keep the CPU forward pass in float32: float16 math is emulated in software there."""
    halves = [
        (k, v)
        for k, v in tree_flatten(model.parameters())
        if v.dtype in (mx.float16, mx.bfloat16) and not k.endswith((".scales", ".biases"))
    ]
    if halves:
        model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in halves]), strict=False)
    mx.eval(model.parameters())


def _hugepages(model: nn.Module) -> int:
    """Back the weights decode streams with transparent huge pages (Linux; EDGEAI_HUGEPAGES=0
    turns it off) and return the bytes moved. Every weight is read once per token: with 4 KB
    pages that is a TLB miss every 4 KB, and the hardware prefetcher stops at each page
    boundary (kernels/cpu/hugepages.cpp has the measurements). An embedding table that is not
    also the LM head is only looked up a row at a time: it stays as it is."""
    if os.environ.get("EDGEAI_HUGEPAGES", "1") == "0":
        return 0
    params = tree_flatten(model.parameters())
    untied = any(k.startswith("lm_head.") for k, _ in params)
    arrays = [v for k, v in params if not (untied and "embed_tokens." in k)]
    return int(kc.extension().hugepages(arrays))


def _cpu_layer_kernels(model: nn.Module, cand: Candidate) -> str:
    """Swap attention, RoPE and RMSNorm for edgeai's CPU kernels, each once it passes its check."""
    ext = kc.extension()
    checks = {  # name -> list of (verdict key suffix, check returning max relative error)
        "attention": [
            (
                f"{hq}|{hkv}|{d}",
                lambda hq=hq, hkv=hkv, d=d: max(
                    check_attention(kc.attention, hq, hkv, d, n, s)
                    for n, s in ((1, 37), (19, 19), (5, 40))
                ),
            )
            for hq, hkv, d in sorted(kc.attention_heads(model))
        ],
        "rope": [
            (f"{c}", lambda c=c: max(check_rope(ext.rope, *c, off) for off in (0, 37)))
            for c in sorted(kc.rope_configs(model))
        ],
        "rms_norm": [
            (f"{d}", lambda d=d: check_rms_norm(ext.rms_norm, d))
            for d in sorted(kc.norm_dims(model))
        ],
    }
    ok = {
        name: bool(items)
        and all(_verdict(f"{name}|{cand.build_id}|{cand.isa()}|{key}", fn) for key, fn in items)
        for name, items in checks.items()
    }
    parts = []
    if ok["attention"]:
        parts.append(
            f"attention {kc.swap_attention(model, rope=ok['rope'])} layers"
            + (" (+RoPE)" if ok["rope"] else "")
        )
    if ok["rms_norm"]:
        parts.append(f"rms_norm {kc.swap_norms(model)}")
    return ", ".join(parts) or "none"


def _fuse_gemma_mlps(model: nn.Module, cand: Candidate, fast: bool) -> int:
    """Give gemma3 decoder layers their one-node MLP half once it matches the unfused layer
    (each mix of MLP formats checked, in the layers' precision and in float32)."""
    blocks = kc.gemma_blocks(model)
    if not blocks:
        return 0
    fused_cls = kc._gemma_block_class()
    firsts: dict[tuple, nn.Module] = {}
    for blk in blocks:
        m = blk.mlp
        firsts.setdefault(kc.formats(m.gate_proj, m.up_proj, m.down_proj), blk)
    for fmts, b in firsts.items():
        key = (
            f"fused_gemma_mlp|{cand.build_id}|{cand.isa()}|{fast}|{b.hidden_size}|"
            f"{b.mlp.gate_proj.weight.shape[0]}|{_mix(fmts)}"
        )
        if not _fusion_holds(key, b, fused_cls, fast):
            return 0
    return sum(kc._swap_class(model, cls, fused_cls) for cls in {type(b) for b in blocks})


def _mix(fmts: tuple) -> str:
    """A verdict key's spelling of projection formats: "4/32,6/32,-"."""
    return ",".join(f"{f[0]}/{f[1]}" if f else "-" for f in fmts)


def _fusion_holds(key: str, block: nn.Module, fused_cls: type, fast: bool) -> bool:
    """Whether `block` run as `fused_cls` matches its own class (`check_block`, cached under
    `key`); fast layers also run in float32 (kc.full_precision), so that form is checked too."""
    tol = FUSED_FAST_TOL if fast else ATTN_TOL
    if not _verdict(key, lambda: check_block(block, fused_cls), tol):
        return False
    if not fast:
        return True

    def check_full() -> float:
        with kc.full_precision():
            return check_block(block, fused_cls)

    return _verdict(key.replace(f"|{fast}|", "|full|"), check_full)


def _fuse_blocks(model: nn.Module, cand: Candidate, fast: bool) -> int:
    """Turn llama / qwen2 decoder layers into edgeai's three fused nodes once they match the
    unfused layer."""
    blocks = kc.llama_blocks(model)
    if not blocks:
        return 0
    # One check per mix of projection formats: layers of a K-quant (or mlx-lm per-layer
    # quantized) model differ in bits and group size, and the fused layer reads each one's.
    firsts: dict[tuple, nn.Module] = {}
    for blk in blocks:
        firsts.setdefault(kc.block_formats(blk), blk)
    for fmts, b in firsts.items():
        a = b.self_attn
        dims = f"{b.hidden_size}|{a.n_heads}|{a.n_kv_heads}|{a.q_proj.weight.shape[0]}"
        key = (
            f"fused_block|{cand.build_id}|{cand.isa()}|{fast}|{type(b).__module__}|{dims}|"
            f"{b.mlp.gate_proj.weight.shape[0]}|{_mix(fmts)}"
        )
        if not _fusion_holds(key, b, kc._llama_block_class(type(b)), fast):
            return 0
    return kc.swap_blocks(model)
