"""What paging.overlap "delayed" costs in loss: the main job (the built-in GPT, configs/default.json)
run with overlap off and with "delayed", and, as the anchor that tells the mode's own price from
a bug in it, the same model trained by plain torch.optim.AdamW (fp32) with and without one-step
stale grads: forward and backward of window t+1 on the params before step t's update, the
semantics of [Note: delayed update] in offload_engine/engine/delayed.py, written here in a few
lines of torch.

Each lr in --lrs gets the four runs; the ratios printed are delayed / off (the engine) and
stale / plain (torch), each of the end loss (median of the last 10 steps, as the job's
summary). If the two ratios agree, what delay costs is the staleness, not the engine.

    python benchmarks/delayed_convergence.py                       # lr 2e-3 (the default), 300 steps
    python benchmarks/delayed_convergence.py --lrs 2e-3,1e-3,5e-4 --json out.json
    python benchmarks/delayed_convergence.py --lrs 2e-3 --engine-lrs "" --finetune-lrs 2e-4,5e-5
"""
import argparse
import copy
import datetime
import json
import math
import statistics
import tempfile
from importlib import resources
from pathlib import Path

import torch
from torch.nn import functional as F

from offload_engine.train.data import BatchSampler, load_corpus
from offload_engine.train.job import JobSettings, run
from offload_engine.train.models import build_model, logits

TAIL = 10  # the job's summary: median of the last 10 steps


def default_config() -> dict:
    return json.loads(resources.files("offload_engine.train").joinpath("data", "default.json").read_text(encoding="utf-8"))


def engine_run(cfg: dict, overlap: str, lr: float, steps: int, warmup: int, seed: int) -> float:
    cfg = copy.deepcopy(cfg)
    cfg["paging"]["overlap"] = overlap
    cfg["paging"]["delayed_warmup_steps"] = warmup
    cfg["optimizer"]["params"]["lr"] = lr
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(cfg))
        summary = run(JobSettings(config=str(path), steps=steps, out=Path(d) / "run", seed=seed, save_every=0,
                                  progress=False, device="cpu"), log=lambda *_: None)
    return summary["loss_end"]


def engine_from(cfg: dict, overlap: str, lr: float, steps: int, warmup: int, seed: int, start: dict) -> float:
    """The engine (the job's config, model, data and loop) from the params `start`, for the
    continued rows: the job itself starts from the seed's init."""
    import offload_engine

    cfg = copy.deepcopy(cfg)
    cfg["paging"].update(overlap=overlap, delayed_warmup_steps=warmup)
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=max(
        1, round(cfg["scheduler"]["params"]["warmup_num_steps"] * steps / cfg["scheduler"]["params"]["total_num_steps"])))
    torch.manual_seed(seed)
    loaded = build_model("small", None)
    loaded.module.load_state_dict(start)
    engine, *_ = offload_engine.initialize(loaded.module, cfg)
    sampler = BatchSampler(load_corpus(None, loaded.tokenizer), engine.config.train_micro_batch_size_per_gpu,
                           loaded.context, seed)
    losses = []
    for _ in range(steps):
        window = []
        for _ in range(engine.gradient_accumulation_steps):
            x, y = sampler.next(torch.device("cpu"))
            loss = F.cross_entropy(logits(loaded, x).flatten(0, 1).float(), y.flatten())
            engine.backward(loss)
            engine.step()
            window.append(loss.item())
        losses.append(statistics.fmean(window))
    engine.apply_pending_step()
    return statistics.median(losses[-TAIL:])


def torch_run(cfg: dict, stale: bool, lr: float, steps: int, warmup: int, seed: int, start=None,
              keep: list | None = None) -> float:
    """The job's model, data, batch and schedule shape, in fp32 with torch.optim.AdamW; from the
    params `start` (a state_dict) when given, else from the seed's init. `keep`: gets the final
    state_dict appended."""
    hyper = cfg["optimizer"]["params"]
    sched = cfg["scheduler"]["params"]
    ramp = max(1, round(sched["warmup_num_steps"] * steps / sched["total_num_steps"]))
    floor = sched["cos_min_ratio"]
    gas = cfg["train_batch_size"] // cfg["train_micro_batch_size_per_gpu"]
    torch.manual_seed(seed)
    loaded = build_model("small", None)
    model = loaded.module.float()
    if start is not None:
        model.load_state_dict(start)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(hyper["betas"]), weight_decay=hyper["weight_decay"])

    def factor(s: int) -> float:  # linear ramp from 0, then cosine down to `floor`
        if s < ramp:
            return s / ramp
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - ramp) / max(1, steps - ramp)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    sampler = BatchSampler(load_corpus(None, loaded.tokenizer), cfg["train_micro_batch_size_per_gpu"],
                           loaded.context, seed)
    before = None
    losses = []
    for step in range(steps):
        current = None
        if before is not None:  # this window reads the params before the last step's update
            current = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, v in zip(params, before):
                    p.copy_(v)
        window = []
        for _ in range(gas):
            x, y = sampler.next(torch.device("cpu"))
            loss = F.cross_entropy(logits(loaded, x).flatten(0, 1).float(), y.flatten())
            (loss / gas).backward()
            window.append(loss.item())
        if current is not None:
            with torch.no_grad():
                for p, v in zip(params, current):
                    p.copy_(v)
        taken = [p.detach().clone() for p in params] if stale and step + 1 > warmup else None
        torch.nn.utils.clip_grad_norm_(params, cfg["gradient_clipping"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        before = taken
        losses.append(statistics.fmean(window))
    if keep is not None:
        keep.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return statistics.median(losses[-TAIL:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="2e-3", help="comma-separated learning rates (the default config: 2e-3)")
    ap.add_argument("--engine-lrs", default=None, help="the lrs of the four-run rows (default: --lrs; '' for none)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10, help="paging.delayed_warmup_steps (and the torch loop's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-lrs", default="",
                    help="also: continue a model trained --steps plain torch steps at the first lr for --steps more "
                         "at each of these lrs (a fine-tuning-like second phase, another data order), all four ways")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = default_config()
    rows = []
    print(f"{args.steps} steps, delay from step {args.warmup + 1}; end loss = median of the last {TAIL} steps")
    print(f"{'lr':>8} {'engine off':>11} {'delayed':>9} {'ratio':>7} | {'torch':>8} {'stale':>8} {'ratio':>7}")
    engine_lrs = args.lrs if args.engine_lrs is None else args.engine_lrs
    for lr in (float(v) for v in engine_lrs.split(",") if v):
        off = engine_run(cfg, "off", lr, args.steps, args.warmup, args.seed)
        delayed = engine_run(cfg, "delayed", lr, args.steps, args.warmup, args.seed)
        plain = torch_run(cfg, False, lr, args.steps, args.warmup, args.seed)
        stale = torch_run(cfg, True, lr, args.steps, args.warmup, args.seed)
        rows.append({"lr": lr, "engine_off": off, "engine_delayed": delayed, "torch_plain": plain,
                     "torch_stale": stale, "engine_ratio": delayed / off, "torch_ratio": stale / plain})
        print(f"{lr:8.1e} {off:11.4f} {delayed:9.4f} {delayed / off:7.3f} | {plain:8.4f} {stale:8.4f} "
              f"{stale / plain:7.3f}", flush=True)
    finetune = []
    if args.finetune_lrs:
        first_lr = float(args.lrs.split(",")[0])
        kept = []
        torch_run(cfg, False, first_lr, args.steps, args.warmup, args.seed, keep=kept)
        print(f"continued from {args.steps} plain torch steps at lr {first_lr:.1e}, {args.steps} more "
              f"(another data order):")
        print(f"{'lr':>8} {'engine off':>11} {'delayed':>9} {'ratio':>7} | {'torch':>8} {'stale':>8} {'ratio':>7}")
        for lr in (float(v) for v in args.finetune_lrs.split(",")):
            off = engine_from(cfg, "off", lr, args.steps, args.warmup, args.seed + 1, kept[0])
            delayed = engine_from(cfg, "delayed", lr, args.steps, args.warmup, args.seed + 1, kept[0])
            plain = torch_run(cfg, False, lr, args.steps, args.warmup, args.seed + 1, start=kept[0])
            stale = torch_run(cfg, True, lr, args.steps, args.warmup, args.seed + 1, start=kept[0])
            finetune.append({"lr": lr, "engine_off": off, "engine_delayed": delayed, "engine_ratio": delayed / off,
                             "torch_plain": plain, "torch_stale": stale, "torch_ratio": stale / plain})
            print(f"{lr:8.1e} {off:11.4f} {delayed:9.4f} {delayed / off:7.3f} | {plain:8.4f} {stale:8.4f} "
                  f"{stale / plain:7.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "steps": args.steps,
                                         "warmup": args.warmup, "seed": args.seed, "rows": rows,
                                         "finetune": finetune}, indent=1))


if __name__ == "__main__":
    main()
