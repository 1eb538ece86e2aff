"""The hybrid executor's step against the CUDA executor's and the CPU executor's alone, for CUDA
params, in one run: the paged optimizer step's wall time per executor, the hybrid's split (the
planner's to start, rebalanced from measured phase times during the warm-up steps) and the
ratio to the faster pure executor. Issue 22's target: hybrid <= 0.75x the faster at 2B params
and more.

    python benchmarks/hybrid_step.py --sizes 0.5e9 1e9 2e9 --state int8 fp32 --json out.json
    python benchmarks/hybrid_step.py --stand-in --sizes 2e6     # no GPU: checks the script only

--stand-in pairs two CPU executors with CPU params (what tests/test_hybrid.py checks the split
with): both sides share the same cores, so its times say nothing about the hybrid on a GPU; it
exists so that the script itself runs where no GPU is lent.

Each contender is a fresh optimizer over the same params (bf16 by default, fp32 masters kept
with the state), the grads random and fixed; --warmup untimed steps (the first lays out the
pages; the hybrid's split moves during them), then the median of --steps timed steps, each
ended by torch.cuda.synchronize() so that the GPU's queued work is in the time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

from offload_engine import optim
from offload_engine.paging.executors.cpu import CpuExecutor
from offload_engine.paging.executors.hybrid import HybridExecutor
from offload_engine.plan import auto

CHUNK = 1 << 26  # params of at most 64M elements, as a model's largest matrices are
CLASSES = {"int8": "PagedAdamW8bit", "fp32": "PagedAdamW"}


def params_of(numel: int, device, dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = [CHUNK] * (numel // CHUNK) + ([numel % CHUNK] if numel % CHUNK else [])
    out = []
    for n in sizes:
        p = (0.02 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (1e-3 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)
        out.append(p)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(opt, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def run_size(numel: int, state: str, dtype, device, stand_in: bool, warmup: int, steps: int,
             page_size_mb: float) -> dict:
    name = CLASSES[state]
    cls = getattr(optim, name)
    master = dtype != torch.float32
    common = dict(page_size_mb=page_size_mb, master_weights=master, min_8bit_size=0)
    params = params_of(numel, device, dtype)
    start = [p.detach().clone() for p in params]
    fraction = None
    if not stand_in:
        kwargs = dict(common, store="cpu", prefetch_depth=2)
        fraction = auto.choose_executor(name, kwargs, params, auto.cached_probe()).predicted_fraction.get("hybrid")
    contenders = {
        "cuda": dict(executor="cpu" if stand_in else "cuda"),
        "cpu": dict(executor="cpu"),
        "hybrid": dict(executor=HybridExecutor(CpuExecutor(), CpuExecutor(), 0.5, True)) if stand_in
        else dict(executor="hybrid", gpu_fraction=0.5 if fraction is None else fraction, rebalance=True),
    }
    row = {"params": numel, "state": state, "dtype": str(dtype).replace("torch.", ""), "optimizer": name,
           "planned_gpu_fraction": fraction}
    for label, kw in contenders.items():
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = cls(params, **common, **kw)
        try:
            times = timed_steps(opt, device, warmup, steps)
            stats = opt.paging_stats()
        finally:
            opt.close()
        row[label] = {"step_ms": statistics.median(times) * 1e3, "steps_ms": [t * 1e3 for t in times],
                      "footprint": stats["footprint"], **({"split": stats["split"]} if "split" in stats else {})}
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    faster = min(row["cuda"]["step_ms"], row["cpu"]["step_ms"])
    row["hybrid_vs_faster"] = row["hybrid"]["step_ms"] / faster
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[0.5e9, 1e9, 2e9], help="param counts")
    ap.add_argument("--state", nargs="+", choices=sorted(CLASSES), default=["int8", "fp32"])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--page-size-mb", type=float, default=16.0)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--stand-in", action="store_true", help="two CPU executors, CPU params (no GPU needed)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not args.stand_in and not torch.cuda.is_available():
        ap.error("the hybrid executor needs CUDA params and no GPU is visible here; --stand-in runs the script "
                 "with two CPU executors (its times mean nothing for a GPU)")
    device = torch.device("cpu") if args.stand_in else torch.device("cuda", torch.cuda.current_device())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = []
    print(f"{'params':>8} {'state':5} {'cuda ms':>9} {'cpu ms':>9} {'hybrid ms':>10} {'split':>6} "
          f"{'hybrid / faster':>16}")
    for numel in args.sizes:
        for state in args.state:
            row = run_size(int(numel), state, dtype, device, args.stand_in, args.warmup, args.steps,
                           args.page_size_mb)
            rows.append(row)
            split = row["hybrid"].get("split", {}).get("gpu_fraction", float("nan"))
            print(f"{numel / 1e9:7.2f}B {state:5} {row['cuda']['step_ms']:9.1f} {row['cpu']['step_ms']:9.1f} "
                  f"{row['hybrid']['step_ms']:10.1f} {split:6.2f} {row['hybrid_vs_faster']:15.2f}x", flush=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": "stand-in (two CPU executors)" if args.stand_in else torch.cuda.get_device_name(device),
              "dtype": args.dtype, "page_size_mb": args.page_size_mb, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
