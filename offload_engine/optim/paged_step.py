"""One paged step (_PagedStep), fed all at once by PagedOptimizer.step() or page by page from
backward hooks with paging.overlap "exact": the per-param jobs and which pages are ready. The pages
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

    [Note: overlapped step] step() joins every param at once. With paging.overlap "exact" the engine
    opens the step before the backward of an accumulation window's last micro-batch and joins
    each param from its post-accumulate-grad hook, so pages are paged in, updated and written
    back while backward goes on. A page's update reads only its own params' grads and the
    step's fixed grad_scale, so the result is bit for bit step()'s. A param that gets no grad
    in this backward keeps its pages waiting until close(), which updates them for the params
    that did get one (as step() would). A param that has no pages yet is laid out in close(),
    after the pages already in flight are done, and its pages run then.

    [Note: speculative step] A page's update depends on the rest of the step through one
    number, grad_scale, and through whether the step runs at all. When the engine cannot know
    those before backward ends (clipping, fp16, non-finite grads), it opens the step with the
    scale it guesses and early="kept": a page runs as soon as it is ready if the host bytes to
    take it back fit retain_bytes (the page itself, kept by the PageStep just before its update,
    and its params' values, kept here), and waits otherwise. settle(grad_scale) after backward
    keeps the early pages when the guess was the scale; else it writes the kept params' values
    and pages back, so params and state are the pre-step ones bit for bit, and the pages run
    again with the real scale in close() (or abort() drops the step). Either way the result is
    step()'s. With early="none" nothing runs before settle(); with "all" (the scale is fixed)
    nothing is kept and settle() is not called.

    [Note: detached step] With paging.overlap "delayed" the engine builds the step's jobs at
    the boundary (ready() with `hold`: the grads are captured, no page runs) and runs close()
    on a thread of its own while the next micro-batches' forward and backward run. The
    updates then write `into[param]` (a host copy of the param, same shape) instead of the
    param, which forward keeps reading; the engine copies them into the params at the next
    boundary ([Note: delayed update] in engine/delayed.py). The result in `into` is bit for
    bit step()'s.
    """

    def __init__(self, opt, grad_scale: float, overlapped: bool = False, early: str = "all",
                 retain_bytes: int = 0, into: dict | None = None, hold: bool = False):
        self.opt = opt  # a PagedOptimizer (paged.py imports this module, not the reverse)
        self.grad_scale = grad_scale
        self.into = into    # param -> the tensor its update writes instead of it ([Note: detached step])
        self.hold = hold    # ready() builds jobs only; close() runs every page
        # Which pages may run before settle() says what grad_scale the step takes
        # ([Note: speculative step]): "all" (the scale cannot change), "kept" (pages whose
        # pre-step bytes fit `retain_bytes`, kept so that settle() can take them back), "none".
        self.early = early
        self.retain_bytes = retain_bytes
        self.settled = early == "all"
        self.kept_params = []          # (flat param, start, end, its values before the update)
        self.kept_param_bytes = 0
        self.kept_bytes_planned = 0    # what the pages fed before settle() will keep, at most
        self.peak_kept_bytes = 0       # measured: pages and param values held at once
        self.group_of = {}             # key -> its param group
        self.restored = False          # settle() took the early pages back
        self.table = opt.pager.table
        self.work = {}                 # key -> (flat param, flat grad, step, seed, hyper)
        # The jobs on pages updated in host memory for CUDA params (host copies of the params
        # and grads), and which pages those are (None: all): set in close() by stage().
        self.host_work: dict | None = None
        self.host_pages: frozenset | None = None
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
        self.pages = opt.pager.open_step(self._update, overlapped=overlapped, retain=early == "kept")
        if early == "kept" and not self.pages.can_restore:
            self.early = "none"  # nothing to restore from (the pager's restorable): wait for settle()
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
            self.group_of[key] = self.where[p][2]
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
        if self.into is not None:
            p_local = self.into[p]  # the update writes a copy of the param ([Note: detached step])
        p_work = p_local if p_local.is_contiguous() else p_local.contiguous()  # kernels need contiguous memory
        if p_work is not p_local:
            if self.deferred:
                raise ValueError(f"{type(opt).__name__}(executor='cpu') needs contiguous CUDA params; a param of "
                                 f"shape {list(p.shape)} is strided")
            self.strided.append((p_local, p_work))
        grad = sharded.local(p.grad).contiguous()
        return (p_work.view(-1), grad.view(-1), step, seed, group_hyper(group, self.grad_scale))

    def _update(self, page, buf):
        work = self.work
        on_host = self.host_work is not None and (self.host_pages is None or page in self.host_pages)
        if on_host:
            work = self.host_work
        for seg, views in self.opt.pager.segment_views(page, buf):  # [Note: page views] in paging/pager.py
            job = work.get(seg.key)
            if job is None:
                if on_host and seg.key in self.work:  # staged without it: the page would silently stay
                    raise RuntimeError(f"param {seg.key} on host page {page} has no host copy")
                continue
            p_flat, g_flat, step, seed, hyper = job
            end = seg.start + seg.length
            if not self.settled:  # the param's values too: fp32 params are updated outside the page
                values = p_flat[seg.start:end].clone()
                self.kept_params.append((p_flat, seg.start, end, values))
                self.kept_param_bytes += values.numel() * values.element_size()
            step_state_(self.opt._algorithm, p_flat[seg.start:end], g_flat[seg.start:end], views,
                        seg.fmt.name, seg.fmt.block, step, seed, hyper, self.adam_step_, index_offset=seg.start)
        if not self.settled:
            self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)

    def _feed(self, pages) -> None:
        pages = [q for q in pages if q not in self.fed]
        if not pages or self.deferred or self.hold:
            return
        if not self.settled:
            pages = self._within_budget(pages)
            if not pages:
                return
        self.fed.update(pages)
        try:
            self.pages.feed(pages)  # with a pager thread: raises its error, if it had one
        except BaseException as err:
            self._fail(err)
            raise

    def _within_budget(self, pages) -> list:
        """The pages that may run before settle(): none, or those whose kept bytes (the page
        and its params' values) fit what is left of retain_bytes; the others wait for close()."""
        if self.early == "none":
            return []  # they wait: close() feeds every page not yet fed
        now = []
        for page in pages:
            cost = self.pages.retain_bytes_per_page + self._param_bytes(page)
            if self.kept_bytes_planned + cost <= self.retain_bytes:
                self.kept_bytes_planned += cost
                now.append(page)
        return now

    def _param_bytes(self, page) -> int:
        total = 0
        for seg in self.table.pages[page].segments:
            job = self.work.get(seg.key)
            if job is not None:
                total += seg.length * job[0].element_size()
        return total

    def settle(self, grad_scale: float | None, count: bool = True) -> str:
        """After backward, once the engine knows the step's grad_scale (None: skip the step):
        keeps the pages updated early when they used that scale; otherwise restores them (and
        their params) to the pre-step bytes. Returns "kept", "redo" (they run again with
        `grad_scale` in close()), "skipped" (abort() follows) or "waited" (nothing ran early).
        [Note: speculative step]"""
        if self.settled:
            raise RuntimeError("settle() is for a step opened with early='kept' or 'none', once")
        self.stop_pager()
        if not self.fed:
            outcome = "waited"
        elif grad_scale is not None and grad_scale == self.grad_scale:
            outcome = "kept"
        else:
            self._restore()  # before settled flips: a streamed page still running keeps its params' values
            outcome = "skipped" if grad_scale is None else "redo"
        self.settled = True
        if grad_scale is not None and grad_scale != self.grad_scale:
            self.grad_scale = grad_scale
            self.work = {key: (*job[:4], group_hyper(self.group_of[key], grad_scale))
                         for key, job in self.work.items()}
        if self.pages.can_restore:
            self.pages.release()  # settled: what runs from here on is final
        if count:
            self.opt.note_speculation(outcome, self.peak_kept_bytes)
        self.kept_params, self.kept_param_bytes = [], 0
        return outcome

    def _restore(self) -> None:
        """The params' and pages' pre-step values back, newest first; every page runs again."""
        self.pages.restore()  # first: a streamed step's thread may still be updating params
        for p_flat, start, end, values in reversed(self.kept_params):
            p_flat[start:end].copy_(values)
        self.fed.clear()
        self.restored = True

    @property
    def kept_bytes(self) -> int:
        """Host bytes kept now to take early pages back (their pages and params' values)."""
        return self.pages.retained_bytes + self.kept_param_bytes

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
        if done and not self.restored:
            self.opt.mark_failed(f"{why} after {done} pages were updated during backward (paging.overlap)")

    def _fail(self, err) -> None:
        done = self.pages.pages_done
        if done:
            total = len({seg.page for key in self.work for seg in self.opt.pager.table.segments_of[key]})
            self.opt.mark_failed(f"a step failed after updating {done} of {max(total, done)} pages "
                                 f"({type(err).__name__}: {err})")

    def _stage(self, keys) -> None:
        """Host copies of the params and grads of `keys` for the pages the executor updates in
        host memory (all of them for the CPU executor, some for the hybrid's host side)."""
        staged = self.pages.stage({key: self.work[key][:2] for key in keys})  # flat param and grad
        host = {key: (*pair, *self.work[key][2:]) for key, pair in staged.jobs.items()}
        if self.host_work is None:
            self.host_work, self.host_pages = host, staged.pages
        else:
            self.host_work.update(host)
            self.host_pages = (None if self.host_pages is None or staged.pages is None
                               else self.host_pages | staged.pages)
        self.deferred = False

    def close(self) -> None:
        """Updates the pages still waiting for the params that have grads, lays out and updates
        params that joined without pages, waits for the write-backs and records the step."""
        opt = self.opt
        ok = False
        self.hold = False
        self.stop_pager()
        try:
            if self.deferred:  # CUDA params, CPU kernels ([Note: CPU executor for CUDA params])
                self._stage(list(self.work))
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
                self.deferred = self.host_work is not None  # their pages wait for their host copies
                self.ready(late)
                if self.deferred:
                    self._stage(sorted(set(self.work) - keys_before))
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
