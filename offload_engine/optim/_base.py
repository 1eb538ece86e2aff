"""Shared machinery of the CPU optimizers: per-param state in fp32 or block-quantized form,
the step loop, logical_state, and a state_dict that survives format and block-size changes.

State of a param (``self.state[p]``):
  step                      float32 scalar tensor (as torch.optim)
  format                    "fp32" | "int8" | "int4"
  fp32:      exp_avg, exp_avg_sq                   float32, the param's shape
  int8/int4: block_size, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax
             (codes padded to whole blocks, 4-bit two per byte; one float32 absmax per block;
             each moment's codes and absmax are contiguous, so a pager can move them by block)
  master     float32, the param's shape: with ``master_weights=True``, for bf16/fp16 params
             ([Note: master weights] in _update.py)
For a param sharded across ranks (FSDP2's DTensors, FSDP1's flat params) "the param" is the
rank's local shard, and state_dict() shows the state sharded like the param ([Note: sharded
params] and [Note: sharded state dict] in sharded.py).
"""
from __future__ import annotations

import math
from itertools import chain

import torch
from torch.optim import Optimizer

from .. import kernels, reference
from ..paging.layout import StateFormat
from ..quant import FORMATS, codec
from . import sharded
from ._update import group_hyper, step_state_

STATE_FORMAT_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # signed map for exp_avg, unsigned for exp_avg_sq
_STRUCTURAL = ("state_format", "block_size", "min_8bit_size", "master_weights")  # kept by load_state_dict
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}


class BlockwiseOptimizer(Optimizer):
    """Adam/AdamW or Lion on CPU params (or CUDA params, in builds with CUDA kernels; the state
    then lives on the GPU) with fp32 or block-quantized moments (see module docstring; Lion
    keeps only exp_avg).

    Subclasses fix the constructor (bitsandbytes- or DeepSpeed-compatible) and pass
    ``state_format`` ("fp32", "int8", "int4"), ``block_size`` and ``min_8bit_size``.
    ``master_weights=True`` keeps an fp32 master copy of each bf16/fp16 param with its state.
    """

    _algorithm = "adam"  # or "lion"
    _moments = MOMENTS

    def __init__(self, params, *, lr, betas, eps, weight_decay, amsgrad, adamw_mode, bias_correction=True,
                 maximize=False, stochastic_rounding=False, state_format="fp32", block_size=None,
                 min_8bit_size=4096, master_weights=False):
        if amsgrad:
            raise ValueError(f"{type(self).__name__}: amsgrad=True is not supported (the fused kernels keep no "
                             "max_exp_avg_sq)")
        if block_size is None:
            block_size = FORMATS[state_format].default_block if state_format in FORMATS else 256
        # Every setting is validated per group, in add_param_group (the first group included).
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        amsgrad=False, adamw_mode=adamw_mode, maximize=maximize,
                        stochastic_rounding=stochastic_rounding, state_format=state_format, block_size=block_size,
                        min_8bit_size=min_8bit_size, master_weights=master_weights,
                        # torch.optim's key (False: no autograd through the step), present from the
                        # start, as torch's optimizers have it, so a state_dict round trip adds nothing.
                        differentiable=False)
        super().__init__(params, defaults)
        # The stochastic-rounding streams' base; drawn from torch's generator only when some
        # group rounds stochastically, so other optimizers' users see no shift in their RNG.
        needs_seed = any(g["stochastic_rounding"] for g in self.param_groups)
        self._seed_base = int(torch.randint(0, 2**62, (1,)).item()) if needs_seed else 0
        self._failed: str | None = None  # why params and state no longer match ([Note: failed steps] in paged.py)

    # ---- failed state -------------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        """Why this optimizer refuses to step (a step or a checkpoint load failed half-way, so
        params and state no longer match), or None. load_state_dict() clears it."""
        return self._failed

    def mark_failed(self, reason: str) -> None:
        """Records that params and state no longer match (the engine calls it when a step it
        drove, or a load on another rank, failed half-way); step() refuses until
        load_state_dict() restores a checkpoint."""
        self._failed = str(reason)

    def _check_not_failed(self) -> None:
        if self._failed:
            raise RuntimeError(f"{type(self).__name__}: {self._failed}; params and state no longer match, so the "
                               "optimizer refuses to step: restore a checkpoint with load_state_dict()")

    def add_param_group(self, param_group):
        """Validates the group completely before adding it: a rejected group is not kept."""
        settings = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_hyperparameters(settings["lr"], settings["betas"], settings["eps"], settings["weight_decay"])
        if settings["state_format"] not in ("fp32", *FORMATS):
            raise ValueError(f"state_format must be one of fp32, {', '.join(FORMATS)}; got {settings['state_format']!r}")
        codec.check_block(settings["block_size"])
        if not (isinstance(settings["min_8bit_size"], int) and settings["min_8bit_size"] >= 0):
            raise ValueError(f"min_8bit_size must be an int >= 0, got {settings['min_8bit_size']!r}")
        if not isinstance(settings["master_weights"], bool):
            raise ValueError(f"master_weights must be True or False, got {settings['master_weights']!r}")
        if settings["master_weights"] and settings["stochastic_rounding"]:
            raise ValueError("master_weights=True and stochastic_rounding=True are two answers to the same problem "
                             "(bf16/fp16 params losing small updates): choose one")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and p.dtype not in reference.PARAM_DTYPES:
                raise TypeError(f"{type(self).__name__}: params must be float32, bfloat16 or float16; got {p.dtype} "
                                f"for a param of shape {list(p.shape)}")
        if settings["state_format"] != "fp32" and settings["min_8bit_size"] > 0:
            unknown = sum(1 for p in params if isinstance(p, torch.Tensor) and sharded.full_numel(p) is None)
            if unknown:
                raise ValueError(self._unknown_size_message(unknown, settings["min_8bit_size"]))
        super().add_param_group({**param_group, "params": params})

    def _unknown_size_message(self, count: int, min_8bit_size: int) -> str:
        return (f"{type(self).__name__}: min_8bit_size={min_8bit_size} is decided on each param's full size, and "
                f"{count} params are FSDP1 shards (use_orig_params=True) whose full size is not recorded: call "
                "offload_engine.optim.record_full_sizes(model) before building the optimizer, or pass "
                "min_8bit_size=0")

    # ---- state --------------------------------------------------------------------------
    def _format_for(self, group, p) -> str:
        """The state format of `p`: the group's, but fp32 for params smaller than
        min_8bit_size, counted on the whole param (not a rank's shard of it), so every rank
        decides alike at any world size ([Note: sharded params] in sharded.py)."""
        fmt, minimum = group["state_format"], group["min_8bit_size"]
        if fmt == "fp32" or minimum == 0:
            return fmt
        numel = sharded.full_numel(p)
        if numel is None:
            raise ValueError(self._unknown_size_message(1, minimum))
        return "fp32" if numel < minimum else fmt

    def state_format_for(self, group, p) -> StateFormat:
        """How `p`'s state is laid out (format, moments, block size, master): what the pager
        and the admission check size it by."""
        fmt = self._format_for(group, p)
        return StateFormat(fmt, tuple(self._moments), 0 if fmt == "fp32" else group["block_size"],
                           master=self._wants_master(group, p))

    @staticmethod
    def _wants_master(group, p) -> bool:
        return bool(group.get("master_weights")) and p.dtype != torch.float32

    def _new_state(self, p, fmt: str, block: int, master: bool = False) -> dict:
        # The moments live on the param's device (the kernel runs there); step stays a CPU scalar.
        p = sharded.local(p)
        state = {"step": torch.tensor(0.0), "format": fmt}
        if master:
            state["master"] = p.detach().float().clone()
        if fmt == "fp32":
            for name in self._moments:
                state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return state
        f = FORMATS[fmt]
        state["block_size"] = block
        for name in self._moments:  # zeros quantize to code(0) with absmax 0: encode them properly
            codes, absmax = codec.quantize_blockwise(torch.zeros(p.numel(), device=p.device), f, _SIGNED[name], block)
            state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax
        return state

    @torch.no_grad()
    def logical_state(self, param) -> dict:
        """The state of `param` as fp32 tensors under torch.optim's names (``step``,
        ``exp_avg``, ``exp_avg_sq``; Lion: ``step``, ``exp_avg``), dequantized when stored in
        8 or 4 bits. Empty before the param's first step. For a sharded param, the state of
        this rank's local shard, in the local shard's shape."""
        state = self.state.get(param)
        if not state:
            return {}
        full = self._state_arrays(param, state)
        shard = sharded.local(param)
        out = {"step": state["step"].clone()}
        for name in self._moments:
            out[name] = _moment_fp32(full, name, shard.numel()).view(shard.shape).clone()
        if "master" in full:
            out["master"] = full["master"].view(shard.shape).clone()
        return out

    def _state_arrays(self, param, state: dict) -> dict:
        """`param`'s state with its arrays (moments, codes, absmax, master) present; the paged
        optimizers keep those in pages and read them in here."""
        return state

    # ---- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """One update of every param with a grad. `grad_scale` multiplies the grads inside the
        kernels (how the engine unscales fp16 losses and clips, without a pass over the grads)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_not_failed()
        self._check_step_inputs(grad_scale)
        adam_step_ = kernels.adam_step_impl()
        for group_index, group in enumerate(self.param_groups):
            hyper = group_hyper(group, grad_scale)
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p, self._format_for(group, p), group["block_size"],
                                                 self._wants_master(group, p)))
                step = int(state["step"]) + 1
                seed = kernels.as_int64(_stream_seed(self._seed_base, group_index, index, step))
                p_local = sharded.local(p)  # this rank's shard of a sharded param ([Note: sharded params])
                if p_local.numel():
                    # The kernels need contiguous tensors; a strided param is updated in a copy.
                    p_work = p_local if p_local.is_contiguous() else p_local.contiguous()
                    step_state_(self._algorithm, p_work, sharded.local(p.grad).contiguous(), state, state["format"],
                                state.get("block_size", 0), step, seed, hyper, adam_step_)
                    if p_work is not p_local:
                        p_local.copy_(p_work)
                state["step"].fill_(step)
        return loss

    def _check_step_inputs(self, grad_scale: float = 1.0) -> None:
        """Checked for every param before any moves, so a bad one leaves the step undone."""
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
            raise ValueError(f"{type(self).__name__}.step: grad_scale must be a finite number, got {grad_scale!r}")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__}: sparse gradients are not supported")
                if sharded.is_dtensor(p) != sharded.is_dtensor(p.grad):
                    kinds = ["DTensor" if sharded.is_dtensor(t) else "torch.Tensor" for t in (p, p.grad)]
                    raise TypeError(f"{type(self).__name__}: a param of shape {list(p.shape)} is a {kinds[0]} but its "
                                    f"grad is a {kinds[1]}; both must be sharded alike")
                if sharded.local(p.grad).shape != sharded.local(p).shape:
                    raise ValueError(f"{type(self).__name__}: a param's local shard has shape "
                                     f"{list(sharded.local(p).shape)}, its grad's {list(sharded.local(p.grad).shape)}")
                if p.device.type != "cpu" and not (p.device.type == "cuda" and kernels.cuda_ops_built()):
                    raise ValueError(f"{type(self).__name__} updates CPU tensors (and CUDA tensors when the ops are "
                                     f"built with CUDA); a param of shape {list(p.shape)} is on {p.device}")

    # ---- copies ---------------------------------------------------------------------------
    def __getstate__(self):
        """What copy.deepcopy and pickle carry: torch.optim's defaults, state and param groups,
        plus this class's own settings beside them, so that a copy steps as the original
        would. Hooks are not carried (as torch.optim)."""
        state = super().__getstate__()
        state.update(_seed_base=self._seed_base, _failed=self._failed)
        return state

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """As torch.optim's, plus the seed, format version, algorithm and the code maps of the
        quantized formats used. A sharded param's state is shown as fp32 tensors sharded like
        the param ([Note: sharded state dict] in sharded.py)."""
        sd = super().state_dict()
        # torch's dict shares each param's state dict with self.state: copy before adding arrays.
        # Entries a state-dict pre-hook put under other keys than params pass through as they are.
        sd["state"] = {key: dict(state) if isinstance(state, dict) else state for key, state in sd["state"].items()}
        params = [p for g in self.param_groups for p in g["params"]]
        self._add_state_arrays(sd["state"], params)
        for key, state in sd["state"].items():
            if isinstance(key, int) and isinstance(state, dict) and "format" in state \
                    and sharded.presents_logical(params[key]):
                sd["state"][key] = self._logical_view(state, params[key])
        sd["seed_base"] = self._seed_base
        sd["state_format_version"] = STATE_FORMAT_VERSION
        sd["algorithm"] = self._algorithm
        used = {s.get("format") for s in sd["state"].values() if isinstance(s, dict)} - {"fp32", None}
        sd["quant_maps"] = {fmt: {"signed": FORMATS[fmt].code_map(True), "unsigned": FORMATS[fmt].code_map(False)}
                            for fmt in sorted(used)}
        return sd

    def _add_state_arrays(self, states: dict, params: list) -> None:
        """Puts each param's state arrays into `states` ({position: state}) where they are not
        there already (the paged optimizers keep them in pages)."""

    def _logical_view(self, state: dict, p) -> dict:
        """A sharded param's state as the state_dict shows it: fp32 moments (decoded when
        quantized) and master, shaped and sharded like `p`."""
        shard = sharded.local(p)
        out = {k: v for k, v in state.items() if k not in _moment_keys()}
        out["format"] = "fp32"
        for name in self._moments:
            out[name] = sharded.present(p, _moment_fp32(state, name, shard.numel()).view(shard.shape))
        if "master" in state:
            out["master"] = sharded.present(p, state["master"].view(shard.shape))
        return out

    def load_state_dict(self, state_dict):
        """As torch.optim, plus: the moments keep their own dtypes (torch would cast them to
        the param's), a state saved in another format or block size is re-quantized into
        this optimizer's (decoded with the maps saved beside it), and a state of the wrong
        shape or an unknown format version is refused before anything changes."""
        version = state_dict.get("state_format_version", STATE_FORMAT_VERSION)
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state_format_version {version!r} is not "
                             f"supported (this version reads {STATE_FORMAT_VERSION})")
        algorithm = state_dict.get("algorithm", self._algorithm)
        if algorithm != self._algorithm:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state was saved by a {algorithm} optimizer; "
                             f"this one runs {self._algorithm}")
        saved_maps = state_dict.get("quant_maps", {})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        groups = chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        converted = {}
        for i, p, group in zip(saved_ids, params, groups):
            if i in state_dict["state"]:
                converted[p] = self._convert_saved_state(state_dict["state"][i], p, group, saved_maps)
        payload = {k: v for k, v in state_dict.items()
                   if k not in ("seed_base", "state_format_version", "quant_maps", "algorithm")}
        # How state is stored is this optimizer's choice, not the checkpoint's: keep it, and
        # fill settings a plain torch.optim checkpoint does not carry from the defaults.
        structural = [{k: g[k] for k in _STRUCTURAL} for g in self.param_groups]
        super().load_state_dict(payload)
        for group, keep in zip(self.param_groups, structural):
            group.update(keep)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for p, state in converted.items():
            self.state[p] = state
        self._seed_base = int(state_dict.get("seed_base", self._seed_base))
        self._failed = None

    def _saved_master(self, saved: dict, p, group, where: str):
        """The fp32 master of `p` for its loaded state: the saved one, or (a checkpoint saved
        without master weights) the param's current value; None when this optimizer keeps no
        master for `p` (a saved master is then dropped: the param holds its rounded value)."""
        if not self._wants_master(group, p):
            return None
        shard = sharded.local(p)
        value = saved.get("master")
        if value is None:
            return shard.detach().float().clone()
        if value.numel() != shard.numel():
            raise ValueError(f"{where}: state 'master' has {value.numel()} elements, the param {shard.numel()}")
        return value.detach().to(device=shard.device, dtype=torch.float32).reshape(shard.shape).clone()

    def _local_part(self, saved: dict, p, saved_maps, where: str) -> dict:
        """The saved state of the DTensor param `p` (DTensors sharded any way, or the whole
        param's tensors in any format) as this rank's shard of it, in fp32."""
        saved_fmt = saved.get("format", "fp32")
        if saved_fmt not in ("fp32", *FORMATS):
            raise ValueError(f"{where}: unknown state format {saved_fmt!r}")
        out = {k: v for k, v in saved.items() if k not in _moment_keys()}
        out["format"] = "fp32"
        for name in self._moments:
            if saved_fmt == "fp32" and name in saved:
                out[name] = sharded.localize(saved[name], p, f"{where}: state {name!r}")
            elif saved_fmt != "fp32" and f"{name}_codes" in saved:
                whole = _decode_saved(saved, name, saved_fmt, p.numel(), saved_maps, where)
                out[name] = sharded.localize(whole.view(p.shape), p, f"{where}: state {name!r}")
        if "master" in saved:
            out["master"] = sharded.localize(saved["master"], p, f"{where}: state 'master'")
        return out

    def _convert_saved_state(self, saved: dict, p, group, saved_maps) -> dict:
        """The saved state of `p` in the format this optimizer uses for it (fresh tensors)."""
        where = f"{type(self).__name__}.load_state_dict: param of shape {list(p.shape)}"
        if sharded.is_dtensor(p):
            saved = self._local_part(saved, p, saved_maps, where)
        shard = sharded.local(p)  # the tensor the state is for ([Note: sharded params] in sharded.py)
        saved_fmt = saved.get("format", "fp32")
        if saved_fmt not in ("fp32", *FORMATS):
            raise ValueError(f"{where}: unknown state format {saved_fmt!r}")
        n = shard.numel()
        target_fmt, target_block = self._format_for(group, p), group["block_size"]
        same = saved_fmt == target_fmt and (target_fmt == "fp32" or int(saved.get("block_size", 0)) == target_block)
        moments = {}
        present = [name for name in self._moments if name in saved or f"{name}_codes" in saved]
        if present and len(present) != len(self._moments):
            missing = sorted(set(self._moments) - set(present))
            raise ValueError(f"{where}: the saved state has no {', '.join(missing)} (saved by another algorithm?)")
        for name in present:
            if saved_fmt == "fp32":
                value = saved[name]
                if tuple(value.shape) != tuple(shard.shape):
                    raise ValueError(f"{where}: state {name!r} has shape {list(value.shape)}")
                moments[name] = value.detach().to(device=shard.device, dtype=torch.float32).reshape(-1)
            elif not same:  # decoded only when it must be re-quantized (large checkpoints)
                moments[name] = _decode_saved(saved, name, saved_fmt, n, saved_maps, where).to(shard.device)
            else:
                _decode_saved(saved, name, saved_fmt, n, saved_maps, where, check_only=True)
        master = self._saved_master(saved, p, group, where)
        state = {k: v for k, v in saved.items() if k not in _moment_keys()}
        state["step"] = torch.as_tensor(saved.get("step", 0.0), dtype=torch.float32).clone()
        state["format"] = target_fmt
        if master is not None:
            state["master"] = master
        if not present:  # a state saved before its first step
            fresh = self._new_state(p, target_fmt, target_block, master is not None)
            fresh["step"] = state["step"]
            if master is not None:
                fresh["master"] = master
            return fresh
        if target_fmt == "fp32":
            for name in self._moments:
                state[name] = moments[name].clone().view(shard.shape).contiguous()
            return state
        state["block_size"] = target_block
        for name in self._moments:
            if same:  # round-trip the raw codes exactly
                codes, absmax = saved[f"{name}_codes"].detach(), saved[f"{name}_absmax"].detach()
                state[f"{name}_codes"] = codes.to(shard.device, torch.uint8).clone().contiguous()
                state[f"{name}_absmax"] = absmax.to(shard.device, torch.float32).clone().contiguous()
            else:  # blocks that hold decoded codes (a sharded state_dict, same layout) get them back exactly
                codes, absmax = codec.encode_decoded(moments[name], FORMATS[target_fmt], _SIGNED[name], target_block)
                state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax
        return state


def _decode_saved(saved: dict, name: str, fmt_name: str, n: int, saved_maps, where: str, check_only=False):
    """The fp32 values of moment `name` of a saved quantized state of `n` elements, decoded
    with the code maps saved beside it; with `check_only`, only checks the sizes."""
    f, block = FORMATS[fmt_name], int(saved.get("block_size", 0))
    codec.check_block(block)
    codes, absmax = saved[f"{name}_codes"], saved[f"{name}_absmax"]
    if codes.numel() != f.code_bytes(n, block) or absmax.numel() != -(-n // block):
        raise ValueError(f"{where}: {name} holds {codes.numel()} code bytes and {absmax.numel()} absmax "
                         f"values; a {fmt_name} state of {n} elements in blocks of {block} needs "
                         f"{f.code_bytes(n, block)} and {-(-n // block)}")
    if check_only:
        return None
    code_map = saved_maps.get(fmt_name, {}).get("signed" if _SIGNED[name] else "unsigned")
    return codec.dequantize_blockwise(codes, absmax.float(), f, _SIGNED[name], block, n, code_map)


def _moment_keys():
    return {k for name in MOMENTS for k in (name, f"{name}_codes", f"{name}_absmax")} | {"block_size", "master"}


def _moment_fp32(state: dict, name: str, numel: int) -> torch.Tensor:
    if state["format"] == "fp32":
        return state[name].reshape(-1)
    f = FORMATS[state["format"]]
    return codec.dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], f, _SIGNED[name],
                                      state["block_size"], numel)


def _stream_seed(base: int, group_index: int, index: int, step: int) -> int:
    """A distinct stochastic-rounding stream per (param, step), reproducible from the base."""
    return (base ^ (step * 0x9E3779B97F4A7C15 + (group_index << 40) + index)) & ((1 << 64) - 1)


def _as_float(value, name: str = "lr") -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # torch.optim's rule, and its error type
            raise ValueError(f"Tensor {name} must be 1-element; got {name} of shape {list(value.shape)}")
        return float(value.item())
    return float(value)


def _check_hyperparameters(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    lr_value = _as_float(lr)
    if not (lr_value >= 0.0 and math.isfinite(lr_value)):
        raise ValueError(f"Invalid learning rate: lr={lr!r} (must be finite and >= 0)")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: eps={eps!r} (must be finite and >= 0)")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (need two values)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: betas[{i}]={beta!r} (must be in [0, 1))")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: weight_decay={weight_decay!r} (must be finite and >= 0)")
