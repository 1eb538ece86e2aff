"""CPUAdam as a torch.optim optimizer: DeepSpeedCPUAdam's constructor, torch.optim's numbers
in a training loop with an LR scheduler, a mid-run state_dict reload, bf16 params."""
import copy
import inspect

import pytest
import torch
from torch import nn

from offload_engine.optim import CPUAdam
from conftest import bits
from tolerances import STEP_VS_TORCH


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 37), nn.GELU(), nn.Linear(37, 5), nn.LayerNorm(5)).to(dtype)
    model.register_parameter("unused", nn.Parameter(torch.randn(3, dtype=dtype)))  # never gets a grad
    return model


def _batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 13, generator=g).to(dtype), torch.randn(8, 5, generator=g).to(dtype)


def _train_step(model, opt, sched, step, dtype=torch.float32):
    x, y = _batch(step, dtype)
    loss = nn.functional.mse_loss(model(x).float(), y.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def test_constructor_matches_deepspeed_cpu_adam():
    sig = inspect.signature(CPUAdam.__init__)
    positional = [(n, p.default) for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    assert positional == [("params", inspect.Parameter.empty), ("lr", 1e-3), ("bias_correction", True),
                          ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0), ("amsgrad", False),
                          ("adamw_mode", True), ("fp32_optimizer_states", True)]


@pytest.mark.parametrize("adamw_mode", [True, False])
def test_training_loop_with_scheduler_matches_torch(adamw_mode):
    ours, theirs = _model(), _model()
    opt = CPUAdam(ours.parameters(), lr=3e-3, weight_decay=0.1, adamw_mode=adamw_mode)
    ref_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ref = ref_cls(theirs.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=30)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=3e-3, total_steps=30)
    for step in range(30):
        _train_step(ours, opt, sched, step)
        _train_step(theirs, ref, ref_sched, step)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            STEP_VS_TORCH[torch.float32].check(a, b, msg=lambda s: f"{name} step {step}: {s}")
            if a.grad is not None:
                STEP_VS_TORCH[torch.float32].check(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
    assert not opt.state[ours.unused]  # a param without grad keeps no state and is not touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_run_state_dict_reload_is_exact(dtype):
    def run(reload_at=None):
        model = _model(dtype=dtype)
        opt = CPUAdam(model.parameters(), lr=1e-2, stochastic_rounding=dtype != torch.float32)
        for step in range(12):
            if step == reload_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = _model(seed=123, dtype=dtype)
                model.load_state_dict(saved_model)
                opt = CPUAdam(model.parameters(), lr=999.0)  # hyperparameters come from the state_dict
                opt.load_state_dict(saved_opt)
            _train_step(model, opt, None, step, dtype)
        return model, opt

    (m1, o1), (m2, o2) = run(), run(reload_at=6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(bits(a.detach()), bits(b.detach()))
        if a in o1.state and o1.state[a]:
            assert o2.state[b]["exp_avg"].dtype == torch.float32
            assert torch.equal(o1.state[a]["exp_avg"], o2.state[b]["exp_avg"])
            assert torch.equal(o1.state[a]["exp_avg_sq"], o2.state[b]["exp_avg_sq"])
            assert o1.state[a]["step"].item() == o2.state[b]["step"].item() == 12


def test_bf16_params_keep_fp32_state_and_learn():
    model = _model(dtype=torch.bfloat16)
    opt = CPUAdam(model.parameters(), lr=1e-2)
    losses = [_train_step(model, opt, None, step % 4, torch.bfloat16) for step in range(60)]
    first = next(p for p in model.parameters() if p.grad is not None)
    assert opt.state[first]["exp_avg"].dtype == torch.float32 and first.dtype == torch.bfloat16
    assert losses[-1] < 0.5 * losses[0]


def test_non_contiguous_param_matches_torch():
    base = torch.randn(7, 9)
    ours = nn.Parameter(base.t())  # a transposed (non-contiguous) leaf
    theirs = nn.Parameter(base.t().clone())
    opt, ref = CPUAdam([ours], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0, foreach=False)
    for step in range(5):
        g = torch.randn(9, 7, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        STEP_VS_TORCH[torch.float32].check(ours.detach(), theirs.detach())
    assert not ours.is_contiguous()


def test_closure_is_called_with_grad_enabled():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = CPUAdam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert torch.all(p.detach().abs() < torch.tensor([1.0, 2.0]))
