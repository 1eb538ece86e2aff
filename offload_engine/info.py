"""`python -m offload_engine.info`: what this installation runs on.

Prints the ops build (prebuilt, JIT or PyTorch reference), the SIMD path the CPU kernel uses
now and the ones this CPU supports, the thread count, and versions.
"""
from __future__ import annotations

import os
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__
    from ._native import native_ops

    ops = native_ops()
    info = {
        "offload_engine": __version__,
        "ops build": f"{ops.kind} ({ops.detail})",
        "simd path": ops.module.selected_simd_path() if ops.available else "reference (PyTorch)",
        "simd paths supported": ", ".join(ops.module.supported_simd_paths()) if ops.available else "-",
        "OFFLOAD_ENGINE_SIMD": os.environ.get("OFFLOAD_ENGINE_SIMD", "auto (unset)"),
        "threads (torch.get_num_threads)": torch.get_num_threads(),
        "compiler": ops.module.build_info().get("compiler", "?") if ops.available else "-",
        "cuda ops built": bool(ops.module.build_info().get("cuda")) if ops.available else False,
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "cuda available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def main(argv=None) -> int:
    try:
        info = collect()
    except (ValueError, ImportError) as exc:  # e.g. a bad OFFLOAD_ENGINE_SIMD / OFFLOAD_ENGINE_OPS value
        print(f"offload_engine.info: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
