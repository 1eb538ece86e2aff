"""One rank of a data-parallel engine job for tests/test_data_parallel.py (run as a script, one
process per rank, with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them; with
no RANK it runs alone). Trains a small MLP on seeded data, the global batch split over the
ranks, and writes per-step global losses, the final params and the state it held to --out."""
import argparse
import os

import torch
import torch.distributed as dist

import offload_engine
import offload_engine.optim  # noqa: F401 - before init_process_group ([Note: import torch.distributed.nn early])

ap = argparse.ArgumentParser()
ap.add_argument("--optimizer", default="PagedAdamW")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--global-micro", type=int, default=8)
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--nonfinite-at", type=int, default=0, help="make one rank's loss inf at this step")
ap.add_argument("--chunk-elements", type=int, default=0,
                help="collectives' chunks and buckets of this many elements (several per step), counted")
ap.add_argument("--shared-memory", choices=("on", "off"), default="on",
                help="data_parallel.shared_memory (on: the ranks of this host share params and grads)")
ap.add_argument("--shm-fallback", choices=("", "small-dir", "hosts"), default="",
                help="make shared memory impossible: a directory it cannot be created in, or each rank on its own host")
ap.add_argument("--fake-hosts", type=int, default=0,
                help="report the ranks as on this many hosts (contiguous blocks of ranks; one host's /dev/shm "
                     "for all): the hierarchical exchange on one machine")
ap.add_argument("--perturb-inputs", type=int, default=0,
                help="with this seed, move each input element by -1, 0 or +1 ulp: a difference at the level of "
                     "fp32 rounding, as another summation order or another CPU's GEMM makes")
ap.add_argument("--mutant-last-rank-loss-scale", type=float, default=1.0,
                help="a deliberate defect for the tests to catch: the last rank's loss (so its grads) times this, "
                     "as a wrong weight in the grad average would do")
ap.add_argument("--profile-step", type=int, default=0,
                help="record the offload_engine:: profiler labels of this step's optimizer step")
ap.add_argument("--out", required=True)
args = ap.parse_args()

calls: dict = {}  # collective -> how many calls on more than 64 elements (--chunk-elements)
sent: dict = {}  # collective -> the elements of those calls
if args.chunk_elements:
    from offload_engine.engine import partition as _partition

    _partition._CHUNK_ELEMENTS = _partition._BUCKET_ELEMENTS = args.chunk_elements

    def _counted(name, fn):
        def call(tensor_or_list, *a, **k):
            tensor = tensor_or_list[0] if isinstance(tensor_or_list, list) else tensor_or_list
            if tensor.numel() > 64:  # grads or params, not a flag per param or a norm
                calls[name] = calls.get(name, 0) + 1
                sent[name] = sent.get(name, 0) + tensor.numel()
            return fn(tensor_or_list, *a, **k)
        return call

    for _name in ("all_reduce", "all_gather", "broadcast", "isend", "irecv"):
        setattr(dist, _name, _counted(_name, getattr(dist, _name)))

if args.shm_fallback == "small-dir":
    from offload_engine.engine import shared_memory as _shm

    _shm.SHM_DIR = "/proc/self"  # no file can be created there
elif args.shm_fallback == "hosts":
    from offload_engine.engine import shared_memory as _shm

    _shm._host_id = lambda: (f"host-of-rank-{os.environ['RANK']}", "boot")
if args.fake_hosts:
    from offload_engine.engine import shared_memory as _shm

    _per_host = int(os.environ["WORLD_SIZE"]) // args.fake_hosts
    _shm._host_id = lambda: (f"fake-host-{int(os.environ['RANK']) // _per_host}", "boot")

world, rank = 1, 0
if "RANK" in os.environ:
    from offload_engine.engine import launch_env

    dist.init_process_group("gloo", timeout=launch_env.timeout())  # [Note: collective timeout]
    world, rank = dist.get_world_size(), dist.get_rank()
if args.global_micro % world:
    raise SystemExit(f"global micro-batch {args.global_micro} does not split over {world} ranks")
micro = args.global_micro // world

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(33, 257), torch.nn.Tanh(), torch.nn.Linear(257, 65), torch.nn.Tanh(),
                            torch.nn.Linear(65, 5))
config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
          "optimizer": {"type": args.optimizer, "params": {"lr": 1e-2, "weight_decay": 0.01}},
          "paging": {"page_size_mb": 1 / 32}, "bf16": {"enabled": args.bf16},
          "data_parallel": {"shared_memory": args.shared_memory == "on"}}
engine, optimizer, _, _ = offload_engine.initialize(model, config)

data = torch.Generator().manual_seed(1)
labels = None  # --profile-step
losses, norms, scratch = [], [], []
for step in range(1, args.steps + 1):
    step_loss = 0.0
    for _ in range(2):
        x = torch.randn(args.global_micro, 33, generator=data)
        y = torch.randn(args.global_micro, 5, generator=data)
        mine = slice(rank * micro, (rank + 1) * micro)
        if args.perturb_inputs:
            ulps = torch.randint(-1, 2, x.shape, generator=torch.Generator().manual_seed(args.perturb_inputs * 1000 + step))
            x = x * (1 + ulps.float() * 2.0 ** -23)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        loss = torch.nn.functional.mse_loss(engine(x[mine].to(dtype)).float(), y[mine])
        if step == args.nonfinite_at and rank == world - 1:
            loss = loss * float("inf")
        if args.mutant_last_rank_loss_scale != 1.0 and rank == world - 1 and world > 1:
            loss = loss * args.mutant_last_rank_loss_scale
        engine.backward(loss)
        if step == args.profile_step and engine.is_gradient_accumulation_boundary():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                engine.step()
            labels = sorted({e.name for e in prof.events() if e.name.startswith("offload_engine::")
                             and "step_" not in e.name})  # phase labels, not the kernels' ops
        else:
            engine.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        step_loss += mean.item() / 2
    losses.append(step_loss)
    norms.append(engine.get_global_grad_norm())
    if engine.partition is not None:  # where the collectives' buffers are, step by step
        scratch.append({str(k): (v.data_ptr(), v.numel()) for k, v in engine.partition._scratch_of.items()})

saved = str(engine.save_checkpoint(f"{args.out}.ckpt")) if world > 1 else None

# Whether the ranks' params are one memory: rank 0 changes an element, every rank reads it.
seen = None
if world > 1:
    p0 = next(model.parameters())
    before = p0.detach().view(-1)[0].item()
    dist.barrier()
    if rank == 0:
        with torch.no_grad():
            p0.view(-1)[0] = 12345.0
    dist.barrier()
    seen = p0.detach().view(-1)[0].item() == 12345.0
    dist.barrier()
    if rank == 0:
        with torch.no_grad():
            p0.view(-1)[0] = before
    dist.barrier()

# [Note: node IO]: a node's io_threads budget of 4 split between the ranks that share its host name.
from offload_engine.engine.admission import node_io_threads  # noqa: E402
io_share = node_io_threads(4)

held = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if optimizer.state.get(p))
result = {"rank": rank, "world": world, "losses": losses, "norms": norms, "elements_with_state": held,
          "skipped": engine.skipped_steps, "checkpoint": saved, "global_steps": engine.global_steps,
          "calls": calls, "sent": sent, "scratch": scratch, "io_threads_of_4": io_share,
          "transport": engine.partition.transport if engine.partition is not None else None,
          "seen_rank0_change": seen, "profiler_labels": labels,
          "state_bytes": optimizer.paging_stats()["state_bytes"] if hasattr(optimizer, "paging_stats") else None}
if world > 1:
    dist.barrier()
    dist.destroy_process_group()


def native_threads() -> list[str] | None:
    """The names of this process's threads (Linux), to see what outlives the process group."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # a thread that ended meanwhile
    return sorted(names)


result["threads_after_destroy"] = native_threads()
torch.save({"result": result, "params": {k: v.clone() for k, v in model.state_dict().items()}},
           f"{args.out}.rank{rank}.pt")
