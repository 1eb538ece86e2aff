"""CUDA kernel throughput: our fp32-state Adam and 8-bit/4-bit AdamW kernels against torch's
fused AdamW on the same tensors, and a device-to-device copy measured in the same run (the
bandwidth ceiling any of them can reach).

Each contender runs on random data (never zeros), timed with CUDA events after warm-up;
contenders are interleaved round-robin and the median step time is reported, with Gparam/s,
achieved GB/s counting the bytes a step must read and write, the fraction of the copy's
bandwidth, and the speed relative to torch's fused AdamW on fp32 params.

Run (on a GPU, after `pip install --no-build-isolation -e .` with a CUDA torch):
    python benchmarks/gpu_kernels.py                         # 100M and 1B params
    python benchmarks/gpu_kernels.py --sizes 1e8 --repeats 20 --json out.json
"""
import argparse
import datetime
import json
import statistics

import torch

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def bytes_per_param(name):
    """Bytes a step must move per param (each input read once, each output written once)."""
    return {
        "copy": 8.0,  # fp32: read 4, write 4
        "ours fp32": 28.0,  # read p, g, m, v (16); write p, m, v (12)
        "torch fused fp32": 28.0,
        "ours bf16 p/g": 22.0,  # read p, g (4) + m, v (8); write p (2) + m, v (8)
        "ours 8-bit": 16.0 + 16.0 / 256,  # read p, g (8) + 2 codes; write p (4) + 2 codes; absmax per 256
        "ours 4-bit": 14.0 + 16.0 / 128,  # read p, g (8) + 1; write p (4) + 1; absmax per 128
    }[name]


def make_contenders(n, device, which):
    """{name: callable doing one step}, all on their own random data of n params."""
    from offload_engine import kernels
    from offload_engine.quant import FORMATS

    ops = torch.ops.offload_engine
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    # One set of tensors shared by the contenders (each step rewrites p and the state in place,
    # which keeps them random and finite): at 1B params everything fits in about 35 GB.
    p, g = randn(n), randn(n, scale=1e-2)
    m, v = randn(n, scale=1e-3), randn(n, scale=1e-3).abs_()
    out = {}
    step = [0]

    def next_step():
        step[0] += 1
        return step[0]

    if "copy" in which:
        src, dst = g, torch.empty_like(g)
        out["copy"] = lambda: dst.copy_(src)
    if "ours" in which:
        out["ours fp32"] = lambda: ops.adam_step_(p, g, m, v, step=next_step(), **HYPER)
    if "ours-bf16" in which:
        p16, g16 = p.to(torch.bfloat16), g.to(torch.bfloat16)
        out["ours bf16 p/g"] = lambda: ops.adam_step_(p16, g16, m, v, step=next_step(), **HYPER)
    if "torch" in which:
        p_t = p  # the same param and grad tensors; torch keeps its own moments
        p_t.grad = g
        opt = torch.optim.AdamW([p_t], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                weight_decay=HYPER["weight_decay"], fused=True)
        opt.step()  # creates its state
        with torch.no_grad():
            st = opt.state[p_t]
            st["exp_avg"].copy_(m)
            st["exp_avg_sq"].copy_(v)
        out["torch fused fp32"] = opt.step
    for name, fmt, block in (("ours8", "int8", 256), ("ours4", "int4", 128)):
        if name not in which:
            continue
        f = FORMATS[fmt]
        blocks = -(-n // block)
        code_bytes = f.code_bytes(n, block)
        # Random codes over the whole map and random scales: the kernel requantizes every step.
        state = [torch.randint(0, 256, (code_bytes,), dtype=torch.uint8, device=device, generator=gen),
                 torch.rand(blocks, device=device, generator=gen) * 1e-2 + 1e-4,
                 torch.randint(0, 256, (code_bytes,), dtype=torch.uint8, device=device, generator=gen),
                 torch.rand(blocks, device=device, generator=gen) * 1e-5 + 1e-8]
        p_q = p
        m_t, v_t = kernels._tables_on(fmt, True, device), kernels._tables_on(fmt, False, device)
        lut_params = [m_t.min_exponent, m_t.mantissa_bits, v_t.min_exponent, v_t.mantissa_bits]

        def run(p_q=p_q, state=state, m_t=m_t, v_t=v_t, lut_params=lut_params, bits=f.bits, block=block):
            ops.adam_step_blockwise_(p_q, g, *state, m_t.map, m_t.lut, v_t.map, v_t.lut, lut_params, bits=bits,
                                     block=block, step=next_step(), **HYPER)
        out["ours 8-bit" if fmt == "int8" else "ours 4-bit"] = run
    return out


def time_round_robin(contenders, warmup, repeats):
    """Median ms per call of each contender, interleaved so drifts (clocks, heat) hit all alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e8,1e9", help="params per tensor, comma-separated")
    ap.add_argument("--contenders", default="copy,ours,ours-bf16,torch,ours8,ours4")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py: no CUDA GPU (torch.cuda.is_available() is False)")
    from offload_engine import kernels

    if not kernels.cuda_ops_built():
        raise SystemExit("gpu_kernels.py: the native ops were built without CUDA kernels")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    header = (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__} (CUDA {torch.version.cuda}); {datetime.date.today()}")
    print(header)
    which = set(args.contenders.split(","))
    rows, raw = [], {}
    for n in (int(float(s)) for s in args.sizes.split(",")):
        contenders = make_contenders(n, device, which)
        medians, times = time_round_robin(contenders, args.warmup, args.repeats)
        raw[n] = times
        copy_gbs = n * bytes_per_param("copy") / medians["copy"] / 1e6 if "copy" in medians else None
        torch_ms = medians.get("torch fused fp32")
        for name, ms in medians.items():
            gbs = n * bytes_per_param(name) / ms / 1e6
            rows.append(dict(size=n, contender=name, ms=ms, gparams=n / ms / 1e6, gbs=gbs,
                             bytes_per_param=bytes_per_param(name),
                             of_copy=gbs / copy_gbs if copy_gbs else None,
                             vs_torch=torch_ms / ms if torch_ms and name != "copy" else None))
        del contenders
        torch.cuda.empty_cache()
    print()
    print("| size | contender | B/param | median ms | Gparam/s | GB/s | of copy GB/s | speed vs torch fused |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        of_copy = f"{r['of_copy']:.2f}" if r["of_copy"] is not None else ""
        vs = f"{r['vs_torch']:.2f}x" if r["vs_torch"] is not None else ""
        print(f"| {r['size'] / 1e6:.0f}M | {r['contender']} | {r['bytes_per_param']:.4g} | {r['ms']:.3f} | "
              f"{r['gparams']:.1f} | {r['gbs']:.0f} | {of_copy} | {vs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows, raw={str(k): v for k, v in raw.items()}), f, indent=1)


if __name__ == "__main__":
    main()
