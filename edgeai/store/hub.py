"""Verified, resumable downloads of MLX model repos from the Hugging Face hub.

Files land in the Hugging Face cache in its own layout (blobs/<etag>, snapshots/<commit>/,
refs/<revision>), so mlx-lm and other tools share them and nothing is stored twice.
huggingface_hub does the HTTP (`model_info`, `http_get` with its Range retries); this
module adds what it lacks: a partial file that survives Ctrl-C and is resumed by the next
run, and a sha256 (LFS) or git-sha1 check of every file before it enters the cache.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeai.errors import DownloadError, InvalidInput, ResourceError, UnsupportedModel
from edgeai.keys import scrub
from edgeai.store.hashing import digests, git_blob_sha1

DEFAULT_ENDPOINT = "https://huggingface.co"
# Files an MLX model needs; remote code (*.py) is never fetched.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
ATTEMPTS = 2  # a file that fails its checksum is fetched once more from scratch

OnBytes = Callable[[int], None]

# The hub's ids become path parts in the cache (snapshots/<commit>, blobs/<etag>, refs/<rev>):
# only the shapes they really have are accepted, so no endpoint can name another path.
_COMMIT = re.compile(r"[0-9a-f]{40}")
_BLOB_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git sha1 (sha256 for sha256 repos)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def check_revision(revision: str) -> str:
    """`revision` if it is a branch, tag or commit name that is safe as a path under refs/."""
    if len(revision) > 200 or ".." in revision or not _REVISION.fullmatch(revision):
        raise InvalidInput(
            f"{revision[:80]!r} is not a usable hub revision",
            "give a branch, tag or commit, e.g. main or a 40-hex commit id",
        )
    return revision


class HubUnavailable(DownloadError):
    """The hub could not be asked (offline, unreachable, missing repo): try another source."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def timeout() -> float:
    """Seconds to wait for the hub's metadata: short, so a dead network falls through fast."""
    from edgeai.config import env_number

    return env_number("EDGEAI_HUB_TIMEOUT", 10.0, low=0.1, high=3600)


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo revision with the hash the hub publishes for it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1, for every file

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives the blob in its cache."""
        return self.sha256 or self.blob_id or ""


@dataclass
class RepoPlan:
    """What a pull of `repo` at `commit` has to make present in the cache."""

    repo: str
    revision: str
    commit: str
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def storage(self) -> Path:
        return cache_dir() / ("models--" + self.repo.replace("/", "--"))

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    def blob(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f.etag

    def partial(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f"{f.etag}.incomplete"

    def have_bytes(self, f: RemoteFile) -> int:
        """Bytes of `f` already here (a whole blob, or a partial download)."""
        if self.blob(f).exists():
            return f.size
        p = self.partial(f)
        return min(p.stat().st_size, f.size) if p.exists() else 0

    def missing_bytes(self) -> int:
        return sum(f.size - self.have_bytes(f) for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def weights_bytes(self) -> int:
        return sum(f.size for f in self.files if f.path.endswith(".safetensors"))


def _wanted(path: str) -> bool:
    # Top level only: sub-folders hold other formats (original/, onnx/) that MLX does not load.
    return "/" not in path and any(fnmatch.fnmatch(path, p) for p in ALLOW_PATTERNS)


def _shaped(pattern: re.Pattern, value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _malformed(commit: object, files: list[RemoteFile]) -> str | None:
    """What in the hub's answer does not have the shape the hub's ids have, or None."""
    if not _shaped(_COMMIT, commit):
        return "commit id"
    for f in files:
        if "\\" in f.path or not f.path.isprintable() or f.path in (".", ".."):
            return "file name"
        if f.size < 0:
            return f"size for {f.path}"
        if f.sha256 is not None and not _shaped(_SHA256, f.sha256):
            return f"sha256 for {f.path}"
        if f.blob_id is not None and not _shaped(_BLOB_ID, f.blob_id):
            return f"blob id for {f.path}"
    return None


def _check_mlx(repo: str, files: list[RemoteFile]) -> None:
    names = {f.path for f in files}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise UnsupportedModel(
            f"{repo} is not an MLX model repository (it needs config.json and *.safetensors)",
            "pick an mlx-community repo, or download a GGUF file and use `edgeai import FILE.gguf`",
        )


def _reason(e: Exception) -> str:
    """One line saying why a hub call failed."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(e, GatedRepoError):
        return "the repository is gated: accept its license on the hub and set HF_TOKEN"
    if isinstance(e, RevisionNotFoundError):
        return "that revision does not exist"
    if isinstance(e, RepositoryNotFoundError):
        return "repository not found (or private: set HF_TOKEN)"
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", "?")
        return f"the hub answered HTTP {status}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"cannot reach {endpoint()} ({scrub(text, os.environ.get('HF_TOKEN'))})"


def plan(repo: str, revision: str = "main") -> RepoPlan:
    """Ask the hub which files `repo` has at `revision`, with their sizes and hashes.

    Raises:
        HubUnavailable: offline, unreachable, or no such repo.
        UnsupportedModel: the repo holds no MLX model.
    """
    check_revision(revision)
    if offline():
        raise HubUnavailable(
            f"hub {repo}: HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache"
        )
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(
            repo, revision=revision, files_metadata=True, timeout=timeout()
        )
    except Exception as e:  # every failure here means "this source is unusable now"
        raise HubUnavailable(f"hub {repo}: {_reason(e)}") from e
    try:
        files = [
            RemoteFile(
                path=s.rfilename,
                size=int(s.size or (s.lfs.size if s.lfs else 0)),
                sha256=s.lfs.sha256 if s.lfs else None,
                blob_id=s.blob_id,
            )
            for s in (info.siblings or [])
            if isinstance(s.rfilename, str) and _wanted(s.rfilename)
        ]
    except (TypeError, ValueError, AttributeError):
        raise HubUnavailable(
            f"hub {repo}: the hub sent a malformed file list; nothing was fetched"
        ) from None
    _check_mlx(repo, files)
    if not info.sha or any(not f.etag for f in files):
        raise HubUnavailable(
            f"hub {repo}: the hub sent no commit or file hashes, so nothing could be verified"
        )
    problem = _malformed(info.sha, files)
    if problem:
        raise HubUnavailable(
            f"hub {repo}: the hub sent a malformed {problem}; nothing was fetched",
            "check HF_ENDPOINT: it should be the Hugging Face hub or a faithful mirror",
        )
    return RepoPlan(repo=repo, revision=revision, commit=info.sha, files=files)


def cached_plan(repo: str, revision: str = "main") -> RepoPlan | None:
    """A plan for a revision already in the cache, for when the hub cannot be asked.

    Every cached file is a link to a blob named by its hash, so it can still be verified.
    """
    probe = RepoPlan(repo=repo, revision=revision, commit="")
    ref = probe.storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = probe.storage / "snapshots" / commit
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not snap.is_dir():
        return None
    files = []
    for p in sorted(snap.rglob("*")):
        if not p.is_symlink() or not p.exists():
            continue
        rel, etag = p.relative_to(snap).as_posix(), Path(os.readlink(p)).name
        if not _wanted(rel):
            continue
        is_sha256 = bool(re.fullmatch(r"[0-9a-f]{64}", etag))
        files.append(
            RemoteFile(
                rel, p.stat().st_size, etag if is_sha256 else None, None if is_sha256 else etag
            )
        )
    try:
        _check_mlx(repo, files)
    except UnsupportedModel:
        return None
    return RepoPlan(repo=repo, revision=revision, commit=commit, files=files)


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read once."""
    sha256, git_sha1 = digests(path, [hashlib.sha256(), git_blob_sha1(path.stat().st_size)])
    return sha256, git_sha1


def verify(path: Path, f: RemoteFile) -> str | None:
    """None when `path` holds exactly `f`; otherwise why not."""
    size = path.stat().st_size
    if size != f.size:
        return f"size {size} instead of {f.size}"
    sha256, git_sha1 = file_hashes(path)
    if f.sha256 and sha256 != f.sha256:
        return f"sha256 {sha256[:12]}… instead of {f.sha256[:12]}…"
    if not f.sha256 and f.blob_id and git_sha1 != f.blob_id:
        return f"git sha1 {git_sha1[:12]}… instead of {f.blob_id[:12]}…"
    return None


def _bar_class(on_bytes: OnBytes) -> type:
    """A tqdm stand-in for `http_get` that forwards byte counts to our rich progress bar."""

    class _Bar:
        def __init__(self, **_: object):
            pass

        def update(self, n: int = 1) -> None:
            on_bytes(n)

        def close(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_: object) -> bool:
            return False

    return _Bar


def _download(p: RepoPlan, f: RemoteFile, on_bytes: OnBytes) -> None:
    """Fetch `f` into its partial file, continuing from the bytes already there."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = p.partial(f)
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and part.stat().st_size > f.size:
        on_bytes(-f.size)
        part.unlink()
    url = hf_hub_url(p.repo, f.path, revision=p.commit, endpoint=endpoint())
    try:
        with open(part, "ab") as fh:
            # identity: Range offsets must count the file's bytes, not a gzip stream's.
            headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
            http_get(
                url,
                fh,
                resume_size=fh.tell(),
                headers=headers,
                expected_size=f.size,
                displayed_filename=f.path,
                tqdm_class=_bar_class(on_bytes),
            )
    except HfHubHTTPError as e:
        raise DownloadError(
            f"{p.repo}/{f.path}: {_reason(e)}", "run the same command again to resume"
        ) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ResourceError(
                f"the disk filled up while downloading {p.repo}/{f.path}",
                "free some space and run the same command again: it resumes where it stopped",
            ) from e
        # Truncated by the server ("Consistency check failed"), or the network died for good.
        why = scrub(
            str(e).splitlines()[0] if str(e) else type(e).__name__, os.environ.get("HF_TOKEN")
        )
        raise DownloadError(
            f"{p.repo}/{f.path}: {why}", "run the same command again to resume"
        ) from e
    except Exception as e:  # httpx transport errors after huggingface_hub's own retries
        raise DownloadError(
            f"{p.repo}/{f.path}: {_reason(e)}", "run the same command again to resume"
        ) from e


def _link(p: RepoPlan, f: RemoteFile) -> None:
    """Point snapshots/<commit>/<path> at the blob, as huggingface_hub does."""
    pointer = p.snapshot / f.path
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    os.symlink(os.path.relpath(p.blob(f), pointer.parent), pointer)


def fetch_file(p: RepoPlan, f: RemoteFile, on_bytes: OnBytes) -> None:
    """Make `f` present and verified in the cache; a bad copy is fetched again, never kept.

    Raises:
        DownloadError: the file could not be fetched, or failed its checksum twice.
    """
    from filelock import FileLock

    blob = p.blob(f)
    lock = cache_dir() / ".locks" / p.storage.name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if blob.exists():
            if verify(blob, f) is None:
                _link(p, f)
                return
            blob.unlink()  # a damaged cache entry: fetch it again
            on_bytes(-f.size)
        problem = None
        for _ in range(ATTEMPTS):
            _download(p, f, on_bytes)
            part = p.partial(f)
            problem = verify(part, f)
            if problem is None:
                os.replace(part, blob)
                _link(p, f)
                return
            part.unlink()
            on_bytes(-f.size)
    raise DownloadError(
        f"{p.repo}/{f.path} failed its checksum twice ({problem}); it was deleted, not loaded",
        "the server or a proxy is sending damaged data; try again later or another source",
    )


def fetch(p: RepoPlan, on_bytes: OnBytes | None = None) -> Path:
    """Make every file of the plan present and verified; return the snapshot directory."""
    on_bytes = on_bytes or (lambda n: None)
    for f in p.files:
        fetch_file(p, f, on_bytes)
    if p.revision != p.commit:
        ref = p.storage / "refs" / p.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(p.commit)
    return p.snapshot
