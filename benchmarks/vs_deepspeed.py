"""Head to head: DeepSpeed ZeRO-Offload and ZeRO-Infinity against our engine, on the same job.

Same models, data, global batch, hyperparameters (AdamW, lr 1e-3, wd 0.01, fp32, no clipping unless --clip)
and launcher for every contender; each trains --warmup + --steps steps from the same init on
the same seeded global batches (benchmarks/_vs_workloads.py), so the fp32-state runs must end
at the same loss. CPU contenders run 2 ranks (gloo, one intra-op thread each) under the
`deepspeed` launcher, ours as well as DeepSpeed's (torchrun when DeepSpeed is not installed):

    ds-zero2-cpu    DeepSpeed ZeRO-2, offload_optimizer.device "cpu" (ZeRO-Offload; its defaults
                    otherwise: pin_memory true in 0.19.8, DeepSpeedCPUAdam)
    ds-zero3-nvme   DeepSpeed ZeRO-3, offload_optimizer.device "nvme" (ZeRO-Infinity's optimizer
                    offload; params stay in memory, as ours do)
    ours-host       offload_engine.initialize: state in host RAM pages, the SIMD CPU executor
    ours-nvme       the same with the NVMe store (4 MiB pages, prefetch 2)
    ours-8bit       host pages with 8-bit block-quantized moments (PagedAdamW8bit)

and, when named in --contenders: ours-nvme-8bit (8-bit moments on NVMe); ours-host-delayed,
ours-nvme-delayed (paging.overlap "delayed" from the first step: each update runs during the
next step's forward and backward, one step stale, so their losses are not held to the fp32
runs'); ours-host-exact, ours-nvme-exact (paging.overlap "exact": the pages of each owner run
during backward as its grads arrive, reduced over gloo a bucket at a time; held to the fp32
losses) and ours-host-gloo, ours-nvme-gloo (overlap off on that transport: shared-memory
params off). --clip sets gradient_clipping for every contender (default 0: none).

With a GPU (torch.cuda.is_available()) and --gpu, one process on the GPU with the whole
global batch (these are not data-parallel):

    gpu-ours-host        our engine, params on the GPU, fp32 state in pinned host pages paged
                         through GPU slots to the CUDA kernel
    gpu-ours-host-8bit   the same with 8-bit state
    gpu-bnb-paged8       bitsandbytes PagedAdamW8bit (CUDA managed memory)
    gpu-torchao-offload  torchao CPUOffloadOptimizer(torch.optim.AdamW, fused CPU step)
    gpu-torch-adamw      torch.optim.AdamW(fused=True), state in GPU memory: the ceiling

A contender whose package does not import is reported as skipped, not fatal.

--layout HxR runs the CPU jobs on H hosts of R ranks each (default 1x2: one host, 2 ranks). With
H = 2 the hosts are two network namespaces on this machine joined by a veth link (the harness of
tests/hosts.py; needs root), each with its own host name and /dev/shm, and each runs its own
launcher (torchrun --nnodes 2, or deepspeed --hostfile --no_ssh --node_rank). The global batch is
the same in every layout (split over H x R ranks), and each job also reports the bytes its hosts
sent on the link per timed step (the interface's tx counters, summed over hosts). At 2x2 our
default is the hierarchical exchange (shared memory within a host, each rank's column of
host-summed grads across: engine/host_exchange.py) and ours-host-gloo the flat one (every rank
over gloo).

Each step is timed after a barrier as the slowest rank's: "step" = forward + backward +
engine.step(), "opt" = engine.step() alone (DeepSpeed's ZeRO-2 reduces grads inside backward,
ours inside step(), so compare full steps). Per contender: the median of the timed steps of
all rounds, tokens/s, peak RSS (the largest rank's, and the node's sum), the node's PSS after
the last step (the sum over ranks of each one's proportional set size: memory the ranks share
counts once, where the RSS sum counts it per rank), peak GPU memory, the
optimizer state's bytes per tier summed over ranks, and the loss after the last step (on the
next step's batch, averaged over ranks). Contenders alternate within each round, and rounds
rotate their order, so background load hits all alike; the load average goes in the record.

    python benchmarks/vs_deepspeed.py                              # the CPU sweep: table, JSON, plots
    python benchmarks/vs_deepspeed.py --models linear8 --rounds 1  # one model, quicker
    python benchmarks/vs_deepspeed.py --gpu --models linear8,gpt-43m,gpt-350m   # on a GPU machine
    python benchmarks/vs_deepspeed.py --from-json record.json --plots-dir docs/img   # redraw, run nothing
    sudo python benchmarks/vs_deepspeed.py --layout 2x2 --contenders ours-host,ours-host-gloo,ds-zero2-cpu

Prints a markdown table and the targets' ratios on stdout, and writes --json and the PNG plots
(--plots-dir). Exit status 1 when a contender fails or fp32 losses disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time

import _ranks
import _vs_report
from _vs_workloads import (HYPER, WORKLOADS, WORLD, Batches, deepspeed_config, deepspeed_state_tiers, loss_of,
                           ours_config, ours_state_tiers)

CPU_CONTENDERS = ("ds-zero2-cpu", "ds-zero3-nvme", "ours-host", "ours-nvme", "ours-8bit")
# Run when named in --contenders: 8-bit NVMe; paging.overlap "delayed" and "exact" on host and NVMe
# pages, and overlap off over gloo (the transport "exact" uses at several ranks).
EXTRA_CPU_CONTENDERS = ("ours-nvme-8bit", "ours-host-delayed", "ours-nvme-delayed", "ours-host-exact",
                        "ours-nvme-exact", "ours-host-gloo", "ours-nvme-gloo")
GPU_CONTENDERS = ("gpu-ours-host", "gpu-ours-host-8bit", "gpu-bnb-paged8", "gpu-torchao-offload", "gpu-torch-adamw")
FP32_STATE = {"ds-zero2-cpu", "ds-zero3-nvme", "ours-host", "ours-nvme", "ours-host-exact", "ours-nvme-exact",
              "ours-host-gloo", "ours-nvme-gloo", "gpu-ours-host", "gpu-torchao-offload",
              "gpu-torch-adamw"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="linear8,gpt-3m,gpt-13m,gpt-43m",
                    help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    ap.add_argument("--contenders", default=None,
                    help="comma-separated (default: the CPU ones; with --gpu the GPU ones too)")
    ap.add_argument("--gpu", action="store_true", help="add the GPU contenders (needs CUDA)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs every contender once")
    ap.add_argument("--launcher", choices=("deepspeed", "torchrun"), default=None,
                    help="CPU jobs' launcher (default: deepspeed when installed, else torchrun)")
    ap.add_argument("--layout", default=f"1x{WORLD}",
                    help="HOSTSxRANKS for the CPU jobs: 1x2 on this host, or 2x1 / 2x2 over two network namespaces "
                         "on a veth link (root)")
    ap.add_argument("--clip", type=float, default=0.0, help="gradient_clipping for every contender (0: none)")
    ap.add_argument("--loss-rtol", type=float, default=1e-4,
                    help="fp32-state contenders' losses after the last step must agree within this relative tolerance")
    ap.add_argument("--nvme-dir", default=None, help="where NVMe state goes (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="write the whole record here")
    ap.add_argument("--plots-dir", default=None, help="write vs_deepspeed_step.png and vs_deepspeed_memory.png here")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per job")
    ap.add_argument("--from-json", default=None, help="print the table and draw the plots of a saved record; run nothing")
    # internal: one job's rank
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- one job's ranks ------------------------------------------------------------------------------
class _Plain:
    """A torch.optim-style optimizer in the engine's interface (call, backward, step), so every
    contender runs the same loop."""

    def __init__(self, module, optimizer, clip: float = 0.0):
        self.module, self.optimizer, self.clip = module, optimizer, clip

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.clip > 0:  # --clip, as the engines' gradient_clipping
            import torch
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def n_params(model) -> int:
    """Parameters counted once (the GPTs tie their embedding and output layer)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _start(contender, workload, state_dir, clip=0.0):
    """(engine-like, state_tiers(), device, param count) for `contender`, its process group
    started."""
    import torch
    import torch.distributed as dist
    model = workload.build()
    count = n_params(model)  # before DeepSpeed's ZeRO-3 partitions the params away
    # The global batch is the same in every layout: micro_batch x WORLD samples over the job's ranks.
    micro = workload.micro_batch * WORLD // int(os.environ.get("WORLD_SIZE", WORLD))
    if contender.startswith("ds-"):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=deepspeed_config(contender, workload, state_dir, clip, micro))
        return engine, lambda: deepspeed_state_tiers(engine, state_dir), "cpu", count
    if contender in EXTRA_CPU_CONTENDERS or contender in ("ours-host", "ours-nvme", "ours-8bit"):
        import offload_engine
        engine, _, _, _ = offload_engine.initialize(model, ours_config(contender, workload, state_dir, micro, clip))
        return engine, lambda: ours_state_tiers(engine), "cpu", count
    if not torch.cuda.is_available():
        raise RuntimeError(f"{contender} needs a CUDA GPU")
    model = model.cuda()
    global_batch = workload.micro_batch * WORLD  # one process takes the whole global batch
    if contender.startswith("gpu-ours"):
        import offload_engine
        engine, _, _, _ = offload_engine.initialize(model, ours_config(contender, workload, state_dir, global_batch, clip))
        return engine, lambda: ours_state_tiers(engine), "cuda", count
    hyper = dict(HYPER)
    if contender == "gpu-bnb-paged8":
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(model.parameters(), **hyper)
    elif contender == "gpu-torchao-offload":
        from torchao.optim import CPUOffloadOptimizer
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, fused=True, **hyper)
    elif contender == "gpu-torch-adamw":
        opt = torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    assert not dist.is_initialized()
    return _Plain(model, opt, clip), lambda: _plain_state_tiers(opt), "cuda", count


def _time_phases(engine) -> dict:
    """Wraps the phases of our engine's step (grad reduction, optimizer, param gather) in
    timers; returns {phase: [seconds per call]}, filled as the steps run."""
    phases: dict = {}

    def timed(obj, attr, name):
        fn = getattr(obj, attr)

        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases.setdefault(name, []).append(time.perf_counter() - t)
        setattr(obj, attr, call)
    timed(engine.optimizer, "step", "optimizer")
    if engine.partition is not None:
        timed(engine.partition, "reduce_grads", "reduce_grads")
        timed(engine.partition, "gather_params", "gather_params")
    if engine.overlap is not None:  # "exact": what is left after backward of the reduction and of the step
        timed(engine.overlap, "finish_reduction", "reduce_after_backward")
        timed(engine.overlap, "close", "step_after_backward")
    return phases


def _plain_state_tiers(opt) -> dict:
    """State tensors by where they are; bitsandbytes' paged (managed) state counts as GPU."""
    import torch
    tiers = {"gpu": 0, "host": 0, "nvme": 0}
    # torchao's CPUOffloadOptimizer: one CPU optimizer per large param, d_opt on the GPU for small ones.
    inner = list(getattr(opt, "optim_dict", {}).values()) + [o for o in [getattr(opt, "d_opt", None)] if o]
    states = [s for o in inner for s in o.state.values()] if inner else list(opt.state.values())
    for s in states:
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                tiers["gpu" if v.device.type == "cuda" else "host"] += v.numel() * v.element_size()
    return tiers


def worker(args) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed's deprecation notes
    import torch
    if os.environ.get("OMP_NUM_THREADS"):  # the CPU jobs: one thread per rank; a GPU job keeps torch's default
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import torch.distributed as dist

    workload = WORKLOADS[args.model]
    t_init = time.perf_counter()
    engine, state_tiers, device, params = _start(args.worker, workload, args.state_dir, args.clip)
    init_s = time.perf_counter() - t_init
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    phases = _time_phases(engine) if args.worker.startswith(("ours", "gpu-ours")) else {}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batches = Batches(workload, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s, opt_s, losses = [], [], []
    link = [0, 0]  # this host's bytes sent on the link: at the first timed step, after the last
    for i in range(args.warmup + args.steps):
        x, y = batches.take(i, rank, world)
        if distributed:
            dist.barrier()  # every rank starts the step together: its time is the slowest rank's
        if i == args.warmup:
            link[0] = _link_tx_bytes()
        sync()
        t0 = time.perf_counter()
        loss = loss_of(workload, engine(x), y)
        engine.backward(loss)
        sync()
        t1 = time.perf_counter()
        engine.step()
        sync()
        t2 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    if distributed:
        dist.barrier()  # every rank's last step is done before the link's counter is read again
    link[1] = _link_tx_bytes()
    if hasattr(engine, "apply_pending_step"):
        engine.apply_pending_step()  # paging.overlap "delayed": the last step lands before the loss is taken
    with torch.no_grad():  # the loss after the last step, on the next batch
        x, y = batches.take(args.warmup + args.steps, rank, world)
        final = float(loss_of(workload, engine(x), y))
    figures = torch.tensor([final] + losses, dtype=torch.float64)
    tiers = state_tiers()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    pss = _pss_bytes()
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if distributed:
        times = _ranks.slowest_rank(dist, {"step": step_s, "opt": opt_s})
        dist.all_reduce(figures)
        figures /= world
        per_rank = [None] * world
        dist.all_gather_object(per_rank, {"rss": rss, "pss": pss, "tiers": tiers, "link": link[1] - link[0]})
    else:
        times = {"step": step_s, "opt": opt_s}
        per_rank = [{"rss": rss, "pss": pss, "tiers": tiers, "link": 0}]
    if rank == 0:
        result = {
            "contender": args.worker, "model": args.model, "params": params, "world": world,
            "tokens_per_step": batches.tokens_per_step(), "init_s": round(init_s, 2),
            "raw_ms": _ranks.raw_ms(times), "final_loss": figures[0].item(), "losses": figures[1:].tolist(),
            "peak_rss_max_rank": max(r["rss"] for r in per_rank), "peak_rss_sum": sum(r["rss"] for r in per_rank),
            "pss_sum_end": sum(r["pss"] for r in per_rank),
            "peak_gpu_bytes": gpu_peak,
            # Two hosts: what they sent on the link per timed step (each host's first rank reads
            # its counter; barriers' bytes included, alike for every contender).
            "link_bytes_per_step": round(sum(r["link"] for r in per_rank) / max(1, args.steps)),
            "state_bytes": {t: sum(r["tiers"][t] for r in per_rank) for t in ("gpu", "host", "nvme")},
            "optimizer": type(getattr(engine, "optimizer", engine)).__name__,
            # paging.overlap "exact": rank 0's settled steps (kept / redo / skipped / waited)
            "speculation": _speculation(engine),
            # Rank 0's median per phase of engine.step() over the timed steps: where our step goes.
            "phases_ms": {k: round(statistics.median(v[args.warmup:]) * 1e3, 2) for k, v in phases.items()
                          if v[args.warmup:]},
        }
        if args.worker.startswith("ds-"):
            import deepspeed
            result["optimizer"] = type(engine.optimizer).__name__ + "/" + type(engine.optimizer.optimizer).__name__
            result["deepspeed"] = deepspeed.__version__
        with open(args.result, "w") as f:
            json.dump(result, f)
    if distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    return 0


def _link_tx_bytes() -> int:
    """Bytes this host has sent on GLOO_SOCKET_IFNAME (a two-host layout sets it), read by the
    host's first rank from /proc/net/dev (this network namespace's counters); 0 otherwise."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if not ifname or os.environ.get("LOCAL_RANK", "0") != "0":
        return 0
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == ifname:
                return int(fields.split()[8])  # receive: 8 fields, then transmit bytes
    return 0


def _speculation(engine):
    """paging_stats()["speculation"] of our engine's optimizer, or None (no overlap "exact")."""
    if getattr(engine, "overlap", None) is None:
        return None
    return engine.optimizer.paging_stats().get("speculation")


def _pss_bytes() -> int:
    """This process's proportional set size now (Linux; 0 elsewhere): memory shared between
    ranks (our shared params, libraries) counts once over the node, split between them, where
    RSS counts it in every rank."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            lines = f.readlines()
    except OSError:  # no /proc: 0, which the table shows as "-"
        lines = []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("Pss:")), 0)


# ---- the parent: checks, launches, pools, reports --------------------------------------------------
def _skip_reason(contender: str, have_cuda: bool) -> str | None:
    if contender.startswith("ds-"):
        return _ranks.deepspeed_missing(nvme=contender == "ds-zero3-nvme")
    if contender.startswith("gpu-"):
        if not have_cuda:
            return "no CUDA GPU"
        mod = {"gpu-bnb-paged8": "bitsandbytes", "gpu-torchao-offload": "torchao.optim"}.get(contender)
        if mod:
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
                return f"{mod} is not importable ({type(e).__name__}: {e})"
    return None


def _launch(contender, model, args, tmp_root, launcher, hosts=None) -> dict:
    """One job of `contender` on `model`; on this host, or with `hosts` (the two-host harness)
    a launcher on each, its ranks per host from --layout."""
    job_dir = tempfile.mkdtemp(prefix=f"{model}-{contender}-", dir=tmp_root)
    result = os.path.join(job_dir, "result.json")
    state_dir = os.path.join(job_dir, "state")
    os.makedirs(state_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    script = [os.path.abspath(__file__), "--worker", contender, "--model", model, "--result", result,
              "--state-dir", state_dir, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--clip", str(args.clip)]
    if contender.startswith("gpu-"):
        env.pop("OMP_NUM_THREADS")  # one process: all cores
        env.pop("DS_ACCELERATOR")
        cmd = [sys.executable] + script
    elif launcher == "deepspeed":
        cmd = [_deepspeed_launcher(), "--num_gpus", str(WORLD), "--master_port", str(_ranks.free_port())] + script
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"] + script
    if hosts is not None and not contender.startswith("gpu-"):
        cmds = _host_commands(hosts, launcher, _layout(args.layout)[1], script, job_dir)
        env["GLOO_SOCKET_IFNAME"] = hosts[0].ifname  # every host's end of the link has this name
    else:
        cmds = [cmd]
    for c in cmds:
        print(f"> {model} {contender}: {' '.join(map(str, c))}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        code = (_ranks.run_job(cmd, env, args.timeout) if len(cmds) == 1 else
                _run_on_hosts(hosts, cmds, env, args.timeout))
        if code != 0 or not os.path.exists(result):
            raise RuntimeError(f"{contender} on {model} failed (exit {code}); see its output above")
        with open(result) as f:
            out = json.load(f)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    out["launcher"] = "python" if contender.startswith("gpu-") else launcher
    out["layout"] = "1x1" if contender.startswith("gpu-") else args.layout
    return out


def _layout(text: str) -> tuple[int, int]:
    """--layout "HxR" as (hosts, ranks per host)."""
    try:
        hosts, per_host = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layout {text!r}: write HOSTSxRANKS, e.g. 1x2, 2x1 or 2x2") from None
    if hosts not in (1, 2) or per_host < 1:
        raise SystemExit(f"--layout {text!r}: 1 or 2 hosts (two network namespaces), at least 1 rank each")
    return hosts, per_host


def _host_commands(hosts, launcher: str, per_host: int, script: list[str], job_dir: str) -> list[list[str]]:
    """Each host's launcher command: node rank = the host's index, the rendezvous at the first
    host's link address. DeepSpeed's reads a hostfile naming both hosts (--no_ssh: it starts
    only this node's ranks)."""
    port = str(_ranks.free_port())
    out = []
    for node_rank, host in enumerate(hosts):
        if launcher == "deepspeed":
            hostfile = os.path.join(job_dir, "hostfile")
            with open(hostfile, "w") as f:
                f.writelines(f"{h.name} slots={per_host}\n" for h in hosts)
            cmd = [_deepspeed_launcher(), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
                   "--master_addr", hosts[0].address, "--master_port", port] + script
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)),
                   "--node-rank", str(node_rank), f"--nproc-per-node={per_host}", "--master-addr",
                   hosts[0].address, "--master-port", port] + script
        out.append(host.command(cmd))
    return out


def _run_on_hosts(hosts, cmds: list[list[str]], env: dict, timeout: float) -> int:
    """Every host's launcher at once, their output on our stderr; the first non-zero exit code
    (0 when all succeed). A timeout or an error kills every host's launcher and ranks."""
    import subprocess
    procs = [subprocess.Popen(c, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
             for c in cmds]
    end = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, end - time.monotonic())) for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        raise
    return next((c for c in codes if c != 0), 0)


def _deepspeed_launcher() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.path.exists(beside) else shutil.which("deepspeed")


def _report(record: dict, args) -> int:
    print(_vs_report.table(record), flush=True)
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if args.plots_dir:
        for path in _vs_report.plots(record, args.plots_dir):
            print(f"> wrote {path}", file=sys.stderr)
    agree = all(c["fp32_losses_agree"] for c in record["checks"].values())
    return 0 if agree and not record.get("errors") else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.from_json:  # the table and plots again from a saved record (checks recomputed)
        with open(args.from_json) as f:
            record = json.load(f)
        record["checks"] = _vs_report.checks(record["results"], FP32_STATE, record["loss_rtol"])
        return _report(record, args)
    # SIGTERM ends the job under way too: run_job kills its session on the SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch
    from offload_engine.plan.probe import cpu_name
    have_cuda = torch.cuda.is_available()
    models = args.models.split(",")
    for m in models:
        if m not in WORKLOADS:
            raise SystemExit(f"--models: unknown model {m!r}; choose from {', '.join(WORKLOADS)}")
    wanted = (args.contenders.split(",") if args.contenders
              else list(CPU_CONTENDERS) + (list(GPU_CONTENDERS) if args.gpu else []))
    known = set(CPU_CONTENDERS) | set(GPU_CONTENDERS) | set(EXTRA_CPU_CONTENDERS)
    for c in wanted:
        if c not in known:
            raise SystemExit(f"--contenders: unknown contender {c!r}; choose from {', '.join(sorted(known))}")
    n_hosts, per_host = _layout(args.layout)
    for m in models:
        total = WORKLOADS[m].micro_batch * WORLD
        if total % (n_hosts * per_host):
            raise SystemExit(f"--layout {args.layout}: {m}'s global batch of {total} samples does not split over "
                             f"{n_hosts * per_host} ranks")
    harness = None
    if n_hosts == 2:
        sys.path.insert(0, os.path.join(REPO, "tests"))  # the two-host harness the tests use
        from hosts import TwoHosts
        why = TwoHosts.unavailable()
        if why:
            raise SystemExit(f"--layout {args.layout}: two hosts cannot be made here: {why}")
        harness = TwoHosts()
    skipped = {c: r for c in wanted if (r := _skip_reason(c, have_cuda))}
    if any(c.startswith("ds-") for c in wanted) and not any(c.startswith("ds-") for c in skipped):
        reason = _ranks.build_deepspeed_ops(nvme="ds-zero3-nvme" in wanted)
        if reason:
            skipped.update({c: reason for c in wanted if c.startswith("ds-")})
    for c, reason in skipped.items():
        print(f"> skipping {c}: {reason}", file=sys.stderr, flush=True)
    contenders = [c for c in wanted if c not in skipped]
    launcher = args.launcher or ("deepspeed" if _deepspeed_launcher() else "torchrun")

    record = {"benchmark": "vs_deepspeed", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if have_cuda else None},
              "world": n_hosts * per_host, "layout": args.layout, "launcher": launcher,
              "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "contenders": contenders,
              "skipped": skipped, "loss_rtol": args.loss_rtol, "gradient_clipping": args.clip,
              "loadavg_before": _ranks.loadavg(), "busiest_before": _ranks.busiest_processes()}
    if record["loadavg_before"][0] > 1.0:
        print(f"> note: load average {record['loadavg_before'][0]}: timings will be noisy "
              f"({'; '.join(record['busiest_before'])})", file=sys.stderr, flush=True)
    tmp_root = tempfile.mkdtemp(prefix="vs_deepspeed-", dir=args.nvme_dir)
    runs: dict = {m: {c: [] for c in contenders} for m in models}
    failed = []
    hosts = harness.__enter__() if harness is not None else None
    try:
        for m in models:
            for rnd in range(args.rounds):
                order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)] if contenders else []
                for c in order:
                    if c in failed:
                        continue
                    try:
                        runs[m][c].append(_launch(c, m, args, tmp_root, launcher, hosts))
                    except (RuntimeError, OSError) as e:
                        print(f"> {e}", file=sys.stderr, flush=True)
                        record.setdefault("errors", {})[f"{m}/{c}"] = str(e)
                        failed.append(c)
    finally:
        if harness is not None:
            harness.__exit__(None, None, None)
        shutil.rmtree(tmp_root, ignore_errors=True)
    record["loadavg_after"] = _ranks.loadavg()
    record["results"] = _vs_report.pool(runs)
    record["checks"] = _vs_report.checks(record["results"], FP32_STATE, args.loss_rtol)
    return _report(record, args)


if __name__ == "__main__":
    sys.exit(main())
