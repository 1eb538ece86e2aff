"""paging.overlap_backward ([Note: overlap with backward] in engine/overlap.py): pages are
updated from post-accumulate-grad hooks while backward runs, and the result is bit for bit the
step taken after backward, at every step, through accumulation windows, with params that get
no grad in some steps and params that get their first grad after the layout exists. The
configurations whose update would depend on every grad (clipping, fp16, several ranks) are
refused; a non-finite grad found after pages were updated raises and the optimizer refuses
to go on until a checkpoint is loaded."""
from __future__ import annotations

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError
from conftest import bits

KB = 1 / 1024


class Net(torch.nn.Module):
    """Odd sizes so pages hold pieces of several params and params span several pages; `side`
    is used on even steps only (no grad at odd steps; first grad after the layout exists)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(13, 301), torch.nn.Tanh(), torch.nn.Linear(301, 97),
                                        torch.nn.Tanh(), torch.nn.Linear(97, 7))
        self.side = torch.nn.Linear(13, 7)

    def forward(self, x, use_side: bool):
        out = self.body(x)
        return out + 0.1 * self.side(x) if use_side else out


def _batch(i, dtype, device):
    g = torch.Generator().manual_seed(i)
    return torch.randn(5, 13, generator=g).to(dtype).to(device), torch.randn(5, 7, generator=g).to(device)


def _config(opt_type, precision, gas, store, tmp_path, overlap):
    cfg = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": gas,
           "optimizer": {"type": opt_type, "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "paging": {"overlap_backward": overlap, "page_size_mb": 8 * KB, "store": store}}
    if opt_type.endswith("8bit"):
        cfg["optimizer"]["params"]["min_8bit_size"] = 64
    if store == "nvme":
        cfg["paging"]["nvme_path"] = str(tmp_path / ("on" if overlap else "off"))
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _train(cfg, steps, gas, device, dtype, model=None):
    model = (model or Net()).to(device)
    engine, optimizer, *_ = offload_engine.initialize(model, cfg)
    after = []
    for i in range(steps * gas):
        step = i // gas
        x, y = _batch(i, dtype, device)
        before = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.mse_loss(engine(x, use_side=step % 2 == 0 and step > 0).float(), y)
        engine.backward(loss)
        if (i + 1) % gas:  # not a boundary: backward leaves the params alone
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        engine.step()
        if (i + 1) % gas == 0:
            pages = engine.overlap.pages_in_backward if engine.overlap is not None else 0
            after.append(([p.detach().clone() for p in model.parameters()], pages))
    return after, optimizer.state_dict(), engine


def _assert_same_training(on, off):
    (steps_on, state_on, _), (steps_off, state_off, _) = on, off
    for (params_on, _), (params_off, _) in zip(steps_on, steps_off, strict=True):
        for a, b in zip(params_on, params_off):
            assert torch.equal(bits(a.cpu()), bits(b.cpu()))
    for key, s in state_off["state"].items():
        for name, t in s.items():
            if isinstance(t, torch.Tensor):
                got = state_on["state"][key][name].cpu()
                same = torch.equal(got, t.cpu()) if t.element_size() == 1 else torch.equal(bits(got), bits(t.cpu()))
                assert same, (key, name)


@pytest.mark.parametrize("opt_type", ["PagedAdamW", "PagedAdamW8bit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("gas", [1, 3])
@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_overlapped_steps_equal_the_step_after_backward(tmp_path, opt_type, precision, gas, store):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    runs = [_train(_config(opt_type, precision, gas, store, tmp_path, overlap), 6, gas, "cpu", dtype)
            for overlap in (True, False)]
    _assert_same_training(*runs)
    in_backward = [pages for _, pages in runs[0][0]]
    if store == "cpu":  # updated in place from the hooks; the NVMe store's CPU pipeline runs at step()
        assert in_backward[0] == 0 and all(n > 0 for n in in_backward[1:]), in_backward
    total = runs[0][2].optimizer.paging_stats()["num_pages"]
    assert all(n <= total for n in in_backward)


def test_refused_where_it_cannot_be_exact():
    from offload_engine.config import load_config
    from offload_engine.engine.initialize import _check_overlap_config
    exact = load_config({"train_batch_size": 10, "paging": {"overlap": "exact"}}, world_size=2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    _check_overlap_config(exact, 2, cpu, "gloo")  # several ranks: CPU params over gloo
    for device, backend in ((cpu, "nccl"), (cuda, "gloo"), (cuda, "nccl")):
        with pytest.raises(ConfigError, match=rf"paging.overlap: 'exact' with several ranks is built for CPU params "
                                              rf"over gloo so far \(here: {backend}, params on {device}\)"):
            _check_overlap_config(exact, 2, device, backend)
    with pytest.raises(ConfigError, match="paging.overlap_backward.*paged optimizer.*CPUAdam"):
        offload_engine.initialize(Net(), {"optimizer": {"type": "AdamW"}, "paging": {"overlap_backward": True}})
    with pytest.raises(ConfigError, match="paging.overlap_backward.*disagree"):
        load_config({"paging": {"overlap_backward": True, "overlap": "off"}})
    with pytest.raises(ConfigError, match="paging.overlap.*'off'.*'exact'.*'delayed'"):
        load_config({"paging": {"overlap": "sometimes"}})
    model = Net()
    dtypes = [p.dtype for p in model.parameters()]
    with pytest.raises(ConfigError):
        offload_engine.initialize(model, {"optimizer": {"type": "AdamW"}, "bf16": {"enabled": True},
                                          "paging": {"overlap": "exact"}})
    assert [p.dtype for p in model.parameters()] == dtypes  # a refused setup leaves the model as it was


def test_non_finite_grad_after_unrestorable_pages_were_updated_raises_and_refuses_until_reload(tmp_path,
                                                                                                monkeypatch):
    """Where early pages cannot be taken back (as with the CUDA executor; here the host store
    is made to look so) and nothing can change the scale, pages run early unchecked: a
    non-finite grad found afterwards cannot skip the step."""
    from offload_engine.optim.paged import PagedOptimizer
    monkeypatch.setattr(PagedOptimizer, "can_restore_pages", property(lambda self: False))
    cfg = _config("PagedAdamW8bit", "bf16", 1, "cpu", tmp_path, True)
    model = Net()
    engine, optimizer, *_ = offload_engine.initialize(model, cfg)

    def one_step(i):
        x, y = _batch(i, torch.bfloat16, "cpu")
        engine.backward(torch.nn.functional.mse_loss(engine(x, use_side=False).float(), y))
        engine.step()

    one_step(0)  # lays out the pages; not overlapped
    one_step(1)
    assert engine.overlap.pages_in_backward > 0
    checkpoint = optimizer.state_dict()
    saved = [p.detach().clone() for p in model.parameters()]
    # The first layer's grad is the last to arrive: the pages of the later layers are updated by then.
    handle = model.body[0].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients.*already updated \d+ pages"):
        one_step(2)
    handle.remove()
    assert engine.get_global_grad_norm() is not None
    with pytest.raises(RuntimeError, match="load_state_dict"):
        one_step(3)
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved):
            p.copy_(v)
    optimizer.load_state_dict(checkpoint)
    one_step(3)  # continues from the checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_grad_before_any_page_is_updated_skips_the_step(tmp_path):
    """The first step lays out the pages after backward, so nothing was updated early: a
    non-finite norm skips it as without overlap."""
    model = Net()
    engine, *_ = offload_engine.initialize(model, _config("PagedAdamW", "bf16", 1, "cpu", tmp_path, True))
    before = [p.detach().clone() for p in model.parameters()]
    handle = model.body[0].weight.register_hook(lambda g: g * float("nan"))
    x, y = _batch(0, torch.bfloat16, "cpu")
    engine.backward(torch.nn.functional.mse_loss(engine(x, use_side=False).float(), y))
    engine.step()
    handle.remove()
    assert not engine.was_step_applied()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.cuda
@pytest.mark.parametrize("store", ["cpu", "nvme", "managed"])
@pytest.mark.parametrize("opt_type", ["PagedAdamW", "PagedAdamW8bit"])
def test_overlapped_steps_on_the_gpu_equal_the_step_after_backward(tmp_path, store, opt_type):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: torch.cuda.is_available() is False")
    runs = [_train(_config(opt_type, "bf16", 2, store, tmp_path, overlap), 6, 2, "cuda", torch.bfloat16)
            for overlap in (True, False)]
    _assert_same_training(*runs)
    assert all(pages > 0 for _, pages in runs[0][0][1:])


def test_a_second_backward_before_the_step_is_refused(tmp_path):
    """With the step's pages updated during the first backward, a second backward's grads would
    be left out: refused, naming the key; the step then takes the first backward's grads, as
    the same training with one backward per micro-batch does."""
    runs, refused = [], 0
    for overlap in (True, False):
        model = Net()
        engine, *_ = offload_engine.initialize(model, _config("PagedAdamW", "fp32", 1, "cpu", tmp_path, overlap))
        for i in range(3):
            x, y = _batch(i, torch.float32, "cpu")
            loss = torch.nn.functional.mse_loss(engine(x, use_side=False), y)
            engine.backward(loss, retain_graph=overlap)
            if overlap and engine.overlap.is_open:  # from the second step on (the first lays out the pages)
                with pytest.raises(RuntimeError, match="backward was called twice.*paging.overlap 'exact'"):
                    engine.backward(loss)
                refused += 1
            engine.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert refused == 2
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*runs))
