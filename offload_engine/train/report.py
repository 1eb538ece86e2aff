"""What `offload-train` prints and records: the optimizer state's bytes by tier (GPU pool,
host RAM, NVMe) beside what torch's AdamW would hold, the closing summary table, and the
side-by-side table of `--compare`."""
from __future__ import annotations

import torch

TIERS = ("gpu", "host", "nvme")
TIER_NAMES = {"gpu": "GPU pool", "host": "host RAM", "nvme": "NVMe"}


def state_bytes_by_tier(optimizer, stats: dict | None = None) -> dict:
    """Bytes the optimizer holds for its state, by where they live. A paged optimizer: its
    store (host RAM or an NVMe file), its host slots and pinned staging, its GPU slots (from
    `stats`, its paging_stats(), when the caller has them already). Any other optimizer: its
    state tensors by device."""
    tiers = dict.fromkeys(TIERS, 0)
    if stats is None and hasattr(optimizer, "paging_stats"):
        stats = optimizer.paging_stats()
    if stats is not None:
        s = stats
        tiers["nvme" if s["store"] == "nvme" else "host"] += s["store_bytes"]
        tiers["host"] += s["pool_bytes"] + s["pinned_host_bytes"]
        tiers["gpu"] += s["device_pool_bytes"]
        return tiers
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                tiers["gpu" if value.is_cuda else "host"] += value.numel() * value.element_size()
    return tiers


def plain_adamw_bytes(optimizer, precision: str) -> int:
    """What torch.optim.AdamW in a mixed-precision setup keeps beside the model: fp32 m and v
    (8 bytes per trainable element), and an fp32 master copy (4 more) when the params are
    bf16/fp16 -- all on the params' device."""
    elements = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return elements * (8 if precision == "fp32" else 12)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s:,.1f} s" if s >= 1 else f"{s * 1e3:,.0f} ms"


def _share(part: float, whole: float) -> str:
    return f" ({100 * part / whole:.0f}%)" if whole > 0 else ""


def summary_rows(s: dict) -> list[tuple[str, str]]:
    t = s["time"]
    tiers = s["state_bytes"]
    held = " | ".join(f"{TIER_NAMES[k]} {mib(tiers[k])}" for k in TIERS)
    opt_s = t["optimizer_s"]
    paging = (f"; in it update {_seconds(t['update_s'])}, waiting on pages {_seconds(t['wait_s'])}"
              if s["paged"] else "")
    io = (f"fetch {_seconds(t['fetch_s'])}, write-back {_seconds(t['writeback_s'])} on IO threads"
          + (" (host store updated in place: no copies)" if s["paged"] and s["in_place"] else "")
          if s["paged"] else "no paging (state stays where the update runs)")
    return [
        ("model", f"{s['model']}: {s['params']:,} params ({s['trainable']:,} trainable), {s['precision']}, "
                  f"on {s['device']}"),
        ("optimizer", f"{s['optimizer']} ({s['config']})"),
        ("loss", f"{s['loss_start']:.4f} at step {s['loss_start_step']} -> {s['loss_end']:.4f} "
                 f"(median of steps {s['loss_end_steps'][0]}-{s['loss_end_steps'][1]})"),
        ("steps", f"{s['steps_done']} this run (to step {s['last_step']}), {s['tokens']:,} tokens in "
                  f"{_seconds(s['wall_s'])}"),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s, {_seconds(s['step_s_mean'])} per step"),
        ("optimizer state", held),
        ("  torch AdamW", f"would hold {mib(s['plain_adamw_bytes'])} on {s['device']} ({_plain_what(s['precision'])}); "
                          f"ours {mib(sum(tiers.values()))} in all tiers"),
        ("peak memory", f"RSS {mib(s['peak_rss_bytes'])}; GPU {mib(s['peak_gpu_bytes'])}"),
        ("time split", f"forward+backward {_seconds(t['forward_backward_s'])}"
                       f"{_share(t['forward_backward_s'], t['forward_backward_s'] + opt_s)}, optimizer step "
                       f"{_seconds(opt_s)}{_share(opt_s, t['forward_backward_s'] + opt_s)}{paging}"),
        ("  paging", io),
        *_speculation_rows(s.get("speculation")),
        *_delayed_rows(s.get("delayed")),
    ]


def _delayed_rows(d) -> list[tuple[str, str]]:
    """paging.overlap "delayed": how many steps ran during the next window's forward and backward."""
    if not d:
        return []
    return [("  overlap", f"delayed: {d['steps_delayed']} steps updated during the next forward and backward "
                          f"(after {d['warmup_steps']} undelayed warm-up steps); param copies "
                          f"{mib(d['param_copy_bytes'])}")]


def _speculation_rows(spec) -> list[tuple[str, str]]:
    """paging.overlap "exact": steps whose pages ran during backward on a guess, and how it went."""
    if not spec:
        return []
    hit = "-" if spec["hit_rate"] is None else f"{spec['hit_rate']:.0%}"
    return [("  overlap", f"{spec['steps']} steps: {spec['kept']} kept their pages updated in backward, "
                          f"{spec['redo']} redid them (clipped), {spec['skipped']} took them back (skipped), "
                          f"{spec['waited']} waited; hit rate {hit}; kept at most {mib(spec['peak_kept_bytes'])}")]


def _plain_what(precision: str) -> str:
    return "fp32 m and v" if precision == "fp32" else "fp32 m, v and master"


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    rows = ([header] if header else []) + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if header and n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(row[-1]))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    title = "offload-train: " + ("interrupted" if s["interrupted"] else "done")
    return f"{title}\n{format_table(summary_rows(s))}"


def compare_rows(base: dict, ours: dict) -> list[tuple[str, str, str, str]]:
    def ratio(a, b, fmt="{:.2f}x"):
        return fmt.format(b / a) if a else "-"

    base_state, our_state = sum(base["state_bytes"].values()), sum(ours["state_bytes"].values())
    rows = [
        ("optimizer", base["optimizer"], ours["optimizer"], ""),
        ("precision", base["precision"], ours["precision"], ""),
        ("loss start -> end", f"{base['loss_start']:.3f} -> {base['loss_end']:.3f}",
         f"{ours['loss_start']:.3f} -> {ours['loss_end']:.3f}", ""),
    ]
    for tier in TIERS:
        rows.append((f"state in {TIER_NAMES[tier]}", mib(base["state_bytes"][tier]), mib(ours["state_bytes"][tier]),
                     ""))
    rows += [
        ("state, all tiers", mib(base_state), mib(our_state), ratio(base_state, our_state)),
        ("params", mib(base["param_bytes"]), mib(ours["param_bytes"]), ratio(base["param_bytes"], ours["param_bytes"])),
        ("params + state", mib(base["param_bytes"] + base_state), mib(ours["param_bytes"] + our_state),
         ratio(base["param_bytes"] + base_state, ours["param_bytes"] + our_state)),
        ("peak RSS", mib(base["peak_rss_bytes"]), mib(ours["peak_rss_bytes"]),
         ratio(base["peak_rss_bytes"], ours["peak_rss_bytes"])),
        ("peak GPU memory", mib(base["peak_gpu_bytes"]), mib(ours["peak_gpu_bytes"]),
         ratio(base["peak_gpu_bytes"], ours["peak_gpu_bytes"]) if base["peak_gpu_bytes"] else ""),
        ("tokens/s", f"{base['tokens_per_s']:,.0f}", f"{ours['tokens_per_s']:,.0f}",
         ratio(base["tokens_per_s"], ours["tokens_per_s"])),
        ("step time", _seconds(base["step_s_mean"]), _seconds(ours["step_s_mean"]),
         ratio(base["step_s_mean"], ours["step_s_mean"])),
        ("optimizer step time", _seconds(base["time"]["optimizer_s"] / max(base["steps_done"], 1)),
         _seconds(ours["time"]["optimizer_s"] / max(ours["steps_done"], 1)),
         ratio(base["time"]["optimizer_s"] / max(base["steps_done"], 1),
               ours["time"]["optimizer_s"] / max(ours["steps_done"], 1))),
    ]
    return rows


def format_compare(base: dict, ours: dict) -> str:
    header = ("", "torch AdamW", "offload_engine", "ours / torch")
    return "offload-train --compare: the same job, two optimizers\n" + format_table(compare_rows(base, ours), header)
