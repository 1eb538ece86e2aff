"""CpuExecutor: CPU params, SIMD CPU kernels. A host store's pages are updated in place; an
NVMe store's go through the pager's host slots (PageScheduler, paging/scheduler.py)."""
from __future__ import annotations

from ..scheduler import PageScheduler
from . import DirectFeeder


class CpuExecutor:
    name = "cpu"
    pins_host = False
    overlaps = True
    updates_in_store = True  # with an in-place store the update writes the stored page itself
    pinned_bytes = 0

    def make_pipeline(self, store, pool, prefetch_depth: int, device_slots: int) -> PageScheduler:
        return PageScheduler(store, pool, prefetch_depth)

    def feeder(self, pipeline, threaded: bool) -> DirectFeeder:
        return DirectFeeder(pipeline)  # the kernels run on the caller's thread anyway

    def stage(self, jobs: dict) -> dict:
        return jobs

    def wrap_update(self, update, table):
        return update

    def end_step(self) -> None:
        """Nothing outlives a page's update."""
