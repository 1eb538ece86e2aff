"""Executors: what runs the update kernels on a step's pages, and the pipeline that brings the
pages to them. Chosen in one place, ``make_executor``:

  cpu.CpuExecutor            CPU params, SIMD CPU kernels; pages in place (host store) or
                             through host slots (NVMe store): paging/scheduler.py
  cpu_for_cuda.CpuForCudaExecutor
                             CUDA params, SIMD CPU kernels (the ZeRO-Offload-style path): the
                             params and grads are copied to pinned host buffers first
  cuda.CudaExecutor          CUDA params, CUDA kernels through device slots:
                             paging/cuda_pipeline.py (one pipeline per store access)
  hybrid.HybridExecutor      CUDA params, a step's pages split between the two above, run at
                             the same time ([Note: hybrid split] in hybrid.py)

Every executor has the members of ``Executor`` below; the Pager and the optimizer's step talk
to nothing else.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol

import torch

from ..protocols import PagePipeline, PageStore


class Feeder(Protocol):
    """Hands pages to a pipeline: directly, or from a thread of its own (CUDA overlap)."""

    def feed(self, pages) -> None: ...

    def join(self) -> None:
        """Returns once every page fed is in the pipeline; raises the feeding's error."""


@dataclasses.dataclass(frozen=True)
class Staged:
    """What Executor.stage() hands the step: the jobs ({key: (flat param, flat grad)}) the
    kernels read on the pages updated in host memory, and those pages (None: every page)."""

    jobs: dict
    pages: Optional[frozenset] = None


class Executor(Protocol):
    name: str           # "cpu" | "cuda" | "hybrid": what the config and paging_stats() call it
    pins_host: bool     # host pages and slots are pinned (a GPU copies from them)
    overlaps: bool      # can take pages while backward runs

    @property
    def pinned_bytes(self) -> int:
        """Pinned host bytes it keeps beside the pager's (param and grad copies)."""

    def make_pipeline(self, store: PageStore, pool, prefetch_depth: int, device_slots: int) -> PagePipeline: ...

    def feeder(self, pipeline: PagePipeline, threaded: bool) -> Feeder: ...

    def stage(self, jobs: dict, table) -> Staged:
        """Called once backward is over, for an executor that does not overlap: the params and
        grads ({key: (flat param, flat grad)}) as the kernels will read them on host pages
        (pinned host copies for CUDA params, all of them or, hybrid, those of its host pages)."""

    def wrap_update(self, update: Callable, table) -> Callable:
        """`update(page, buf)` with what must happen around each page (waiting for a param's
        host copy, copying it back to the GPU)."""

    def end_step(self) -> None: ...

    def restore_by(self, store: PageStore) -> str | None:
        """How a step's pages can be taken back ([Note: speculative pages] in pager.py): "copy"
        (the update writes the stored page itself: keep host copies of the pre-step bytes),
        "rewind" (pages go to uncommitted places: rewind() drops them), or None (not here)."""

    def rewind(self, pipeline: PagePipeline) -> None:
        """Drops the pages of the open step run so far ("rewind" above)."""

    def stats(self) -> dict:
        """Its own figures for paging_stats() (the hybrid's split); {} for most."""


class DirectFeeder:
    """Pages go into the pipeline on the caller's thread."""

    def __init__(self, pipeline: PagePipeline):
        self.pipeline = pipeline

    def feed(self, pages) -> None:
        with torch.no_grad():  # from a backward hook too: the updates write params in place, untracked
            self.pipeline.feed(pages)

    def join(self) -> None:
        """Nothing is queued: feed() ran the pages (or queued them in the pipeline)."""


def make_executor(executor: str, device: torch.device, gpu_fraction: float = 0.5,
                  rebalance: bool = True) -> Executor:
    """The executor for resolved `executor` ("cpu" | "cuda" | "hybrid") and params on `device`;
    `gpu_fraction` and `rebalance` are the hybrid's split ([Note: hybrid split])."""
    if executor == "hybrid":
        if device.type == "meta":  # planned, never stepped (a meta-param optimizer refuses step())
            from .cpu import CpuExecutor
            from .cuda import CudaExecutor
            from .hybrid import HybridExecutor
            return HybridExecutor(CudaExecutor(device), CpuExecutor(), gpu_fraction, rebalance, device)
        if device.type != "cuda":
            raise ValueError(f"executor 'hybrid' splits each step between the GPU and the CPU and needs CUDA "
                             f"params; the params are on {device} (use executor 'cpu')")
        from .cpu_for_cuda import CpuForCudaExecutor
        from .cuda import CudaExecutor
        from .hybrid import HybridExecutor
        return HybridExecutor(CudaExecutor(device), CpuForCudaExecutor(device), gpu_fraction, rebalance, device)
    if executor == "cuda":
        from .cuda import CudaExecutor
        return CudaExecutor(device)
    if device.type == "cuda":
        from .cpu_for_cuda import CpuForCudaExecutor
        return CpuForCudaExecutor(device)
    from .cpu import CpuExecutor
    return CpuExecutor()


__all__ = ["Executor", "Feeder", "DirectFeeder", "Staged", "make_executor"]
