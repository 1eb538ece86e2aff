"""CudaExecutor: CUDA params, CUDA kernels, pages through device slots. The pipeline follows the
store's access ([PageStore] in protocols.py): pinned host pages (CudaPagePipeline), an NVMe file
through pinned staging slots (NvmePagePipeline), or managed memory (ManagedPagePipeline); all in
paging/cuda_pipeline.py. With overlap the pages are fed from a thread (PagerThread)."""
from __future__ import annotations

import queue
import threading

import torch

from .. import cuda_pipeline


class CudaExecutor:
    name = "cuda"
    pins_host = True   # host pages and staging slots: the async H2D/D2H copies need pinned memory
    overlaps = True
    pinned_bytes = 0

    def __init__(self, device: torch.device):
        self.device = device

    def make_pipeline(self, store, pool, prefetch_depth: int, device_slots: int):
        if store.access == "managed":
            return cuda_pipeline.ManagedPagePipeline(store, self.device, prefetch_depth)
        if store.access == "io":
            return cuda_pipeline.NvmePagePipeline(store, self.device, prefetch_depth, pool, device_slots)
        return cuda_pipeline.CudaPagePipeline(store, self.device, prefetch_depth, device_slots)

    def feeder(self, pipeline, threaded: bool):
        if not threaded:
            from . import DirectFeeder
            return DirectFeeder(pipeline)
        return PagerThread(pipeline, self.device)

    def stage(self, jobs: dict, table):
        from . import Staged
        return Staged({}, frozenset())  # no page is updated in host memory

    def stats(self) -> dict:
        return {}

    def wrap_update(self, update, table):
        return update

    def restore_by(self, store) -> None:
        return None  # pages are not kept yet on the GPU path: its updates write device slots that go back by copy

    def rewind(self, pipeline) -> None:
        raise RuntimeError("CudaExecutor keeps no page to rewind (restore_by is None)")

    def end_step(self) -> None:
        """The pipeline's finish() already ordered the caller's stream after the last page."""


class PagerThread:
    """Feeds an overlapped step's pages to the CUDA pipeline from its own thread.

    Why a thread: the backward hooks run on the autograd thread, which also issues the backward
    kernels. Enqueuing a page's copies and update takes that thread some tens of microseconds,
    and once the GPU's launch queues are full each enqueue waits for the GPU; done in the hook,
    both would hold back backward's own kernels. The hook only records an event on backward's
    stream (the grads of these pages are enqueued before it) and posts the pages here; this
    thread makes the update stream wait for that event ([Note: CUDA page pipeline])."""

    def __init__(self, pipeline, device: torch.device):
        self.pipeline = pipeline
        self.device = device
        self.error: BaseException | None = None
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oe-pager", daemon=True)
        self._thread.start()

    def feed(self, pages) -> None:
        if self.error is not None:
            raise self.error
        # The event marks backward's stream after these pages' grads: the updates wait for it.
        self._queue.put((pages, torch.cuda.current_stream(self.device).record_event()))

    @torch.no_grad()  # grad mode is per thread: the updates write params in place, untracked
    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.pipeline.feed(*item)
                except BaseException as err:  # reported by the next feed() or by join()
                    self.error = err

    def join(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
