"""Build of edgeai's optional C++ kernels (kernels/cpu, CMake); everything else is in
pyproject.toml.

A failed or impossible build (no compiler, no CMake, EDGEAI_NO_KERNELS=1) never fails the
install: edgeai then runs on MLX's built-in kernels and says so once at load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configure and build with CMake; on any failure warn and install without kernels."""

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                if os.environ.get("EDGEAI_NO_KERNELS"):
                    raise RuntimeError("EDGEAI_NO_KERNELS is set")
                self._cmake(ext)
            except Exception as e:  # noqa: BLE001 - any build failure means "no kernels", not "no install"
                print(
                    f"warning: edgeai C++ kernels not built ({e}); "
                    "edgeai will use MLX's built-in kernels",
                    file=sys.stderr,
                )
                # Drop it so setuptools does not try to install a file that was never made.
                for lst in (self.extensions, self.distribution.ext_modules or []):
                    if ext in lst:
                        lst.remove(ext)

    def _cmake(self, ext: CMakeExtension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build = Path(self.build_temp).resolve() / "kernels-cpu"
        build.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_exe()
        cfg = [
            cmake,
            str(ext.source_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DEDGEAI_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        subprocess.run(cfg, cwd=build, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build, check=True)
        if not out.exists():
            raise RuntimeError(f"CMake did not produce {out.name}")


def _cmake_exe() -> str:
    try:  # the `cmake` PyPI package, when the build environment has it
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


setup(
    ext_modules=[CMakeExtension("edgeai._edgeai_kernels", ROOT / "kernels" / "cpu")],
    cmdclass={"build_ext": CMakeBuild},
)
