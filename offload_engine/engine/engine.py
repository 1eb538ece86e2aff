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

import copy
import logging
import random

import torch

from ..optim._base import BlockwiseOptimizer
from . import checkpoint as ckpt
from .grad_norm import clip_coefficient, global_grad_norm
from .loss_scaler import LossScaler

log = logging.getLogger("offload_engine")

ENGINE_STATE_VERSION = 1
_MODEL, _OPTIMIZER, _ENGINE = "model.pt", "optimizer.pt", "engine.pt"


class OffloadEngine:
    """Returned by offload_engine.initialize(); see the module docstring."""

    def __init__(self, module: torch.nn.Module, config, optimizer, lr_scheduler=None, partition=None):
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
        self._param_names = {p: name for name, p in module.named_parameters()}

    # ---- the training loop ------------------------------------------------------------------
    def __call__(self, *inputs, **kwargs):
        return self.forward(*inputs, **kwargs)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        self.module.eval()
        return self

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
        scaled.backward(retain_graph=retain_graph)
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
        if self.partition is not None:
            self.partition.reduce_grads()  # every rank: the averaged full grads; shards: their slices
        grads = self._trainable_grads()
        norm_grads = self.partition.full_grads() if self.partition is not None else grads
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        norm = None
        if norm_grads and (self.gradient_clipping > 0 or self.precision != "fp32"):
            norm = global_grad_norm(norm_grads)  # [Note: one pass over the grads]
            if self.partition is not None:
                norm = self.partition.agree_on(norm)  # one skip/clip decision for all ranks
        overflow = norm is not None and not bool(torch.isfinite(norm))
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
            if isinstance(self.optimizer, BlockwiseOptimizer):
                self.optimizer.step(grad_scale=1.0 if factor is None else float(factor))
            else:
                if factor is not None:
                    by_device: dict = {}
                    for g in grads:
                        by_device.setdefault(g.device, []).append(g)
                    for device, group in by_device.items():
                        torch._foreach_mul_(group, factor.to(device))
                self.optimizer.step()
            if self.partition is not None:
                self.partition.gather_params()  # every rank's updated slices to every rank
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
        self._last_step_skipped = overflow
        self.global_steps += 1
        self.global_samples += self.train_batch_size
        self.zero_grad()
        if self.global_steps % self.config.steps_per_print == 0:
            log.info("step %d: lr %s%s", self.global_steps, self.get_lr(),
                     f", loss scale {self.loss_scaler.scale:g}" if self.loss_scaler else "")

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

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True):
        """Writes model, optimizer (logical per-param state keyed by param name), scheduler, loss
        scaler, counters and RNG states as checkpoint `tag` (default ``global_step<N>``) under
        `save_dir`, atomically ([Note: atomic checkpoints]). Returns its directory."""
        self._refuse_partitioned("save_checkpoint")
        failed = getattr(self.optimizer, "_failed", None)
        if failed:
            raise RuntimeError(f"save_checkpoint: the optimizer is in a failed state ({failed}): its params and state "
                               "do not match, so nothing is saved; load the last good checkpoint")
        if self.micro_steps % self.gradient_accumulation_steps:
            log.warning("save_checkpoint in the middle of an accumulation window (micro-step %d of %d): the "
                        "accumulated grads are not saved", self.micro_steps % self.gradient_accumulation_steps,
                        self.gradient_accumulation_steps)
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        engine_state = {
            "version": ENGINE_STATE_VERSION,
            "counters": {"global_steps": self.global_steps, "micro_steps": self.micro_steps,
                         "skipped_steps": self.skipped_steps, "global_samples": self.global_samples},
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "rng": _rng_states(),
            "client_state": client_state if client_state is not None else {},
        }
        parts = {_MODEL: self.module.state_dict(), _OPTIMIZER: self._optimizer_state_by_name(),
                 _ENGINE: engine_state}
        return ckpt.write_checkpoint(save_dir, tag, parts, save_latest=save_latest)

    def load_checkpoint(self, load_dir, tag=None):
        """Restores checkpoint `tag` (default: ``latest``) and returns ``(path, client_state)``.
        Every file is checked, and the model and optimizer parts validated, before anything
        changes; a checkpoint that fails leaves the engine as it was."""
        self._refuse_partitioned("load_checkpoint")
        path = ckpt.resolve_tag(load_dir, tag)
        parts = ckpt.read_checkpoint(path, (_MODEL, _OPTIMIZER, _ENGINE), pickled=(_ENGINE,))
        model_sd, opt_sd, engine_state = parts[_MODEL], parts[_OPTIMIZER], parts[_ENGINE]
        _check_engine_state(engine_state, path / _ENGINE, need_scheduler=self.lr_scheduler is not None,
                            need_scaler=self.loss_scaler is not None)
        _check_model_state(self.module, model_sd, path / _MODEL)
        opt_sd = self._optimizer_state_from_names(opt_sd, path / _OPTIMIZER)
        # Should any part still be refused below, the model and the optimizer's group settings
        # (lr, betas, ...) go back to these; the copy is kept in host memory, not on the GPU.
        groups_before = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        model_before = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

        def undo():
            self.module.load_state_dict(model_before)
            for group, saved in zip(self.optimizer.param_groups, groups_before):
                params = group["params"]
                group.clear()
                group.update(saved, params=params)

        try:
            # The scheduler and loss scaler load into copies first, so a bad state is refused
            # before the optimizer's (shallow: the scheduler's copy shares the optimizer).
            if self.lr_scheduler is not None:
                copy.copy(self.lr_scheduler).load_state_dict(engine_state["lr_scheduler"])
            if self.loss_scaler is not None:
                copy.deepcopy(self.loss_scaler).load_state_dict(engine_state["loss_scaler"])
        except Exception as err:
            undo()
            raise ckpt.CheckpointError(f"{path / _ENGINE}: {type(err).__name__}: {err}") from err
        # The model first: a param's fp32 master starts from the loaded param when the
        # checkpoint has none.
        self.module.load_state_dict(model_sd)
        try:
            self.optimizer.load_state_dict(opt_sd)
        except Exception as err:
            undo()
            raise ckpt.CheckpointError(f"{path / _OPTIMIZER}: loading it into the optimizer failed: "
                                       f"{type(err).__name__}: {err}") from err
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(engine_state["loss_scaler"])
        counters = engine_state["counters"]
        self.global_steps, self.micro_steps = int(counters["global_steps"]), int(counters["micro_steps"])
        self.skipped_steps, self.global_samples = int(counters["skipped_steps"]), int(counters["global_samples"])
        _set_rng_states(engine_state["rng"])
        self.zero_grad()
        return path, engine_state["client_state"]

    def _refuse_partitioned(self, what: str) -> None:
        if self.partition is not None:
            raise RuntimeError(f"{what}: the optimizer state is partitioned over {self.partition.world} data-parallel "
                               "ranks, and checkpoints of partitioned state (saved at one world size, loaded at "
                               "any) are not written yet; nothing was saved or loaded")

    def _ordered_params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_state_by_name(self) -> dict:
        """The optimizer's state_dict with its param indices replaced by param names, so a
        checkpoint reloads whatever order (or, later, partition) the params come in."""
        sd = self.optimizer.state_dict()
        names = [self._param_names[p] for p in self._ordered_params()]
        return {**sd, "state": {names[i]: s for i, s in sd["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}

    def _optimizer_state_from_names(self, saved: dict, file) -> dict:
        if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
            raise ckpt.CheckpointError(f"{file}: not an optimizer state (no 'state' or 'param_groups')")
        groups = self.optimizer.param_groups
        if not isinstance(saved["state"], dict) or not isinstance(saved["param_groups"], list) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]):
            raise ckpt.CheckpointError(f"{file}: malformed optimizer state (state must map param names to states, "
                                       "param_groups be a list of groups with 'params' lists)")
        if len(saved["param_groups"]) != len(groups):
            raise ckpt.CheckpointError(f"{file}: {len(saved['param_groups'])} param groups, the optimizer has "
                                       f"{len(groups)}")
        index = {}
        for gi, (saved_group, group) in enumerate(zip(saved["param_groups"], groups)):
            want = [self._param_names[p] for p in group["params"]]
            if sorted(saved_group["params"]) != sorted(want):
                missing = sorted(set(want) - set(saved_group["params"]))
                extra = sorted(set(saved_group["params"]) - set(want))
                raise ckpt.CheckpointError(f"{file}: param group {gi} does not match the model's trainable params "
                                           f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
        for i, p in enumerate(self._ordered_params()):
            index[self._param_names[p]] = i
        unknown = sorted(set(saved["state"]) - set(index))
        if unknown:
            raise ckpt.CheckpointError(f"{file}: state for params the optimizer does not hold: {unknown[:5]}")
        return {**saved, "state": {index[name]: s for name, s in saved["state"].items() if name in index},
                "param_groups": [{**sg, "params": [index[self._param_names[p]] for p in g["params"]]}
                                 for sg, g in zip(saved["param_groups"], groups)]}


def _check_model_state(module, saved, file) -> None:
    """Refuses a model state whose keys or shapes differ, before anything is copied (torch's
    load_state_dict would copy the matching tensors before reporting)."""
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{file}: not a model state dict")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{file}: keys differ from the model's (missing: {missing[:5]}, unexpected: "
                                   f"{unexpected[:5]})")
    for key, value in own.items():
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != value.shape:
            got = list(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            raise ckpt.CheckpointError(f"{file}: {key} has shape {got}, the model's is {list(value.shape)}")


def _check_engine_state(state, file, *, need_scheduler: bool, need_scaler: bool) -> None:
    if not isinstance(state, dict):
        raise ckpt.CheckpointError(f"{file}: not an engine state")
    if state.get("version") != ENGINE_STATE_VERSION:
        raise ckpt.CheckpointError(f"{file}: engine state version {state.get('version')!r} is not supported (this "
                                   f"version reads {ENGINE_STATE_VERSION})")
    for key in ("counters", "rng", "client_state", "lr_scheduler", "loss_scaler"):
        if key not in state:
            raise ckpt.CheckpointError(f"{file}: missing key {key!r}")
    for key in ("global_steps", "micro_steps", "skipped_steps", "global_samples"):
        if not isinstance(state["counters"], dict) or not isinstance(state["counters"].get(key), int):
            raise ckpt.CheckpointError(f"{file}: missing or bad counter {key!r}")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or \
            rng["torch"].dtype != torch.uint8 or not isinstance(rng.get("python"), tuple):
        raise ckpt.CheckpointError(f"{file}: missing or bad RNG states (need 'torch' as a uint8 tensor and "
                                   "'python' as random.getstate())")
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) != torch.cuda.device_count():
        raise ckpt.CheckpointError(f"{file}: CUDA RNG states for {len(rng['cuda'])} devices, this process has "
                                   f"{torch.cuda.device_count()}")
    if need_scheduler and state["lr_scheduler"] is None:
        raise ckpt.CheckpointError(f"{file}: the engine has an lr scheduler but the checkpoint holds no scheduler "
                                   "state")
    if need_scaler and not isinstance(state["loss_scaler"], dict):
        raise ckpt.CheckpointError(f"{file}: fp16 training needs the loss scaler's state; the checkpoint has none")


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        try:
            import numpy as np
            np.random.set_state(states["numpy"])
        except ImportError:
            pass
