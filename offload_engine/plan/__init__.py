"""offload-plan: what this machine can do for the paged step (probe.py), the first part of
the planner; `offload-plan probe` runs and caches the probes (cli.py)."""
from .probe import MachineProbe, load_cached, probe_machine, save_cache

__all__ = ["MachineProbe", "load_cached", "probe_machine", "save_cache"]
