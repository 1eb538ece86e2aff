"""The CUDA sources build on machines without a GPU (CI has nvcc but no GPU): every .cu in
ops/csrc/cuda compiles with nvcc for sm_80 and sm_90 with the project's flags, with no
register spills; the torch registration compiles against torch's headers; and the build
configuration keeps CUDA sources out of CPU builds."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offload_engine import _build

CSRC = _build.csrc_dir()
CU_SOURCES = sorted(Path(p) for p in _build.cuda_sources(CSRC) if p.endswith(".cu"))
ARCHS = ("80", "90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def test_cuda_sources_exist_and_stay_out_of_cpu_builds():
    cpp = [Path(p) for p in _build.cpp_sources(CSRC)]
    cuda = [Path(p) for p in _build.cuda_sources(CSRC)]
    assert {p.name for p in CU_SOURCES} >= {"adam_fp32_state.cu", "adam_blockwise.cu"}
    assert CSRC / "cuda" / "adam_cuda_op.cpp" in cuda  # the registration is built with the kernels
    assert not any((CSRC / "cuda") in p.parents for p in cpp)
    assert CSRC / "adam_op.cpp" in cpp and CSRC / "adam_op_common.cpp" in cpp


def test_nvcc_flags_keep_exact_math_and_honour_the_arch_override(monkeypatch):
    monkeypatch.delenv("OFFLOAD_ENGINE_CUDA_ARCHS", raising=False)
    flags = _build.nvcc_flags()
    assert "--fmad=false" in flags and not any("fast_math" in f or "ftz=true" in f for f in flags)
    assert [f for f in flags if "gencode" in f] == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    monkeypatch.setenv("OFFLOAD_ENGINE_CUDA_ARCHS", "90")
    assert [f for f in _build.nvcc_flags() if "gencode" in f] == ["-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setenv("OFFLOAD_ENGINE_CUDA_ARCHS", "sm90")
    with pytest.raises(ValueError, match="OFFLOAD_ENGINE_CUDA_ARCHS"):
        _build.nvcc_flags()


@pytest.fixture(scope="module")
def nvcc_reports(tmp_path_factory):
    """Every .cu compiled for sm_80 and sm_90 with the project's nvcc flags, all at once (the
    machine's cores compile them side by side): {source: (returncode, command, stderr)}."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    out = tmp_path_factory.mktemp("nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    procs = {}
    for source in CU_SOURCES:
        # No include path of our own: setup.py passes none, so the sources must find their headers.
        cmd = [NVCC, "-c", str(source), "-o", str(out / f"{source.stem}.o"), *_build.NVCC_FLAGS, *gencode,
               "-Xptxas=-v", f"--threads={len(ARCHS)}"]  # the archs in parallel, too
        procs[source] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = {}
    for source, (cmd, proc) in procs.items():
        _, stderr = proc.communicate(timeout=600)
        reports[source] = (proc.returncode, " ".join(cmd), stderr)
    return reports


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90_without_spills(nvcc_reports, source):
    returncode, cmd, stderr = nvcc_reports[source]
    assert returncode == 0, f"{cmd}\n{stderr[-4000:]}"
    assert "warning" not in stderr.lower().replace("ptxas info", ""), stderr[-4000:]
    # ptxas reports each kernel per arch: a spill means local-memory traffic in a bandwidth-bound
    # kernel (too many live values, or an array indexed at run time).
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", stderr)
    assert len(frames) >= 2 * len(ARCHS), stderr[-2000:]
    assert all(stores == loads == "0" for _, stores, loads in frames), stderr[-4000:]
    compiled_for = set(re.findall(r"for 'sm_(\d+)'", stderr))
    assert compiled_for == set(ARCHS), compiled_for


def _torch_cuda_headers():
    from torch.utils import cpp_extension

    paths = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in paths):
        return None
    return paths


def _nvcc_include_dir(tmp_path):
    """The CUDA include directory nvcc itself uses (nvcc may be a wrapper script elsewhere)."""
    (tmp_path / "empty.cu").write_text("")
    proc = subprocess.run([NVCC, "--dryrun", "-c", str(tmp_path / "empty.cu")], capture_output=True, text=True,
                          timeout=60)
    for candidate in re.findall(r'-I"?([^"\s]+)', proc.stdout + proc.stderr):
        if (Path(candidate) / "cuda_runtime_api.h").is_file():
            return Path(candidate)
    return None


CUDA_CPP = sorted(Path(p) for p in _build.cuda_sources(CSRC) if p.endswith(".cpp"))


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_CPP, ids=lambda p: p.name)
def test_cuda_registration_compiles_against_torch_headers(tmp_path, source):
    """Each host-side CUDA file (the CUDA dispatch-key registrations, the managed-memory ops)
    compiles as the CUDA build compiles it, against this torch's headers. A CPU-only torch ships c10/cuda but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, so the test supplies its one definition."""
    torch_includes = _torch_cuda_headers()
    if torch_includes is None:
        pytest.skip("this torch ships no c10/cuda headers")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    cuda_include = _nvcc_include_dir(tmp_path)
    if cuda_include is None:
        pytest.skip(f"{NVCC} --dryrun names no directory with cuda_runtime_api.h")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in torch_includes):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig

    cmd = [cxx, "-fsyntax-only", "-std=c++17", f"-D{_build.CUDA_DEFINE}=1", f"-I{tmp_path / 'stub'}",
           *[f"-I{p}" for p in torch_includes], f"-I{cuda_include}",
           f"-I{sysconfig.get_paths()['include']}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_cuda_test_module_is_marked_and_skips_without_a_gpu():
    """tests/test_cuda_kernels.py carries the cuda marker and, on a machine without a GPU,
    skips every test with the reason rather than failing or passing vacuously."""
    path = Path(__file__).with_name("test_cuda_kernels.py")
    assert "pytestmark = pytest.mark.cuda" in path.read_text()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests run for real")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(path)], capture_output=True, text=True,
                          timeout=600, cwd=path.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" not in proc.stdout and "skipped" in proc.stdout, proc.stdout[-3000:]
    assert "torch.cuda.is_available() is False" in proc.stdout, proc.stdout[-3000:]
