"""Settings that involve several keys: the batch-size rule, the paging section merged with
DeepSpeed's offload_optimizer, and the optimizer class a config resolves to.

The ``check_*`` and ``*_problems`` functions return ``(path, message)`` problems instead of
raising, so that load_config reports every problem at once; the views EngineConfig exposes
(paging_settings, optimizer_spec) raise ConfigError. docs/config.md describes the rules.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..paging.footprint import prefetch_depth_for_buffer_count
from .errors import ConfigError
from .optimizer_models import OPTIMIZER_KINDS

__all__ = [
    "PAGED_CLASSES",
    "OptimizerSpec",
    "PagingSettings",
    "accepted_keywords",
    "check_optimizer",
    "check_paging",
    "merge_paging",
    "precision_problems",
    "resolve_batch",
    "resolve_optimizer",
    "resolved_class_name",
    "scheduler_problems",
    "target_class",
]

Problem = tuple[str, str]
_P, _O = "paging", "zero_optimization.offload_optimizer"
_T, _M, _G = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


# ---- batch sizes ------------------------------------------------------------------------------
def resolve_batch(train: int | None, micro: int | None, accum: int | None,
                  world_size: int) -> tuple[tuple[int, int, int], list[Problem]]:
    """DeepSpeed's rule train = micro * accum * world_size: any two given derive the third (which
    must come out whole), all three must agree, train alone gives accum 1, micro alone gives
    accum 1; none (or accum alone) take micro = 1. Returns ((train, micro, accum), problems)."""
    ws = world_size
    if train is not None and micro is not None and accum is not None:
        if train != micro * accum * ws:
            return (train, micro, accum), [(_T, (f"{_T} ({train}) must equal {_M} ({micro}) * {_G} ({accum}) * "
                                                 f"world_size ({ws}) = {micro * accum * ws}; give any two of the "
                                                 "three and the third is derived"))]
        return (train, micro, accum), []
    if train is not None and micro is not None:
        if train % (micro * ws):
            return (train, micro, 1), [(_T, (f"{_T} ({train}) is not a multiple of {_M} ({micro}) * world_size "
                                             f"({ws}) = {micro * ws}, so {_G} would not be a whole number"))]
        return (train, micro, train // (micro * ws)), []
    if train is not None and accum is not None:
        if train % (accum * ws):
            return (train, 1, accum), [(_T, (f"{_T} ({train}) is not a multiple of {_G} ({accum}) * world_size "
                                             f"({ws}) = {accum * ws}, so {_M} would not be a whole number"))]
        return (train, train // (accum * ws), accum), []
    if train is not None:
        if train % ws:
            return (train, 1, 1), [(_T, (f"{_T} ({train}) is not a multiple of world_size ({ws}), so {_M} "
                                         "would not be a whole number"))]
        return (train, train // ws, 1), []
    micro = 1 if micro is None else micro
    accum = 1 if accum is None else accum
    return (micro * accum * ws, micro, accum), []


def precision_problems(cfg) -> list[Problem]:
    if cfg.fp16.enabled and cfg.bf16.enabled is True:
        return [("fp16.enabled", "fp16.enabled and bf16.enabled are both true; enable at most one")]
    if cfg.fp16.enabled and cfg.bf16.enabled == "auto":
        return [("bf16.enabled", '"auto" with fp16.enabled true: "auto" chooses between bf16 and fp32; set '
                                 "bf16.enabled to false to train in fp16")]
    return []


def scheduler_problems(cfg) -> list[Problem]:
    """A decay that would end before the warmup does (DeepSpeed warns; the schedules here refuse)."""
    params = cfg.scheduler.params if cfg.scheduler is not None else None
    total = getattr(params, "total_num_steps", None)
    if total is not None and total < params.warmup_num_steps:
        return [("scheduler.params.total_num_steps", (f"total_num_steps ({total}) must be >= warmup_num_steps "
                                                      f"({params.warmup_num_steps}; 1000 unless given)"))]
    return []


# ---- paging -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PagingSettings:
    """The paging section with zero_optimization.offload_optimizer merged in."""

    store: str | None          # "cpu" | "nvme" | "managed" | None: no page store configured
    nvme_path: str | None      # set exactly when store == "nvme"
    state_dtype: str | None    # "fp32" | "int8" | "int4" | None: the optimizer type's
    page_size_mb: float
    prefetch_depth: int
    io_threads: int
    executor: str                 # "auto" | "cpu" | "cuda" | "hybrid"
    gpu_fraction: float | None    # the hybrid's split; None: the planner's
    rebalance: bool
    master_weights: bool
    overlap: str                  # "off" | "exact" | "delayed"
    speculation_budget_bytes: int
    delayed_warmup_steps: int
    pin_memory: bool


def _given(section, name: str) -> bool:
    """Whether the user wrote ``name`` in ``section`` (null counts as not written)."""
    return section is not None and name in section.model_fields_set and getattr(section, name) is not None


def _conflict(p_key: str, p_value, o_key: str, o_value, note: str = "") -> Problem:
    return (f"{_P}.{p_key}", (f"{_P}.{p_key} = {p_value!r} and {_O}.{o_key} = {o_value!r}{note} disagree; set one "
                              "of them, or make them agree"))


def check_paging(cfg) -> tuple[PagingSettings | None, list[Problem]]:
    """The paging section merged with offload_optimizer (None if they conflict), and the problems."""
    p = cfg.paging
    o = cfg.zero_optimization.offload_optimizer
    offloading = o is not None and o.device != "none"
    problems: list[Problem] = []

    store = p.store
    if _given(p, "store") and _given(o, "device") and p.store != (o.device if offloading else None):
        problems.append(_conflict("store", p.store, "device", o.device))
    elif store is None and offloading:
        store = o.device

    nvme_path = p.nvme_path
    if _given(p, "nvme_path") and _given(o, "nvme_path") and p.nvme_path != o.nvme_path:
        problems.append(_conflict("nvme_path", p.nvme_path, "nvme_path", o.nvme_path))
    elif nvme_path is None and offloading:
        nvme_path = o.nvme_path
    if store == "nvme" and nvme_path is None:
        where = f"{_P}.nvme_path" if _given(p, "store") else f"{_O}.nvme_path"
        problems.append((where, "required with store 'nvme': the directory for the state file"))
    if store != "nvme" and _given(p, "nvme_path"):
        problems.append((f"{_P}.nvme_path", (f"only used with store 'nvme' (the store is {store!r}); remove it or "
                                             f"set {_P}.store to 'nvme'")))

    prefetch_depth = p.prefetch_depth
    if offloading and _given(o, "buffer_count"):
        mapped = prefetch_depth_for_buffer_count(o.buffer_count)  # [Note: slot rule] in paging/footprint.py
        if _given(p, "prefetch_depth") and p.prefetch_depth != mapped:
            problems.append(_conflict("prefetch_depth", p.prefetch_depth, "buffer_count", o.buffer_count,
                                      f" (= prefetch_depth {mapped} + {o.buffer_count - mapped})"))
        prefetch_depth = mapped

    pin_memory = p.pin_memory
    if offloading and _given(o, "pin_memory"):
        if _given(p, "pin_memory") and p.pin_memory != o.pin_memory:
            problems.append(_conflict("pin_memory", p.pin_memory, "pin_memory", o.pin_memory))
        pin_memory = o.pin_memory

    # DeepSpeed's offload runs the update on the CPU; paging.executor, when given, decides instead.
    executor = p.executor if _given(p, "executor") or not offloading else "cpu"
    if executor == "hybrid" and (store or "cpu") != "cpu":
        problems.append((f"{_P}.executor", (f"'hybrid' updates some pages in host memory in place, beside the GPU's; "
                                            f"it needs {_P}.store 'cpu' (the store is {store!r})")))
    for key in ("gpu_fraction", "rebalance"):
        if _given(p, key) and executor not in ("hybrid", "auto"):
            problems.append((f"{_P}.{key}", (f"applies to {_P}.executor 'hybrid' (or 'auto', when it picks the "
                                             f"hybrid); the executor is {executor!r}")))

    # fp32 master weights and stochastic rounding are two remedies for the same bf16 rounding
    # loss; asking for stochastic_rounding turns the default master_weights off.
    master_weights = p.master_weights
    rounding = cfg.optimizer is not None and cfg.optimizer.params.stochastic_rounding
    if rounding and master_weights:
        if _given(p, "master_weights"):
            problems.append((f"{_P}.master_weights", (f"{_P}.master_weights = true and "
                                                      "optimizer.params.stochastic_rounding = true are alternatives "
                                                      "(fp32 master copies or stochastically rounded bf16 params); "
                                                      "choose one")))
        master_weights = False
    overlap = p.overlap
    if p.overlap_backward:
        if _given(p, "overlap") and p.overlap != "exact":
            problems.append((f"{_P}.overlap_backward", (f"{_P}.overlap_backward = true (overlap 'exact') and {_P}.overlap = "
                                                        f"{p.overlap!r} disagree; keep {_P}.overlap only")))
        overlap = "exact"
    if problems:
        return None, problems
    return PagingSettings(store=store, nvme_path=nvme_path if store == "nvme" else None, state_dtype=p.state_dtype,
                          page_size_mb=p.page_size_mb, prefetch_depth=prefetch_depth, io_threads=p.io_threads,
                          executor=executor, gpu_fraction=p.gpu_fraction, rebalance=p.rebalance,
                          master_weights=master_weights, overlap=overlap,
                          speculation_budget_bytes=int(p.speculation_budget_mb * 2 ** 20),
                          delayed_warmup_steps=p.delayed_warmup_steps, pin_memory=pin_memory), []


def merge_paging(cfg) -> PagingSettings:
    """check_paging's settings; a conflict raises ConfigError."""
    settings, problems = check_paging(cfg)
    if problems:
        raise ConfigError(problems)
    return settings


# ---- optimizer --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """``getattr(offload_engine.optim, spec.name)(params, **spec.kwargs)`` builds the optimizer."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, params):
        from .. import optim
        return getattr(optim, self.name)(params, **self.kwargs)


PAGED_CLASSES = ("PagedAdam", "PagedAdamW", "PagedAdam8bit", "PagedAdamW8bit", "PagedLion", "PagedLion8bit")
_CLASSES = {  # (algorithm, adamw, state_dtype, paged) -> class name
    ("adam", False, "fp32", False): "CPUAdam", ("adam", True, "fp32", False): "CPUAdam",
    ("adam", False, "int8", False): "Adam8bit", ("adam", True, "int8", False): "AdamW8bit",
    ("adam", False, "int4", False): "Adam4bit", ("adam", True, "int4", False): "AdamW4bit",
    ("adam", False, "fp32", True): "PagedAdam", ("adam", True, "fp32", True): "PagedAdamW",
    ("adam", False, "int8", True): "PagedAdam8bit", ("adam", True, "int8", True): "PagedAdamW8bit",
    ("lion", True, "fp32", False): "Lion", ("lion", True, "int8", False): "Lion8bit",
    ("lion", True, "fp32", True): "PagedLion", ("lion", True, "int8", True): "PagedLion8bit",
}


def target_class(algorithm: str, adamw: bool, state_dtype: str, paged: bool) -> str | None:
    """The offload_engine.optim class for an algorithm, state format and placement, or None."""
    return _CLASSES.get((algorithm, adamw if algorithm == "adam" else True, state_dtype, paged))


def _store_origin(cfg) -> str:
    return f"{_P}.store" if cfg.paging.store is not None else f"{_O}.device"


def check_optimizer(cfg, settings: PagingSettings) -> tuple[tuple[str, dict] | None, list[Problem]]:
    """(class name, constructor keywords) for cfg.optimizer, or None, and the problems. Keywords
    that depend on the installed constructor (master_weights, pin_memory) are added by
    resolve_optimizer, which may import torch; this does not."""
    kind = OPTIMIZER_KINDS[cfg.optimizer.type]
    params = cfg.optimizer.params
    given = params.model_fields_set
    problems: list[Problem] = []

    adamw = kind.adamw
    if kind.name == "AdamW" and params.adam_w_mode is False:
        problems.append(("optimizer.params.adam_w_mode", ("false contradicts optimizer.type 'AdamW' (decoupled weight "
                                                          "decay); for Adam with L2 regularization use type 'Adam' "
                                                          "with adam_w_mode false")))
    elif kind.name == "CPUAdam":
        adamw = params.adamw_mode
        if params.adam_w_mode is not None:
            if "adamw_mode" in given and params.adamw_mode != params.adam_w_mode:
                problems.append(("optimizer.params.adam_w_mode", (f"adam_w_mode ({params.adam_w_mode}) and adamw_mode "
                                                                  f"({params.adamw_mode}) are the same switch and "
                                                                  "disagree; give one")))
            adamw = params.adam_w_mode
    elif adamw is None:
        adamw = params.adam_w_mode

    paged = kind.paged or settings.store is not None
    state_dtype = kind.state_dtype or settings.state_dtype or "fp32"
    if kind.state_dtype and settings.state_dtype and settings.state_dtype != kind.state_dtype:
        better = target_class(kind.algorithm, adamw, settings.state_dtype, paged)
        hint = f"use type {better!r} for {settings.state_dtype} state, or " if better else ""
        problems.append((f"{_P}.state_dtype", (f"{_P}.state_dtype = {settings.state_dtype!r} contradicts optimizer.type "
                                               f"= {kind.name!r} ({kind.state_dtype} state); {hint}remove "
                                               f"{_P}.state_dtype")))
        return None, problems
    name = target_class(kind.algorithm, adamw, state_dtype, paged)
    if name is None:
        path = "optimizer.type" if kind.state_dtype else f"{_P}.state_dtype"
        if kind.algorithm == "lion":
            why = f"no {state_dtype} Lion class exists (Lion keeps fp32 or int8 state)"
        else:
            why = (f"no paged class keeps {state_dtype} state (a page store is set by {_store_origin(cfg)}); the "
                   f"paged classes are {', '.join(PAGED_CLASSES)}: use state_dtype 'int8', or no page store")
        problems.append((path, why))
        return None, problems

    kwargs: dict[str, Any] = {"lr": params.lr, "betas": tuple(params.betas)}
    if kind.algorithm == "adam":
        kwargs["eps"] = params.eps
    kwargs["weight_decay"] = params.weight_decay
    if name == "CPUAdam":
        kwargs["bias_correction"] = params.bias_correction
        kwargs["adamw_mode"] = adamw
        for key in ("block_size", "min_8bit_size"):
            if key in given:
                problems.append((f"optimizer.params.{key}", ("applies only to 8-bit/4-bit or paged state; this "
                                                             "config resolves to CPUAdam (fp32 state, no page store)")))
    else:
        if getattr(params, "bias_correction", True) is False:
            problems.append(("optimizer.params.bias_correction", (f"false is supported only by CPUAdam (fp32 state, "
                                                                  f"no page store); this config resolves to {name}, "
                                                                  "which always corrects")))
        kwargs.update({key: getattr(params, key) for key in ("block_size", "min_8bit_size") if key in given})
    kwargs.update({key: getattr(params, key) for key in ("maximize", "stochastic_rounding") if key in given})
    if name in PAGED_CLASSES:
        kwargs.update(store=settings.store or "cpu", page_size_mb=settings.page_size_mb,
                      prefetch_depth=settings.prefetch_depth, io_threads=settings.io_threads,
                      executor=settings.executor)
        if settings.executor == "hybrid":
            kwargs.update(gpu_fraction=settings.gpu_fraction, rebalance=settings.rebalance)
        if settings.store == "nvme":
            kwargs["nvme_path"] = settings.nvme_path
    return (None if problems else (name, kwargs)), problems


def accepted_keywords(cls) -> set:
    """Keyword names a class's constructor accepts, following ``**kwargs`` up to the base that
    consumes them."""
    names: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    names.discard("self")
    return names


def resolved_class_name(cfg) -> str | None:
    """The optimizer class name a config resolves to (None without an optimizer section),
    without importing torch."""
    if cfg.optimizer is None:
        return None
    resolved, problems = check_optimizer(cfg, merge_paging(cfg))
    if problems:
        raise ConfigError(problems)
    return resolved[0]


def resolve_optimizer(cfg, *, param_dtype_is_fp32: bool = True) -> OptimizerSpec | None:
    """The OptimizerSpec of EngineConfig.optimizer_spec (docs/config.md, "Which optimizer class")."""
    if cfg.optimizer is None:
        return None
    settings = merge_paging(cfg)
    resolved, problems = check_optimizer(cfg, settings)
    if problems:
        raise ConfigError(problems)
    name, kwargs = resolved
    from .. import optim  # imported here: loading a config does not need torch
    accepted = accepted_keywords(getattr(optim, name))
    # Keywords the optimizers are gaining: passed only to a constructor that takes them.
    if "master_weights" in accepted:
        kwargs["master_weights"] = settings.master_weights and not param_dtype_is_fp32
    if "pin_memory" in accepted and name in PAGED_CLASSES:
        kwargs["pin_memory"] = settings.pin_memory
    return OptimizerSpec(name, kwargs)
