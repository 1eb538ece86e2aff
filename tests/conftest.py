import os

import pytest
import torch

from offload_engine._native import native_ops

SIMD_PATHS = ("avx512vbmi", "avx512", "avx2", "scalar")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (JIT build, large sizes)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA build of the ops (skipped without a GPU)")


@pytest.fixture(scope="session")
def native():
    """The native ops. A missing build fails the kernel tests rather than skipping them,
    unless the run asked for the reference explicitly (OFFLOAD_ENGINE_OPS=reference)."""
    ops = native_ops()
    if not ops.available:
        if os.environ.get("OFFLOAD_ENGINE_OPS") == "reference":
            pytest.skip("OFFLOAD_ENGINE_OPS=reference: native kernels not under test")
        pytest.fail(f"native ops did not load: {ops.detail}")
    return ops.module


@pytest.fixture(params=SIMD_PATHS)
def simd_path(request, native, monkeypatch):
    """Forces each SIMD path in turn through the documented environment override."""
    if request.param not in native.supported_simd_paths():
        pytest.skip(f"this CPU does not support {request.param}")
    monkeypatch.setenv("OFFLOAD_ENGINE_SIMD", request.param)
    assert native.selected_simd_path() == request.param
    return request.param


@pytest.fixture(scope="session")
def gpu():
    """The CUDA device the CUDA-marked tests run on; skips them without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: torch.cuda.is_available() is False")
    from offload_engine import kernels
    if not kernels.cuda_ops_built():
        pytest.fail("a GPU is present but the native ops have no CUDA kernels (build with a CUDA torch and nvcc: "
                    "pip install --no-build-isolation -e .)")
    return torch.device("cuda", torch.cuda.current_device())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so equality means bit-identical (NaN payloads included)."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def import_benchmark(name: str):
    """A module of benchmarks/ (not a package), imported without leaving that folder on sys.path."""
    import importlib
    import sys
    from pathlib import Path
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
