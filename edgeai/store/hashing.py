"""File digests, read once however many are needed (sha256, git's blob sha1)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

_CHUNK = 8 << 20


def digests(path: Path, hashers: list, on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Feed the file to every hasher in one pass; their hex digests, in order.

    Args:
        path: the file.
        hashers: hashlib objects, possibly already fed a header (git's "blob N\\0").
        on_bytes: called with each chunk's size (progress).
    """
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            for h in hashers:
                h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return [h.hexdigest() for h in hashers]


def sha256_file(path: Path) -> str:
    return digests(path, [hashlib.sha256()])[0]


def git_blob_sha1(size: int):
    """A sha1 hasher primed as git hashes a blob of `size` bytes (the hub's file ids)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h
