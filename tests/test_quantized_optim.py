"""Adam8bit/AdamW8bit/Adam4bit/AdamW4bit against fp32 torch.optim (bitsandbytes' test method:
step both, compare, then re-sync torch to ours), convergence, logical_state, state_dict."""
import copy

import pytest
import torch
from torch import nn

from offload_engine.optim import Adam4bit, Adam8bit, AdamW4bit, AdamW8bit, CPUAdam
from offload_engine.quant import FORMATS
from tolerances import CODE_HALF_GAP, RESYNCED, RESYNCED_STATE, RESYNCED_STATE_OUTLIERS, STEP_VS_TORCH


def _pair(shape, dtype, ours_cls, torch_cls, **kw):
    gen = torch.Generator().manual_seed(shape[1])
    p0 = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    ours, theirs = nn.Parameter(p0.clone()), nn.Parameter(p0.float().clone())
    return gen, ours, theirs, ours_cls([ours], lr=1e-3, **kw), torch_cls([theirs], lr=1e-3, foreach=False, **kw)


@pytest.mark.parametrize("cols", [32, 1024, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ours_cls,torch_cls", [(Adam8bit, torch.optim.Adam), (AdamW8bit, torch.optim.AdamW)])
def test_8bit_accuracy_bitsandbytes_method(cols, dtype, ours_cls, torch_cls):
    gen, ours, theirs, opt, ref = _pair((1024, cols), dtype, ours_cls, torch_cls, weight_decay=0.0)
    mean_abs, mean_rel = RESYNCED["int8", dtype]
    for step in range(1, 51):
        g = torch.randn(1024, cols, generator=gen) * 0.01
        ours.grad, theirs.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref.step()
        err = (ours.detach().float() - theirs.detach()).abs()
        assert err.mean() < mean_abs, f"step {step}: mean abs error {err.mean():.3g}"
        assert (err / (theirs.detach().abs() + 1e-8)).mean() < mean_rel, f"step {step}"
        logical = opt.logical_state(ours)
        for name in ("exp_avg", "exp_avg_sq"):
            exact = ref.state[theirs][name]
            off = ((logical[name] - exact).abs() > RESYNCED_STATE.atol + RESYNCED_STATE.rtol * exact.abs()).sum()
            assert off < RESYNCED_STATE_OUTLIERS, f"step {step} {name}: {int(off)} elements outside {RESYNCED_STATE}"
        # re-sync torch to ours, so errors do not compound (bitsandbytes' method)
        theirs.data.copy_(ours.detach().float())
        ref.state[theirs]["exp_avg"].copy_(logical["exp_avg"])
        ref.state[theirs]["exp_avg_sq"].copy_(logical["exp_avg_sq"])
        if step % 10 == 0:  # a state_dict reload continues identically
            sd = copy.deepcopy(opt.state_dict())
            opt2 = ours_cls([ours], lr=5.0)
            opt2.load_state_dict(sd)
            for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                assert torch.equal(opt2.state[ours][k], opt.state[ours][k])
            opt = opt2


@pytest.mark.parametrize("ours_cls,torch_cls", [(Adam4bit, torch.optim.Adam), (AdamW4bit, torch.optim.AdamW)])
def test_4bit_accuracy_bounds(ours_cls, torch_cls):
    """4-bit bounds we reach on the same protocol (documented in docs/optimizers.md)."""
    gen, ours, theirs, opt, ref = _pair((1024, 1024), torch.float32, ours_cls, torch_cls, weight_decay=0.0)
    for step in range(1, 51):
        g = torch.randn(1024, 1024, generator=gen) * 0.01
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        err = (ours.detach() - theirs.detach()).abs()
        mean_abs, mean_rel = RESYNCED["int4", torch.float32]
        assert err.mean() < mean_abs and (err / (theirs.detach().abs() + 1e-8)).mean() < mean_rel, f"step {step}"
        logical = opt.logical_state(ours)
        theirs.data.copy_(ours.detach())
        ref.state[theirs]["exp_avg"].copy_(logical["exp_avg"])
        ref.state[theirs]["exp_avg_sq"].copy_(logical["exp_avg_sq"])


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8))


def _train(opt_factory, steps=300):
    model = _tiny_model()
    opt = opt_factory(model.parameters())
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 8, generator=gen)
    loss = None
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def test_adamw8bit_converges_like_fp32_adamw():
    fp32 = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2))
    ours = _train(lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=1e-2, min_8bit_size=1024))
    assert abs(ours - fp32) <= 0.02 * fp32, (ours, fp32)


def test_min_8bit_size_keeps_small_tensors_fp32():
    big, small = nn.Parameter(torch.randn(4096)), nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn(4096), torch.randn(4095)
    opt.step()
    assert opt.state[big]["format"] == "int8" and opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert opt.state[small]["format"] == "fp32" and opt.state[small]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("cls", [CPUAdam, Adam8bit, AdamW8bit, Adam4bit, AdamW4bit])
def test_logical_state_names_and_shapes(cls):
    p = nn.Parameter(torch.randn(70, 90))
    opt = cls([p]) if cls is CPUAdam else cls([p], min_8bit_size=0)
    assert opt.logical_state(p) == {}
    p.grad = torch.randn(70, 90) * 0.01
    opt.step()
    logical = opt.logical_state(p)
    assert set(logical) == {"step", "exp_avg", "exp_avg_sq"} and logical["step"].item() == 1
    for name in ("exp_avg", "exp_avg_sq"):
        assert logical[name].shape == p.shape and logical[name].dtype == torch.float32
    # first step from zero moments: exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2
    exact = 0.1 * p.grad
    if cls is CPUAdam:  # (1 - beta1) * g in fp32
        STEP_VS_TORCH[torch.float32].check(logical["exp_avg"], exact)
    else:  # that, quantized with its block's absmax
        torch.testing.assert_close(logical["exp_avg"], exact, rtol=0,
                                   atol=CODE_HALF_GAP[opt.defaults["state_format"]] * float(exact.abs().max()))


def _stepped(cls, n=5000, steps=3, **kw):
    p = nn.Parameter(torch.randn(n))
    opt = cls([p], min_8bit_size=0, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(n, generator=gen) * 0.01
        opt.step()
    return p, opt


def test_state_dict_round_trips_raw_codes_maps_version_and_block():
    p, opt = _stepped(AdamW8bit, block_size=512)
    sd = opt.state_dict()
    assert sd["state_format_version"] == 1 and sd["state"][0]["block_size"] == 512
    from offload_engine.quant import FORMATS
    assert torch.equal(sd["quant_maps"]["int8"]["signed"], FORMATS["int8"].code_map(True))
    opt2 = AdamW8bit([p], min_8bit_size=0, block_size=512)
    opt2.load_state_dict(copy.deepcopy(sd))
    for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax", "step"):
        assert torch.equal(opt2.state[p][k], opt.state[p][k])


@pytest.mark.parametrize("src,dst", [((AdamW8bit, 256), (AdamW8bit, 2048)), ((AdamW8bit, 256), (AdamW4bit, 128)),
                                     ((AdamW4bit, 128), (AdamW8bit, 256)), ((CPUAdam, None), (AdamW8bit, 256)),
                                     ((AdamW8bit, 256), (CPUAdam, None))])
def test_state_saved_in_another_format_or_block_is_requantized(src, dst):
    (src_cls, src_block), (dst_cls, dst_block) = src, dst
    p, opt = _stepped(src_cls, **({} if src_block is None else {"block_size": src_block})) if src_cls is not CPUAdam \
        else _stepped_cpu()
    before = opt.logical_state(p)
    kw = {} if dst_cls is CPUAdam else {"block_size": dst_block, "min_8bit_size": 0}
    opt2 = dst_cls([p], **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    after = opt2.logical_state(p)
    fmt = opt2.state[p]["format"]
    assert fmt == ("fp32" if dst_cls is CPUAdam else ("int4" if dst_cls is AdamW4bit else "int8"))
    if fmt != "fp32":
        assert opt2.state[p]["block_size"] == dst_block
    tol = {"fp32": 1e-7, "int8": 2e-2, "int4": 2e-1}[fmt]
    for name in ("exp_avg", "exp_avg_sq"):
        scale = before[name].abs().max()
        assert (after[name] - before[name]).abs().max() <= tol * scale + 1e-12, name
    assert after["step"].item() == before["step"].item()


def _stepped_cpu():
    p = nn.Parameter(torch.randn(5000))
    opt = CPUAdam([p])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        p.grad = torch.randn(5000, generator=gen) * 0.01
        opt.step()
    return p, opt


def test_bad_state_dicts_are_refused_and_nothing_changes():
    p, opt = _stepped(AdamW8bit)
    keep = copy.deepcopy(opt.state[p])
    sd = copy.deepcopy(opt.state_dict())
    sd["state_format_version"] = 99
    with pytest.raises(ValueError, match="state_format_version 99"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"][:-1]
    with pytest.raises(ValueError, match="exp_avg holds"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["format"] = "int3"
    with pytest.raises(ValueError, match="unknown state format 'int3'"):
        opt.load_state_dict(sd)
    for k, v in keep.items():
        assert torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v


@pytest.mark.parametrize("kwargs,match", [(dict(block_size=100), "block_size must be a power of two"),
                                          (dict(min_8bit_size=-1), "min_8bit_size"), (dict(amsgrad=True), "amsgrad"),
                                          (dict(lr=-1.0), "lr")])
def test_quantized_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([nn.Parameter(torch.randn(3))], **kwargs)


def test_load_keeps_this_optimizers_format_settings():
    """Loading takes hyperparameters from the checkpoint but keeps how this optimizer stores
    state: a param without state yet gets this optimizer's format and block size."""
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    saver = AdamW8bit([a, b], min_8bit_size=0, block_size=256, lr=3e-3)
    a.grad = torch.randn(5000)
    saver.step()  # b has no state yet
    loader = AdamW4bit([a, b], min_8bit_size=0, block_size=128)
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    group = loader.param_groups[0]
    assert (group["state_format"], group["block_size"], group["min_8bit_size"], group["lr"]) == ("int4", 128, 0, 3e-3)
    assert loader.state[a]["format"] == "int4" and loader.state[a]["block_size"] == 128
    b.grad = torch.randn(5000)
    loader.step()
    assert loader.state[b]["format"] == "int4" and loader.state[b]["block_size"] == 128


@pytest.mark.parametrize("cls", [CPUAdam, AdamW8bit])
def test_torch_optim_checkpoint_loads_and_steps(cls):
    p = nn.Parameter(torch.randn(5000))
    ref = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(5000)
    ref.step()
    opt = cls([p]) if cls is CPUAdam else cls([p], min_8bit_size=0)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    exact = ref.state[p]["exp_avg"]
    # fp32: copied exactly; int8: within the codec's worst case, half a code gap of the block absmax
    atol = 0.0 if cls is CPUAdam else CODE_HALF_GAP["int8"] * float(exact.abs().max())
    torch.testing.assert_close(opt.logical_state(p)["exp_avg"], exact, atol=atol, rtol=0)
    opt.step()  # the settings torch's groups lack come from this optimizer's defaults
    assert opt.state[p]["step"].item() == 2


def test_bad_group_is_refused_whole():
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        AdamW8bit([{"params": [a]}, {"params": [b], "block_size": 100}])
    opt = AdamW8bit([a])
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="state_format"):
        opt.add_param_group({"params": [b], "state_format": "int3"})
    assert len(opt.param_groups) == 1


def test_a_bad_param_stops_the_step_before_anything_moves():
    a = nn.Parameter(torch.randn(5000))
    elsewhere = nn.Parameter(torch.randn(10, device="meta"))
    opt = AdamW8bit([a, elsewhere], min_8bit_size=0)
    a.grad, elsewhere.grad = torch.randn(5000), torch.randn(10, device="meta")
    before = a.detach().clone()
    with pytest.raises(ValueError, match="is on meta"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state[a]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_code_half_gap_covers_the_maps(fmt):
    """CODE_HALF_GAP (tests/tolerances.py) is at least half the widest gap of either code map,
    and not much more: the bound the codec's nearest-value rounding guarantees."""
    widest = max(float((m[1:] - m[:-1]).max()) / 2 for m in (FORMATS[fmt].code_map(s) for s in (True, False)))
    assert widest <= CODE_HALF_GAP[fmt] <= 1.01 * widest

