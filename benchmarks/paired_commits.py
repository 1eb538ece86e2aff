"""Step time of this tree against another commit, paired in one run: the regression check for a
change that should not move performance (a refactor).

The base commit is checked out in a temporary git worktree; with the native ops unchanged
between the two (ops/ and setup.py), it borrows this tree's built extension, so the two differ
in their Python only. Each round runs benchmarks/engine_step.py, benchmarks/paging.py and
benchmarks/step_overhead.py (this tree's copies, so the harness is the same) once per tree, the order alternating from round to
round so that a drift of the machine hits both alike. Printed per figure: the median over the
rounds for each tree, and the paired ratio, this tree's time over the base's in the same round
(below 1: faster), as the median over the rounds with its range, which is the noise to read
the median against.

    python benchmarks/paired_commits.py --base a593087
    python benchmarks/paired_commits.py --base HEAD~3 --rounds 5 --params 5e7 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_base_tree(rev: str, where: Path) -> Path:
    """A worktree of `rev` at `where`, with this tree's built extension copied in."""
    changed = subprocess.run(["git", "diff", "--quiet", rev, "--", "ops", "setup.py"], cwd=ROOT).returncode
    if changed:
        raise SystemExit(f"--base {rev}: ops/ or setup.py differ from this tree, so the base needs its own build; "
                         "build it in a worktree and compare with PYTHONPATH by hand")
    built = sorted((ROOT / "offload_engine").glob("_C*.so"))
    if not built:
        raise SystemExit(f"no built extension in {ROOT / 'offload_engine'}: build this tree first "
                         "(pip install --no-build-isolation -e .)")
    git("worktree", "add", "--detach", str(where), rev)
    for so in built:
        shutil.copy2(so, where / "offload_engine" / so.name)
    return where


def run(tree: Path, script: str, args: list[str]) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    # PYTHONPATH puts the tree's package ahead of the installed (editable) one.
    proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{script} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    if Path(result.get("package", str(tree))).resolve() != tree.resolve():
        raise SystemExit(f"{script} ran {result['package']}, not the tree {tree}")
    return result


def figures(engine: dict, paging: dict, overhead: dict) -> dict:
    """{figure name: seconds} from one run of each benchmark."""
    out = {f"engine_step {name}": s for name, s in engine["median_s"].items()}
    for name, row in overhead["rows"].items():
        out[f"overhead {name} ({row['pages']} pages)"] = row["paged_s"]
        for early in ("all", "kept"):
            if f"overlapped_{early}_s" in row:  # the overlapped step's host work ([Note: overlapped step])
                out[f"overhead {name} overlapped early={early}"] = row[f"overlapped_{early}_s"]
    for row in paging["rows"]:
        if "unpaged_s" in row:
            out[f"paging {row['format']} unpaged"] = row["unpaged_s"]
            out[f"paging {row['format']} host {row['page_mb']:g}MB"] = row["step_s"]
        else:
            out[f"paging {row['format']} nvme {row['page_mb']:g}MB d={row['depth']}"] = row["step_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", default="2e7")
    ap.add_argument("--repeats", default="7", help="engine_step.py --repeats")
    ap.add_argument("--steps", default="5", help="paging.py --steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    head = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")
    base_rev = git("rev-parse", "--short", args.base)
    engine_args = ["--params", args.params, "--contenders", "torch,ours-loop,engine,engine-paged8",
                   "--repeats", args.repeats]
    paging_args = ["--params", args.params, "--page-sizes", "4", "--depths", "2", "--formats", "fp32,int8",
                   "--steps", args.steps]
    scratch = Path(tempfile.mkdtemp(prefix="oe_paired_"))
    base_tree = make_base_tree(args.base, scratch / "base")
    trees = {"base": base_tree, "head": ROOT}
    samples: dict = {"base": [], "head": []}
    try:
        for r in range(args.rounds):
            for label in (("base", "head") if r % 2 == 0 else ("head", "base")):
                tree = trees[label]
                samples[label].append(figures(run(tree, "engine_step.py", engine_args),
                                              run(tree, "paging.py", paging_args),
                                              run(tree, "step_overhead.py", [])))
                print(f"round {r + 1}/{args.rounds} {label} done", file=sys.stderr, flush=True)
    finally:
        git("worktree", "remove", "--force", str(base_tree))
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# {head} against {base_rev}, {args.rounds} rounds, {float(args.params):.0e} params, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    print(f"{'figure':<36}{'base ms':>10}{'head ms':>10}  {'head/base, paired: median [min, max]':<38}")
    table = {}
    for name in samples["base"][0]:
        b = [s[name] for s in samples["base"]]
        h = [s[name] for s in samples["head"]]
        ratios = [x / y for x, y in zip(h, b)]  # round r's head against round r's base
        med = statistics.median(ratios)
        table[name] = {"base_s": b, "head_s": h, "paired_ratios": ratios, "paired_median": med}
        print(f"{name:<36}{statistics.median(b) * 1e3:>10.3f}{statistics.median(h) * 1e3:>10.3f}  "
              f"{med:.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"head": head, "base": base_rev, "rounds": args.rounds,
                                               "params": float(args.params), "figures": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
