"""One rank for tests/test_precision_auto.py: a data-parallel engine with bf16.enabled "auto",
where the CPU measurement is set per rank (--slow-ranks name the ranks whose bf16 matmul is
slow); writes the precision initialize() chose to --out."""
import argparse
import os

import torch

import offload_engine
from offload_engine.engine import precision

ap = argparse.ArgumentParser()
ap.add_argument("--slow-ranks", default="", help="comma-separated ranks whose measured bf16 slowdown is 4.8x")
ap.add_argument("--out", required=True)
args = ap.parse_args()

rank = int(os.environ["RANK"])
slow = {int(r) for r in args.slow_ranks.split(",") if r}
precision.cpu_bf16_slowdown = lambda: 4.8 if rank in slow else 0.23
engine, *_ = offload_engine.initialize(torch.nn.Linear(8, 4), {
    "train_batch_size": 2, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
torch.save({"precision": engine.precision, "dtype": str(next(engine.module.parameters()).dtype)},
           f"{args.out}.rank{rank}.pt")
torch.distributed.destroy_process_group()
