"""The CUDA kernels against the CPU kernel and the reference, on a GPU: bit for bit for fp32
state (params, exp_avg, exp_avg_sq, every step), equal codes and absmax for 8-bit and 4-bit
state, state that moves between the two executors mid-run, bad input, streams, opcheck, and
the optimizers with CUDA params. Skipped (with the reason) where no GPU is present."""
import itertools

import pytest
import torch

from offload_engine import kernels, reference
from offload_engine.optim import AdamW8bit, Adam4bit, CPUAdam, Lion, Lion8bit
from offload_engine.quant import FORMATS, codec
from conftest import bits

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 255, 257, 4097, 1_000_003]
MODES = {  # each a branch of the kernel: AdamW, Adam with L2 + maximize + grad_scale, SR without bias correction
    "adamw": dict(adamw_mode=True),
    "l2_max_scale": dict(adamw_mode=False, maximize=True, grad_scale=0.37),
    "sr_nobc": dict(stochastic_rounding=True, bias_correction=False),
}




def _adam(step, **over):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=step, adamw_mode=True,
              bias_correction=True, maximize=False, grad_scale=1.0, stochastic_rounding=False, seed=step * 7919)
    kw.update(over)
    return kw


def _lion(step, **over):
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False, grad_scale=1.0,
              stochastic_rounding=False, seed=step * 104729)
    kw.update(over)
    return kw


def _grads(n, dtype, gen, scale=1.0):
    """Random, never zero, spanning magnitudes the dtype holds (as tests/test_adam_kernel.py)."""
    span = {torch.float32: 6.0, torch.bfloat16: 6.0, torch.float16: 2.5}[dtype]
    mags = torch.pow(10.0, torch.empty(n).uniform_(-span, span, generator=gen))
    return (torch.randn(n, generator=gen) * mags * scale).to(dtype)


def _to(tensors, device):
    return [t.to(device) for t in tensors]


def _assert_bits(cuda_tensors, cpu_tensors, names, where):
    for name, a, b in zip(names, cuda_tensors, cpu_tensors):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name} {where}"
        if a.element_size() == 1:  # codes: compared as they are
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        else:
            a, b = bits(a), bits(b)
        if not torch.equal(a, b):
            diff = int((a != b).sum())
            raise AssertionError(f"{name}: {diff} of {b.numel()} elements differ in their bits ({where})")


# ---- fp32 state: Adam/AdamW and Lion, CUDA == CPU kernel bit for bit -------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_fp32_state_adam_bit_identical_to_cpu_kernel(gpu, n, param_dtype):
    gen = torch.Generator().manual_seed(n)
    grad_dtypes = DTYPES if n < 10_000 else [param_dtype]
    for (mode_name, mode), grad_dtype in itertools.product(MODES.items(), grad_dtypes):
        p = torch.randn(n, generator=gen).to(param_dtype)
        m = torch.randn(n, generator=gen) * 1e-3  # random state, never zeros
        v = torch.rand(n, generator=gen) * 1e-6
        cpu, dev = [p, m, v], _to([p, m, v], gpu)
        for step in range(1, 4 if n > 10_000 else 6):
            g = _grads(n, grad_dtype, gen)
            hyper = _adam(step, **mode)
            kernels.adam_step_(cpu[0], g, cpu[1], cpu[2], **hyper)
            kernels.adam_step_(dev[0], g.to(gpu), dev[1], dev[2], **hyper)
            _assert_bits(dev, cpu, ("param", "exp_avg", "exp_avg_sq"),
                         f"n={n} param={param_dtype} grad={grad_dtype} mode={mode_name} step={step}")


@pytest.mark.parametrize("n", [1, 7, 257, 4097, 1_000_003])
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_fp32_state_lion_bit_identical_to_cpu_kernel(gpu, n, param_dtype):
    gen = torch.Generator().manual_seed(10 + n)
    grad_dtypes = DTYPES if n < 10_000 else [param_dtype]
    modes = [dict(), dict(maximize=True, grad_scale=2.5, weight_decay=0.0), dict(stochastic_rounding=True)]
    for mode, grad_dtype in itertools.product(modes, grad_dtypes):
        p, m = torch.randn(n, generator=gen).to(param_dtype), torch.randn(n, generator=gen) * 1e-2
        cpu, dev = [p, m], _to([p, m], gpu)
        for step in range(1, 5):
            g = _grads(n, grad_dtype, gen)
            hyper = _lion(step, **mode)
            kernels.lion_step_(cpu[0], g, cpu[1], **hyper)
            kernels.lion_step_(dev[0], g.to(gpu), dev[1], **hyper)
            _assert_bits(dev, cpu, ("param", "exp_avg"), f"lion n={n} {param_dtype}/{grad_dtype} {mode} step={step}")


@pytest.mark.parametrize("param_dtype", DTYPES)
def test_fp32_state_bit_identical_to_reference(gpu, param_dtype):
    """Against offload_engine.reference in its fp32 mode directly (not only through the CPU kernel)."""
    n = 4097
    gen = torch.Generator().manual_seed(77)
    for mode_name, mode in MODES.items():
        p, m, v = torch.randn(n, generator=gen).to(param_dtype), torch.zeros(n), torch.zeros(n)
        ref, dev = [p.clone(), m.clone(), v.clone()], _to([p, m, v], gpu)
        for step in range(1, 8):
            g = _grads(n, torch.float32, gen)
            hyper = _adam(step, **mode)
            reference.adam_step_(ref[0], g, ref[1], ref[2], **hyper)
            kernels.adam_step_(dev[0], g.to(gpu), dev[1], dev[2], **hyper)
            _assert_bits(dev, ref, ("param", "exp_avg", "exp_avg_sq"), f"{param_dtype} {mode_name} step={step}")
        p, m = torch.randn(n, generator=gen).to(param_dtype), torch.randn(n, generator=gen)
        ref, dev = [p.clone(), m.clone()], _to([p, m], gpu)
        for step in range(1, 4):
            g = _grads(n, torch.float32, gen)
            hyper = _lion(step, stochastic_rounding=mode.get("stochastic_rounding", False))
            reference.lion_step_(ref[0], g, ref[1], **hyper)
            kernels.lion_step_(dev[0], g.to(gpu), dev[1], **hyper)
            _assert_bits(dev, ref, ("param", "exp_avg"), f"lion {param_dtype} step={step}")


def test_unaligned_views_take_the_element_path_and_match(gpu):
    """Tensors starting one element into their storage are not 16-byte aligned: the kernels fall
    back to element accesses, with the same results."""
    n = 10_001
    gen = torch.Generator().manual_seed(5)
    for param_dtype in DTYPES:
        base = [torch.randn(n + 1, generator=gen).to(param_dtype), torch.randn(n + 1, generator=gen) * 1e-3,
                torch.rand(n + 1, generator=gen) * 1e-6]
        cpu = [t[1:] for t in base]
        dev_base = _to(base, gpu)
        dev = [t[1:] for t in dev_base]
        assert dev[0].data_ptr() % 16 != 0
        for step in range(1, 4):
            g_base = _grads(n + 1, param_dtype, gen)
            hyper = _adam(step, stochastic_rounding=True)
            kernels.adam_step_(cpu[0], g_base[1:], cpu[1], cpu[2], **hyper)
            kernels.adam_step_(dev[0], g_base.to(gpu)[1:], dev[1], dev[2], **hyper)
            _assert_bits(dev, cpu, ("param", "exp_avg", "exp_avg_sq"), f"unaligned {param_dtype} step={step}")
        _assert_bits([dev_base[0][:1]], [base[0][:1]], ("element before the view",), "untouched")


# ---- block-quantized state: codes and absmax equal to the CPU kernel's ------------------------
def _quant_state(n, fmt, block, gen, lion=False):
    f = FORMATS[fmt]
    state = list(codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, f, True, block))
    if not lion:
        state += list(codec.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, f, False, block))
    return state


def _code_mismatches(a_codes, b_codes, fmt):
    """Elements whose code differs (4-bit codes unpacked first)."""
    b = FORMATS[fmt].bits
    return int((codec.unpack(a_codes.cpu(), b) != codec.unpack(b_codes, b)).sum())


def _assert_quant_equal(dev_state, cpu_state, names, fmt, where):
    for name, a, b in zip(names, dev_state, cpu_state):
        if name.endswith("codes"):
            off = _code_mismatches(a, b, fmt)
            assert off == 0, f"{name}: {off} codes differ ({where})"
        else:
            _assert_bits([a], [b], (name,), where)


BLOCK_MODES = [  # (param dtype, grad dtype, Adam mode)
    (torch.float32, torch.float32, dict(adamw_mode=True)),
    (torch.bfloat16, torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.float16, torch.float32, dict(adamw_mode=False, maximize=True, grad_scale=0.5)),
    (torch.bfloat16, torch.float16, dict(adamw_mode=True, bias_correction=False)),
]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", [64, 256, 2048, 4096])
def test_blockwise_adam_codes_equal_cpu_kernel(gpu, fmt, block):
    sizes = [1, 255, 257, 4097, block, 2 * block + 1, 70_001] + ([1_000_003] if block == 256 else [])
    for n, (param_dtype, grad_dtype, mode) in itertools.product(sizes, BLOCK_MODES):
        gen = torch.Generator().manual_seed(n * 7 + block)
        p = (torch.randn(n, generator=gen) * 0.1).to(param_dtype)
        cpu = [p] + _quant_state(n, fmt, block, gen)
        dev = _to(cpu, gpu)
        for step in range(1, 5):
            g = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
            hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step, seed=step, **mode)
            kernels.adam_step_blockwise_(*cpu[:1], g, *cpu[1:], fmt=fmt, block=block, **hyper)
            kernels.adam_step_blockwise_(*dev[:1], g.to(gpu), *dev[1:], fmt=fmt, block=block, **hyper)
            where = f"fmt={fmt} block={block} n={n} {param_dtype}/{grad_dtype} {mode} step={step}"
            _assert_bits(dev[:1], cpu[:1], ("param",), where)
            _assert_quant_equal(dev[1:], cpu[1:], ("m_codes", "m_absmax", "v_codes", "v_absmax"), fmt, where)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", [64, 256, 4096])
def test_blockwise_lion_codes_equal_cpu_kernel(gpu, fmt, block):
    for n, param_dtype in itertools.product([1, 257, 4097, 2 * block + 3, 70_001], DTYPES):
        gen = torch.Generator().manual_seed(n + block)
        cpu = [torch.randn(n, generator=gen).to(param_dtype)] + _quant_state(n, fmt, block, gen, lion=True)
        dev = _to(cpu, gpu)
        for step in range(1, 5):
            g = _grads(n, torch.float32, gen, scale=1e-2)
            hyper = _lion(step, stochastic_rounding=param_dtype != torch.float32)
            kernels.lion_step_blockwise_(cpu[0], g, cpu[1], cpu[2], fmt=fmt, block=block, **hyper)
            kernels.lion_step_blockwise_(dev[0], g.to(gpu), dev[1], dev[2], fmt=fmt, block=block, **hyper)
            where = f"lion fmt={fmt} block={block} n={n} {param_dtype} step={step}"
            _assert_bits(dev[:1], cpu[:1], ("param",), where)
            _assert_quant_equal(dev[1:], cpu[1:], ("m_codes", "m_absmax"), fmt, where)


def test_blockwise_unaligned_views_match(gpu):
    n, block = 5000, 256
    gen = torch.Generator().manual_seed(8)
    for fmt in ("int8", "int4"):
        p_base = torch.randn(n + 1, generator=gen)
        state = _quant_state(n, fmt, block, gen)
        # Codes one byte into a larger buffer: misaligned for the kernel's word accesses.
        code_bufs = [torch.randint(0, 255, (t.numel() + 1,), dtype=torch.uint8) for t in state[0::2]]
        for buf, codes in zip(code_bufs, state[0::2]):
            buf[1:] = codes
        cpu = [p_base[1:], code_bufs[0][1:], state[1], code_bufs[1][1:], state[3]]
        dev_bufs = _to([p_base] + code_bufs, gpu)
        dev = [dev_bufs[0][1:], dev_bufs[1][1:], state[1].to(gpu), dev_bufs[2][1:], state[3].to(gpu)]
        for step in range(1, 4):
            g = torch.randn(n + 1, generator=gen)[1:] * 1e-2
            hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step)
            kernels.adam_step_blockwise_(cpu[0], g, *cpu[1:], fmt=fmt, block=block, **hyper)
            kernels.adam_step_blockwise_(dev[0], g.to(gpu), *dev[1:], fmt=fmt, block=block, **hyper)
            _assert_bits(dev[:1], cpu[:1], ("param",), f"unaligned {fmt} step={step}")
            _assert_quant_equal(dev[1:], cpu[1:], ("m_codes", "m_absmax", "v_codes", "v_absmax"), fmt, fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_blockwise_non_finite_and_subnormal_blocks_match(gpu, fmt):
    """inf and NaN gradients (a block whose absmax becomes inf: inf * 0 is a NaN whose sign picks
    the code) and a block decaying below 2^-126 take the same codes as on the CPU."""
    n, block = 600, 256
    gen = torch.Generator().manual_seed(9)
    cpu = [torch.randn(n, generator=gen)] + _quant_state(n, fmt, block, gen)
    dev = _to(cpu, gpu)
    grads = [torch.randn(n, generator=gen) * 1e-2 for _ in range(2)]
    bad = grads[1].clone()
    bad[3], bad[300], bad[301] = float("nan"), float("inf"), -float("inf")
    after = [torch.randn(n, generator=gen) * 1e-2 for _ in range(2)]  # dequantizing 0 * inf absmax
    for step, g in enumerate(grads + [bad] + after, start=1):
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step)
        kernels.adam_step_blockwise_(cpu[0], g, *cpu[1:], fmt=fmt, block=block, **hyper)
        kernels.adam_step_blockwise_(dev[0], g.to(gpu), *dev[1:], fmt=fmt, block=block, **hyper)
        _assert_quant_equal(dev[1:], cpu[1:], ("m_codes", "m_absmax", "v_codes", "v_absmax"), fmt, f"step {step}")
        _assert_bits(dev[:1], cpu[:1], ("param",), f"step {step}")  # NaN bits included
    assert torch.isinf(cpu[2]).any() and torch.isnan(cpu[0]).any()  # the run did reach inf and NaN
    # A block decaying through the subnormal range is flushed alike.
    state = list(codec.quantize_blockwise(torch.randn(block) * 1e-36, FORMATS[fmt], True, block)) + \
        list(codec.quantize_blockwise(torch.rand(block) * 1e-36, FORMATS[fmt], False, block))
    cpu = [torch.randn(block)] + state
    dev = _to(cpu, gpu)
    zero = torch.zeros(block)
    for step in range(1, 40):
        hyper = dict(lr=1e-3, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.0, step=step)
        kernels.adam_step_blockwise_(cpu[0], zero, *cpu[1:], fmt=fmt, block=block, **hyper)
        kernels.adam_step_blockwise_(dev[0], zero.to(gpu), *dev[1:], fmt=fmt, block=block, **hyper)
        _assert_quant_equal(dev[1:], cpu[1:], ("m_codes", "m_absmax", "v_codes", "v_absmax"), fmt, f"step {step}")
    assert float(cpu[2][0]) < 2.0 ** -126  # the run reached the subnormal range


@pytest.mark.parametrize("param_dtype", DTYPES)
def test_non_finite_gradients_give_the_cpus_nan_bits(gpu, param_dtype):
    """inf and NaN gradients, then finite ones: every result bit-identical to the CPU kernel's,
    NaNs included (the kernels reproduce x86's NaN bits, [Note: x86 NaN results])."""
    n = 1031
    gen = torch.Generator().manual_seed(4)
    for algo, mode in (("adam", dict(adamw_mode=True)), ("adam", dict(adamw_mode=False)), ("lion", {})):
        p, m, v = torch.randn(n, generator=gen).to(param_dtype), torch.randn(n, generator=gen) * 1e-3, \
            torch.rand(n, generator=gen)
        cpu, dev = [p, m, v], _to([p, m, v], gpu)
        for step in range(1, 4):
            g = torch.randn(n, generator=gen)
            if step == 1:
                g[5], g[6], g[7], g[1000] = float("nan"), float("inf"), -float("inf"), 3e38
            for t in (cpu, dev):
                if algo == "adam":
                    kernels.adam_step_(t[0], g.to(t[0].device), t[1], t[2], **_adam(step, **mode))
                else:
                    kernels.lion_step_(t[0], g.to(t[0].device), t[1], **_lion(step))
            names = ("param", "exp_avg", "exp_avg_sq") if algo == "adam" else ("param", "exp_avg")
            _assert_bits(dev[:len(names)], cpu[:len(names)], names, f"{algo} {mode} {param_dtype} step {step}")
        assert torch.isnan(cpu[0].float()).any() or algo == "lion"  # the run did make NaNs


# ---- state moves between executors mid-run --------------------------------------------------
@pytest.mark.parametrize("first", ["cuda", "cpu"])
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_state_continues_across_executors(gpu, first, fmt):
    """k steps on one executor, the state handed to the other, k more: identical to all steps
    on the CPU (so a checkpoint or a page written by either continues on the other)."""
    n, block = 70_001, 256
    gen = torch.Generator().manual_seed(21)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    state = [torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-6] if fmt == "fp32" \
        else _quant_state(n, fmt, block, gen)
    grads = [_grads(n, torch.bfloat16, gen, 1e-2) for _ in range(6)]
    only_cpu = [p.clone()] + [t.clone() for t in state]
    moving = _to([p] + state, gpu if first == "cuda" else "cpu")

    def step(tensors, g, i):
        hyper = _adam(i, stochastic_rounding=True)
        if fmt == "fp32":
            kernels.adam_step_(tensors[0], g.to(tensors[0].device), tensors[1], tensors[2], **hyper)
        else:
            kernels.adam_step_blockwise_(tensors[0], g.to(tensors[0].device), *tensors[1:], fmt=fmt, block=block,
                                         **hyper)

    for i, g in enumerate(grads, start=1):
        if i == 4:
            moving = _to(moving, "cpu" if first == "cuda" else gpu)
        step(only_cpu, g, i)
        step(moving, g, i)
    where = f"{first} first, {fmt}"
    if fmt == "fp32":
        _assert_bits(moving, only_cpu, ("param", "exp_avg", "exp_avg_sq"), where)
    else:
        _assert_bits(moving[:1], only_cpu[:1], ("param",), where)
        _assert_quant_equal(moving[1:], only_cpu[1:], ("m_codes", "m_absmax", "v_codes", "v_absmax"), fmt, where)


# ---- index_offset: page segments round as the whole tensor ----------------------------------
def _segment_state(state, start, end, fmt, block):
    """Views of the state of elements [start, end): fp32 moments, or whole blocks of codes/absmax."""
    if fmt == "fp32":
        return [t[start:end] for t in state]
    b0, b1, per_block = start // block, -(-end // block), block * FORMATS[fmt].bits // 8
    out = []
    for codes, absmax in zip(state[0::2], state[1::2]):
        out += [codes[b0 * per_block:b1 * per_block], absmax[b0:b1]]
    return out


@pytest.mark.parametrize("algo", ["adam", "lion"])
@pytest.mark.parametrize("fmt,block", [("fp32", 64), ("int8", 256), ("int4", 64)])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_slices_with_index_offset_equal_the_whole_tensor(gpu, algo, fmt, block, param_dtype):
    """Segments aligned as the pager cuts them (64 elements for fp32 state, whole blocks
    otherwise; an odd tail), each updated with index_offset = its start: on the GPU, the same
    bits as the whole tensor on the GPU and on the CPU, every step and state tensor."""
    n = 9 * block + 37
    cuts = [0, block, 3 * block, 4 * block, 8 * block, n]
    gen = torch.Generator().manual_seed(n + len(algo))
    p = torch.randn(n, generator=gen).to(param_dtype)
    if fmt == "fp32":
        state = [torch.randn(n, generator=gen) * 1e-2] + ([torch.rand(n, generator=gen) * 1e-4] if algo == "adam" else [])
    else:
        state = _quant_state(n, fmt, block, gen, lion=algo == "lion")
    cpu_whole = [p] + state
    dev_whole, dev_seg = _to(cpu_whole, gpu), _to(cpu_whole, gpu)

    def run(t, g, hyper):
        if fmt == "fp32":
            (kernels.adam_step_ if algo == "adam" else kernels.lion_step_)(t[0], g, *t[1:], **hyper)
        else:
            fn = kernels.adam_step_blockwise_ if algo == "adam" else kernels.lion_step_blockwise_
            fn(t[0], g, *t[1:], fmt=fmt, block=block, **hyper)

    names = ["param"] + (["exp_avg", "exp_avg_sq"] if fmt == "fp32" else ["m_codes", "m_absmax", "v_codes", "v_absmax"])
    names = names[:len(cpu_whole)]
    for step in range(1, 4):
        g = (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
        hyper = _adam(step, stochastic_rounding=True) if algo == "adam" else _lion(step, stochastic_rounding=True)
        run(cpu_whole, g, hyper)
        run(dev_whole, g.to(gpu), hyper)
        g_dev = g.to(gpu)
        for start, end in zip(cuts, cuts[1:]):  # views: each segment writes into dev_seg
            seg = [dev_seg[0][start:end]] + _segment_state(dev_seg[1:], start, end, fmt, block)
            run(seg, g_dev[start:end], dict(hyper, index_offset=start))
        where = f"{algo} {fmt} block={block} {param_dtype} step={step}"
        for name, a, b in zip(names, dev_seg, dev_whole):  # GPU segments == GPU whole: every byte
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name} segments vs whole, {where}"
        if fmt == "fp32":
            _assert_bits(dev_seg, cpu_whole, names, where)
        else:
            _assert_bits(dev_seg[:1], cpu_whole[:1], names[:1], where)
            _assert_quant_equal(dev_seg[1:], cpu_whole[1:], names[1:], fmt, where)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_any_index_offset_across_2_to_32_matches_cpu(gpu, param_dtype):
    """Offsets need no alignment, and the stream's key changes at multiples of 2^32 wherever
    they fall in the tensor: the GPU matches the CPU kernel and the reference, and slices cut
    anywhere equal the whole."""
    n = 3000
    gen = torch.Generator().manual_seed(31)
    for base in (2**32 - 1000, 2**32 - 7, 5 * 2**32 + 3, 0):
        p, g = torch.randn(n, generator=gen).to(param_dtype), (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
        state = [torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-4]
        hyper = _adam(2, stochastic_rounding=True, index_offset=base)
        cpu, ref, dev, dev_seg = [p] + state, [t.clone() for t in [p] + state], _to([p] + state, gpu), _to([p] + state, gpu)
        kernels.adam_step_(*cpu[:1], g, *cpu[1:], **hyper)
        reference.adam_step_(*ref[:1], g, *ref[1:], **hyper)
        kernels.adam_step_(*dev[:1], g.to(gpu), *dev[1:], **hyper)
        g_dev = g.to(gpu)
        cuts = [0, 3, 997, 1001, 2048, 2999, n]
        for a, b in zip(cuts, cuts[1:]):
            kernels.adam_step_(dev_seg[0][a:b], g_dev[a:b], dev_seg[1][a:b], dev_seg[2][a:b],
                               **dict(hyper, index_offset=base + a))
        names = ("param", "exp_avg", "exp_avg_sq")
        _assert_bits(dev, cpu, names, f"base={base}")
        _assert_bits(dev, ref, names, f"reference base={base}")
        _assert_bits(dev_seg, cpu, names, f"slices base={base}")


# ---- streams, bad input, opcheck ------------------------------------------------------------
def test_kernel_runs_on_the_current_stream(gpu):
    """Launched on a side stream that is still busy, the update has not happened when the
    default stream has finished: the kernel was enqueued behind the side stream's work."""
    n = 1 << 20
    p, g, m, v = (torch.randn(n, device=gpu) for _ in range(4))
    v = v.abs()
    p0 = p.clone()
    side = torch.cuda.Stream(device=gpu)
    side.wait_stream(torch.cuda.current_stream(gpu))  # the side stream sees p, g, m, v initialised
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keeps the side stream busy for ~0.1 s
        kernels.adam_step_(p, g, m, v, **_adam(1))
    p_early = p.clone()  # on the default stream, which does not wait for the side stream
    torch.cuda.current_stream(gpu).synchronize()
    early_busy = not side.query()  # the copy above finished while the side stream still slept
    if not early_busy:
        pytest.skip("the side stream finished before the check (a very fast GPU clock?)")
    assert torch.equal(p_early, p0), "the update ran before the side stream's earlier work finished"
    side.synchronize()
    assert not torch.equal(p, p0)


def _dev_args(gpu, n=300):
    return [torch.randn(n, device=gpu), torch.randn(n, device=gpu), torch.zeros(n, device=gpu),
            torch.zeros(n, device=gpu)]


@pytest.mark.parametrize("position,name", [(1, "grad"), (2, "exp_avg"), (3, "exp_avg_sq")])
def test_mixed_devices_are_refused_by_name(gpu, position, name):
    args = _dev_args(gpu)
    args[position] = args[position].cpu()
    before = [t.clone() for t in args]
    with pytest.raises(ValueError, match=f"{name} is on cpu but param is on cuda"):
        kernels.adam_step_(*args, **_adam(1))
    for a, b in zip(args, before):
        assert torch.equal(a, b)


def test_blockwise_tables_on_another_device_are_refused(gpu):
    n, block, fmt = 300, 256, "int8"
    gen = torch.Generator().manual_seed(1)
    dev = _to([torch.randn(n), torch.randn(n)] + _quant_state(n, fmt, block, gen), gpu)
    before = [t.clone() for t in dev]
    m_t, v_t = codec.code_tables(fmt, True), codec.code_tables(fmt, False)  # CPU tables
    with pytest.raises(ValueError, match="m_map and m_lut are on cpu"):
        torch.ops.offload_engine.adam_step_blockwise_(
            *dev, m_t.map, m_t.lut, v_t.map, v_t.lut,
            [m_t.min_exponent, m_t.mantissa_bits, v_t.min_exponent, v_t.mantissa_bits], bits=8, block=block, lr=1e-3,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    for a, b in zip(dev, before):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="m state is on cpu but param is on cuda"):
        kernels.adam_step_blockwise_(dev[0], dev[1], dev[2].cpu(), *dev[3:], fmt=fmt, block=block, lr=1e-3,
                                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def test_bad_hyperparameter_on_cuda_reads_as_on_cpu(gpu):
    messages = []
    for device in ("cpu", gpu):
        with pytest.raises(ValueError) as info:
            kernels.adam_step_(*_dev_args(device), **_adam(1, beta1=1.5))
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1] and "beta1" in messages[0]


@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_opcheck_on_cuda(gpu, param_dtype, grad_dtype):
    n = 300
    gen = torch.Generator().manual_seed(3)
    adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, adamw_mode=True,
                bias_correction=True, maximize=False, grad_scale=1.0, stochastic_rounding=True, seed=5)
    lion = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False, grad_scale=1.0,
                stochastic_rounding=True, seed=5)
    p, g = torch.randn(n).to(param_dtype).to(gpu), torch.randn(n).to(grad_dtype).to(gpu)
    ops = torch.ops.offload_engine
    torch.library.opcheck(ops.adam_step_.default, (p, g, torch.zeros(n, device=gpu), torch.zeros(n, device=gpu)), adam)
    torch.library.opcheck(ops.lion_step_.default, (p, g, torch.zeros(n, device=gpu)), lion)
    for fmt, block in (("int8", 256), ("int4", 128)):
        m_t, v_t = kernels._tables_on(fmt, True, gpu), kernels._tables_on(fmt, False, gpu)
        state = _to(_quant_state(n, fmt, block, gen), gpu)
        bits_kw = dict(bits=FORMATS[fmt].bits, block=block)
        torch.library.opcheck(ops.adam_step_blockwise_.default,
                              (p, g, *state, m_t.map, m_t.lut, v_t.map, v_t.lut,
                               [m_t.min_exponent, m_t.mantissa_bits, v_t.min_exponent, v_t.mantissa_bits]),
                              {**bits_kw, **adam})
        torch.library.opcheck(ops.lion_step_blockwise_.default,
                              (p, g, *state[:2], m_t.map, m_t.lut, [m_t.min_exponent, m_t.mantissa_bits]),
                              {**bits_kw, **lion})


def test_empty_tensors_are_a_no_op(gpu):
    kernels.adam_step_(*_dev_args(gpu, 0), **_adam(1))
    kernels.lion_step_(*_dev_args(gpu, 0)[:3], **_lion(1))


# ---- the optimizers with CUDA params ---------------------------------------------------------
OPTIMIZERS = [
    (CPUAdam, dict(lr=1e-2, weight_decay=0.01)),
    (AdamW8bit, dict(lr=1e-2, min_8bit_size=1)),
    (Adam4bit, dict(lr=1e-2, weight_decay=0.01, min_8bit_size=1)),
    (Lion, dict(lr=1e-3, weight_decay=0.1)),
    (Lion8bit, dict(lr=1e-3, min_8bit_size=1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_optimizer_with_cuda_params_matches_cpu(gpu, cls, kw, dtype):
    """The same optimizer on CUDA params and on CPU params: bit-identical params and state
    every step; a CUDA state_dict continues on a CPU optimizer identically."""
    gen = torch.Generator().manual_seed(31)
    shapes = [(64, 257), (4097,), (3,)]
    values = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    p_cpu = [torch.nn.Parameter(v.clone()) for v in values]
    p_dev = [torch.nn.Parameter(v.to(gpu)) for v in values]
    sr = dict(stochastic_rounding=dtype != torch.float32)
    torch.manual_seed(0)
    opt_cpu = cls(p_cpu, **kw, **sr)
    torch.manual_seed(0)  # the same stochastic-rounding seed base
    opt_dev = cls(p_dev, **kw, **sr)
    for step in range(1, 5):
        for pc, pd in zip(p_cpu, p_dev):
            g = (torch.randn(pc.shape, generator=gen) * 1e-2).to(dtype)
            pc.grad, pd.grad = g, g.to(gpu)
        opt_cpu.step()
        opt_dev.step()
        for i, (pc, pd) in enumerate(zip(p_cpu, p_dev)):
            where = f"{cls.__name__} {dtype} param {i} step {step}"
            _assert_bits([pd.detach()], [pc.detach()], ("param",), where)
            sc, sd = opt_cpu.state[pc], opt_dev.state[pd]
            assert sd["format"] == sc["format"], where
            for key, value in sc.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    assert sd[key].device == pd.device, f"{key} {where}"
                    _assert_bits([sd[key]], [value], (key,), where)
            logical = opt_dev.logical_state(pd)
            for key, value in opt_cpu.logical_state(pc).items():
                _assert_bits([logical[key]], [value], (f"logical {key}",), where)
    # The CUDA optimizer's checkpoint, loaded by a CPU optimizer, continues as the CPU one does.
    p_cpu2 = [torch.nn.Parameter(pd.detach().cpu()) for pd in p_dev]
    opt_cpu2 = cls(p_cpu2, **kw, **sr)
    opt_cpu2.load_state_dict(opt_dev.state_dict())
    for pc, pc2 in zip(p_cpu, p_cpu2):
        g = (torch.randn(pc.shape, generator=gen) * 1e-2).to(dtype)
        pc.grad, pc2.grad = g, g.clone()
    opt_cpu.step()
    opt_cpu2.step()
    for pc, pc2 in zip(p_cpu, p_cpu2):
        _assert_bits([pc2.detach()], [pc.detach()], ("param",), f"{cls.__name__} after reload")
