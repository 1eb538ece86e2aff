"""The run's PNG: the loss curve (each step, and a moving mean) and the optimizer state's
bytes by tier beside what torch's AdamW would hold. Imports matplotlib, which is optional:
job.py skips the plot with a note when it is missing."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402

from .report import TIER_NAMES, TIERS  # noqa: E402


def centered_mean(values: list[float], window: int) -> list[float]:
    """The mean of the `window` values centred on each one (fewer at the ends). A trailing mean
    would lag the curve by half its window (10 steps of a 300-step run's 20)."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def write_plot(path: Path, history: list[dict], summary: dict) -> Path:
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    ax_loss.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss")
    if len(losses) > 1:
        window = max(1, len(losses) // 20)
        ax_loss.plot(steps, centered_mean(losses, window), color="#1f4e79", linewidth=1.6,
                     label=f"mean of {window} steps around each")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (nats/token)")
    ax_loss.set_title(f"{summary['optimizer']}, {summary['precision']}, {summary['device']}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    mib = 2.0 ** 20
    held = summary["state_bytes"]
    bottom = 0.0
    colors = {"gpu": "#c0504d", "host": "#4f81bd", "nvme": "#9bbb59"}
    for tier in TIERS:
        ax_mem.bar("offload_engine", held[tier] / mib, bottom=bottom, color=colors[tier], label=TIER_NAMES[tier])
        bottom += held[tier] / mib
    plain_on = "gpu" if summary["device"].startswith("cuda") else "host"
    # Hatched: what torch's AdamW would hold on that tier for these params, not memory this run used.
    ax_mem.bar("torch AdamW", summary["plain_adamw_bytes"] / mib, color=colors[plain_on], hatch="//",
               edgecolor="white", label=f"torch AdamW would hold ({TIER_NAMES[plain_on]}; not allocated)")
    ax_mem.set_ylabel("optimizer state (MiB)")
    ax_mem.set_title("optimizer state by tier")
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
