"""vs_deepspeed.py's figures: pooling each contender's rounds, the checks (fp32 losses agree,
the targets' ratios), the markdown table and the PNG plots."""
from __future__ import annotations

import os
import statistics

from _ranks import summarize

# (ours, DeepSpeed's anchor): the comparisons the targets are set on; ours must take at most
# TARGET x the anchor's median step.
TARGETS = (("ours-host", "ds-zero2-cpu"), ("ours-nvme", "ds-zero3-nvme"))
TARGET = 0.5
GPU_CEILING = "gpu-torch-adamw"
# Ours against the anchor that keeps the same state in the same place: fp32 state in host RAM
# (torchao's CPU offload), 8-bit state outside GPU memory (bitsandbytes' paged, managed memory).
GPU_PAIRS = (("gpu-ours-host", "gpu-torchao-offload"), ("gpu-ours-host-8bit", "gpu-bnb-paged8"))


def pool(runs: dict) -> dict:
    """{model: {contender: [one dict per round]}} -> {model: {contender: pooled figures}}."""
    out = {}
    for model, by_contender in runs.items():
        out[model] = {}
        for contender, rounds in by_contender.items():
            if not rounds:
                continue
            first = rounds[0]
            step = [v for r in rounds for v in r["raw_ms"]["step"]]
            opt = [v for r in rounds for v in r["raw_ms"]["opt"]]
            step_ms = summarize(step)
            out[model][contender] = {
                "params": first["params"], "world": first["world"], "launcher": first["launcher"],
                "optimizer": first["optimizer"], "tokens_per_step": first["tokens_per_step"],
                "step_ms": step_ms, "opt_ms": summarize(opt),
                "round_median_step_ms": [round(statistics.median(r["raw_ms"]["step"]), 2) for r in rounds],
                "tokens_per_s": round(first["tokens_per_step"] / (step_ms["median"] / 1e3), 1),
                "peak_rss_max_rank": max(r["peak_rss_max_rank"] for r in rounds),
                "peak_rss_sum": max(r["peak_rss_sum"] for r in rounds),
                "pss_sum_end": max(r.get("pss_sum_end", 0) for r in rounds),
                "peak_gpu_bytes": max(r["peak_gpu_bytes"] for r in rounds),
                "state_bytes": first["state_bytes"],
                "link_bytes_per_step": first.get("link_bytes_per_step", 0), "layout": first.get("layout", "1x2"),
                "phases_ms": first.get("phases_ms", {}),
                "speculation": first.get("speculation"),
                "final_loss": first["final_loss"], "final_loss_by_round": [r["final_loss"] for r in rounds],
                "losses": first["losses"], "init_s": [r["init_s"] for r in rounds],
                "wall_s": [r["wall_s"] for r in rounds],
                **({"deepspeed": first["deepspeed"]} if "deepspeed" in first else {}),
            }
    return out


def checks(results: dict, fp32_state: set, rtol: float) -> dict:
    """Per model: do the fp32-state contenders' losses agree (relative to the first anchor
    present), how far is every other contender, and the targets' ratios."""
    out = {}
    for model, by in results.items():
        fp32 = [c for c in by if c in fp32_state]
        ref = "ds-zero2-cpu" if "ds-zero2-cpu" in by else (fp32[0] if fp32 else None)
        rel = {}
        if ref is not None:
            base = by[ref]["final_loss"]
            rel = {c: abs(r["final_loss"] - base) / max(abs(base), 1e-30) for c, r in by.items()}
        worst = max((rel[c] for c in fp32), default=0.0)
        ratios = {}
        for ours, anchor in TARGETS:
            if ours in by and anchor in by:
                step = by[ours]["step_ms"]["median"] / by[anchor]["step_ms"]["median"]
                opt = by[ours]["opt_ms"]["median"] / by[anchor]["opt_ms"]["median"]
                ratios[f"{ours}/{anchor}"] = {"step": round(step, 3), "opt": round(opt, 3), "target": TARGET,
                                              "met": step <= TARGET}
        if GPU_CEILING in by:
            for c, r in by.items():
                if c.startswith("gpu-") and c != GPU_CEILING:
                    ratios[f"{c}/{GPU_CEILING}"] = {
                        "step": round(r["step_ms"]["median"] / by[GPU_CEILING]["step_ms"]["median"], 3)}
        # Our default exchange against every rank over gloo (two hosts: hierarchical against flat).
        if "ours-host" in by and "ours-host-gloo" in by:
            a, b = by["ours-host"], by["ours-host-gloo"]
            ratios["ours-host/ours-host-gloo"] = {
                "step": round(a["step_ms"]["median"] / b["step_ms"]["median"], 3),
                "opt": round(a["opt_ms"]["median"] / b["opt_ms"]["median"], 3),
                **({"link_bytes": round(a["link_bytes_per_step"] / b["link_bytes_per_step"], 3)}
                   if a.get("link_bytes_per_step") and b.get("link_bytes_per_step") else {})}
        for ours, anchor in GPU_PAIRS:
            if ours in by and anchor in by:
                ratios[f"{ours}/{anchor}"] = {
                    "step": round(by[ours]["step_ms"]["median"] / by[anchor]["step_ms"]["median"], 3),
                    "opt": round(by[ours]["opt_ms"]["median"] / by[anchor]["opt_ms"]["median"], 3)}
        out[model] = {"loss_reference": ref, "loss_rel_diff": {c: float(f"{v:.3g}") for c, v in rel.items()},
                      "fp32_max_rel_diff": float(f"{worst:.3g}"), "fp32_losses_agree": worst <= rtol,
                      "ratios": ratios}
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}" if n else "0"


def table(record: dict) -> str:
    head = ("| model | params | contender | step ms median (p10-p90) | engine.step ms | tokens/s | "
            "peak RSS MiB (largest rank / node) | node PSS MiB at end | peak GPU MiB | state MiB host / NVMe / GPU | loss after N | "
            "vs loss ref |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, by in record["results"].items():
        chk = record["checks"][model]
        for c, r in by.items():
            s, o, st = r["step_ms"], r["opt_ms"], r["state_bytes"]
            lines.append(
                f"| {model} | {r['params'] / 1e6:.1f}M | {c} | {s['median']:.1f} ({s['p10']:.0f}-{s['p90']:.0f}) | "
                f"{o['median']:.1f} | {r['tokens_per_s']:,.0f} | {_mib(r['peak_rss_max_rank'])} / "
                f"{_mib(r['peak_rss_sum'])} | {_mib(r['pss_sum_end']) if r.get('pss_sum_end') else '-'} | "
                f"{_mib(r['peak_gpu_bytes']) if r['peak_gpu_bytes'] else '-'} | "
                f"{_mib(st['host'])} / {_mib(st['nvme'])} / {_mib(st['gpu'])} | {r['final_loss']:.6f} | "
                f"{chk['loss_rel_diff'].get(c, float('nan')):.1e} |")
    lines.append("")
    for model, by in record["results"].items():  # two hosts: the link
        sent = {c: r["link_bytes_per_step"] for c, r in by.items() if r.get("link_bytes_per_step")}
        if sent:
            lines.append(f"{model}, {record.get('layout')}: bytes on the link per step: "
                         + ", ".join(f"{c} {v / 2**20:,.2f} MiB" for c, v in sent.items()))
    for model, chk in record["checks"].items():
        agree = "agree" if chk["fp32_losses_agree"] else "DISAGREE"
        lines.append(f"{model}: fp32-state losses {agree} (largest relative difference {chk['fp32_max_rel_diff']:.1e} "
                     f"against {chk['loss_reference']}, tolerance {record['loss_rtol']:g})")
        for name, r in chk["ratios"].items():
            if "target" in r:
                lines.append(f"  {name}: step {r['step']:.2f}x, engine.step {r['opt']:.2f}x (target <= {r['target']}x: "
                             f"{'met' if r['met'] else 'NOT met'})")
            else:
                more = "".join(f", {k.replace('_', ' ')} {r[k]:.2f}x" for k in ("opt", "link_bytes") if k in r)
                lines.append(f"  {name}: step {r['step']:.2f}x{more}")
    lines.append(f"load average before {record['loadavg_before']}, after {record.get('loadavg_after')}")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------
_STYLE = {"ds-zero2-cpu": ("tab:red", "o", "-"), "ds-zero3-nvme": ("tab:red", "s", "--"),
          "ours-host": ("tab:blue", "o", "-"), "ours-nvme": ("tab:blue", "s", "--"),
          "ours-8bit": ("tab:green", "^", "-"), "ours-nvme-8bit": ("tab:green", "v", "--"),
          "gpu-ours-host": ("tab:blue", "o", "-"), "gpu-ours-host-8bit": ("tab:green", "^", "-"),
          "gpu-bnb-paged8": ("tab:purple", "D", "--"), "gpu-torchao-offload": ("tab:orange", "s", "--"),
          "gpu-torch-adamw": ("black", "x", ":")}


def plots(record: dict, out_dir: str) -> list[str]:
    """Step time and memory against model size, one line per contender over the GPT sizes (the
    8x Linear model is in the table); returns the files written (none without matplotlib).
    A record of GPU contenders only (one process each) plots every model, names its files
    vs_deepspeed_gpu_*.png, and shows peak GPU memory where the CPU plots show NVMe bytes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    results = record["results"]
    gpu = bool(record["contenders"]) and all(c.startswith("gpu-") for c in record["contenders"])
    prefix = "vs_deepspeed_gpu" if gpu else "vs_deepspeed"
    models = list(results) if gpu else [m for m in results if m.startswith("gpt")] or list(results)
    models.sort(key=lambda m: min(r["params"] for r in results[m].values()) if results[m] else 0)
    contenders = [c for c in record["contenders"] if any(c in results[m] for m in models)]
    if not models or not contenders:
        return []
    os.makedirs(out_dir, exist_ok=True)
    title = (f"{record['machine']['gpu']}, one process, {record['date']}" if gpu
             else f"{record['machine']['cpu']}, {record['world']} ranks, {record['date']}")

    def series(c, fn):
        pts = [(results[m][c]["params"] / 1e6, fn(results[m][c])) for m in models if c in results[m]]
        return [p for p, _ in pts], [v for _, v in pts]

    def line(ax, c, fn, **kw):
        color, marker, ls = _STYLE.get(c, ("tab:gray", "x", ":"))
        xs, ys = series(c, fn)
        ax.plot(xs, ys, color=color, marker=marker, linestyle=kw.pop("linestyle", ls), **kw)

    sizes = sorted({r["params"] / 1e6 for m in models for r in results[m].values()})

    def size_axis(ax):  # one labelled tick per model size, none in between
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{x:.1f}M" for x in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("model parameters")

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for c in contenders:
        line(ax, c, lambda r: r["step_ms"]["median"], label=c)
    size_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("median train step (ms)" if gpu else "median train step (ms), slowest rank")
    ax.set_title(f"Train step vs model size\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_step.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 3, figsize=(12.8, 4.2), dpi=80)
    panels = [("peak RSS, sum over ranks (MiB)", "Host memory of the job", lambda r: r["peak_rss_sum"]),
              ("optimizer state in host RAM (MiB)", "Optimizer state in host RAM", lambda r: r["state_bytes"]["host"]),
              ("optimizer state on NVMe (MiB)", "Optimizer state on NVMe (files)", lambda r: r["state_bytes"]["nvme"])]
    if gpu:  # nothing goes to NVMe here; what the GPU holds is the question
        panels[2] = ("peak GPU memory, torch's allocator (MiB)", "GPU memory of the job", lambda r: r["peak_gpu_bytes"])
    for ax, (ylabel, name, fn) in zip(axes, panels):
        for c in contenders:
            line(ax, c, lambda r, fn=fn: fn(r) / 2**20, label=c)
        size_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_memory.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written
