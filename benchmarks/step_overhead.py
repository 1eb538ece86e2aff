"""The fixed cost of a paged step: tiny pages, so the kernels take little of the time and what is
left is the Python and bookkeeping per step and per page (a refactor that adds per-page work
shows here first; at 16 MiB pages it is lost in the update). Anchor: the unpaged optimizer with
the same state format on the same params, in the same run.

    python benchmarks/step_overhead.py                 # 8 tensors of 4096, 16 KiB pages
    python benchmarks/step_overhead.py --json out.json
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
from offload_engine.optim import AdamW8bit, CPUAdam, PagedAdamW, PagedAdamW8bit


def per_step_us(opt, params, rounds: int, steps: int) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(20):  # warm-up: the first step lays the pages out
        opt.step()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times.append((time.perf_counter() - t) / steps * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--numel", type=int, default=4096)
    ap.add_argument("--page-kib", type=float, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"# paged step overhead, {args.tensors} x {args.numel} fp32 params, {args.page_kib:g} KiB pages, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    rows = {}
    for paged_cls, unpaged_cls, kw in [(PagedAdamW, CPUAdam, {}), (PagedAdamW8bit, AdamW8bit, {"min_8bit_size": 0})]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
        paged = paged_cls(params, page_size_mb=args.page_kib / 1024, **kw)
        pages_us = per_step_us(paged, params, args.rounds, args.steps)
        pages = paged.paging_stats()["num_pages"]
        paged.close()
        unpaged_us = per_step_us(unpaged_cls(params, **kw), params, args.rounds, args.steps)
        rows[paged_cls.__name__] = {"paged_s": pages_us / 1e6, "unpaged_s": unpaged_us / 1e6, "pages": pages}
        print(f"{paged_cls.__name__:<16}{pages_us:9.1f} us/step ({pages} pages) | {unpaged_cls.__name__:<10}"
              f"{unpaged_us:9.1f} us/step | paged - unpaged {(pages_us - unpaged_us) / pages:6.1f} us per page")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows,
                                               "package": str(Path(offload_engine.__file__).resolve().parents[1])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
