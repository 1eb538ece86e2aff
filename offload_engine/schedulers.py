"""DeepSpeed's warmup learning-rate schedules: WarmupLR, WarmupDecayLR, WarmupCosineLR.

Same constructor names, defaults and numbers as ``deepspeed.runtime.lr_schedules``
(checked float-for-float against DeepSpeed 0.19.8 in tests/test_schedulers.py).
Notation: ``k`` is ``last_batch_iteration`` (-1 after construction, +1 per ``step()``),
``W = max(2, warmup_num_steps)`` (DeepSpeed silently turns a warmup of 1 into 2, so
that ``ln W`` is never 0; a warmup of 0, which DeepSpeed 0.19.6 and later refuse and
older releases took, is 2 as well), ``T = total_num_steps``, and the warmup fraction is
``f(k) = ln(k + 1) / ln(W)`` for ``warmup_type="log"`` or ``f(k) = k / W`` for
``"linear"`` while ``0 <= k < W``.

WarmupLR: ``lr_i = min_i + (max_i - min_i) * f(k)`` during warmup, then ``max_i``
for good. ``warmup_min_lr`` / ``warmup_max_lr`` are a number or one value per param
group; ``warmup_max_lr=None`` (the default) takes each group's lr at construction.

WarmupDecayLR: WarmupLR's warmup (but ``warmup_max_lr`` defaults to 0.001), then a
linear decay ``lr_i = min_i + (max_i - min_i) * max(0, (T - k) / max(1, T - W))``
for ``k >= W``: ``max_i`` at ``k = W``, ``warmup_min_lr`` (0 by default) from
``k = T`` on (from ``k = W`` when ``T = W``: no decay window, a drop to the floor).

WarmupCosineLR: ratios of each group's lr at construction, ``lr_i = base_i * r(k)``.
Warmup ``r = warmup_min_ratio + (1 - warmup_min_ratio) * f(k)``; then
``p = min(1, (k - W + 1) / max(1, T - W))`` and
``r = cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2``, which reaches
``cos_min_ratio`` at ``k = T - 1`` (one step before WarmupDecayLR reaches its floor;
``k = W`` when ``T = W``) and stays there. The cosine already moves at ``k = W``, so a
"linear" warmup never lands on ratio 1 (its last warmup value is ``(W - 1) / W``).

Behaviour shared with DeepSpeed: construction with ``last_batch_iteration=-1`` writes
the pre-start lrs into the optimizer (WarmupLR/WarmupDecayLR: ``warmup_min_lr``;
WarmupCosineLR: 0.0, not ``warmup_min_ratio * lr``) and leaves ``k = -1``; the first
``step()`` gives ``k = 0``, whose lr equals the pre-start one except for
WarmupCosineLR. With the usual ``optimizer.step(); scheduler.step()`` loop the first
optimizer step therefore runs at the pre-start lr. Construction with any other
``last_batch_iteration`` (a resume) leaves the optimizer's lrs alone.

Where this module differs from DeepSpeed (never in the numbers): bad settings raise
``ValueError`` where DeepSpeed warns and carries on (an unknown ``warmup_type``, which
DeepSpeed replaces with "log"; ``total_num_steps < warmup_num_steps``) or accepts
silently (negative or non-finite lrs, ratios outside [0, 1]); ``load_state_dict``
also writes the lrs for the loaded iteration into the optimizer, so a resume is exact
even when the optimizer's own state was not restored; no log line on every
construction. The state dict is DeepSpeed's, ``{"last_batch_iteration": k}``, so
checkpoints move both ways.

The classes are plain classes with torch's scheduler interface (``step``, ``get_lr``,
``get_last_lr``, ``state_dict``, ``load_state_dict``) rather than subclasses of
``torch.optim.lr_scheduler.LRScheduler``: its constructor calls ``step()`` once, which
would move construction from DeepSpeed's ``k = -1`` to ``k = 0``, and it adds
``initial_lr`` to the param groups and wraps ``optimizer.step``.
"""
from __future__ import annotations

import abc
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SCHEDULERS", "WARMUP_TYPES", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "build_scheduler"]

WARMUP_TYPES = ("log", "linear")


def _resolve_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer itself, or the one a wrapper holds in ``.optimizer``
    (as DeepSpeed accepts)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper with one in .optimizer), "
                    f"got {type(optimizer).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_real(value: Any, name: str) -> float:
    """A finite real number as a float (a one-element tensor is accepted)."""
    one_float_tensor = (isinstance(value, torch.Tensor) and value.numel() == 1
                        and value.is_floating_point())
    real_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (one_float_tensor or real_number):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def _check_lr(value: Any, name: str) -> Any:
    """Validates one learning rate (>= 0, finite); returns it unchanged, except that a
    tensor is cloned so the optimizer's later in-place writes cannot alias it."""
    if _as_real(value, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _per_group(optimizer: Optimizer, value: Any, name: str) -> list:
    """A number for every group, or a list/tuple with one entry per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but the optimizer has {n} param "
                             f"groups; give one number or one per group")
        return [_check_lr(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [_check_lr(value, name)] * n


def _check_ratio(value: Any, name: str) -> float:
    x = _as_real(value, name)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return x


def _check_iteration(value: Any, name: str) -> int:
    if not _is_int(value) or value < -1:
        raise ValueError(f"{name} must be an integer >= -1, got {value!r}")
    return int(value)


def _write_lrs(optimizer: Optimizer, lrs: Sequence) -> list:
    """Sets each group's lr (in place for tensor lrs, like DeepSpeed) and returns them."""
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr.squeeze() if isinstance(lr, torch.Tensor) else lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


def _check_warmup(warmup_num_steps: Any, warmup_type: Any) -> None:
    # 0 is the Hugging Face Trainer's default warmup; DeepSpeed before 0.19.6 took it (as 2 steps).
    if not _is_int(warmup_num_steps) or warmup_num_steps < 0:
        raise ValueError(f"warmup_num_steps must be an integer >= 0, got {warmup_num_steps!r}")
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {', '.join(map(repr, WARMUP_TYPES))}, "
                         f"got {warmup_type!r}")


def _check_total(total_num_steps: Any, warmup_num_steps: int) -> None:
    if not _is_int(total_num_steps) or total_num_steps < 1:
        raise ValueError(f"total_num_steps must be an integer >= 1, got {total_num_steps!r}")
    if total_num_steps < warmup_num_steps:
        raise ValueError(f"total_num_steps ({total_num_steps}) must be >= warmup_num_steps "
                         f"({warmup_num_steps})")


class _WarmupBase(abc.ABC):
    """Shared state and stepping. Subclasses define ``get_lr()`` for the current
    ``last_batch_iteration``."""

    def __init__(self, optimizer: Any, warmup_num_steps: int, warmup_type: str,
                 last_batch_iteration: int) -> None:
        _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = _resolve_optimizer(optimizer)
        self.last_batch_iteration = _check_iteration(last_batch_iteration, "last_batch_iteration")
        self.warmup_type = warmup_type
        # The effective warmup, as DeepSpeed stores it: 1 becomes 2 (ln 1 = 0).
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self._last_lr: list | None = None

    def _warmup_fraction(self) -> float:
        """f(k) for 0 <= k < W, computed with DeepSpeed's operations and order."""
        k = self.last_batch_iteration
        if self.warmup_type == "log":
            return self.inverse_log_warm_up * math.log(k + 1)
        return k / self.warmup_num_steps

    @abc.abstractmethod
    def get_lr(self) -> list:
        """The lrs (one per param group) at the current iteration; each schedule defines it."""

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advances to the next iteration (or jumps to ``last_batch_iteration``) and
        writes its lrs into the optimizer. Call once per optimizer step, after it."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = _check_iteration(last_batch_iteration, "last_batch_iteration")
        self._last_lr = _write_lrs(self.optimizer, self.get_lr())

    def get_last_lr(self) -> list:
        """The lrs this scheduler last wrote into the optimizer, one per group."""
        if self._last_lr is None:
            raise RuntimeError("no lr set yet: the scheduler was constructed with "
                               "last_batch_iteration != -1; call step() first")
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """DeepSpeed's state dict: everything else comes from the constructor."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores the iteration and writes its lrs into the optimizer, so the next
        optimizer step and the next ``step()`` match the run that was saved."""
        if "last_batch_iteration" not in state_dict:
            raise ValueError("state_dict has no 'last_batch_iteration'")
        self.last_batch_iteration = _check_iteration(state_dict["last_batch_iteration"],
                                                     "state_dict['last_batch_iteration']")
        self._last_lr = _write_lrs(self.optimizer, self.get_lr())


class WarmupLR(_WarmupBase):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``
    steps ("log" or "linear"), then hold ``warmup_max_lr``. See the module docstring.

    ``warmup_max_lr=None`` uses each param group's lr at construction."""

    def __init__(self, optimizer: Any, warmup_min_lr: Any = 0.0, warmup_max_lr: Any = None,
                 warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(self.optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs, strict=True)]
        if self.last_batch_iteration == -1:
            self._last_lr = _write_lrs(self.optimizer, self.get_lr())

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        return 1.0

    def get_lr(self) -> list:
        """The lrs for the current ``last_batch_iteration`` (``warmup_min_lr`` before
        the first step)."""
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR's warmup, then a linear decay from ``warmup_max_lr`` (at step
    ``warmup_num_steps``) to ``warmup_min_lr`` (at step ``total_num_steps``), held
    after. See the module docstring."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: Any = 0.0,
                 warmup_max_lr: Any = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        _check_warmup(warmup_num_steps, warmup_type)  # before the comparison below
        _check_total(total_num_steps, warmup_num_steps)
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        decay_steps = float(max(1.0, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration) / decay_steps)


class WarmupCosineLR(_WarmupBase):
    """Scale each group's lr at construction: warm up from ``warmup_min_ratio`` to 1
    over ``warmup_num_steps`` steps, then follow a half cosine down to
    ``cos_min_ratio`` at step ``total_num_steps - 1``, held after. See the module
    docstring."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)
        _check_total(total_num_steps, warmup_num_steps)
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = _check_ratio(warmup_min_ratio, "warmup_min_ratio")
        self.cos_min_ratio = _check_ratio(cos_min_ratio, "cos_min_ratio")
        self.org_lrs = [_check_lr(group["lr"], f"optimizer.param_groups[{i}]['lr']")
                        for i, group in enumerate(self.optimizer.param_groups)]
        if self.last_batch_iteration == -1:
            self._last_lr = _write_lrs(self.optimizer, self.get_lr())

    def get_lr_ratio(self) -> float:
        """r(k): the factor applied to every group's lr at construction."""
        k = self.last_batch_iteration
        if k < 0:
            return 0.0
        if k < self.warmup_num_steps:
            return self.warmup_min_ratio + self._warmup_fraction() * (1.0 - self.warmup_min_ratio)
        decay_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, (k - self.warmup_num_steps + 1) / decay_steps)
        half_cos = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * half_cos)

    def get_lr(self) -> list:
        """The lrs for the current ``last_batch_iteration`` (0.0 before the first
        step)."""
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [base * ratio for base in self.org_lrs]


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR,
              "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(optimizer: Any, type_name: str, params: Mapping | None = None) -> _WarmupBase:
    """A scheduler from a DeepSpeed-style ``{"type": ..., "params": {...}}`` config:
    ``type_name`` is one of :data:`SCHEDULERS`, ``params`` the constructor's keyword
    arguments (all but ``optimizer``)."""
    cls = SCHEDULERS.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ValueError(f"unknown scheduler type {type_name!r}; valid types: "
                         f"{', '.join(SCHEDULERS)}")
    params = dict(params or {})
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "optimizer")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{type_name} params has unknown keys {unknown}; accepted: "
                         f"{', '.join(accepted)}")
    if "total_num_steps" in accepted and "total_num_steps" not in params:
        raise ValueError(f"{type_name} params needs total_num_steps")
    return cls(optimizer, **params)
