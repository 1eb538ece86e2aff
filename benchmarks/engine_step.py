"""What the engine adds to an optimizer step: clipping by global norm, folded into the update
kernel (grad_scale), against the hand-written loop `clip_grad_norm_(); optimizer.step()`.

Contenders, each one optimizer step with gradient clipping on the same params and grads:
  torch          torch.optim.AdamW(fused=True) + clip_grad_norm_       (anchor)
  deepspeed      DeepSpeedCPUAdam + clip_grad_norm_                     (anchor)
  ours-loop      offload_engine CPUAdam + clip_grad_norm_
  engine         offload_engine.initialize(...): engine.step() with CPUAdam, clipping in the kernel
  engine-paged8  engine.step() with PagedAdamW8bit (host pages)
  engine-bf16    bf16 params, engine.step() with CPUAdam and fp32 master weights in its state

Median of --repeats steps after one warm-up step; ratios against torch and against ours-loop.

    python benchmarks/engine_step.py                     # 100M params in 8 tensors
    python benchmarks/engine_step.py --params 1e7 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import offload_engine
from offload_engine.optim import CPUAdam

LR, CLIP = 1e-3, 1.0


def make_params(n_total: int, n_tensors: int, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = n_total // n_tensors
    params = [torch.nn.Parameter((torch.randn(size, generator=g) * 0.02).to(dtype)) for _ in range(n_tensors)]
    grads = [torch.randn(size, generator=g).to(dtype) for _ in range(n_tensors)]
    return params, grads


class _Flat(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList(params)


def contenders(wanted, n_total, n_tensors):
    """{name: (params, grads, step())}; anchors that are not installed are skipped with a note."""
    out = {}
    for name in wanted:
        dtype = torch.bfloat16 if name == "engine-bf16" else torch.float32
        params, grads = make_params(n_total, n_tensors, dtype)
        if name == "torch":
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
            out[name] = (params, grads, _loop(params, opt))
        elif name == "deepspeed":
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam
            except Exception as e:  # noqa: BLE001 - not installed, or its op does not build
                print(f"> skipping deepspeed: {type(e).__name__}: {e}")
                continue
            opt = DeepSpeedCPUAdam(params, lr=LR, weight_decay=0.0, adamw_mode=True)
            out[name] = (params, grads, _loop(params, opt))
        elif name == "ours-loop":
            out[name] = (params, grads, _loop(params, CPUAdam(params, lr=LR)))
        else:
            optimizer = {"engine": "CPUAdam", "engine-bf16": "CPUAdam", "engine-paged8": "PagedAdamW8bit"}[name]
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": CLIP,
                      "optimizer": {"type": optimizer, "params": {"lr": LR, "weight_decay": 0.0}},
                      "bf16": {"enabled": name == "engine-bf16"}}
            engine, *_ = offload_engine.initialize(_Flat(params), config)
            out[name] = (params, grads, engine.step)
    return out


def _loop(params, opt):
    def step():
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e8)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--contenders", default="torch,deepspeed,ours-loop,engine,engine-paged8,engine-bf16")
    ap.add_argument("--json", default=None, help="also write {contender: median seconds} here")
    args = ap.parse_args(argv)
    n_total = int(args.params)
    print(f"# engine step with clipping, {n_total:,} params in {args.tensors} tensors, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, {datetime.date.today()}")
    found = contenders(args.contenders.split(","), n_total, args.tensors)
    times = {name: [] for name in found}
    for rep in range(args.repeats + 1):
        for name, (params, grads, step) in found.items():  # interleaved: drift hits all alike
            for p, g in zip(params, grads):
                p.grad = g
            t = time.perf_counter()
            step()
            if rep:
                times[name].append(time.perf_counter() - t)
    torch_ms = statistics.median(times["torch"]) * 1e3 if "torch" in times else None
    loop_ms = statistics.median(times["ours-loop"]) * 1e3 if "ours-loop" in times else None
    print(f"{'contender':<15}{'median ms':>11}{'Gparam/s':>10}{'vs torch':>10}{'vs ours-loop':>14}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        vs_torch = f"{torch_ms / ms:.2f}x" if torch_ms else "-"
        vs_loop = f"{loop_ms / ms:.2f}x" if loop_ms else "-"
        print(f"{name:<15}{ms:>11.1f}{n_total / ms / 1e6:>10.2f}{vs_torch:>10}{vs_loop:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n_total, "median_s": {name: statistics.median(ts) for name, ts in times.items()},
                       "package": str(Path(offload_engine.__file__).resolve().parents[1])}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
