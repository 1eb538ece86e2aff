"""Build and install offload_engine.

    pip install --no-build-isolation -e .        # builds ops/csrc against the installed torch

--no-build-isolation matters: the native ops must compile against the torch already in the
environment (an isolated build would fetch another torch). OFFLOAD_ENGINE_BUILD_OPS=0 skips
the native build; the package then JIT-builds on first use or falls back to PyTorch.
"""
import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_oe_build", ROOT / "offload_engine" / "_build.py")
build_cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_cfg)
CSRC = ROOT / "ops" / "csrc"


class BuildPyWithSources(build_py):
    """Ship ops/csrc inside the package as offload_engine/_csrc, so an installed (non-editable)
    package can still JIT-build its ops when the prebuilt module is missing."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "offload_engine" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def native_extensions():
    if not build_cfg.build_ops_requested():
        print("offload_engine: OFFLOAD_ENGINE_BUILD_OPS=0, skipping the native ops build", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "offload_engine: building the native ops needs torch in this environment.\n"
            "  pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
            "or set OFFLOAD_ENGINE_BUILD_OPS=0 to install without them."
        )
    sources = [str(Path(s).relative_to(ROOT)) for s in build_cfg.cpp_sources(CSRC)]
    cu = [str(Path(s).relative_to(ROOT)) for s in build_cfg.cuda_sources(CSRC)]
    extra = {"cxx": build_cfg.cxx_flags()}
    use_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        extra["nvcc"] = build_cfg.nvcc_flags()
        extra["cxx"] = extra["cxx"] + [f"-D{build_cfg.CUDA_DEFINE}=1"]
        ext = cpp_extension.CUDAExtension(build_cfg.EXTENSION_NAME, sources + cu, extra_compile_args=extra,
                                          extra_link_args=build_cfg.ld_flags())
    else:
        ext = cpp_extension.CppExtension(build_cfg.EXTENSION_NAME, sources, extra_compile_args=extra,
                                         extra_link_args=build_cfg.ld_flags())
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = native_extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="offload_engine",
    version="0.1.0",
    description="Paged Adam: optimizer state in host RAM or on NVMe, streamed page by page to a SIMD CPU or CUDA update",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["offload_engine", "offload_engine.*"]),
    install_requires=["torch>=2.4", "ninja", "psutil", "pydantic>=2.5", "tqdm"],
    package_data={"offload_engine.train": ["data/*.txt", "data/*.json"]},
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "numpy", "transformers>=4.40", "peft>=0.10", "accelerate>=1.0", "matplotlib>=3.7",
                 # the mpiexec launcher test: MPICH's binary wheel (mpiexec) and mpi4py's (seconds to install)
                 "mpich", "mpi4py",
                 # the deepspeed launcher tests (one host, and two with a hostfile) and the DeepSpeed
                 # compatibility checks (loss scaler, schedulers); it installs no torch of its own
                 "deepspeed>=0.14",
                 # torch's own optimizer test machinery (torch.testing._internal) imports it
                 "expecttest",
                 # bitsandbytes' own constructors, to check ours against class by class (its CPU backend)
                 "bitsandbytes>=0.50"],
        "plot": ["matplotlib>=3.7"],
        "bench": ["deepspeed>=0.14", "bitsandbytes>=0.43", "torchao>=0.5", "matplotlib>=3.7", "py-cpuinfo"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["offload-engine-info=offload_engine.info:main",
                                     "offload-train=offload_engine.train.cli:main",
                                     "offload-plan=offload_engine.plan.cli:main"]},
)
