"""CudaPagePipeline: Paged Adam on a GPU. The state rests in pinned host pages (HostStore with
pin_memory); each step copies a page into a device slot, runs the CUDA kernel on it and copies
it back, with `prefetch_depth` pages in flight. GPU memory for optimizer state is the slots
alone, whatever the model size.

[Note: CUDA page pipeline] Three streams, ordered by events only (the CPU never waits inside
a step, it only enqueues):
  h2d stream      copy page i into slot s, after the write-back that last used slot s
  compute stream  (the caller's current stream) the update of page i, after its copy in
  d2h stream      copy slot s back to page i, after the update
The step ends by making the caller's stream wait for the last write-back and by synchronizing
the d2h stream, so the host pages hold the new state when step() returns (state_dict,
logical_state and the next step's reads all see it).
"""
from __future__ import annotations

import time

import torch

from .scheduler import StepStats, _update_error


class CudaPagePipeline:
    def __init__(self, store, device: torch.device, prefetch_depth: int):
        if not store.pin_memory:
            raise ValueError("the CUDA page pipeline needs a pinned host store (non_blocking copies)")
        self.store = store
        self.device = device
        self.prefetch_depth = prefetch_depth
        # prefetch_depth coming in, one being updated, one going out: a copy in never queues
        # behind the copy out of the page just updated.
        self.num_slots = prefetch_depth + 2
        # One allocation for every slot: GPU memory for optimizer state is this, and constant.
        self._slots_mem = torch.empty(self.num_slots * store.page_bytes, dtype=torch.uint8, device=device)
        self.slots = [self._slots_mem[i * store.page_bytes:(i + 1) * store.page_bytes] for i in range(self.num_slots)]
        self.h2d = torch.cuda.Stream(device)   # page copies in, beside the compute stream
        self.d2h = torch.cuda.Stream(device)   # page copies out, beside both
        self.pages_updated = 0

    @property
    def nbytes(self) -> int:
        return self._slots_mem.numel()

    def run(self, pages, update) -> StepStats:
        t0 = time.perf_counter()
        self.pages_updated = 0
        stats = StepStats(pages=len(pages), slots=self.num_slots)
        compute = torch.cuda.current_stream(self.device)
        slot_free = [None] * self.num_slots    # event: the last write-back out of the slot is done
        fetched = {}                           # page -> (slot, event: its copy in is done)
        next_fetch = 0
        # The host pages may have been written by the CPU (load_state_dict) or a previous step's
        # d2h copies, which that step synchronized: the first copies need no extra wait.

        def fetch(k: int) -> None:
            page, slot = pages[k], k % self.num_slots
            with torch.cuda.stream(self.h2d):
                if slot_free[slot] is not None:
                    self.h2d.wait_event(slot_free[slot])  # the slot's previous page has left it
                self.slots[slot].copy_(self.store.page_view(page), non_blocking=True)
                fetched[page] = (slot, self.h2d.record_event())

        for i, page in enumerate(pages):
            # Page j reuses the slot of page j - num_slots, whose copy out is already queued.
            while next_fetch < len(pages) and next_fetch <= i + self.prefetch_depth:
                fetch(next_fetch)
                next_fetch += 1
            slot, ready = fetched.pop(page)
            compute.wait_event(ready)                # the update reads the page only once it is in
            t = time.perf_counter()
            try:
                update(page, self.slots[slot])       # enqueues the kernels on the compute stream
            except Exception as err:
                torch.cuda.synchronize(self.device)
                raise _update_error(page, self.store, err) from err
            stats.update_s += time.perf_counter() - t
            self.pages_updated += 1
            done = compute.record_event()
            with torch.cuda.stream(self.d2h):
                self.d2h.wait_event(done)            # copy back only what the update wrote
                self.store.page_view(page).copy_(self.slots[slot], non_blocking=True)
                slot_free[slot] = self.d2h.record_event()
            stats.bytes_read += self.store.page_bytes
            stats.bytes_written += self.store.page_bytes
        t = time.perf_counter()
        last = self.d2h.record_event()
        compute.wait_event(last)  # later work on the caller's stream sees the slots free
        self.d2h.synchronize()    # the host pages hold the new state when step() returns
        stats.wait_s = time.perf_counter() - t
        stats.peak_slots_in_use = min(self.num_slots, len(pages))
        stats.step_s = time.perf_counter() - t0
        return stats
