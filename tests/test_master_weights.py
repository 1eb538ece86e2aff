"""fp32 master weights kept with the optimizer state ([Note: master weights], optim/_update.py)
and the in-kernel grad_scale the engine uses for loss-scale unscaling and clipping.

The oracle for master weights: the same optimizer on fp32 params that start at the bf16/fp16
values and receive the bf16/fp16 grads widened to fp32. The kernels widen a bf16 grad
exactly, so the master must equal that fp32 param bit for bit every step, and the bf16 param
must be it rounded to nearest."""
from __future__ import annotations

import pytest
import torch

from offload_engine.optim import (
    Adam8bit,
    AdamW8bit,
    CPUAdam,
    Lion,
    Lion8bit,
    PagedAdam,
    PagedAdamW,
    PagedAdamW8bit,
    PagedLion,
    PagedLion8bit,
)
from tolerances import ORACLE

SIZES = (1, 7, 300, 4097)  # odd sizes; 4097 crosses 8-bit blocks and small pages
UNPAGED = {
    "CPUAdam": (CPUAdam, dict(weight_decay=0.01)),
    "AdamW8bit": (AdamW8bit, dict(min_8bit_size=256)),
    "Adam8bit": (Adam8bit, dict(min_8bit_size=256, weight_decay=0.01)),
    "Lion": (Lion, dict(weight_decay=0.01)),
    "Lion8bit": (Lion8bit, dict(min_8bit_size=256)),
}
PAGED_TWIN = {  # paged optimizer -> the unpaged one it must equal bit for bit
    PagedAdamW: (CPUAdam, dict(weight_decay=1e-2)),
    PagedAdam: (CPUAdam, dict(adamw_mode=False)),
    PagedAdamW8bit: (AdamW8bit, {}),
    PagedLion: (Lion, {}),
    PagedLion8bit: (Lion8bit, {}),
}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in SIZES]


def _grads(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(n, generator=g).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(UNPAGED))
def test_master_equals_fp32_params_fed_the_low_precision_grads(name, dtype):
    cls, kw = UNPAGED[name]
    low = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_low = cls(low, lr=1e-3, master_weights=True, **kw)
    opt_ref = cls(ref, lr=1e-3, **kw)
    for step in range(6):
        for p, r, g in zip(low, ref, _grads(step, dtype)):
            p.grad, r.grad = g, g.float()
        opt_low.step()
        opt_ref.step()
        for p, r in zip(low, ref):
            master = opt_low.state[p]["master"]
            assert master.dtype == torch.float32 and master.shape == p.shape
            assert torch.equal(master, r.detach()), f"step {step}, size {p.numel()}"
            assert torch.equal(p.detach(), r.detach().to(dtype)), f"step {step}, size {p.numel()}"
            ls_low, ls_ref = opt_low.logical_state(p), opt_ref.logical_state(r)
            assert torch.equal(ls_low["master"], r.detach())
            for key in ls_ref:
                assert torch.equal(ls_low[key], ls_ref[key]), key


def test_master_weights_keep_small_updates_that_bf16_loses():
    """lr * update below half a bf16 ulp: without a master the param never moves."""
    plain = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    kept = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    o_plain, o_kept = CPUAdam([plain], lr=1e-3), CPUAdam([kept], lr=1e-3, master_weights=True)
    for _ in range(20):
        plain.grad = torch.ones(64, dtype=torch.bfloat16)
        kept.grad = torch.ones(64, dtype=torch.bfloat16)
        o_plain.step()
        o_kept.step()
    assert torch.equal(plain.detach(), torch.ones(64, dtype=torch.bfloat16))  # 20 * 1e-3 lost in rounding
    ORACLE[torch.float32].check(o_kept.state[kept]["master"], torch.full((64,), 1 - 20e-3))
    assert kept.detach()[0].item() < 1.0


def test_fp32_params_get_no_master():
    p = torch.nn.Parameter(torch.randn(100))
    opt = CPUAdam([p], master_weights=True)
    p.grad = torch.randn(100)
    opt.step()
    assert "master" not in opt.state[p] and "master" not in opt.logical_state(p)


@pytest.mark.parametrize("store", ["cpu", "nvme"])
@pytest.mark.parametrize("paged_cls", list(PAGED_TWIN), ids=lambda c: c.__name__)
def test_paged_master_weights_equal_unpaged(paged_cls, store, tmp_path):
    """The master is paged with the moments (in the same pages) and gives the same bits."""
    twin_cls, twin_kw = PAGED_TWIN[paged_cls]
    paged_params, twin_params = _params(torch.bfloat16), _params(torch.bfloat16)
    extra = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    quant = "8bit" in paged_cls.__name__
    paged = paged_cls(paged_params, lr=1e-3, master_weights=True, store=store, page_size_mb=0.008,
                      **({"min_8bit_size": 256} if quant else {}), **extra)
    twin = twin_cls(twin_params, lr=1e-3, master_weights=True, **({"min_8bit_size": 256} if quant else {}), **twin_kw)
    for step in range(4):
        for p, q, g in zip(paged_params, twin_params, _grads(step, torch.bfloat16)):
            p.grad, q.grad = g, g.clone()
        paged.step(grad_scale=0.75)
        twin.step(grad_scale=0.75)
        for p, q in zip(paged_params, twin_params):
            assert torch.equal(p.detach(), q.detach()), f"step {step}, size {p.numel()}"
            ls_p, ls_q = paged.logical_state(p), twin.logical_state(q)
            assert set(ls_p) == set(ls_q) and "master" in ls_p
            for key in ls_q:
                assert torch.equal(ls_p[key], ls_q[key]), (key, step, p.numel())
    assert paged.paging_stats()["num_pages"] > 1
    # The master is state at rest: 4 bytes per element more than the moments alone.
    without = paged_cls(_params(torch.bfloat16), lr=1e-3, store="cpu", page_size_mb=0.008,
                        **({"min_8bit_size": 256} if quant else {}))
    for p, g in zip(without.param_groups[0]["params"], _grads(0, torch.bfloat16)):
        p.grad = g
    without.step()
    assert paged.paging_stats()["state_bytes"] - without.paging_stats()["state_bytes"] == 4 * sum(SIZES)
    paged.close()


@pytest.mark.parametrize("paged_cls", [PagedAdamW, PagedAdamW8bit], ids=lambda c: c.__name__)
def test_master_round_trips_through_state_dict_between_paged_and_unpaged(paged_cls, tmp_path):
    twin_cls, twin_kw = PAGED_TWIN[paged_cls]
    quant = {"min_8bit_size": 256} if "8bit" in paged_cls.__name__ else {}
    straight_params = _params(torch.bfloat16)
    straight = twin_cls(straight_params, lr=1e-3, master_weights=True, **quant, **twin_kw)
    first_params = _params(torch.bfloat16)
    first = paged_cls(first_params, lr=1e-3, master_weights=True, store="nvme", nvme_path=str(tmp_path),
                      page_size_mb=0.008, **quant)
    for step in range(3):
        for p, q, g in zip(straight_params, first_params, _grads(step, torch.bfloat16)):
            p.grad, q.grad = g, g.clone()
        straight.step()
        first.step()
    sd = first.state_dict()
    assert all(s["master"].dtype == torch.float32 and s["master"].shape == p.shape
               for s, p in zip(sd["state"].values(), first_params))
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = twin_cls(resumed_params, lr=1e-3, master_weights=True, **quant, **twin_kw)
    resumed.load_state_dict(sd)
    for step in range(3, 6):
        for p, q, g in zip(straight_params, resumed_params, _grads(step, torch.bfloat16)):
            p.grad, q.grad = g, g.clone()
        straight.step()
        resumed.step()
    for p, q in zip(straight_params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(straight.state[p]["master"], resumed.state[q]["master"])
    first.close()


def test_loading_a_state_without_master_starts_the_master_from_the_param():
    params = _params(torch.bfloat16)
    plain = CPUAdam(params, lr=1e-3)
    for p, g in zip(params, _grads(0, torch.bfloat16)):
        p.grad = g
    plain.step()
    sd = plain.state_dict()
    with_master = PagedAdamW(params, lr=1e-3, weight_decay=0, master_weights=True, page_size_mb=0.008)
    with_master.load_state_dict(sd)
    for p in params:
        assert torch.equal(with_master.logical_state(p)["master"], p.detach().float())
    # ... and a saved master is dropped by an optimizer that keeps none.
    masters = CPUAdam(params, lr=1e-3, master_weights=True)
    masters.load_state_dict(with_master.state_dict())
    no_master = CPUAdam(params, lr=1e-3)
    no_master.load_state_dict(masters.state_dict())
    assert all("master" not in no_master.state[p] for p in params)


def test_a_saved_master_of_the_wrong_size_is_refused_before_anything_changes():
    params = _params(torch.bfloat16)
    opt = CPUAdam(params, lr=1e-3, master_weights=True)
    for p, g in zip(params, _grads(0, torch.bfloat16)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[params[2]].items() if isinstance(v, torch.Tensor)}
    sd["state"][2] = {**sd["state"][2], "master": torch.zeros(5)}  # torch's state_dict shares the live dicts
    with pytest.raises(ValueError, match="'master' has 5 elements"):
        opt.load_state_dict(sd)
    for key, value in before.items():
        assert torch.equal(opt.state[params[2]][key], value)


def test_master_weights_and_stochastic_rounding_are_exclusive():
    with pytest.raises(ValueError, match="master_weights=True and stochastic_rounding=True"):
        CPUAdam([torch.nn.Parameter(torch.randn(3).bfloat16())], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights must be True or False"):
        AdamW8bit([torch.nn.Parameter(torch.randn(3))], master_weights="yes")


@pytest.mark.parametrize("cls", [CPUAdam, AdamW8bit, Lion, PagedAdamW, PagedLion8bit], ids=lambda c: c.__name__)
def test_grad_scale_equals_scaling_the_grads_first(cls):
    """step(grad_scale=s) == step() on grads multiplied by s in fp32, bit for bit."""
    kw = {"min_8bit_size": 256} if "8bit" in cls.__name__ else {}
    a, b = _params(torch.float32), _params(torch.float32)
    opt_a, opt_b = cls(a, lr=1e-3, **kw), cls(b, lr=1e-3, **kw)
    for step in range(4):
        scale = [0.37, 1.0, 2.0**-14, 3.1][step]
        for p, q, g in zip(a, b, _grads(step, torch.float32)):
            p.grad, q.grad = g, g * scale
        opt_a.step(grad_scale=scale)
        opt_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p.detach(), q.detach()), (step, p.numel())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), "1", True])
def test_bad_grad_scale_is_refused_before_any_param_moves(bad):
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = PagedAdamW(params, page_size_mb=0.008)
    for p, g in zip(params, _grads(0, torch.float32)):
        p.grad = g
    with pytest.raises(ValueError, match="grad_scale must be a finite number"):
        opt.step(grad_scale=bad)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
