"""Predicted time of one paged optimizer step, by component, from the machine's probes.

[Note: step model] The step is one call of the optimizer's step() (wall time): every page of
the rank's state updated once. Its parts:
  update    elements / the probed update rate of their format (fp32 or 8-bit state, with or
            without master weights) at the candidate's page size and the rank's thread count
            (cores / ranks per node): the probe runs the paged optimizer itself on host pages,
            so the page work is in it;
  params    params x the probed per-param cost of their format, with or without master
            weights, at the thread count (a job, its segments, a master's copy to its param);
  io        pages that travel through slots, each read and written once, but for the first
            read and the last write: at the probed rate of reads and writes in flight together
            at that page size (the disk's for the NVMe store, shared by the node's ranks;
            pinned PCIe copies both ways for the CUDA executor);
  fill      the pipeline's ends, which nothing overlaps: the first page read before any
            update, the last one written after all of them.
With slots, the update and the transfers overlap (prefetch_depth pages ahead), so the step is
max(update + params, io) + fill; with pages in place it is update + params.
The CUDA executor's own kernel time is taken as hidden behind its copies (it moves every
page's bytes over PCIe, an order of magnitude slower than the GPU's memory).

[Note: hybrid model] The hybrid executor gives a fraction f of the pages to the CUDA side and
the rest to the CPU side, at once (paging/executors/hybrid.py). With G the step of the CUDA
executor alone and C that of the CPU executor alone (CUDA params), its step is
max(f G, (1 - f) C, link(f)) where link(f) is what both sides move over PCIe together (f of the
pages in and out, 1 - f of the params and grads down and the params up) at the probed
both-ways rate: the two sides share that wire. f is the best of 0, 0.01, ..., 1.
"""
from __future__ import annotations

import dataclasses

from .candidates import Candidate
from .probe import MachineProbe
from .sizing import RankSize


@dataclasses.dataclass(frozen=True)
class StepPrediction:
    update_s: float
    params_s: float
    io_s: float
    fill_s: float
    step_s: float
    bound: str                 # "update" | "disk" | "pcie" | "split": what sets the step
    gpu_fraction: float | None = None  # the hybrid's split ([Note: hybrid model])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nearest(table: dict, value: float, what: str) -> dict | float:
    """table[k] for the probed key k (a number as a string) nearest at or below `value`, or the
    smallest probed."""
    if not table:
        raise ValueError(f"the probes have no {what}")
    keys = sorted(table, key=float)
    below = [k for k in keys if float(k) <= value]
    return table[below[-1] if below else keys[0]]


def rate(probe: MachineProbe, fmt: str, page_size_mb: float, threads: int) -> float:
    """Params per second for format key `fmt` ("int8", "fp32+master", ...) at a page size and
    thread count: the probed ones nearest below (or the smallest probed); a format with master
    weights falls back to its plain rate when a probe record lacks it."""
    by_page = probe.update.get(fmt) or probe.update.get(fmt.split("+")[0])
    if not by_page:
        raise ValueError(f"the probes have no update rate for {fmt} state (probed: {', '.join(probe.update)})")
    return _nearest(_nearest(by_page, page_size_mb, f"{fmt} page sizes"), threads, f"{fmt} thread counts")


def overhead_s(probe: MachineProbe, fmt: str, threads: int) -> float:
    """The probed seconds per param of format key `fmt` ("int8+master", ...) at the thread count
    nearest below `threads`; a record of an older probe holds one figure per plain format (at one
    thread), which stands for its "+master" key too."""
    value = probe.param_overhead_s.get(fmt, probe.param_overhead_s.get(fmt.split("+")[0], 0.0))
    return _nearest(value, threads, f"{fmt} per-param thread counts") if isinstance(value, dict) else value


def predict(probe: MachineProbe, size: RankSize, candidate: Candidate, *, threads: int, gpu_params: bool = False,
            ranks_per_disk: int = 1, ranks_per_gpu: int = 1) -> StepPrediction:
    """[Note: step model] for one rank's share (`size`) under `candidate`; `gpu_params`: the
    params are on a GPU."""
    if candidate.executor == "hybrid":
        return hybrid_split(probe, size, candidate, threads=threads, ranks_per_disk=ranks_per_disk,
                            ranks_per_gpu=ranks_per_gpu)
    cuda = candidate.executor == "cuda"
    mb = candidate.page_size_mb
    update = 0.0 if cuda else sum(n / rate(probe, fmt, mb, threads) for fmt, n in size.numel.items())
    params = sum(n * overhead_s(probe, fmt, threads) for fmt, n in size.params.items())
    page = size.page_bytes
    inner = 2 * max(0, size.pages - 1) * page  # every page in and out but the first in and the last out
    io = fill = 0.0
    bound = "update"
    if candidate.store == "nvme":
        if probe.disk is None:
            raise ValueError("an NVMe candidate needs the disk's probes: probe with --nvme-path")
        disk = _nearest(probe.disk["by_page_mb"], mb, "disk page sizes")
        io = inner / (disk["both_gbps"] * 1e9 / ranks_per_disk)
        fill = page / (disk["read_gbps"] * 1e9) + page / (disk["write_gbps"] * 1e9)
        bound = "disk"
    if cuda or gpu_params:
        gpu = probe.gpu
        if gpu is None:
            raise ValueError("CUDA params or the CUDA executor need the GPU's probes (probe on a machine with CUDA)")
        # The CUDA executor moves every page over PCIe; the CPU executor with CUDA params moves
        # each param and its grad down and the param back up (executors/cpu_for_cuda.py).
        link = (inner if cuda else 2 * size.param_bytes) / (gpu["both_gbps"] * 1e9 / ranks_per_gpu)
        if cuda:
            fill += page / (gpu["h2d_gbps"] * 1e9) + page / (gpu["d2h_gbps"] * 1e9)
        if link > io:
            io, bound = link, "pcie"
    if io == 0.0 and fill == 0.0:
        return StepPrediction(update, params, 0.0, 0.0, update + params, "update")
    if update + params >= io:
        bound = "update"
    return StepPrediction(update, params, io, fill, max(update + params, io) + fill, bound)


def hybrid_split(probe: MachineProbe, size: RankSize, candidate: Candidate, *, threads: int, ranks_per_disk: int = 1,
                 ranks_per_gpu: int = 1) -> StepPrediction:
    """[Note: hybrid model]: the split with the shortest predicted step, and that step."""
    if probe.gpu is None:
        raise ValueError("the hybrid executor needs the GPU's probes (probe on a machine with CUDA)")
    kw = dict(threads=threads, gpu_params=True, ranks_per_disk=ranks_per_disk, ranks_per_gpu=ranks_per_gpu)
    gpu = predict(probe, size, dataclasses.replace(candidate, executor="cuda", gpu_fraction=None), **kw)
    cpu = predict(probe, size, dataclasses.replace(candidate, executor="cpu", gpu_fraction=None), **kw)
    both = probe.gpu["both_gbps"] * 1e9 / ranks_per_gpu
    pages = 2 * max(0, size.pages - 1) * size.page_bytes
    best = None
    for i in range(101):
        f = i / 100
        parts = {"pcie": (f * pages + (1 - f) * 2 * size.param_bytes) / both,
                 "split": max(f * gpu.step_s, (1 - f) * cpu.step_s)}
        step = max(parts.values())
        if best is None or step < best[1]:
            best = (f, step, max(parts, key=parts.get))
    f, step, bound = best
    return StepPrediction(update_s=(1 - f) * cpu.update_s, params_s=(1 - f) * cpu.params_s,
                          io_s=max(f * gpu.io_s, (1 - f) * cpu.io_s), fill_s=f * gpu.fill_s, step_s=step, bound=bound,
                          gpu_fraction=f)
