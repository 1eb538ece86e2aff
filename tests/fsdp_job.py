"""The ranks of the FSDP jobs for tests/test_fsdp.py (run as a script, one process per rank,
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them).

Every rank trains on the same full batch, which depends only on the step: FSDP's gradient
average of equal grads is the grad itself, so a run at any world size, or without FSDP,
sees the same grads bit for bit and any difference comes from the optimizer.

``--mode fsdp`` (2 ranks): FSDP2 and FSDP1 (use_orig_params both ways) models trained with
torch's AdamW, PagedAdamW and PagedAdamW8bit, the paged ones (and torch's under FSDP2) saved
with torch.distributed.checkpoint at step SAVE_AT and then loaded into fresh models and
optimizers (also torch's state into ours and the reverse) that continue to STEPS.
``--mode resume`` (1 rank): the FSDP2 checkpoints loaded at world 1, into FSDP2 and (fp32
state) into a plain model, and plain single-process runs to compare with. ``--mode cuda`` (1
rank, NCCL, one GPU): FSDP2 and FSDP1 models on the GPU, whose optimizers page the shards'
state through device slots (paging/cuda_pipeline.py), saved and resumed the same way, beside
the plain GPU runs.
Each rank writes {run name: {"params": [full params after each step], "formats", "state",
...}} to ``<out>.rank<r>.pt``."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard

from offload_engine.optim import PagedAdamW, PagedAdamW8bit, record_full_sizes

STEPS, SAVE_AT = 6, 3
DEVICE = torch.device("cpu")  # the models' device: cuda in --mode cuda
FULL = StateDictOptions(full_state_dict=True)


WIDTHS = {
    # Odd sizes: the weights' rows split unevenly over 2 ranks, the last layer (1 row) leaves
    # rank 1 empty shards; 53->97 (5141 elements) is 8-bit, though each of its shards is below
    # min_8bit_size (4096), and its shards do not start on a quantization block.
    "odd": (37, 53, 97, 24, 1),
    # 53->512 and 512->12 are 8-bit with every shard a whole number of 256-element blocks (and
    # 512->12's shards below 4096), so 8-bit state under FSDP2 is the unsharded one exactly.
    "aligned": (37, 53, 512, 12, 1),
}


def make_model(seed: int = 0, widths: str = "odd") -> torch.nn.Module:
    torch.manual_seed(seed)
    sizes = WIDTHS[widths]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(DEVICE)


OPTIMIZERS = {
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
    "PagedAdamW": lambda params: PagedAdamW(params, lr=1e-2, weight_decay=1e-2, page_size_mb=1 / 64),
    "PagedAdamW8bit": lambda params: PagedAdamW8bit(params, lr=1e-2, weight_decay=1e-2, page_size_mb=1 / 64),
}


def fsdp2(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def fsdp1(use_orig_params: bool):
    return lambda model: FSDP(model, use_orig_params=use_orig_params, device_id=DEVICE)


def plain(model):
    return model


def build(wrap, name: str, seed: int = 0, widths: str = "odd"):
    model = wrap(make_model(seed, widths))
    if name == "PagedAdamW8bit" and wrap not in (fsdp2, plain):
        record_full_sizes(model)  # FSDP1 original params show only their flattened piece
    return model, OPTIMIZERS[name](model.parameters())


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 37, generator=g).to(DEVICE), torch.randn(16, 1, generator=g).to(DEVICE)


def full_params(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in get_model_state_dict(model, options=FULL).items()}


def full_state(model, opt) -> dict:
    """The optimizer state per param name, gathered whole (a collective)."""
    _, osd = get_state_dict(model, opt, options=FULL)
    return {name: {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            for name, state in osd["state"].items()}


def formats(model, opt) -> dict:
    return {name: opt.state[p].get("format") for name, p in model.named_parameters() if p in opt.state}


def train(model, opt, first: int, last: int, ckpt: str | None = None, record: dict | None = None) -> list:
    params = []
    for step in range(first, last + 1):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        params.append(full_params(model))
        if ckpt is not None and step == SAVE_AT:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
            record["saved_state"] = full_state(model, opt)
    return params


def resume(wrap, name: str, ckpt: str, other_class: bool = False, widths: str = "odd") -> dict:
    """A fresh model (other init) and optimizer (no state yet) loaded from `ckpt`, continued."""
    model, opt = build(wrap, name, seed=1, widths=widths)
    msd, osd = get_state_dict(model, opt)  # creates the optimizer's state: the tensors DCP loads into
    # FSDP1's sharded state dicts leave out the params of which a rank holds no element (the
    # last layer, on rank 1), model and optimizer alike; DCP's default load refuses that. The
    # param groups of another optimizer class have other keys: the loading optimizer's stay.
    partial = isinstance(model, FSDP) or other_class
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt, planner=DefaultLoadPlanner(allow_partial_load=partial))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    out = {"loaded_state": full_state(model, opt), "formats": formats(model, opt)}
    out["params"] = train(model, opt, SAVE_AT + 1, STEPS)
    return out


def run_fsdp(ckpt_dir: str) -> dict:
    results = {}
    for label, wrap in (("fsdp2", fsdp2), ("fsdp1", fsdp1(False)), ("fsdp1-orig", fsdp1(True))):
        for name in OPTIMIZERS:
            model, opt = build(wrap, name)
            run = results[f"{label}/{name}"] = {}
            ckpt = None if name == "AdamW" and label != "fsdp2" else os.path.join(ckpt_dir, f"{label}-{name}")
            run["params"] = train(model, opt, 1, STEPS, ckpt, run)
            run["formats"], run["state"] = formats(model, opt), full_state(model, opt)
            if ckpt is None:
                continue
            if name != "AdamW":
                results[f"{label}/{name}/resumed"] = resume(wrap, name, ckpt)
                if label == "fsdp2" and name == "PagedAdamW":  # ours, loaded into torch's AdamW
                    results[f"{label}/{name}->AdamW/resumed"] = resume(wrap, "AdamW", ckpt, other_class=True)
            else:  # torch's AdamW state, loaded into ours
                for into in ("PagedAdamW", "PagedAdamW8bit"):
                    results[f"{label}/AdamW->{into}/resumed"] = resume(wrap, into, ckpt, other_class=True)
    model, opt = build(fsdp2, "PagedAdamW8bit", widths="aligned")
    run = results["fsdp2-aligned/PagedAdamW8bit"] = {}
    run["params"] = train(model, opt, 1, STEPS, os.path.join(ckpt_dir, "fsdp2-aligned-PagedAdamW8bit"), run)
    run["formats"] = formats(model, opt)
    for name in ("PagedAdamW", "PagedAdamW8bit"):  # an unsharded optimizer's state_dict, into FSDP2's
        model, opt = build(plain, name)
        train(model, opt, 1, SAVE_AT)
        saved = {n: opt.logical_state(p) for n, p in model.named_parameters()}
        sharded_model, sharded_opt = build(fsdp2, name, seed=1)
        sharded_opt.load_state_dict(opt.state_dict())
        results[f"plain->fsdp2/{name}"] = {"saved_state": saved, "loaded_state": full_state(sharded_model, sharded_opt),
                                           "formats": formats(sharded_model, sharded_opt)}
    return results


def mixed_grad_error() -> str:
    """What a step says about a DTensor param given a plain tensor grad."""
    model, opt = build(fsdp2, "PagedAdamW")
    for p in model.parameters():
        p.grad = torch.zeros(p.shape)
    try:
        opt.step()
    except TypeError as err:
        return str(err)
    return "no error"


def run_resume(ckpt_dir: str) -> dict:
    model, opt = build(plain, "PagedAdamW8bit", widths="aligned")
    results = {"plain-aligned/PagedAdamW8bit": {"params": train(model, opt, 1, STEPS), "formats": formats(model, opt)},
               "mixed_grad_error": mixed_grad_error(),
               "fsdp2-aligned/PagedAdamW8bit/resumed": resume(fsdp2, "PagedAdamW8bit", os.path.join(
                   ckpt_dir, "fsdp2-aligned-PagedAdamW8bit"), widths="aligned")}
    for name in ("PagedAdamW", "PagedAdamW8bit"):
        model, opt = build(plain, name)
        results[f"plain/{name}"] = {"params": train(model, opt, 1, STEPS), "formats": formats(model, opt)}
        ckpt = os.path.join(ckpt_dir, f"fsdp2-{name}")
        results[f"fsdp2/{name}/resumed"] = resume(fsdp2, name, ckpt)
        if name == "PagedAdamW":  # fp32 state: the same tensors as an unsharded optimizer's
            results[f"plain/{name}/resumed"] = resume(plain, name, ckpt)
    return results


def run_cuda(ckpt_dir: str) -> dict:
    """FSDP2 and FSDP1 on the GPU (one rank: each shard is its whole param, so the blocks are
    the plain run's), checkpointed at SAVE_AT and resumed into fresh models, and the plain runs."""
    results = {}
    for label, wrap in (("fsdp2", fsdp2), ("fsdp1-orig", fsdp1(True)), ("plain", plain)):
        for name in OPTIMIZERS:
            model, opt = build(wrap, name)
            run = results[f"{label}/{name}"] = {}
            ckpt = os.path.join(ckpt_dir, f"cuda-{label}-{name}") if label != "plain" and name != "AdamW" else None
            run["params"] = train(model, opt, 1, STEPS, ckpt, run)
            run["formats"] = formats(model, opt)
            if hasattr(opt, "paging_stats"):  # where the pages were updated and where they rest
                stats = opt.paging_stats()
                run["paging"] = {k: stats[k] for k in ("store", "device", "executor", "device_pool_bytes")}
                run["paging"]["bytes_read"] = stats["last_step"]["bytes_read"]
            if ckpt is not None:
                results[f"{label}/{name}/resumed"] = resume(wrap, name, ckpt)
    return results


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("fsdp", "resume", "cuda"), required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same kernels and reduction order at every world size
    if args.mode == "cuda":
        DEVICE = torch.device("cuda", 0)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if args.mode == "cuda" else "gloo")
    try:
        run = {"fsdp": run_fsdp, "resume": run_resume, "cuda": run_cuda}[args.mode]
        results = run(args.ckpt)
        torch.save(results, f"{args.out}.rank{dist.get_rank()}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
