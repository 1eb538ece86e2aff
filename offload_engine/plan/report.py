"""The plan as a table: ranked configurations with their predicted step by component and bytes
per tier on one node, the other optimizers' needs beside them, and why the infeasible ones
cannot run."""
from __future__ import annotations

from .planner import Plan


def _size(n: int) -> str:
    if n == 0:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if n < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan, top: int | None = None) -> str:
    w = plan.workload
    p = plan.probe
    world = f"{w.ranks_per_node} rank{'s' if w.ranks_per_node > 1 else ''} per node x {w.nodes} node" \
            f"{'s' if w.nodes > 1 else ''}"
    lines = [f"plan for {w.description}: {w.numel / 1e6:.1f}M trainable params in {w.dtype}, {world}, "
             f"{plan.threads} update thread{'s' if plan.threads > 1 else ''} per rank",
             f"machine {p.host} ({p.cpu}, {p.cores} cores), probed {p.date}",
             "predicted optimizer step (ms) = max(update + params, io) + fill; bytes are one node's optimizer state",
             "",
             f"{'#':>3}  {'configuration':38} {'step':>8} {'update':>8} {'params':>7} {'io':>8} {'fill':>6}  "
             f"{'bound':6} {'GPU':>9} {'pinned':>9} {'host':>9} {'disk':>9}"]
    feasible = [r for r in plan.rows if r.infeasible is None]
    shown = feasible if top is None else feasible[:top]
    for i, row in enumerate(shown, 1):
        t, n = row.predicted, row.node
        lines.append(f"{i:>3}  {row.candidate.label():38} {t.step_s * 1e3:8.2f} {t.update_s * 1e3:8.2f} "
                     f"{t.params_s * 1e3:7.2f} {t.io_s * 1e3:8.2f} {t.fill_s * 1e3:6.2f}  {t.bound:6} "
                     f"{_size(n.gpu):>9} {_size(n.pinned_host):>9} {_size(n.host):>9} {_size(n.disk):>9}")
    if len(shown) < len(feasible):
        lines.append(f"     ... {len(feasible) - len(shown)} more feasible (--top)")
    lines += ["", "beside them (their optimizer state on one node, as each sizes it):"]
    for a in plan.anchors:
        n = a.node
        lines.append(f"     {a.name:38} {'':46} {_size(n.gpu):>9} {_size(n.pinned_host):>9} {_size(n.host):>9} "
                     f"{_size(n.disk):>9}  ({a.note})")
    infeasible = [r for r in plan.rows if r.infeasible is not None]
    if infeasible:
        lines += ["", "infeasible here:"]
        reasons: dict = {}
        for row in infeasible:
            reasons.setdefault(row.infeasible, []).append(row.candidate.label())
        for why, labels in reasons.items():
            lines.append(f"     {why}: {len(labels)} configuration{'s' if len(labels) > 1 else ''} "
                         f"({labels[0]}{', ...' if len(labels) > 1 else ''})")
    choice = plan.choice
    lines.append("")
    lines.append(f"choice: {choice.candidate.label()}" if choice else "choice: none; no configuration fits this node")
    return "\n".join(lines)
