"""paging.overlap "exact" on a GPU: how much of the paged step backward hides.

A stack of bf16 MLP blocks (d -> 4d -> d) trained through offload_engine.initialize with a
paged optimizer whose state (8-bit or fp32 moments, fp32 masters) rests in pinned host pages.
Each iteration is timed in three parts with CUDA synchronization between them: forward,
backward, and the exposed step (engine.step(): what is left of the optimizer step once
backward has returned). With overlap off the whole paged step is exposed; with overlap on,
pages whose grads are final are paged in, updated and written back while backward continues,
so the exposed step shrinks and backward may stretch by what the copies take from it.
Beside them, the PCIe bound of the paged step (its bytes through pinned copies, measured in
the same run) and torch fused AdamW with its state in GPU memory.

Run:
    python benchmarks/overlap_backward.py                       # d 4096, 8 blocks, 16k tokens
    python benchmarks/overlap_backward.py --blocks 4 --tokens 8192,32768 --json out.json
"""
import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_paging import pcie  # noqa: E402 - the same PCIe probe as the paging benchmark


def model(d: int, blocks: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(d, 4 * d, bias=False), torch.nn.GELU(), torch.nn.Linear(4 * d, d, bias=False)]
    return torch.nn.Sequential(*layers)


def run(args, opt_type: str, overlap, tokens: int) -> dict:
    import offload_engine

    net = model(args.d, args.blocks).cuda()
    if overlap is None:  # the unpaged anchor: torch fused AdamW, bf16 params, state in GPU memory
        net = net.to(torch.bfloat16)
        opt = anchor = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def step():
            anchor.step()
            anchor.zero_grad()
        forward, backward = net, (lambda loss: loss.backward())
        label = "torch fused AdamW (bf16, state on GPU)"
    else:
        cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
               "optimizer": {"type": opt_type, "params": {"lr": 1e-4, "weight_decay": 0.01}},
               "paging": {"store": "cpu", "page_size_mb": args.page_size_mb, "prefetch_depth": args.depth,
                          "overlap": "exact" if overlap else "off"}}
        if opt_type.endswith("8bit"):
            cfg["optimizer"]["params"]["min_8bit_size"] = 0
        engine, opt, *_ = offload_engine.initialize(net, cfg)
        forward, backward, step = engine, engine.backward, engine.step
        label = f"{opt_type}, overlap {'on' if overlap else 'off'}"
    x = torch.randn(tokens, args.d, device="cuda", dtype=torch.bfloat16)
    times = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward(x).float().pow(2).mean()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        backward(loss)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i >= args.warmup:
            for part, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[part].append(seconds)
    row = {"contender": label, "tokens": tokens, "params": sum(p.numel() for p in net.parameters())}
    row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
    row["iter_s"] = row["forward_s"] + row["backward_s"] + row["step_s"]
    if overlap is not None:
        stats = opt.paging_stats()
        row["moved_each_way"] = stats["last_step"]["bytes_read"]
        row["pages"] = stats["num_pages"]
        row["pages_in_backward"] = engine.overlap.pages_in_backward if engine.overlap is not None else 0
        opt.close()
    del net, opt
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--tokens", default="16384", help="tokens per micro-batch, comma-separated")
    ap.add_argument("--optimizers", default="PagedAdamW8bit,PagedAdamW")
    ap.add_argument("--page-size-mb", type=float, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    header = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "d": args.d, "blocks": args.blocks}
    print(json.dumps(header))
    link = pcie(2 * 2**30)
    print(f"pinned copies: H2D {link['h2d_GBps']:.1f} GB/s, D2H {link['d2h_GBps']:.1f} GB/s, both "
          f"{link['both_GBps']:.1f} GB/s", flush=True)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        plan = [(None, None)] + [(o, ov) for o in args.optimizers.split(",") for ov in (False, True)]
        base = {}
        for opt_type, overlap in plan:
            row = run(args, opt_type, overlap, tokens)
            if "moved_each_way" in row:
                row["bound_s"] = link["bound_s_per_byte"] * row["moved_each_way"]
            if overlap is False:
                base[opt_type] = row
            elif overlap:
                off = base[opt_type]
                row["exposed_step_vs_off"] = row["step_s"] / off["step_s"]
                row["iter_vs_off"] = row["iter_s"] / off["iter_s"]
            rows.append(row)
            extra = ""
            if "bound_s" in row:
                extra = f"  paged step bound {row['bound_s'] * 1e3:6.1f} ms; pages in backward {row['pages_in_backward']}"
                extra += f"/{row['pages']}"
            if "iter_vs_off" in row:
                extra += f"  exposed step x{row['exposed_step_vs_off']:.2f}, iteration x{row['iter_vs_off']:.2f} vs off"
            print(f"{tokens:6d} tok {row['contender']:40s} fwd {row['forward_s'] * 1e3:6.1f}  bwd "
                  f"{row['backward_s'] * 1e3:6.1f}  step {row['step_s'] * 1e3:6.1f}  iter {row['iter_s'] * 1e3:6.1f} ms"
                  f"{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "pcie": link, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
