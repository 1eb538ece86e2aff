"""One rank of tests/test_overlap_exact.py's two-rank checks (run as a script per rank, with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them): for each case, the loop of
exact_loop.py with paging.overlap "exact" and then "off" in the same process group, on this
rank's micro-batches; writes their differences, outcomes and counts to --out."""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import offload_engine.optim  # noqa: F401 - before init_process_group ([Note: import torch.distributed.nn early])

sys.path.insert(0, str(Path(__file__).parent))
from exact_loop import DTYPES, config, differences, train  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--cases", required=True, help="comma-separated optimizer:precision:gas:store")
ap.add_argument("--bucket-mb", type=float, default=0.02)
ap.add_argument("--shared-memory", choices=("on", "off"), default="on")
ap.add_argument("--fake-hosts", type=int, default=0,
                help="report the ranks as on this many hosts (contiguous blocks of ranks): the hierarchical exchange")
ap.add_argument("--mutant", choices=("none", "skip-restore", "own-grads"), default="none")
ap.add_argument("--graph", choices=("read", "opaque"), default="read",
                help="opaque: the autograd graph tells nothing (as with reentrant checkpointing)")
ap.add_argument("--dir", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

if args.mutant == "skip-restore":  # everything _restore does but copy the kept bytes back
    from offload_engine.optim import paged_step

    def forgetful_restore(self):
        self.fed.clear()
        self.restored = True
    paged_step._PagedStep._restore = forgetful_restore

if args.mutant == "own-grads":  # owners update their pages on their own grads: the exchange is skipped
    from offload_engine.engine.partition import Partition

    def own_grads(self, params, group):
        wanted = {id(p) for p in params}
        shards = []
        for p, a, b in self.spans(self.rank):
            if id(p) in wanted and p.grad is not None:
                shard = self.shard_of[p]
                shard.grad = p.grad.view(-1)[a:b]
                shards.append(shard)
        return shards
    Partition.reduce_bucket = own_grads

if args.graph == "opaque":  # no param is taken as unreached: unused ones hold their buckets to the end
    from offload_engine.engine import overlap
    overlap.params_reached = lambda loss: None

if args.fake_hosts:
    import os

    from offload_engine.engine import shared_memory as _shm

    _per_host = int(os.environ["WORLD_SIZE"]) // args.fake_hosts
    _shm._host_id = lambda: (f"fake-host-{int(os.environ['RANK']) // _per_host}", "boot")

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
for case in args.cases.split(","):
    opt_type, precision, gas, store = case.split(":")
    runs = {}
    for overlap in ("exact", "off"):
        cfg = config(opt_type, precision, int(gas), store, Path(args.dir) / f"{case}-{overlap}{rank}", overlap)
        cfg["data_parallel"] = {"bucket_mb": args.bucket_mb, "shared_memory": args.shared_memory == "on"}
        runs[overlap] = train(cfg, int(gas), DTYPES[precision], rank=rank, world=world)
    on, off = runs["exact"], runs["off"]
    results[case] = {"differences": differences(on, off), "applied": [a for _, a, _ in off[0]],
                     "outcomes": [o for _, _, o in on[0]], "speculation": on[2]["speculation"],
                     "during": on[3], "params": [p for p in on[0][-1][0]]}
torch.save(results, f"{args.out}.rank{rank}.pt")
dist.destroy_process_group()
