"""The fused block-quantized Adam kernel equals the reference (dequantize, fp32 step,
requantize) bit for bit, on every forced SIMD path: params, codes and absmax, every step."""
import json
import subprocess
import sys

import pytest
import torch

from offload_engine import kernels, reference
from offload_engine.quant import FORMATS, codec, maps
from conftest import bits, import_benchmark


def _state(n, fmt, block, gen):
    f = FORMATS[fmt]
    m_codes, m_absmax = codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, f, True, block)
    v_codes, v_absmax = codec.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, f, False, block)
    return [m_codes, m_absmax, v_codes, v_absmax]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097, 70_001])
def test_blockwise_bit_identical_to_reference(simd_path, fmt, block, n):
    gen = torch.Generator().manual_seed(n * 7 + block)
    for param_dtype, grad_dtype, mode in ((torch.float32, torch.float32, dict(adamw_mode=True)),
                                          (torch.bfloat16, torch.bfloat16, dict(stochastic_rounding=True)),
                                          (torch.float16, torch.float32, dict(adamw_mode=False, maximize=True,
                                                                              grad_scale=0.5))):
        p = (torch.randn(n, generator=gen) * 0.1).to(param_dtype)
        state = _state(n, fmt, block, gen)
        p_ref, state_ref = p.clone(), [t.clone() for t in state]
        for step in range(1, 6):
            g = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
            hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step, seed=step, **mode)
            kernels.adam_step_blockwise_(p, g, *state, fmt=fmt, block=block, **hyper)
            reference.adam_step_blockwise_(p_ref, g, *state_ref, fmt=FORMATS[fmt], block=block, **hyper)
            where = f"path={simd_path} fmt={fmt} block={block} n={n} param={param_dtype} step={step}"
            assert torch.equal(bits(p), bits(p_ref)), where
            for name, a, b in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), state, state_ref):
                assert torch.equal(a, b), f"{name} {where}"


def _good_args(n=300, fmt="int8", block=256):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n), torch.randn(n)] + _state(n, fmt, block, gen)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "m_codes must be a contiguous 1-D tensor of 512 bytes"),
    (lambda a: a.__setitem__(5, a[5].double()), TypeError, "v_absmax must be float32"),
    (lambda a: a.__setitem__(1, torch.randn(301)), ValueError, "grad has shape"),
    (lambda a: a.__setitem__(4, a[4].float()), TypeError, "v_codes must be uint8"),
])
def test_blockwise_bad_input_names_it_and_writes_nothing(native, mutate, exc, words):
    args = _good_args()
    mutate(args)
    before = [t.clone() for t in args]
    with pytest.raises(exc, match=words):
        kernels.adam_step_blockwise_(*args, fmt="int8", block=256, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                     weight_decay=0.0, step=1)
    for a, b in zip(args, before):
        assert torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)


def test_blockwise_bad_block_and_format(native):
    args = _good_args()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="block must be a power of two"):
        kernels.adam_step_blockwise_(*args, fmt="int8", block=100, **hyper)
    with pytest.raises(ValueError, match="fmt must be one of"):
        kernels.adam_step_blockwise_(*args, fmt="int2", block=256, **hyper)


@pytest.mark.parametrize("fmt,block", [("int8", 256), ("int4", 128)])
def test_blockwise_opcheck(native, fmt, block):
    n = 300
    gen = torch.Generator().manual_seed(2)
    m_t, v_t = codec.code_tables(fmt, True), codec.code_tables(fmt, False)
    args = [torch.randn(n), torch.randn(n)] + _state(n, fmt, block, gen) + [
        m_t.map, m_t.lut, v_t.map, v_t.lut,
        [m_t.min_exponent, m_t.mantissa_bits, v_t.min_exponent, v_t.mantissa_bits]]
    kwargs = dict(bits=FORMATS[fmt].bits, block=block, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  step=2, adamw_mode=True, bias_correction=True, maximize=False, grad_scale=1.0,
                  stochastic_rounding=False, seed=0)
    torch.library.opcheck(torch.ops.offload_engine.adam_step_blockwise_.default, tuple(args), kwargs)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_non_finite_and_subnormal_blocks_stay_in_bounds_and_match(simd_path, fmt):
    """NaN/inf gradients (inf moments) and a block whose absmax decays below 2^-126 take
    defined codes, equal to the reference's, and every code fits its bit width."""
    n, block = 600, 256
    gen = torch.Generator().manual_seed(9)
    p = torch.randn(n, generator=gen)
    state = _state(n, fmt, block, gen)
    p_ref, state_ref = p.clone(), [t.clone() for t in state]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    grads = [torch.randn(n, generator=gen) * 1e-2 for _ in range(2)]
    bad = grads[1].clone()
    bad[3], bad[300], bad[301] = float("nan"), float("inf"), -float("inf")
    for step, g in enumerate(grads + [bad], start=1):
        kernels.adam_step_blockwise_(p, g, *state, fmt=fmt, block=block, step=step, **hyper)
        reference.adam_step_blockwise_(p_ref, g, *state_ref, fmt=FORMATS[fmt], block=block, step=step, **hyper)
        for a, b in zip(state, state_ref):
            assert torch.equal(a, b), f"step {step}"
        assert torch.equal(torch.isnan(p), torch.isnan(p_ref)) and torch.equal(p[~torch.isnan(p)], p_ref[~torch.isnan(p_ref)])
    codes = codec.unpack(state[0], FORMATS[fmt].bits)
    assert int(codes.max()) < 2 ** FORMATS[fmt].bits


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_block_decaying_to_subnormal_absmax(native, fmt):
    """One gradient, then zeros: exp_avg's absmax shrinks by beta1 each step through the
    subnormal range, where 1/absmax overflows; kernel and reference flush it alike."""
    n, block = 256, 256
    f = FORMATS[fmt]
    p = torch.randn(n)
    state = list(codec.quantize_blockwise(torch.randn(n) * 1e-36, f, True, block)) + \
        list(codec.quantize_blockwise(torch.rand(n) * 1e-36, f, False, block))
    p_ref, state_ref = p.clone(), [t.clone() for t in state]
    zero = torch.zeros(n)
    for step in range(1, 40):
        hyper = dict(lr=1e-3, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.0, step=step)
        kernels.adam_step_blockwise_(p, zero, *state, fmt=fmt, block=block, **hyper)
        reference.adam_step_blockwise_(p_ref, zero, *state_ref, fmt=f, block=block, **hyper)
        for a, b in zip(state, state_ref):
            assert torch.equal(a, b), f"step {step}, absmax {float(state_ref[1][0]):.3g}"
    assert float(state[1][0]) < 2.0 ** -126  # the run did reach the subnormal range


def _with_unit_absmax(values: torch.Tensor, block: int) -> torch.Tensor:
    """values laid out so that every block starts with 1.0: with beta1 = 0 (m = g) and
    beta2 = 0 (v = g * g) each block's absmax is 1 and the kernel quantizes m = g and v = g*g
    exactly as given, so values can sit on a threshold or one ulp from it."""
    per_block = block - 1
    pad = (-len(values)) % per_block
    body = torch.cat([values, torch.zeros(pad)]).view(-1, per_block)
    return torch.cat([torch.ones(len(body), 1), body], dim=1).reshape(-1).contiguous()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_codes_at_every_threshold(simd_path, fmt):
    """The codec's hardest inputs, through the public step: every threshold of both maps, one
    ulp either side, every map value, signed zeros, tiny, subnormal, |x| >= 1 and NaN of both
    signs. Codes and absmax equal the reference's on every path (nearest code, no tie slack)."""
    f = FORMATS[fmt]
    block = 256
    m_map, v_map = f.code_map(True), f.code_map(False)
    m_mid, v_mid = maps.midpoints(m_map)[:-1], maps.midpoints(v_map)[:-1]
    near = lambda t: torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])  # noqa: E731
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 1.0, -1.0, 0.999999, -0.999999,
                            float("nan"), -float("nan")])
    # m = g: the signed map's thresholds directly. v = g * g: g = sqrt of the unsigned map's.
    targets = ((0, torch.cat([near(m_mid), m_map, special])), (2, torch.cat([near(v_mid.sqrt()), v_map.sqrt(), special])))
    for target, g_values in targets:
        g = _with_unit_absmax(g_values, block)
        n = len(g)
        p = torch.zeros(n)
        state = [torch.zeros(f.code_bytes(n, block), dtype=torch.uint8), torch.zeros(n // block),
                 torch.zeros(f.code_bytes(n, block), dtype=torch.uint8), torch.zeros(n // block)]
        p_ref, state_ref = p.clone(), [t.clone() for t in state]
        hyper = dict(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1)
        kernels.adam_step_blockwise_(p, g, *state, fmt=fmt, block=block, **hyper)
        reference.adam_step_blockwise_(p_ref, g, *state_ref, fmt=f, block=block, **hyper)
        for name, a, b in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), state, state_ref):
            assert torch.equal(a, b), f"{name} path={simd_path} fmt={fmt}"
        assert torch.equal(state[1], torch.ones_like(state[1]))  # the unit absmax the inputs rely on
        # The inputs reach every code of the map they target.
        assert len(torch.unique(codec.unpack(state[target], f.bits))) == 2 ** f.bits, f"path={simd_path}"


def _custom_maps():
    gen = torch.Generator().manual_seed(5)
    jitter = torch.linspace(-1, 1, 256) + torch.rand(256, generator=gen) * 1e-3
    # (signed, unsigned) maps; the avx512vbmi byte tables hold the first and last pair, not the
    # jittered (thresholds too close) nor the wide ones (thresholds >= 1), nor a threshold at 0.
    return {
        "linear-256": (torch.linspace(-1, 1, 257)[1:], torch.linspace(0, 1, 256)),
        "jittered-256": (jitter.sort().values.clamp(-1, 1), jitter.abs().sort().values),
        "wide-256": (torch.linspace(-3, 3, 256), torch.linspace(0, 3, 256)),
        "symmetric-256": (torch.linspace(-1, 1, 256), torch.linspace(0, 1, 256) ** 2),
        "cubic-16": (torch.linspace(-1, 1, 17)[1:] ** 3, torch.linspace(0, 1, 16) ** 3),
    }


@pytest.mark.parametrize("name", list(_custom_maps()))
def test_any_map_gives_the_same_codes_on_every_path(native, monkeypatch, name):
    """The op takes its maps as arguments: maps other than the formats' (including ones the
    avx512vbmi byte tables cannot hold, which keep the gathers there) code alike everywhere."""
    from offload_engine import kernels as k
    m_map, v_map = (t.float().contiguous() for t in _custom_maps()[name])
    bits_ = 8 if len(m_map) == 256 else 4
    tables = []
    for code_map in (m_map, v_map):
        lookup = maps.build_lookup(code_map)
        tables.append((code_map, lookup.packed.contiguous(), lookup.min_exponent, lookup.mantissa_bits))
    n, block = 3001, 64
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 1e-2 for _ in range(3)]
    code_bytes = (n + block - 1) // block * block * bits_ // 8
    results = {}
    for path in native.supported_simd_paths():
        monkeypatch.setenv("OFFLOAD_ENGINE_SIMD", path)
        p = p0.clone()
        state = [torch.zeros(code_bytes, dtype=torch.uint8), torch.zeros((n + block - 1) // block),
                 torch.zeros(code_bytes, dtype=torch.uint8), torch.zeros((n + block - 1) // block)]
        for step, g in enumerate(grads, start=1):
            torch.ops.offload_engine.adam_step_blockwise_(
                p, g, *state, tables[0][0], tables[0][1], tables[1][0], tables[1][1],
                [tables[0][2], tables[0][3], tables[1][2], tables[1][3]], bits=bits_, block=block,
                **k._adam_kwargs(1e-3, 0.9, 0.999, 1e-8, 0.0, step, True, True, False, 1.0, False, 0, 0))
        results[path] = [p] + state
    first = next(iter(results.values()))
    assert len(torch.unique(first[1])) > 2 ** bits_ // 4  # the run spread over the map
    for path, got in results.items():
        for a, b in zip(got, first):
            assert torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b), path


def test_breakdown_harness_runs_the_shipped_kernel(tmp_path):
    """benchmarks/blockwise_breakdown.py at a tiny size: its `full` build reproduces the native
    op bit for bit (the script checks and fails otherwise) and every requested build is timed.
    No timing is asserted."""
    bb = import_benchmark("blockwise_breakdown")
    reason = bb.missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "breakdown.json"
    proc = subprocess.run([sys.executable, bb.__file__, "--size", "4097", "--rounds", "1", "--repeats", "2",
                           "--variants", "full,no-requantize", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`full` equals the native op bit for bit" in proc.stdout
    rec = json.loads(out.read_text())
    assert set(rec["builds"]) == {"full", "no-requantize"} and rec["size"] == 4097
    assert all(b["ns_per_param"] > 0 for b in rec["builds"].values())
    assert set(rec["cycles_per_instruction"]) >= {"ghz", "vpermi2b", "vsqrtps", "vdivps"}


def test_breakdown_refuses_an_ablation_the_kernel_no_longer_matches(tmp_path, monkeypatch):
    bb = import_benchmark("blockwise_breakdown")
    monkeypatch.setitem(bb.ABLATIONS, "no-requantize", [("text the kernel does not have", "x", 1)])
    with pytest.raises(RuntimeError, match="ablation 'no-requantize': expected 1 occurrence"):
        bb.build("no-requantize", str(tmp_path))
