"""A small, deterministic engine training job for the checkpoint tests: run as a script, it
trains for some steps, optionally after loading a checkpoint and optionally saving one, and
writes the final params and optimizer state to a file for comparison.

    python tests/engine_job.py --config '{...}' --steps 3 --save DIR [--load DIR] --out FILE

The batches depend only on the micro-step index, and the model has dropout, so a resumed run
equals a straight one only if the engine restores the RNG states and counters too.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import offload_engine

IN, HIDDEN, OUT = 24, 300, 5  # 300 * 24 = 7200 elements: over min_8bit_size below, odd block counts


def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(HIDDEN, OUT))


def batch(micro_step: int):
    g = torch.Generator().manual_seed(10_000 + micro_step)
    return torch.randn(3, IN, generator=g), torch.randn(3, OUT, generator=g)


def train(engine, steps: int) -> list:
    """`steps` optimizer steps from wherever the engine is; returns the micro-batch losses."""
    losses = []
    target = engine.global_steps + steps
    while engine.global_steps < target:
        x, y = batch(engine.micro_steps)
        dtype = next(engine.module.parameters()).dtype
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def snapshot(engine) -> dict:
    return {"params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "optimizer": engine.checkpointer.optimizer_state_by_name(), "global_steps": engine.global_steps,
            "lr": engine.get_lr(), "rng": torch.get_rng_state()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="JSON text")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--load")
    ap.add_argument("--save")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    engine, *_ = offload_engine.initialize(make_model(), json.loads(args.config))
    if args.load:
        engine.load_checkpoint(args.load)
    losses = train(engine, args.steps)
    if args.save:
        engine.save_checkpoint(args.save, client_state={"losses": losses})
    if args.out:
        torch.save({**snapshot(engine), "losses": losses}, args.out)
    close = getattr(engine.optimizer, "close", None)
    if close:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
