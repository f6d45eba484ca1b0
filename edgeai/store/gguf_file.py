"""Read a GGUF file's header (metadata and tensor table) and check its tensor data ranges.

`gguf.GGUFReader` builds a numpy view per string, ~10 s for a 262k-token vocabulary on a
small CPU; this reads the same header in well under a second, and refuses a file whose
tensors point outside it or overlap each other before any of their bytes are used.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value type id → struct format (scalars) or numpy dtype (arrays); 8 string, 9 array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_DTYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


class MalformedGGUF(ValueError):
    """The header or tensor table is inconsistent with the file."""


@dataclass
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy order: rows first, GGUF's ne0 (the row length) last
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def qtype(self) -> GGMLQuantizationType | None:
        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            return None

    @property
    def type_name(self) -> str:
        q = self.qtype
        return q.name if q is not None else f"type#{self.type_id}"


class GGUFFile:
    """A GGUF file's metadata (`fields`), tensor table and memory-mapped tensor bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            empty = self.path.stat().st_size == 0  # mmap refuses empty files
            self._map = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        self.fields: dict[str, Any] = {}
        self.tensors: list[TensorInfo] = []
        self._parse()

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes (read-only, mapped from the file)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    # -- parsing ----------------------------------------------------------------------------

    def _take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._map):
            raise MalformedGGUF("the header is cut short")
        (v,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += size
        return v

    def _str(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._map):
            raise MalformedGGUF("the header is cut short")
        s = bytes(self._map[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == 8:
            return self._str()
        if vtype == 9:
            sub, n = self._take("<I"), self._take("<Q")
            if sub == 8:
                return [self._str() for _ in range(n)]
            if sub in _DTYPES:
                dt = np.dtype(_DTYPES[sub])
                if self._pos + n * dt.itemsize > len(self._map):
                    raise MalformedGGUF("the header is cut short")
                arr = np.frombuffer(self._map, dtype=dt, count=n, offset=self._pos).copy()
                self._pos += n * dt.itemsize
                return arr
            return [self._value(sub) for _ in range(n)]
        raise MalformedGGUF(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        if bytes(self._map[:4]) != b"GGUF":
            raise MalformedGGUF("bad magic bytes")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise MalformedGGUF(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._take("<I")
            if n_dims > 4:
                raise MalformedGGUF(f"tensor '{name}' has {n_dims} dimensions")
            dims = [self._take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._take("<I"), self._take("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise MalformedGGUF(f"alignment {align} is not a power of two")
        start = -(-self._pos // align) * align
        for name, dims, type_id, rel in infos:
            self.tensors.append(self._tensor(name, dims, type_id, start + rel))
        self._check_ranges()

    def _tensor(self, name: str, dims: list[int], type_id: int, offset: int) -> TensorInfo:
        info = TensorInfo(name, type_id, tuple(reversed(dims)), offset, 0)
        if info.qtype is None or info.qtype not in GGML_QUANT_SIZES:
            return info  # refused later by type; its size is unknown
        block, size = GGML_QUANT_SIZES[info.qtype]
        if dims and dims[0] % block:
            raise MalformedGGUF(f"tensor '{name}' has rows of {dims[0]}, not a multiple of {block}")
        info.nbytes = int(np.prod(dims, dtype=np.int64)) // block * size
        return info

    def _check_ranges(self) -> None:
        names = set()
        end = len(self._map)
        for t in self.tensors:
            if t.name in names:
                raise MalformedGGUF(f"tensor '{t.name}' appears twice")
            names.add(t.name)
            if t.offset + t.nbytes > end:
                raise MalformedGGUF(
                    f"tensor '{t.name}' ends at byte {t.offset + t.nbytes}, "
                    f"past the end of the file ({end} bytes)"
                )
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors if t.nbytes)
        for (_, a_end, a), (b_start, _, b) in pairwise(spans):
            if b_start < a_end:
                raise MalformedGGUF(f"tensors '{a}' and '{b}' overlap in the file")
