"""The SIMD Adam kernel against the reference (bit for bit), torch.optim (fp32 tolerance)
and the float64 oracle, every step, every state tensor, on every forced SIMD path."""
import itertools

import pytest
import torch

from offload_engine import kernels, reference
from conftest import bits
from tolerances import ORACLE, ORACLE_EXP_AVG, ORACLE_EXP_AVG_SQ, STEP_VS_TORCH

SIZES = [1, 7, 15, 16, 17, 4097, 1_000_003]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 20


def _hyper(step, **over):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=step, adamw_mode=True,
              bias_correction=True, maximize=False, grad_scale=1.0, stochastic_rounding=False, seed=0)
    kw.update(over)
    return kw


def _grads(n, dtype, gen, scale=1.0):
    """A fresh random gradient for each step, spanning magnitudes the dtype can hold."""
    span = {torch.float32: 6.0, torch.bfloat16: 6.0, torch.float16: 2.5}[dtype]
    mags = torch.pow(10.0, torch.empty(n).uniform_(-span, span, generator=gen))
    return (torch.randn(n, generator=gen) * mags * scale).to(dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_bit_identical_to_reference(simd_path, n, param_dtype):
    """Every path reproduces the fp32 reference exactly: params (with their bf16/fp16
    rounding), exp_avg and exp_avg_sq, at every step, for each mode the kernel has."""
    gen = torch.Generator().manual_seed(n)
    modes = [dict(adamw_mode=True), dict(adamw_mode=False, maximize=True, grad_scale=0.37),
             dict(stochastic_rounding=True, bias_correction=False)]
    grad_dtypes = [torch.float32, torch.bfloat16, torch.float16] if n < 10_000 else [param_dtype]
    for mode, grad_dtype in itertools.product(modes, grad_dtypes):
        p = torch.randn(n, generator=gen).to(param_dtype)
        m, v = torch.zeros(n), torch.zeros(n)
        p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
        for step in range(1, 6 if n > 10_000 else STEPS + 1):
            g = _grads(n, grad_dtype, gen)
            hyper = _hyper(step, seed=step * 7919, **mode)
            kernels.adam_step_(p, g, m, v, **hyper)
            reference.adam_step_(p_ref, g, m_ref, v_ref, **hyper)
            where = f"path={simd_path} n={n} param={param_dtype} grad={grad_dtype} mode={mode} step={step}"
            assert torch.equal(bits(p), bits(p_ref)), where
            assert torch.equal(bits(m), bits(m_ref)), where
            assert torch.equal(bits(v), bits(v_ref)), where


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adamw", [True, False])
def test_matches_torch_optim(simd_path, n, adamw):
    """fp32 params against torch.optim.AdamW / Adam at every step (STEP_VS_TORCH)."""
    gen = torch.Generator().manual_seed(1000 + n)
    p0 = torch.randn(n, generator=gen)
    ours = p0.clone()
    m, v = torch.zeros(n), torch.zeros(n)
    theirs = torch.nn.Parameter(p0.clone())
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    topt = cls([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False)
    for step in range(1, STEPS + 1):
        g = torch.randn(n, generator=gen)
        theirs.grad = g.clone()
        topt.step()
        kernels.adam_step_(ours, g, m, v, **_hyper(step, adamw_mode=adamw))
        st = topt.state[theirs]
        tol = STEP_VS_TORCH[torch.float32]
        tol.check(ours, theirs.detach(), msg=lambda s: f"param step {step}: {s}")
        tol.check(m, st["exp_avg"], msg=lambda s: f"exp_avg step {step}: {s}")
        tol.check(v, st["exp_avg_sq"], msg=lambda s: f"exp_avg_sq step {step}: {s}")


@pytest.mark.parametrize("grad_scale_of_magnitude", [1e15, 1e-15])
@pytest.mark.parametrize("maximize", [False, True])
def test_extreme_gradients_match_torch(simd_path, grad_scale_of_magnitude, maximize):
    """Very large and tiny gradients (no overflow in either implementation's v update)."""
    n = 4099
    gen = torch.Generator().manual_seed(5)
    ours = torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    theirs = torch.nn.Parameter(ours.clone())
    topt = torch.optim.Adam([theirs], lr=1e-3, eps=1e-8, maximize=maximize, foreach=False)
    for step in range(1, STEPS + 1):
        g = torch.randn(n, generator=gen) * grad_scale_of_magnitude
        theirs.grad = g.clone()
        topt.step()
        kernels.adam_step_(ours, g, m, v, **_hyper(step, lr=1e-3, weight_decay=0.0, adamw_mode=False, maximize=maximize))
        tol = STEP_VS_TORCH[torch.float32]
        tol.check(ours, theirs.detach())
        # torch updates m by lerp, we by beta1*m + (1-beta1)*g: where m cancels to near zero the
        # two differ by an ulp of g, so the atol is taken in units of the gradient's scale (and
        # of its square for v, where it is nothing against the relative bound).
        tol.check(m, topt.state[theirs]["exp_avg"], scale=grad_scale_of_magnitude)
        tol.check(v, topt.state[theirs]["exp_avg_sq"], scale=grad_scale_of_magnitude ** 2)


@pytest.mark.parametrize("param_dtype", DTYPES)
def test_lr_zero_leaves_params_unchanged(simd_path, param_dtype):
    n = 1031
    p = torch.randn(n).to(param_dtype)
    p0 = p.clone()
    m, v = torch.zeros(n), torch.zeros(n)
    for step in range(1, 4):
        kernels.adam_step_(p, torch.randn(n).to(param_dtype), m, v, **_hyper(step, lr=0.0, stochastic_rounding=True))
    assert torch.equal(bits(p), bits(p0))
    assert m.abs().sum() > 0 and v.abs().sum() > 0  # the moments still advanced


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("adamw", [True, False])
def test_close_to_float64_oracle(simd_path, param_dtype, adamw):
    """Against the float64 oracle (which rounds its param to the same dtype each step)."""
    n = 4097
    gen = torch.Generator().manual_seed(11)
    p = torch.randn(n, generator=gen).to(param_dtype)
    m, v = torch.zeros(n), torch.zeros(n)
    p64, m64, v64 = p.clone(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step in range(1, STEPS + 1):
        g = _grads(n, torch.float32, gen)
        hyper = _hyper(step, adamw_mode=adamw)
        kernels.adam_step_(p, g, m, v, **hyper)
        reference.adam_step_(p64, g, m64, v64, compute_dtype=torch.float64, **hyper)
        # m can cancel to near zero; its error is measured against the element's own gradient
        # scale (the bias-corrected RMS, sqrt(v / (1 - beta2^t))) rather than against m.
        grad_rms = (v64 / (1 - 0.999 ** step)).sqrt()
        assert ((m.double() - m64).abs() <= ORACLE_EXP_AVG * grad_rms + 1e-30).all(), f"exp_avg step {step}"
        ORACLE_EXP_AVG_SQ.check(v.double(), v64)
        # fp32: a few fp32 ulps of drift; bf16/fp16: about one ulp of the param dtype.
        ORACLE[param_dtype].check(p.double(), p64.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    """Averaged over seeds, stochastic rounding lands on the fp32 value (nearest-even does
    not). The kernels reproduce this rounding bit for bit (test_bit_identical_to_reference)."""
    target = torch.rand(4096, generator=torch.Generator().manual_seed(9)) * 2 + 1
    trials = 400
    mean = sum(reference.round_to_dtype(target, dtype, stochastic=True, seed=s).double() for s in range(trials)) / trials
    err_sr = (mean - target.double()).abs().mean()
    err_rne = (target.to(dtype).double() - target.double()).abs().mean()
    assert err_sr < err_rne / 4, (err_sr, err_rne)


def test_tiling_does_not_change_results(native, monkeypatch):
    """Results are independent of the thread count (tiles are disjoint; SR keys on the index)."""
    n = 300_001
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
            kernels.adam_step_(p, g, m, v, **_hyper(1, stochastic_rounding=True, seed=42))
            outs.append((p, m, v))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(bits(a), bits(b))
