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
# --fmad=false: the same [Note: one update math] on the GPU (the kernels also spell every op
# with an explicitly rounded intrinsic, so the flag is a second guard). Never --use_fast_math:
# the kernels need correctly rounded sqrt and division and IEEE subnormals.
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]
# CUDA archs the .cu sources must build for (checked by nvcc even on CPU-only machines).
# OFFLOAD_ENGINE_CUDA_ARCHS (e.g. "90" or "80,90") overrides it for a build.
CUDA_ARCHS = ("80", "90")
# Defined in CUDA builds: module.cpp reports it in build_info(); ops/csrc/cuda is compiled.
CUDA_DEFINE = "OFFLOAD_ENGINE_WITH_CUDA"


def csrc_dir(package_dir: Path | None = None) -> Path:
    """Where ops/csrc lives: the source tree (editable install) or the copy in the package."""
    package_dir = package_dir or Path(__file__).resolve().parent
    for candidate in (package_dir / "_csrc", package_dir.parent / "ops" / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"ops/csrc not found next to {package_dir}")


def cpp_sources(root: Path) -> list[str]:
    """The C++ every build compiles: everything but ops/csrc/cuda (which needs CUDA headers)."""
    cuda_dir = root / "cuda"
    return sorted(str(p) for p in root.rglob("*.cpp") if cuda_dir not in p.parents)


def cuda_sources(root: Path) -> list[str]:
    """What a CUDA build adds: the kernels (*.cu) and their torch registration (*.cpp)."""
    cuda_dir = root / "cuda"
    if not cuda_dir.is_dir():
        return []
    return sorted(str(p) for p in cuda_dir.rglob("*") if p.suffix in (".cu", ".cpp"))


def cuda_archs() -> tuple[str, ...]:
    """The archs to build (OFFLOAD_ENGINE_CUDA_ARCHS="90" builds sm_90 only)."""
    raw = os.environ.get("OFFLOAD_ENGINE_CUDA_ARCHS", "").replace(";", ",").replace(" ", ",")
    archs = tuple(a.strip() for a in raw.split(",") if a.strip())
    for a in archs:
        if not a.isdigit():
            raise ValueError(f"OFFLOAD_ENGINE_CUDA_ARCHS={raw!r}: expected numbers such as 80,90 (sm_80, sm_90)")
    return archs or CUDA_ARCHS


def nvcc_flags(archs=None) -> list[str]:
    """nvcc's flags for `archs` (default: cuda_archs())."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (archs or cuda_archs())]
    return [*NVCC_FLAGS, *gencode, f"-D{CUDA_DEFINE}=1"]


def cxx_flags() -> list[str]:
    # MSVC spells these differently; the project builds with GCC or Clang.
    return [] if platform.system() == "Windows" else list(CXX_FLAGS)


def ld_flags() -> list[str]:
    return [] if platform.system() == "Windows" else list(LD_FLAGS)


def build_ops_requested() -> bool:
    """OFFLOAD_ENGINE_BUILD_OPS=0 skips the native build in setup.py (the package then JIT
    builds on first use, or falls back to the PyTorch reference)."""
    return os.environ.get("OFFLOAD_ENGINE_BUILD_OPS", "1").strip().lower() not in ("0", "false", "no", "off")
