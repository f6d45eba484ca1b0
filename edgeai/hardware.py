"""What this machine has: memory, free disk, platform, and which MLX backend runs.

The store asks it whether a model fits before downloading; `edgeai doctor` prints it.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from edgeai.errors import ResourceError

# Room kept free beyond the bytes a download needs: logs, temp files, the OS itself.
DISK_MARGIN = 64 * 2**20


@dataclass(frozen=True)
class Memory:
    total: int
    available: int


def memory() -> Memory:
    vm = psutil.virtual_memory()
    return Memory(total=int(vm.total), available=int(vm.available))


def free_disk(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would, once it is created)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def mlx_backend() -> str:
    """ "metal", "cuda" or "cpu": where MLX runs arrays by default on this machine."""
    try:
        import mlx.core as mx
    except ImportError:
        return "none (mlx is not installed)"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def platform_info() -> dict[str, str | int]:
    """OS, CPU and library versions, for `edgeai doctor` and bug reports."""
    try:
        import mlx.core as mx

        mlx_version = mx.__version__
    except ImportError:
        mlx_version = "not installed"
    return {
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "python": platform.python_version(),
        "mlx": mlx_version,
        "backend": mlx_backend(),
    }


def fits_memory(needed: int | None) -> bool | None:
    """Whether a model needing `needed` bytes fits in the memory available now (None if unknown)."""
    if needed is None:
        return None
    return needed <= memory().available


def check_memory(
    needed: int | None, what: str, force: bool = False, hint: str | None = None
) -> None:
    """Refuse a model that does not fit in available memory, unless forced.

    Raises:
        ResourceError: `needed` is more than the memory available now.
    """
    if force or needed is None:
        return
    mem = memory()
    if needed > mem.available:
        raise ResourceError(
            f"{what} needs about {human_bytes(needed)} of memory; this machine has "
            f"{human_bytes(mem.available)} available ({human_bytes(mem.total)} total)",
            hint
            or (
                "close other programs, pick a smaller model (`edgeai list`), "
                f"or `edgeai pull {what} --force` to try anyway"
            ),
        )


def check_disk(needed: int | None, path: str | Path, what: str) -> None:
    """Refuse to write `needed` bytes under `path` when the disk cannot hold them.

    Raises:
        ResourceError: not enough free space (with a margin).
    """
    if not needed or needed <= 0:
        return
    free = free_disk(path)
    if needed + DISK_MARGIN > free:
        raise ResourceError(
            f"{what} needs {human_bytes(needed)} of disk under {path}; "
            f"only {human_bytes(free)} is free",
            "free some space (`edgeai rm` unused models) "
            "or move the store with EDGEAI_HOME / HF_HOME",
        )


def summary() -> dict:
    """Everything above as one JSON-ready dict."""
    return {**platform_info(), "memory": asdict(memory())}


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
