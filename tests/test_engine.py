"""The engine against hand-written torch loops: accumulation, clipping, precision and the fp16
loss scale (offload_engine/engine/engine.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError
from offload_engine.engine.loss_scaler import LossScaler
from offload_engine.optim import CPUAdam
from tolerances import MIXED_PRECISION, TRAINED_VS_TORCH

GAS, CLIP, STEPS = 4, 0.5, 20


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 7))


def _batch(i, dtype=torch.float32):
    g = torch.Generator().manual_seed(i)
    return torch.randn(5, 13, generator=g).to(dtype), torch.randn(5, 7, generator=g)


def _loss(model, i):
    x, y = _batch(i, next(model.parameters()).dtype)
    return torch.nn.functional.mse_loss(model(x).float(), y)


def _hand_loop(model, opt, steps=STEPS, gas=GAS, clip=CLIP):
    """The reference: plain torch, as a user would write accumulation and clipping."""
    losses, params = [], []
    for i in range(steps * gas):
        loss = _loss(model, i)
        (loss / gas).backward()
        losses.append(loss.item())
        if (i + 1) % gas == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            params.append([p.detach().clone() for p in model.parameters()])
    return losses, params


def _engine_loop(engine, steps=STEPS, gas=GAS):
    losses, params = [], []
    for i in range(steps * gas):
        loss = _loss(engine.module, i)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if (i + 1) % gas == 0:
            params.append([p.detach().clone() for p in engine.module.parameters()])
    return losses, params


CONFIG = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP}


def test_engine_equals_a_torch_loop_with_torch_adamw_bit_for_bit():
    ref_model, model = _model(), _model()
    ref_losses, ref_params = _hand_loop(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=3e-3))
    engine, opt, _, _ = offload_engine.initialize(model, CONFIG,
                                                  optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
    losses, params = _engine_loop(engine)
    assert losses == ref_losses
    for step, (a, b) in enumerate(zip(params, ref_params)):
        for p, q in zip(a, b):
            assert torch.equal(p, q), f"step {step}"
    assert engine.global_steps == STEPS and engine.micro_steps == STEPS * GAS
    # clipping was active: the first steps' grad norms exceed CLIP
    assert engine.get_global_grad_norm() is not None


def test_engine_with_config_optimizer_equals_a_loop_with_the_same_optimizer_and_clip_grad_norm():
    """The engine folds the clipping coefficient into the kernel (grad_scale): same bits as
    clip_grad_norm_ followed by step()."""
    ref_model, model = _model(), _model()
    ref_losses, ref_params = _hand_loop(ref_model, CPUAdam(ref_model.parameters(), lr=3e-3, weight_decay=0.01))
    engine, opt, _, _ = offload_engine.initialize(
        model, {**CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}})
    assert type(opt).__name__ == "CPUAdam"
    losses, params = _engine_loop(engine)
    assert losses == ref_losses
    for a, b in zip(params, ref_params):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_engine_with_our_adamw_tracks_torch_adamw_closely():
    ref_model, model = _model(), _model()
    _, ref_params = _hand_loop(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=0.01))
    engine, *_ = offload_engine.initialize(
        model, {**CONFIG, "optimizer": {"type": "PagedAdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}})
    _, params = _engine_loop(engine)
    for a, b in zip(params, ref_params):
        for p, q in zip(a, b):
            TRAINED_VS_TORCH[torch.float32].check(p, q)


def test_bf16_engine_with_master_weights_stays_close_to_fp32():
    ref_model, model = _model(), _model()
    ref_losses, ref_params = _hand_loop(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=3e-3))
    engine, opt, _, _ = offload_engine.initialize(
        model, {**CONFIG, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}})
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    losses, params = _engine_loop(engine)
    MIXED_PRECISION[torch.bfloat16]["loss"].check(torch.tensor(losses), torch.tensor(ref_losses))
    # The fp32 masters follow the fp32 run closely; the bf16 params are them rounded.
    for p, q in zip(model.parameters(), ref_params[-1]):
        master = opt.logical_state(p)["master"]
        MIXED_PRECISION[torch.bfloat16]["master"].check(master, q)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_bf16_without_masters_refuses_an_optimizer_that_keeps_none():
    model = _model()
    with pytest.raises(ConfigError, match="paging.master_weights"):
        offload_engine.initialize(model, {**CONFIG, "bf16": {"enabled": True}},
                                  optimizer=torch.optim.AdamW(model.parameters()))


def test_fp16_overflow_skips_the_step_and_leaves_params_and_state_bit_identical():
    model = _model()
    config = {**CONFIG, "gradient_accumulation_steps": 1,
              "fp16": {"enabled": True, "initial_scale_power": 10, "hysteresis": 1},
              "optimizer": {"type": "PagedAdamW8bit", "params": {"lr": 1e-3, "min_8bit_size": 64}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 1e-3}}}
    engine, opt, _, sched = offload_engine.initialize(model, config)
    for i in range(3):
        engine.backward(_loss(model, i))
        engine.step()
    assert engine.was_step_applied() and engine.loss_scale == 1024.0
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    lr = engine.get_lr()
    x, y = _batch(99, torch.float16)
    loss = torch.nn.functional.mse_loss(model(x * 60000).float(), y)  # inf activations -> non-finite grads
    engine.backward(loss)
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert engine.loss_scale == 512.0 and engine.get_global_grad_norm() == float("inf")
    assert engine.get_lr() == lr  # the schedule does not advance on a skipped step
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    for key, s in state["state"].items():
        for name, value in s.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][key][name], value), name
    assert all(p.grad is None for p in model.parameters())
    engine.backward(_loss(model, 4))  # and training goes on
    engine.step()
    assert engine.was_step_applied() and not torch.equal(next(model.parameters()).detach(), params[0])


def test_fp16_unscales_before_clipping_and_stepping():
    """fp16 grads scaled by S, unscaled and clipped by the engine: the fp32 masters move as a
    loop's that never scales (eps=1 makes Adam's step proportional to the grads, so a missing
    unscale or a clip on the scaled norm would show), and the reported norm is the unscaled one."""
    model = _model()
    engine, opt, _, _ = offload_engine.initialize(model, {
        **CONFIG, "gradient_clipping": 0.05, "fp16": {"enabled": True, "initial_scale_power": 12},
        "optimizer": {"type": "CPUAdam", "params": {"lr": 1e-2, "eps": 1.0}}})
    ref_model = _model().half()
    ref = CPUAdam(ref_model.parameters(), lr=1e-2, eps=1.0, master_weights=True)
    start = [p.detach().float().clone() for p in ref_model.parameters()]
    for i in range(GAS * 2):
        engine.backward(_loss(model, i))
        engine.step()
        (_loss(ref_model, i) / GAS).backward()
        if (i + 1) % GAS == 0:
            norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
            ref.step()
            ref.zero_grad()
            assert engine.get_global_grad_norm() == pytest.approx(float(norm),
                                                                  rel=MIXED_PRECISION[torch.float16]["grad_norm_rel"])
    assert engine.loss_scale == 2.0**12 and engine.skipped_steps == 0
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start):
        moved = opt.logical_state(p)["master"] - p0
        ref_moved = ref.logical_state(q)["master"] - p0
        MIXED_PRECISION[torch.float16]["moved"].check(moved, ref_moved, scale=float(ref_moved.abs().max()))


OVERFLOWS = [False, True, True, False, False, False, True, False, False, False, False, False, False, False, True,
             True, True, False]


def test_dynamic_loss_scale_follows_deepspeeds_rule():
    s = LossScaler(dynamic=True, init_scale=2.0**8, window=3, hysteresis=2)
    seen = []
    for overflow in OVERFLOWS[:8]:
        s.update(overflow)
        seen.append(s.scale)
    # Worked by hand (DeepSpeed's rule): it0 clean, no clean step before it: 256; it1 overflow:
    # budget 2 -> 1, keep; it2 overflow: budget 1 -> halve 128; it3..it5 clean with 0, 1, 2
    # clean steps before: keep; it6 overflow: budget still 1 -> 64; it7 clean: keep.
    assert seen == [256, 256, 128, 128, 128, 128, 64, 64]
    static = LossScaler(dynamic=False, init_scale=128.0)
    static.update(True)
    assert static.scale == 128.0 and static.overflows == 1
    floor = LossScaler(dynamic=True, init_scale=4.0, min_scale=2.0, hysteresis=1)
    for _ in range(3):
        floor.update(True)
    assert floor.scale == 2.0


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_dynamic_loss_scale_equals_deepspeeds_scaler(seed, consecutive, monkeypatch):
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it logs on rank 0; no process group here
    import random as pyrandom
    rng = pyrandom.Random(seed)
    flags = OVERFLOWS + [rng.random() < 0.3 for _ in range(200)]
    theirs = loss_scaler.DynamicLossScaler(init_scale=2.0**10, scale_window=4, min_scale=1.0, delayed_shift=3,
                                           consecutive_hysteresis=consecutive, raise_error_at_min_scale=False)
    ours = LossScaler(dynamic=True, init_scale=2.0**10, window=4, hysteresis=3, consecutive_hysteresis=consecutive,
                      min_scale=1.0)
    for i, overflow in enumerate(flags):
        theirs.update_scale(overflow)
        ours.update(overflow)
        assert ours.scale == theirs.cur_scale, i


def test_steps_only_at_accumulation_boundaries_and_the_scheduler_follows():
    model = _model()
    engine, opt, _, sched = offload_engine.initialize(model, {
        "train_batch_size": 15, "train_micro_batch_size_per_gpu": 5,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_type": "linear",
                                                     "warmup_min_lr": 1e-3}}})
    assert engine.gradient_accumulation_steps == 3 and engine.train_batch_size == 15
    first = [p.detach().clone() for p in model.parameters()]
    lrs = []
    for i in range(9):
        engine.backward(_loss(model, i))
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        lrs.append(engine.get_lr()[0])
        changed = not all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), first))
        assert changed == (i >= 2), i
        assert boundary == ((i + 1) % 3 == 0)
    assert engine.global_steps == 3 and engine.global_samples == 45
    # The lr moves at boundaries only (DeepSpeed's WarmupLR: the first step() reaches iteration
    # 0, still warmup_min_lr; linear warmup over 4 steps to the optimizer's lr 1e-2 after that).
    assert lrs[:5] == [1e-3] * 5
    assert lrs[5] == lrs[6] == lrs[7] == pytest.approx(1e-3 + (1e-2 - 1e-3) / 4)
    assert lrs[8] == pytest.approx(1e-3 + 2 * (1e-2 - 1e-3) / 4)


def test_initialize_errors_are_clear():
    model = _model()
    with pytest.raises(ConfigError, match="no optimizer"):
        offload_engine.initialize(model, {})
    with pytest.raises(ConfigError, match="optimizer section and initialize"):
        offload_engine.initialize(model, {"optimizer": {"type": "AdamW"}},
                                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="paging.overlap: 'exact' needs a paged optimizer"):
        offload_engine.initialize(model, {"optimizer": {"type": "AdamW"}, "gradient_clipping": 1.0,
                                          "paging": {"overlap": "exact"}})
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not one of the model's"):
        offload_engine.initialize(model, {}, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        offload_engine.initialize("model", {})
    engine, *_ = offload_engine.initialize(model, {"optimizer": {"type": "AdamW"}})
    with pytest.raises(ValueError, match="scalar loss"):
        engine.backward(torch.ones(3))


def test_frozen_params_get_no_state_and_the_memory_report_says_so():
    model = _model()
    model[0].weight.requires_grad_(False)
    engine, opt, loader, _ = offload_engine.initialize(
        model, {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "PagedAdamW8bit",
                                                                   "params": {"min_8bit_size": 64}}},
        training_data=torch.utils.data.TensorDataset(torch.randn(10, 13)))
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    engine.backward(_loss(model, 0))
    engine.step()
    report = engine.memory_report()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["params"]["trainable_count"] == trainable == sum(p.numel() for p in model.parameters()) - 13 * 37
    assert report["optimizer"]["params_with_state"] == 3 and report["optimizer"]["elements_with_state"] == trainable
    assert report["optimizer"]["store"] == "cpu" and report["optimizer"]["state_bytes"] > 0
    assert model[0].weight not in opt.state


@pytest.mark.parametrize("precision", ["bf16", "fp32-clip"])
def test_non_finite_grads_skip_the_step_in_every_precision(precision):
    """Not only fp16: a nan/inf grad never reaches the fp32 masters or the moments."""
    model = _model()
    config = {**CONFIG, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0 if precision == "fp32-clip" else 0,
              "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-3}}}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, opt, _, _ = offload_engine.initialize(model, config)
    engine.backward(_loss(model, 0))
    engine.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    engine.backward(_loss(model, 1))
    next(model.parameters()).grad[0, 0] = float("nan")
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1 and engine.global_steps == 2
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    for key, s in state["state"].items():
        for name, value in s.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after[key][name], value), name


def test_initialize_accepts_torchs_param_forms_and_restores_dtypes_when_refused():
    model = _model()
    named = list(model.named_parameters())
    for form in (model.parameters(), named, [{"params": model[0].weight, "lr": 1e-3},
                                             {"params": [model[0].bias, model[2].weight, model[2].bias]}]):
        engine, opt, _, _ = offload_engine.initialize(model, {"optimizer": {"type": "AdamW"}}, model_parameters=form)
        assert sum(len(g["params"]) for g in opt.param_groups) == 4
    with pytest.raises(ConfigError, match="paging.master_weights"):
        offload_engine.initialize(model, {"bf16": {"enabled": True}}, optimizer=torch.optim.SGD(model.parameters(), 0.1))
    assert all(p.dtype == torch.float32 for p in model.parameters())
