"""Executors: what runs the update kernels on a step's pages, and the pipeline that brings the
pages to them. Chosen in one place, ``make_executor``:

  cpu.CpuExecutor            CPU params, SIMD CPU kernels; pages in place (host store) or
                             through host slots (NVMe store): paging/scheduler.py
  cpu_for_cuda.CpuForCudaExecutor
                             CUDA params, SIMD CPU kernels (the ZeRO-Offload-style path): the
                             params and grads are copied to pinned host buffers first
  cuda.CudaExecutor          CUDA params, CUDA kernels through device slots:
                             paging/cuda_pipeline.py (one pipeline per store access)

Every executor has the members of ``Executor`` below; the Pager and the optimizer's step talk
to nothing else.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..protocols import PagePipeline, PageStore


class Feeder(Protocol):
    """Hands pages to a pipeline: directly, or from a thread of its own (CUDA overlap)."""

    def feed(self, pages) -> None: ...

    def join(self) -> None:
        """Returns once every page fed is in the pipeline; raises the feeding's error."""


class Executor(Protocol):
    name: str           # "cpu" | "cuda": what the config and paging_stats() call it
    pins_host: bool     # host pages and slots are pinned (a GPU copies from them)
    overlaps: bool      # can take pages while backward runs

    @property
    def pinned_bytes(self) -> int:
        """Pinned host bytes it keeps beside the pager's (param and grad copies)."""

    def make_pipeline(self, store: PageStore, pool, prefetch_depth: int, device_slots: int) -> PagePipeline: ...

    def feeder(self, pipeline: PagePipeline, threaded: bool) -> Feeder: ...

    def stage(self, jobs: dict) -> dict:
        """{key: (flat param, flat grad)} as the kernels will read them (host copies for the
        CPU executor with CUDA params); the identity elsewhere."""

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


class DirectFeeder:
    """Pages go into the pipeline on the caller's thread."""

    def __init__(self, pipeline: PagePipeline):
        self.pipeline = pipeline

    def feed(self, pages) -> None:
        with torch.no_grad():  # from a backward hook too: the updates write params in place, untracked
            self.pipeline.feed(pages)

    def join(self) -> None:
        """Nothing is queued: feed() ran the pages (or queued them in the pipeline)."""


def make_executor(executor: str, device: torch.device) -> Executor:
    """The executor for resolved `executor` ("cpu" | "cuda") and params on `device`."""
    if executor == "cuda":
        from .cuda import CudaExecutor
        return CudaExecutor(device)
    if device.type == "cuda":
        from .cpu_for_cuda import CpuForCudaExecutor
        return CpuForCudaExecutor(device)
    from .cpu import CpuExecutor
    return CpuExecutor()


__all__ = ["Executor", "Feeder", "DirectFeeder", "make_executor"]
