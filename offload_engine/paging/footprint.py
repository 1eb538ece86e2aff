"""The one footprint rule: how many page slots a pager holds, and so how many bytes of each tier
(GPU, pinned host, host, disk) its optimizer state costs. The pager sizes its pools with it,
and the config's validation, the admission check, the docs and the main job's report read it
from here, so they cannot disagree.

[Note: slot rule] Per store and executor (k = prefetch_depth):
  host store,   CPU executor    no slot: the kernels update the stored pages in place
  host store,   CUDA executor   k + 2 device slots (k coming in, one updating, one going out:
                                a copy in never queues behind the copy out of the page just
                                updated); the pinned host pages are copied from directly
  NVMe store,   CPU executor    k + 2 host slots (k fetching, one updating, one writing back)
  NVMe store,   CUDA executor   k + 2 device slots as above, and k + 3 pinned host staging
                                slots: one more than the CPU case, so a page's write to the
                                file overlaps the next pages' reads
  managed store (CUDA only)     no slot: the driver migrates the pages, updated in place
  host store,   hybrid          the CUDA executor's k + 2 device slots; its host side updates
                                the other pages in place (executors/hybrid.py)
A step allocates nothing beyond these. An NVMe file holds two copies of every page ([Note:
shadow pages] in nvme_store.py: its ``copies_per_page``); a host-side slot pool is 4 KiB
aligned (one SLOT_ALIGN more).
DeepSpeed's ``offload_optimizer.buffer_count`` counts the NVMe store's host slots with the CPU
executor, hence ``prefetch_depth_for_buffer_count``.
"""
from __future__ import annotations

import dataclasses

from .pool import SLOT_ALIGN
from .stores import store_type

EXECUTORS = ("cpu", "cuda", "hybrid")  # resolved: what runs the update kernels


@dataclasses.dataclass(frozen=True)
class Slots:
    """Page slots a pager holds: on the host (pinned when a GPU copies from them) and on the GPU."""

    host: int
    host_pinned: bool
    device: int


def slots(store: str, executor: str, prefetch_depth: int) -> Slots:
    """[Note: slot rule], by how the store's bytes are reached (its ``access``, protocols.py):
    a store read through slots ("io") needs host slots, one in host memory ("view") none, and
    managed memory no slot at all."""
    access = store_type(store).access
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}; got {executor!r}")
    cuda = executor in ("cuda", "hybrid")  # the hybrid's device side holds the CUDA executor's slots
    if executor == "hybrid" and access != "view":
        raise ValueError(f"executor 'hybrid' updates host pages in place; the {store!r} store is not in host memory")
    if access == "managed":
        return Slots(0, False, 0)
    device = prefetch_depth + 2 if cuda else 0
    host = prefetch_depth + (3 if cuda else 2) if access == "io" else 0
    return Slots(host, cuda and host > 0, device)


def prefetch_depth_for_buffer_count(buffer_count: int) -> int:
    """The prefetch depth whose NVMe store, CPU executor, holds `buffer_count` host slots."""
    return buffer_count - slots("nvme", "cpu", 0).host


def slot_rule_text() -> str:
    """The slot rule in one sentence, for config field descriptions and generated docs."""
    return ("the pager holds prefetch_depth + 2 page slots (on the host for an NVMe store with the CPU "
            "executor, on the GPU with the CUDA or hybrid executor; an NVMe store with the CUDA executor adds "
            "prefetch_depth + 3 pinned host staging slots; host RAM with the CPU executor and managed memory "
            "need none)")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes of optimizer state per tier. `pinned_host` is host RAM too (page-locked)."""

    gpu: int = 0
    pinned_host: int = 0
    host: int = 0
    disk: int = 0

    @property
    def host_ram(self) -> int:
        """Host RAM of either kind: what the node's memory must hold."""
        return self.host + self.pinned_host

    def __add__(self, other: "Footprint") -> "Footprint":
        return Footprint(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def beyond(self, held: "Footprint") -> "Footprint":
        """What is still to be allocated when `held` is already there (never negative)."""
        return Footprint(*(max(0, a - b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(held))))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def slot_pool_bytes(num_slots: int, page_bytes: int) -> int:
    """A host slot pool's allocation (SlotPool: slots plus alignment slack)."""
    return num_slots * page_bytes + SLOT_ALIGN if num_slots else 0


def footprint(store: str, executor: str, prefetch_depth: int, page_bytes: int, num_pages: int) -> Footprint:
    """Bytes per tier of a pager with `num_pages` pages ([Note: slot rule]). The CPU executor
    for CUDA params adds pinned copies of the params and grads it updates, which depend on the
    params, not the pages (CudaParamsOnCpu.pinned_bytes)."""
    s = slots(store, executor, prefetch_depth)
    access = store_type(store).access
    pages = num_pages * page_bytes
    gpu = s.device * page_bytes
    pool = slot_pool_bytes(s.host, page_bytes)
    if access == "io":
        return Footprint(gpu=gpu, pinned_host=pool if s.host_pinned else 0, host=0 if s.host_pinned else pool,
                         disk=store_type(store).copies_per_page * pages)
    if access == "managed":
        return Footprint(host=pages)  # managed memory rests on the host; pages in flight visit the GPU
    pinned = executor in ("cuda", "hybrid")  # the CUDA executor (and the hybrid's device side) copies pinned pages
    return Footprint(gpu=gpu, pinned_host=pages if pinned else 0, host=0 if pinned else pages)
