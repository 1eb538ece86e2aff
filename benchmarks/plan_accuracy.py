"""How well offload-plan predicts, on this machine: for each model and every configuration the
planner ranks (host and NVMe stores, fp32 and 8-bit state, page sizes, prefetch depths), the
predicted optimizer step and bytes per tier against the measured ones, and the planner's first
choice against the fastest configuration measured.

    python benchmarks/plan_accuracy.py                      # built-in sizes and vs_deepspeed's GPTs
    python benchmarks/plan_accuracy.py --models small base --nvme-path /nvme --json out.json

Each configuration's optimizer is built from the config the planner writes for it (what
initialize() builds) over the model's real params with random grads; the step is the median
wall time of --steps calls of optimizer.step() after one untimed step that lays out the pages,
and of that the median over --rounds fresh optimizers (an NVMe store's rate here changes from
one fresh file to the next); the bytes are paging_stats()["footprint"]. Targets (issue 22): step within 25%,
bytes within 10%, first choice at most 1.1x the best measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vs_workloads import WORKLOADS  # noqa: E402

from offload_engine.config import load_config  # noqa: E402
from offload_engine.plan import planner, probe as probe_mod, workload as workload_mod  # noqa: E402
from offload_engine.train.job import load_config_dict  # noqa: E402
from offload_engine.train.models import SIZES, build_model  # noqa: E402

GPT_SIZES = ("gpt-3m", "gpt-13m", "gpt-43m")  # benchmarks/vs_deepspeed.py's CPU GPTs
DEFAULT_MODELS = ("small", "medium", "large", "base") + GPT_SIZES


def build(name: str) -> tuple[torch.nn.Module, str]:
    if name in SIZES:
        loaded = build_model(name)
        return loaded.module, loaded.description
    w = WORKLOADS[name]
    return w.build(), f"{name}: {w.describe()}"


def measure(row, module, dtype, steps: int, rounds: int) -> dict:
    """The median over `rounds` fresh optimizers (each a fresh NVMe file) of the median wall
    time of `steps` steps, and the bytes per tier the optimizer reports."""
    params = [p for p in module.parameters() if p.requires_grad]
    cfg = load_config(row.config)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    medians = []
    for _ in range(rounds):
        opt = cfg.optimizer_spec(param_dtype_is_fp32=dtype == torch.float32).build(params)
        try:
            opt.step()  # lays out the pages
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
            stats = opt.paging_stats()
        finally:
            opt.close()
    return {"step_s": statistics.median(medians), "rounds_s": medians, "footprint": stats["footprint"],
            "last_step": stats["last_step"]}


def rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else 0.0


def run_model(name: str, probe, base: dict, nvme_path: str, dtype_name: str, steps: int, rounds: int,
              stores=None) -> dict:
    module, description = build(name)
    dtype = workload_mod.DTYPES[dtype_name]
    module = module.to(dtype)
    work = workload_mod.from_module(module, description, dtype_name)
    plan = planner.make_plan(work, probe, base, nvme_path=nvme_path, stores=stores)
    rows = []
    for row in plan.rows:
        if row.infeasible:
            continue
        m = measure(row, module, dtype, steps, rounds)
        bytes_err = max(abs(rel(getattr(row.footprint, tier), m["footprint"][tier]))
                        for tier in ("gpu", "pinned_host", "host", "disk") if m["footprint"][tier])
        rows.append({"config": row.candidate.label(), "predicted": row.predicted.as_dict(),
                     "measured_step_s": m["step_s"], "measured_rounds_s": m["rounds_s"], "step_error": rel(row.predicted.step_s, m["step_s"]),
                     "predicted_bytes": row.footprint.as_dict(), "measured_bytes": m["footprint"],
                     "bytes_error": bytes_err, "measured_last_step": m["last_step"]})
        print(f"  {row.candidate.label():40} predicted {row.predicted.step_s * 1e3:8.2f} ms  measured "
              f"{m['step_s'] * 1e3:8.2f} ms  ({rows[-1]['step_error']:+.0%}; rounds {min(m['rounds_s']) * 1e3:.1f}-"
              f"{max(m['rounds_s']) * 1e3:.1f})  bytes {bytes_err:+.1%}", flush=True)
    best = min(r["measured_step_s"] for r in rows)
    first = rows[0]["measured_step_s"]
    print(f"  first choice {rows[0]['config']}: {first * 1e3:.2f} ms, {first / best:.2f}x the best measured "
          f"({min(rows, key=lambda r: r['measured_step_s'])['config']})")
    return {"model": name, "description": description, "params": work.numel, "dtype": dtype_name, "rows": rows,
            "first_over_best": first / best,
            "max_step_error": max(abs(r["step_error"]) for r in rows),
            "max_bytes_error": max(abs(r["bytes_error"]) for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help=f"built-in sizes ({', '.join(SIZES)}) or {', '.join(GPT_SIZES)}")
    ap.add_argument("--dtype", default="bf16", choices=sorted(workload_mod.DTYPES),
                    help="the params' training dtype (default bf16, offload-train's on a CPU with fast bf16)")
    ap.add_argument("--nvme-path", default=tempfile.gettempdir())
    ap.add_argument("--stores", nargs="+", default=None, choices=("cpu", "nvme"), help="default: both")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh optimizers (fresh NVMe files) per configuration (median of their medians)")
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    probe = probe_mod.probe_machine(args.nvme_path)
    disk = ", ".join(f"{mb} MiB {d['read_gbps']:.2f}/{d['write_gbps']:.2f}/{d['both_gbps']:.2f}"
                     for mb, d in probe.disk["by_page_mb"].items())
    print(f"probed in {time.perf_counter() - t:.1f} s: {probe.cpu}, {probe.cores} cores; disk read/write/both "
          f"GB/s {disk}", flush=True)
    base, _ = load_config_dict(None)
    results = []
    for name in args.models:
        print(f"{name}:", flush=True)
        results.append(run_model(name, probe, base, args.nvme_path, args.dtype, args.steps, args.rounds, args.stores))
    print("\nmodel      params   max |step error|  max |bytes error|  first / best")
    for r in results:
        print(f"{r['model']:9} {r['params'] / 1e6:7.1f}M  {r['max_step_error']:15.0%}  {r['max_bytes_error']:16.1%}  "
              f"{r['first_over_best']:11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": probe.date, "probe": probe.to_json(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
