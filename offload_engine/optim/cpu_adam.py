"""CPUAdam: Adam/AdamW on CPU tensors with the fused SIMD kernel.

Constructor compatible with DeepSpeedCPUAdam. The moments are always fp32, also for
bf16/fp16 params (the update is computed in fp32 and rounded once into the param).
"""
from __future__ import annotations

import math
from itertools import chain

import torch
from torch.optim import Optimizer

from .. import kernels, reference

_STATE_FP32_KEYS = ("exp_avg", "exp_avg_sq")


class CPUAdam(Optimizer):
    """Adam (``adamw_mode=False``: L2 weight decay) or AdamW (default) for CPU params.

    Args (as DeepSpeedCPUAdam): params, lr, bias_correction, betas, eps, weight_decay,
    amsgrad (must be False), adamw_mode. Keyword-only extras: ``maximize``;
    ``stochastic_rounding`` for bf16/fp16 params (seeded from torch's default generator at
    construction, so ``torch.manual_seed`` makes runs repeatable).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, *, maximize=False, stochastic_rounding=False):
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if amsgrad:
            raise ValueError("CPUAdam: amsgrad=True is not supported (the fused kernel keeps no max_exp_avg_sq)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        amsgrad=False, adamw_mode=adamw_mode, maximize=maximize,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self._seed_base = int(torch.randint(0, 2**62, (1,)).item())

    def add_param_group(self, param_group):
        group_defaults = {k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in param_group}
        if group_defaults:
            _check_hyperparameters(**group_defaults)
        super().add_param_group(param_group)
        # Checked here rather than in step(), where a bad param would fail after others moved.
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in reference.PARAM_DTYPES:
                raise TypeError(f"CPUAdam: params must be float32, bfloat16 or float16; got {p.dtype} "
                                f"for a param of shape {list(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adam_step_ = kernels.adam_step_impl()
        for group_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            # Normalised once per group: the per-param loop below is the optimizer's hot path.
            hyper = dict(lr=_as_float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]), adamw_mode=bool(group["adamw_mode"]),
                         bias_correction=bool(group["bias_correction"]), maximize=bool(group["maximize"]),
                         grad_scale=1.0, stochastic_rounding=bool(group["stochastic_rounding"]))
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("CPUAdam: sparse gradients are not supported")
                if p.device.type != "cpu":
                    raise ValueError(f"CPUAdam updates CPU tensors; a param of shape {list(p.shape)} is on {p.device}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
                step = int(state["step"]) + 1
                # The kernel needs contiguous tensors; a strided param is updated in a copy.
                p_work = p if p.is_contiguous() else p.contiguous()
                adam_step_(p_work, p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], step=step,
                           seed=kernels.as_int64(_stream_seed(self._seed_base, group_index, index, step)), **hyper)
                if p_work is not p:
                    p.copy_(p_work)
                state["step"].fill_(step)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["seed_base"] = self._seed_base
        return sd

    def load_state_dict(self, state_dict):
        """As torch.optim, except that the moments stay fp32 for bf16/fp16 params (torch
        would cast them to the param's dtype) and a moment of the wrong shape is refused."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_param = {p: state_dict["state"][i] for i, p in zip(saved_ids, params) if i in state_dict["state"]}
        for p, saved in by_param.items():
            for key in _STATE_FP32_KEYS:
                if key in saved and tuple(saved[key].shape) != tuple(p.shape):
                    raise ValueError(f"CPUAdam.load_state_dict: state {key!r} has shape {list(saved[key].shape)} "
                                     f"but its param has shape {list(p.shape)}")
        payload = {k: v for k, v in state_dict.items() if k != "seed_base"}
        super().load_state_dict(payload)
        for p, saved in by_param.items():
            for key in _STATE_FP32_KEYS:
                if key in saved:
                    self.state[p][key] = saved[key].detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
        self._seed_base = int(state_dict.get("seed_base", self._seed_base))


def _stream_seed(base: int, group_index: int, index: int, step: int) -> int:
    """A distinct stochastic-rounding stream per (param, step), reproducible from the base."""
    return (base ^ (step * 0x9E3779B97F4A7C15 + (group_index << 40) + index)) & ((1 << 64) - 1)


def _as_float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


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
