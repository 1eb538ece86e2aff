"""offload-plan: where the optimizer state should live on this machine, measured. probe.py
measures the machine; workload.py says what is planned for; sizing.py sizes each candidate by
the engine's own footprint rule; cost.py predicts its step; planner.py ranks them; cli.py is
the `offload-plan` command (report.py prints the table, verify.py runs the choice)."""
from .planner import Plan, make_plan
from .probe import MachineProbe, load_cached, probe_machine, save_cache
from .workload import PlanError, Workload

__all__ = ["MachineProbe", "Plan", "PlanError", "Workload", "load_cached", "make_plan", "probe_machine",
           "save_cache"]
