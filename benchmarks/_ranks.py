"""Helpers the multi-rank benchmarks share (deepspeed_zero3_nvme.py, vs_deepspeed.py): step-time
statistics, the slowest rank's time per step, the machine's load, and starting a job's ranks
under a launcher with a time limit.

The benchmark scripts import this as a sibling module (``import _ranks``): a script's own
directory is first on sys.path, also when torchrun or the deepspeed launcher starts it."""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys


def summarize(ms: list[float]) -> dict:
    """Median, mean, min, max, p10, p90, stdev of a list of milliseconds."""
    ms = sorted(ms)
    n = len(ms)

    def q(f):  # nearest-rank percentile
        return ms[min(n - 1, max(0, round(f * (n - 1))))]
    return {"median": round(statistics.median(ms), 2), "mean": round(statistics.fmean(ms), 2),
            "min": round(ms[0], 2), "max": round(ms[-1], 2), "p10": round(q(0.1), 2), "p90": round(q(0.9), 2),
            "stdev": round(statistics.stdev(ms), 2) if n > 1 else 0.0, "n": n}


def raw_ms(times: dict) -> dict:
    """{name: [seconds]} -> {name: [milliseconds, rounded to the microsecond]}."""
    return {name: [round(v * 1e3, 3) for v in values] for name, values in times.items()}


def slowest_rank(dist, per_rank: dict) -> dict:
    """{name: [seconds per step]} of this rank -> the per-step max over ranks (on every rank).
    A data-parallel step ends when its slowest rank does."""
    import torch
    out = {}
    for name, values in per_rank.items():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = t.tolist()
    return out


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def busiest_processes(n: int = 3) -> list[str]:
    """The `n` processes using the most CPU now (psutil, sampled over 0.5 s), for the record:
    on a 2-core machine another job's test suite doubles every step time."""
    try:
        import psutil
    except ImportError:
        return []
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    import time
    time.sleep(0.5)
    usage = []
    for p in procs:
        try:
            usage.append((p.cpu_percent(None), p.info["pid"], " ".join(p.info["cmdline"] or [p.info["name"]])[:100]))
        except psutil.Error:
            pass
    usage.sort(reverse=True)
    return [f"{cpu:.0f}% pid {pid}: {cmd}" for cpu, pid, cmd in usage[:n] if pid != os.getpid()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_DIR = "/dev/shm"


def deepspeed_shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank, named
    deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (about 66 MiB each), and never
    unlinks it: a sweep of 2-rank DeepSpeed jobs left 12 GiB of a 24 GiB machine's RAM in
    tmpfs. The names of this user's such files now present."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}
    except OSError:  # no /dev/shm (not Linux): nothing to clean
        return set()


def run_job(cmd: list[str], env: dict, timeout: float) -> int:
    """Runs `cmd` (a launcher and its ranks) with its output on our stderr, so that the parent's
    stdout carries only its own lines. The job gets its own session, so a timeout (or Ctrl-C)
    ends the launcher and every rank together. Returns the exit code. DeepSpeed shared-memory
    buffers that appeared while it ran are removed once every rank is gone (see
    deepspeed_shm_buffers); ones that were there before are left alone."""
    before = deepspeed_shm_buffers()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        for name in deepspeed_shm_buffers() - before:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


# ---- DeepSpeed's ops, checked and built once before any rank starts ---------------------------------
def deepspeed_missing(nvme: bool = True) -> str | None:
    """Why DeepSpeed cannot run here (None when it can), with NVMe offload when `nvme`.
    Builds nothing."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to skip
        return f"deepspeed is not importable ({type(e).__name__}: {e}); pip install deepspeed"
    if not nvme:
        return None
    try:
        aio = get_accelerator().create_op_builder("AsyncIOBuilder")
        if aio is None or not aio.is_compatible(verbose=False):
            return ("DeepSpeed's async_io op cannot be built: libaio (headers and .so) not found; "
                    "apt-get install libaio-dev")
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to skip
        return f"DeepSpeed's async_io op check failed ({type(e).__name__}: {e})"
    return None


def build_deepspeed_ops(nvme: bool = True) -> str | None:
    """JIT-builds (or loads from the cache) cpu_adam, and async_io when `nvme`, once, before the
    ranks start, so that no rank's first step includes minutes of compiling."""
    import time

    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    for op in ("AsyncIOBuilder", "CPUAdamBuilder") if nvme else ("CPUAdamBuilder",):
        builder = acc.create_op_builder(op)
        t = time.perf_counter()
        print(f"> loading DeepSpeed op {builder.name} (a first use JIT-builds it: minutes)", file=sys.stderr, flush=True)
        try:
            builder.load(verbose=False)
        except Exception as e:  # noqa: BLE001 - any failure to load is a reason to skip
            return f"DeepSpeed's {builder.name} op failed to build ({type(e).__name__}: {e})"
        print(f">   {builder.name} ready in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return None
