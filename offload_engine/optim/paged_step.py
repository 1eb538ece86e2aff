"""One paged step (_PagedStep), fed all at once by PagedOptimizer.step() or page by page from
backward hooks with overlap_backward, and the pager thread that feeds the CUDA pipeline in
the overlapped case (_PagerThread). Split from paged.py, which holds the optimizers, their
layout and their state access."""
from __future__ import annotations

import torch

from .. import kernels
from . import sharded
from ._base import _stream_seed
from ._update import group_hyper, step_state_


class _PagedStep:
    """One paged step: params join with ready() once their grads are final, a page is updated
    as soon as every param on it has joined, and close() updates the rest and records the step.

    [Note: overlapped step] step() joins every param at once. With overlap_backward the engine
    opens the step before the backward of an accumulation window's last micro-batch and joins
    each param from its post-accumulate-grad hook, so pages are paged in, updated and written
    back while backward goes on. A page's update reads only its own params' grads and the
    step's fixed grad_scale, so the result is bit for bit step()'s. A param that gets no grad
    in this backward keeps its pages waiting until close(), which updates them for the params
    that did get one (as step() would). A param that has no pages yet is laid out in close(),
    after the pages already in flight are done, and its pages run then.
    """

    def __init__(self, opt, grad_scale: float, pager_thread: bool = False):
        self.opt = opt  # a PagedOptimizer (paged.py imports this module, not the reverse)
        self.grad_scale = grad_scale
        self.work = {}                 # key -> (flat param, flat grad, step, seed, hyper)
        self.strided = []              # (param's local tensor, contiguous copy updated in its place)
        self.joined = set()            # keys whose grads are final
        self.fed = set()               # pages already handed to the scheduler
        self.waiting = {}              # page -> keys on it that have not joined
        for key, page_list in ((k, opt._table.segments_of[k]) for k in opt._keys.values()):
            for seg in page_list:
                self.waiting.setdefault(seg.page, set()).add(key)
        self.late = []                 # params that joined without pages
        self.where = {p: (gi, index, group) for gi, group in enumerate(opt.param_groups)
                      for index, p in enumerate(group["params"])}
        # The CPU executor for CUDA params copies every param and grad to the host first
        # (close()), so its pages all run there.
        self.deferred = opt._offload is not None
        self.adam_step_ = kernels.adam_step_impl()
        self.pages_before_close = 0
        self.opt._store.check()  # a deleted or truncated state file is reported before anything changes
        self.opt._scheduler.start(self._update)
        self.pager = _PagerThread(opt._scheduler, opt._device) if pager_thread else None

    def ready(self, params) -> None:
        """Params whose grads are final: builds their jobs and updates every page that now has
        all its params."""
        opt = self.opt
        now = []
        for p in params:
            if p.grad is None or p.numel() == 0:
                continue
            key = opt._keys.get(p)
            if key is None:
                self.late.append(p)
                continue
            if key in self.joined:
                continue
            self.joined.add(key)
            self.work[key] = self._job(p)
            for seg in opt._table.segments_of[key]:
                keys = self.waiting.get(seg.page)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self.waiting[seg.page]
                        now.append(seg.page)
        self._feed(sorted(set(now)))

    def _job(self, p):
        opt = self.opt
        gi, index, group = self.where[p]
        state = opt.state[p]
        if not state:
            fmt = opt._format_for(group, p)
            state.update({"step": torch.tensor(0.0), "format": fmt})
            if fmt != "fp32":
                state["block_size"] = group["block_size"]
        step = int(state["step"]) + 1
        seed = kernels.as_int64(_stream_seed(opt._seed_base, gi, index, step))
        p_local = sharded.local(p)  # this rank's shard of a sharded param ([Note: sharded params])
        p_work = p_local if p_local.is_contiguous() else p_local.contiguous()  # kernels need contiguous memory
        if p_work is not p_local:
            if opt._offload is not None:
                raise ValueError(f"{type(opt).__name__}(executor='cpu') needs contiguous CUDA params; a param of "
                                 f"shape {list(p.shape)} is strided")
            self.strided.append((p_local, p_work))
        grad = sharded.local(p.grad).contiguous()
        return (p_work.view(-1), grad.view(-1), step, seed, group_hyper(group, self.grad_scale))

    def _update(self, page, buf):
        opt = self.opt
        table, offload = opt._table, opt._offload
        if offload is not None:
            offload.before_update(table.pages[page])
        for seg in table.pages[page].segments:
            job = self.work.get(seg.key)
            if job is None:
                continue
            p_flat, g_flat, step, seed, hyper = job
            end = seg.start + seg.length
            step_state_(opt._algorithm, p_flat[seg.start:end], g_flat[seg.start:end], seg.views(buf), seg.fmt.name,
                        seg.fmt.block, step, seed, hyper, self.adam_step_, index_offset=seg.start)
        if offload is not None:
            offload.after_update(table.pages[page])

    def _feed(self, pages) -> None:
        pages = [q for q in pages if q not in self.fed]
        if not pages or self.deferred:
            return
        self.fed.update(pages)
        if self.pager is not None:
            self.pager.post(pages)  # raises the pager thread's error, if it had one
            return
        try:
            with torch.no_grad():  # from a backward hook too: the updates write params in place, untracked
                self.opt._scheduler.feed(pages)
        except BaseException as err:
            self._fail(err)
            raise

    def stop_pager(self) -> None:
        """Waits for the pager thread to have enqueued every page posted to it; raises its error."""
        pager, self.pager = self.pager, None
        if pager is not None:
            try:
                pager.join()
            except BaseException as err:
                self._fail(err)
                raise

    def _fail(self, err) -> None:
        done = self.opt._scheduler.pages_updated + self.pages_before_close
        if done:
            total = len({seg.page for key in self.work for seg in self.opt._table.segments_of[key]})
            self.opt._failed = (f"a step failed after updating {done} of {max(total, done)} pages "
                                f"({type(err).__name__}: {err})")

    def close(self) -> None:
        """Updates the pages still waiting for the params that have grads, lays out and updates
        params that joined without pages, waits for the write-backs and records the step."""
        opt = self.opt
        stats = None
        self.stop_pager()
        try:
            if opt._offload is not None:  # CUDA params, CPU kernels ([Note: CPU executor for CUDA params])
                on_gpu = {key: job[:2] for key, job in self.work.items()}  # flat param and grad
                host = opt._offload.begin_step(on_gpu)  # pinned host copies of each param and grad
                self.work = {key: (*host[key], *job[2:]) for key, job in self.work.items()}
                self.deferred = False
            rest = sorted({seg.page for key in self.work for seg in opt._table.segments_of[key]} - self.fed)
            self._feed(rest)
            stats = opt._scheduler.finish()
            if self.late:
                # New params: laid out once the pages in flight are stored, then run as a second pass.
                self.pages_before_close = opt._scheduler.pages_updated
                opt._ensure_layout(self.late)
                late, self.late = self.late, []
                keys_before = set(self.work)
                opt._scheduler.start(self._update)
                self.ready(late)
                new_pages = sorted({seg.page for key in set(self.work) - keys_before
                                    for seg in opt._table.segments_of[key]} - self.fed)
                self._feed(new_pages)
                stats.accumulate(opt._scheduler.finish())
        except BaseException as err:
            self._fail(err)
            raise
        finally:
            for p, p_work in self.strided:
                p.copy_(p_work)
            if opt._offload is not None:
                opt._offload.end_step()
        for p, key in opt._keys.items():
            if key in self.work:
                opt.state[p]["step"].fill_(self.work[key][2])
        opt._record(stats)


class _PagerThread:
    """Feeds an overlapped step's pages to the CUDA pipeline from its own thread.

    Why a thread: the backward hooks run on the autograd thread, which also issues the backward
    kernels. Enqueuing a page's copies and update takes that thread some tens of microseconds,
    and once the GPU's launch queues are full each enqueue waits for the GPU; done in the hook,
    both would hold back backward's own kernels. The hook only records an event on backward's
    stream (the grads of these pages are enqueued before it) and posts the pages here; this
    thread makes the update stream wait for that event ([Note: CUDA page pipeline])."""

    def __init__(self, scheduler, device: torch.device):
        import queue
        import threading

        self.scheduler = scheduler
        self.device = device
        self.error: BaseException | None = None
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oe-pager", daemon=True)
        self._thread.start()

    def post(self, pages) -> None:
        if self.error is not None:
            raise self.error
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
                    self.scheduler.feed(*item)
                except BaseException as err:  # reported by the next post() or by join()
                    self.error = err

    def join(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
