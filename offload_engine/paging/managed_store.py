"""ManagedStore: optimizer-state pages in CUDA managed (unified) memory, bitsandbytes' approach,
kept as ``store="managed"`` for comparison with the pinned host store and its explicit copies.

The CUDA kernels update the pages where they lie; the driver migrates them. The managed
pipeline (cuda_pipeline.ManagedPagePipeline) prefetches each page to the GPU ahead of its
update and back to the host after it, so, as with the other stores, GPU memory holds only the
pages in flight between steps. (bitsandbytes leaves the pages on the GPU until the driver
needs the room.)

[Note: managed memory budget] Managed memory is invisible to torch's caching allocator and can
exceed the GPU's memory; a program that asks for more than the card has free can stall the
GPU itself, not only the program. So ``allocate`` refuses, with the numbers, any arena larger
than the GPU's free memory at that moment (torch.cuda.mem_get_info), and the check runs before
anything is allocated.
"""
from __future__ import annotations

import torch

from .stores import PageIOError, done_future, register_store


def _ops():
    from .. import kernels
    if not kernels.cuda_ops_built():
        raise ValueError("store='managed' needs the native ops built with CUDA (ops/csrc/cuda/managed_memory.cpp); "
                         "this build has no CUDA kernels")
    return torch.ops.offload_engine


@register_store
class ManagedStore:
    """All pages in one cudaMallocManaged arena; updated in place by the CUDA kernels."""

    kind = "managed"
    access = "managed"  # page_view() in managed memory, prefetch()/evict() ([PageStore] in protocols.py)
    in_place = True
    pin_memory = False
    path = None
    direct = None

    def __init__(self, page_bytes: int, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"store='managed' holds state for CUDA params; the params are on {device}")
        ops = _ops()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not ops.managed_supported(index):
            raise ValueError(f"store='managed': GPU {index} cannot prefetch managed memory (no concurrent managed "
                             "access, as on WSL and some virtual machines); use store='cpu'")
        self.page_bytes = page_bytes
        self.device = torch.device("cuda", index)
        self.num_pages = 0
        self._ops = ops
        self._arena = torch.empty(0, dtype=torch.uint8, device=self.device)

    @classmethod
    def from_spec(cls, spec, pinned: bool) -> "ManagedStore":
        return cls(spec.page_bytes, spec.device)

    def describe(self) -> str:
        return f"CUDA managed memory ({self.device})"

    @property
    def nbytes(self) -> int:
        return self._arena.numel()

    def allocate(self, num_pages: int) -> None:
        """Grows the arena to `num_pages` pages, keeping the existing pages' bytes; refuses
        beyond the GPU's free memory ([Note: managed memory budget]) and then keeps the old
        arena."""
        if num_pages <= self.num_pages:
            return
        want = num_pages * self.page_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        if want > free:
            raise PageIOError(
                f"store='managed': {want / 2**20:.1f} MiB of optimizer state would exceed the free memory of "
                f"{self.device} ({free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB); managed memory is never "
                "allocated beyond what the GPU has free. Use store='cpu' (pinned host pages) or store='nvme'")
        arena = self._ops.managed_empty(want, self.device.index)
        if self.num_pages:
            arena[: self._arena.numel()].copy_(self._arena)
        self._arena, self.num_pages = arena, num_pages
        self.evict(0, num_pages)  # at rest on the host, as the other stores keep it

    def page_view(self, page: int) -> torch.Tensor:
        return self._arena[page * self.page_bytes:(page + 1) * self.page_bytes]

    def prefetch(self, page: int) -> None:
        """Migrates a page to the GPU on the current stream."""
        self._ops.managed_prefetch(self.page_view(page), self.device.index)

    def evict(self, first: int, count: int = 1) -> None:
        """Migrates pages [first, first+count) to the host on the current stream."""
        view = self._arena[first * self.page_bytes:(first + count) * self.page_bytes]
        self._ops.managed_prefetch(view, -1)

    def read(self, page: int, buf: torch.Tensor):
        buf.copy_(self.page_view(page))
        return done_future()

    def write(self, page: int, buf: torch.Tensor):
        self.page_view(page).copy_(buf)
        return done_future()

    def commit(self, pages) -> None:
        """Writes land in place: nothing to switch."""

    def check(self) -> None:
        """Managed memory cannot go missing between steps."""

    def take_io_seconds(self) -> tuple[float, float]:
        return 0.0, 0.0

    def close(self) -> None:
        self._arena = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.num_pages = 0
