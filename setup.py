"""Builds shl_kernels._C through CMakeLists.txt (pybind11, OpenMP, CUDA when nvcc is found).

Environment: SHL_CUDA=0|1 forces the CUDA kernels off/on (default: when nvcc is found),
SHL_CUDA_ARCH="80;90" picks the GPU architectures, SHL_MARCH the CPU -march (default native),
SHL_BUILD_TYPE=Release|Debug.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake() -> str:
    try:  # the pip "cmake" package (setup_env installs it) is newer than most distro cmakes
        from cmake import CMAKE_BIN_DIR

        return str(Path(CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        exe = shutil.which("cmake")
        if exe is None:
            sys.exit("shl-kernels: cmake not found; install it with `pip install cmake ninja`")
        return exe


def _need(tool: str, hint: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"shl-kernels: no C++ compiler ({tool}) found; {hint}")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not os.environ.get("CXX"):
            _need("c++", "install one, e.g. `apt-get install g++` or `conda install gxx`")
        try:
            import pybind11
        except ImportError:
            sys.exit("shl-kernels: pybind11 is missing; `pip install pybind11` (the build uses "
                     "--no-build-isolation, so build requirements come from your environment)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = {"0": "OFF", "1": "ON"}.get(os.environ.get("SHL_CUDA", ""), "AUTO")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SHL_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSHL_CUDA={cuda}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('SHL_CUDA_ARCH', '80;90')}",
            f"-DSHL_MARCH={os.environ.get('SHL_MARCH', 'native')}",
        ]
        if shutil.which("ninja") or _has_ninja_module():
            args.append("-GNinja")
        cmake = _cmake()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(ext_modules=[Extension("shl_kernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
