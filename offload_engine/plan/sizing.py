"""Bytes per tier of a candidate, by the engine's own rule: the optimizer a config builds is
built over the workload's params on the meta device (shapes only; a meta-param paged optimizer
lays out pages and cannot step), cut into each rank's partition as the data-parallel partition
cuts them, and its planned pages are sized by the footprint rule the pager and the admission
check use ([Note: slot rule] in paging/footprint.py). So the bytes the planner prints are the
bytes initialize() admits and paging_stats() then reports.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from ..config import ConfigWarning, load_config
from ..engine.partition import split_points
from ..optim.sharded import mark_full_numel
from ..paging import footprint as fp
from ..paging.layout import page_bytes_from_mb
from .candidates import Candidate
from .workload import Workload


@dataclasses.dataclass(frozen=True)
class RankSize:
    """One rank's share of the state, laid out in pages (for a state dtype and page size; the
    store, executor and prefetch depth change its footprint, not its pages)."""

    pages: int
    page_bytes: int
    numel: dict               # "<format>" or "<format>+master" -> elements updated with it
    params: dict              # the same keys -> params (or shards of params) updated with it
    optimizer: str            # the class the config builds
    param_bytes: int = 0      # the rank's params in their training dtype

    @property
    def moved_bytes(self) -> int:
        """Bytes of pages one step reads (and writes back) when pages travel."""
        return self.pages * self.page_bytes


def rank_shapes(workload: Workload, rank: int):
    """[(meta param, full numel)] of `rank`'s partition: contiguous element ranges of the
    flattened params, cut where the data-parallel partition cuts them (split_points)."""
    params = workload.meta_params()
    if workload.world == 1:
        return [(p, p.numel()) for p in params]
    numels = [p.numel() for p in params]
    points = split_points(numels, workload.world)
    lo, hi = points[rank], points[rank + 1]
    out, start = [], 0
    for p, n in zip(params, numels):
        a, b = max(lo, start) - start, min(hi, start + n) - start
        if a < b:
            out.append((p.detach().view(-1)[a:b], n))
        start += n
    return out


def size_rank(config: dict, workload: Workload, rank: int = 0) -> RankSize:
    """`rank`'s state under `config` (a candidate's, config_for), laid out by the optimizer the
    config builds, over meta params."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # a user's lenient keys are reported when they train
        cfg = load_config(config, world_size=workload.world)
    spec = cfg.optimizer_spec(param_dtype_is_fp32=workload.dtype == "fp32")
    shards = []
    for view, full in rank_shapes(workload, rank):
        shard = torch.nn.Parameter(view, requires_grad=True)
        shards.append(mark_full_numel(shard, full))
    return size_params(spec.name, spec.kwargs, shards)


def size_params(name: str, kwargs: dict, shards) -> RankSize:
    """The state of optimizer class `name` built with `kwargs` over `shards` (meta params, a
    sharded one marked with its full size), laid out in pages."""
    kwargs = dict(kwargs)
    # Laid out on the host store and the CPU executor: the layout depends on the page size and
    # the formats only, and a meta-param optimizer must open no file and touch no GPU.
    kwargs.update(store="cpu", executor="cpu")
    for key in ("nvme_path", "gpu_fraction", "rebalance"):
        kwargs.pop(key, None)
    from .. import optim
    opt = getattr(optim, name)(shards, **kwargs)
    try:
        pages = opt.planned_pages()
        numel: dict = {}
        count: dict = {}
        for group in opt.param_groups:
            for p in group["params"]:
                f = opt.state_format_for(group, p)
                key = f.name + ("+master" if f.master else "")
                numel[key] = numel.get(key, 0) + p.numel()
                count[key] = count.get(key, 0) + 1
    finally:
        opt.close()
    return RankSize(pages, page_bytes_from_mb(kwargs["page_size_mb"]), numel, count, name,
                    sum(s.numel() * s.element_size() for s in shards))


def footprint_of(size: RankSize, candidate: Candidate, gpu_params: bool = False) -> fp.Footprint:
    """Bytes per tier of `size`'s pages under `candidate` ([Note: slot rule]); with CUDA params
    and the CPU executor, the pinned host buffers each param and its grad are staged in
    (CudaParamsOnCpu in paging/executors/cpu_for_cuda.py)."""
    foot = fp.footprint(candidate.store, candidate.executor, candidate.prefetch_depth, size.page_bytes, size.pages)
    if gpu_params and candidate.executor == "cpu":
        foot = foot + fp.Footprint(pinned_host=2 * size.param_bytes)
    if candidate.executor == "hybrid":  # its host side stages its share of the params (at most all)
        share = 1.0 if candidate.gpu_fraction is None else 1.0 - candidate.gpu_fraction
        foot = foot + fp.Footprint(pinned_host=int(2 * share * size.param_bytes))
    return foot
