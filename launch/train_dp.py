"""A tiny data-parallel training job through offload_engine.initialize: the same script runs
alone and under every launcher (docs/launch.md):

    python launch/train_dp.py                                   # one process
    torchrun --nproc_per_node 2 launch/train_dp.py
    deepspeed --num_gpus 2 launch/train_dp.py                   # also on a CPU-only machine
    mpiexec -n 2 python launch/train_dp.py                      # mpirun too

The script never calls init_process_group: initialize() reads the launcher's environment and
starts it (offload_engine/engine/launch_env.py). Each rank trains on its share of a seeded global
batch, so any world size that divides --global-batch trains the same model (up to the order of
the grad all-reduce's sums). At the end each rank prints one line,
``RESULT {"rank": ..., "world": ..., "final_loss": ...}``: the loss of the trained model on a
fixed held-out batch, which every rank computes on its own copy of the params.
"""
import argparse
import json
import os
import socket
import sys
import time

import torch

import offload_engine
from offload_engine.engine import launch_env


def _say(line: str) -> None:
    """One write per line: the ranks share the launcher's stdout, and a short write is atomic
    (print() may write the text and its newline separately, and lines then interleave)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps")
    ap.add_argument("--global-batch", type=int, default=8, help="samples per micro-step over all ranks")
    ap.add_argument("--optimizer", default="PagedAdamW", help="the config's optimizer.type")
    ap.add_argument("--nvme-path", default=None, help="page the state to a file under this directory")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait after each step (tests)")
    # The deepspeed launcher appends --local_rank=N; script_args() drops it (launch_env reads it).
    args = ap.parse_args(launch_env.script_args())
    launched = launch_env.detect()  # before initialize(), which fills RANK, ... for torch from it

    torch.manual_seed(0)  # the same initial model on every rank
    # 10,756 params: enough that each of 2 ranks owns a share (partition boundaries fall on
    # multiples of 4096 elements, engine/partition.py).
    model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4))
    paging = {"page_size_mb": 1 / 64}
    if args.nvme_path:
        paging.update(store="nvme", nvme_path=args.nvme_path)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": args.optimizer, "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "paging": paging}
    engine, _, _, _ = offload_engine.initialize(model, config)

    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} ranks")
    mine = slice(rank * args.global_batch // world, (rank + 1) * args.global_batch // world)

    data = torch.Generator().manual_seed(1)  # the same global batches on every rank
    for step in range(1, args.steps + 1):
        x = torch.randn(args.global_batch, 16, generator=data)
        y = torch.randn(args.global_batch, 4, generator=data)
        loss = torch.nn.functional.mse_loss(engine(x[mine]), y[mine])
        engine.backward(loss)
        engine.step()
        _say(f"rank {rank}: step {step} loss {loss.item():.6f}")
        if args.step_sleep:
            time.sleep(args.step_sleep)

    held_out = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 16, generator=held_out), torch.randn(64, 4, generator=held_out)
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(engine(x), y).item()
    result = {"rank": rank, "world": world, "local_rank": launched.local_rank, "launcher": launched.launcher,
              "pid": os.getpid(), "host": socket.gethostname(), "final_loss": final,
              "transport": engine.partition.transport if engine.partition is not None else None}
    _say("RESULT " + json.dumps(result))
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
