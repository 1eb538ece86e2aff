"""One param's (or one page segment's) update: picks the kernel for the algorithm and the
state format. Shared by the unpaged step loop (_base.py) and the paged CPU executor, so both
call the very same kernels with the very same arguments."""
from __future__ import annotations

import torch

from .. import kernels


def group_hyper(group: dict, grad_scale: float = 1.0) -> dict:
    """A param group's settings as the kernels take them (normalised once per group: the
    per-param loop is the optimizer's hot path). `grad_scale` multiplies every gradient inside
    the kernel (the engine's loss-scale unscaling and clipping, without a pass over the grads)."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    return dict(lr=float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr), beta1=float(beta1),
                beta2=float(beta2), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                adamw_mode=bool(group["adamw_mode"]), bias_correction=bool(group["bias_correction"]),
                maximize=bool(group["maximize"]), grad_scale=float(grad_scale),
                stochastic_rounding=bool(group["stochastic_rounding"]))


def step_state_(algorithm: str, param: torch.Tensor, grad: torch.Tensor, state: dict, fmt: str, block: int,
                step: int, seed: int, hyper: dict, adam_step_=None, index_offset: int = 0) -> None:
    """Updates `param` and its moments in `state` (fp32: ``exp_avg``/``exp_avg_sq``; 8/4-bit:
    ``<moment>_codes``/``<moment>_absmax``) in place with one kernel call.

    `adam_step_` is the fp32 Adam implementation to call (kernels.adam_step_impl(), fetched
    once per step by the caller). `index_offset` is the index of `param`'s first element in the
    whole param (a page segment's start): it keys the stochastic-rounding stream, so a segment
    rounds as the whole param would.

    [Note: master weights] When `state` holds ``master`` (an fp32 copy of a bf16/fp16 param,
    same element count), the kernel updates the master and the param is then set to it,
    rounded to nearest: small updates accumulate in fp32 instead of vanishing in bf16."""
    master = state.get("master")
    if master is not None:
        param, model_param = master, param
    if algorithm == "lion":
        lion = dict(lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], weight_decay=hyper["weight_decay"],
                    maximize=hyper["maximize"], grad_scale=hyper["grad_scale"],
                    stochastic_rounding=hyper["stochastic_rounding"], seed=seed, index_offset=index_offset)
        if fmt == "fp32":
            kernels.lion_step_(param, grad, state["exp_avg"], **lion)
        else:
            kernels.lion_step_blockwise_(param, grad, state["exp_avg_codes"], state["exp_avg_absmax"], fmt=fmt,
                                         block=block, **lion)
    elif fmt == "fp32":
        (adam_step_ or kernels.adam_step_impl())(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                                                 seed=seed, index_offset=index_offset, **hyper)
    else:
        kernels.adam_step_blockwise_(param, grad, state["exp_avg_codes"], state["exp_avg_absmax"],
                                     state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], fmt=fmt, block=block,
                                     step=step, seed=seed, index_offset=index_offset, **hyper)
    if master is not None:
        model_param.copy_(master)
