"""The tree stays lint-clean and formatted: `ruff check` and `ruff format --check` pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff")  # in the test extra; skip where it is not installed

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["edgeai", "tests", "benchmarks", "setup.py"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *TARGETS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check_is_clean():
    r = _ruff("check", "--no-cache", "--output-format", "concise")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = _ruff("format", "--check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
