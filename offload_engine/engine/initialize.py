"""offload_engine.initialize(): builds the engine, its optimizer, scheduler and data loader
from a DeepSpeed-style config, the way deepspeed.initialize does."""
from __future__ import annotations

import logging

import torch

from .. import optim
from ..config import ConfigError, EngineConfig, load_config
from ..optim._base import BlockwiseOptimizer
from ..optim.paged import PagedOptimizer
from ..schedulers import build_scheduler
from . import admission, launch_env
from .engine import OffloadEngine
from .bucket_reduce import BucketReducer
from .delayed import DelayedUpdate
from .overlap import BackwardOverlap
from .partition import Partition
from .precision import choose_bf16

log = logging.getLogger("offload_engine")

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def initialize(model: torch.nn.Module, config, model_parameters=None, optimizer=None, lr_scheduler=None,
               training_data=None):
    """Returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    config: a path to a JSON file, a dict, or an EngineConfig (docs/config.md).
    model_parameters: the params (or param groups) to optimize; default: the model's params
        with ``requires_grad`` (so a LoRA model gets state for its adapters only).
    optimizer: an optimizer, or a callable building one from the params; by default the
        config's ``optimizer`` section (one or the other, not both).
    lr_scheduler: a scheduler, or a callable building one from the optimizer; by default the
        config's ``scheduler`` section, if any.
    training_data: a torch Dataset; when given, the returned dataloader yields micro-batches of
        ``train_micro_batch_size_per_gpu`` in random order (torch's generator).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    # Started by torchrun, deepspeed or mpirun with several ranks and no process group yet:
    # start one from the launcher's environment (docs/launch.md).
    launch_env.init_distributed(device=next(model.parameters(), torch.empty(0)).device)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    cfg = config if isinstance(config, EngineConfig) else load_config(config, world_size=world_size)
    if cfg.bf16.enabled == "auto":  # decided for the params' device, by measuring ([precision.py])
        device = next(model.parameters(), torch.empty(0)).device
        use_bf16, why = choose_bf16(device)
        if world_size > 1:  # every rank must train in the same precision: bf16 only where all run it fast
            agreed = _all_ranks_agree(use_bf16, device)
            if agreed != use_bf16:
                use_bf16, why = agreed, f"another rank's device runs bf16 slowly; here {why}"
        log.info("bf16.enabled auto: %s (%s)", "bf16" if use_bf16 else "fp32", why)
        cfg = cfg.with_bf16(use_bf16)
    paging = cfg.paging_settings()
    if paging.overlap == "exact":
        _check_overlap_config(cfg, world_size, next(model.parameters(), torch.empty(0)).device,
                              torch.distributed.get_backend() if world_size > 1 else None)

    low = _LOW_PRECISION.get(cfg.precision)
    dtypes = {name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())}
    if low is not None:  # as DeepSpeed: the module computes in bf16/fp16; fp32 masters live with the state
        model.to(low)
    try:
        return _build(model, cfg, paging, low, model_parameters, optimizer, lr_scheduler, training_data)
    except BaseException:
        if low is not None:  # a refused setup leaves the model in its own dtypes
            with torch.no_grad():
                for name, t in (*model.named_parameters(), *model.named_buffers()):
                    t.data = t.data.to(dtypes[name])
        raise


def _build(model, cfg, paging, low, model_parameters, optimizer, lr_scheduler, training_data):
    params = _trainable(model, model_parameters)
    partition = None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # [Note: partitioned state]: the optimizer is built over this rank's shards only.
        if optimizer is not None and isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("initialize: with several data-parallel ranks the optimizer is built over this rank's "
                             "partition of the params; pass a callable that builds it from params (or use the "
                             "config's optimizer section), not a built optimizer")
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        partition = Partition([p for g in groups for p in g["params"]],
                              shared_memory=cfg.data_parallel.shared_memory)
        params = partition.shard_groups(groups)

    if optimizer is not None and cfg.optimizer is not None:
        raise ConfigError.single("optimizer", "the config has an optimizer section and initialize() was given an "
                                 "optimizer too; keep one")
    built = optimizer is None or not isinstance(optimizer, torch.optim.Optimizer)
    if optimizer is None:
        spec = cfg.optimizer_spec(param_dtype_is_fp32=low is None)
        if spec is None:
            raise ConfigError.single("optimizer", "no optimizer: add an optimizer section to the config or pass "
                                     "optimizer= to initialize()")
        kwargs = dict(spec.kwargs)
        if "executor" in kwargs:  # a paged class: where its update runs ([Note: auto executor] in plan/auto.py)
            kwargs.update(_place_update(spec.name, kwargs, params, paging))
        if kwargs.get("store") == "nvme":  # the node's ranks share its disk: [Note: node IO] in admission.py
            kwargs["io_threads"] = admission.node_io_threads(kwargs["io_threads"])
        optimizer = getattr(optim, spec.name)(params, **kwargs)
    elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"initialize: optimizer must be a torch.optim.Optimizer (or build one), got "
                        f"{type(optimizer).__name__}")
    _check_optimizer(model, optimizer, low, paging.master_weights,
                     shards=partition.shards if partition is not None else ())
    try:
        # fails now if the node cannot hold its ranks' state ([Note: admission]); "delayed" adds
        # a host copy of this rank's params ([Note: delayed update])
        admission.admit(optimizer, extra_bytes=DelayedUpdate.shadow_bytes_for(optimizer)
                        if paging.overlap == "delayed" else 0)
    except BaseException:
        if built and hasattr(optimizer, "close"):  # ours to release: an NVMe store's file goes at once
            optimizer.close()
        raise

    if lr_scheduler is not None and cfg.scheduler is not None:
        raise ConfigError.single("scheduler", "the config has a scheduler section and initialize() was given an "
                                 "lr_scheduler too; keep one")
    if lr_scheduler is None and cfg.scheduler is not None:
        lr_scheduler = build_scheduler(optimizer, cfg.scheduler.type, cfg.scheduler.params.model_dump())
    elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(optimizer)

    dataloader = None
    if training_data is not None:
        # With several ranks each one draws a disjoint share of every epoch, as DeepSpeed does.
        sampler = (torch.utils.data.DistributedSampler(training_data, shuffle=True) if partition is not None
                   else None)
        dataloader = torch.utils.data.DataLoader(training_data, batch_size=cfg.train_micro_batch_size_per_gpu,
                                                 shuffle=sampler is None, sampler=sampler)
    if paging.overlap != "off":
        try:
            _check_overlap_optimizer(optimizer, _overlap_key(cfg), paging.overlap)
        except ConfigError:
            if built and hasattr(optimizer, "close"):
                optimizer.close()
            raise
    overlap = None
    if paging.overlap == "exact":
        # With several ranks the hooks watch the full params and a reducer averages their grads
        # into the shards the optimizer holds ([Note: reduce during backward] in bucket_reduce.py).
        reducer = None if partition is None else BucketReducer(partition, cfg.data_parallel.bucket_elements)
        hooked = partition.params if partition is not None else [p for g in optimizer.param_groups
                                                                  for p in g["params"]]
        overlap = BackwardOverlap(hooked, optimizer,
                                  scale_is_fixed=cfg.gradient_clipping == 0 and cfg.precision != "fp16",
                                  # the grads' norm, and so a non-finite skip, only with these
                                  may_skip=cfg.gradient_clipping > 0 or cfg.precision != "fp32",
                                  retain_bytes=paging.speculation_budget_bytes, reducer=reducer)
    delayed = DelayedUpdate(optimizer, paging.delayed_warmup_steps) if paging.overlap == "delayed" else None
    engine = OffloadEngine(model, cfg, optimizer, lr_scheduler, partition=partition, overlap=overlap,
                           delayed=delayed)
    return engine, optimizer, dataloader, lr_scheduler


def _overlap_key(cfg) -> str:
    """The key the user wrote: paging.overlap, or its older spelling."""
    return "paging.overlap_backward" if cfg.paging.overlap_backward else "paging.overlap"


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (a MIN all-reduce, on the device the backend wants)."""
    on = device if device.type == "cuda" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=on)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _place_update(name: str, kwargs: dict, params, paging) -> dict:
    """The executor (and the hybrid's split) for paged class `name` over `params`: the config's,
    checked against the params' device, or for "auto" with CUDA params the planner's
    ([Note: auto executor] in plan/auto.py); the CUDA executor where overlap 'exact' needs
    pages during backward (only it takes them there)."""
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    device = flat[0].device if flat else torch.device("cpu")
    executor = kwargs["executor"]
    if executor in ("cuda", "hybrid") and device.type != "cuda":
        what = ("updates CUDA params" if executor == "cuda" else
                "splits each step between the GPU and the CPU, for CUDA params")
        raise ConfigError.single("paging.executor", f"{executor!r} {what}; the params are on {device}. Use 'cpu' "
                                 "or 'auto'")
    if device.type != "cuda" or executor not in ("auto", "hybrid"):
        return {}
    if executor == "hybrid" and paging.gpu_fraction is not None:
        return {}
    from ..plan import auto
    hosts = admission.gather_hosts()  # every rank takes this branch (same config, same device type)
    local = hosts.count(admission.host_name())
    choice = auto.choose_executor(name, {**kwargs, "executor": "cuda"}, flat, auto.cached_probe(), local,
                                  executors=("cuda",) if paging.overlap == "exact" else None)
    if executor == "hybrid":
        fraction = choice.predicted_fraction.get("hybrid")
        log.info("paging.gpu_fraction null: %s", f"{fraction:.2f}, the planner's split" if fraction is not None
                 else f"0.5 to start ({choice.why})")
        return {"gpu_fraction": 0.5 if fraction is None else fraction, "rebalance": paging.rebalance}
    log.info("paging.executor auto: %s (%s)", choice.executor, choice.why)
    out = {"executor": choice.executor}
    if choice.executor == "hybrid":
        fraction = choice.gpu_fraction if paging.gpu_fraction is None else paging.gpu_fraction
        out.update(gpu_fraction=fraction, rebalance=paging.rebalance)
    return out


def _check_overlap_config(cfg, world_size: int, device: torch.device, backend: str | None) -> None:
    """[Note: overlap with backward]: clipping and fp16 are checked after backward (pages that
    ran early on a wrong guess are taken back); with several ranks the grads are reduced a
    bucket at a time during backward, over gloo (bucket_reduce.py)."""
    if world_size <= 1:
        return
    if backend != "gloo" or device.type != "cpu":
        raise ConfigError.single(_overlap_key(cfg), f"'exact' with several ranks is built for CPU params over gloo "
                                 f"so far (here: {backend}, params on {device}); set paging.overlap to 'delayed' "
                                 "or 'off'")


def _check_overlap_optimizer(optimizer, key: str, mode: str) -> None:
    if not isinstance(optimizer, PagedOptimizer):
        raise ConfigError.single(key, f"{mode!r} needs a paged optimizer (a Paged* type, or paging.store set); "
                                 f"the optimizer is {type(optimizer).__name__}")
    if mode == "delayed":
        refusal = optimizer.detached_step_refusal
        if refusal is not None:
            raise ConfigError.single(key, f"'delayed' is built for the CPU executor so far: {refusal}; use "
                                     "paging.executor 'cpu' with CPU params, or overlap 'exact' or 'off'")
        return
    if optimizer.paging_stats()["executor"] == "hybrid":
        raise ConfigError.single(key, "'exact' is not supported with paging.executor 'hybrid' (its host side "
                                 "copies the params and grads to the host after backward); use executor 'cuda' "
                                 "or set paging.overlap to 'off'")
    if optimizer.paging_stats()["executor"] == "cpu" and optimizer.paging_stats()["device"].startswith("cuda"):
        raise ConfigError.single(key, "'exact' is not supported with paging.executor 'cpu' for CUDA params (the "
                                 "grads are copied to the host after backward); use executor 'cuda' or set "
                                 "paging.overlap to 'off'")


def _trainable(model, model_parameters):
    """The params to optimize, as torch.optim takes them: params, (name, param) pairs (as
    model.named_parameters() yields) or param groups; frozen params are left out."""
    if model_parameters is None:
        return [p for p in model.parameters() if p.requires_grad]

    def params_of(items):
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        return [p[1] if isinstance(p, tuple) else p for p in items]

    items = [model_parameters] if isinstance(model_parameters, (torch.Tensor, dict)) else list(model_parameters)
    if items and isinstance(items[0], dict):  # param groups
        return [{**g, "params": [p for p in params_of(g["params"]) if p.requires_grad]} for g in items]
    return [p for p in params_of(items) if p.requires_grad]


def _check_optimizer(model, optimizer, low, master_weights: bool, shards=()) -> None:
    own = {id(p) for p in model.parameters()} | {id(s) for s in shards}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in own:
                raise ValueError(f"initialize: the optimizer holds a param of shape {list(p.shape)} that is not one "
                                 "of the model's")
    if low is None or not master_weights:
        return
    keeps_masters = isinstance(optimizer, BlockwiseOptimizer) and all(g["master_weights"]
                                                                       for g in optimizer.param_groups)
    if not keeps_masters:
        raise ConfigError.single(
            "paging.master_weights", f"the {type(optimizer).__name__} given to initialize() keeps no fp32 master "
            f"weights for the {str(low).replace('torch.', '')} params; let the config's optimizer section build the "
            "optimizer, pass one of offload_engine.optim's optimizers with master_weights=True, or set "
            "paging.master_weights to false")
