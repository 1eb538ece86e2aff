"""BackwardOverlap: ``paging.overlap_backward`` — the optimizer step runs while backward does.

[Note: overlap with backward] On the micro-batch that ends an accumulation window, the engine
opens a paged step before backward (PagedOptimizer.begin_overlapped_step) and every trainable
param's post-accumulate-grad hook joins it the moment its grad is final; a page whose params
have all joined is paged in, updated and written back while backward computes the grads of the
layers below ([Note: overlapped step] in optim/paged_step.py). engine.step() then updates the pages
still waiting (params that got no grad, or share a page with one that came late) and waits for
the write-backs. On the other micro-batches the hooks do nothing: grads keep accumulating.

The rule: a page is updated from its own grads before backward ends, so nothing that needs
every grad first may change the update. Hence overlap_backward requires
  * gradient_clipping 0: the global norm, and so the clipping coefficient, is known only
    after the last grad; a page updated earlier could not be clipped by it;
  * no fp16 loss scaling: an overflow anywhere must skip the whole step;
  * one process: data-parallel grads are averaged across ranks after backward.
initialize() refuses the other combinations, naming the key. With bf16 the engine still takes
the global norm after backward; a non-finite norm cannot skip a step whose pages are already
updated, so it raises FloatingPointError and the optimizer refuses to step until a checkpoint
is loaded (as after any failed step), instead of silently training on.
Under those conditions the overlapped step is bit for bit the step after backward.
"""
from __future__ import annotations

import torch


class BackwardOverlap:
    def __init__(self, params, optimizer):
        self.optimizer = optimizer
        self._open = None
        self.pages_in_backward = 0  # of the last overlapped step: pages done before engine.step()
        # Hooks fire on the autograd thread (for CUDA, with the stream backward produced the
        # grad on as the current stream), after the grad is accumulated into p.grad.
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_is_final) for p in params
                         if p.requires_grad]

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def arm(self) -> None:
        """Before the backward that ends an accumulation window: opens the step, or leaves it
        to engine.step() when the optimizer cannot overlap yet (its first step lays out the
        pages)."""
        if self._open is None:
            self._open = self.optimizer.begin_overlapped_step()

    def _grad_is_final(self, param: torch.Tensor) -> None:
        if self._open is not None:
            self._open.ready([param])

    def pages_done(self) -> int:
        """Pages of the open step updated (or, for CUDA, enqueued) so far."""
        return 0 if self._open is None else self._open.pages_done()

    def close(self) -> None:
        """Updates the pages still waiting and records the step (engine.step())."""
        step, self._open = self._open, None
        self.pages_in_backward = step.pages_done()
        step.close()

    def abort(self, why: str) -> None:
        """Backward failed, or its grads must not be applied: drops the open step. Pages already
        updated cannot be taken back, so then the optimizer refuses to step until a checkpoint
        is loaded ([Note: failed steps] in optim/paged.py)."""
        step, self._open = self._open, None
        if step is not None:
            step.abort(why)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
