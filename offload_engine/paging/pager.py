"""Pager: the paging layer behind one paged optimizer (per rank). It owns the page table (layout),
the store (where pages rest), the slot pool and the pipeline (how a step's pages move), and the
executor (what updates them), all built from one PagerSpec. The optimizer above it keeps param
groups, per-param jobs and state_dict translation; it reaches pages only through this class:

  extend(groups, initial)        lays out new params and writes their initial state
  read_states(keys)              {key: {array name: full tensor}}, page by page
  write_states(states, ...)      the inverse, committed together
  open_step(update) -> PageStep  one step's pages through the pipeline
  stats(), footprint()           what moved, and bytes per tier ([Note: slot rule] in footprint.py)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch

from ..quant import FORMATS
from . import footprint as fp
from .executors import DirectFeeder, make_executor
from .layout import PageTable
from .pool import SlotPool
from .scheduler import StepStats
from .stores import store_type


@dataclasses.dataclass(frozen=True)
class PagerSpec:
    store: str                  # a registered store: "cpu" (host RAM), "nvme", "managed"
    executor: str               # resolved: "cpu" | "cuda"
    device: torch.device        # the params' device
    page_bytes: int
    prefetch_depth: int
    io_threads: int = 4
    nvme_path: Optional[str] = None
    gpu_fraction: float = 0.5   # the hybrid executor's split ([Note: hybrid split] in executors/hybrid.py)
    rebalance: bool = True

    def footprint(self, num_pages: int) -> fp.Footprint:
        return fp.footprint(self.store, self.executor, self.prefetch_depth, self.page_bytes, num_pages)


class Pager:
    def __init__(self, spec: PagerSpec, executor=None):
        """`executor`: an Executor (executors/__init__.py) to use instead of the one `spec`
        names, e.g. a HybridExecutor of two CPU executors in tests; its name must be spec's."""
        self.spec = spec
        if executor is None:
            executor = make_executor(spec.executor, spec.device, spec.gpu_fraction, spec.rebalance)
        elif executor.name != spec.executor:
            raise ValueError(f"the executor given is {executor.name!r}; the spec names {spec.executor!r}")
        self.executor = executor
        self.store = store_type(spec.store).from_spec(spec, self.executor.pins_host)
        self.table = PageTable(spec.page_bytes)
        self.slots = fp.slots(spec.store, spec.executor, spec.prefetch_depth)
        self.pool: SlotPool | None = None
        self.pipeline = None   # made with the first pages: frozen params never cost a slot
        self._last = StepStats()
        self._totals = StepStats()
        self.steps = 0
        self._views = {}       # page -> (its buffer's address, [(segment, views)]): segment_views()
        # Host buffers that held pages kept for a restore ([Note: speculative pages]), reused by
        # the next steps: a fresh buffer per page and step was a fresh mapping to fault in.
        self._keep_free: list[torch.Tensor] = []
        self.keep_buffers_made = 0  # how many such buffers were ever allocated

    # ---- layout ---------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return self.table.page_bytes

    @property
    def ready(self) -> bool:
        """Whether any page is laid out (and so a step has something to run)."""
        return self.pipeline is not None

    def plan(self, groups) -> PageTable:
        """The table after laying out `groups` ([(group index, [(key, numel, StateFormat)])]),
        without changing anything."""
        table = copy.deepcopy(self.table)
        for gi, entries in groups:
            table.add_group(gi, entries)
        return table

    def extend(self, groups, initial: Callable) -> list[int]:
        """Lays out `groups` ([(group index, [(key, numel, StateFormat)])]), reserves their
        pages in the store and writes each new page with `initial(page, buf)`; returns the new
        pages. On a failure (store full, a write error) the old layout stays (the extra room
        reserved in the store is unused)."""
        table = copy.deepcopy(self.table)
        new_pages = []
        for gi, entries in groups:
            new_pages += table.add_group(gi, entries)
        if not new_pages:
            self.table = table
            self._views.clear()  # they name the old table's segments
            return []
        self.store.allocate(table.num_pages)  # raises PageIOError (disk full) before anything changes
        self._views.clear()  # allocate may have moved the stored pages; no old chunk stays referenced
        self._ensure_pipeline()
        self._write_pages(new_pages, lambda page, buf: initial(table.pages[page], buf), read_first=False)
        self.table = table
        return new_pages

    def segment_views(self, page: int, buf: torch.Tensor) -> list:
        """[(segment, {array name: typed view into buf})] of `page`'s segments. [Note: page
        views] Building the views costs a few microseconds per segment (a slice and a view per
        state array), paid for every segment of every step; an in-place store hands the same
        buffer for a page every step, so the views are kept per page and rebuilt only when the
        buffer's address changes (a slot, or a store that grew). The kept views hold their
        buffer's storage, so a changed address cannot be an old one reused; extend() drops them
        all (a new table, and a chunk the store replaced is not held)."""
        address = buf.data_ptr()
        kept = self._views.get(page)
        if kept is not None and kept[0] == address:
            return kept[1]
        views = [(seg, seg.views(buf)) for seg in self.table.pages[page].segments]
        if self.store.in_place:  # slots change page by page: keeping their views would only grow
            self._views[page] = (address, views)
        return views

    def _ensure_pipeline(self) -> None:
        if self.pipeline is not None:
            return
        if self.slots.host:
            self.pool = SlotPool(self.slots.host, self.page_bytes, pin_memory=self.slots.host_pinned)
        self.pipeline = self.executor.make_pipeline(self.store, self.pool, self.spec.prefetch_depth, self.slots.device)

    # ---- page IO outside a step -----------------------------------------------------------
    def _read_pages(self, pages):
        """Yields (page, buffer) with each page's current bytes (a view for an in-place store, a
        pool slot otherwise: valid until the next item)."""
        for page in pages:
            if self.store.in_place:
                yield page, self.store.page_view(page)
            else:
                buf = self.pool.slots[0]
                self.store.read(page, buf).result()
                yield page, buf

    def _write_pages(self, pages, fill, *, read_first=True) -> None:
        """Rewrites `pages`: fill(page, buf) edits a buffer holding the page's current bytes
        (undefined bytes without `read_first`). A store written through slots makes the new
        pages current together, after every write landed."""
        if not pages:
            return
        if self.store.in_place:
            for page in pages:
                fill(page, self.store.page_view(page))
            return
        buf = self.pool.slots[0]
        for page in pages:
            if read_first:
                self.store.read(page, buf).result()
            fill(page, buf)
            self.store.write(page, buf).result()
        self.store.commit(pages)

    def read_states(self, keys) -> dict:
        """{key: {array name: full tensor}} for params `keys`, read page by page."""
        table = self.table
        out = {key: {name: torch.empty(nbytes // dtype.itemsize, dtype=dtype)
                     for name, nbytes, dtype in table.fmt_of[key].arrays(table.numel_of[key])} for key in keys}
        wanted = set(keys)
        pages = sorted({seg.page for key in keys for seg in table.segments_of[key]})
        for page, buf in self._read_pages(pages):
            for seg in table.pages[page].segments:
                if seg.key in wanted:
                    for name, piece in seg.views(buf).items():
                        at = element_offset(seg, name)
                        out[seg.key][name][at:at + piece.numel()].copy_(piece)
        return out

    def write_states(self, states: dict, reset=(), initial: Callable | None = None, skip_pages=()) -> None:
        """Writes {key: {array name: full tensor}} into the pages (the inverse of read_states)
        and, for the params in `reset`, `initial(page, buf, only=reset)`, as one commit; pages
        in `skip_pages` are left alone."""
        reset = set(reset)
        table = self.table
        pages = sorted({seg.page for key in (*states, *reset) for seg in table.segments_of[key]} - set(skip_pages))

        def fill(page, buf):
            if reset:
                initial(table.pages[page], buf, only=reset)
            copy_states_into(table.pages[page], buf, states)

        self._write_pages(pages, fill)

    # ---- the step -------------------------------------------------------------------------
    def open_step(self, update: Callable, *, overlapped: bool = False, retain: bool = False) -> "PageStep":
        """One step: `update(page, buf)` runs on each page fed to it. `overlapped`: pages arrive
        from backward hooks (a CUDA executor then feeds them from a thread of its own).
        `retain`: keep each page's pre-step bytes where that is possible (PageStep.can_restore),
        so that restore() can take the step back ([Note: speculative pages])."""
        return PageStep(self, update, overlapped, retain)

    @property
    def restorable(self) -> bool:
        """Whether a step's updated pages can be taken back (Executor.restore_by): the CPU
        executor's, from host copies (an in-place store) or by dropping uncommitted writes (a
        store read through slots); not yet the CUDA executor's."""
        return self.executor.restore_by(self.store) is not None

    def record(self, stats: StepStats) -> None:
        self._last = stats
        self.steps += 1
        self._totals.accumulate(stats)

    # ---- what it holds --------------------------------------------------------------------
    def footprint(self, num_pages: int | None = None) -> fp.Footprint:
        """Bytes per tier with this layout (or with `num_pages` pages), [Note: slot rule]; the
        CPU executor's pinned param and grad copies included as they are now."""
        pages = self.table.num_pages if num_pages is None else num_pages
        return self.spec.footprint(pages) + fp.Footprint(pinned_host=self.executor.pinned_bytes)

    @property
    def keep_pool_bytes(self) -> int:
        """Host bytes of the page copies kept for reuse by speculative steps (between steps)."""
        return sum(t.numel() * t.element_size() for t in self._keep_free)

    def held(self) -> fp.Footprint:
        """Bytes per tier allocated now (the store and the pools, as they are)."""
        store = self.store.nbytes
        pool = self.pool.nbytes if self.pool else 0
        pinned = self.executor.pins_host
        disk = store if self.store.access == "io" else 0
        host_store = 0 if self.store.access == "io" else store
        keep = self.keep_pool_bytes  # between steps every kept copy is back in the pool
        return fp.Footprint(gpu=self.pipeline.nbytes if self.pipeline is not None else 0,
                            pinned_host=(host_store + pool if pinned else 0) + self.executor.pinned_bytes,
                            host=(0 if pinned else host_store + pool) + keep, disk=disk)

    def stats(self) -> dict:
        """The last step's paging figures, totals over all steps, and where the state lives."""
        totals = self._totals.as_dict()
        del totals["slots"], totals["mean_slots_in_use"]
        return {
            "store": self.store.kind,
            "path": self.store.path,
            "direct_io": self.store.direct,
            "page_bytes": self.page_bytes,
            "num_pages": self.table.num_pages,
            "prefetch_depth": self.spec.prefetch_depth,
            "pool_slots": self.pool.num_slots if self.pool else 0,
            "pool_bytes": self.pool.nbytes if self.pool else 0,
            "device": str(self.spec.device),
            "executor": self.executor.name,
            "pinned_host_bytes": self.executor.pinned_bytes,
            "device_pool_bytes": self.pipeline.nbytes if self.pipeline is not None else 0,
            "state_bytes": self.table.state_bytes(),
            "store_bytes": self.store.nbytes,
            "footprint": self.footprint().as_dict(),
            **self.executor.stats(),
            "steps": self.steps,
            "last_step": self._last.as_dict(),
            "totals": totals,
        }

    def close(self) -> None:
        """Releases the store (for NVMe: deletes the state file)."""
        self._views.clear()  # they hold the store's storage
        self._keep_free.clear()
        self.store.close()


class PageStep:
    """One step's pages through the pager's pipeline: feed(pages) as they become ready,
    finish() once all are fed (next_pass() may reopen it for pages laid out meanwhile),
    then close(); abort() drops it. pages_done counts pages updated (or, on a GPU, enqueued).

    [Note: speculative pages] Opened with `retain` on a restorable pager, each page's bytes are
    copied to host memory just before its update, on the thread that runs it (the hook thread:
    the CPU executor updates in place in feed()). restore() writes every kept page back, so the
    stored state is the pre-step state again, bit for bit (8-bit codes and absmax included:
    quantization cannot be undone arithmetically, so the bytes are kept, not recomputed).
    The caller bounds how many pages it feeds before it knows whether to keep the step
    (retained_bytes). A store read through slots (NVMe) needs no copies: the CPU executor
    streams its pages during backward ([Note: streamed pages] in scheduler.py), each written
    to the page's other place and committed only at finish(), so restore() rewinds: it waits
    for the pages in flight and forgets them, and the store still holds the pre-step bytes.
    """

    def __init__(self, pager: Pager, update: Callable, overlapped: bool, retain: bool = False):
        self._pager = pager
        self._pipeline = pager.pipeline
        self._executor = pager.executor
        self._restore_by = pager.executor.restore_by(pager.store) if retain else None
        self.can_restore = self._restore_by is not None
        self._kept: dict[int, torch.Tensor] = {}  # page -> its bytes before this step's first update of it
        self._retaining = self._restore_by == "copy"
        if self._retaining:
            update = self._keeping(update)
        self._raw_update = update
        self.defers = not self._executor.overlaps  # pages run only after stage() (CPU kernels on CUDA params)
        self._earlier = 0  # pages done in earlier passes
        self._stats: StepStats | None = None
        pager.store.check()  # a deleted or truncated state file is reported before anything changes
        self._pipeline.start(self._executor.wrap_update(update, pager.table))
        self._feeder = self._executor.feeder(self._pipeline, overlapped)

    @property
    def pages_done(self) -> int:
        return self._earlier + self._pipeline.pages_updated

    def _keeping(self, update: Callable) -> Callable:
        kept = self._kept

        free = self._pager._keep_free

        def keep_then_update(page, buf):
            if self._retaining and page not in kept:  # a page updated again after restore() keeps its first bytes
                copy = free.pop() if free else None
                if copy is None or copy.shape != buf.shape or copy.dtype != buf.dtype:
                    copy = torch.empty_like(buf, memory_format=torch.contiguous_format)
                    self._pager.keep_buffers_made += 1
                kept[page] = copy.copy_(buf)
            update(page, buf)
        return keep_then_update

    def _let_go(self) -> None:
        """The kept copies go back to the pager's free buffers."""
        self._pager._keep_free.extend(self._kept.values())
        self._kept.clear()

    @property
    def retained_bytes(self) -> int:
        """Host bytes held now for restore()."""
        return len(self._kept) * self._pager.page_bytes

    @property
    def retain_bytes_per_page(self) -> int:
        """Host bytes restore() needs per page run before it: a copy of the page, or nothing
        where the pages' writes are not committed until finish()."""
        return self._pager.page_bytes if self._restore_by == "copy" else 0

    def restore(self) -> list[int]:
        """Writes every page kept by this step back into the store (its pre-step bytes) and
        returns those pages; the step stays open (the pages may be fed again)."""
        if not self.can_restore:
            raise RuntimeError("this step keeps no pre-step pages (open_step(retain=True) on a restorable pager)")
        self.drain()
        if self._restore_by == "rewind":
            self._executor.rewind(self._pipeline)  # waits for the pages in flight; none is committed
            return []
        store = self._pager.store
        pages = sorted(self._kept)
        for page in pages:
            store.page_view(page).copy_(self._kept[page])
        self._let_go()
        return pages

    def release(self) -> None:
        """The step is settled: keeps no more pages and lets go of those kept."""
        self._retaining = False
        self._let_go()

    def stage(self, jobs: dict):
        """The params and grads the kernels read on host pages, and those pages (Staged,
        [Executor.stage])."""
        return self._executor.stage(jobs, self._pager.table)

    def feed(self, pages) -> None:
        self._feeder.feed(pages)

    def drain(self) -> None:
        """Waits until every page fed is in the pipeline; raises the feeding's error."""
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            self._feeder = DirectFeeder(self._pipeline)  # later pages go in directly
            feeder.join()

    def finish(self) -> StepStats:
        """Runs what is queued and waits for the write-backs; the stats of this pass."""
        self.drain()
        stats = self._pipeline.finish()
        if self._stats is None:
            self._stats = stats
        else:
            self._stats.accumulate(stats)
        return stats

    def next_pass(self) -> None:
        """Reopens the pipeline after finish(), for pages laid out during the step."""
        self._earlier += self._pipeline.pages_updated
        self._pipeline.start(self._executor.wrap_update(self._raw_update, self._pager.table))

    def abort(self) -> None:
        """Drops the step: nothing more is stored (an NVMe store commits nothing)."""
        self._pipeline.abandon()

    def close(self, record: bool = True) -> None:
        """Ends the executor's step (copies back to the GPU) and, with `record`, records the
        step's stats (a failed step is not counted); pages kept for restore() are let go."""
        self._let_go()
        self._executor.end_step()
        if record and self._stats is not None:
            self._pager.record(self._stats)


def element_offset(seg, name: str) -> int:
    """Where a segment's array starts inside the param's full array (in that array's items)."""
    if seg.fmt.name == "fp32" or name == "master":
        return seg.start
    if name.endswith("_absmax"):
        return seg.start // seg.fmt.block
    return seg.start * FORMATS[seg.fmt.name].bits // 8  # codes: segments start on a block boundary


def copy_states_into(page, buf: torch.Tensor, states: dict) -> None:
    """Copies the slices of full state arrays ({key: {array name: tensor}}) that `page` holds."""
    for seg in page.segments:
        if seg.key in states:
            for name, piece in seg.views(buf).items():
                at = element_offset(seg, name)
                piece.copy_(states[seg.key][name][at:at + piece.numel()])
