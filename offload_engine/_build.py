"""What the native `ops` build compiles and with which flags.

One source of truth for `setup.py` (ahead-of-time build) and `_native.py` (JIT fallback).
This module imports nothing heavy, so setup.py can load it by path before torch is needed.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

EXTENSION_NAME = "offload_engine._C"

# -ffp-contract=off: [Note: one update math] in ops/csrc/cpu/adam_kernel.h; every path must
# round each mul and add separately so the kernels and the PyTorch reference agree bit for bit.
# -fopenmp: at::parallel_for's `#pragma omp parallel` is inlined into our module; without it
# the kernel silently runs on one thread. libgomp.so.1 resolves to the copy torch already
# loaded, so the threads are torch's pool and follow torch.set_num_threads().
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]
# CUDA archs the .cu sources must build for (checked by nvcc even on CPU-only machines).
CUDA_ARCHS = ("80", "90")


def csrc_dir(package_dir: Path | None = None) -> Path:
    """Where ops/csrc lives: the source tree (editable install) or the copy in the package."""
    package_dir = package_dir or Path(__file__).resolve().parent
    for candidate in (package_dir / "_csrc", package_dir.parent / "ops" / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"ops/csrc not found next to {package_dir}")


def cpp_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.cpp"))


def cuda_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "cuda").rglob("*.cu")) if (root / "cuda").is_dir() else []


def cxx_flags() -> list[str]:
    # MSVC spells these differently; the project builds with GCC or Clang.
    return [] if platform.system() == "Windows" else list(CXX_FLAGS)


def ld_flags() -> list[str]:
    return [] if platform.system() == "Windows" else list(LD_FLAGS)


def build_ops_requested() -> bool:
    """OFFLOAD_ENGINE_BUILD_OPS=0 skips the native build in setup.py (the package then JIT
    builds on first use, or falls back to the PyTorch reference)."""
    return os.environ.get("OFFLOAD_ENGINE_BUILD_OPS", "1").strip().lower() not in ("0", "false", "no", "off")
