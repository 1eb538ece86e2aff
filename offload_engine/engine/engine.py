"""OffloadEngine: wraps a model and its optimizer the way deepspeed's engine does, and owns
precision, gradient accumulation, clipping, loss scaling and checkpoints.

    loss = engine(batch)           # forward (the wrapped module)
    engine.backward(loss)          # loss / gradient_accumulation_steps (* loss scale with fp16)
    engine.step()                  # steps the optimizer at accumulation boundaries only

[Note: one pass over the grads] At a boundary the engine needs one number from the grads: their
global norm, when clipping or bf16/fp16 needs it. A non-finite norm skips the step in any
precision (with fp16 it is an overflow that lowers the loss scale), so inf/nan grads never
reach the fp32 masters or the moments. The loss
scale and the clipping coefficient are then folded into one factor that this project's
optimizers apply inside the update kernel (``step(grad_scale=...)``); for another optimizer the
engine multiplies the grads first, as torch.nn.utils.clip_grad_norm_ does.
"""
from __future__ import annotations

import logging

import torch

from ..optim._base import BlockwiseOptimizer
from ..paging.scheduler import phase
from .checkpointer import Checkpointer
from .grad_norm import clip_coefficient, global_grad_norm
from .loss_scaler import LossScaler

log = logging.getLogger("offload_engine")


def _floats_to_half(value):
    """fp16.auto_cast: floating-point tensors to fp16, through lists, tuples and dicts; the rest
    (token ids, masks, other objects) as they are."""
    if isinstance(value, torch.Tensor):
        return value.half() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _floats_to_half(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
        return type(value)(*(_floats_to_half(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_floats_to_half(item) for item in value)
    return value


class OffloadEngine:
    """Returned by offload_engine.initialize(); see the module docstring."""

    def __init__(self, module: torch.nn.Module, config, optimizer, lr_scheduler=None, partition=None,
                 overlap=None, delayed=None):
        self.module = module
        self.partition = partition  # data-parallel ranks: this rank's share of the state ([Note: partitioned state])
        self.config = config
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps = config.gradient_accumulation_steps
        self.train_batch_size = config.train_batch_size
        self.gradient_clipping = float(config.gradient_clipping)
        self.precision = config.precision
        self.loss_scaler = None
        if self.precision == "fp16":
            fp16 = config.fp16
            dynamic = fp16.loss_scale == 0
            self.loss_scaler = LossScaler(
                dynamic=dynamic, init_scale=2.0 ** fp16.initial_scale_power if dynamic else fp16.loss_scale,
                window=fp16.loss_scale_window, hysteresis=fp16.hysteresis,
                consecutive_hysteresis=fp16.consecutive_hysteresis, min_scale=fp16.min_loss_scale)
        self.global_steps = 0        # optimizer steps taken (skipped fp16 steps included, as DeepSpeed counts)
        self.micro_steps = 0         # backward/step calls
        self.skipped_steps = 0       # fp16 steps skipped on overflow
        self.global_samples = 0
        self._last_grad_norm = None
        self._last_step_skipped = False
        self.overlap = overlap  # a BackwardOverlap with paging.overlap "exact" ([Note: overlap with backward])
        self.delayed = delayed  # a DelayedUpdate with paging.overlap "delayed" ([Note: delayed update])
        self.checkpointer = Checkpointer(self)  # save_checkpoint / load_checkpoint (checkpointer.py)

    # ---- the training loop ------------------------------------------------------------------
    def __call__(self, *inputs, **kwargs):
        return self.forward(*inputs, **kwargs)

    def forward(self, *inputs, **kwargs):
        if self.precision == "fp16" and self.config.fp16.auto_cast:
            inputs, kwargs = _floats_to_half(inputs), _floats_to_half(kwargs)
        return self.module(*inputs, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        """The module in eval mode, on the current params: a delayed step still pending is
        applied first (with several ranks, every rank calls it)."""
        self.apply_pending_step()
        self.module.eval()
        return self

    def apply_pending_step(self) -> bool:
        """With paging.overlap "delayed": waits for the step still running and copies its
        params into the module (with several ranks a collective: every rank calls it), so
        the module holds every step taken so far. Returns whether a step was pending; without
        delay it does nothing ([Note: delayed update])."""
        if self.delayed is None:
            return False
        with phase("delayed_wait"):
            self.delayed.wait()
        if not self.delayed.pending:
            return False
        if self.partition is not None:
            # Why: with shared-memory params another rank may still be reading them (a forward,
            # its metrics) until it reaches this same call.
            self.partition.barrier()
        self.delayed.apply()
        if self.partition is not None:
            with phase("param_gather"):
                self.partition.gather_params()
        return True

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next step() call steps the optimizer."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backpropagates `loss` divided by gradient_accumulation_steps (the grads of a whole
        accumulation window then average its micro-batches), times the loss scale with fp16.
        Returns the loss as given."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"engine.backward expects a scalar loss tensor, got "
                             f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else list(loss.shape)}")
        scaled = loss / self.gradient_accumulation_steps if self.gradient_accumulation_steps > 1 else loss
        if self.loss_scaler is not None:
            scaled = scaled.float() * self.loss_scaler.scale
        overlap = self.overlap if self.overlap is not None and self.is_gradient_accumulation_boundary() else None
        if overlap is not None:
            # pages update as their grads become final, with the scale the step takes unless it
            # clips or is skipped ([Note: overlap with backward])
            overlap.arm(self._unclipped_grad_scale(), scaled)
        try:
            scaled.backward(retain_graph=retain_graph)
        except BaseException as err:
            if overlap is not None:
                overlap.abort(f"backward failed ({type(err).__name__}: {err})")
            raise
        return loss

    def step(self) -> None:
        """Steps the optimizer (and the lr scheduler) at an accumulation boundary, then zeroes
        the grads; between boundaries only counts the micro-step."""
        if self.is_gradient_accumulation_boundary():
            self._take_model_step()
        self.micro_steps += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.partition is not None:
            self.partition.zero_grad()

    def _trainable_grads(self) -> list:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _take_model_step(self) -> None:
        delayed = self.delayed
        if delayed is not None:  # the last step's update, run during this window ([Note: delayed update])
            with phase("delayed_wait"):
                delayed.wait()
        if self.partition is not None:
            with phase("grad_reduce"):
                # this rank's shards: their grads averaged over the ranks; with overlap "exact"
                # most buckets already were, during backward ([Note: reduce during backward])
                if self.overlap is None or not self.overlap.finish_reduction():
                    self.partition.reduce_grads()
        if delayed is not None and delayed.apply() and self.partition is not None:
            # After the reduction: its barrier means every rank's backward is done with the
            # params that the shared-memory path is about to see change.
            with phase("param_gather"):
                self.partition.gather_params()
        grads = self._trainable_grads()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        norm = None
        if self.gradient_clipping > 0 or self.precision != "fp32":
            if self.partition is not None:
                if self.partition.any_grad:  # each rank norms its shards, the squares summed: one decision for all
                    norm = self.partition.grad_norm(global_grad_norm)
            elif grads:
                norm = global_grad_norm(grads)  # [Note: one pass over the grads]
        overflow = norm is not None and not bool(torch.isfinite(norm))
        overlapped = self.overlap is not None and self.overlap.is_open
        if overflow and overlapped:
            done = self.overlap.pages_done()
            lost = done > 0 and not self.overlap.can_take_back
            if self.partition is not None:  # one rank that cannot skip stops them all, alike
                lost_somewhere = not self.partition.every_rank(not lost)
            else:
                lost_somewhere = lost
            self.overlap.skip(f"non-finite gradients (norm {float(norm)}) at step {self.global_steps + 1}")
            if self.partition is not None:
                # Why: the owners have just written their early pages' params back; with shared
                # params no rank may run the next forward before every owner has.
                with phase("param_gather"):
                    self.partition.gather_params()
            if lost_somewhere:
                self.zero_grad()
                where = (f"had already updated {done} pages" if lost else
                         "had already updated pages on another rank")
                if not lost:  # every rank refuses alike, so they stay in step until the load
                    self.optimizer.mark_failed(f"step {self.global_steps + 1} could not be skipped on another rank")
                raise FloatingPointError(
                    f"non-finite gradients (norm {float(norm)}) at step {self.global_steps + 1}, found after backward "
                    f"{where} (paging.overlap), so the step cannot be skipped; the optimizer refuses to step "
                    "until a checkpoint is loaded")
        if overflow:
            # The optimizer never sees these grads: params and state stay exactly as they were.
            self.skipped_steps += 1
            self._last_grad_norm = float("inf")
            if self.loss_scaler is not None:
                after = self._next_scale_after_overflow()
                log.warning("fp16 overflow at step %d: step skipped, loss scale %g -> %g%s", self.global_steps + 1,
                            scale, after, " (at min_loss_scale: the grads overflow even unscaled?)"
                            if after == scale == self.loss_scaler.min_scale else "")
            else:
                log.warning("non-finite gradients (norm %s) at step %d: step skipped", float(norm),
                            self.global_steps + 1)
        else:
            factor = None  # multiplies the grads: 1 / loss scale, times the clipping coefficient
            if norm is not None and self.loss_scaler is not None:
                norm = norm / scale
                factor = torch.tensor(1.0 / scale)
            if norm is not None and self.gradient_clipping > 0:
                coef = clip_coefficient(norm, self.gradient_clipping)
                factor = coef if factor is None else factor * coef.to(factor.device)
            self._last_grad_norm = float(norm) if norm is not None else None
            grad_scale = 1.0 if factor is None else float(factor)
            launched = delayed is not None and delayed.delays(self.global_steps + 1)
            if overlapped:  # early pages kept if they guessed grad_scale right, else redone
                self.overlap.close(grad_scale)
            elif launched:  # runs during the next window; applied at its boundary
                delayed.launch(grad_scale)
            elif isinstance(self.optimizer, BlockwiseOptimizer):
                self.optimizer.step(grad_scale=grad_scale)
            else:
                if factor is not None:
                    by_device: dict = {}
                    for g in grads:
                        by_device.setdefault(g.device, []).append(g)
                    for device, group in by_device.items():
                        torch._foreach_mul_(group, factor.to(device))
                self.optimizer.step()
            if self.partition is not None and not launched:
                with phase("param_gather"):
                    self.partition.gather_params()  # every rank's updated slices to every rank
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        if self.overlap is not None:  # worth guessing the next step's scale? ([Note: overlap with backward])
            self.overlap.observe(not overflow and grad_scale == self._unclipped_grad_scale())
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
        self._last_step_skipped = overflow
        self.global_steps += 1
        self.global_samples += self.train_batch_size
        self.zero_grad()
        if self.global_steps % self.config.steps_per_print == 0:
            log.info("step %d: lr %s%s", self.global_steps, self.get_lr(),
                     f", loss scale {self.loss_scaler.scale:g}" if self.loss_scaler else "")

    def _unclipped_grad_scale(self) -> float:
        """The grad_scale of a step that neither clips nor is skipped: 1 / loss scale with fp16
        (as the factor below computes it, in float32), else 1."""
        if self.loss_scaler is None:
            return 1.0
        return float(torch.tensor(1.0 / self.loss_scaler.scale))

    def _next_scale_after_overflow(self) -> float:
        probe = LossScaler(dynamic=self.loss_scaler.dynamic, init_scale=self.loss_scaler.scale,
                           window=self.loss_scaler.window, hysteresis=self.loss_scaler.hysteresis,
                           consecutive_hysteresis=self.loss_scaler.consecutive_hysteresis,
                           min_scale=self.loss_scaler.min_scale)
        probe.load_state_dict(self.loss_scaler.state_dict())
        probe.update(True)
        return probe.scale

    # ---- what users read ----------------------------------------------------------------------
    def get_lr(self) -> list:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        """The global grad norm of the last optimizer step (unscaled; inf on an fp16 overflow;
        None when neither clipping nor fp16 needed it)."""
        return self._last_grad_norm

    def was_step_applied(self) -> bool:
        """False when the last optimizer step was skipped on an fp16 overflow."""
        return not self._last_step_skipped

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def memory_report(self) -> dict:
        from .memory import memory_report
        return memory_report(self)

    # ---- checkpoints (checkpointer.py) ----------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True):
        """Saves checkpoint `tag` (default ``global_step<N>``) under `save_dir` atomically and
        returns its directory; with several ranks every rank calls it alike
        ([Checkpointer.save]). A delayed step still pending is applied first."""
        self.apply_pending_step()
        return self.checkpointer.save(save_dir, tag, client_state, save_latest)

    def load_checkpoint(self, load_dir, tag=None):
        """Restores checkpoint `tag` (default: ``latest``), saved at any world size, and returns
        ``(path, client_state)``; a checkpoint that fails leaves the engine as it was
        ([Checkpointer.load]). A delayed step still pending is applied first (a load that
        fails then leaves the engine with it)."""
        self.apply_pending_step()
        return self.checkpointer.load(load_dir, tag)
