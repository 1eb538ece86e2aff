"""CpuForCudaExecutor: the CPU executor for a CUDA model (the ZeRO-Offload-style path), and
CudaParamsOnCpu, the pinned host copies of its params and grads.

The params and grads live on the GPU; the state lives in a page store (host or NVMe) and the
SIMD CPU kernels update it. Per step:
  1. copy every param and grad with a grad to pinned host buffers, on a D2H stream, after the
     work already queued on the caller's stream (backward) — one event per param;
  2. the page scheduler visits the pages as for CPU params; before a page is updated, the
     events of its params are waited on (the CPU reads what the copies wrote);
  3. after a page is updated, its param slices are copied back to the GPU on an H2D stream;
  4. the caller's stream waits for the last H2D copy, so the next forward sees new params.

[Note: CPU executor for CUDA params] The GPU param is the truth: it is copied to the host every
step (not kept as a host master), so a param changed on the GPU between steps (a model reload)
is never overwritten by a stale host copy. The host buffers have the params' and grads' own
dtypes, so results are bit for bit those of the CUDA kernels and the CPU kernels alike.
"""
from __future__ import annotations

import torch

from ..scheduler import PageScheduler
from . import DirectFeeder, Staged


class CpuForCudaExecutor:
    """CUDA params, SIMD CPU kernels: every param and grad is copied to the host before the
    pages run (stage()), so none can run while backward does."""

    name = "cpu"
    pins_host = False
    overlaps = False

    def __init__(self, device: torch.device):
        self.copies = CudaParamsOnCpu(device)

    @property
    def pinned_bytes(self) -> int:
        return self.copies.pinned_bytes

    def make_pipeline(self, store, pool, prefetch_depth: int, device_slots: int) -> PageScheduler:
        return PageScheduler(store, pool, prefetch_depth)

    def feeder(self, pipeline, threaded: bool) -> DirectFeeder:
        return DirectFeeder(pipeline)

    def stage(self, jobs: dict, table) -> Staged:
        return Staged(self.copies.begin_step(jobs))  # every page runs on the host copies

    def stats(self) -> dict:
        return {}

    def wrap_update(self, update, table):
        copies = self.copies

        def around(page, buf):
            copies.before_update(table.pages[page])  # the CPU reads the host copies once they landed
            update(page, buf)
            copies.after_update(table.pages[page])   # this page's param slices back to the GPU
        return around

    def restore_by(self, store) -> None:
        return None  # its pages run only after backward (stage())

    def rewind(self, pipeline) -> None:
        raise RuntimeError("CpuForCudaExecutor keeps no page to rewind (restore_by is None)")

    def end_step(self) -> None:
        self.copies.end_step()


class CudaParamsOnCpu:
    def __init__(self, device: torch.device):
        self.device = device
        self.d2h = torch.cuda.Stream(device)   # param/grad copies out, after backward
        self.h2d = torch.cuda.Stream(device)   # updated params back, while later pages update
        self._p_host: dict = {}                # key -> pinned flat copy of the param
        self._g_host: dict = {}                # key -> pinned flat copy of the grad
        self._ready: dict = {}                 # key -> event: both copies are in host memory
        self._params: dict = {}

    @property
    def pinned_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._p_host.values(), *self._g_host.values()))

    def _buffer(self, store: dict, key: int, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(key)
        if buf is None or buf.dtype != like.dtype or buf.numel() != like.numel():
            buf = store[key] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
        return buf

    def begin_step(self, params: dict) -> dict:
        """Starts the copies of {key: (flat cuda param, flat cuda grad)} to the host (a sharded
        param's local shard); returns {key: (host param, host grad)} flat views for the kernels."""
        self.h2d.synchronize()  # the last step's copies back have left the host buffers
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # after backward wrote the grads
        host = {}
        with torch.cuda.stream(self.d2h):
            for key, (p, grad) in params.items():
                p_host = self._buffer(self._p_host, key, p)
                g_host = self._buffer(self._g_host, key, grad)
                p_host.copy_(p.detach().reshape(-1), non_blocking=True)
                g_host.copy_(grad.reshape(-1), non_blocking=True)
                self._ready[key] = self.d2h.record_event()
                host[key] = (p_host, g_host)
        self._params = {key: p for key, (p, _) in params.items()}
        return host

    def before_update(self, page) -> None:
        for seg in page.segments:
            event = self._ready.get(seg.key)
            if event is not None:
                event.synchronize()  # the CPU kernel reads this param's host copies

    def after_update(self, page) -> None:
        with torch.cuda.stream(self.h2d):
            for seg in page.segments:
                p = self._params.get(seg.key)
                if p is None:
                    continue
                end = seg.start + seg.length
                # The CPU has finished writing these elements (program order): copy them back.
                p.detach().view(-1)[seg.start:end].copy_(self._p_host[seg.key][seg.start:end], non_blocking=True)

    def end_step(self) -> None:
        done = self.h2d.record_event()
        torch.cuda.current_stream(self.device).wait_event(done)  # the next forward sees the new params
        self._params = {}
        self._ready = {}
