"""CpuExecutor: CPU params, SIMD CPU kernels. A host store's pages are updated in place; an
NVMe store's go through the pager's host slots (PageScheduler, paging/scheduler.py)."""
from __future__ import annotations

from ..scheduler import PageScheduler
from . import DirectFeeder, Staged


class CpuExecutor:
    name = "cpu"
    pins_host = False
    overlaps = True
    pinned_bytes = 0

    def make_pipeline(self, store, pool, prefetch_depth: int, device_slots: int) -> PageScheduler:
        return PageScheduler(store, pool, prefetch_depth)

    def feeder(self, pipeline, threaded: bool) -> DirectFeeder:
        if threaded:  # an overlapped step: a store read through slots streams ([Note: streamed pages])
            pipeline.stream()
        return DirectFeeder(pipeline)  # in place, the kernels run on the caller's (hook's) thread

    def restore_by(self, store) -> str:
        # In place the update writes the stored page; through slots the writes go to each page's
        # other place, committed only at finish().
        return "copy" if store.in_place else "rewind"

    def rewind(self, pipeline: PageScheduler) -> None:
        pipeline.rewind()

    def stage(self, jobs: dict, table) -> Staged:
        return Staged(jobs)  # CPU params: the kernels read them where they are

    def stats(self) -> dict:
        return {}

    def wrap_update(self, update, table):
        return update

    def end_step(self) -> None:
        """Nothing outlives a page's update."""
