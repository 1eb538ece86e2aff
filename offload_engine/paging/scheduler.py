"""PageScheduler: one step's pipeline over the pages, in a deterministic order.

For a store that is not updated in place (NvmeStore), pages i+1..i+k (k = prefetch_depth)
are fetched into slots while page i is updated and page i-1 is written back; the pool has
the slots of [Note: slot rule] in footprint.py (k fetching, one updating, one writing back; a
further write-back waits for the oldest to land), so a step allocates nothing. For an in-place store (HostStore with the CPU executor)
the update runs on the stored bytes directly: no slot, no copy.

[Note: update threads] While pages are in flight, the IO threads need a core now and then to
issue and complete their requests. If the update kernel's OpenMP team occupies every core, a
worker descheduled for an IO completion stalls the whole parallel region (seen on the 2-core
machine: page updates 5-10x slower and erratic). So a pipelined step runs the kernels on one
core fewer than torch's thread count (at least one) and restores the count afterwards.

Errors: any failure raises PagingError naming the page (and the store's file). Nothing is
committed unless every page's write-back completed ([Note: shadow pages] in nvme_store.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Callable

import torch

from .pool import SlotPool
from .stores import PagingError


@dataclasses.dataclass
class StepStats:
    """What one paged step moved and where its time went (seconds). fetch_s and writeback_s
    are summed over IO threads, so they can exceed the step; wait_s is the time the step
    itself stood still waiting for a fetch, a free slot or the final write-backs."""

    pages: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fetch_s: float = 0.0
    update_s: float = 0.0
    writeback_s: float = 0.0
    wait_s: float = 0.0
    step_s: float = 0.0
    slots: int = 0
    peak_slots_in_use: int = 0
    mean_slots_in_use: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def accumulate(self, other: "StepStats") -> None:
        """Adds `other`'s bytes and seconds (totals over steps, or a step run in two passes)."""
        for field in ("pages", "bytes_read", "bytes_written", "fetch_s", "update_s", "writeback_s", "wait_s",
                      "step_s"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.peak_slots_in_use = max(self.peak_slots_in_use, other.peak_slots_in_use)
        self.mean_slots_in_use = max(self.mean_slots_in_use, other.mean_slots_in_use)


class PageScheduler:
    """Runs `update(page, buf)` over pages through a store; one per optimizer (per rank). The
    CPU executors' PagePipeline (protocols.py)."""

    def __init__(self, store, pool: SlotPool | None, prefetch_depth: int):
        self.store = store
        self.pool = pool
        self.prefetch_depth = prefetch_depth
        self.pages_updated = 0  # of the step in progress (or the last one): how far it got

    def run(self, pages, update) -> StepStats:
        self.start(update)
        self.feed(pages)
        return self.finish()

    def start(self, update) -> None:
        """Opens a step whose pages arrive through feed() (all at once from step(), or from
        backward hooks as grads become final); finish() closes it."""
        self._t0 = time.perf_counter()
        self.pages_updated = 0
        self._update = update
        self._pages = []
        self._stats = StepStats(slots=self.pool.num_slots if self.pool else 0)

    def feed(self, pages, after=None) -> None:
        """An in-place store updates `pages` now; a store read through slots queues them for
        finish(), whose pipeline reads ahead over the whole list (the result is the same).
        `after` (a CUDA pipeline's event) has no meaning on the CPU."""
        self._pages.extend(pages)
        if self.store.in_place:
            self._run_in_place(pages, self._update, self._stats)

    def abandon(self) -> None:
        """Drops an open step: queued pages are not run, nothing more is stored."""
        self._pages, self._update = [], None

    @property
    def nbytes(self) -> int:
        """GPU bytes held: none."""
        return 0

    def finish(self) -> StepStats:
        stats = self._stats
        if not self.store.in_place:
            with _torch_threads(max(1, torch.get_num_threads() - 1)):  # [Note: update threads]
                self._run_pipelined(self._pages, self._update, stats)
        stats.pages = len(self._pages)
        stats.step_s = time.perf_counter() - self._t0
        self._update = None
        return stats

    def _run_in_place(self, pages, update, stats: StepStats) -> None:
        update = labelled("update", update)  # the default store's hot loop: decided once per pass
        for page in pages:
            t = time.perf_counter()
            try:
                update(page, self.store.page_view(page))
            except Exception as err:
                raise _update_error(page, self.store, err) from err
            stats.update_s += time.perf_counter() - t
            self.pages_updated += 1

    def _run_pipelined(self, pages, update, stats: StepStats) -> None:
        store, pool = self.store, self.pool
        slots = pool.slots
        fetching = collections.deque()   # (page, slot, future), oldest first
        writing = collections.deque()
        occupancy_sum, events = 0, 0
        next_fetch = 0

        def retire_write(block: bool) -> bool:
            """Completes the oldest write-back (waiting when `block`); frees its slot."""
            page, slot, future = writing[0]
            if not block and not future.done():
                return False
            t = time.perf_counter()
            future.result()  # raises PageIOError naming page and file
            if block:
                stats.wait_s += time.perf_counter() - t
            writing.popleft()
            pool.release(slot)
            stats.bytes_written += store.page_bytes
            return True

        try:
            for page in pages:
                # Keep prefetch_depth fetches in flight beyond this page's own (which may still
                # be landing), so pages i+1..i+k are read while page i updates; a slot comes free
                # when a write-back completes, so wait for the oldest one if none is free.
                with phase("fetch"):
                    while next_fetch < len(pages) and len(fetching) <= self.prefetch_depth:
                        if not pool.has_free():
                            retire_write(block=True)
                        slot = pool.acquire()
                        fetching.append((pages[next_fetch], slot, store.read(pages[next_fetch], slots[slot])))
                        next_fetch += 1
                    occupancy_sum, events = occupancy_sum + pool.in_use, events + 1
                    stats.peak_slots_in_use = max(stats.peak_slots_in_use, pool.in_use)
                    fetched_page, slot, future = fetching.popleft()
                    assert fetched_page == page
                    t = time.perf_counter()
                    future.result()  # the IO thread's read is complete: the slot holds the page
                    stats.wait_s += time.perf_counter() - t
                stats.bytes_read += store.page_bytes
                t = time.perf_counter()
                try:
                    with phase("update"):
                        update(page, slots[slot])
                except Exception as err:
                    pool.release(slot)
                    raise _update_error(page, store, err) from err
                stats.update_s += time.perf_counter() - t
                self.pages_updated += 1
                with phase("writeback"):
                    # Hand the updated slot to an IO thread; it stays taken until the write lands.
                    writing.append((page, slot, store.write(page, slots[slot])))
                    while writing and retire_write(block=False):
                        pass
            with phase("writeback"):
                while writing:
                    retire_write(block=True)
        except BaseException:
            # Let every IO still in flight finish before the slots are reused, then report the
            # first failure; nothing is committed, so the stored state is the pre-step one.
            for _, _, future in list(fetching) + list(writing):
                try:
                    future.result()
                except Exception:
                    pass
            pool.release_all()
            raise
        if events:
            stats.mean_slots_in_use = occupancy_sum / events
        stats.fetch_s, stats.writeback_s = store.take_io_seconds()
        store.commit(pages)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


_NO_LABEL = contextlib.nullcontext()


def phase(name: str):
    """A profiler label on one phase of the step (``offload_engine::fetch``, ``::update``,
    ``::writeback``; the engine adds ``::grad_reduce`` and ``::param_gather``), so a user's
    torch.profiler trace shows where the step goes. With no profiler running it is a no-op:
    record_function costs about 4 us even then, and a step enters up to three labels per page
    (measured: +30% on a 16-page step of 16 KiB pages)."""
    if not torch.autograd._profiler_enabled():
        return _NO_LABEL
    return torch.profiler.record_function(f"offload_engine::{name}")


def labelled(name: str, fn: Callable) -> Callable:
    """`fn` under phase(name) on every call when a profiler runs now, else `fn` itself: for a
    per-page loop, where even the no-op label's ~0.5 us per page shows on small pages."""
    if not torch.autograd._profiler_enabled():
        return fn

    def run(*args):
        with phase(name):
            return fn(*args)
    return run


def _update_error(page: int, store, err: Exception) -> PagingError:
    where = store.describe()
    return PagingError(f"page {page} ({where}): the update failed: {type(err).__name__}: {err}", page=page,
                       path=where if where.startswith("/") else None)
