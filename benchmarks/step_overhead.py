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


def overlapped_us(opt, params, rounds: int, steps: int, early: str, retain_bytes: int) -> float:
    """One step as the engine's backward hooks drive it ([Note: overlapped step]): a step opened
    before backward, each param posted when its grad is final (last param first, as backward
    finishes them), then closed (early "kept": settled first, as after the check)."""
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # lays the pages out
    times = []
    for r in range(rounds + 2):  # the first two rounds warm up
        t = time.perf_counter()
        for _ in range(steps):
            run = opt.begin_overlapped_step(1.0, early=early, retain_bytes=retain_bytes)
            for p in reversed(params):
                run.ready([p])
            if early == "kept":
                run.settle(1.0)
            run.close()
        if r >= 2:
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
        # The overlapped step's host work per page (paging.overlap "exact"): pages fed from the
        # hooks one param at a time, with nothing kept ("all": no clipping) and with every page's
        # pre-step bytes kept for a possible restore ("kept": clipping on, the guess held).
        for early in ("all", "kept"):
            paged = paged_cls(params, page_size_mb=args.page_kib / 1024, **kw)
            us = overlapped_us(paged, params, args.rounds, args.steps, early, retain_bytes=1 << 30)
            paged.close()
            rows[paged_cls.__name__][f"overlapped_{early}_s"] = us / 1e6
            print(f"{'':<16}{us:9.1f} us/step overlapped, early={early!r:<7}"
                  f"| over step() {(us - pages_us) / pages:6.1f} us per page, over unpaged "
                  f"{(us - unpaged_us) / pages:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows,
                                               "package": str(Path(offload_engine.__file__).resolve().parents[1])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
