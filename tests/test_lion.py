"""Lion and Lion8bit: kernels bit-identical to the reference on every SIMD path; the optimizer
against Lion written in plain torch ops (torch.optim has none) at every step; 8-bit accuracy;
opcheck; state_dict."""
import copy

import pytest
import torch
from torch import nn

from offload_engine import kernels, reference
from offload_engine.optim import AdamW8bit, Lion, Lion8bit
from offload_engine.quant import FORMATS, codec
from conftest import bits
from tolerances import QUANTIZED_VS_FP32_PARAM_MEAN_ABS, RESYNCED_STATE, RESYNCED_STATE_OUTLIERS, STEP_VS_TORCH


@pytest.mark.parametrize("n", [1, 7, 17, 4097, 70_001])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lion_kernel_bit_identical(simd_path, n, param_dtype):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(param_dtype)
    m = torch.randn(n, generator=gen) * 1e-2
    p_ref, m_ref = p.clone(), m.clone()
    for step in range(1, 11):
        g = (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
        g[0] = 0.0  # sign(0) = 0 on the direction's zero lanes
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=step % 3 == 0,
                     grad_scale=0.5 if step % 2 else 1.0, stochastic_rounding=True, seed=step)
        kernels.lion_step_(p, g, m, **hyper)
        reference.lion_step_(p_ref, g, m_ref, **hyper)
        assert torch.equal(bits(p), bits(p_ref)) and torch.equal(bits(m), bits(m_ref)), f"{simd_path} step {step}"


@pytest.mark.parametrize("fmt,block", [("int8", 256), ("int8", 64), ("int4", 128)])
@pytest.mark.parametrize("n", [1, 255, 257, 4097])
def test_lion_blockwise_kernel_bit_identical(simd_path, fmt, block, n):
    gen = torch.Generator().manual_seed(n + block)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    codes, absmax = codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, FORMATS[fmt], True, block)
    ref = [p.clone(), codes.clone(), absmax.clone()]
    for step in range(1, 6):
        g = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, stochastic_rounding=True, seed=step)
        kernels.lion_step_blockwise_(p, g, codes, absmax, fmt=fmt, block=block, **hyper)
        reference.lion_step_blockwise_(ref[0], g, ref[1], ref[2], fmt=FORMATS[fmt], block=block, **hyper)
        assert torch.equal(bits(p), bits(ref[0])) and torch.equal(codes, ref[1]) and torch.equal(absmax, ref[2])


def _plain_lion_step(p, m, g, lr, beta1, beta2, wd):
    p.mul_(1 - lr * wd)
    p.add_(torch.sign(m * beta1 + g * (1 - beta1)), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


def test_lion_matches_plain_torch_every_step():
    p = nn.Parameter(torch.randn(64, 33))
    q, m = p.detach().clone(), torch.zeros(64, 33)
    opt = Lion([p], lr=3e-4, betas=(0.9, 0.99), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for step in range(20):
        g = torch.randn(64, 33, generator=torch.Generator().manual_seed(step))
        p.grad = g.clone()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        _plain_lion_step(q, m, g, lr, 0.9, 0.99, 0.05)
        STEP_VS_TORCH[torch.float32].check(p.detach(), q)
        STEP_VS_TORCH[torch.float32].check(opt.logical_state(p)["exp_avg"], m)
    assert set(opt.logical_state(p)) == {"step", "exp_avg"}


def test_lion8bit_accuracy_with_resync():
    """Lion8bit against fp32 Lion, re-synced each step (bitsandbytes' method): the sign
    update makes params agree exactly unless a direction's sign flips through quantization."""
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(1024, 1024, generator=gen) * 0.1
    ours, theirs = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt, ref = Lion8bit([ours], lr=1e-4), Lion([theirs], lr=1e-4)
    for step in range(1, 31):
        g = torch.randn(1024, 1024, generator=gen) * 0.01
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert (ours.detach() - theirs.detach()).abs().mean() < QUANTIZED_VS_FP32_PARAM_MEAN_ABS["int8"]
        logical, exact = opt.logical_state(ours)["exp_avg"], ref.logical_state(theirs)["exp_avg"]
        outside = (logical - exact).abs() > RESYNCED_STATE.atol + RESYNCED_STATE.rtol * exact.abs()
        assert outside.sum() < RESYNCED_STATE_OUTLIERS
        theirs.data.copy_(ours.detach())
        ref.state[theirs]["exp_avg"].copy_(logical)


def test_lion8bit_state_dict_round_trip_and_foreign_state():
    p = nn.Parameter(torch.randn(5000))
    opt = Lion8bit([p], min_8bit_size=0)
    p.grad = torch.randn(5000)
    opt.step()
    opt2 = Lion8bit([p], min_8bit_size=0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(opt2.state[p]["exp_avg_codes"], opt.state[p]["exp_avg_codes"])
    adam = AdamW8bit([p], min_8bit_size=0)
    with pytest.raises(ValueError, match="saved by a lion optimizer; this one runs adam"):
        adam.load_state_dict(copy.deepcopy(opt.state_dict()))
    unlabelled = copy.deepcopy(opt.state_dict())
    del unlabelled["algorithm"]  # e.g. written by another library: the moments still tell
    with pytest.raises(ValueError, match="no exp_avg_sq"):
        adam.load_state_dict(unlabelled)
    with pytest.raises(ValueError, match="saved by a adam optimizer; this one runs lion"):
        Lion8bit([p], min_8bit_size=0).load_state_dict(copy.deepcopy(adam.state_dict()))


def test_lion_sign_of_nan_follows_torch(native):
    """The kernels' sign agrees with torch.sign also on NaN (0 on CPU today)."""
    p, m = torch.zeros(33), torch.zeros(33)
    g = torch.zeros(33)
    g[5] = float("nan")
    p_ref, m_ref = p.clone(), m.clone()
    for simd in native.supported_simd_paths():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OFFLOAD_ENGINE_SIMD", simd)
            q, mq = p.clone(), m.clone()
            kernels.lion_step_(q, g, mq, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
        reference.lion_step_(p_ref, g, m_ref, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
        assert torch.equal(torch.isnan(q), torch.isnan(p_ref)), simd
        assert torch.equal(q[~torch.isnan(q)], p_ref[~torch.isnan(p_ref)]), simd
        p_ref, m_ref = p.clone(), m.clone()


@pytest.mark.parametrize("fmt,block", [(None, None), ("int8", 256)])
def test_lion_opcheck(native, fmt, block):
    n = 300
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, grad_scale=1.0,
              stochastic_rounding=False, seed=0)
    if fmt is None:
        torch.library.opcheck(torch.ops.offload_engine.lion_step_.default, (torch.randn(n), torch.randn(n),
                                                                             torch.zeros(n)), kw)
    else:
        codes, absmax = codec.quantize_blockwise(torch.randn(n) * 1e-2, FORMATS[fmt], True, block)
        t = codec.code_tables(fmt, True)
        torch.library.opcheck(torch.ops.offload_engine.lion_step_blockwise_.default,
                              (torch.randn(n), torch.randn(n), codes, absmax, t.map, t.lut,
                               [t.min_exponent, t.mantissa_bits]), dict(bits=8, block=block, **kw))


def test_lion_bad_input(native):
    p, g, m = torch.randn(10), torch.randn(10), torch.zeros(10)
    with pytest.raises(ValueError, match="beta2"):
        kernels.lion_step_(p, g, m, lr=1e-3, beta1=0.9, beta2=1.0, weight_decay=0.0)
    with pytest.raises(TypeError, match="exp_avg must be float32"):
        kernels.lion_step_(p, g, m.double(), lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match="Invalid beta"):
        Lion([nn.Parameter(torch.randn(3))], betas=(0.9, 1.5))
