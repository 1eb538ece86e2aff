"""torch.library.opcheck on the native op: schema (mutations declared), FakeTensor/Meta,
autograd registration and AOT dispatch."""
import pytest
import torch


@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_opcheck(native, param_dtype, grad_dtype, stochastic):
    n = 37
    args = (torch.randn(n).to(param_dtype), torch.randn(n).to(grad_dtype), torch.zeros(n), torch.zeros(n))
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, adamw_mode=True,
                  bias_correction=True, maximize=False, grad_scale=1.0, stochastic_rounding=stochastic, seed=5)
    torch.library.opcheck(torch.ops.offload_engine.adam_step_.default, args, kwargs)
