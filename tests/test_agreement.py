"""benchmarks/agreement.py end to end on tiny GGUFs made on the spot (needs llama-cpp-python)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufmaker import make_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _import_tiny(gguf: Path, tmp_path: Path) -> dict:
    """`edgeai import GGUF --name tiny` into a store of its own; the subprocess.run keywords
    that reach that store, for the benchmark runs that follow."""
    env = dict(
        os.environ,
        EDGEAI_HOME=str(tmp_path / "home"),
        EDGEAI_CONFIG_DIR=str(tmp_path / "cfg"),
        PYTHONPATH=str(ROOT),
    )
    run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    cmd = [sys.executable, "-m", "edgeai", "import", str(gguf), "--name", "tiny", "-q"]
    r = subprocess.run(cmd, **run)
    assert r.returncode == 0, r.stderr
    return run


def test_agreement_script_lines_up_positions_with_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    from gguf import GGMLQuantizationType as T

    gguf = tmp_path / "tiny.gguf"
    make_gguf(gguf, qtype=T.Q4_0)
    run = _import_tiny(gguf, tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/agreement.py",
            "tiny",
            "--gguf",
            str(gguf),
            "--tokens",
            "60",
            "--threads",
            "1",
        ],
        **run,
    )
    assert r.returncode == 0, r.stderr
    assert "tokenizers agree on 60/60 ids" in r.stderr
    names = r"edgeai accurate|edgeai fast|mlx-lm float32 \(stock\)"
    rows = dict(re.findall(rf"^\| ({names}) \| (.+) \|$", r.stdout, re.M))
    assert set(rows) == {"edgeai accurate", "edgeai fast", "mlx-lm float32 (stock)"}, r.stdout
    for name, cells in rows.items():
        top1, kl = (float(c) for c in cells.split(" | ")[:2])
        # Same weights, same tokens: positions out of line would agree ~1/vocab of the time.
        assert top1 >= 0.9 and kl < 0.05, (name, top1, kl)


def test_gemma3_matches_transformers_and_llama_cpp_float_graph(tmp_path):
    """Three independent readings of Gemma 3 give the same model: edgeai, Hugging Face
    transformers and llama.cpp's graph (on a float32 copy). A window of 4 over 60 positions
    and 6 layers (one global) test the sliding-window layers, their RoPE base and the query
    scale; each of those set wrong moves the mean KL by 0.005 to 0.5 nats."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    for mod in ("torch", "transformers", "accelerate"):
        pytest.importorskip(mod, reason="the bench-hf extra")
    from gguf import GGMLQuantizationType as T

    gguf = tmp_path / "tiny.gguf"
    # head_dim 256 as in Gemma 3 270M-12B: transformers' default query_pre_attn_scalar
    make_gguf(
        gguf, arch="gemma3", qtype=T.Q8_0, hidden=256, heads=1, kv_heads=1, layers=6, tied=False
    )
    run = _import_tiny(gguf, tmp_path)
    args = ["--gguf", str(gguf), "--tokens", "60", "--threads", "1", "--skip-stock"]
    cmd = [sys.executable, "benchmarks/agreement.py", "tiny", *args]
    r = subprocess.run([*cmd, "--reference", "hf", "--llama-f32"], **run)
    assert r.returncode == 0, r.stderr
    hf_table = r.stdout.split("### against HF transformers float32")[1]
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", hf_table, re.M))
    assert {"llama.cpp", "llama.cpp on a float32 copy", "edgeai accurate"} <= set(rows), r.stdout
    for name in ("llama.cpp on a float32 copy", "edgeai accurate"):
        top1, kl = (float(c) for c in rows[name].split(" | ")[:2])
        assert top1 == 1.0 and kl <= 0.0002, (name, r.stdout)
