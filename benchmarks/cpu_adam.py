"""CPU Adam step-throughput benchmark.

Compares offload_engine's CPUAdam ("ours", fp32 state) and its AdamW8bit / AdamW4bit
("ours8", "ours4") against the anchors torch.optim.AdamW(fused=True), DeepSpeed's
DeepSpeedCPUAdam, bitsandbytes' AdamW8bit ("bnb8") and torchao's AdamW8bit ("torchao8"),
on one flat parameter per size, for fp32 and bf16 params (grads share the param dtype).
Contenders run on their own copies of the same random data and are
interleaved round-robin; the median step time is reported.

Run:
    python benchmarks/cpu_adam.py                        # 1M, 10M, 100M; fp32 + bf16
    python benchmarks/cpu_adam.py --sizes 1e6,1e7 --repeats 3 --json out.json
    python benchmarks/cpu_adam.py --contenders ours,torch --dtypes bf16
    python benchmarks/cpu_adam.py --sizes 1e8 --dtypes fp32 \
        --contenders ours,ours8,ours4,torch,deepspeed,bnb8,torchao8      # the 8-bit comparison

Missing contenders (offload_engine not built, deepspeed not installed) are
skipped with a message. DeepSpeed JIT-builds its cpu_adam op on first use.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ANCHORS = ("torch", "deepspeed", "bnb8", "torchao8")
OURS = ("ours", "ours8", "ours4")
ALL = OURS + ANCHORS


def load_contenders(wanted):
    """Return {name: factory(params) -> optimizer}; print why any are skipped."""
    found = {}
    if "ours" in wanted:
        try:
            from offload_engine.optim import CPUAdam
            found["ours"] = lambda ps: CPUAdam(ps, bias_correction=True, amsgrad=False,
                                               adamw_mode=True, **HYPER)
        except Exception as e:  # not built yet, ImportError, missing symbol...
            print(f"> skipping ours: cannot import offload_engine.optim.CPUAdam ({type(e).__name__}: {e})")
    if "ours8" in wanted or "ours4" in wanted:
        try:
            from offload_engine.optim import AdamW4bit, AdamW8bit
            kw = dict(lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
            if "ours8" in wanted:
                found["ours8"] = lambda ps: AdamW8bit(ps, min_8bit_size=0, **kw)
            if "ours4" in wanted:
                found["ours4"] = lambda ps: AdamW4bit(ps, min_8bit_size=0, **kw)
        except Exception as e:
            print(f"> skipping ours8/ours4: {type(e).__name__}: {e}")
    if "bnb8" in wanted:
        try:
            import bitsandbytes as bnb
            found["bnb8"] = lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=0, **HYPER)
        except Exception as e:
            print(f"> skipping bnb8: {type(e).__name__}: {e}")
    if "torchao8" in wanted:
        try:
            from torchao.optim import AdamW8bit as TorchaoAdamW8bit
            found["torchao8"] = lambda ps: TorchaoAdamW8bit(ps, **HYPER)
        except Exception as e:
            print(f"> skipping torchao8: {type(e).__name__}: {e}")
    if "torch" in wanted:
        found["torch"] = lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER)
    if "deepspeed" in wanted:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            found["deepspeed"] = lambda ps: DeepSpeedCPUAdam(ps, bias_correction=True, amsgrad=False,
                                                             adamw_mode=True, **HYPER)
        except Exception as e:
            print(f"> skipping deepspeed: {type(e).__name__}: {e}")
    return found


def state_dtype(opt, p):
    """dtype of the optimizer's per-element state (exp_avg & co.) for param p."""
    for v in opt.state.get(p, {}).values():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel() == p.numel():
            return v.dtype
    return None


def _tensor_bytes(t):
    """Bytes a state tensor really holds (tensor subclasses such as torchao's quantized
    state report their logical dtype, so their inner tensors are summed instead)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes_per_param(opt, p):
    """Optimizer-state bytes per param (moments, codes, absmax, maps; not the step count)."""
    total = sum(_tensor_bytes(v) for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.numel() > 1)
    return total / p.numel()


def bytes_per_param(p_dtype, g_dtype, state_bytes):
    # read p, g and the state; write p and the state
    ps, gs = (torch.empty((), dtype=d).element_size() for d in (p_dtype, g_dtype))
    return 2 * ps + gs + 2 * state_bytes


def machine_header():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            fl = next((l for l in f if l.startswith("flags")), "").split()
        flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in fl)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- cpu: {cpu} ({flags})",
        f"- cores available: {cores} (os.cpu_count()={os.cpu_count()}), torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
    ]
    try:
        import deepspeed
        lines.append(f"- deepspeed {deepspeed.__version__}")
    except Exception:
        pass
    return "\n".join(lines)


def bench_case(factories, n, dtype, repeats, warmup, min_time, seed):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen).to(dtype)
    g0 = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    runs = {}
    for name, make in factories.items():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        runs[name] = (p, make([p]))
    del p0, g0

    for name, (p, opt) in runs.items():
        for _ in range(warmup):
            opt.step()

    times = {name: [] for name in runs}
    names = list(runs)
    rounds = 0
    while rounds < repeats or (min(sum(t) for t in times.values()) < min_time and rounds < 1000):
        k = rounds % len(names)  # rotate start so nobody always follows the same neighbour
        for name in names[k:] + names[:k]:
            opt = runs[name][1]
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
        rounds += 1

    rows = []
    for name, (p, opt) in runs.items():
        sd = state_dtype(opt, p) or torch.float32
        sbytes = state_bytes_per_param(opt, p)
        med = statistics.median(times[name])
        bpp = bytes_per_param(p.dtype, p.grad.dtype, sbytes)
        rows.append(dict(contender=name, dtype=str(dtype).replace("torch.", ""),
                         state_dtype=(str(sd).replace("torch.", "") if sbytes >= 4 else f"{sbytes:.2f} B"),
                         state_bytes=sbytes, size=n, rounds=rounds,
                         median_ms=med * 1e3, min_ms=min(times[name]) * 1e3,
                         gparams_per_s=n / med / 1e9, bytes_per_param=bpp,
                         gb_per_s=n * bpp / med / 1e9, times_s=times[name]))
    del runs, times
    gc.collect()
    return rows


def fmt_size(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def print_table(rows):
    print("| contender | dtype (state) | size | median ms/step | Gparam/s | eff. GB/s | B/param "
          "| ours / best anchor | paired per round: median [q1, q3] |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio, paired = "", ""
        if r["contender"] in OURS:
            anchors = [a for a in rows if a["contender"] in ANCHORS
                       and a["size"] == r["size"] and a["dtype"] == r["dtype"]]
            if anchors:
                best = max(anchors, key=lambda a: a["gparams_per_s"])
                ratio = f"{r['gparams_per_s'] / best['gparams_per_s']:.2f}x vs {best['contender']}"
                paired = fmt_paired(best["times_s"], r["times_s"])
        print(f"| {r['contender']} | {r['dtype']} ({r['state_dtype']}) | {fmt_size(r['size'])} "
              f"| {r['median_ms']:.3f} | {r['gparams_per_s']:.3f} | {r['gb_per_s']:.1f} "
              f"| {r['bytes_per_param']:g} | {ratio} | {paired} |")


def fmt_paired(anchor_times, our_times):
    """Speed-up measured within each round (the two steps ran back to back), so drifts in
    the machine's memory bandwidth, which move both, cancel; its spread shows the noise."""
    ratios = [a / o for a, o in zip(anchor_times, our_times)]
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}x"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}x [{q1:.2f}, {q3:.2f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated param counts (e.g. 1e6,1e7)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    ap.add_argument("--contenders", default="ours,torch,deepspeed",
                    help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--repeats", type=int, default=7, help="minimum interleaved timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="keep adding rounds until each contender has this many timed seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write raw rows (incl. per-step times) here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    factories = load_contenders({c.strip() for c in args.contenders.split(",")})
    order = [c for c in ALL if c in factories]
    factories = {c: factories[c] for c in order}
    if not factories:
        raise SystemExit("no contenders available")

    print("# CPU Adam step throughput\n")
    print(machine_header())
    print(f"- repeats >= {args.repeats} (min {args.min_time}s timed per contender), warmup {args.warmup}; "
          f"contenders: {', '.join(factories)}\n")

    rows = []
    for dname in dtypes:
        for n in sizes:
            case = bench_case(factories, n, DTYPES[dname], args.repeats, args.warmup, args.min_time, args.seed)
            rows.extend(case)
            for r in case:
                print(f"> {r['contender']:>9} {dname} {fmt_size(n):>5}: {r['median_ms']:.3f} ms "
                      f"({r['rounds']} rounds)", flush=True)
    print()
    print_table(rows)
    print("\nEffective GB/s counts reads of p, g, m, v and writes of p, m, v at the actual dtypes "
          "(fp32/fp32 state: 28 B/param; bf16 with fp32 state: 22; bf16 with bf16 state: 14).")
    if any(r["contender"] == "torch" and r["state_dtype"] != "float32" for r in rows):
        print("Note: torch fused AdamW keeps exp_avg/exp_avg_sq in the param dtype, so its bf16 rows "
              "use bf16 state (less traffic, less precision) while ours and DeepSpeed keep fp32 state.")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_header(), args=vars(args), rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
