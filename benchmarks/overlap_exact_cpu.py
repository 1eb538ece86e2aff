"""paging.overlap "exact" and "delayed" on the CPU executor: what backward (or, delayed, the next
forward and backward) hides of the paged step, with gradient clipping on, for host pages and
the NVMe store, against overlap off in the same run.

A stack of fp32 MLP blocks (d -> 4d -> d) trained through offload_engine.initialize with
PagedAdamW or PagedAdamW8bit and gradient_clipping 1.0 (the norm of this workload stays below
it, so every guess holds; --clip 0.01 makes every step clip and shows the price of wrong
guesses). Each iteration is timed in three parts: forward, backward (which now includes the
pages updated from its hooks) and the exposed step (engine.step()). Contenders alternate
within each round, so the disk's and the VM's drift falls on all of them alike; medians over
rounds of per-round medians. The ratios printed are each contender's iteration and exposed
step over host pages with overlap off (the anchor), and NVMe over host pages per mode. With
"delayed" the exposed step is the wait for the previous step's thread plus the launch.

    python benchmarks/overlap_exact_cpu.py                      # d 512, 8 blocks (16.8M params)
    python benchmarks/overlap_exact_cpu.py --nvme-path /local_nvme --json out.json
"""
import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import offload_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_backward import model  # noqa: E402 - the GPU benchmark's MLP stack, in fp32 here


def build(args, store: str, overlap: str, nvme_path: str):
    net = model(args.d, args.blocks)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": args.clip,
           "optimizer": {"type": args.optimizer, "params": {"lr": 1e-4, "weight_decay": 0.01}},
           "paging": {"store": store, "page_size_mb": args.page_size_mb, "overlap": overlap,
                      "delayed_warmup_steps": 0}}
    if store == "nvme":
        cfg["paging"]["nvme_path"] = nvme_path
    engine, opt, *_ = offload_engine.initialize(net, cfg)
    return engine, opt


def one_iteration(engine, x) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    loss = engine(x).float().square().mean()
    t1 = time.perf_counter()
    engine.backward(loss)
    t2 = time.perf_counter()
    engine.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--optimizer", default="PagedAdamW", choices=["PagedAdamW", "PagedAdamW8bit"])
    ap.add_argument("--page-size-mb", type=float, default=4.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nvme-path", default=None, help="directory of the NVMe state files (default: a temp dir)")
    ap.add_argument("--modes", default="off,exact,delayed", help="paging.overlap values to run, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    nvme_path = args.nvme_path or tempfile.mkdtemp(prefix="oe-overlap-")
    modes = args.modes.split(",")
    contenders = [(store, overlap) for store in ("cpu", "nvme") for overlap in modes]
    built = {c: build(args, *c, nvme_path) for c in contenders}
    x = torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(1))
    rounds = {c: [] for c in contenders}
    for _ in range(args.rounds):
        for c in contenders:
            engine, _ = built[c]
            for _ in range(args.warmup):
                one_iteration(engine, x)
            times = [one_iteration(engine, x) for _ in range(args.steps)]
            rounds[c].append([statistics.median(t[i] for t in times) for i in range(3)])
    rows = []
    for c in contenders:
        fwd, bwd, step = (statistics.median(r[i] for r in rounds[c]) for i in range(3))
        stats = built[c][1].paging_stats()
        rows.append({"store": c[0], "overlap": c[1], "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3,
                     "exposed_step_ms": step * 1e3, "iteration_ms": (fwd + bwd + step) * 1e3,
                     "speculation": stats["speculation"], "num_pages": stats["num_pages"]})
    anchor = rows[0]
    n_params = sum(p.numel() for p in model(args.d, args.blocks).parameters())
    print(f"{args.optimizer}, {n_params / 1e6:.1f}M fp32 params, {args.tokens} tokens, clip {args.clip}, "
          f"{anchor['num_pages']} pages of {args.page_size_mb:g} MiB, {torch.get_num_threads()} threads")
    print(f"{'store':6} {'overlap':7} {'fwd':>7} {'bwd':>7} {'step':>7} {'iter':>7}  iter/anchor  step/anchor  hit rate")
    for r in rows:
        spec = r["speculation"]
        hit = "-" if spec["hit_rate"] is None else f"{spec['hit_rate']:.0%}"
        print(f"{r['store']:6} {r['overlap']:7} {r['forward_ms']:7.1f} {r['backward_ms']:7.1f} "
              f"{r['exposed_step_ms']:7.1f} {r['iteration_ms']:7.1f}  {r['iteration_ms'] / anchor['iteration_ms']:10.2f}x "
              f"{r['exposed_step_ms'] / anchor['exposed_step_ms']:10.2f}x  {hit}")
    by = {(r["store"], r["overlap"]): r for r in rows}
    for mode in modes:
        nvme, host = by[("nvme", mode)], by[("cpu", mode)]
        print(f"NVMe {mode} / host {mode}: iteration {nvme['iteration_ms'] / host['iteration_ms']:.2f}x; "
              f"NVMe {mode} / host {modes[0]}: iteration {nvme['iteration_ms'] / anchor['iteration_ms']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "args": vars(args),
                       "rows": rows}, f, indent=1)
    for engine, opt in built.values():
        opt.close()


if __name__ == "__main__":
    main()
