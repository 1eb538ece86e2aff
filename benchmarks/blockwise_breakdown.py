"""Where the time of the fused 8-bit AdamW step goes, on one core.

Builds the avx512vbmi block-quantized kernel (ops/csrc/cpu) into a small harness outside torch
(blockwise_breakdown.cpp), once as it is and once per ablation, each a copy of the sources with
one part of the block loop cut out:

  full            the kernel as shipped (its result is checked bit for bit against the native op)
  no-sqrt-div     sqrt(v) and m / denom replaced by multiplies (the divider's share)
  no-adam-math    the Adam update skipped: dequantize and requantize only
  no-requantize   the new m and v never quantized: dequantize and Adam math only

and times them in interleaved rounds (the machine's speed drifts), printing each build's
ns/param and its paired ratio to `full`. Then it times single zmm instructions (shuffles, mul,
sqrt, div) in cycles, the figures an argument about the kernel's floor needs. The ablated
builds compute wrong results on purpose; only their times mean anything.

    python benchmarks/blockwise_breakdown.py                    # 200K params (cache-resident), 9 rounds
    python benchmarks/blockwise_breakdown.py --size 1e8 --rounds 3

Needs g++ and an x86 CPU with AVX-512 VBMI (Ice Lake, Zen 4 or later), and the native ops built
(for the bit-for-bit check).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from offload_engine import _build, kernels  # noqa: E402
from offload_engine.quant import FORMATS, codec  # noqa: E402

HARNESS = os.path.join(REPO, "benchmarks", "blockwise_breakdown.cpp")
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
KERNEL = "cpu/adam_kernel.h"
# Each ablation: (old, new, count) edits of KERNEL; the old text must occur exactly `count`
# times, so a change to the kernel that moves it fails here instead of timing the wrong thing.
ABLATIONS = {
    "full": [],
    "no-sqrt-div": [
        ("const F denom = V::add(V::mul(V::sqrt(v), c.inv_bc2_sqrt), c.eps);",
         "const F denom = V::add(V::mul(v, c.inv_bc2_sqrt), c.eps);", 1),
        ("param = V::add(param, V::mul(V::div(m, denom), c.neg_step_size));",
         "param = V::add(param, V::mul(V::mul(m, denom), c.neg_step_size));", 1),
    ],
    "no-adam-math": [
        ("    for (; i + W <= len; i += W) {\n      adam_vector<V>(p + start + i, g + start + i, buffers, i, start + i, c);",
         "    for (; i + W <= len; i += W) {\n      asm volatile(\"\" ::: \"memory\");", 1),
    ],
    "no-requantize": [
        ("    for (int64_t j = 0; j < B; j += kChunk) {\n      quantize_m(",
         "    for (int64_t j = 0; j < 0; j += kChunk) {\n      quantize_m(", 1),
    ],
}


def missing() -> str | None:
    """Why this machine cannot run the breakdown, or None."""
    if not kernels.native_ops().available:
        return "needs the native ops built (pip install -e .), for the bit-for-bit check"
    path = kernels.simd_path()
    if path != "avx512vbmi":
        return (f"needs the avx512vbmi kernel path (AVX-512 VBMI: Ice Lake, Zen 4 or later); this machine's ops "
                f"selected {path!r} (OFFLOAD_ENGINE_SIMD may force a lower one)")
    if shutil.which("g++") is None:
        return "needs g++ on PATH"
    return None


def build(name: str, work: str) -> str:
    """Copies ops/csrc, applies the ablation's edits, compiles the harness against the copy."""
    src = os.path.join(work, name, "csrc")
    shutil.copytree(os.path.join(REPO, "ops", "csrc"), src)
    path = os.path.join(src, KERNEL)
    with open(path) as f:
        text = f.read()
    for old, new, count in ABLATIONS[name]:
        if text.count(old) != count:
            raise RuntimeError(f"ablation {name!r}: expected {count} occurrence(s) of {old!r} in {KERNEL}, "
                               f"found {text.count(old)}; update ABLATIONS to the kernel's current text")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    exe = os.path.join(work, name, "harness")
    flags = [f for f in _build.CXX_FLAGS if f != "-fopenmp"] + ["-Wno-psabi"]  # one thread: no OpenMP
    subprocess.run(["g++", *flags, "-I", src, "-o", exe, HARNESS,
                    *(os.path.join(src, "cpu", f) for f in ("plane_tables.cpp", "adam_coeffs.cpp"))], check=True)
    return exe


def write_input(path: str, n: int, block: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    fmt = FORMATS["int8"]
    state = {"param": torch.randn(n, generator=gen) * 0.1, "grad": torch.randn(n, generator=gen) * 1e-2}
    state["m_codes"], state["m_absmax"] = codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, fmt, True,
                                                                   block)
    state["v_codes"], state["v_absmax"] = codec.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, fmt, False,
                                                                   block)
    with open(path, "wb") as f:
        f.write(torch.tensor([n, block], dtype=torch.int64).numpy().tobytes())
        f.write(torch.tensor([HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")],
                             dtype=torch.float64).numpy().tobytes())
        f.write(fmt.code_map(True).numpy().tobytes())
        f.write(fmt.code_map(False).numpy().tobytes())
        for key in ("param", "grad", "m_codes", "m_absmax", "v_codes", "v_absmax"):
            f.write(state[key].contiguous().numpy().tobytes())
    return state


def check_full_matches_native(out_path: str, state: dict, block: int, steps: int) -> None:
    """The harness's `full` build after `steps` steps equals the native op's, bit for bit: the
    times below are of the kernel users run."""
    s = {k: v.clone() for k, v in state.items()}
    for step in range(1, steps + 1):
        kernels.adam_step_blockwise_(s["param"], s["grad"], s["m_codes"], s["m_absmax"], s["v_codes"], s["v_absmax"],
                                     fmt="int8", block=block, step=step, **HYPER)
    with open(out_path, "rb") as f:
        raw = f.read()
    offset = 0
    for key in ("param", "m_codes", "m_absmax", "v_codes", "v_absmax"):
        want = s[key].contiguous().view(torch.uint8)
        got = torch.frombuffer(bytearray(raw[offset:offset + want.numel()]), dtype=torch.uint8)
        offset += want.numel()
        if not torch.equal(got, want):
            raise RuntimeError(f"the harness's full build differs from the native op in {key}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=2e5, help="params (default 2e5: the data stays in L2/L3)")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds over the builds")
    ap.add_argument("--repeats", type=int, default=50, help="timed steps per build per round (min is kept)")
    ap.add_argument("--variants", default=",".join(ABLATIONS), help=f"subset of {','.join(ABLATIONS)}")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown or "full" not in names:
        ap.error(f"--variants: unknown {unknown}; allowed {sorted(ABLATIONS)}, and 'full' is required")
    reason = missing()
    if reason:
        print(f"blockwise_breakdown: {reason}", file=sys.stderr)
        return 2
    n, steps = int(args.size), 3
    with tempfile.TemporaryDirectory(prefix="blockwise_breakdown-") as work:
        exes = {name: build(name, work) for name in names}
        state = write_input(os.path.join(work, "input.bin"), n, args.block, seed=0)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names:
                out = subprocess.run([exes[name], work, str(steps), str(args.repeats)], check=True, capture_output=True,
                                     text=True).stdout
                times[name].append(json.loads(out)["ns_per_param_min"])
                if name == "full" and r == 0:
                    check_full_matches_native(os.path.join(work, "output.bin"), state, args.block, steps)
        throughput = json.loads(subprocess.run([exes["full"], "--throughput"], check=True, capture_output=True,
                                               text=True).stdout)
    rows = {}
    print(f"8-bit AdamW, fp32 params, block {args.block}, {n:,} params, one thread, {args.rounds} rounds "
          f"(min of {args.repeats} steps each); `full` equals the native op bit for bit")
    print("| build | ns/param (median of rounds) | paired vs full: median [q1, q3] |")
    print("|---|---:|---:|")
    for name in names:
        ratios = sorted(b / a for a, b in zip(times["full"], times[name]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows[name] = {"ns_per_param": statistics.median(times[name]), "per_round": times[name],
                      "vs_full": {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}}
        print(f"| {name} | {rows[name]['ns_per_param']:.3f} | {rows[name]['vs_full']['median']:.3f} "
              f"[{q[0]:.3f}, {q[2]:.3f}] |")
    print("cycles per zmm instruction (12 independent chains; clock from a dependent add chain, "
          f"{throughput['ghz']:.2f} GHz): " + ", ".join(f"{k} {v:.2f}" for k, v in throughput.items() if k != "ghz"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "blockwise_breakdown", "size": n, "block": args.block, "rounds": args.rounds,
                       "builds": rows, "cycles_per_instruction": throughput}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
