"""The planner: every candidate's bytes per tier (sizing.py, the engine's own footprint rule) and
predicted step (cost.py, from the probes), checked against what the node has, ranked.

[Note: feasibility] A candidate is feasible when, on every node, the state of all its ranks
fits: host RAM (pinned or not) within the RAM the probe found available (what the admission
check weighs, [Note: admission] in engine/admission.py), the NVMe files within the free space
at nvme_path, and each rank's GPU slots within the GPU's free memory. Feasible candidates are
ranked by predicted step time, ties by host RAM; the first is the plan's choice.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

from ..paging import footprint as fp
from .candidates import Candidate, candidates, config_for
from .cost import StepPrediction, predict
from .probe import MachineProbe
from .sizing import RankSize, footprint_of, size_rank
from .workload import PlanError, Workload

BNB_BLOCK = 256          # bitsandbytes' blockwise 8-bit optimizers: one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # ... and 32-bit state for params smaller than this


@dataclasses.dataclass
class Row:
    candidate: Candidate
    config: dict               # what initialize() takes for this candidate
    rank: RankSize             # rank 0's share
    footprint: fp.Footprint    # rank 0's bytes per tier
    node: fp.Footprint         # the first node's ranks together
    predicted: StepPrediction | None
    infeasible: str | None     # why not, or None


@dataclasses.dataclass(frozen=True)
class Anchor:
    """What another optimizer would need for the same model, per node (bytes per tier)."""

    name: str
    node: fp.Footprint
    note: str


@dataclasses.dataclass
class Plan:
    workload: Workload
    probe: MachineProbe
    rows: list                 # feasible first, ranked; then the infeasible ones
    anchors: list
    threads: int               # update threads per rank

    @property
    def choice(self) -> Row | None:
        return self.rows[0] if self.rows and self.rows[0].infeasible is None else None


def threads_per_rank(probe: MachineProbe, ranks_per_node: int) -> int:
    return max(1, probe.cores // ranks_per_node)


def make_plan(workload: Workload, probe: MachineProbe, base_config: dict, *, nvme_path: str | None = None,
              state_dtypes=None, stores=None) -> Plan:
    """Ranks every candidate for `workload` on the probed machine, from `base_config` (the
    engine config to place the state of). Raises PlanError for a world the node cannot run."""
    gpu = probe.gpu is not None
    if workload.ranks_per_node > probe.cores:
        raise PlanError(f"ranks_per_node {workload.ranks_per_node} does not fit this node: it has {probe.cores} cores "
                        "(each rank needs one)")
    if gpu and workload.ranks_per_node > probe.gpu.get("count", 1):
        raise PlanError(f"ranks_per_node {workload.ranks_per_node} does not fit this node: it has "
                        f"{probe.gpu.get('count', 1)} GPU(s) (one rank per GPU)")
    threads = threads_per_rank(probe, workload.ranks_per_node)
    disk_free = _disk_free(nvme_path) if nvme_path else None
    layouts: dict = {}  # (state dtype, page size, rank) -> RankSize: store, executor and prefetch keep the pages
    rows = []
    for cand in candidates(gpu, **({"state_dtypes": state_dtypes} if state_dtypes else {}),
                           **({"stores": stores} if stores else {})):
        config = config_for(base_config, cand, nvme_path)
        ranks = []
        for r in range(workload.ranks_per_node):
            key = (cand.state_dtype, cand.page_size_mb, r)
            if key not in layouts:
                layouts[key] = size_rank(config, workload, r)
            ranks.append(layouts[key])
        feet = [footprint_of(r, cand, gpu) for r in ranks]
        node = sum(feet, fp.Footprint())
        why = _infeasible(cand, node, feet[0], probe, nvme_path, disk_free)
        predicted = None
        if why is None:
            predicted = max((predict(probe, r, cand, threads=threads, gpu_params=gpu,
                                     ranks_per_disk=workload.ranks_per_node) for r in ranks),
                            key=lambda p: p.step_s)  # the slowest rank sets the step
        if predicted is not None and predicted.gpu_fraction is not None:
            # The hybrid's split is chosen: its config and its (smaller) staging buffers follow.
            cand = dataclasses.replace(cand, gpu_fraction=predicted.gpu_fraction)
            config = config_for(base_config, cand, nvme_path)
            feet = [footprint_of(r, cand, gpu) for r in ranks]
            node = sum(feet, fp.Footprint())
        rows.append(Row(cand, config, ranks[0], feet[0], node, predicted, why))
    rows.sort(key=lambda r: (r.infeasible is not None, r.predicted.step_s if r.predicted else 0.0,
                             r.node.host_ram, r.node.disk))
    return Plan(workload, probe, rows, anchors(workload, gpu), threads)


def _disk_free(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError as err:
        raise PlanError(f"nvme_path {path!r}: {err.strerror or err}") from None


def _infeasible(cand: Candidate, node: fp.Footprint, rank: fp.Footprint, probe: MachineProbe, nvme_path, disk_free):
    """[Note: feasibility]: why `cand` cannot run here, or None."""
    if cand.store == "nvme":
        if nvme_path is None:
            return "no nvme_path given (--nvme-path)"
        if probe.disk is None:
            return "the disk at nvme_path is not probed"
        if os.path.realpath(probe.disk["path"]) != os.path.realpath(nvme_path):
            return f"the disk probed is at {probe.disk['path']}, not nvme_path {nvme_path}: probe it"
        if node.disk > disk_free:
            return f"the node's NVMe files need {_gib(node.disk)}, {_gib(disk_free)} free at nvme_path"
    if node.host_ram > probe.host_ram_available:
        return f"the node's ranks need {_gib(node.host_ram)} of host RAM, {_gib(probe.host_ram_available)} available"
    if rank.gpu and (probe.gpu is None or rank.gpu > probe.gpu["free_bytes"]):
        free = probe.gpu["free_bytes"] if probe.gpu else 0
        return f"a rank needs {_gib(rank.gpu)} of GPU memory, {_gib(free)} free"
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def anchors(workload: Workload, gpu: bool) -> list[Anchor]:
    """What torch.optim.AdamW, DeepSpeed ZeRO-2-Offload and bitsandbytes' PagedAdamW8bit would
    hold for the same params on one node (their state, as each sizes it)."""
    numels = [_numel(s) for s in workload.shapes]
    total = sum(numels)
    elsize = {"fp32": 4, "bf16": 2, "fp16": 2}[workload.dtype]
    rpn = workload.ranks_per_node
    adamw = 2 * total * elsize * rpn  # exp_avg and exp_avg_sq in the params' dtype, every rank a whole copy
    torch_anchor = Anchor("torch AdamW", fp.Footprint(gpu=adamw) if gpu else fp.Footprint(host=adamw),
                          "exp_avg, exp_avg_sq in the params' dtype beside the params; not partitioned")
    # DeepSpeed's estimate_zero2_model_states_mem_needs with cpu_offload (its additional
    # buffer factor 1.5): GPU 2 bytes per param per GPU, CPU params x max(4 x GPUs, 16) x 1.5.
    gpus = workload.world
    ds_cpu = int(total * max(4 * gpus, 16) * 1.5)
    ds = Anchor("DeepSpeed ZeRO-2-Offload", fp.Footprint(gpu=2 * total * rpn, pinned_host=ds_cpu),
                "its own estimate (estimate_zero2_model_states_mem_needs, cpu_offload)"
                + ("" if gpu else "; needs a GPU"))
    bnb = sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in numels) * rpn
    bnb_anchor = Anchor("bitsandbytes PagedAdamW8bit", fp.Footprint(host=bnb),
                        "8-bit moments in CUDA managed memory (resting on the host when the GPU is full); not "
                        "partitioned" + ("" if gpu else "; needs a GPU"))
    return [torch_anchor, ds, bnb_anchor]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_record(plan: Plan, verified: dict | None = None) -> dict:
    """The plan as JSON: the workload, the probes, every row and the anchors (and --verify)."""
    w = plan.workload
    return {
        "workload": {"description": w.description, "params": w.numel, "dtype": w.dtype,
                     "ranks_per_node": w.ranks_per_node, "nodes": w.nodes, "micro_batch": w.micro_batch,
                     "seq_len": w.seq_len},
        "probe": plan.probe.to_json(),
        "threads_per_rank": plan.threads,
        "rows": [{"configuration": r.candidate.label(), "candidate": dataclasses.asdict(r.candidate),
                  "optimizer": r.rank.optimizer, "pages": r.rank.pages,
                  "rank_bytes": r.footprint.as_dict(), "node_bytes": r.node.as_dict(),
                  "predicted": r.predicted.as_dict() if r.predicted else None, "infeasible": r.infeasible}
                 for r in plan.rows],
        "anchors": [{"name": a.name, "node_bytes": a.node.as_dict(), "note": a.note} for a in plan.anchors],
        "choice": plan.choice.config if plan.choice else None,
        "verify": verified,
    }
