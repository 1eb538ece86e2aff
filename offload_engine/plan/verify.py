"""`offload-plan --verify N`: runs N optimizer steps of a planned configuration on rank 0's
share of the params (real tensors of the planned shapes, random grads, the optimizer the
config builds) and sets the measured step beside the predicted one, part by part:

  step      wall time of optimizer.step() (the median of the N steps, after one untimed step
            that lays out the pages): predicted max(update + params, io) + fill;
  update    paging_stats' update_s, the kernels' time on the pages: predicted update + params;
  waiting   paging_stats' wait_s, the time the step stood still for a page read or a free slot
            or the final write-backs: predicted step - (update + params), what the transfers
            leave in the open;
  bytes     paging_stats' footprint per tier: predicted by the same footprint rule.

One process: where several ranks share a node's disk, its rate here is one rank's.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..config import load_config
from .planner import Row
from .sizing import rank_shapes
from .workload import DTYPES, Workload


def verify(row: Row, workload: Workload, steps: int, seed: int = 0) -> dict:
    """{"predicted": {...}, "measured": {...}} for `row` over `steps` steps (>= 1)."""
    if steps < 1:
        raise ValueError(f"--verify takes a number of steps >= 1, got {steps}")
    dtype = DTYPES[workload.dtype]
    gen = torch.Generator().manual_seed(seed)
    params = []
    for view, _full in rank_shapes(workload, 0):
        p = torch.nn.Parameter(torch.randn(view.shape, generator=gen).to(dtype))
        p.grad = torch.randn(view.shape, generator=gen).to(dtype)
        params.append(p)
    cfg = load_config(row.config)
    opt = cfg.optimizer_spec(param_dtype_is_fp32=workload.dtype == "fp32").build(params)
    try:
        opt.step()  # lays out the pages
        walls, updates, waits = [], [], []
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            walls.append(time.perf_counter() - start)
            last = opt.paging_stats()["last_step"]
            updates.append(last["update_s"])
            waits.append(last["wait_s"])
        footprint = opt.paging_stats()["footprint"]
    finally:
        opt.close()
    t = row.predicted
    return {
        "configuration": row.candidate.label(),
        "steps": steps,
        "predicted": {"step_s": t.step_s, "update_s": t.update_s + t.params_s,
                      "waiting_s": max(0.0, t.step_s - t.update_s - t.params_s), "bytes": row.footprint.as_dict()},
        "measured": {"step_s": statistics.median(walls), "update_s": statistics.median(updates),
                     "waiting_s": statistics.median(waits), "bytes": footprint},
    }


def format_verify(result: dict) -> str:
    p, m = result["predicted"], result["measured"]
    lines = [f"verify: {result['configuration']}, {result['steps']} steps (medians)",
             f"  {'':10} {'predicted':>12} {'measured':>12} {'error':>8}"]
    for key, name in (("step_s", "step"), ("update_s", "update"), ("waiting_s", "waiting")):
        err = f"{(p[key] - m[key]) / m[key]:+.0%}" if m[key] > 1e-4 else "-"
        lines.append(f"  {name:10} {p[key] * 1e3:9.2f} ms {m[key] * 1e3:9.2f} ms {err:>8}")
    for tier in ("gpu", "pinned_host", "host", "disk"):
        if p["bytes"][tier] or m["bytes"][tier]:
            same = "same" if p["bytes"][tier] == m["bytes"][tier] else \
                f"{(p['bytes'][tier] - m['bytes'][tier]) / max(1, m['bytes'][tier]):+.1%}"
            lines.append(f"  {tier:10} {p['bytes'][tier]:12d} {m['bytes'][tier]:12d} {same:>8}  bytes")
    return "\n".join(lines)
