"""Property test: for any valid hyperparameters, size and dtype pairing, the kernel equals the
fp32 reference bit for bit (hypothesis explores the corners the fixed cases miss)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from offload_engine import kernels, reference
from conftest import bits

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), param_dtype=DTYPES, grad_dtype=DTYPES,
       lr=st.floats(0, 1), beta1=st.floats(0, 0.999), beta2=st.floats(0, 0.99999),
       eps=st.floats(1e-12, 1e-2), weight_decay=st.floats(0, 1), step=st.integers(1, 10**6),
       adamw_mode=st.booleans(), bias_correction=st.booleans(), maximize=st.booleans(),
       grad_scale=st.floats(1e-4, 1e4), stochastic=st.booleans(), seed=st.integers(-2**63, 2**63 - 1),
       simd=st.sampled_from(["avx512vbmi", "avx512", "avx2", "scalar"]), data_seed=st.integers(0, 2**31))
def test_kernel_equals_reference(native, n, param_dtype, grad_dtype, lr, beta1, beta2, eps, weight_decay, step,
                                 adamw_mode, bias_correction, maximize, grad_scale, stochastic, seed, simd, data_seed):
    if simd not in native.supported_simd_paths():
        return
    gen = torch.Generator().manual_seed(data_seed)
    p = torch.randn(n, generator=gen).to(param_dtype)
    g = torch.randn(n, generator=gen).to(grad_dtype)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, adamw_mode=adamw_mode,
                 bias_correction=bias_correction, maximize=maximize, grad_scale=grad_scale,
                 stochastic_rounding=stochastic, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFLOAD_ENGINE_SIMD", simd)
        kernels.adam_step_(p, g, m, v, **hyper)
    reference.adam_step_(p_ref, g, m_ref, v_ref, **hyper)
    assert torch.equal(bits(p), bits(p_ref))
    assert torch.equal(bits(m), bits(m_ref))
    assert torch.equal(bits(v), bits(v_ref))
