"""HybridExecutor: one step's pages split between two executors that run at the same time, the
GPU's (CUDA kernels, pages through device slots) and the host's (SIMD kernels on the host pages
in place, the params and grads of those pages copied to pinned host buffers), then the updated
params back on the GPU. The GPU side is bound by PCIe, the host side by host memory bandwidth:
two different wires, so together they beat either alone when both are busy for about as long.

[Note: hybrid split] Per step the pages with grads are taken in page order; the first
round(gpu_fraction * n) go to the device side, the rest to the host side (Split.assign). Every
page is updated by exactly one side, with the same kernels' arguments either side would use
alone, and the kernels are bit-compatible across devices, so the result is bit for bit either
executor's alone. After each step the two sides' wall times (each measured on the thread that
runs it, from its first page to its last write-back) give their rates in pages per second, and
with `rebalance` the next step's fraction moves halfway to the one that would have made them
equal (Split.record): halfway, so that one noisy step (a page fault, another process on the
cores) does not swing the split, while a lasting change is followed within a few steps. A param with segments on both sides is copied to the host whole; only its
host-side segments are copied back, so neither side overwrites the other's elements.

Threads: the host side runs on the caller's thread (the SIMD kernels use torch's CPU threads);
the device side is fed and finished on a worker thread of its own, because a CUDA pipeline's
feed() waits for free device slots, which would otherwise hold the host side's pages back.
"""
from __future__ import annotations

import concurrent.futures
import time
import weakref
from typing import Optional

import torch

from ..scheduler import StepStats
from . import Staged


class Split:
    """The fraction of a step's pages updated on the device side, and how it moves."""

    def __init__(self, gpu_fraction: float, rebalance: bool):
        if not 0.0 <= gpu_fraction <= 1.0:
            raise ValueError(f"gpu_fraction must be in [0, 1], got {gpu_fraction!r}")
        self.gpu_fraction = float(gpu_fraction)
        self.rebalance_on = bool(rebalance)
        self.host_pages: frozenset = frozenset()   # this step's host-side pages (assign())
        self.last = {"device_pages": 0, "host_pages": 0, "device_s": 0.0, "host_s": 0.0}
        self.rebalanced = 0                        # steps after which the fraction moved

    def assign(self, pages) -> tuple[list, list]:
        """(device pages, host pages) of `pages` in page order ([Note: hybrid split]). With
        rebalancing on and at least two pages, each side keeps one page, so both stay measured."""
        pages = sorted(pages)
        n = len(pages)
        n_dev = round(self.gpu_fraction * n)
        if self.rebalance_on and n >= 2:
            n_dev = min(max(n_dev, 1), n - 1)
        return pages[:n_dev], pages[n_dev:]

    def record(self, device_pages: int, host_pages: int, device_s: float, host_s: float) -> None:
        """One step's phase times; moves the fraction when rebalancing."""
        self.last = {"device_pages": device_pages, "host_pages": host_pages, "device_s": device_s, "host_s": host_s}
        if self.rebalance_on:
            balanced = balanced_fraction(device_pages, host_pages, device_s, host_s)
            if balanced is not None:
                moved = 0.5 * (self.gpu_fraction + balanced)
                if moved != self.gpu_fraction:
                    self.gpu_fraction = moved
                    self.rebalanced += 1

    def stats(self) -> dict:
        return {"gpu_fraction": self.gpu_fraction, "rebalance": self.rebalance_on, "rebalanced": self.rebalanced,
                **self.last}


def balanced_fraction(device_pages: int, host_pages: int, device_s: float, host_s: float) -> Optional[float]:
    """The device share at which both sides, at the rates just measured (pages per second),
    would take the same time: r_dev / (r_dev + r_host). None when a side ran no page or took
    no measurable time (nothing to learn from)."""
    if device_pages <= 0 or host_pages <= 0 or device_s <= 0.0 or host_s <= 0.0:
        return None
    r_dev, r_host = device_pages / device_s, host_pages / host_s
    return r_dev / (r_dev + r_host)


class HybridExecutor:
    """Two executors in one step ([Note: hybrid split]). `device_side` updates pages where the
    params are (CudaExecutor for CUDA params); `host_side` updates host pages in place from
    host copies of the params and grads (CpuForCudaExecutor). make_executor() builds the CUDA
    pair; any two executors of the Executor protocol whose pipelines take a host store's pages
    compose (tests pair two CPU executors to check the split itself on a machine without a GPU)."""

    name = "hybrid"
    overlaps = False   # the host side's copies of params and grads are taken after backward

    def __init__(self, device_side, host_side, gpu_fraction: float = 0.5, rebalance: bool = True,
                 device: torch.device | None = None):
        self.device_side = device_side
        self.host_side = host_side
        # The CUDA side copies the host pages with asynchronous copies, which need them pinned.
        self.pins_host = device_side.pins_host
        self.split = Split(gpu_fraction, rebalance)
        self.device = device if device is not None else torch.device("cpu")

    @property
    def pinned_bytes(self) -> int:
        return self.device_side.pinned_bytes + self.host_side.pinned_bytes

    def make_pipeline(self, store, pool, prefetch_depth: int, device_slots: int) -> "HybridPipeline":
        if not store.in_place:
            raise ValueError(f"the hybrid executor updates host pages in place beside the GPU's; the "
                             f"{store.kind!r} store is read through slots (use store 'cpu')")
        return HybridPipeline(self.device_side.make_pipeline(store, pool, prefetch_depth, device_slots),
                              self.host_side.make_pipeline(store, pool, prefetch_depth, device_slots),
                              self.split, self.device)

    def feeder(self, pipeline, threaded: bool):
        from . import DirectFeeder
        return DirectFeeder(pipeline)  # never overlapped (overlaps is False): close() feeds every page

    def wrap_update(self, update, table):
        return (self.device_side.wrap_update(update, table), self.host_side.wrap_update(update, table))

    def stage(self, jobs: dict, table) -> Staged:
        """Splits the step's pages ([Note: hybrid split]) and stages host copies of the params
        with a segment on a host-side page."""
        pages = sorted({seg.page for key in jobs for seg in table.segments_of[key]})
        _, host_pages = self.split.assign(pages)
        self.split.host_pages = frozenset(host_pages)
        host_keys = {seg.key for page in host_pages for seg in table.pages[page].segments if seg.key in jobs}
        staged = self.host_side.stage({key: jobs[key] for key in sorted(host_keys)}, table)
        return Staged(staged.jobs, self.split.host_pages)

    def restore_by(self, store) -> None:
        return None  # its pages run only after backward (overlaps is False)

    def rewind(self, pipeline) -> None:
        raise RuntimeError("HybridExecutor keeps no page to rewind (restore_by is None)")

    def end_step(self) -> None:
        self.device_side.end_step()
        self.host_side.end_step()
        self.split.host_pages = frozenset()

    def stats(self) -> dict:
        return {"split": self.split.stats()}


class HybridPipeline:
    """The PagePipeline of a HybridExecutor: routes each page fed to the side Split chose."""

    def __init__(self, device_pipe, host_pipe, split: Split, device: torch.device):
        self.device_pipe = device_pipe
        self.host_pipe = host_pipe
        self.split = split
        self.device = device
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="oe-hybrid")
        # The worker thread ends with the pipeline (the optimizer closed or collected), not at exit only.
        weakref.finalize(self, self._worker.shutdown, wait=False)
        self._pending: list[concurrent.futures.Future] = []
        self._device_pages = 0
        self._device_s = 0.0

    @property
    def pages_updated(self) -> int:
        return self.device_pipe.pages_updated + self.host_pipe.pages_updated

    @property
    def nbytes(self) -> int:
        return self.device_pipe.nbytes + self.host_pipe.nbytes

    def start(self, update) -> None:
        device_update, host_update = update  # HybridExecutor.wrap_update's pair
        self._t0 = time.perf_counter()
        self._device_pages, self._device_s, self._host_s = 0, 0.0, 0.0
        self._device_t0 = None
        self.device_pipe.start(device_update)  # on the caller's thread: a CUDA pipeline orders the caller's stream
        self.host_pipe.start(host_update)

    def feed(self, pages, after=None) -> None:
        host = self.split.host_pages
        to_device = [p for p in pages if p not in host]
        to_host = [p for p in pages if p in host]
        if to_device:
            if after is None and self.device.type == "cuda":
                # The device side's updates wait for everything the caller enqueued (the grads).
                after = torch.cuda.current_stream(self.device).record_event()
            self._device_pages += len(to_device)
            self._pending.append(self._worker.submit(self._device_feed, to_device, after))
        if to_host:
            t = time.perf_counter()
            self.host_pipe.feed(to_host)  # the caller's thread, while the worker feeds the device side
            self._host_s += time.perf_counter() - t

    @torch.no_grad()  # grad mode is per thread: the updates write params in place, untracked
    def _device_feed(self, pages, after) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self._device_t0 is None:
            self._device_t0 = time.perf_counter()
        self.device_pipe.feed(pages, after)

    @torch.no_grad()
    def _device_finish(self) -> StepStats:
        stats = self.device_pipe.finish()  # waits for the device side's last write-back
        if self._device_t0 is not None:
            self._device_s += time.perf_counter() - self._device_t0
        return stats

    def _join(self) -> None:
        """Waits for every device-side task posted; raises the first one's error."""
        pending, self._pending = self._pending, []
        error = None
        for future in pending:
            try:
                future.result()
            except BaseException as err:
                error = error or err
        if error is not None:
            raise error

    def finish(self) -> StepStats:
        device_stats = self._worker.submit(self._device_finish)
        self._pending.append(device_stats)
        t = time.perf_counter()
        try:
            host_stats = self.host_pipe.finish()
        finally:
            self._host_s += time.perf_counter() - t
            self._join()  # the device side's error, if any, wins over none
        stats = device_stats.result()
        self.split.record(self._device_pages, host_stats.pages, self._device_s, self._host_s)
        stats.accumulate(host_stats)
        stats.slots = max(stats.slots, host_stats.slots)
        stats.step_s = time.perf_counter() - self._t0  # both sides ran at once: the step is the wall time
        return stats

    def abandon(self) -> None:
        try:
            self._join()
        except BaseException:
            pass  # the step is dropped either way; abandon() below leaves nothing stored
        self.device_pipe.abandon()
        self.host_pipe.abandon()
