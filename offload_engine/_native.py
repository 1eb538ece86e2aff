"""Loading the native ops: prebuilt module, else a JIT build, else the PyTorch reference.

OFFLOAD_ENGINE_OPS chooses: ``auto`` (default: prebuilt, then JIT, then reference), ``aot``
(prebuilt only), ``jit`` (JIT build only), ``reference`` (never load native code).
The JIT build is cached under OFFLOAD_ENGINE_JIT_DIR (default ~/.cache/offload_engine/jit).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

from . import _build

log = logging.getLogger("offload_engine.ops")

_MODES = ("auto", "aot", "jit", "reference")


@dataclasses.dataclass(frozen=True)
class NativeOps:
    """How the ops were obtained in this process."""

    module: Optional[ModuleType]  # the loaded extension, None when running the reference
    kind: str  # "aot" | "jit" | "reference"
    detail: str  # path of the module, or why native code is not in use

    @property
    def available(self) -> bool:
        return self.module is not None


def _requested_mode() -> str:
    mode = os.environ.get("OFFLOAD_ENGINE_OPS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"OFFLOAD_ENGINE_OPS={mode!r} is not known; allowed: {', '.join(_MODES)}")
    return mode


def _load_aot() -> ModuleType:
    return importlib.import_module(_build.EXTENSION_NAME)


def _load_jit() -> ModuleType:
    """JIT-builds the ops: with their CUDA kernels when torch has CUDA and nvcc is found (built
    for the visible GPUs unless OFFLOAD_ENGINE_CUDA_ARCHS says otherwise), else (or if that
    build fails) the CPU ops alone."""
    from torch.utils import cpp_extension

    root = _build.csrc_dir()
    build_dir = Path(os.environ.get("OFFLOAD_ENGINE_JIT_DIR", Path.home() / ".cache" / "offload_engine" / "jit"))
    if _jit_cuda_possible(cpp_extension):
        try:
            return _jit_build(cpp_extension, root, build_dir / "cuda", cuda=True)
        except Exception as exc:  # a failed compile surfaces as several exception types
            log.warning("offload_engine: JIT build with CUDA kernels failed (%s: %s); building the CPU ops only",
                        type(exc).__name__, str(exc).strip().splitlines()[-1:])
    return _jit_build(cpp_extension, root, build_dir, cuda=False)


def _jit_cuda_possible(cpp_extension) -> bool:
    import torch

    return bool(_build.cuda_sources(_build.csrc_dir())) and torch.version.cuda is not None \
        and cpp_extension.CUDA_HOME is not None


def _jit_build(cpp_extension, root: Path, build_dir: Path, cuda: bool) -> ModuleType:
    build_dir.mkdir(parents=True, exist_ok=True)
    if not cuda:
        return cpp_extension.load(name="offload_engine_jit_C", sources=_build.cpp_sources(root),
                                  extra_cflags=_build.cxx_flags(), extra_ldflags=_build.ld_flags(),
                                  build_directory=str(build_dir), verbose=False)
    import torch

    archs = None
    if not os.environ.get("OFFLOAD_ENGINE_CUDA_ARCHS") and torch.cuda.is_available():
        archs = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return cpp_extension.load(name="offload_engine_jit_cuda_C",
                              sources=_build.cpp_sources(root) + _build.cuda_sources(root),
                              extra_cflags=_build.cxx_flags() + [f"-D{_build.CUDA_DEFINE}=1"],
                              extra_cuda_cflags=_build.nvcc_flags(archs), extra_ldflags=_build.ld_flags(),
                              build_directory=str(build_dir), with_cuda=True, verbose=False)


@functools.lru_cache(maxsize=None)
def native_ops() -> NativeOps:
    """Loads the ops once per process (a second registration of the same torch.library
    namespace would fail, so the result is cached rather than retried)."""
    mode = _requested_mode()
    reasons = []
    if mode == "reference":
        return NativeOps(None, "reference", "OFFLOAD_ENGINE_OPS=reference")
    if mode in ("auto", "aot"):
        try:
            mod = _load_aot()
            return NativeOps(mod, "aot", str(mod.__file__))
        except ImportError as exc:
            reasons.append(f"prebuilt module not importable ({exc})")
            if mode == "aot":
                raise ImportError(f"OFFLOAD_ENGINE_OPS=aot but {reasons[-1]}") from exc
            log.info("offload_engine: %s; building the ops just in time", reasons[-1])
    try:
        mod = _load_jit()
        return NativeOps(mod, "jit", str(mod.__file__))
    except Exception as exc:  # a failed compile surfaces as several exception types
        reasons.append(f"JIT build failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1:]})")
        if mode == "jit":
            raise
    detail = "; ".join(reasons)
    warnings.warn(
        f"offload_engine: native ops unavailable, using the (slower) PyTorch reference: {detail}",
        RuntimeWarning,
        stacklevel=2,
    )
    return NativeOps(None, "reference", detail)
