"""Paged Adam on a GPU: step time against the PCIe bound measured in the same run, beside the
anchors that keep optimizer state off the GPU.

Ours (offload_engine.optim, CUDA params):
  paged fp32 / 8-bit   state in pinned host pages, copied page by page into device slots and
                       back (paging/cuda_pipeline.py: CudaPagePipeline)
  nvme fp32 / 8-bit    state in an NVMe file, read by IO threads into pinned staging, then as
                       above (NvmePagePipeline)
  managed fp32 / 8-bit state in CUDA managed memory, prefetched to the GPU ahead of each page's
                       update and back after it (ManagedPagePipeline)
  CPU executor         ZeRO-Offload style: grads to pinned host, SIMD update, params back
Anchors:
  torch fused AdamW              state resident in GPU memory (the unpaged step)
  bitsandbytes PagedAdamW8bit / PagedAdamW (32-bit)   state in managed memory, prefetched by the
                                 driver; it stays on the GPU while there is room
  torchao CPUOffloadOptimizer    torch AdamW (fused CPU) on host copies; grads leave the GPU in
                                 backward hooks, params come back after the step

Each timed iteration is a backward (of sum(p * w), so grad = w, which also fires the hooks
torchao needs) and a step; the table gives the step alone and the whole iteration, since
torchao moves grads during backward. The bound is the time to copy the state host-to-device
and device-to-host once each through pinned memory (the faster of one after the other or
both at once), measured here with 64 MB copies. "GPU resident" is the growth of the device's
used memory (cudaMemGetInfo) over the optimizer's life, which, unlike torch's peak counter,
sees managed memory the driver keeps on the GPU.

Managed memory is never requested beyond the GPU's free memory: contenders whose managed state
would not fit (bitsandbytes does not check) are skipped with the numbers.

Run:
    python benchmarks/gpu_paging.py                                     # 0.5B and 2B params
    python benchmarks/gpu_paging.py --sizes 5e8 --contenders ours8,nvme8,managed8,bnb8,torchao
    python benchmarks/gpu_paging.py --sizes 5e8,2e9,8e9 --nvme-dir /tmp/state --json out.json
    python benchmarks/gpu_paging.py --sizes 16e9 --param-dtype bf16 --contenders ours8,torchao  # host RAM bound
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
ALL = ("ours32", "ours8", "nvme32", "nvme8", "managed32", "managed8", "cpu32", "cpu8", "torch", "bnb8", "bnb32",
       "torchao")
DEFAULT = ("torch", "ours32", "ours8", "nvme8", "managed32", "managed8", "bnb8", "bnb32", "torchao")


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


def disk(directory: str, nbytes: int = 2**30, page_mb: float = 16, io_threads: int = 4) -> dict:
    """The NVMe store's own write and read bandwidth on `directory` (pages through its IO
    threads, direct IO when the filesystem takes it, into 4 KiB aligned pinned slots)."""
    from offload_engine.paging import NvmeStore, SlotPool, page_bytes_from_mb

    page = page_bytes_from_mb(page_mb)
    pages = max(1, nbytes // page)
    store = NvmeStore(page, directory, io_threads=io_threads)
    pool = SlotPool(2 * io_threads, page, pin_memory=torch.cuda.is_available())
    for slot in pool.slots:
        slot.random_(0, 255)
    store.allocate(pages)

    def timed(*ops):
        t = time.perf_counter()
        futures = [op(k, pool.slots[(k % io_threads) + i * io_threads]) for k in range(pages)
                   for i, op in enumerate(ops)]
        for f in futures:
            f.result()
        return time.perf_counter() - t

    t_write = timed(store.write)
    store.commit(range(pages))
    t_read = timed(store.read)
    t_both = timed(store.read, store.write)  # what a step does: reads one place, writes the other
    moved = pages * page
    out = {"write_GBps": moved / t_write / 1e9, "read_GBps": moved / t_read / 1e9, "both_GBps": 2 * moved / t_both / 1e9,
           "direct_io": store.direct, "bound_s_per_byte": min(t_write + t_read, t_both) / moved}
    store.close()
    return out


def managed_bytes(name: str, numel: int) -> int:
    """Managed memory a contender asks for (0 for those that use none)."""
    if name in ("bnb32", "managed32"):
        return 8 * numel
    if name in ("bnb8", "managed8"):
        return 2 * numel + 2 * 4 * (numel // 256 + 1)
    return 0


def make_contenders(args, nvme_dir):
    from offload_engine.optim import PagedAdamW, PagedAdamW8bit

    page = dict(page_size_mb=args.page_size_mb, prefetch_depth=args.depth)
    found = {
        "ours32": ("ours paged fp32 (pinned host)", lambda ps: PagedAdamW(ps, **page, **HYPER)),
        "ours8": ("ours paged 8-bit (pinned host)", lambda ps: PagedAdamW8bit(ps, min_8bit_size=0, **page, **HYPER)),
        "nvme32": ("ours NVMe fp32", lambda ps: PagedAdamW(ps, store="nvme", nvme_path=nvme_dir, **page, **HYPER)),
        "nvme8": ("ours NVMe 8-bit", lambda ps: PagedAdamW8bit(ps, store="nvme", nvme_path=nvme_dir,
                                                               min_8bit_size=0, **page, **HYPER)),
        "managed32": ("ours managed fp32", lambda ps: PagedAdamW(ps, store="managed", **page, **HYPER)),
        "managed8": ("ours managed 8-bit", lambda ps: PagedAdamW8bit(ps, store="managed", min_8bit_size=0, **page,
                                                                     **HYPER)),
        "cpu32": ("ours CPU executor fp32", lambda ps: PagedAdamW(ps, executor="cpu", **page, **HYPER)),
        "cpu8": ("ours CPU executor 8-bit", lambda ps: PagedAdamW8bit(ps, executor="cpu", min_8bit_size=0, **page,
                                                                      **HYPER)),
        "torch": ("torch fused AdamW (state on GPU)", lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER)),
    }
    try:
        import bitsandbytes as bnb
        found["bnb8"] = ("bitsandbytes PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, **HYPER))
        found["bnb32"] = ("bitsandbytes PagedAdamW (32-bit)", lambda ps: bnb.optim.PagedAdamW(ps, **HYPER))
    except Exception as e:  # noqa: BLE001 - an anchor that does not import is reported, not fatal
        print(f"> skipping bitsandbytes: {type(e).__name__}: {e}")
    try:
        from torchao.optim import CPUOffloadOptimizer
        found["torchao"] = ("torchao CPUOffloadOptimizer (AdamW)",
                            lambda ps: CPUOffloadOptimizer(ps, torch.optim.AdamW, fused=True, **HYPER))
    except Exception as e:  # noqa: BLE001
        print(f"> skipping torchao: {type(e).__name__}: {e}")
    return found


def bench(key, name, make, numel, steps, warmup, dtype=torch.float32):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # Drawn in the param dtype and scaled in place: at the largest sizes an fp32 draw and its
    # scaled copy alone would not fit beside the bf16 tensors.
    p = torch.nn.Parameter(torch.randn(numel, device=dev, dtype=dtype).mul_(0.1))
    w = torch.randn(numel, device=dev, dtype=dtype).mul_(0.01)  # the grad each backward produces
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    need = managed_bytes(key, numel)
    if need > free_before:  # never ask for managed memory the GPU does not have free
        del p, w
        torch.cuda.empty_cache()
        return {"contender": name, "params": numel, "skipped": f"managed state {need / 1e9:.1f} GB > "
                f"{free_before / 1e9:.1f} GB free on the GPU"}
    torch.cuda.reset_peak_memory_stats()
    try:
        opt = make([p])
        step_times, iter_times = [], []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            p.grad = None
            (p * w).sum().backward()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= warmup:
                step_times.append(t2 - t1)
                iter_times.append(t2 - t0)
        resident = free_before - torch.cuda.mem_get_info()[0]
    except torch.cuda.OutOfMemoryError as e:
        row = {"contender": name, "params": numel, "skipped": f"out of GPU memory: {str(e).splitlines()[0]}"}
        opt = None
        empty_caches()
        return row
    row = {"contender": name, "params": numel, "step_s": statistics.median(step_times), "step_s_min": min(step_times),
           "iter_s": statistics.median(iter_times), "gpu_peak_GB": torch.cuda.max_memory_allocated() / 1e9,
           "gpu_resident_GB": resident / 1e9}
    if hasattr(opt, "paging_stats"):
        s = opt.paging_stats()
        row.update(state_bytes=s["state_bytes"], moved_each_way=s["last_step"]["bytes_read"],
                   device_pool_bytes=s["device_pool_bytes"], page_bytes=s["page_bytes"], store=s["store"],
                   direct_io=s["direct_io"], executor=s["executor"], wait_s=s["last_step"]["wait_s"])
        opt.close()
    del opt, p, w
    empty_caches()
    return row


def empty_caches():
    """Frees cached device memory and cached pinned host memory (torch keeps pinned blocks for
    reuse; at the largest sizes one contender's would leave no room for the next one's). The
    collection first: an optimizer whose grad hooks its params hold lives in a reference cycle."""
    gc.collect()
    torch.cuda.empty_cache()
    host_empty_cache = getattr(torch._C, "_host_emptyCache", None)
    if host_empty_cache is not None:
        host_empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5e8,2e9")
    ap.add_argument("--contenders", default=",".join(DEFAULT), help=f"comma-separated, from {','.join(ALL)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--nvme-steps", type=int, default=2, help="timed steps for the NVMe contenders (slow disks)")
    ap.add_argument("--page-size-mb", type=float, default=16)
    ap.add_argument("--depth", type=int, default=2, help="prefetch depth")
    ap.add_argument("--nvme-dir", default=None, help="directory for the NVMe state files (default: a temp dir)")
    ap.add_argument("--param-dtype", default="fp32", choices=("fp32", "bf16"),
                    help="params and grads (bf16 halves their GPU memory: the largest sizes need it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(ALL))
    if unknown:
        ap.error(f"--contenders: unknown {unknown}; choose from {', '.join(ALL)}")
    nvme_dir = args.nvme_dir or tempfile.mkdtemp(prefix="gpu_paging_")
    os.makedirs(nvme_dir, exist_ok=True)

    header = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "page_size_mb": args.page_size_mb, "prefetch_depth": args.depth,
              "param_dtype": args.param_dtype}
    print(json.dumps(header))
    link = pcie(2 * 2**30)
    print(f"pinned copies: H2D {link['h2d_GBps']:.1f} GB/s, D2H {link['d2h_GBps']:.1f} GB/s, both at once "
          f"{link['both_GBps']:.1f} GB/s", flush=True)
    nvme_link = None
    if any(c.startswith("nvme") for c in wanted):
        nvme_link = disk(nvme_dir)
        print(f"NVMe store on {nvme_dir}: write {nvme_link['write_GBps']:.2f} GB/s, read {nvme_link['read_GBps']:.2f} "
              f"GB/s, both at once {nvme_link['both_GBps']:.2f} GB/s (direct IO: {nvme_link['direct_io']})", flush=True)
    contenders = make_contenders(args, nvme_dir)
    rows = []
    for size in (int(float(x)) for x in args.sizes.split(",")):
        torch_row = None
        for key in wanted:
            if key not in contenders:
                continue
            name, make = contenders[key]
            steps = args.nvme_steps if key.startswith("nvme") else args.steps
            warmup = 1 if key.startswith("nvme") else args.warmup
            row = bench(key, name, make, size, steps, warmup,
                        torch.bfloat16 if args.param_dtype == "bf16" else torch.float32)
            rows.append(row)
            if "skipped" in row:
                print(f"{size / 1e9:5.2f}B {name:40s} skipped: {row['skipped']}", flush=True)
                continue
            if key == "torch":
                torch_row = row
            if "moved_each_way" in row and row.get("executor") == "cuda":
                row["bound_s"] = link["bound_s_per_byte"] * row["moved_each_way"]
                row["of_bound"] = row["step_s"] / row["bound_s"]
                if key.startswith("nvme"):  # the disk, not the PCIe link, bounds it: read and write once each
                    row["disk_bound_s"] = nvme_link["bound_s_per_byte"] * row["moved_each_way"]
                    row["of_disk_bound"] = row["step_s"] / row["disk_bound_s"]
            if torch_row is not None:
                row["vs_torch"] = row["step_s"] / torch_row["step_s"]
            extra = f"  {row['of_bound']:.2f}x PCIe bound" if "of_bound" in row else ""
            if "of_disk_bound" in row:
                extra += f", {row['of_disk_bound']:.2f}x disk bound"
            print(f"{size / 1e9:5.2f}B {name:40s} step {row['step_s'] * 1e3:8.1f} ms  iter {row['iter_s'] * 1e3:8.1f} ms"
                  f"  peak {row['gpu_peak_GB']:6.2f} GB  resident {row['gpu_resident_GB']:6.2f} GB{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "pcie": link, "nvme": nvme_link, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
