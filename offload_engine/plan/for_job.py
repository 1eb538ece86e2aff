"""`offload-train --plan`: the main job's config with its state placed where the planner puts it.

The job's config (the embedded default or --config) is the base: the planner ranks every
configuration for the job's model and precision on this machine (from the cached probe, or a
probe taken now and cached), and the job trains with the first feasible one, its paging section
and optimizer type as `offload-plan --json` would write them. NVMe configurations are weighed
only where the base config names an nvme_path (paging.nvme_path, or DeepSpeed's
zero_optimization.offload_optimizer.nvme_path), as `offload-plan --nvme-path` would.
"""
from __future__ import annotations

import dataclasses

from .planner import Plan, make_plan
from .probe import MachineProbe, load_cached, probe_machine, save_cache
from .workload import PlanError, workload


@dataclasses.dataclass(frozen=True)
class JobPlan:
    config: dict              # what the job trains with
    plan: Plan
    probed_now: bool          # no cached probe: one was taken (and cached)

    def note(self) -> str:
        row = self.plan.choice
        ranked = sum(r.infeasible is None for r in self.plan.rows)
        return (f"--plan: {row.candidate.label()} ({row.config['optimizer']['type']}), predicted optimizer step "
                f"{row.predicted.step_s * 1e3:.1f} ms, first of {ranked} feasible configurations on {self.plan.probe.host} "
                f"(probed {self.plan.probe.date}{', now' if self.probed_now else ''}; `offload-plan --model ...` "
                "prints the table)")


def config_dtype(config: dict, device) -> str:
    """The params' training dtype `config` gives on `device` (bf16 "auto" decided as
    initialize() decides it)."""
    bf16 = (config.get("bf16") or {}).get("enabled", False)
    if bf16 == "auto":
        from ..engine.precision import choose_bf16
        bf16, _why = choose_bf16(device)
    if bf16:
        return "bf16"
    return "fp16" if (config.get("fp16") or {}).get("enabled", False) else "fp32"


def nvme_path_of(config: dict) -> str | None:
    paging = config.get("paging") or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    path = paging.get("nvme_path") or offload.get("nvme_path")
    return path if isinstance(path, str) and path else None


def plan_job(base: dict, model: str, dtype: str, seq_len: int | None = None, cache: str | None = None,
             log=None) -> JobPlan:
    """The planner's choice for the job (module docstring); PlanError when nothing fits."""
    probed_now = False
    try:
        probe: MachineProbe = load_cached(cache)
    except (FileNotFoundError, ValueError):
        nvme_path = nvme_path_of(base)
        if log is not None:
            log("offload-train: --plan: no probe of this machine is cached; probing it now (about 20 s, once)")
        probe = probe_machine(nvme_path)
        save_cache(probe, cache)
        probed_now = True
    plan = make_plan(workload(model, dtype=dtype, seq_len=seq_len), probe, base, nvme_path=nvme_path_of(base))
    if plan.choice is None:
        reasons = sorted({r.infeasible for r in plan.rows if r.infeasible})
        raise PlanError(f"--plan: no configuration fits this machine ({'; '.join(reasons)})")
    return JobPlan(plan.choice.config, plan, probed_now)
