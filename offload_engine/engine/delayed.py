"""DelayedUpdate: ``paging.overlap: "delayed"`` — step t's update runs while step t+1's forward
and backward run.

[Note: delayed update] At the boundary of step t the engine decides the step as always (grads
reduced, their global norm, clipping coefficient, fp16 overflow or a non-finite skip): the
decision uses step t's grads and nothing else, so it is the one the step after backward takes.
The update itself is launched on a thread of its own ("oe-delayed-step") and writes a host copy
of each param (its *shadow*) instead of the param, while the module goes on to the next
accumulation window on the params it has. At the boundary of step t+1 the engine waits for
that thread, copies the shadows into the params (and, with several ranks, exchanges the updated
slices), and only then launches step t+1. So, for steps past the warm-up:

    forward/backward of window t+1 read θ(t-1), the params before step t's update;
    step t+1's update starts from θ(t) and step t+1's own grads: θ(t+1) = U(θ(t), g(t+1)),
    g(t+1) = ∇L(θ(t-1); window t+1).

The update is exact for the grads it is given (bit for bit the step after backward applied
to θ(t)); what changes is only where those grads were taken: one step stale, as in
ZeRO-Offload's delayed parameter update. A skipped step launches nothing, so the next window
reads the params unchanged, as without delay. The first ``paging.delayed_warmup_steps``
optimizer steps run undelayed (their updates land before the next forward), where a stale
gradient would hurt most.

Pending work is applied ("flushed") before anything reads params or state as a whole: a
checkpoint save (so a resumed run continues exactly as the run that saved it: both start
the next window from the flushed params), a load, engine.eval(), and
engine.apply_pending_step(), which a training loop calls before it reads the params itself.

The thread reads only what the launch handed it: the grads (the engine's zero_grad drops its
references, and the next backward writes fresh tensors), the hyperparameters taken at launch
(the lr scheduler steps right after) and the shadows. It runs its kernels on one thread
(OpenMP counts are per thread), leaving torch's threads to forward and backward.
"""
from __future__ import annotations

import threading

import torch

from ..optim import sharded
from ..paging.scheduler import phase


class DelayedUpdate:
    def __init__(self, optimizer, warmup_steps: int):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self._shadow: dict = {}      # param -> its host copy, reused every step
        self._thread = None
        self._error = None
        self._pending = None         # the params (with their shadows) the running step updates
        self.steps_delayed = 0

    def delays(self, step_number: int) -> bool:
        """Whether optimizer step `step_number` (1-based) is delayed: past the warm-up."""
        return step_number > self.warmup_steps

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def launch(self, grad_scale: float) -> None:
        """Starts this step's update on the thread: the jobs (grads, lr, step counts) are taken
        here; the shadows take the params' values on the thread, then the pages update them."""
        if self._pending is not None:
            raise RuntimeError("DelayedUpdate.launch: the previous step is still pending (wait() and apply() first)")
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        into = {}
        for p in params:
            local = _local(p)
            shadow = self._shadow.get(p)
            if shadow is None or shadow.shape != local.shape or shadow.dtype != local.dtype:
                shadow = self._shadow[p] = torch.empty_like(local, memory_format=torch.contiguous_format)
            into[p] = shadow
        step = self.optimizer.begin_detached_step(grad_scale, into)
        if step is None:
            return
        self._pending = into
        self._error = None
        self.steps_delayed += 1
        # Why a thread: the update then runs while the caller goes on to the next forward and
        # backward, which read the params; the thread writes only the shadows and the pages.
        # Not a daemon: a script that ends with a step pending has the interpreter wait for it
        # at exit, instead of finalizing under a thread still inside the kernels (an abort).
        self._thread = threading.Thread(target=self._run, args=(step, into), name="oe-delayed-step")
        self._thread.start()

    def _run(self, step, into: dict) -> None:
        try:
            torch.set_num_threads(1)  # per thread: forward and backward keep torch's team
            with torch.no_grad(), phase("delayed_step"):
                for p, shadow in into.items():
                    shadow.copy_(_local(p))  # the update reads θ(t-1) and writes θ(t) in its place
                step.close()
        except BaseException as err:  # wait() raises it on the caller's thread
            self._error = err

    def wait(self) -> None:
        """Waits for the pending step's thread; raises its error (the params are then those
        before it: the shadows are not applied; the optimizer refuses further steps when pages
        were updated, [Note: failed steps] in optim/paged.py)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            self._pending = None
            raise err

    def apply(self) -> bool:
        """Copies the finished step's shadows into the params (after wait()); whether there was one."""
        if self._thread is not None:
            raise RuntimeError("DelayedUpdate.apply: wait() first")
        into, self._pending = self._pending, None
        if into is None:
            return False
        with torch.no_grad(), phase("delayed_apply"):
            for p, shadow in into.items():
                _local(p).copy_(shadow)
        return True

    @property
    def shadow_bytes(self) -> int:
        """Host bytes of the param copies held now."""
        return sum(t.numel() * t.element_size() for t in self._shadow.values())

    @staticmethod
    def shadow_bytes_for(optimizer) -> int:
        """What the copies of every trainable param of `optimizer` take once each has had a grad."""
        return sum(_local(p).numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
                   if p.requires_grad)


def _local(p: torch.Tensor) -> torch.Tensor:
    return sharded.local(p).detach()
