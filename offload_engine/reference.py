"""The pure-PyTorch reference of every update this project computes: the oracle for the
SIMD CPU kernels (and the CUDA kernels).

Run with ``compute_dtype=torch.float64`` it is the high-precision oracle. Run with
``compute_dtype=torch.float32`` it performs exactly the kernel's separately rounded fp32
operations in the kernel's order, with the same float32 coefficients and the same
rounding to bf16/fp16 (nearest-even or stochastic, with the same random stream), so the
kernels must reproduce it bit for bit ([Note: one update math], ops/csrc/cpu/adam_kernel.h).
It is also the fallback when no native build is available.
"""
from __future__ import annotations

import dataclasses
import math

import torch

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class AdamCoefficients:
    """One step's constants in double precision (ops/csrc/adam_op.cpp: make_coeffs)."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    neg_step_size: float
    inv_bc2_sqrt: float
    decay: float  # AdamW: param *= 1 - lr * weight_decay
    l2: float  # Adam: grad += weight_decay * param
    grad_scale: float
    adamw: bool
    use_l2: bool


def adam_coefficients(lr, beta1, beta2, eps, weight_decay, step, adamw_mode=True, bias_correction=True,
                      grad_scale=1.0) -> AdamCoefficients:
    bc1 = 1.0 - beta1 ** float(step) if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** float(step) if bias_correction else 1.0
    return AdamCoefficients(
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
        neg_step_size=-(lr / bc1), inv_bc2_sqrt=1.0 / math.sqrt(bc2), decay=1.0 - lr * weight_decay,
        l2=weight_decay, grad_scale=grad_scale,
        adamw=adamw_mode and weight_decay != 0.0, use_l2=(not adamw_mode) and weight_decay != 0.0,
    )


# ---- the stochastic-rounding stream: uint32 arithmetic emulated in int64 ----------------
_U32 = 0xFFFFFFFF


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 without int64 overflow: split the constant into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _U32], dtype=torch.int64))[0])


def random_bits(seed: int, numel: int, index_offset: int = 0) -> torch.Tensor:
    """uint32 random bits (as int64) for the elements of a tensor whose element 0 is element
    ``index_offset`` of the stream: hash(seed, index) for index in offset .. offset+numel-1.

    The key changes with the index's high 32 bits, so the range is split where it crosses a
    multiple of 2^32 (wherever that falls relative to the tensor's start)."""
    if index_offset < 0:
        raise ValueError(f"random_bits: index_offset must be >= 0, got {index_offset}")
    seed &= (1 << 64) - 1
    out = torch.empty(numel, dtype=torch.int64)
    end = index_offset + numel
    for hi in range(index_offset >> 32, ((end - 1) >> 32) + 1 if numel else 0):
        key = _mix32_int((seed & _U32) ^ _mix32_int(((seed >> 32) + hi * 0x9E3779B9) & _U32))
        first, last = max(index_offset, hi << 32), min(end, (hi + 1) << 32)  # stream indices [first, last)
        low = torch.arange(first & _U32, (first & _U32) + (last - first), dtype=torch.int64)
        out[first - index_offset:last - index_offset] = _mix32(low ^ key)
    return out


# ---- rounding fp32 -> bf16 / fp16 ----------------------------------------------------------
def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = False, seed: int = 0,
                   index_offset: int = 0) -> torch.Tensor:
    """Rounds fp32 `x` to `dtype` as the kernels do: nearest-even, or stochastic with the
    element-indexed stream of `seed` (x's element i is element index_offset + i of the stream).
    Higher-precision input is first rounded to fp32."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x.clone()
    if dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int32).to(torch.int64) & _U32
        if stochastic:
            rounded = (bits + (random_bits(seed, x.numel(), index_offset).view(x.shape) >> 16)) >> 16
        else:
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = torch.where(torch.isnan(x), torch.full_like(rounded, 0x7FC0), rounded & 0xFFFF)
        return rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    if dtype == torch.float16:
        if not stochastic:
            return x.to(torch.float16)  # torch's conversion is nearest-even, as F16C's
        bits = x.contiguous().view(torch.int32).to(torch.int64) & _U32
        exp = torch.clamp(bits & 0x7F800000, max=0x7F000000).to(torch.int32).view(torch.float32)
        scale = torch.clamp(exp * 2.0 ** -23, min=2.0 ** -37)
        noise = ((random_bits(seed, x.numel(), index_offset).view(x.shape) >> 19).to(torch.float32) * scale).copysign(x)
        return _to_half_toward_zero(x + noise)
    raise TypeError(f"round_to_dtype: dtype must be one of {PARAM_DTYPES}, got {dtype}")


def _to_half_toward_zero(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 rounding toward zero (finite overflow gives the largest finite value)."""
    h = y.to(torch.float16)
    too_far = h.to(torch.float32).abs() > y.abs()  # nearest-even went away from zero
    bits = h.view(torch.int16).to(torch.int32)
    stepped = (bits - 1).to(torch.int16)  # one step toward zero, for either sign
    fixed = torch.where(too_far & torch.isfinite(y), stepped, bits.to(torch.int16)).view(torch.float16)
    return torch.where(torch.isinf(y), y.to(torch.float16), fixed)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt. torch's float32 sqrt on CPU is not (it differs from IEEE in
    the last bit); the float64 sqrt rounded to float32 is, since 53 >= 2 * 24 + 2."""
    return x.double().sqrt().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


# ---- the update ---------------------------------------------------------------------------
@torch.no_grad()
def adam_step_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
               adamw_mode=True, bias_correction=True, maximize=False, grad_scale=1.0,
               stochastic_rounding=False, seed=0, index_offset=0, compute_dtype=torch.float32):
    """In-place Adam/AdamW step on `param`, `exp_avg`, `exp_avg_sq`; the same contract as the
    native op ``torch.ops.offload_engine.adam_step_`` (``index_offset``: param's element i is
    element index_offset + i of the stochastic-rounding stream).

    In float32 the ops mirror the kernel exactly; in float64 (state tensors may then be
    float64 too) it is the oracle. The new param is rounded to param.dtype (via fp32, with
    the kernel's rounding) at the end.
    """
    c = adam_coefficients(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, grad_scale)

    def k(value: float) -> torch.Tensor:  # float32: the constant exactly as the kernel holds it
        return torch.tensor(value, dtype=compute_dtype)

    g = grad.to(compute_dtype)
    if grad_scale != 1.0:
        g = g * k(c.grad_scale)
    if maximize:
        g = -g
    p = param.to(compute_dtype)
    if c.use_l2:
        g = g + p * k(c.l2)
    if c.adamw:
        p = p * k(c.decay)
    m = exp_avg.to(compute_dtype) * k(c.beta1) + g * k(c.one_minus_beta1)
    v = exp_avg_sq.to(compute_dtype) * k(c.beta2) + (g * k(c.one_minus_beta2)) * g
    denom = _sqrt(v) * k(c.inv_bc2_sqrt) + k(c.eps)
    p = p + (m / denom) * k(c.neg_step_size)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    _write_param(param, p, compute_dtype, stochastic_rounding, seed, index_offset)


def _write_param(param, p, compute_dtype, stochastic_rounding, seed, index_offset):
    if param.dtype == torch.float32 or param.dtype == compute_dtype:
        param.copy_(p)
    else:
        param.copy_(round_to_dtype(p, param.dtype, stochastic_rounding, seed, index_offset).view(param.shape))


@torch.no_grad()
def lion_step_(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, maximize=False, grad_scale=1.0,
               stochastic_rounding=False, seed=0, index_offset=0, compute_dtype=torch.float32):
    """In-place Lion step (decoupled weight decay; one state), the contract of the native
    ``lion_step_``: p -= lr * sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g.
    (sign(0) = 0; torch.sign on CPU also gives 0 for NaN, and so do the kernels.)"""
    def k(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=compute_dtype)

    g = grad.to(compute_dtype)
    if grad_scale != 1.0:
        g = g * k(grad_scale)
    if maximize:
        g = -g
    p = param.to(compute_dtype)
    if weight_decay != 0.0:
        p = p * k(1.0 - lr * weight_decay)
    m_old = exp_avg.to(compute_dtype)
    direction = m_old * k(beta1) + g * k(1.0 - beta1)
    p = p + torch.sign(direction) * k(-lr)
    exp_avg.copy_(m_old * k(beta2) + g * k(1.0 - beta2))
    _write_param(param, p, compute_dtype, stochastic_rounding, seed, index_offset)


@torch.no_grad()
def adam_step_blockwise_(param, grad, m_codes, m_absmax, v_codes, v_absmax, *, fmt, block, **adam):
    """Adam/AdamW with block-quantized moments, by definition: dequantize exp_avg (signed map)
    and exp_avg_sq (unsigned map), take the fp32 step above, requantize. The fused kernel
    (ops/csrc/cpu/adam_kernel.h: [Note: blockwise step]) matches this bit for bit."""
    from .quant import codec

    n = param.numel()
    m = codec.dequantize_blockwise(m_codes, m_absmax, fmt, True, block, n).view(param.shape)
    v = codec.dequantize_blockwise(v_codes, v_absmax, fmt, False, block, n).view(param.shape)
    adam_step_(param, grad, m, v, **adam)
    for codes, absmax, value, signed in ((m_codes, m_absmax, m, True), (v_codes, v_absmax, v, False)):
        new_codes, new_absmax = codec.quantize_blockwise(value, fmt, signed, block)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)


@torch.no_grad()
def lion_step_blockwise_(param, grad, m_codes, m_absmax, *, fmt, block, **lion):
    """Lion with a block-quantized momentum (signed map), by definition: dequantize, the fp32
    step above, requantize."""
    from .quant import codec

    m = codec.dequantize_blockwise(m_codes, m_absmax, fmt, True, block, param.numel()).view(param.shape)
    lion_step_(param, grad, m, **lion)
    new_codes, new_absmax = codec.quantize_blockwise(m, fmt, True, block)
    m_codes.copy_(new_codes)
    m_absmax.copy_(new_absmax)
