"""Bad arguments to the kernel and to CPUAdam: a clear ValueError/TypeError naming the
argument, and nothing written."""
import pytest
import torch

from offload_engine import kernels
from offload_engine.optim import CPUAdam
from conftest import bits

GOOD = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def _tensors(n=33, param_dtype=torch.float32):
    return [torch.randn(n).to(param_dtype), torch.randn(n), torch.rand(n), torch.rand(n)]


def _assert_untouched(before, after):
    for a, b in zip(before, after):
        assert torch.equal(bits(a), bits(b)), "a rejected call wrote to its tensors"


@pytest.mark.parametrize("name,value", [("lr", -1e-3), ("lr", float("nan")), ("eps", -1e-8), ("beta1", 1.0),
                                        ("beta1", -0.1), ("beta2", 1.5), ("weight_decay", -0.1), ("step", 0),
                                        ("grad_scale", float("inf"))])
def test_bad_hyperparameter_names_it(native, name, value):
    t = _tensors()
    before = [x.clone() for x in t]
    with pytest.raises(ValueError, match=name):
        kernels.adam_step_(*t, **{**GOOD, name: value})
    _assert_untouched(before, t)


def _mutations():
    n = 33
    yield "grad", "shape", lambda t: [t[0], torch.randn(n + 1), t[2], t[3]], ValueError
    yield "exp_avg", "shape", lambda t: [t[0], t[1], torch.rand(n, 1), t[3]], ValueError
    yield "exp_avg_sq", "float32", lambda t: [t[0], t[1], t[2], t[3].to(torch.bfloat16)], TypeError
    yield "grad", "float32, bfloat16 or float16", lambda t: [t[0], t[1].to(torch.int32), t[2], t[3]], TypeError
    yield "param", "float32, bfloat16 or float16", lambda t: [t[0].double(), t[1], t[2], t[3]], TypeError
    yield "param", "contiguous", lambda t: [torch.randn(n, 2)[:, 0], t[1], t[2], t[3]], ValueError
    yield "grad", "contiguous", lambda t: [t[0], torch.randn(n, 2)[:, 0], t[2], t[3]], ValueError
    yield "grad", "meta", lambda t: [t[0], torch.empty(n, device="meta"), t[2], t[3]], ValueError
    yield "distinct", "distinct", lambda t: [t[0], t[1], t[2], t[2]], ValueError


@pytest.mark.parametrize("arg,words,make,exc", list(_mutations()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_tensor_names_it(native, arg, words, make, exc):
    t = make(_tensors())
    before = [x.clone() if x.device.type == "cpu" else x for x in t]
    with pytest.raises(exc) as info:
        kernels.adam_step_(*t, **GOOD)
    assert arg in str(info.value) and words in str(info.value), str(info.value)
    _assert_untouched([b for b in before if b.device.type == "cpu"], [x for x in t if x.device.type == "cpu"])


def test_forcing_an_unknown_simd_path_is_refused(native, monkeypatch):
    t = _tensors()
    before = [x.clone() for x in t]
    monkeypatch.setenv("OFFLOAD_ENGINE_SIMD", "neon9")
    with pytest.raises(ValueError, match="OFFLOAD_ENGINE_SIMD.*auto, avx512vbmi, avx512, avx2, scalar"):
        kernels.adam_step_(*t, **GOOD)
    _assert_untouched(before, t)


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "lr"), (dict(eps=-1.0), "eps"),
                                          (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
                                          (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                                          (dict(weight_decay=-1.0), "weight_decay"), (dict(amsgrad=True), "amsgrad")])
def test_cpu_adam_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPUAdam([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_cpu_adam_rejects_unsupported_param_dtype_up_front():
    with pytest.raises(TypeError, match="float64"):
        CPUAdam([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_cpu_adam_rejects_bad_group_and_loaded_state():
    p = torch.nn.Parameter(torch.randn(5))
    opt = CPUAdam([p])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": -1})
    p.grad = torch.randn(5)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(6)
    before = opt.state[p]["exp_avg"].clone()
    with pytest.raises(ValueError, match="exp_avg.*shape"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["exp_avg"], before)
