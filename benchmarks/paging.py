"""Paged-optimizer step throughput against the disk bound, measured in the same run.

For each state format (fp32, int8), the host store (updated in place) and the NVMe store at
each page size and prefetch depth: the median step time of PagedAdamW / PagedAdamW8bit on one
flat fp32 parameter, the bytes moved, and the fraction of the disk bound reached. The disk
bound is measured here, with direct IO, the same page size and 4 requests in flight: the time
to read and write the state once each (the faster of reading and writing one after the other
or both at once). The unpaged optimizer (CPUAdam / AdamW8bit) runs beside as the compute
reference. With --deepspeed, benchmarks/deepspeed_zero3_nvme.py runs DeepSpeed ZeRO-3 with
NVMe optimizer offload on its model and prints its figures beside ours.

Run:
    python benchmarks/paging.py                                  # 100M params, 1/4/16/64 MB, depth 1/2/4
    python benchmarks/paging.py --params 2e7 --page-sizes 4,16 --depths 2 --json out.json
    python benchmarks/paging.py --deepspeed
"""
import argparse
import concurrent.futures
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the disk bound -----------------------------------------------------------------------
def _aligned(nbytes: int):
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % 4096
    buf = raw[skip:skip + nbytes]
    buf.random_(0, 255)  # real bytes, not zeros
    return raw, memoryview((ctypes.c_ubyte * nbytes).from_address(buf.data_ptr())).cast("B")


def disk_bound(directory: str, total_bytes: int, page_bytes: int, in_flight: int = 4) -> dict:
    """Direct-IO bandwidth over a file of `total_bytes` in `page_bytes` requests: read all,
    write all, and both at once (reads of one half while writing the other)."""
    path = os.path.join(directory, f"disk_bound_{os.getpid()}.bin")
    pages = max(1, total_bytes // page_bytes)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    bufs = [_aligned(page_bytes) for _ in range(2 * in_flight)]
    try:
        os.posix_fallocate(fd, 0, 2 * pages * page_bytes)
        pool = concurrent.futures.ThreadPoolExecutor(in_flight)

        def run(ops):
            t = time.perf_counter()
            futures = [pool.submit(fn, fd, [bufs[i % len(bufs)][1]], off) for i, (fn, off) in enumerate(ops)]
            for f in futures:
                f.result()
            return time.perf_counter() - t

        run([(os.pwritev, (2 * i) * page_bytes) for i in range(pages)])  # lay the data down first
        run([(os.pwritev, (2 * i + 1) * page_bytes) for i in range(pages)])
        write_s = run([(os.pwritev, (2 * i + 1) * page_bytes) for i in range(pages)])
        read_s = run([(os.preadv, (2 * i) * page_bytes) for i in range(pages)])
        both = [op for i in range(pages) for op in ((os.preadv, 2 * i * page_bytes), (os.pwritev, (2 * i + 1) * page_bytes))]
        both_s = run(both)
        pool.shutdown()
    finally:
        os.close(fd)
        os.unlink(path)
    nbytes = pages * page_bytes
    return {"read_GBps": nbytes / read_s / 1e9, "write_GBps": nbytes / write_s / 1e9,
            "rw_GBps": 2 * nbytes / both_s / 1e9, "bound_s_per_byte_pair": min(read_s + write_s, both_s) / nbytes}


# ---- the optimizers -----------------------------------------------------------------------
def make_optimizer(fmt: str, store: str, page_mb, depth, nvme_path, params):
    from offload_engine.optim import AdamW8bit, CPUAdam, PagedAdamW, PagedAdamW8bit
    if store == "unpaged":
        return CPUAdam(params, **HYPER) if fmt == "fp32" else AdamW8bit(params, min_8bit_size=0, **HYPER)
    cls = PagedAdamW if fmt == "fp32" else PagedAdamW8bit
    extra = {} if fmt == "fp32" else {"min_8bit_size": 0}
    return cls(params, store=store, nvme_path=nvme_path if store == "nvme" else None, page_size_mb=page_mb,
               prefetch_depth=depth, **HYPER, **extra)


def bench(fmt, store, page_mb, depth, nvme_path, numel, steps, warmup=2):
    torch.manual_seed(0)
    p = torch.randn(numel) * 0.1
    p.grad = torch.randn(numel) * 0.01
    opt = make_optimizer(fmt, store, page_mb, depth, nvme_path, [p])
    for _ in range(warmup):  # the first lays out and writes the initial state; first touches are slow here
        opt.step()
    times, last = [], {}
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
        if hasattr(opt, "paging_stats"):
            last = opt.paging_stats()
    row = {"format": fmt, "store": store, "page_mb": page_mb, "depth": depth, "step_s": statistics.median(times),
           "step_s_min": min(times), "step_s_max": max(times)}
    if last:
        s = last["last_step"]
        row.update(bytes_moved=s["bytes_read"] + s["bytes_written"], wait_s=s["wait_s"], update_s=s["update_s"],
                   fetch_s=s["fetch_s"], writeback_s=s["writeback_s"], state_bytes=last["state_bytes"],
                   store_bytes=last["store_bytes"], pool_bytes=last["pool_bytes"], direct_io=last["direct_io"])
        opt.close()
    del opt, p
    return row


def bench_in_place(fmt, page_mb, numel, rounds, warmup=3):
    """The host store (updated in place) against the unpaged optimizer, steps interleaved
    round by round (this VM's memory speed drifts), with the median per-round ratio."""
    torch.manual_seed(0)
    opts, params = [], []
    for store in ("unpaged", "cpu"):
        p = torch.randn(numel) * 0.1
        p.grad = torch.randn(numel) * 0.01
        params.append(p)
        opts.append(make_optimizer(fmt, store, page_mb, 1, None, [p]))
    for _ in range(warmup):
        for opt in opts:
            opt.step()
    times = [[], []]
    for _ in range(rounds):
        for i, opt in enumerate(opts):
            t = time.perf_counter()
            opt.step()
            times[i].append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(*times))
    return {"format": fmt, "store": "cpu", "page_mb": page_mb, "depth": None, "step_s": statistics.median(times[1]),
            "unpaged_s": statistics.median(times[0]), "ratio": ratio}


def machine_header() -> dict:
    import psutil
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "ram_GiB": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e8)
    ap.add_argument("--page-sizes", default="1,4,16,64", help="MB, comma-separated")
    ap.add_argument("--depths", default="1,2,4")
    ap.add_argument("--formats", default="fp32,int8")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--nvme-path", default=None, help="directory for the state files (default: a temp dir)")
    ap.add_argument("--deepspeed", action="store_true", help="also run benchmarks/deepspeed_zero3_nvme.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    numel = int(args.params)
    page_sizes = [float(x) for x in args.page_sizes.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    formats = args.formats.split(",")
    nvme_dir = args.nvme_path or tempfile.mkdtemp(prefix="oe_paging_bench_")
    header = machine_header()
    print(json.dumps(header))
    print(f"{numel / 1e6:.0f}M fp32 params; state files in {nvme_dir}")

    rows = []
    for fmt in formats:
        pair = bench_in_place(fmt, page_sizes[-1], numel, args.steps)
        rows.append(pair)
        print(f"{fmt:5s} unpaged {pair['unpaged_s'] * 1e3:9.1f} ms/step | host store, in place "
              f"({pair['page_mb']:g} MB pages) {pair['step_s'] * 1e3:9.1f} ms/step | paired ratio host/unpaged "
              f"{pair['ratio']:.2f}", flush=True)
        for page_mb in page_sizes:
            for depth in depths:
                # The virtual disk's speed drifts between runs, so the bound is measured right
                # before and right after each configuration, and the faster one is used.
                page_bytes = int(page_mb * 2**20)
                state_guess = numel * (8 if fmt == "fp32" else 2)
                before = disk_bound(nvme_dir, max(state_guess, page_bytes), page_bytes)
                row = bench(fmt, "nvme", page_mb, depth, nvme_dir, numel, args.steps)
                after = disk_bound(nvme_dir, max(state_guess, page_bytes), page_bytes)
                b = min(before, after, key=lambda d: d["bound_s_per_byte_pair"])
                row["disk"] = b
                row["bound_s"] = b["bound_s_per_byte_pair"] * row["bytes_moved"] / 2
                row["of_bound"] = row["bound_s"] / row["step_s"]
                rows.append(row)
                print(f"{fmt:5s} {'nvme':8s} {page_mb:5g}MB d={depth} {row['step_s'] * 1e3:9.1f} ms/step  "
                      f"{row['bytes_moved'] / row['step_s'] / 1e9:5.2f} GB/s moved  bound {row['bound_s'] * 1e3:7.1f} ms"
                      f"  -> {100 * row['of_bound']:5.1f}% of disk bound  (wait {row['wait_s'] * 1e3:.0f} ms, "
                      f"update {row['update_s'] * 1e3:.0f} ms; disk r {b['read_GBps']:.2f} w {b['write_GBps']:.2f} "
                      f"r+w {b['rw_GBps']:.2f} GB/s)", flush=True)
    ds = None
    if args.deepspeed:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "deepspeed_zero3_nvme.py")], capture_output=True,
                              text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        ds = json.loads(lines[-1]) if lines else {"skipped": f"no result (exit {proc.returncode}): {proc.stderr[-500:]}"}
        print("deepspeed_zero3_nvme:", json.dumps(ds))
    best = {}
    for r in rows:
        if r["store"] == "nvme":
            best[r["format"]] = max(best.get(r["format"], 0.0), r["of_bound"])
    for fmt, frac in best.items():
        print(f"best {fmt} NVMe step: {100 * frac:.1f}% of the disk bound")
    if args.json:
        with open(args.json, "w") as f:
            import offload_engine  # which tree ran (benchmarks/paired_commits.py checks it)
            json.dump({"machine": header, "params": numel, "rows": rows, "deepspeed": ds,
                       "package": os.path.dirname(os.path.dirname(offload_engine.__file__))}, f, indent=1)


if __name__ == "__main__":
    main()
