"""Runs a test job as separate ranks on this machine, as torchrun starts them (one process per
rank, gloo on 127.0.0.1), and collects each rank's result file (`{out}.rank{r}.pt`)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(job: Path, world: int, out: Path, *args, python_args=(), rank_env: bool = True) -> list[dict]:
    """`job --out out *args` at `world` ranks; `rank_env=False` leaves RANK/WORLD_SIZE/LOCAL_RANK
    unset (a job started without a launcher). Fails with the rank's stderr if one exits non-zero."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for rank in range(world):
        env = dict(base)
        if rank_env:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, *python_args, str(job), "--out", str(out), *map(str, args)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(world)]
