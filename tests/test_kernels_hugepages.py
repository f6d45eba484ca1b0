"""Weights backed by transparent huge pages (kernels/cpu/hugepages.cpp, kernels._hugepages)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

kc = pytest.importorskip("edgeai.kernels.cpu")
try:
    EXT = kc.extension()
except kc.KernelUnavailable:
    EXT = None

needs_ext = pytest.mark.skipif(EXT is None, reason="C++ kernels not built")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HERE = Path(__file__).resolve().parent


def _collapse_possible() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with THP not switched off."""
    if platform.system() != "Linux" or not THP.exists() or "[never]" in THP.read_text():
        return False
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return (major, minor) >= (6, 1)


def _anon_huge_kb() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+)", text).group(1))


@needs_ext
@pytest.mark.skipif(not _collapse_possible(), reason="needs Linux 6.1+ with THP not 'never'")
def test_large_buffers_move_into_huge_pages_with_their_values():
    # In a fresh process: in this one, earlier tests' models left huge pages behind (and their
    # freed memory may back these buffers already), so the process's count need not grow.
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import {Path(__file__).stem} as t; "
    code += "t.collapse_fresh_buffers()"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert p.returncode == 0, p.stdout + p.stderr


def collapse_fresh_buffers() -> None:
    rng = np.random.default_rng(0)
    # Three 6 MiB 4-bit weight matrices (K = 8192) and their scales and biases.
    w = [mx.array(rng.integers(0, 2**32, (1536, 1024), dtype=np.uint32)) for _ in range(3)]
    sb = [mx.array(rng.uniform(-0.1, 0.1, (1536, 64)).astype(np.float16)) for _ in range(6)]
    arrays = w + sb
    mx.eval(arrays)
    before = [np.array(a) for a in arrays]
    x = mx.array(rng.standard_normal((2, 8192)).astype(np.float32))
    y0 = EXT.quantized_matmul(x, w[1], sb[0], sb[1], 128, 4, True)
    mx.eval(y0)
    huge_kb = _anon_huge_kb()
    moved = EXT.hugepages(arrays)
    # Most of the 2 MiB pages inside the 19 MiB (the kernel may be short of free huge pages
    # for a few, not for all of them on a machine that runs these tests).
    assert 4 << 21 <= moved <= sum(a.nbytes for a in arrays) + (2 << 21)
    # The process's huge-page count grew by about that (other buffers may come and go).
    assert _anon_huge_kb() - huge_kb >= (moved >> 10) // 2
    for a, b in zip(arrays, before):  # the same bytes, now in huge pages
        assert np.array_equal(np.array(a), b)
    assert mx.array_equal(y0, EXT.quantized_matmul(x, w[1], sb[0], sb[1], 128, 4, True)).item()


@needs_ext
def test_small_or_unevaluated_arrays_are_left_alone():
    small = mx.ones((16, 16))
    mx.eval(small)
    lazy = mx.zeros((4096, 1024)) + 1  # never evaluated: no buffer yet
    assert EXT.hugepages([small, lazy]) == 0
    assert EXT.hugepages([]) == 0


class _Untied(nn.Module):
    def __init__(self, vocab: int = 8192, dims: int = 512):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dims)
        self.lm_head = nn.Linear(dims, vocab, bias=False)


class _Tied(nn.Module):
    def __init__(self, vocab: int = 8192, dims: int = 512):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dims)


@needs_ext
@pytest.mark.skipif(not _collapse_possible(), reason="needs Linux 6.1+ with THP not 'never'")
def test_an_untied_embedding_is_not_moved_but_a_tied_one_is(monkeypatch):
    from edgeai import kernels

    monkeypatch.delenv("EDGEAI_HUGEPAGES", raising=False)
    untied, tied = _Untied(), _Tied()
    mx.eval(untied.parameters(), tied.parameters())
    # 16 MiB each: the untied model's LM head only (its embedding is looked up a row at a
    # time), the tied model's embedding (it is also the LM head).
    moved = kernels._hugepages(untied)
    assert (8 << 20) <= moved <= (16 << 20)
    assert (8 << 20) <= kernels._hugepages(tied) <= (16 << 20)
    monkeypatch.setenv("EDGEAI_HUGEPAGES", "0")
    assert kernels._hugepages(_Tied()) == 0
