"""What an engine saves and loads, and how several ranks agree on it.

checkpoint.py owns the files on disk (the atomic directory, the manifest, the hashes) and
reshard.py the optimizer files' layout across world sizes; this module decides what goes into
a checkpoint (model, optimizer state keyed by param name, scheduler, loss scaler, counters,
RNG states), checks everything before a load changes anything, and makes the ranks of a
data-parallel job save and load as one. The engine (engine.py) keeps the step and hands its
save_checkpoint/load_checkpoint calls here.
"""
from __future__ import annotations

import copy
import logging
import os
import random
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import reshard

log = logging.getLogger("offload_engine")

ENGINE_STATE_VERSION = 1
_MODEL, _OPTIMIZER, _ENGINE = "model.pt", "optimizer.pt", "engine.pt"


class Checkpointer:
    """Saves and loads one engine's checkpoints. It reads the engine's public parts (module,
    optimizer, partition, lr_scheduler, loss_scaler, the step counters) and, on load, sets them."""

    def __init__(self, engine):
        self.engine = engine
        self.param_names = {p: name for name, p in engine.module.named_parameters()}
        self.failed_load = None  # a half-failed load, for an optimizer without mark_failed()

    # The engine's parts, read through it each time (nothing here caches them).
    @property
    def module(self):
        return self.engine.module

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def partition(self):
        return self.engine.partition

    @property
    def lr_scheduler(self):
        return self.engine.lr_scheduler

    @property
    def loss_scaler(self):
        return self.engine.loss_scaler

    def save(self, save_dir, tag=None, client_state=None, save_latest: bool = True):
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
        tag = f"global_step{self.engine.global_steps}" if tag is None else str(tag)
        rngs = self._agree_on_save(save_dir, tag, save_latest)
        if self.engine.micro_steps % self.engine.gradient_accumulation_steps:
            log.warning("save_checkpoint in the middle of an accumulation window (micro-step %d of %d): the "
                        "accumulated grads are not saved", self.engine.micro_steps % self.engine.gradient_accumulation_steps,
                        self.engine.gradient_accumulation_steps)
        engine_state = {
            "version": ENGINE_STATE_VERSION,
            "counters": {"global_steps": self.engine.global_steps, "micro_steps": self.engine.micro_steps,
                         "skipped_steps": self.engine.skipped_steps, "global_samples": self.engine.global_samples},
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "rng": rngs[0],
            "client_state": client_state if client_state is not None else {},
        }
        extra = {reshard.LAYOUT_KEY: self._optimizer_layout()}
        part = self.partition
        if part is None:
            parts = {_MODEL: self.module.state_dict(), _OPTIMIZER: self.optimizer_state_by_name(),
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
            files[name] = ckpt.write_part(tmp, name, self.optimizer_state_by_name())
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

    def mark_failed(self, reason: str) -> None:
        """Params and state no longer match: an optimizer of ours refuses to step (mark_failed);
        for any other, the engine refuses to save until a checkpoint is loaded."""
        if hasattr(self.optimizer, "mark_failed"):
            self.optimizer.mark_failed(reason)
        else:
            self.failed_load = reason

    def _agree_on_save(self, save_dir, tag: str, save_latest: bool) -> list:
        """Refuses (on every rank alike) a save from a failed optimizer or with arguments that
        differ between ranks; returns every rank's RNG states."""
        failed = getattr(self.optimizer, "failed", None) or self.failed_load
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

    def load(self, load_dir, tag=None):
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
                self.mark_failed(f"load_checkpoint of {path} failed on another rank after this one loaded it "
                                  f"({err}); load a checkpoint again")
            raise
        self.failed_load = None  # (an optimizer of ours clears its own failed state in load_state_dict)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(engine_state["loss_scaler"])
        counters = engine_state["counters"]
        self.engine.global_steps, self.engine.micro_steps = int(counters["global_steps"]), int(counters["micro_steps"])
        self.engine.skipped_steps, self.engine.global_samples = int(counters["skipped_steps"]), int(counters["global_samples"])
        by_rank = engine_state.get("rng_by_rank")
        rank = part.rank if part is not None else 0
        _set_rng_states(by_rank[rank % len(by_rank)] if by_rank else engine_state["rng"])
        self.engine.zero_grad()
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
        numels = {self.param_names[p]: p.numel() for group in full for p in group}
        layout = reshard.read_layout(manifest, path / ckpt.MANIFEST, numels)
        slices = self.slices()
        opt_files = reshard.files_to_read(layout, slices)
        files = ckpt.read_checkpoint(path, opt_files, manifest=manifest)
        ranges = reshard.check_files(path, layout, files, [[self.param_names[p] for p in g] for g in full], numels)
        states, top, settings = reshard.assemble(path, files, ranges, slices)
        position = {id(p): i for i, p in enumerate(self.ordered_params())}
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

    def ordered_params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _full_groups(self) -> list:
        """The model params of each optimizer group (whole params, also when partitioned)."""
        if self.partition is not None:
            return self.partition.groups
        return [list(g["params"]) for g in self.optimizer.param_groups]

    def slices(self) -> list:
        """Per optimizer position (in _ordered_params order), the param and elements it holds."""
        out = []
        range_of = self.partition.range_of if self.partition is not None else {}
        for q in self.ordered_params():
            p, a, b = range_of.get(q, (q, 0, q.numel()))
            out.append(reshard.Slice(self.param_names[p], a, b, p.numel(), tuple(q.shape)))
        return out

    def _optimizer_layout(self) -> dict:
        """The manifest's record of which optimizer file holds which elements of which param."""
        names, part = self.param_names, self.partition
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

    def optimizer_state_by_name(self) -> dict:
        """The optimizer's state_dict with its param indices replaced by param names (and, for a
        partitioned rank, the element ranges of its shards), so a checkpoint reloads whatever
        order, partition or world size the params come in."""
        return reshard.named_state(self.optimizer.state_dict(), self.slices())


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
