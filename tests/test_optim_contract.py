"""torch.optim's generic contract, for every optimizer of ours: the checks of PyTorch's
test/test_optim.py that apply to an Adam-family optimizer on CPU, written here over torch's own
OptimizerInfo / OptimizerInput machinery (torch.testing._internal.common_optimizers), one
OptimizerInfo per class of ours (fp32, 8-bit, 4-bit, Lion, paged on the host and NVMe stores).

Each check compares against the same optimizer run the plain way (bit for bit: the same kernels
on the same bytes), on params of odd sizes, every step. What of test_optim.py is not here, and
why: complex params, sparse grads and amsgrad are refused by our constructors with a clear error
(the fused kernels take real dense float params and keep no max_exp_avg_sq); the foreach, fused,
capturable and differentiable implementations do not exist (one SIMD kernel per format); the
CUDA and multi-device checks need a GPU (the CUDA kernels have their own tests); the LR
scheduler and closure checks are torch's base class's, which ours do not override; load-state-dict
hooks run inside torch's load_state_dict on the part of the state dict it reads (ours translates
its own keys first), so their torch test does not apply as written.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("expecttest", reason="torch's optimizer test machinery needs expecttest (pip install expecttest)")
from torch.testing._internal.common_optimizers import OptimizerInfo, OptimizerInput  # noqa: E402

from offload_engine import optim as ours  # noqa: E402

NVME = "<nvme dir>"  # replaced by the test's own directory
STEPS = 3


def _adam_inputs(quantized: bool, adamw: bool):
    def inputs(device, dtype=None):
        base = {"min_8bit_size": 0} if quantized else {}
        out = [OptimizerInput(params=None, kwargs={**base}, desc="default"),
               OptimizerInput(params=None, kwargs={**base, "lr": 0.01}, desc="non-default lr"),
               OptimizerInput(params=None, kwargs={**base, "weight_decay": 0.1}, desc="nonzero weight_decay"),
               OptimizerInput(params=None, kwargs={**base, "weight_decay": 0.1, "maximize": True}, desc="maximize"),
               OptimizerInput(params=None, kwargs={**base, "lr": torch.tensor(0.01)}, desc="Tensor lr")]
        if adamw is None:  # CPUAdam: DeepSpeed's adamw_mode switch
            out.append(OptimizerInput(params=None, kwargs={"adamw_mode": False, "weight_decay": 0.1}, desc="L2 decay"))
        return out
    return inputs


def _lion_inputs(quantized: bool):
    def inputs(device, dtype=None):
        base = {"min_8bit_size": 0} if quantized else {}
        return [OptimizerInput(params=None, kwargs={**base}, desc="default"),
                OptimizerInput(params=None, kwargs={**base, "lr": 1e-3, "weight_decay": 0.1}, desc="weight_decay"),
                OptimizerInput(params=None, kwargs={**base, "maximize": True}, desc="maximize")]
    return inputs


def _on_store(inputs, store):
    def paged(device, dtype=None):
        extra = {"store": store, "page_size_mb": 1 / 64, **({"nvme_path": NVME} if store == "nvme" else {})}
        return [OptimizerInput(params=None, kwargs={**i.kwargs, **extra}, desc=f"{i.desc}, {store} store")
                for i in inputs(device, dtype)]
    return paged


def _info(cls, inputs):
    # supported_impls=(): no foreach/fused/differentiable variants to cross-check ([module docstring]).
    return OptimizerInfo(cls, optim_inputs_func=inputs, supported_impls=(), supports_complex=False,
                         supports_sparse=False)


OPTIMIZERS = [
    _info(ours.CPUAdam, _adam_inputs(False, None)),
    _info(ours.Adam8bit, _adam_inputs(True, False)), _info(ours.AdamW8bit, _adam_inputs(True, True)),
    _info(ours.Adam4bit, _adam_inputs(True, False)), _info(ours.AdamW4bit, _adam_inputs(True, True)),
    _info(ours.Lion, _lion_inputs(False)), _info(ours.Lion8bit, _lion_inputs(True)),
    _info(ours.PagedAdam, _on_store(_adam_inputs(False, False), "cpu")),
    _info(ours.PagedAdamW, _on_store(_adam_inputs(False, True), "cpu")),
    _info(ours.PagedAdamW, _on_store(_adam_inputs(False, True), "nvme")),
    _info(ours.PagedAdamW8bit, _on_store(_adam_inputs(True, True), "cpu")),
    _info(ours.PagedAdamW8bit, _on_store(_adam_inputs(True, True), "nvme")),
    _info(ours.PagedLion8bit, _on_store(_lion_inputs(True), "cpu")),
]
CASES = [pytest.param(info, inp, id=f"{info.optim_cls.__name__}-{inp.desc}")
         for info in OPTIMIZERS for inp in info.optim_inputs_func("cpu")]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((70, 33), (5,), (4097,))]


def _set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _build(info, inp, params, tmp_path, **override):
    kwargs = {**inp.kwargs, **override}
    if kwargs.get("nvme_path") == NVME:
        kwargs["nvme_path"] = str(tmp_path)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = kwargs["lr"].clone()
    return info.optim_cls(params, **kwargs)


def _run(opt, params, steps, first: int = 0) -> None:
    for step in range(first, first + steps):
        _set_grads(params, step)
        opt.step()


def _same_params(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.detach(), y.detach())


def _same_state_dicts(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        sa, sb = a["state"][key], b["state"][key]
        assert sa.keys() == sb.keys(), key
        for name in sa:
            if isinstance(sa[name], torch.Tensor):
                assert torch.equal(sa[name], sb[name]), (key, name)
            else:
                assert sa[name] == sb[name], (key, name)


def _close(*opts) -> None:
    for opt in opts:
        if hasattr(opt, "close"):
            opt.close()


@pytest.mark.parametrize("info, inp", CASES)
def test_deepcopy_and_pickle_give_an_optimizer_that_steps_as_the_original(info, inp, tmp_path):
    """A copy made after some steps (copy.deepcopy of params and optimizer together, or a
    pickled optimizer, whose params are copies) steps exactly as the original goes on to; a
    paged copy owns its own pages (and NVMe file): the original's later steps leave it alone."""
    params = _params()
    opt = _build(info, inp, params, tmp_path)
    _run(opt, params, 2)
    params_c, opt_c = copy.deepcopy((params, opt))
    opt_p = pickle.loads(pickle.dumps(opt))
    params_p = [p for g in opt_p.param_groups for p in g["params"]]
    # Every attribute of ours carried, private ones too; torch's base class carries its own.
    torch_own = set(torch.optim.SGD([torch.zeros(1, requires_grad=True)]).__dict__)
    for other in (opt_c, opt_p):
        assert set(opt.__dict__) - torch_own <= set(other.__dict__)
        assert {k for k in opt.__dict__ if not k.startswith("_")} == {k for k in other.__dict__ if not k.startswith("_")}
    before_c = copy.deepcopy(opt_c.state_dict())
    _run(opt, params, STEPS, first=2)
    _same_state_dicts(opt_c.state_dict(), before_c)  # untouched by the original's steps
    for copy_params, copy_opt in ((params_c, opt_c), (params_p, opt_p)):
        _run(copy_opt, copy_params, STEPS, first=2)
        _same_params(copy_params, params)
        _same_state_dicts(copy_opt.state_dict(), opt.state_dict())
    if getattr(opt, "pager", None) is not None and inp.kwargs.get("store") == "nvme":
        files = {o.pager.store.describe() for o in (opt, opt_c, opt_p)}
        assert len(files) == 3, files
    _close(opt, opt_c, opt_p)


@pytest.mark.parametrize("info, inp", CASES)
def test_state_dict_round_trip_is_deterministic(info, inp, tmp_path):
    """state_dict() of an optimizer loaded from another's equals the other's (no key added on
    the way, as torch's `differentiable` was), and both step alike afterwards; a state dict
    whose groups lack keys a newer version added (an older checkpoint) loads as well."""
    params = _params()
    opt = _build(info, inp, params, tmp_path)
    _run(opt, params, 2)
    saved = opt.state_dict()
    _same_state_dicts(opt.state_dict(), saved)  # twice alike
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_b = _build(info, inp, params_b, tmp_path)
    opt_b.load_state_dict(copy.deepcopy(saved))
    _same_state_dicts(opt_b.state_dict(), saved)
    params_old = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_old = _build(info, inp, params_old, tmp_path)
    older = copy.deepcopy(saved)
    for group in older["param_groups"]:
        group.pop("differentiable")
    opt_old.load_state_dict(older)
    _run(opt, params, STEPS, first=2)
    for other_params, other in ((params_b, opt_b), (params_old, opt_old)):
        _run(other, other_params, STEPS, first=2)
        _same_params(other_params, params)
    _close(opt, opt_b, opt_old)


@pytest.mark.parametrize("info, inp", CASES)
def test_state_dict_hooks_may_add_entries_of_their_own(info, inp, tmp_path):
    """A pre-hook that puts a non-dict entry into the state and a post-hook that adds a key:
    state_dict() carries both, and the entries of the params are untouched."""
    params = _params()
    opt = _build(info, inp, params, tmp_path)
    _run(opt, params, 1)
    plain = opt.state_dict()

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_post_hook"] = True
        return state_dict
    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    hooked = opt.state_dict()
    assert hooked["state"]["test"] == 1 and hooked["ran_post_hook"] is True
    del hooked["state"]["test"], hooked["ran_post_hook"]
    _same_state_dicts(hooked, plain)
    _close(opt)


@pytest.mark.parametrize("info, inp", CASES)
def test_tensor_lr_steps_as_the_float_and_must_have_one_element(info, inp, tmp_path):
    """A one-element tensor lr steps as the same lr given as a float, bit for bit (2**-10: the
    same number in a float32 tensor and a Python float); two elements are torch's ValueError."""
    lr = 2.0 ** -10
    params_f, params_t = _params(), _params()
    opt_f = _build(info, inp, params_f, tmp_path, lr=lr)
    opt_t = _build(info, inp, params_t, tmp_path, lr=torch.tensor(lr))
    _run(opt_f, params_f, STEPS)
    _run(opt_t, params_t, STEPS)
    _same_params(params_t, params_f)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _build(info, inp, _params(), tmp_path, lr=torch.tensor([lr, lr]))
    _close(opt_f, opt_t)


@pytest.mark.parametrize("info, inp", CASES)
def test_param_groups_extended_in_place_step_as_groups_given_at_construction(info, inp, tmp_path):
    """optimizer.param_groups.extend([...]) (what some training loops do, bypassing
    add_param_group): the new group's params step as they would had the group been passed to
    the constructor; state_dict() covers them."""
    params = _params()
    extra = [torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(5)))]
    opt = _build(info, inp, params, tmp_path)
    _run(opt, params, 1)
    opt.param_groups.extend([{**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": extra}])
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in _params()]
    extra_b = [torch.nn.Parameter(extra[0].detach().clone())]
    opt_b = _build(info, inp, [{"params": params_b}, {"params": extra_b}], tmp_path)
    _run(opt_b, params_b, 1)
    for step in range(1, 1 + STEPS):
        for ps, o in ((params + extra, opt), (params_b + extra_b, opt_b)):
            _set_grads(ps, step)
            o.step()
    _same_params(params + extra, params_b + extra_b)
    assert len(opt.state_dict()["state"]) == len(params) + 1
    _close(opt, opt_b)


@pytest.mark.parametrize("info, inp", CASES)
def test_step_without_grads_or_with_zero_grads_changes_nothing(info, inp, tmp_path):
    """No grad: no state is made and no param moves. Zero grads, no weight decay: the update
    is zero, so the params stay where they are."""
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = _build(info, inp, params, tmp_path, weight_decay=0.0)
    opt.step()
    assert not opt.state
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    _same_params(params, before)
    _close(opt)


@pytest.mark.parametrize("info, inp", CASES)
def test_step_hooks_run_and_the_optimizer_prints(info, inp, tmp_path):
    params = _params()
    opt = _build(info, inp, params, tmp_path)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _run(opt, params, 2)
    assert calls == ["pre", "post", "pre", "post"]
    text = repr(opt)
    assert text.startswith(type(opt).__name__) and "lr:" in text
    _close(opt)


@pytest.mark.parametrize("info, inp", CASES)
def test_a_state_dict_with_python_number_steps_loads(info, inp, tmp_path):
    """torch.optim's older checkpoints keep `step` as a Python number: loaded, the optimizer
    goes on as from the tensor step."""
    params = _params()
    opt = _build(info, inp, params, tmp_path)
    _run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = float(state["step"])
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_b = _build(info, inp, params_b, tmp_path)
    opt_b.load_state_dict(saved)
    _run(opt, params, STEPS, first=2)
    _run(opt_b, params_b, STEPS, first=2)
    _same_params(params_b, params)
    _close(opt, opt_b)
