"""`offload-plan` (also `python -m offload_engine.plan`).

    offload-plan probe                      # measure this machine (a few seconds), cache and print
    offload-plan probe --nvme-path /nvme    # the disk where the NVMe store would go
    offload-plan probe --no-probe           # print the cached probes, measure nothing
    offload-plan probe --json               # the record as JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

from .probe import cache_path, load_cached, probe_machine, save_cache


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="offload-plan", description="What this machine can do for the paged step.")
    sub = ap.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="measure host memory, the disk, the update's rate and the GPU; cache them")
    probe.add_argument("--nvme-path", default=None,
                       help=f"directory whose disk is probed (default: {tempfile.gettempdir()})")
    probe.add_argument("--no-disk", action="store_true", help="leave the disk out")
    probe.add_argument("--no-probe", action="store_true", help="print the cached probes; measure nothing")
    probe.add_argument("--cache", default=None, help=f"the cache file (default: {cache_path()})")
    probe.add_argument("--threads", default=None,
                       help="comma-separated thread counts to time the update at (default: 1 and torch's)")
    probe.add_argument("--json", action="store_true", help="print the record as JSON")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.no_probe:
        if args.nvme_path or args.no_disk or args.threads:
            print("offload-plan probe: --no-probe measures nothing; drop --nvme-path, --no-disk and --threads",
                  file=sys.stderr)
            return 2
        try:
            probe = load_cached(args.cache)
        except (FileNotFoundError, ValueError) as err:
            print(f"offload-plan probe: {err}", file=sys.stderr)
            return 2
    else:
        try:
            threads = [int(t) for t in args.threads.split(",")] if args.threads else None
        except ValueError:
            print(f"offload-plan probe: --threads takes comma-separated integers, got {args.threads!r}",
                  file=sys.stderr)
            return 2
        try:
            probe = probe_machine(None if args.no_disk else (args.nvme_path or tempfile.gettempdir()),
                                  threads=threads)
        except ValueError as err:
            print(f"offload-plan probe: {err}", file=sys.stderr)
            return 2
        where = save_cache(probe, args.cache)
        print(f"cached in {where}", file=sys.stderr)
    print(json.dumps(probe.to_json(), indent=1) if args.json else format_probe(probe))
    return 0


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
        lines.append(f"  disk at {d['path']}: write {d['write_gbps']:.2f} GB/s, read {d['read_gbps']:.2f} GB/s, {how}")
    for fmt, by_threads in probe.update.items():
        rates = ", ".join(f"{n} thread{'s' if n != '1' else ''} {rate / 1e9:.2f}" for n, rate in by_threads.items())
        lines.append(f"  update, {fmt:4} state   {rates} G params/s")
    if probe.gpu is None:
        lines.append("  GPU                  none (no CUDA device)")
    else:
        g = probe.gpu
        lines.append(f"  GPU {g['name']}: {g['free_bytes'] / 2**30:.1f} GiB free; pinned H2D {g['h2d_gbps']:.1f}, "
                     f"D2H {g['d2h_gbps']:.1f}, both at once {g['both_gbps']:.1f} GB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
