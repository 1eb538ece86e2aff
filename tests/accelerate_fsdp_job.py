"""A rank of tests/test_accelerate_fsdp.py: accelerate with FSDP2 on CPU over gloo, the optimizer
built on the plain model's params before ``Accelerator.prepare(model, optimizer)`` swaps them for
DTensor shards (accelerate rewrites the optimizer's param_groups to the new params).

Every rank trains on the same full batch, which depends only on the step, so FSDP's average of
equal grads is the grad itself and runs at any world size see the same grads. Each rank writes
{optimizer name: [the full params after each step]} to ``<out>.rank<r>.pt``."""
from __future__ import annotations

import argparse
import os

import torch

STEPS = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # odd sizes (a shard boundary inside a row) and one param under min_8bit_size
    return torch.nn.Sequential(torch.nn.Linear(37, 129), torch.nn.GELU(), torch.nn.Linear(129, 11))


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 37, generator=g), torch.randn(16, 11, generator=g)


def _optimizer(name: str, params):
    from offload_engine import optim
    if name == "torch.AdamW":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, foreach=False)
    if name == "PagedAdamW":
        return optim.PagedAdamW(params, lr=3e-3, weight_decay=0.01, page_size_mb=0.01)
    if name == "PagedAdamW8bit":
        return optim.PagedAdamW8bit(params, lr=3e-3, weight_decay=0.01, page_size_mb=0.01, min_8bit_size=1024)
    if name == "AdamW8bit":
        return optim.AdamW8bit(params, lr=3e-3, weight_decay=0.01, min_8bit_size=1024)
    raise ValueError(name)


def _full(param) -> torch.Tensor:
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--names", nargs="+", required=True)
    args = parser.parse_args()
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    results = {}
    accelerator = None
    for name in args.names:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                cpu_ram_efficient_loading=False)
        accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
        model = _model()
        opt = _optimizer(name, model.parameters())  # built before prepare, as users do
        model, opt = accelerator.prepare(model, opt)
        trajectory = []
        for step in range(STEPS):
            x, y = _batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            trajectory.append([_full(p) for p in model.parameters()])
        results[name] = trajectory
        inner = getattr(opt, "optimizer", opt)
        if hasattr(inner, "close"):
            inner.close()
        accelerator.free_memory()
    torch.save(results, f"{args.out}.rank{int(os.environ['RANK'])}.pt")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
