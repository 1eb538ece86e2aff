"""DeepSpeed ZeRO-3 with NVMe optimizer offload vs our PagedAdamW(store="nvme"), 2 CPU ranks.

The baseline our NVMe pager is compared against. Same model, data, layout and hyper-parameters
on both sides:

    model   nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])   (8,396,800 params, fp32)
    data    per rank a fixed micro-batch x, y of shape (--batch, --seq, 1024); loss = mse(model(x), y)
    optim   AdamW, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
    layout  2 ranks on this CPU machine (gloo), one intra-op thread each (2 cores)

deepspeed  DS_ACCELERATOR=cpu, ZeRO stage 3, optimizer "AdamW" (DeepSpeed builds its
           DeepSpeedCPUAdam for an offloaded optimizer), offload_optimizer.device = "nvme" with
           nvme_path a fresh temp dir (async_io op, libaio). offload_param.device = "none": with
           the CPU accelerator the "device" memory already is host RAM, so offloading params to
           cpu would only add copies, and nvme param offload is not what is compared; our side
           keeps its params in RAM too. So only optimizer state (fp32 master partition + both
           moments) goes through NVMe on both sides.
ours       no engine/ZeRO partitioning yet, so ZeRO-style by hand: each rank runs forward/
           backward on its own micro-batch, the grads are all-reduced (one flat gloo all_reduce,
           averaged), rank r steps only the optimizer state of its half of the params (layers
           0-3 on rank 0, 4-7 on rank 1) with its own PagedAdamW(store="nvme",
           nvme_path=<temp dir>, page_size_mb=--page-size-mb, prefetch_depth=2), then each half
           is broadcast from its owner (params live in one flat buffer per owner, so that is 2
           broadcasts). Our state in NVMe is the two moments; the fp32 params stay in RAM.

Timing: --warmup steps, then --steps timed steps; every step starts after a barrier and its
time is the slowest rank's. "step" is the full train step (forward + backward + optimizer step,
for ours with the all-reduce and broadcasts); "opt" is the wall clock around engine.step() for
DeepSpeed (swap-in, CPU Adam, swap-out, param update) and around PagedAdamW.step() for ours
("opt_phase" adds our broadcasts). The sides alternate for --rounds rounds (a fresh torchrun
each), so background load hits both alike; each side's figures pool its timed steps of all
rounds: median, mean, min, max, p10, p90, stdev in ms, plus each round's median. The final
losses of the two sides are compared too (same init, data and AdamW: they agree to rounding).
The load average before and after goes into the JSON: on a busy machine the figures are noisy.

Run (spawns its own 2 ranks per side and prints one JSON line last, on stdout; the ranks'
output goes to stderr). About 100 s with the defaults once DeepSpeed's ops are built:
    python benchmarks/deepspeed_zero3_nvme.py
    python benchmarks/deepspeed_zero3_nvme.py --steps 30 --warmup 5 --rounds 2 --batch 8 --seq 16
    python benchmarks/deepspeed_zero3_nvme.py --only ours --page-size-mb 8
    python benchmarks/deepspeed_zero3_nvme.py --ds-pipeline     # DeepSpeed's pipelined swapper
What each round runs (rank 0 writes --result, or prints a JSON line without it):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone \
        --nproc_per_node 2 benchmarks/deepspeed_zero3_nvme.py --worker deepspeed|ours
(`DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/deepspeed_zero3_nvme.py
--worker deepspeed` works too.)

DeepSpeed's settings are its defaults (sub_group_size 1e9, so each rank's partition is one
swap group; no pipelined swapping) unless --ds-sub-group-size / --ds-pipeline say otherwise.
With deepspeed 0.19.8, --ds-pipeline together with a sub_group_size below a rank's partition
fails in its pipelined swapper (AssertionError in _swap_out_optimizer_state).

Needs: deepspeed (pip), libaio-dev (apt) and a C++ compiler; DeepSpeed JIT-builds its async_io
and cpu_adam ops on first use (about 8 minutes on 2 cores, cached in ~/.cache/torch_extensions;
the script builds them before it starts the ranks and says so). When deepspeed or libaio is
missing it prints why and a JSON line with "skipped": true, and exits 0. A run that fails
prints a JSON line with "error" and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _ranks import build_deepspeed_ops, deepspeed_missing, raw_ms, run_job, slowest_rank, summarize

HIDDEN = 1024
LAYERS = 8
WORLD = 2
HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
NAME = "deepspeed_zero3_nvme"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    ap.add_argument("--seq", type=int, default=16, help="sequence length (rows per sample)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, the sides alternating")
    ap.add_argument("--page-size-mb", type=float, default=4.0, help="PagedAdamW page size")
    ap.add_argument("--nvme-dir", default=None, help="where the temp state dirs go (default: $TMPDIR)")
    ap.add_argument("--ds-sub-group-size", type=int, default=None,
                    help="zero_optimization.sub_group_size (DeepSpeed's default, 1e9, when not given)")
    ap.add_argument("--ds-pipeline", action="store_true",
                    help="offload_optimizer.pipeline_read/pipeline_write = true (off by default, as in DeepSpeed)")
    ap.add_argument("--only", choices=("deepspeed", "ours"), default=None, help="run one side only")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per side's torchrun")
    # internal: one rank of one side, under torchrun (or the deepspeed launcher)
    ap.add_argument("--worker", choices=("deepspeed", "ours"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- shared by both sides ----------------------------------------------------------------------
def build_model():
    import torch
    from torch import nn
    torch.manual_seed(0)  # the same initial params on every rank and on both sides
    return nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)])


def make_batch(args, rank):
    import torch
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own micro-batch
    x = torch.randn(args.batch, args.seq, HIDDEN, generator=g)
    y = torch.randn(args.batch, args.seq, HIDDEN, generator=g)
    return x, y


def nvme_dir_for_worker(args):
    """(directory for the NVMe state, whether this rank made it): the parent's temp dir when
    launched by it, else a temp dir of this rank's own (removed at the end)."""
    if os.environ.get("BENCH_NVME_DIR"):
        return os.environ["BENCH_NVME_DIR"], False
    return tempfile.mkdtemp(prefix="ds_zero3_nvme_bench-", dir=args.nvme_dir), True


def write_result(args, result):
    """Rank 0's figures: to --result for the parent, or as a JSON line when run by hand."""
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)
    else:
        result = {**result, **{f"{k}_ms": summarize(v) for k, v in result["raw_ms"].items()}}
        del result["raw_ms"]
        print(json.dumps(result), flush=True)


def setup_threads():
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed's deprecation notes, per call
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


# ---- DeepSpeed side ------------------------------------------------------------------------------
def ds_config(args, nvme_path):
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": HYPER["lr"], "betas": list(HYPER["betas"]),
                                                  "eps": HYPER["eps"], "weight_decay": HYPER["weight_decay"]}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme_path, "pin_memory": False,
                                  "pipeline_read": args.ds_pipeline, "pipeline_write": args.ds_pipeline},
            "offload_param": {"device": "none"},
            **({"sub_group_size": args.ds_sub_group_size} if args.ds_sub_group_size else {}),
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True},
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def worker_deepspeed(args):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    setup_threads()
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()  # gloo, or ccl with oneCCL bindings
    deepspeed.init_distributed(dist_backend=backend)
    rank = dist.get_rank()
    nvme_root, own_dir = nvme_dir_for_worker(args)
    model = build_model()
    config = ds_config(args, nvme_root)
    t_init = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    init_s = time.perf_counter() - t_init
    x, y = make_batch(args, rank)
    step_s, opt_s = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    times = slowest_rank(dist, {"step": step_s, "opt": opt_s})
    final_loss = float(loss.detach())
    if rank == 0:
        opt = engine.optimizer
        result = {
            "backend": backend,
            "accelerator": get_accelerator().device_name(),
            "deepspeed": deepspeed.__version__,
            "optimizer": type(getattr(opt, "optimizer", opt)).__name__,
            "zero_stage": engine.zero_optimization_stage(),
            "offload_optimizer": "nvme",
            "offload_param": "none",
            "nvme_path": nvme_root,
            "zero_optimization": {k: v for k, v in config["zero_optimization"].items() if k != "stage"},
            "aio": config["aio"],
            "init_s": round(init_s, 1),
            "raw_ms": raw_ms(times),
            "final_loss": final_loss,
        }
        write_result(args, result)
    dist.barrier()
    dist.destroy_process_group()
    if own_dir:
        shutil.rmtree(nvme_root, ignore_errors=True)


# ---- our side ------------------------------------------------------------------------------------
def worker_ours(args):
    setup_threads()
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from offload_engine.optim import PagedAdamW

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"needs {WORLD} ranks, got {world}"
    model = build_model()
    layers = list(model)
    per = LAYERS // world
    owned = [[p for layer in layers[r * per:(r + 1) * per] for p in layer.parameters()] for r in range(world)]

    # Each owner's params live in one flat buffer (one broadcast per owner, no copies); all grads
    # in one flat buffer (one all_reduce). Autograd accumulates into the existing .grad views.
    flat_params = []
    total = sum(p.numel() for ps in owned for p in ps)
    flat_grad = torch.zeros(total)
    g_off = 0
    with torch.no_grad():
        for ps in owned:
            flat = torch.empty(sum(p.numel() for p in ps))
            off = 0
            for p in ps:
                n = p.numel()
                flat[off:off + n].copy_(p.view(-1))
                p.data = flat[off:off + n].view_as(p)
                p.grad = flat_grad[g_off:g_off + n].view_as(p)
                off += n
                g_off += n
            flat_params.append(flat)

    nvme_root, own_dir = nvme_dir_for_worker(args)
    nvme_dir = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=nvme_root)
    opt = PagedAdamW(owned[rank], **HYPER, store="nvme", nvme_path=nvme_dir, page_size_mb=args.page_size_mb,
                     prefetch_depth=2)
    x, y = make_batch(args, rank)
    step_s, opt_s, phase_s, comm_s = [], [], [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        flat_grad.zero_()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        dist.all_reduce(flat_grad)
        flat_grad.div_(world)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        for owner, flat in enumerate(flat_params):
            dist.broadcast(flat, src=owner)
        t3 = time.perf_counter()
        if i >= args.warmup:
            step_s.append(t3 - t0)
            opt_s.append(t2 - t1)
            phase_s.append(t3 - t1)
            comm_s.append(t3 - t2)
    times = slowest_rank(dist, {"step": step_s, "opt": opt_s, "opt_phase": phase_s, "broadcast": comm_s})
    final_loss = float(loss.detach())
    stats = opt.paging_stats()
    all_stats = [None] * world
    last = {k: round(v, 5) if isinstance(v, float) else v for k, v in stats["last_step"].items()}
    dist.all_gather_object(all_stats, {"rank": rank, "last_step": last, "num_pages": stats["num_pages"],
                                       "state_bytes": stats["state_bytes"], "direct_io": stats["direct_io"]})
    if rank == 0:
        result = {
            "backend": "gloo",
            "optimizer": "PagedAdamW",
            "store": stats["store"],
            "page_size_mb": args.page_size_mb,
            "prefetch_depth": stats["prefetch_depth"],
            "pool_slots": stats["pool_slots"],
            "nvme_path": nvme_root,
            "raw_ms": raw_ms(times),
            "paging_last_step": all_stats,
            "final_loss": final_loss,
        }
        write_result(args, result)
    opt.close()
    dist.barrier()
    dist.destroy_process_group()
    if own_dir:
        shutil.rmtree(nvme_root, ignore_errors=True)


# ---- parent: checks, builds, spawns the ranks, prints the JSON line ----------------------------
def launch(side, args, tmp_root):
    """Runs one side on 2 ranks via torchrun; returns its rank-0 result dict (or raises)."""
    os.makedirs(tmp_root, exist_ok=True)
    result = os.path.join(tmp_root, f"{side}.json")
    nvme_dir = tempfile.mkdtemp(prefix=f"{side}-nvme-", dir=tmp_root)
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_NVME_DIR=nvme_dir, DS_ACCELERATOR="cpu")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.abspath(__file__), "--worker", side, "--result", result,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq), "--page-size-mb", str(args.page_size_mb)]
    if args.ds_sub_group_size:
        cmd += ["--ds-sub-group-size", str(args.ds_sub_group_size)]
    if args.ds_pipeline:
        cmd.append("--ds-pipeline")
    print(f"> {side}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    code = run_job(cmd, env, args.timeout)
    if code != 0 or not os.path.exists(result):
        raise RuntimeError(f"{side} ranks failed (exit {code}); see their output above")
    with open(result) as f:
        out = json.load(f)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def emit(record):
    print(json.dumps(record), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.worker == "deepspeed":
        return worker_deepspeed(args)
    if args.worker == "ours":
        return worker_ours(args)

    record = {"benchmark": NAME, "model": f"{LAYERS}x Linear({HIDDEN},{HIDDEN}) fp32",
              "params": LAYERS * (HIDDEN * HIDDEN + HIDDEN), "ranks": WORLD, "batch_per_rank": args.batch,
              "seq": args.seq, "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
              "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "skipped": False}
    sides = [args.only] if args.only else ["deepspeed", "ours"]
    if "deepspeed" in sides:
        reason = deepspeed_missing() or build_deepspeed_ops()
        if reason:
            print(f"> skipping {NAME}: {reason}", file=sys.stderr)
            emit({**record, "skipped": True, "skip_reason": reason})
            return 0
    record["loadavg_before"] = [round(v, 2) for v in os.getloadavg()]
    if record["loadavg_before"][0] > 0.5:
        print(f"> note: the machine is busy (load average {record['loadavg_before'][0]:.2f}): "
              "both sides' timings will be noisy", file=sys.stderr)
    # The sides alternate round by round, so background load hits both alike; each side's
    # figures pool its per-step times over the rounds.
    runs = {side: [] for side in sides}
    tmp_root = tempfile.mkdtemp(prefix="ds_zero3_nvme_bench-", dir=args.nvme_dir)
    try:
        for rnd in range(args.rounds):
            for side in sides:
                runs[side].append(launch(side, args, os.path.join(tmp_root, f"round{rnd}")))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"> {NAME} failed: {e}", file=sys.stderr)
        emit({**record, "error": str(e)})
        return 1
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    record["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    for side in sides:
        out = {k: v for k, v in runs[side][-1].items() if k != "raw_ms"}
        raws = [run["raw_ms"] for run in runs[side]]
        for name in raws[0]:
            out[f"{name}_ms"] = summarize([v for raw in raws for v in raw[name]])
        out["round_medians_ms"] = {name: [round(statistics.median(raw[name]), 2) for raw in raws] for name in raws[0]}
        out["wall_s"] = [run["wall_s"] for run in runs[side]]
        out["nvme_path"] = f"{tmp_root}/round<n>/{side}-nvme-*"  # removed at the end
        record[side] = out

    lines = []
    for side in sides:
        r = record[side]
        s, o = r["step_ms"], r["opt_ms"]
        lines.append(f"{side:>9}: step {s['median']:8.1f} ms (p10 {s['p10']:.1f}, p90 {s['p90']:.1f}, "
                     f"min {s['min']:.1f}, max {s['max']:.1f})   optimizer step {o['median']:8.1f} ms "
                     f"(p10 {o['p10']:.1f}, p90 {o['p90']:.1f})")
    if len(sides) == 2:
        ds, ours = record["deepspeed"], record["ours"]
        record["ratio_deepspeed_over_ours"] = {
            "step": round(ds["step_ms"]["median"] / ours["step_ms"]["median"], 2),
            "opt": round(ds["opt_ms"]["median"] / ours["opt_ms"]["median"], 2),
        }
        # Same init, data and AdamW on both sides: the losses after the last step should agree
        # to float rounding (a check that both did the same training, not just the same timing).
        record["final_loss_abs_diff"] = abs(ds["final_loss"] - ours["final_loss"])
        lines.append(f"DeepSpeed/ours (medians): step {record['ratio_deepspeed_over_ours']['step']:.2f}x, "
                     f"optimizer step {record['ratio_deepspeed_over_ours']['opt']:.2f}x")
    print("\n".join(lines), flush=True)
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
