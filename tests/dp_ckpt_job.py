"""One rank of a data-parallel checkpoint job for tests/test_dp_checkpoint.py (run as a script,
one process per rank, with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them;
with no RANK it runs alone, and the test also calls run() in its own process).

Trains a small MLP on a global batch that depends only on the global step (split over the
ranks), optionally after loading a checkpoint, saving one at --save-at; writes the final
params, the optimizer state it held after loading or at the save (per param name, the
element range and the fp32 logical state), and any errors the save probes met to --out."""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import offload_engine
from offload_engine.engine import checkpoint as ckpt

ACCUMULATION = 2


def make_model(hidden: int = 257) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 65),
                               torch.nn.Tanh(), torch.nn.Linear(65, 5))


def make_config(optimizer: str, micro: int, block_size: int = 0, page_size_mb: float = 1 / 32) -> dict:
    params = {"lr": 1e-2, "weight_decay": 0.01, **({"block_size": block_size} if block_size else {})}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": ACCUMULATION,
            "gradient_clipping": 0.5, "optimizer": {"type": optimizer, "params": params},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 8, "warmup_num_steps": 2}},
            "paging": {"page_size_mb": page_size_mb}}


def batch(global_step: int, micro_step: int, size: int):
    g = torch.Generator().manual_seed(1000 + 10 * global_step + micro_step)
    return torch.randn(size, 33, generator=g), torch.randn(size, 5, generator=g)


def held_state(engine) -> dict:
    """{param name: {"range": (start, end), "format", "step", "exp_avg", "exp_avg_sq"}} of this
    rank's optimizer, fp32 (dequantized where quantized)."""
    out = {}
    for q, piece in zip(engine.checkpointer.ordered_params(), engine.checkpointer.slices()):
        state = engine.optimizer.logical_state(q)
        out[piece.name] = {"range": (piece.start, piece.end), "format": engine.optimizer.state[q].get("format"),
                           **{k: v.reshape(-1).clone() for k, v in state.items()}}
    return out


def train_to(engine, steps: int, rank: int, world: int, global_micro: int, on_step=None) -> None:
    micro = global_micro // world
    mine = slice(rank * micro, (rank + 1) * micro)
    while engine.global_steps < steps:
        for m in range(ACCUMULATION):
            x, y = batch(engine.global_steps, m, global_micro)
            engine.backward(torch.nn.functional.mse_loss(engine(x[mine]), y[mine]))
            engine.step()
        if on_step is not None:
            on_step()


def run(args, rank: int = 0, world: int = 1) -> dict:
    if args.global_micro % world:
        raise SystemExit(f"global micro-batch {args.global_micro} does not split over {world} ranks")
    model = make_model(args.hidden)
    config = make_config(args.optimizer, args.global_micro // world, args.block_size, args.page_size_mb)
    engine, optimizer, _, _ = offload_engine.initialize(model, config)
    result = {"rank": rank, "world": world, "errors": {}}
    if args.load:
        path, _ = engine.load_checkpoint(args.load, tag=args.load_tag)
        result["loaded"] = {"path": str(path), "global_steps": engine.global_steps, "lr": engine.get_lr(),
                            "state": held_state(engine)}

    def save():
        if args.pace_s:
            time.sleep(args.pace_s)
        periodic = args.save_every and engine.global_steps % args.save_every == 0
        if engine.global_steps != args.save_at and not periodic:
            return
        if args.probe_tags:  # ranks that disagree on the tag are refused on every rank, before any file
            try:
                engine.save_checkpoint(args.save, tag=f"rank{rank}")
            except ValueError as err:
                result["errors"]["tags"] = str(err)
        result["saved"] = {"path": str(engine.save_checkpoint(args.save)), "state": held_state(engine),
                           "lr": engine.get_lr()}

    train_to(engine, args.steps, rank, world, args.global_micro, on_step=save)
    if args.fail_save:  # the last rank's disk is full mid-save: every rank raises, latest stays
        real = ckpt.write_part

        def full_disk(tmp, name, obj):
            if name.startswith("optimizer") and rank == world - 1:
                raise OSError(28, "No space left on device (injected)")
            return real(tmp, name, obj)

        ckpt.write_part = full_disk
        try:
            engine.save_checkpoint(args.save, tag="doomed")
        except Exception as err:  # noqa: BLE001 - recorded for the test
            result["errors"]["save"] = f"{type(err).__name__}: {err}"
        finally:
            ckpt.write_part = real
    result["global_steps"] = engine.global_steps
    result["lr"] = engine.get_lr()
    result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if hasattr(optimizer, "close"):
        optimizer.close()
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="PagedAdamW")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-micro", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=0)
    ap.add_argument("--page-size-mb", type=float, default=1 / 32)
    ap.add_argument("--hidden", type=int, default=257)
    ap.add_argument("--load")
    ap.add_argument("--load-tag")
    ap.add_argument("--save")
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--save-every", type=int, default=0, help="also save at every multiple of this many steps")
    ap.add_argument("--pace-s", type=float, default=0.0, help="sleep this long after each step (a long job)")
    ap.add_argument("--probe-tags", action="store_true")
    ap.add_argument("--fail-save", action="store_true")
    ap.add_argument("--out")
    return ap


def main() -> None:
    args = parser().parse_args()
    world, rank = 1, 0
    if "RANK" in os.environ:
        from offload_engine.engine import launch_env

        dist.init_process_group("gloo", timeout=launch_env.timeout())  # [Note: collective timeout]
        world, rank = dist.get_world_size(), dist.get_rank()
    result = run(args, rank, world)
    torch.save(result, f"{args.out}.rank{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
