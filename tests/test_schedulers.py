"""offload_engine.schedulers: WarmupLR, WarmupDecayLR, WarmupCosineLR against closed forms
written here in float64, against deepspeed.runtime.lr_schedules when deepspeed is
installed (exact equality), state_dict resume, and the ValueErrors for bad settings."""
import copy
import io
import math

import pytest
import torch

from offload_engine.schedulers import (
    SCHEDULERS,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)
from tolerances import SCHEDULE, SCHEDULE_FP32_REL


GROUP_LRS = (1e-3, 3e-4, 0.05)
WARMUPS = (1, 7, 100)
TYPES = ("log", "linear")
REL, ABS = SCHEDULE.rtol, SCHEDULE.atol


def make_opt(lrs=GROUP_LRS, tensor_lr=False):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    groups = [{"params": [p], "lr": torch.tensor(lr) if tensor_lr else lr}
              for p, lr in zip(params, lrs, strict=True)]
    return torch.optim.SGD(groups, lr=0.1)


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


# ---- closed forms (k = iteration, -1 before the first step) -------------------------------

def warm_fraction(k, warmup, kind):
    w = max(2, warmup)  # DeepSpeed's floor: a warmup of 1 runs as 2
    return math.log(k + 1, w) if kind == "log" else k / w


def ref_warmup(k, lo, hi, warmup, kind):
    if k < 0:
        return lo
    if k < max(2, warmup):
        return lo + (hi - lo) * warm_fraction(k, warmup, kind)
    return hi


def ref_decay(k, lo, hi, warmup, total, kind):
    w = max(2, warmup)
    if k < w:
        return ref_warmup(k, lo, hi, warmup, kind)
    left = max(0, total - k)
    return lo + (hi - lo) * left / max(1, total - w)


def ref_cosine(k, base, warmup, total, wmin, cmin, kind):
    w = max(2, warmup)
    if k < 0:
        return 0.0
    if k < w:
        return base * (wmin + (1 - wmin) * warm_fraction(k, warmup, kind))
    p = min(1.0, (k - w + 1) / max(1, total - w))
    return base * (cmin + (1 - cmin) * math.cos(math.pi * p / 2) ** 2)


def assert_close(got, want, where):
    assert math.isclose(got, want, rel_tol=REL, abs_tol=ABS), f"{where}: {got!r} != {want!r}"


def run(sched, steps):
    """The lrs in the optimizer after construction and after each of `steps` step() calls."""
    seq = [list(lrs_of(sched.optimizer))]
    for _ in range(steps):
        sched.step()
        seq.append(list(lrs_of(sched.optimizer)))
        assert sched.get_last_lr() == seq[-1]
        assert sched.get_lr() == seq[-1]
    return seq


# ---- closed forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("warmup", WARMUPS)
def test_warmup_lr_closed_form(warmup, kind):
    lo, hi = [1e-5, 0.0, 2e-3], [1e-3, 3e-4, 0.05]
    sched = WarmupLR(make_opt(), warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=warmup,
                     warmup_type=kind)
    seq = run(sched, max(2, warmup) + 20)
    for i, lrs in enumerate(seq):
        for g in range(3):
            assert_close(lrs[g], ref_warmup(i - 1, lo[g], hi[g], warmup, kind), (i - 1, g))
    assert seq[0] == lo and seq[1] == lo  # construction and step 0: warmup_min_lr
    assert all(lrs == hi for lrs in seq[max(2, warmup) + 1:])  # k >= W: exactly the max


@pytest.mark.parametrize("kind", TYPES)
def test_warmup_lr_max_defaults_to_group_lr(kind):
    sched = WarmupLR(make_opt(), warmup_num_steps=7, warmup_type=kind)
    seq = run(sched, 30)
    for i, lrs in enumerate(seq):
        for g, base in enumerate(GROUP_LRS):
            assert_close(lrs[g], ref_warmup(i - 1, 0.0, base, 7, kind), (i - 1, g))
    assert seq[-1] == list(GROUP_LRS)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize(("warmup", "extra"), [(w, e) for w in WARMUPS for e in (0, 1, 53)])
def test_warmup_decay_lr_closed_form(warmup, extra, kind):
    total = warmup + extra
    lo, hi = [0.0, 1e-5, 1e-4], [1e-3, 3e-4, 0.05]
    sched = WarmupDecayLR(make_opt(), total, warmup_min_lr=lo, warmup_max_lr=hi,
                          warmup_num_steps=warmup, warmup_type=kind)
    seq = run(sched, max(total, 2) + 20)
    for i, lrs in enumerate(seq):
        for g in range(3):
            assert_close(lrs[g], ref_decay(i - 1, lo[g], hi[g], warmup, total, kind), (i - 1, g))
    w = max(2, warmup)
    if total > w:
        assert seq[w + 1] == hi  # k = W: the peak, exactly
    else:
        assert seq[w + 1] == lo  # T <= W: no decay window, straight to the floor at k = W
    assert all(lrs == lo for lrs in seq[max(total, w) + 1:])  # k >= T: the floor, exactly


def test_warmup_decay_lr_defaults():
    sched = WarmupDecayLR(make_opt(), 1200)
    assert (sched.warmup_num_steps, sched.warmup_type) == (1000, "log")
    seq = run(sched, 1220)
    for i in (0, 1, 2, 500, 1000, 1001, 1100, 1201, 1220):
        assert_close(seq[i][0], ref_decay(i - 1, 0.0, 0.001, 1000, 1200, "log"), i - 1)
    assert seq[1001] == [0.001] * 3 and seq[1201] == [0.0] * 3


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize(("warmup", "extra"), [(w, e) for w in WARMUPS for e in (0, 1, 60)])
@pytest.mark.parametrize(("wmin", "cmin"), [(0.0, 0.0), (0.1, 1e-4), (0.5, 0.25)])
def test_warmup_cosine_lr_closed_form(warmup, extra, kind, wmin, cmin):
    total = warmup + extra
    sched = WarmupCosineLR(make_opt(), total, warmup_min_ratio=wmin, warmup_num_steps=warmup,
                           cos_min_ratio=cmin, warmup_type=kind)
    seq = run(sched, max(total, 2) + 20)
    for i, lrs in enumerate(seq):
        for g, base in enumerate(GROUP_LRS):
            want = ref_cosine(i - 1, base, warmup, total, wmin, cmin, kind)
            assert_close(lrs[g], want, (i - 1, g))
    assert seq[0] == [0.0] * 3  # construction: 0, not warmup_min_ratio * lr
    assert seq[1] == [base * wmin for base in GROUP_LRS]  # step 0
    w = max(2, warmup)
    floor = [base * cmin for base in GROUP_LRS]
    assert all(lrs == floor for lrs in seq[max(total, w + 1):])  # k >= T - 1: the floor, exactly


def test_warmup_cosine_lr_defaults():
    sched = WarmupCosineLR(make_opt(), 3000)
    assert (sched.warmup_num_steps, sched.warmup_min_ratio, sched.cos_min_ratio) == (1000, 0.0, 1e-4)
    seq = run(sched, 3010)
    for i in (1, 2, 999, 1000, 1001, 1002, 2000, 2999, 3000, 3010):
        assert_close(seq[i][1], ref_cosine(i - 1, GROUP_LRS[1], 1000, 3000, 0.0, 1e-4, "log"), i - 1)


def test_explicit_step_index_and_resume_construction():
    a = WarmupDecayLR(make_opt(), 50, warmup_num_steps=10, warmup_type="linear")
    a.step(30)
    assert a.last_batch_iteration == 30
    assert_close(a.get_last_lr()[0], ref_decay(30, 0.0, 0.001, 10, 50, "linear"), 30)
    opt = make_opt()
    b = WarmupCosineLR(opt, 50, warmup_num_steps=10, last_batch_iteration=30)
    assert lrs_of(opt) == list(GROUP_LRS)  # a resume leaves the optimizer alone
    with pytest.raises(RuntimeError, match="step"):
        b.get_last_lr()
    b.step()
    assert_close(b.get_last_lr()[2], ref_cosine(31, GROUP_LRS[2], 10, 50, 0.0, 1e-4, "log"), 31)


def test_training_loop_and_wrapped_optimizer():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    class Wrapper:  # DeepSpeed-style wrapper holding the torch optimizer in .optimizer
        optimizer = opt

    sched = build_scheduler(Wrapper(), "WarmupCosineLR",
                            {"total_num_steps": 20, "warmup_num_steps": 5, "warmup_type": "linear"})
    used = []
    for _ in range(20):
        used.append(opt.param_groups[0]["lr"])
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    # used[i] ran at k = i - 1: 0.0 at construction and k = 0; a linear warmup peaks at
    # k = W - 1 at (W - 1) / W, and the cosine already moves at k = W
    assert used[0] == 0.0 and used[1] == 0.0
    assert used[5] == pytest.approx(0.8e-2, rel=REL)
    assert used[6] == pytest.approx(ref_cosine(5, 1e-2, 5, 20, 0.0, 1e-4, "linear"), rel=REL)
    assert used[6] < 1e-2
    assert used[-1] == pytest.approx(ref_cosine(18, 1e-2, 5, 20, 0.0, 1e-4, "linear"), rel=REL)


def test_tensor_lrs_are_filled_in_place():
    opt = make_opt(tensor_lr=True)
    held = lrs_of(opt)
    sched = WarmupCosineLR(opt, 40, warmup_num_steps=7, warmup_min_ratio=0.1)
    for k in range(45):
        sched.step()
        assert all(a is b for a, b in zip(lrs_of(opt), held, strict=True))
        want = [ref_cosine(k, float(torch.tensor(b)), 7, 40, 0.1, 1e-4, "log") for b in GROUP_LRS]
        got = [float(t) for t in lrs_of(opt)]
        assert got == pytest.approx(want, rel=SCHEDULE_FP32_REL)  # float32 lr tensors


# ---- state_dict ----------------------------------------------------------------------------

def _scheds():
    return [
        lambda opt: WarmupLR(opt, warmup_min_lr=1e-5, warmup_num_steps=7),
        lambda opt: WarmupDecayLR(opt, 60, warmup_min_lr=[0.0, 1e-6, 1e-5],
                                  warmup_max_lr=[1e-3, 2e-3, 3e-3], warmup_num_steps=7,
                                  warmup_type="linear"),
        lambda opt: WarmupCosineLR(opt, 60, warmup_min_ratio=0.1, warmup_num_steps=7,
                                   cos_min_ratio=0.01),
    ]


@pytest.mark.parametrize("make", _scheds())
@pytest.mark.parametrize("stop", [0, 3, 6, 7, 30, 59, 70])
def test_state_dict_resume_is_exact(make, stop):
    opt = make_opt()
    sched = make(opt)
    for _ in range(stop):
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert saved == {"last_batch_iteration": stop - 1}

    fresh_opt = make_opt()  # the optimizer's own state is not restored
    fresh = make(fresh_opt)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == sched.state_dict()
    assert lrs_of(fresh_opt) == lrs_of(opt)  # the lr for the next optimizer step too
    assert fresh.get_last_lr() == sched.get_last_lr()
    for _ in range(30):
        sched.step()
        fresh.step()
        assert lrs_of(fresh_opt) == lrs_of(opt)


def test_load_state_dict_rejects_bad_state():
    sched = WarmupLR(make_opt())
    with pytest.raises(ValueError, match="last_batch_iteration"):
        sched.load_state_dict({})
    with pytest.raises(ValueError, match="last_batch_iteration"):
        sched.load_state_dict({"last_batch_iteration": -2})


# ---- bad settings --------------------------------------------------------------------------

BAD = [
    (WarmupLR, {"warmup_type": "cosine"}, "warmup_type"),
    (WarmupLR, {"warmup_num_steps": -1}, "warmup_num_steps"),
    (WarmupLR, {"warmup_num_steps": -3}, "warmup_num_steps"),
    (WarmupLR, {"warmup_num_steps": 10.0}, "warmup_num_steps"),
    (WarmupLR, {"warmup_num_steps": True}, "warmup_num_steps"),
    (WarmupLR, {"warmup_min_lr": -1e-4}, "warmup_min_lr"),
    (WarmupLR, {"warmup_min_lr": "0.1"}, "warmup_min_lr"),
    (WarmupLR, {"warmup_max_lr": float("nan")}, "warmup_max_lr"),
    (WarmupLR, {"warmup_max_lr": float("inf")}, "warmup_max_lr"),
    (WarmupLR, {"warmup_max_lr": [1e-3, 1e-3]}, "warmup_max_lr"),
    (WarmupLR, {"warmup_max_lr": [1e-3, -1.0, 1e-3]}, r"warmup_max_lr\[1\]"),
    (WarmupLR, {"last_batch_iteration": -2}, "last_batch_iteration"),
    (WarmupDecayLR, {"total_num_steps": 5, "warmup_num_steps": 10}, "total_num_steps"),
    (WarmupDecayLR, {"total_num_steps": 0, "warmup_num_steps": 1}, "total_num_steps"),
    (WarmupDecayLR, {"total_num_steps": 100.0}, "total_num_steps"),
    (WarmupDecayLR, {"total_num_steps": 2000, "warmup_type": "exp"}, "warmup_type"),
    (WarmupDecayLR, {"total_num_steps": 2000, "warmup_min_lr": -1.0}, "warmup_min_lr"),
    (WarmupCosineLR, {"total_num_steps": 999}, "total_num_steps"),
    (WarmupCosineLR, {"total_num_steps": 2000, "warmup_min_ratio": 1.5}, "warmup_min_ratio"),
    (WarmupCosineLR, {"total_num_steps": 2000, "warmup_min_ratio": -0.1}, "warmup_min_ratio"),
    (WarmupCosineLR, {"total_num_steps": 2000, "cos_min_ratio": 2.0}, "cos_min_ratio"),
    (WarmupCosineLR, {"total_num_steps": 2000, "cos_min_ratio": float("nan")}, "cos_min_ratio"),
    (WarmupCosineLR, {"total_num_steps": 2000, "warmup_type": "Linear"}, "warmup_type"),
    (WarmupCosineLR, {"total_num_steps": 2000, "warmup_num_steps": -1}, "warmup_num_steps"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name"), BAD)
def test_bad_settings_raise_value_error(cls, kwargs, name):
    opt = make_opt()
    with pytest.raises(ValueError, match=name):
        cls(opt, **kwargs)
    with pytest.raises(ValueError, match=name):
        build_scheduler(opt, cls.__name__, kwargs)
    assert lrs_of(opt) == list(GROUP_LRS)  # nothing written before the error


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'log', 'linear'"):
        WarmupLR(make_opt(), warmup_type="exp")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        WarmupCosineLR(make_opt(), 2000, cos_min_ratio=1.01)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        WarmupLR(object())


def test_build_scheduler():
    for name, params in [("WarmupLR", {"warmup_max_lr": 0.01, "warmup_num_steps": 7}),
                         ("WarmupDecayLR", {"total_num_steps": 40, "warmup_num_steps": 7}),
                         ("WarmupCosineLR", {"total_num_steps": 40, "warmup_num_steps": 7,
                                             "warmup_min_ratio": 0.2})]:
        a, b = make_opt(), make_opt()
        built = build_scheduler(a, name, params)
        direct = SCHEDULERS[name](b, **params)
        assert type(built).__name__ == name
        assert run(built, 50) == run(direct, 50)
    assert isinstance(build_scheduler(make_opt(), "WarmupLR", None), WarmupLR)
    with pytest.raises(ValueError, match="WarmupLR, WarmupDecayLR, WarmupCosineLR"):
        build_scheduler(make_opt(), "OneCycle", {})
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(make_opt(), "WarmupLR", {"warmup_steps": 10})
    with pytest.raises(ValueError, match="total_num_steps"):
        build_scheduler(make_opt(), "WarmupDecayLR", {})


# ---- DeepSpeed itself, when installed ------------------------------------------------------

DS_CASES = (
    [("WarmupLR", {"warmup_num_steps": w, "warmup_type": t}) for w in WARMUPS for t in TYPES]
    + [("WarmupLR", {"warmup_min_lr": [1e-5, 0.0, 2e-3], "warmup_max_lr": 0.01,
                     "warmup_num_steps": 9})]
    + [("WarmupDecayLR", {"total_num_steps": w + e, "warmup_num_steps": w, "warmup_type": t,
                          "warmup_min_lr": 1e-6})
       for w in WARMUPS for e in (0, 1, 53) for t in TYPES]
    + [("WarmupDecayLR", {"total_num_steps": 1200})]
    + [("WarmupCosineLR", {"total_num_steps": w + e, "warmup_num_steps": w, "warmup_type": t,
                           "warmup_min_ratio": wmin, "cos_min_ratio": cmin})
       for w in WARMUPS for e in (0, 1, 60) for t in TYPES for wmin, cmin in ((0.0, 0.0), (0.1, 1e-3))]
    + [("WarmupCosineLR", {"total_num_steps": 1100})]
)


def _deepspeed_schedules():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import lr_schedules

    return lr_schedules


@pytest.mark.parametrize(("name", "params"), DS_CASES)
def test_matches_deepspeed(name, params):
    ds = _deepspeed_schedules()
    ours = SCHEDULERS[name](make_opt(), **params)
    theirs = getattr(ds, name)(make_opt(), **params)
    steps = max(params.get("total_num_steps", 0), params.get("warmup_num_steps", 1000), 2) + 20
    for _ in range(steps):
        assert lrs_of(ours.optimizer) == lrs_of(theirs.optimizer), ours.last_batch_iteration
        assert ours.get_last_lr() == theirs.get_last_lr()
        assert ours.state_dict() == theirs.state_dict()
        ours.step()
        theirs.step()
    assert lrs_of(ours.optimizer) == lrs_of(theirs.optimizer)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_matches_deepspeed_tensor_lrs_jumps_and_checkpoints(name):
    ds = _deepspeed_schedules()
    params = {"warmup_num_steps": 7}
    if name != "WarmupLR":
        params["total_num_steps"] = 40
    ours = SCHEDULERS[name](make_opt(tensor_lr=True), **params)
    theirs = getattr(ds, name)(make_opt(tensor_lr=True), **params)
    for k in [*range(12), 25, 39, 40, 3, 60]:
        ours.step(k)
        theirs.step(k)
        for a, b in zip(lrs_of(ours.optimizer), lrs_of(theirs.optimizer), strict=True):
            assert torch.equal(a, b), k
    # checkpoints move both ways (the same one-key state dict)
    a, b = SCHEDULERS[name](make_opt(), **params), getattr(ds, name)(make_opt(), **params)
    for _ in range(13):
        b.step()
    a.load_state_dict(copy.deepcopy(b.state_dict()))
    b.step()
    a.step()
    assert lrs_of(a.optimizer) == lrs_of(b.optimizer)
    b.load_state_dict(a.state_dict())
    assert b.last_batch_iteration == a.last_batch_iteration
