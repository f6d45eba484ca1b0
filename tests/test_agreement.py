"""benchmarks/agreement.py end to end on a tiny GGUF made on the spot (needs llama-cpp-python)."""

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


def test_agreement_script_lines_up_positions_with_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    from gguf import GGMLQuantizationType as T

    gguf = tmp_path / "tiny.gguf"
    make_gguf(gguf, qtype=T.Q4_0)
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
