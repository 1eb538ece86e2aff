"""Paged Adam on a GPU: step time against the PCIe bound measured in the same run.

The state rests in pinned host pages; each step copies every page in, updates it with the CUDA
kernel and copies it back (paging/cuda_pipeline.py). The bound is the time to copy the state
host-to-device and device-to-host once each through pinned memory (the faster of one after the
other or both at once), measured here with 64 MB copies. Beside ours: torch.optim.AdamW(fused=
True) with its state resident in GPU memory (the unpaged anchor). bitsandbytes and torchao are
not on the device image; carry their wheels to add them.

Run:
    python benchmarks/gpu_paging.py                         # 0.5B and 1B params, fp32 and 8-bit state
    python benchmarks/gpu_paging.py --sizes 5e8,2e9 --page-sizes 16,64 --depths 2,4 --json out.json
"""
import argparse
import datetime
import json
import statistics
import time

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def pcie(nbytes: int, chunk: int = 64 * 2**20, repeats: int = 3) -> dict:
    """Pinned host <-> device copy bandwidth over `nbytes` in `chunk` copies."""
    dev = torch.device("cuda")
    chunk = min(chunk, nbytes)
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    host_out = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    dbuf = torch.empty(chunk, dtype=torch.uint8, device=dev).random_(0, 255)
    dbuf2 = torch.empty(chunk, dtype=torch.uint8, device=dev)
    h2d, d2h = torch.cuda.Stream(), torch.cuda.Stream()
    n = max(1, nbytes // chunk)

    def timed(fn):
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    def copies_in():
        with torch.cuda.stream(h2d):
            for _ in range(n):
                dbuf2.copy_(host, non_blocking=True)

    def copies_out():
        with torch.cuda.stream(d2h):
            for _ in range(n):
                host_out.copy_(dbuf, non_blocking=True)

    t_in, t_out = timed(copies_in), timed(copies_out)
    t_both = timed(lambda: (copies_in(), copies_out()))
    moved = n * chunk
    return {"h2d_GBps": moved / t_in / 1e9, "d2h_GBps": moved / t_out / 1e9, "both_GBps": 2 * moved / t_both / 1e9,
            "bound_s_per_byte": min(t_in + t_out, t_both) / moved}


def bench(name, make, numel, steps, warmup=2):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    p = torch.randn(numel, device=dev) * 0.1
    p.grad = torch.randn(numel, device=dev) * 0.01
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the peak below: params, grads, state or slots, kernel scratch
    opt = make([p])
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row = {"contender": name, "params": numel, "step_s": statistics.median(times), "step_s_min": min(times),
           "gpu_peak_GB": torch.cuda.max_memory_allocated() / 1e9}
    if hasattr(opt, "paging_stats"):
        s = opt.paging_stats()
        row.update(state_bytes=s["state_bytes"], moved_each_way=s["last_step"]["bytes_read"],
                   device_pool_bytes=s["device_pool_bytes"], page_bytes=s["page_bytes"])
    del opt, p
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5e8,1e9")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--page-sizes", default="64", help="MB, comma-separated")
    ap.add_argument("--depths", default="2", help="prefetch depths, comma-separated")
    ap.add_argument("--cpu-executor", action="store_true",
                    help="also time executor='cpu' (params/grads to pinned host, SIMD update, params back)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_engine.optim import PagedAdamW, PagedAdamW8bit

    header = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    print(json.dumps(header))
    link = pcie(2 * 2**30)
    print(f"pinned copies: H2D {link['h2d_GBps']:.1f} GB/s, D2H {link['d2h_GBps']:.1f} GB/s, both at once "
          f"{link['both_GBps']:.1f} GB/s", flush=True)
    contenders = {}
    for mb in (float(x) for x in args.page_sizes.split(",")):
        for depth in (int(x) for x in args.depths.split(",")):
            paged = dict(page_size_mb=mb, prefetch_depth=depth)
            contenders[f"ours paged fp32 {mb:g}MB d{depth}"] = \
                lambda ps, paged=paged: PagedAdamW(ps, **paged, **HYPER)
            contenders[f"ours paged 8-bit {mb:g}MB d{depth}"] = \
                lambda ps, paged=paged: PagedAdamW8bit(ps, min_8bit_size=0, **paged, **HYPER)
    if args.cpu_executor:  # the ZeRO-Offload-style path, one option away
        contenders["ours CPU executor fp32 16MB"] = \
            lambda ps: PagedAdamW(ps, executor="cpu", page_size_mb=16, **HYPER)
        contenders["ours CPU executor 8-bit 16MB"] = \
            lambda ps: PagedAdamW8bit(ps, executor="cpu", min_8bit_size=0, page_size_mb=16, **HYPER)
    contenders["torch fused (state on GPU)"] = lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER)
    rows = []
    for size in (int(float(x)) for x in args.sizes.split(",")):
        for name, make in contenders.items():
            row = bench(name, make, size, args.steps)
            if "moved_each_way" in row and "CPU executor" not in name:
                row["bound_s"] = link["bound_s_per_byte"] * row["moved_each_way"]
                row["of_bound"] = row["step_s"] / row["bound_s"]
            rows.append(row)
            extra = (f"  PCIe bound {row['bound_s'] * 1e3:8.1f} ms -> {row['of_bound']:.2f}x the bound; device slots "
                     f"{row['device_pool_bytes'] / 2**20:.0f} MB") if "bound_s" in row else ""
            print(f"{size / 1e9:5.2f}B {name:32s} {row['step_s'] * 1e3:9.1f} ms/step  peak GPU "
                  f"{row['gpu_peak_GB']:6.2f} GB{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "pcie": link, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
