"""paging.executor "auto" for CUDA params: the planner's choice between the CUDA executor, the
CPU executor and the hybrid of the two, for the optimizer initialize() is about to build.

[Note: auto executor] The store, state format, page size and prefetch depth are the config's;
only where the update runs is chosen. Each executor the store allows is costed by the step
model ([Note: step model] in cost.py) over this rank's params laid out by that very optimizer
class on the meta device (sizing.size_params), from this machine's cached probe. Probing takes
tens of seconds, too long for initialize(), so without a cached probe (or one taken without a
GPU) the choice is the CUDA executor, the params' own device, and the reason says how to let
the planner decide (`offload-plan probe`). A candidate whose device slots would not fit the
GPU's free memory at probe time is passed over.
"""
from __future__ import annotations

import dataclasses

import torch

from ..optim import sharded
from .candidates import Candidate
from .cost import predict
from .planner import threads_per_rank
from .probe import MachineProbe, load_cached
from .sizing import footprint_of, size_params

EXECUTORS_BY_STORE = {"cpu": ("cuda", "hybrid", "cpu"), "nvme": ("cuda", "cpu"), "managed": ("cuda",)}


@dataclasses.dataclass(frozen=True)
class Choice:
    executor: str                   # "cuda" | "cpu" | "hybrid"
    gpu_fraction: float | None      # the hybrid's split, else None
    why: str
    predicted_s: dict               # executor -> predicted step (seconds), for those costed
    predicted_fraction: dict = dataclasses.field(default_factory=dict)  # "hybrid" -> its split, when costed


def cached_probe() -> MachineProbe | None:
    """This machine's cached probe, or None where there is none (or it cannot be read)."""
    try:
        return load_cached()
    except (OSError, ValueError):
        return None


def choose_executor(optimizer: str, kwargs: dict, params, probe: MachineProbe | None,
                    ranks_per_node: int = 1, executors=None) -> Choice:
    """[Note: auto executor] for optimizer class `optimizer` built with `kwargs` over `params`
    (this rank's, on a CUDA device or meta); `executors` narrows the executors weighed (the
    hybrid's split is costed whenever the store allows it, for a 'hybrid' with no split set)."""
    if probe is None or probe.gpu is None:
        why = ("no probe of this machine with its GPU is cached; run `offload-plan probe` once to let the planner "
               "choose between the CUDA, CPU and hybrid executors")
        return Choice("cuda", None, why, {})
    shards = [sharded.mark_full_numel(torch.nn.Parameter(torch.empty(sharded.local_numel(p), dtype=p.dtype,
                                                                     device="meta")),
                                      sharded.full_numel(p) or p.numel()) for p in params]
    size = size_params(optimizer, kwargs, shards)
    store = kwargs.get("store", "cpu")
    threads = threads_per_rank(probe, ranks_per_node)
    costed, skipped, fractions = {}, [], {}
    for executor in EXECUTORS_BY_STORE[store]:
        cand = Candidate("", store, executor, float(kwargs.get("page_size_mb", 16.0)),
                         int(kwargs.get("prefetch_depth", 2)))
        try:
            step = predict(probe, size, cand, threads=threads, gpu_params=True, ranks_per_disk=ranks_per_node)
        except ValueError as err:  # the probe lacks a rate it needs (the disk, for an NVMe store)
            skipped.append(f"{executor}: {err}")
            continue
        if step.gpu_fraction is not None:
            cand = dataclasses.replace(cand, gpu_fraction=step.gpu_fraction)
            fractions[executor] = step.gpu_fraction
        if executors is not None and executor not in executors:
            continue
        if footprint_of(size, cand, True).gpu > probe.gpu["free_bytes"]:
            skipped.append(f"{executor}: its device slots do not fit the GPU's free memory at probe time")
            continue
        costed[executor] = (step, cand)
    if not costed:
        return Choice("cuda", None, f"no executor could be costed ({'; '.join(skipped)}); the params' device", {},
                      fractions)
    best = min(costed, key=lambda e: costed[e][0].step_s)
    step, cand = costed[best]
    others = ", ".join(f"{e} {costed[e][0].step_s * 1e3:.1f} ms" for e in costed if e != best)
    label = best if cand.gpu_fraction is None else f"hybrid, {cand.gpu_fraction:.0%} of the pages on the GPU"
    why = (f"the planner predicts {label} at {step.step_s * 1e3:.1f} ms per step"
           + (f" (beside {others})" if others else "") + f", from the probe of {probe.date}")
    return Choice(best, cand.gpu_fraction, why, {e: costed[e][0].step_s for e in costed}, fractions)
