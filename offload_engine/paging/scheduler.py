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

[Note: streamed pages] An overlapped step on a store read through slots (stream()) runs the
same pipeline on a thread of its own, fed from backward's hooks through a queue: the pages'
reads, updates and writes then happen while backward computes, instead of all at finish().
Prefetch reaches as far as the pages fed so far. Nothing is committed until finish(), so
rewind() can drop every page run so far (their writes went to each page's other place) and
the step can run them again from the committed bytes ([Note: speculative pages] in pager.py).

Errors: any failure raises PagingError naming the page (and the store's file). Nothing is
committed unless every page's write-back completed ([Note: shadow pages] in nvme_store.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
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
        self._runner = None     # the thread of a streamed step ([Note: streamed pages])

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
        finish(), whose pipeline reads ahead over the whole list (the result is the same), or
        hands them to the step's thread when streamed. `after` (a CUDA pipeline's event) has
        no meaning on the CPU."""
        self._pages.extend(pages)
        if self.store.in_place:
            self._run_in_place(pages, self._update, self._stats)
        elif self._runner is not None:
            self._queue.put(list(pages))

    def stream(self) -> None:
        """This step's pages run on a thread of their own as they are fed ([Note: streamed
        pages]); nothing changes for an in-place store, whose feed() runs them already."""
        if self.store.in_place or self._runner is not None:
            return
        self._queue = queue.SimpleQueue()
        self._runner_error = None
        self._runner = threading.Thread(target=self._stream_body, name="oe-pager-cpu", daemon=True)
        self._runner.start()

    def _stream_body(self) -> None:
        try:
            # One kernel thread here: backward keeps torch's threads on the caller's side, and an
            # update team as wide as backward's would fight it for the same cores (measured in
            # docs/benchmarks.md); with OpenMP the count is this thread's own.
            torch.set_num_threads(1)
            with torch.no_grad():  # grad mode is per thread: the updates write params in place, untracked
                self._run_pipelined(_QueuedPages(self._queue), self._update, self._stats, commit=False)
        except BaseException as err:  # finish() or rewind() raises it on the caller's thread
            self._runner_error = err

    def _stop_runner(self) -> BaseException | None:
        """Ends the streamed step's thread once it has run every page fed; its error, if any."""
        runner, self._runner = self._runner, None
        if runner is None:
            return None
        self._queue.put(None)
        runner.join()
        return self._runner_error

    def rewind(self) -> None:
        """Drops every page of the streamed step run so far (nothing was committed: the store
        still holds their pre-step bytes) and streams on, empty ([Note: streamed pages])."""
        err = self._stop_runner()
        if err is not None:
            raise err
        self._pages = []
        self.stream()

    def abandon(self) -> None:
        """Drops an open step: queued pages are not run, nothing more is stored."""
        self._stop_runner()  # its error, if any, is moot: nothing it wrote is committed
        if self.pool is not None:
            self.pool.release_all()
        self._pages, self._update = [], None

    @property
    def nbytes(self) -> int:
        """GPU bytes held: none."""
        return 0

    def finish(self) -> StepStats:
        stats = self._stats
        if self._runner is not None:
            err = self._stop_runner()
            if err is not None:
                raise err
            self.store.commit(self._pages)  # every write-back landed: the step's pages become current
        elif not self.store.in_place:
            with _torch_threads(max(1, torch.get_num_threads() - 1)):  # [Note: update threads]
                self._run_pipelined(_ListedPages(self._pages), self._update, stats)
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

    def _run_pipelined(self, source, update, stats: StepStats, commit: bool = True) -> None:
        """Runs the pages `source` yields through the slots, in order; commits them unless told not to."""
        store, pool = self.store, self.pool
        pages = source.pages  # grows as source.more() takes in pages fed later
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
            done = 0
            while done < len(pages) or source.more(block=True):
                if done == len(pages):
                    continue  # more() took in new pages
                source.more(block=False)
                page = pages[done]
                done += 1
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
        fetch_s, writeback_s = store.take_io_seconds()
        stats.fetch_s += fetch_s
        stats.writeback_s += writeback_s
        if commit:
            store.commit(pages)


class _ListedPages:
    """A pipelined pass's pages, all known at the start (step(), or finish() of a queued step)."""

    def __init__(self, pages):
        self.pages = list(pages)

    def more(self, block: bool) -> bool:
        return False


class _QueuedPages:
    """A streamed step's pages as the hooks feed them; None on the queue ends the step."""

    def __init__(self, q: queue.SimpleQueue):
        self.pages: list = []
        self._queue = q
        self._ended = False

    def more(self, block: bool) -> bool:
        """Takes in what was fed (waiting for something with `block`); False once the step ended
        and nothing new came."""
        grew = False
        while not self._ended:
            try:
                item = self._queue.get(block=block and not grew)
            except queue.Empty:
                break
            if item is None:
                self._ended = True
            else:
                self.pages.extend(item)
                grew = True
        return grew


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
