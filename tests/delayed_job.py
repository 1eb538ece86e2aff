"""One rank of tests/test_overlap_delayed.py's two-rank check (run as a script per rank, with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them): the delayed engine and the
reference loop of delayed_loop.py on this rank's micro-batches, one after the other in the same
process group; writes both runs and their differences to --out."""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import offload_engine.optim  # noqa: F401 - before init_process_group ([Note: import torch.distributed.nn early])

sys.path.insert(0, str(Path(__file__).parent))
from delayed_loop import config, differences, train  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--optimizer", default="PagedAdamW")
ap.add_argument("--store", default="cpu")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--shared-memory", choices=("on", "off"), default="on")
ap.add_argument("--dir", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
runs = {}
for name, overlap in (("got", "delayed"), ("want", "off")):
    cfg = config(args.optimizer, "bf16", 1, args.store, Path(args.dir) / f"{name}{rank}", overlap, 2)
    cfg["data_parallel"] = {"shared_memory": args.shared_memory == "on"}
    runs[name] = train(cfg, args.steps, 1, torch.bfloat16, reference=name == "want", warmup=2, rank=rank)
torch.save({"differences": differences(runs["got"], runs["want"]), "got": runs["got"],
            "delayed": runs["got"]["delayed"]}, f"{args.out}.rank{rank}.pt")
dist.destroy_process_group()
