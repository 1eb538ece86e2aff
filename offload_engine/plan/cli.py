"""`offload-plan` (also `python -m offload_engine.plan`).

    offload-plan --model base                       # rank the configurations for a built-in model
    offload-plan --model ./llama-dir --nvme-path /nvme --ranks-per-node 2 --json plan.json
    offload-plan --params 1.3e9 --dtype bf16 --no-probe   # a parameter count, from the cached probes
    offload-plan --model small --verify 5           # and run the choice: predicted against measured

    offload-plan probe                      # measure this machine (under 30 s), cache and print
    offload-plan probe --nvme-path /nvme    # the disk where the NVMe store would go
    offload-plan probe --no-probe           # print the cached probes, measure nothing
    offload-plan probe --json               # the record as JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

from ..paging import nvme_store
from .candidates import PAGE_SIZES_MB
from .probe import cache_path, load_cached, probe_machine, save_cache


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="offload-plan", description="Where the optimizer state should live on this "
                                 "machine, measured: a ranked table of configurations.")
    sub = ap.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="rank the configurations for a model (the default command)")
    what = plan.add_argument_group("the model")
    what.add_argument("--model", default=None,
                      help="a built-in size (tiny, small, medium, large, base), a local Hugging Face model directory "
                           "or config.json")
    what.add_argument("--params", default=None, help="or a parameter count (e.g. 1.3e9)")
    what.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                      help="the params' training dtype (default: the config's precision, bf16 'auto' decided here)")
    what.add_argument("--ranks-per-node", type=int, default=1)
    what.add_argument("--nodes", type=int, default=1)
    what.add_argument("--micro-batch", type=int, default=None, help="recorded with the plan (activations are the "
                      "user's; the plan sizes the optimizer state)")
    what.add_argument("--seq-len", type=int, default=None, help="sequence length (a built-in model's context grows "
                      "to it)")
    plan.add_argument("--config", default=None,
                      help="the engine config to place the state of (default: offload-train's configs/default.json)")
    plan.add_argument("--nvme-path", default=None, help="directory for NVMe state (without it no NVMe configuration "
                      "is feasible)")
    plan.add_argument("--state-dtype", nargs="+", choices=("fp32", "int8"), default=None,
                      help="only these state formats (default both)")
    plan.add_argument("--store", nargs="+", choices=("cpu", "nvme", "managed"), default=None,
                      help="only these stores (default every one this machine has)")
    plan.add_argument("--no-probe", action="store_true", help="plan from the cached probes; measure nothing")
    plan.add_argument("--cache", default=None, help=f"the probe cache (default: {cache_path()})")
    plan.add_argument("--top", type=int, default=None, help="show only the first N feasible configurations")
    plan.add_argument("--json", default=None, metavar="PATH",
                      help="write the chosen configuration as an engine config (what initialize() takes)")
    plan.add_argument("--verify", type=int, default=None, metavar="N",
                      help="run N optimizer steps of the choice and print predicted against measured")
    plan.add_argument("--record", default=None, metavar="PATH", help="write the whole plan (and --verify) as JSON")

    probe = sub.add_parser("probe", help="measure host memory, the disk, the update's rate and the GPU; cache them")
    probe.add_argument("--nvme-path", default=None,
                       help=f"directory whose disk is probed (default: {tempfile.gettempdir()})")
    probe.add_argument("--no-disk", action="store_true", help="leave the disk out")
    probe.add_argument("--no-probe", action="store_true", help="print the cached probes; measure nothing")
    probe.add_argument("--cache", default=None, help=f"the cache file (default: {cache_path()})")
    probe.add_argument("--threads", default=None,
                       help="comma-separated thread counts to time the update at (default: 1 and torch's)")
    probe.add_argument("--page-sizes", default=None,
                       help="comma-separated page sizes (MiB) to time the update and the disk at (default: the "
                            "planner's, 1,4,16)")
    probe.add_argument("--json", action="store_true", help="print the record as JSON")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("plan", "probe", "-h", "--help"):
        argv.insert(0, "plan")  # `offload-plan --model base` plans
    args = _parser().parse_args(argv)
    return _probe_command(args) if args.command == "probe" else _plan_command(args)


def _fail(message: str) -> int:
    print(f"offload-plan: {message}", file=sys.stderr)
    return 2


def _numbers(text: str, kind, what: str):
    try:
        return [kind(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated numbers, got {text!r}") from None


def _probe_command(args) -> int:
    if args.no_probe:
        if args.nvme_path or args.no_disk or args.threads or args.page_sizes:
            return _fail("probe --no-probe measures nothing; drop --nvme-path, --no-disk, --threads and --page-sizes")
        try:
            probe = load_cached(args.cache)
        except (FileNotFoundError, ValueError) as err:
            return _fail(f"probe: {err}")
    else:
        try:
            threads = _numbers(args.threads, int, "--threads") if args.threads else None
            pages = _numbers(args.page_sizes, float, "--page-sizes") if args.page_sizes else PAGE_SIZES_MB
            probe = probe_machine(None if args.no_disk else (args.nvme_path or tempfile.gettempdir()),
                                  threads=threads, page_sizes_mb=pages)
        except ValueError as err:
            return _fail(f"probe: {err}")
        where = save_cache(probe, args.cache)
        print(f"cached in {where}", file=sys.stderr)
    print(json.dumps(probe.to_json(), indent=1) if args.json else format_probe(probe))
    return 0


def _plan_command(args) -> int:
    from ..train.job import JobError, load_config_dict
    from . import planner, report, verify
    from .workload import workload

    try:
        base, _source = load_config_dict(args.config)
    except JobError as err:
        return _fail(str(err))
    try:
        params = None
        if args.params is not None:
            try:
                params = float(args.params)
            except ValueError:
                return _fail(f"--params takes a parameter count (e.g. 1.3e9), got {args.params!r}")
        if args.nvme_path is not None:
            nvme_store.check_directory(args.nvme_path)  # an unwritable path fails here, naming nvme_path
        if args.no_probe:
            probe = load_cached(args.cache)
        else:
            probe = probe_machine(args.nvme_path)
            print(f"probed in {probe.seconds:.1f} s; cached in {save_cache(probe, args.cache)}", file=sys.stderr)
        dtype = args.dtype or _config_dtype(base, probe)
        work = workload(args.model, params, dtype, ranks_per_node=args.ranks_per_node,
                                     nodes=args.nodes, micro_batch=args.micro_batch, seq_len=args.seq_len)
        plan = planner.make_plan(work, probe, base, nvme_path=args.nvme_path, state_dtypes=args.state_dtype,
                                 stores=args.store)
    except (FileNotFoundError, ValueError) as err:  # PlanError, ConfigError and an unwritable nvme_path among them
        return _fail(str(err))
    print(report.format_plan(plan, args.top))
    choice = plan.choice
    if args.json:
        if choice is None:
            return _fail("no configuration fits this node: nothing written to --json")
        with open(args.json, "w") as f:
            json.dump(choice.config, f, indent=2)
            f.write("\n")
        print(f"wrote the choice to {args.json} (offload_engine.initialize(model, config={args.json!r}))")
    result = None
    if args.verify is not None:
        if choice is None:
            return _fail("no configuration fits this node: nothing to --verify")
        try:
            result = verify.verify(choice, work, args.verify)
        except ValueError as err:
            return _fail(str(err))
        print()
        print(verify.format_verify(result))
    if args.record:
        with open(args.record, "w") as f:
            json.dump(planner.plan_record(plan, result), f, indent=1)
    return 0


def _config_dtype(config: dict, probe) -> str:
    """The params' training dtype the config gives on this machine (for the GPU when the probe
    found one)."""
    import torch

    from .for_job import config_dtype
    return config_dtype(config, torch.device("cuda" if probe.gpu is not None else "cpu"))


def format_probe(probe) -> str:
    lines = [f"{probe.host}: {probe.cpu}, {probe.cores} cores, torch {probe.torch}; probed {probe.date} "
             f"in {probe.seconds:.1f} s",
             f"  host RAM available   {probe.host_ram_available / 2**30:8.1f} GiB",
             f"  host copy            {probe.host_copy_gbps:8.1f} GB/s (read + write)"]
    if probe.disk is None:
        lines.append("  disk                 not probed")
    else:
        d = probe.disk
        how = "direct IO" if d["direct_io"] else "buffered (no direct IO: the read is the page cache's)"
        lines.append(f"  disk at {d['path']} ({how}, {d['io_threads']} IO threads), GB/s write / read / the store's "
                     "reads and writes together:")
        for mb, r in d["by_page_mb"].items():
            lines.append(f"    {mb:>4} MiB pages      {r['write_gbps']:6.2f} / {r['read_gbps']:6.2f} / {r['both_gbps']:6.2f}")
    lines.append("  update, G params/s by page size and threads:")
    for fmt, by_page in probe.update.items():
        for mb, by_threads in by_page.items():
            rates = ", ".join(f"{n} thread{'s' if n != '1' else ''} {rate / 1e9:.2f}" for n, rate in by_threads.items())
            lines.append(f"    {fmt:11} state, {mb:>4} MiB pages   {rates}")
    lines.append("  per param            " + ", ".join(
        f"{fmt} " + (", ".join(f"{v * 1e6:.1f} us at {n} thread{'s' if n != '1' else ''}" for n, v in s.items())
                     if isinstance(s, dict) else f"{s * 1e6:.1f} us") for fmt, s in probe.param_overhead_s.items()))
    if probe.gpu is None:
        lines.append("  GPU                  none (no CUDA device)")
    else:
        g = probe.gpu
        lines.append(f"  GPU {g['name']}: {g['free_bytes'] / 2**30:.1f} GiB free; pinned H2D {g['h2d_gbps']:.1f}, "
                     f"D2H {g['d2h_gbps']:.1f}, both at once {g['both_gbps']:.1f} GB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
