"""One paged step (_PagedStep), fed all at once by PagedOptimizer.step() or page by page from
backward hooks with overlap_backward: the per-param jobs and which pages are ready. The pages
themselves move through the Pager's PageStep (paging/pager.py). Split from paged.py, which
holds the optimizers, their layout and their state access."""
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

    def __init__(self, opt, grad_scale: float, overlapped: bool = False):
        self.opt = opt  # a PagedOptimizer (paged.py imports this module, not the reverse)
        self.grad_scale = grad_scale
        self.table = opt.pager.table
        self.work = {}                 # key -> (flat param, flat grad, step, seed, hyper)
        self.strided = []              # (param's local tensor, contiguous copy updated in its place)
        self.joined = set()            # keys whose grads are final
        self.fed = set()               # pages already handed to the pipeline
        self.waiting = {}              # page -> keys on it that have not joined
        for key in opt._keys.values():
            for seg in self.table.segments_of[key]:
                self.waiting.setdefault(seg.page, set()).add(key)
        self.late = []                 # params that joined without pages
        self.where = {p: (gi, index, group) for gi, group in enumerate(opt.param_groups)
                      for index, p in enumerate(group["params"])}
        self.adam_step_ = kernels.adam_step_impl()
        self.pages = opt.pager.open_step(self._update, overlapped=overlapped)
        # The CPU executor for CUDA params copies every param and grad to the host first
        # (close()), so its pages all run there.
        self.deferred = self.pages.defers

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
            for seg in self.table.segments_of[key]:
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
            fmt = opt.state_format_for(group, p).name
            state.update({"step": torch.tensor(0.0), "format": fmt})
            if fmt != "fp32":
                state["block_size"] = group["block_size"]
        step = int(state["step"]) + 1
        seed = kernels.as_int64(_stream_seed(opt._seed_base, gi, index, step))
        p_local = sharded.local(p)  # this rank's shard of a sharded param ([Note: sharded params])
        p_work = p_local if p_local.is_contiguous() else p_local.contiguous()  # kernels need contiguous memory
        if p_work is not p_local:
            if self.deferred:
                raise ValueError(f"{type(opt).__name__}(executor='cpu') needs contiguous CUDA params; a param of "
                                 f"shape {list(p.shape)} is strided")
            self.strided.append((p_local, p_work))
        grad = sharded.local(p.grad).contiguous()
        return (p_work.view(-1), grad.view(-1), step, seed, group_hyper(group, self.grad_scale))

    def _update(self, page, buf):
        for seg in self.table.pages[page].segments:
            job = self.work.get(seg.key)
            if job is None:
                continue
            p_flat, g_flat, step, seed, hyper = job
            end = seg.start + seg.length
            step_state_(self.opt._algorithm, p_flat[seg.start:end], g_flat[seg.start:end], seg.views(buf),
                        seg.fmt.name, seg.fmt.block, step, seed, hyper, self.adam_step_, index_offset=seg.start)

    def _feed(self, pages) -> None:
        pages = [q for q in pages if q not in self.fed]
        if not pages or self.deferred:
            return
        self.fed.update(pages)
        try:
            self.pages.feed(pages)  # with a pager thread: raises its error, if it had one
        except BaseException as err:
            self._fail(err)
            raise

    def pages_done(self) -> int:
        """Pages updated (or, for CUDA, enqueued) so far; waits for a pager thread to have
        enqueued what was posted to it."""
        self.stop_pager()
        return self.pages.pages_done

    def stop_pager(self) -> None:
        """Waits for the pager thread to have enqueued every page posted to it; raises its error."""
        try:
            self.pages.drain()
        except BaseException as err:
            self._fail(err)
            raise

    def abort(self, why: str) -> None:
        """Drops the step (backward failed, or its grads must not be applied). Pages already
        updated cannot be taken back, so then the optimizer refuses to step until a checkpoint
        is loaded ([Note: failed steps] in paged.py)."""
        try:
            self.pages.drain()  # every page already posted is enqueued: then nothing is in flight unseen
        except Exception as err:  # the step is dropped either way; the pager's own error joins the reason
            why = f"{why}; the pager failed too ({type(err).__name__}: {err})"
        done = self.pages.pages_done
        self.pages.abort()
        if done:
            self.opt.mark_failed(f"{why} after {done} pages were updated during backward (paging.overlap_backward)")

    def _fail(self, err) -> None:
        done = self.pages.pages_done
        if done:
            total = len({seg.page for key in self.work for seg in self.opt.pager.table.segments_of[key]})
            self.opt.mark_failed(f"a step failed after updating {done} of {max(total, done)} pages "
                                 f"({type(err).__name__}: {err})")

    def close(self) -> None:
        """Updates the pages still waiting for the params that have grads, lays out and updates
        params that joined without pages, waits for the write-backs and records the step."""
        opt = self.opt
        ok = False
        self.stop_pager()
        try:
            if self.deferred:  # CUDA params, CPU kernels ([Note: CPU executor for CUDA params])
                on_gpu = {key: job[:2] for key, job in self.work.items()}  # flat param and grad
                host = self.pages.stage(on_gpu)  # pinned host copies of each param and grad
                self.work = {key: (*host[key], *job[2:]) for key, job in self.work.items()}
                self.deferred = False
            rest = sorted({seg.page for key in self.work for seg in self.table.segments_of[key]} - self.fed)
            self._feed(rest)
            self.pages.finish()
            if self.late:
                # New params: laid out once the pages in flight are stored, then run as a second pass.
                opt._ensure_layout(self.late)
                self.table = opt.pager.table
                late, self.late = self.late, []
                keys_before = set(self.work)
                self.pages.next_pass()
                self.ready(late)
                new_pages = sorted({seg.page for key in set(self.work) - keys_before
                                    for seg in self.table.segments_of[key]} - self.fed)
                self._feed(new_pages)
                self.pages.finish()
            ok = True
        except BaseException as err:
            self._fail(err)
            raise
        finally:
            for p, p_work in self.strided:
                p.copy_(p_work)
            self.pages.close(record=ok)
        for p, key in opt._keys.items():
            if key in self.work:
                opt.state[p]["step"].fill_(self.work[key][2])
