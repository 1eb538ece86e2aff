"""BackwardOverlap: ``paging.overlap: "exact"`` — the optimizer step runs while backward does.

[Note: overlap with backward] On the micro-batch that ends an accumulation window, the engine
opens a paged step before backward (PagedOptimizer.begin_overlapped_step) and every trainable
param's post-accumulate-grad hook joins it the moment its grad is final; a page whose params
have all joined is paged in, updated and written back while backward computes the grads of the
layers below ([Note: overlapped step] in optim/paged_step.py). engine.step() then updates the pages
still waiting (params that got no grad, or share a page with one that came late) and waits for
the write-backs. On the other micro-batches the hooks do nothing: grads keep accumulating.

What a page's update takes from outside its own grads is one number, the step's grad_scale
(1 / loss scale, times the clipping coefficient), and whether the step runs at all (a
non-finite grad or fp16 overflow skips it). Both are known only after the last grad. So:
  * with no clipping and no fp16 the scale is fixed before backward: every page may run early;
    in fp32 without clipping no norm is computed, so nothing can skip the step either and the
    pages run early with nothing kept;
  * otherwise the engine guesses that the step will neither clip nor be skipped (scale 1, or
    1 / loss scale), when the last step did neither, and pages run early on that guess
    ([Note: speculative step] in optim/paged_step.py). After backward the engine computes the
    norm as always and settles the step: a right guess keeps the pages; a wrong one restores
    every early page and its params to their pre-step bytes and runs them again with the
    right scale, or drops the step. The result is bit for bit the step after backward either
    way. On host pages the CPU executor keeps copies of the pages it updates early (host
    memory, bounded by paging.speculation_budget_mb; pages past it wait); on NVMe it streams
    them during backward and commits only at the step, so taking them back is forgetting the
    writes. With the CUDA executor, or when the last step clipped or was skipped, the pages
    wait for the check instead (no guess, nothing to restore).
  * bf16 with no clipping, where pages cannot be restored: a non-finite norm found after pages
    were updated cannot skip the step, so it raises FloatingPointError and the optimizer
    refuses to step until a checkpoint is loaded (as after any failed step). Where they can be
    restored, the step is skipped as without overlap.
  * several ranks (gloo): a param's grad is final on its owner only once the ranks' grads of
    it are averaged, so the hooks hand the full params to a BucketReducer ([Note: reduce during
    backward] in bucket_reduce.py), which exchanges a bucket of them as soon as all are final
    and passes this rank's shards of it to the open step. The check after backward uses the
    global norm (every rank the same), so every rank keeps, redoes or skips alike; where a
    rank cannot take its early pages back, every rank raises.
"""
from __future__ import annotations

import torch

from .bucket_reduce import params_reached


class BackwardOverlap:
    def __init__(self, params, optimizer, *, scale_is_fixed: bool, retain_bytes: int, reducer=None,
                 may_skip: bool = True):
        """`params`: the params whose hooks mark grads final (the optimizer's, or with several
        ranks the full params of the partition, whose shards the optimizer holds, with
        `reducer`, a BucketReducer)."""
        self.optimizer = optimizer
        self.reducer = reducer
        self.scale_is_fixed = scale_is_fixed  # no clipping and no fp16: the guess cannot be wrong but for inf/nan
        self.may_skip = may_skip  # the engine checks the grads for inf/nan (it computes their norm)
        self.retain_bytes = retain_bytes
        self._open = None
        self._guess_ok = True   # the last step neither clipped nor was skipped: worth guessing again
        self.pages_in_backward = 0  # of the last overlapped step: pages done before engine.step()
        self.last_outcome = None    # of the last overlapped step: settle()'s word, or "fixed"
        # Hooks fire on the autograd thread (for CUDA, with the stream backward produced the
        # grad on as the current stream), after the grad is accumulated into p.grad.
        self._hooked = [p for p in params if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_is_final) for p in self._hooked]

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def _early(self) -> str:
        """Which pages may run before backward ends ([Note: overlap with backward])."""
        if self.scale_is_fixed and not self.may_skip:
            return "all"  # nothing after backward can change the step: nothing to keep
        if self.optimizer.can_restore_pages:
            return "kept" if self._guess_ok or self.scale_is_fixed else "none"
        return "all" if self.scale_is_fixed else "none"

    def arm(self, grad_scale: float, loss: torch.Tensor | None = None) -> None:
        """Before the backward of `loss` that ends an accumulation window: opens the step with
        the guessed `grad_scale`, or leaves it to engine.step() when the optimizer cannot
        overlap yet (its first step lays out the pages). A second backward before engine.step()
        is refused: the pages (and, with several ranks, the buckets) already went with the
        first one's grads."""
        if self._open is not None or (self.reducer is not None and self.reducer.running):
            raise RuntimeError(
                "engine.backward was called twice on the micro-batch that ends an accumulation window: with "
                "paging.overlap 'exact' the step's pages are updated during the first backward, from its grads, "
                "so a second backward's grads would be left out; add the losses and call backward once, call "
                "engine.step() between the two, or set paging.overlap 'off'. engine.step() may still be called "
                "and takes the first backward's grads")
        if self._open is None:
            self._open = self.optimizer.begin_overlapped_step(grad_scale, early=self._early(),
                                                              retain_bytes=self.retain_bytes)
        if self.reducer is not None and not self.reducer.running:
            # reduces this window's grads whether or not a step opened; params this backward
            # cannot reach need not hold their buckets back ([Note: reduce during backward])
            step = self._open
            reached = params_reached(loss) if loss is not None else None
            self.reducer.start(step.ready if step is not None else None,
                               count_done=step.pages_done if step is not None else None,
                               unreached=[] if reached is None else
                               [p for p in self._hooked if id(p) not in reached])

    def _grad_is_final(self, param: torch.Tensor) -> None:
        if self.reducer is not None:
            self.reducer.grad_is_final(param)  # the step hears of it once the ranks' grads are averaged
        elif self._open is not None:
            self._open.ready([param])

    def finish_reduction(self) -> bool:
        """With several ranks, after backward: the buckets left are exchanged and every
        shard's grad is averaged. False when no reduction ran in this window (step() without
        a backward at the boundary): the engine reduces as without overlap."""
        if self.reducer is None or not self.reducer.running:
            return False
        try:
            self.reducer.finish()
        except BaseException as err:
            self.abort(f"the grad reduction or a page update failed ({type(err).__name__}: {err})")
            raise
        return True

    def pages_done(self) -> int:
        """Pages of the open step updated (or, for CUDA, enqueued) so far."""
        return 0 if self._open is None else self._open.pages_done()

    @property
    def can_take_back(self) -> bool:
        """Whether the open step can still be dropped with params and state as before it."""
        step = self._open
        return step is not None and (not step.settled or step.pages_done() == 0)

    def observe(self, guess_held: bool) -> None:
        """After every optimizer step: whether it took the guessed scale (no clipping, not skipped)."""
        self._guess_ok = guess_held

    def close(self, grad_scale: float) -> None:
        """The step's grad_scale is known: keeps or redoes the early pages, updates the pages
        still waiting and records the step (engine.step())."""
        step, self._open = self._open, None
        self.pages_in_backward = self._done_in_backward(step)
        self.last_outcome = "fixed" if step.settled else step.settle(grad_scale)
        step.close()

    def skip(self, why: str) -> None:
        """The step must not run (non-finite grads): takes back the early pages (can_take_back)
        and drops it."""
        step, self._open = self._open, None
        self.pages_in_backward = self._done_in_backward(step)
        if not step.settled:
            self.last_outcome = step.settle(None)
        step.abort(why)

    def _done_in_backward(self, step) -> int:
        """Pages of `step` updated while backward ran: with a reducer, counted when backward
        was over (finish() goes on to update the pages of the buckets left)."""
        return self.reducer.done_in_backward if self.reducer is not None else step.pages_done()

    def abort(self, why: str) -> None:
        """Backward failed: drops the open step. Early pages are taken back where they were kept;
        otherwise they cannot be, and the optimizer refuses to step until a checkpoint is loaded
        ([Note: failed steps] in optim/paged.py)."""
        if self.reducer is not None:
            self.reducer.stop()
        step, self._open = self._open, None
        if step is not None:
            if not step.settled:
                step.settle(None, count=False)
            step.abort(why)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
