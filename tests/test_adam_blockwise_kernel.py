"""The fused block-quantized Adam kernel equals the reference (dequantize, fp32 step,
requantize) bit for bit, on every forced SIMD path: params, codes and absmax, every step."""
import pytest
import torch

from offload_engine import kernels, reference
from offload_engine.quant import FORMATS, codec
from conftest import bits


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
