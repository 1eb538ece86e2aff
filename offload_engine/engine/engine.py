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
import os
import random
from pathlib import Path

import torch

from ..optim._base import BlockwiseOptimizer
from . import checkpoint as ckpt
from . import reshard
from ..paging.scheduler import phase
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
        self._overlap = None  # a BackwardOverlap with paging.overlap_backward (initialize sets it)
        self._failed_load = None  # a half-failed load_checkpoint, for an optimizer without mark_failed()

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
        overlap = self._overlap if self._overlap is not None and self.is_gradient_accumulation_boundary() else None
        if overlap is not None:
            overlap.arm()  # pages update as their grads become final ([Note: overlap with backward])
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
        if self.partition is not None:
            with phase("grad_reduce"):
                self.partition.reduce_grads()  # this rank's shards: their grads averaged over the ranks
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
        overlapped = self._overlap is not None and self._overlap.is_open
        if overflow and overlapped:
            done = self._overlap.pages_done()
            self._overlap.abort(f"non-finite gradients (norm {float(norm)}) at step {self.global_steps + 1}")
            if done:
                self.zero_grad()
                raise FloatingPointError(
                    f"non-finite gradients (norm {float(norm)}) at step {self.global_steps + 1}, found after backward "
                    f"had already updated {done} pages (paging.overlap_backward), so the step cannot be skipped; "
                    "the optimizer refuses to step until a checkpoint is loaded")
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
            if overlapped:  # factor is None: initialize allows overlap without clipping or fp16 only
                self._overlap.close()
            elif isinstance(self.optimizer, BlockwiseOptimizer):
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
                with phase("param_gather"):
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
        """Writes model, optimizer (per-param state keyed by param name, with the element ranges
        each rank holds), scheduler, loss scaler, counters and RNG states as checkpoint `tag`
        (default ``global_step<N>``) under `save_dir`, atomically ([Note: atomic checkpoints]).
        Returns its directory.

        [Note: saving from several ranks] Every data-parallel rank calls this with the same tag
        and save_dir (a directory all ranks share); differing tags are refused on every rank.
        Rank 0 creates the temporary directory; each rank writes its own optimizer file into
        it ([Note: world-size-free checkpoints] in reshard.py), rank 0 also the model (the
        params are the same on every rank) and the engine state (with every rank's RNG
        states). Only when every rank has written and fsynced its file does rank 0 write the
        manifest, rename the directory to its tag and move ``latest``; a failure on any rank
        removes the temporary directory on every rank's behalf and raises on all of them, so
        ``latest`` keeps naming the last complete checkpoint."""
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        rngs = self._agree_on_save(save_dir, tag, save_latest)
        if self.micro_steps % self.gradient_accumulation_steps:
            log.warning("save_checkpoint in the middle of an accumulation window (micro-step %d of %d): the "
                        "accumulated grads are not saved", self.micro_steps % self.gradient_accumulation_steps,
                        self.gradient_accumulation_steps)
        engine_state = {
            "version": ENGINE_STATE_VERSION,
            "counters": {"global_steps": self.global_steps, "micro_steps": self.micro_steps,
                         "skipped_steps": self.skipped_steps, "global_samples": self.global_samples},
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "rng": rngs[0],
            "client_state": client_state if client_state is not None else {},
        }
        extra = {reshard.LAYOUT_KEY: self._optimizer_layout()}
        part = self.partition
        if part is None:
            parts = {_MODEL: self.module.state_dict(), _OPTIMIZER: self._optimizer_state_by_name(),
                     _ENGINE: engine_state}
            return ckpt.write_checkpoint(save_dir, tag, parts, save_latest=save_latest, extra=extra)
        engine_state["rng_by_rank"] = rngs
        what = f"save_checkpoint({tag!r})"
        tmp = Path(save_dir) / part.agree(lambda: ckpt.begin_save(save_dir, tag).name if part.rank == 0 else None,
                                          what, ckpt.CheckpointError, share=True)[0]

        def write() -> dict:
            if not tmp.is_dir():
                raise ckpt.CheckpointError(f"{tmp}: rank {part.rank} does not see the directory rank 0 created: "
                                           "save_dir must be one directory that every rank shares")
            files = {}
            if part.rank == 0:
                files[_MODEL] = ckpt.write_part(tmp, _MODEL, self.module.state_dict())
                files[_ENGINE] = ckpt.write_part(tmp, _ENGINE, engine_state)
            name = reshard.file_name(part.rank, part.world)
            files[name] = ckpt.write_part(tmp, name, self._optimizer_state_by_name())
            return files

        try:
            written = part.agree(write, what, ckpt.CheckpointError, share=True)
        except BaseException:
            if part.rank == 0:
                ckpt.abort_save(tmp)
            raise
        files = {name: entry for entries in written for name, entry in entries.items()}
        final = part.agree(lambda: str(ckpt.commit_save(save_dir, tag, tmp, files, save_latest=save_latest,
                                                        extra=extra)) if part.rank == 0 else None,
                           what, ckpt.CheckpointError, share=True)[0]
        return Path(final)

    def _mark_failed(self, reason: str) -> None:
        """Params and state no longer match: an optimizer of ours refuses to step (mark_failed);
        for any other, the engine refuses to save until a checkpoint is loaded."""
        if hasattr(self.optimizer, "mark_failed"):
            self.optimizer.mark_failed(reason)
        else:
            self._failed_load = reason

    def _agree_on_save(self, save_dir, tag: str, save_latest: bool) -> list:
        """Refuses (on every rank alike) a save from a failed optimizer or with arguments that
        differ between ranks; returns every rank's RNG states."""
        failed = getattr(self.optimizer, "failed", None) or self._failed_load
        mine = {"tag": tag, "save_dir": os.path.abspath(save_dir), "save_latest": bool(save_latest),
                "failed": str(failed) if failed else None, "rng": _rng_states()}
        infos = [mine] if self.partition is None else self.partition.all_gather_object(mine)
        for key in ("tag", "save_dir", "save_latest"):
            values = [info[key] for info in infos]
            if len(set(values)) > 1:
                raise ValueError(f"save_checkpoint: every data-parallel rank must pass the same {key}; got "
                                 + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values)) + "; nothing was saved")
        ckpt.check_tag(tag)
        for r, info in enumerate(infos):
            if info["failed"]:
                who = "the optimizer" if self.partition is None else f"the optimizer of rank {r}"
                raise RuntimeError(f"save_checkpoint: {who} is in a failed state ({info['failed']}): its params and "
                                   "state do not match, so nothing is saved; load the last good checkpoint")
        return [info["rng"] for info in infos]

    def load_checkpoint(self, load_dir, tag=None):
        """Restores checkpoint `tag` (default: ``latest``) and returns ``(path, client_state)``.
        Every file is checked, and the model and optimizer parts validated, before anything
        changes; a checkpoint that fails leaves the engine as it was. A checkpoint saved at any
        world size loads at any other ([Note: world-size-free checkpoints] in reshard.py); with
        several ranks, every rank must pass the same tag, and a failure on one raises on all."""
        part = self.partition
        if part is None:
            path = ckpt.resolve_tag(load_dir, tag)
        else:
            tags = part.all_gather_object(tag)
            if len({repr(t) for t in tags}) > 1:
                raise ValueError("load_checkpoint: every data-parallel rank must load the same tag; got "
                                 + ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(tags)) + "; nothing was loaded")
            # Rank 0 reads `latest`, so all ranks load one checkpoint even if a save moves it meanwhile.
            path = Path(part.agree(lambda: str(ckpt.resolve_tag(load_dir, tag)) if part.rank == 0 else None,
                                   "load_checkpoint", ckpt.CheckpointError, share=True)[0])
        model_sd, opt_sd, engine_state, opt_files = self._everywhere(lambda: self._read_checkpoint(path),
                                                                     f"load_checkpoint({path})")
        # Should loading into the optimizer still fail, the model and the optimizer's group
        # settings (lr, betas, ...) go back to these; the copy is kept in host memory, not on the GPU.
        groups_before = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        model_before = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        where = path / opt_files[0] if len(opt_files) == 1 else f"{path} ({', '.join(opt_files)})"
        loaded = False

        def take():
            nonlocal loaded
            # The model first: a param's fp32 master starts from the loaded param when the
            # checkpoint has none.
            self.module.load_state_dict(model_sd)
            try:
                self.optimizer.load_state_dict(opt_sd)
            except Exception as err:
                self.module.load_state_dict(model_before)
                _restore_group_settings(self.optimizer, groups_before)
                raise ckpt.CheckpointError(f"{where}: loading it into the optimizer failed: "
                                           f"{type(err).__name__}: {err}") from err
            loaded = True

        try:
            self._everywhere(take, f"load_checkpoint({path})")
        except Exception as err:
            if loaded:  # another rank failed after this one took the checkpoint: the ranks now differ
                self._mark_failed(f"load_checkpoint of {path} failed on another rank after this one loaded it "
                                  f"({err}); load a checkpoint again")
            raise
        self._failed_load = None  # (an optimizer of ours clears its own failed state in load_state_dict)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(engine_state["loss_scaler"])
        counters = engine_state["counters"]
        self.global_steps, self.micro_steps = int(counters["global_steps"]), int(counters["micro_steps"])
        self.skipped_steps, self.global_samples = int(counters["skipped_steps"]), int(counters["global_samples"])
        by_rank = engine_state.get("rng_by_rank")
        rank = part.rank if part is not None else 0
        _set_rng_states(by_rank[rank % len(by_rank)] if by_rank else engine_state["rng"])
        self.zero_grad()
        return path, engine_state["client_state"]

    def _everywhere(self, fn, what: str):
        """fn() here; with several ranks, a failure on any raises on all ([Partition.agree])."""
        if self.partition is None:
            return fn()
        return self.partition.agree(fn, what, ckpt.CheckpointError)

    def _read_checkpoint(self, path):
        """Reads and checks everything a load needs, changing nothing: (model state, optimizer
        state dict for this rank's optimizer, engine state, the optimizer files read)."""
        manifest = ckpt.read_manifest(path)
        parts = ckpt.read_checkpoint(path, (_MODEL, _ENGINE), pickled=(_ENGINE,), manifest=manifest)
        model_sd, engine_state = parts[_MODEL], parts[_ENGINE]
        _check_engine_state(engine_state, path / _ENGINE, need_scheduler=self.lr_scheduler is not None,
                            need_scaler=self.loss_scaler is not None)
        _check_model_state(self.module, model_sd, path / _MODEL)
        # Only the optimizer files holding elements of this rank's params are read.
        full = self._full_groups()
        numels = {self._param_names[p]: p.numel() for group in full for p in group}
        layout = reshard.read_layout(manifest, path / ckpt.MANIFEST, numels)
        slices = self._slices()
        opt_files = reshard.files_to_read(layout, slices)
        files = ckpt.read_checkpoint(path, opt_files, manifest=manifest)
        ranges = reshard.check_files(path, layout, files, [[self._param_names[p] for p in g] for g in full], numels)
        states, top, settings = reshard.assemble(path, files, ranges, slices)
        position = {id(p): i for i, p in enumerate(self._ordered_params())}
        opt_sd = {**top, "state": {i: s for i, s in enumerate(states) if s is not None},
                  "param_groups": [{**saved, "params": [position[id(p)] for p in g["params"]]}
                                   for saved, g in zip(settings, self.optimizer.param_groups)]}
        # The scheduler and loss scaler load into copies first, so a bad state is refused
        # before the optimizer's. The scheduler's copy is shallow: it shares the optimizer, whose
        # group settings (lr) it may set, so those are put back after.
        settings_before = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            if self.lr_scheduler is not None:
                copy.copy(self.lr_scheduler).load_state_dict(engine_state["lr_scheduler"])
            if self.loss_scaler is not None:
                copy.deepcopy(self.loss_scaler).load_state_dict(engine_state["loss_scaler"])
        except Exception as err:
            raise ckpt.CheckpointError(f"{path / _ENGINE}: {type(err).__name__}: {err}") from err
        finally:
            _restore_group_settings(self.optimizer, settings_before)
        return model_sd, opt_sd, engine_state, opt_files

    def _ordered_params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _full_groups(self) -> list:
        """The model params of each optimizer group (whole params, also when partitioned)."""
        if self.partition is not None:
            return self.partition.groups
        return [list(g["params"]) for g in self.optimizer.param_groups]

    def _slices(self) -> list:
        """Per optimizer position (in _ordered_params order), the param and elements it holds."""
        out = []
        range_of = self.partition.range_of if self.partition is not None else {}
        for q in self._ordered_params():
            p, a, b = range_of.get(q, (q, 0, q.numel()))
            out.append(reshard.Slice(self._param_names[p], a, b, p.numel(), tuple(q.shape)))
        return out

    def _optimizer_layout(self) -> dict:
        """The manifest's record of which optimizer file holds which elements of which param."""
        names, part = self._param_names, self.partition
        full = self._full_groups()
        groups = [[names[p] for p in g] for g in full]
        params = [p for g in full for p in g]
        if part is None:
            files = {reshard.SINGLE_FILE: [(names[p], 0, p.numel()) for p in params]}
            return reshard.layout(1, [0, sum(p.numel() for p in params)], [(names[p], p.numel()) for p in params],
                                  groups, files)
        files = {reshard.file_name(r, part.world): [(names[p], a, b) for p, a, b in part.spans(r)]
                 for r in range(part.world)}
        return reshard.layout(part.world, part.points, [(names[p], p.numel()) for p in part.params], groups, files)

    def _optimizer_state_by_name(self) -> dict:
        """The optimizer's state_dict with its param indices replaced by param names (and, for a
        partitioned rank, the element ranges of its shards), so a checkpoint reloads whatever
        order, partition or world size the params come in."""
        return reshard.named_state(self.optimizer.state_dict(), self._slices())


def _restore_group_settings(optimizer, settings: list) -> None:
    for group, saved in zip(optimizer.param_groups, settings):
        params = group["params"]
        group.clear()
        group.update(saved, params=params)


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
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and (not isinstance(by_rank, list) or not by_rank):
        raise ckpt.CheckpointError(f"{file}: 'rng_by_rank' must be a non-empty list of RNG states")
    for which, rng in [("rng", state["rng"])] + [(f"rng_by_rank[{r}]", s) for r, s in enumerate(by_rank or [])]:
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or \
                rng["torch"].dtype != torch.uint8 or not isinstance(rng.get("python"), tuple):
            raise ckpt.CheckpointError(f"{file}: missing or bad RNG states in {which!r} (need 'torch' as a uint8 "
                                       "tensor and 'python' as random.getstate())")
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) != torch.cuda.device_count():
            raise ckpt.CheckpointError(f"{file}: CUDA RNG states for {len(rng['cuda'])} devices in {which!r}, this "
                                       f"process has {torch.cuda.device_count()}")
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
