"""The update kernels as Python calls: the native op when it is loaded, else the reference.

Callers (optimizers, executors) use these functions rather than torch.ops directly, so the
fallback to the PyTorch reference is decided in one place.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import reference
from ._native import native_ops


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               adamw_mode: bool = True, bias_correction: bool = True, maximize: bool = False,
               grad_scale: float = 1.0, stochastic_rounding: bool = False, seed: int = 0,
               index_offset: int = 0) -> None:
    """One fused Adam (``adamw_mode=False``: L2 decay) or AdamW step, in place.

    param: fp32/bf16/fp16; grad: fp32/bf16/fp16 of param's shape; exp_avg, exp_avg_sq: fp32.
    All contiguous, on one device: the CPU, or a GPU when the ops were built with CUDA
    (:func:`cuda_ops_built`). ``step`` counts this step (1 on the first). ``grad_scale``
    multiplies the gradient first (unscaling, clipping). bf16/fp16 params are rounded to
    nearest-even, or stochastically with the stream of ``seed`` when stochastic_rounding:
    param's element i draws element ``index_offset + i`` of that stream, so a slice starting at
    element s of a tensor, passed with index_offset=s, rounds exactly as the whole tensor would
    (index_offset >= 0; the paged optimizers pass each page segment's start).
    Bad arguments raise ValueError/TypeError naming the argument, before anything is written.
    """
    kwargs = _adam_kwargs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize, grad_scale,
                          stochastic_rounding, seed, index_offset)
    if _native_for(param):
        torch.ops.offload_engine.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)
    else:
        _checked_reference(param, grad, exp_avg, exp_avg_sq, **kwargs)


def adam_step_blockwise_(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                         v_codes: torch.Tensor, v_absmax: torch.Tensor, *, fmt: str, block: int, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                         adamw_mode: bool = True, bias_correction: bool = True, maximize: bool = False,
                         grad_scale: float = 1.0, stochastic_rounding: bool = False, seed: int = 0,
                         index_offset: int = 0) -> None:
    """adam_step_ with block-quantized moments in place: ``fmt`` is "int8" or "int4"
    (offload_engine.quant.FORMATS), ``block`` the elements per absmax; m_codes/v_codes hold the
    codes padded to whole blocks (4-bit: two per byte), m_absmax/v_absmax one float32 per block.
    ``index_offset`` as for adam_step_ (it keys only the rounding stream, not the blocks)."""
    from .quant import codec

    kwargs = _adam_kwargs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize, grad_scale,
                          stochastic_rounding, seed, index_offset)
    if fmt not in codec.FORMATS:
        raise ValueError(f"adam_step_blockwise_: fmt must be one of {sorted(codec.FORMATS)}, got {fmt!r}")
    if _native_for(param):
        m_t, v_t = _tables_on(fmt, True, param.device), _tables_on(fmt, False, param.device)
        torch.ops.offload_engine.adam_step_blockwise_(
            param, grad, m_codes, m_absmax, v_codes, v_absmax, m_t.map, m_t.lut, v_t.map, v_t.lut,
            [m_t.min_exponent, m_t.mantissa_bits, v_t.min_exponent, v_t.mantissa_bits],
            bits=codec.FORMATS[fmt].bits, block=int(block), **kwargs)
    else:
        _check_reference_args(param, grad, **kwargs)
        codec.check_block(block)
        for name, codes, absmax in (("m", m_codes, m_absmax), ("v", v_codes, v_absmax)):
            _check_block_state(name, codes, absmax, param, codec.FORMATS[fmt], int(block))
        reference.adam_step_blockwise_(param, grad, m_codes, m_absmax, v_codes, v_absmax,
                                       fmt=codec.FORMATS[fmt], block=int(block), **kwargs)


def lion_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr: float, beta1: float,
               beta2: float, weight_decay: float, maximize: bool = False, grad_scale: float = 1.0,
               stochastic_rounding: bool = False, seed: int = 0, index_offset: int = 0) -> None:
    """One fused Lion step in place (fp32 momentum): the same contract as adam_step_ otherwise."""
    kwargs = _lion_kwargs(lr, beta1, beta2, weight_decay, maximize, grad_scale, stochastic_rounding, seed,
                          index_offset)
    if _native_for(param):
        torch.ops.offload_engine.lion_step_(param, grad, exp_avg, **kwargs)
    else:
        _check_reference_args(param, grad, exp_avg=exp_avg, eps=0.0, step=1, **kwargs)
        reference.lion_step_(param, grad, exp_avg, **kwargs)


def lion_step_blockwise_(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor, *,
                         fmt: str, block: int, lr: float, beta1: float, beta2: float, weight_decay: float,
                         maximize: bool = False, grad_scale: float = 1.0, stochastic_rounding: bool = False,
                         seed: int = 0, index_offset: int = 0) -> None:
    """lion_step_ with a block-quantized momentum (signed map of ``fmt``) in place."""
    from .quant import codec

    kwargs = _lion_kwargs(lr, beta1, beta2, weight_decay, maximize, grad_scale, stochastic_rounding, seed,
                          index_offset)
    if fmt not in codec.FORMATS:
        raise ValueError(f"lion_step_blockwise_: fmt must be one of {sorted(codec.FORMATS)}, got {fmt!r}")
    if _native_for(param):
        t = _tables_on(fmt, True, param.device)
        torch.ops.offload_engine.lion_step_blockwise_(param, grad, m_codes, m_absmax, t.map, t.lut,
                                                      [t.min_exponent, t.mantissa_bits],
                                                      bits=codec.FORMATS[fmt].bits, block=int(block), **kwargs)
    else:
        _check_reference_args(param, grad, eps=0.0, step=1, **kwargs)
        codec.check_block(block)
        _check_block_state("m", m_codes, m_absmax, param, codec.FORMATS[fmt], int(block))
        reference.lion_step_blockwise_(param, grad, m_codes, m_absmax, fmt=codec.FORMATS[fmt], block=int(block),
                                       **kwargs)


def cuda_ops_built() -> bool:
    """Whether the loaded native ops have CUDA kernels (a CUDA build of ops/csrc/cuda)."""
    return _cuda_ops_built()


@functools.lru_cache(maxsize=None)
def _cuda_ops_built() -> bool:
    ops = native_ops()
    return ops.available and bool(ops.module.build_info().get("cuda"))


def _native_for(param: torch.Tensor) -> bool:
    """The native op serves this param's device: the CPU always, a GPU in CUDA builds. Other
    tensors of the call on another device are refused by the op's checks, naming them."""
    if not native_ops().available:
        return False
    return param.device.type == "cpu" or (param.device.type == "cuda" and _cuda_ops_built())


@functools.lru_cache(maxsize=None)
def _tables_on(fmt: str, signed: bool, device: torch.device):
    """The code tables of ``fmt`` on ``device``, copied once per device (the kernel reads them
    where it runs). The copy from pageable host memory is synchronous (non_blocking=False), so
    the tables are complete before any stream can use them."""
    from .quant import codec

    tables = codec.code_tables(fmt, signed)
    if device.type == "cpu":
        return tables
    return dataclasses.replace(tables, map=tables.map.to(device), lut=tables.lut.to(device))


def _adam_kwargs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize, grad_scale,
                 stochastic_rounding, seed, index_offset) -> dict:
    """The ops' keyword arguments in their schema types (float, int, bool; seed as int64)."""
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                step=int(step), adamw_mode=bool(adamw_mode), bias_correction=bool(bias_correction),
                maximize=bool(maximize), grad_scale=float(grad_scale), stochastic_rounding=bool(stochastic_rounding),
                seed=as_int64(seed), index_offset=int(index_offset))


def _lion_kwargs(lr, beta1, beta2, weight_decay, maximize, grad_scale, stochastic_rounding, seed,
                 index_offset) -> dict:
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay),
                maximize=bool(maximize), grad_scale=float(grad_scale), stochastic_rounding=bool(stochastic_rounding),
                seed=as_int64(seed), index_offset=int(index_offset))


def adam_step_impl():
    """The callable behind adam_step_ (native op or checked reference), for hot loops that pass
    already-normalised keyword arguments (float/int/bool, seed as int64) and skip the
    per-call conversion above."""
    if native_ops().available:
        return torch.ops.offload_engine.adam_step_.default
    return _checked_reference


def _checked_reference(param, grad, exp_avg, exp_avg_sq, **kwargs):
    _check_reference_args(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, **kwargs)
    reference.adam_step_(param, grad, exp_avg, exp_avg_sq, **kwargs)


def simd_path() -> str:
    """The CPU kernel path in use now: avx512vbmi | avx512 | avx2 | scalar, or 'reference'."""
    ops = native_ops()
    return ops.module.selected_simd_path() if ops.available else "reference"


def as_int64(seed: int) -> int:
    """A 64-bit seed in the op's signed int64 argument (same bits)."""
    seed = int(seed) & ((1 << 64) - 1)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _check_reference_args(param, grad, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale, index_offset=0,
                          **state):
    """The native ops' argument checks (ops/csrc/adam_op_common.cpp and the ops), for the
    fallback: hyperparameters, param and grad, and any fp32 state passed by name."""
    for name, value, ok in (("lr", lr, lr >= 0 and math.isfinite(lr)), ("eps", eps, eps >= 0 and math.isfinite(eps)),
                            ("beta1", beta1, 0 <= beta1 < 1), ("beta2", beta2, 0 <= beta2 < 1),
                            ("weight_decay", weight_decay, weight_decay >= 0 and math.isfinite(weight_decay)),
                            ("step", step, step >= 1), ("grad_scale", grad_scale, math.isfinite(grad_scale))):
        if not ok:
            raise ValueError(f"adam_step_: {name} is out of range: {value}")
    if index_offset < 0:
        raise ValueError(f"adam_step_: index_offset must be >= 0 (the index of element 0 in the stochastic-rounding "
                         f"stream), got {index_offset}")
    for name, t in (("param", param), ("grad", grad)):
        if t.dtype not in reference.PARAM_DTYPES:
            raise TypeError(f"adam_step_: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    fp32_state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for name, t in fp32_state.items():
        if t.dtype != torch.float32:
            raise TypeError(f"adam_step_: {name} must be float32, got {t.dtype}")
    for name, t in (("grad", grad), *fp32_state.items()):
        if t.device != param.device:
            raise ValueError(f"adam_step_: {name} is on {t.device} but param is on {param.device}")
        if t.shape != param.shape:
            raise ValueError(f"adam_step_: {name} has shape {list(t.shape)} but param has shape {list(param.shape)}")
    for name, t in (("param", param), ("grad", grad), *fp32_state.items()):
        if not t.is_contiguous():
            raise ValueError(f"adam_step_: {name} must be contiguous, got strides {t.stride()}")


def _check_block_state(name, codes, absmax, param, fmt, block):
    """The native blockwise ops' state checks (adam_blockwise_op.cpp: check_state)."""
    blocks = -(-param.numel() // block)
    if codes.dtype != torch.uint8:
        raise TypeError(f"adam_step_blockwise_: {name}_codes must be uint8, got {codes.dtype}")
    if codes.dim() != 1 or codes.numel() != fmt.code_bytes(param.numel(), block) or not codes.is_contiguous():
        raise ValueError(f"adam_step_blockwise_: {name}_codes must be a contiguous 1-D tensor of "
                         f"{fmt.code_bytes(param.numel(), block)} bytes, got shape {list(codes.shape)}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"adam_step_blockwise_: {name}_absmax must be float32, got {absmax.dtype}")
    if absmax.dim() != 1 or absmax.numel() != blocks or not absmax.is_contiguous():
        raise ValueError(f"adam_step_blockwise_: {name}_absmax must be a contiguous 1-D tensor of {blocks} values, "
                         f"got shape {list(absmax.shape)}")
