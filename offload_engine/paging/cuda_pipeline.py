"""Paged Adam on a GPU: each step brings every page to the GPU, runs the CUDA kernel on it and
sends it back, `prefetch_depth` pages ahead of the one updating. One loop, three ways to move
a page, one per store:

  CudaPagePipeline     pinned host pages (HostStore with pin_memory): copied into device slots
                       and back on two copy streams
  NvmePagePipeline     NVMe file (NvmeStore): read by the IO threads into pinned staging
                       slots, then as above; written back from the staging slot once its copy
                       out has landed
  ManagedPagePipeline  CUDA managed memory (ManagedStore): prefetched to the GPU and back by
                       the driver, updated in place; no device slots

GPU memory for optimizer state is the device slots alone ([Note: slot rule] in footprint.py:
prefetch_depth + 2 pages), whatever the model size; for managed memory, the pages in flight.
Each class here is a PagePipeline (protocols.py); executors/cuda.py picks one by the store's
access.

[Note: CUDA page pipeline] Three streams beside the caller's, ordered by events only (the CPU
never waits on the GPU inside a step, it only enqueues; the NVMe pipeline's CPU waits are on
its IO threads):
  h2d stream      bring page i in (into slot s, after the write-back that last used slot s)
  update stream   the update of page i, after it is in and after the caller's work enqueued
                  before the page was handed over (its grads)
  d2h stream      send page i back, after the update
The caller's stream never waits for a page while the step runs, so with paging.overlap the
backward kernels are not held up by page copies (a first version ran the updates on the
caller's stream, which then waited for each page's copy in: backward stretched by most of
the paged step). The step ends by making the caller's stream wait for the last write-back
(which follows every update) and by synchronizing the d2h stream, so the params are updated
for the caller's next kernels and the stored pages hold the new state when step() returns
(state_dict, logical_state and the next step's reads all see it).
"""
from __future__ import annotations

import collections
import time

import torch

from .scheduler import StepStats, _update_error, phase


class CudaPagePipeline:
    """Pinned host pages <-> device slots ([Note: CUDA page pipeline])."""

    def __init__(self, store, device: torch.device, prefetch_depth: int, num_slots: int):
        self._check_store(store)
        self.store = store
        self.device = device
        self.prefetch_depth = prefetch_depth
        # [Note: slot rule] in footprint.py: prefetch_depth coming in, one being updated, one
        # going out, so a copy in never queues behind the copy out of the page just updated.
        self.num_slots = num_slots
        # One allocation for every slot: GPU memory for optimizer state is this, and constant.
        self._slots_mem = torch.empty(self.num_slots * store.page_bytes, dtype=torch.uint8, device=device)
        self.slots = [self._slots_mem[i * store.page_bytes:(i + 1) * store.page_bytes] for i in range(self.num_slots)]
        self.h2d = torch.cuda.Stream(device)   # pages in, beside the caller's stream
        self.d2h = torch.cuda.Stream(device)   # pages out, beside both
        self.upd = torch.cuda.Stream(device)   # the updates ([Note: CUDA page pipeline])
        self.pages_updated = 0

    @staticmethod
    def _check_store(store) -> None:
        if not getattr(store, "pin_memory", False):
            raise ValueError("the CUDA page pipeline needs a pinned host store (non_blocking copies)")

    @property
    def nbytes(self) -> int:
        """GPU bytes this pipeline holds for optimizer state."""
        return self._slots_mem.numel()

    # ---- the loop: run() = start(), feed() as pages become ready, finish() ----------------
    def run(self, pages, update) -> StepStats:
        self.start(update)
        self.feed(pages)
        return self.finish()

    def start(self, update) -> None:
        """Opens a step whose pages arrive through feed(); `update(page, buf)` enqueues a page's
        kernels on the current stream."""
        self._t0 = time.perf_counter()
        self.pages_updated = 0
        self._update = update
        self._stats = StepStats(slots=self.num_slots)
        self._compute = torch.cuda.current_stream(self.device)  # where the step's later work runs
        self._pages = []
        self._next_fetch = 0
        self._begin(self._stats)

    def feed(self, pages, after: torch.cuda.Event | None = None) -> None:
        """Updates `pages` in order, bringing up to prefetch_depth of them in ahead of the one
        updating; returns once every kernel is enqueued. Called by step() with all pages, or by
        the overlapped step's pager thread with the pages whose grads are final, `after` then
        being an event recorded on backward's stream once their grads were enqueued."""
        stats = self._stats
        first = len(self._pages)
        self._pages.extend(pages)
        # The updates run on their own stream, after everything the caller enqueued so far (the
        # grads; in backward also the kernels that still read these params). The caller's
        # stream itself never waits for a page: backward goes on while pages move.
        compute = self.upd
        compute.wait_event(after if after is not None else torch.cuda.current_stream(self.device).record_event())
        try:
            for i in range(first, len(self._pages)):
                page = self._pages[i]
                # Pages i+1..i+k are brought in while page i updates.
                with phase("fetch"):
                    while self._next_fetch < len(self._pages) and self._next_fetch <= i + self.prefetch_depth:
                        self._bring_in(self._next_fetch, self._pages[self._next_fetch], stats)
                        self._next_fetch += 1
                    buf, ready = self._arrived(i, page, stats)
                compute.wait_event(ready)                # the update reads the page only once it is in
                t = time.perf_counter()
                try:
                    with torch.cuda.stream(compute), phase("update"):
                        self._update(page, buf)          # enqueues the kernels on the update stream
                except Exception as err:
                    torch.cuda.synchronize(self.device)
                    raise _update_error(page, self.store, err) from err
                stats.update_s += time.perf_counter() - t
                self.pages_updated += 1
                with phase("writeback"):
                    self._send_back(i, page, compute.record_event(), stats)
        except BaseException:
            self._abandon()
            raise

    def abandon(self) -> None:
        """Drops an open step: what was enqueued completes, nothing more is stored (for NVMe,
        nothing is committed: the file keeps the pre-step pages)."""
        self._abandon()
        self._update = None

    def finish(self) -> StepStats:
        """Waits for the last pages to be stored and closes the step."""
        stats = self._stats
        t = time.perf_counter()
        try:
            with phase("writeback"):
                self._finish(self._compute, stats)
        except BaseException:
            self._abandon()
            raise
        stats.wait_s += time.perf_counter() - t
        stats.pages = len(self._pages)
        stats.peak_slots_in_use = min(self.num_slots, len(self._pages))
        stats.step_s = time.perf_counter() - self._t0
        self._update = None
        return stats

    # ---- how a page moves (pinned host pages) ---------------------------------------------
    def _begin(self, stats) -> None:
        self._slot_free = [None] * self.num_slots  # event: the last copy out of the slot is done
        self._ready = {}                           # k -> event: page k's copy in is done
        # The host pages may have been written by the CPU (load_state_dict) or a previous step's
        # d2h copies, which that step synchronized: the first copies need no extra wait.

    def _copy_in(self, k: int, source: torch.Tensor) -> None:
        slot = k % self.num_slots  # page k reuses the slot of page k - num_slots
        with torch.cuda.stream(self.h2d):
            if self._slot_free[slot] is not None:
                self.h2d.wait_event(self._slot_free[slot])  # the slot's previous page has left it
            self.slots[slot].copy_(source, non_blocking=True)
            self._ready[k] = self.h2d.record_event()

    def _copy_out(self, k: int, target: torch.Tensor, updated: torch.cuda.Event) -> torch.cuda.Event:
        slot = k % self.num_slots
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(updated)                # copy back only what the update wrote
            target.copy_(self.slots[slot], non_blocking=True)
            self._slot_free[slot] = self.d2h.record_event()
        return self._slot_free[slot]

    def _bring_in(self, k: int, page: int, stats) -> None:
        self._copy_in(k, self.store.page_view(page))
        stats.bytes_read += self.store.page_bytes

    def _arrived(self, k: int, page: int, stats):
        return self.slots[k % self.num_slots], self._ready.pop(k)

    def _send_back(self, k: int, page: int, updated, stats) -> None:
        self._copy_out(k, self.store.page_view(page), updated)
        stats.bytes_written += self.store.page_bytes

    def _finish(self, compute, stats) -> None:
        last = self.d2h.record_event()
        compute.wait_event(last)  # later work on the caller's stream sees the slots free
        self.d2h.synchronize()    # the host pages hold the new state when step() returns

    def _abandon(self) -> None:
        # Whatever was enqueued completes before the slots (or staging buffers) are reused.
        torch.cuda.synchronize(self.device)


class NvmePagePipeline(CudaPagePipeline):
    """NVMe -> pinned staging slot -> device slot, and back. The IO threads read page k+1.. into
    staging slots while page k updates; a staging slot stays with its page until the page's
    write to the file has landed. Nothing is committed unless every write completed ([Note:
    shadow pages] in nvme_store.py), so a failed step leaves the file's state the pre-step one."""

    def __init__(self, store, device: torch.device, prefetch_depth: int, staging, num_slots: int):
        if staging is None or not staging.pinned:
            raise ValueError("NVMe -> GPU paging needs a pinned staging pool (non_blocking copies)")
        self.staging = staging
        super().__init__(store, device, prefetch_depth, num_slots)

    @staticmethod
    def _check_store(store) -> None:
        """The file is read and written through the pinned staging slots, not copied from."""

    def _begin(self, stats) -> None:
        super()._begin(stats)
        self._reading = {}                    # k -> future of its file read into staging
        self._staging_of = {}                 # k -> staging slot, from its read to its write
        self._draining = collections.deque()  # (page, staging slot, event: its copy out landed)
        self._writing = collections.deque()   # (page, staging slot, future of the file write)
        self._next_copy = 0                   # the next page whose copy to the GPU is not queued

    def _bring_in(self, k: int, page: int, stats) -> None:
        while not self.staging.has_free():  # a staging slot frees when a write lands
            if not self._retire_one(block=True):
                raise RuntimeError("NVMe staging pool exhausted with nothing in flight (a pipeline bug: it needs "
                                   "the staging slots of [Note: slot rule] in footprint.py)")
        s = self.staging.acquire()
        self._staging_of[k] = s
        # An IO thread reads the page while the GPU works on earlier pages.
        self._reading[k] = self.store.read(page, self.staging.slots[s])

    def _copy_in_landed_reads(self, must: int | None = None) -> None:
        """Queues the copy to the GPU of every page whose file read has landed, in page order,
        so a page's H2D copy overlaps the updates before it; with `must`, waits for that
        page's read."""
        while self._next_copy in self._reading:
            k = self._next_copy
            future = self._reading[k]
            if k != must and not future.done():
                return
            t = time.perf_counter()
            future.result()  # the IO thread's read is complete: the staging slot holds the page
            self._stats.wait_s += time.perf_counter() - t
            del self._reading[k]
            self._stats.bytes_read += self.store.page_bytes
            self._copy_in(k, self.staging.slots[self._staging_of[k]])
            self._next_copy += 1

    def _arrived(self, k: int, page: int, stats):
        self._copy_in_landed_reads(must=k)
        return self.slots[k % self.num_slots], self._ready.pop(k)

    def _send_back(self, k: int, page: int, updated, stats) -> None:
        s = self._staging_of.pop(k)
        landed = self._copy_out(k, self.staging.slots[s], updated)
        self._draining.append((page, s, landed))
        while self._retire_one(block=False):
            pass
        self._copy_in_landed_reads()

    def _retire_one(self, block: bool, timed: bool = True) -> bool:
        """Moves the oldest page along: a write that landed frees its staging slot; a copy out
        that landed lets the page's file write start. With `block`, waits for one of them.
        Returns whether anything moved."""
        t = time.perf_counter()
        moved = False
        if self._writing and self._writing[0][2].done():
            moved = self._retire_write()
        elif self._draining and (block or self._draining[0][2].query()):
            page, s, landed = self._draining.popleft()
            landed.synchronize()  # the staging slot holds the updated page: its file write may start
            self._writing.append((page, s, self.store.write(page, self.staging.slots[s])))
            moved = True
        elif block and self._writing:
            moved = self._retire_write()
        if block and timed:
            self._stats.wait_s += time.perf_counter() - t
        return moved

    def _retire_write(self) -> bool:
        page, s, future = self._writing.popleft()
        future.result()  # raises PageIOError naming page and file
        self._stats.bytes_written += self.store.page_bytes
        self.staging.release(s)
        return True

    def _finish(self, compute, stats) -> None:
        compute.wait_event(self.d2h.record_event())  # later work on the caller's stream sees the slots free
        while self._draining or self._writing:
            self._retire_one(block=True, timed=False)  # run() times the whole finish as waiting
        stats.fetch_s, stats.writeback_s = self.store.take_io_seconds()
        self.store.commit(self._pages)  # every write landed: the new pages become current together

    def _abandon(self) -> None:
        torch.cuda.synchronize(self.device)
        for future in list(self._reading.values()) + [f for _, _, f in self._writing]:
            _settle(future)
        self.staging.release_all()


class ManagedPagePipeline(CudaPagePipeline):
    """Managed-memory pages: prefetched to the GPU on the h2d stream k pages ahead, updated in
    place, prefetched back to the host on the d2h stream ([Note: managed memory budget] in
    managed_store.py). The driver moves the bytes; no device slots."""

    def __init__(self, store, device: torch.device, prefetch_depth: int):
        self.store = store
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.num_slots = 0
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.upd = torch.cuda.Stream(device)
        self.pages_updated = 0

    @property
    def nbytes(self) -> int:
        return 0

    def _begin(self, stats) -> None:
        self._ready = {}

    def _bring_in(self, k: int, page: int, stats) -> None:
        with torch.cuda.stream(self.h2d):
            self.store.prefetch(page)
            self._ready[k] = self.h2d.record_event()
        stats.bytes_read += self.store.page_bytes

    def _arrived(self, k: int, page: int, stats):
        return self.store.page_view(page), self._ready.pop(k)

    def _send_back(self, k: int, page: int, updated, stats) -> None:
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(updated)  # migrate back only once the update has written it
            self.store.evict(page)
        stats.bytes_written += self.store.page_bytes

    def finish(self) -> StepStats:
        stats = super().finish()
        stats.peak_slots_in_use = 0
        return stats


def _settle(future) -> None:
    try:
        future.result()
    except Exception:
        pass
